"""Workloads built with the tiny model's real tokenizer: lengths, seeds, shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.errors import BenchConfigError, DatasetError
from benchmarks.tokens import count_tokens, load_tokenizer
from benchmarks.workloads import WorkloadSpec, build_workload


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("pdserve:tiny")


def test_random_lengths_stay_in_range_and_match_the_tokenizer(tokenizer) -> None:
    spec = WorkloadSpec(num_prompts=20, random_input_len=100, random_output_len=20,
                        input_range_ratio=0.5, output_range_ratio=0.25, seed=3)
    reqs = build_workload(spec, tokenizer)
    assert len(reqs) == 20
    assert all(50 <= r.prompt_len <= 150 for r in reqs)
    assert all(15 <= r.expected_output_len <= 25 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 1
    assert all(count_tokens(tokenizer, r.prompt) == r.prompt_len for r in reqs)


def test_the_same_seed_gives_the_same_requests(tokenizer) -> None:
    spec = WorkloadSpec(num_prompts=5, random_input_len=40, random_output_len=8, seed=1)
    again = build_workload(spec, tokenizer)
    assert [r.prompt for r in build_workload(spec, tokenizer)] == [r.prompt for r in again]
    spec.seed = 2
    assert [r.prompt for r in build_workload(spec, tokenizer)] != [r.prompt for r in again]


def test_shared_prefix_groups_share_their_prefix(tokenizer) -> None:
    spec = WorkloadSpec(name="prefix_repetition", num_prompts=12,
                        prefix_repetition_prefix_len=64, prefix_repetition_suffix_len=16,
                        prefix_repetition_num_prefixes=3, prefix_repetition_output_len=8)
    reqs = build_workload(spec, tokenizer)
    groups: dict[str, list[str]] = {}
    for r in reqs:
        groups.setdefault(r.kind, []).append(r.prompt)
        assert r.expected_output_len == 8
    assert sorted(groups) == ["g0", "g1", "g2"] and all(len(g) == 4 for g in groups.values())
    for prompts in groups.values():
        assert len({p[:100] for p in prompts}) == 1  # 64 tokens are well over 100 chars


def test_mixed_spreads_long_prompts_among_short_ones(tokenizer) -> None:
    spec = WorkloadSpec(name="mixed", num_prompts=20, random_input_len=32,
                        random_output_len=24, mixed_long_input_len=400,
                        mixed_long_output_len=4, mixed_long_fraction=0.2)
    reqs = build_workload(spec, tokenizer)
    longs = [i for i, r in enumerate(reqs) if r.kind == "long"]
    assert len(longs) == 4 and reqs[0].kind == "short"
    assert all(reqs[i].prompt_len >= 390 and reqs[i].expected_output_len == 4 for i in longs)
    assert max(b - a for a, b in zip(longs, longs[1:])) <= 8  # spread, not bunched


def test_sharegpt_file(tokenizer, tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": f"question {i} " * 8},
                               {"from": "gpt", "value": f"answer {i} " * 6}]}
            for i in range(3)] + [{"conversations": [{"from": "human", "value": "x"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    reqs = build_workload(WorkloadSpec(name="sharegpt", dataset_path=str(path),
                                       num_prompts=5), tokenizer)
    assert len(reqs) == 5  # three usable rows, reused
    assert all(r.prompt.startswith("question") and r.expected_output_len >= 4 for r in reqs)
    fixed = build_workload(WorkloadSpec(name="sharegpt", dataset_path=str(path),
                                        num_prompts=2, sharegpt_output_len=7), tokenizer)
    assert [r.expected_output_len for r in fixed] == [7, 7]


def test_bad_workloads_say_what_is_wrong(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(BenchConfigError, match="known: random"):
        build_workload(WorkloadSpec(name="nope"), tokenizer)
    with pytest.raises(BenchConfigError, match="--dataset-path"):
        build_workload(WorkloadSpec(name="sharegpt"), tokenizer)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError):
        build_workload(WorkloadSpec(name="sharegpt", dataset_path=str(tmp_path / "bad.json")),
                       tokenizer)
