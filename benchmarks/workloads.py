"""Seeded workloads: the same flags and seed give the same requests on every run.

- "random": input/output lengths drawn uniformly from [L*(1-r), L*(1+r)] (vLLM's
  `--random-range-ratio`), optional shared `--random-prefix-len` prefix.
- "prefix_repetition" (alias "shared_prefix"): groups of requests sharing a long
  prefix, each with its own suffix (prefix-cache and KV-reuse behaviour).
- "sharegpt": the first human/assistant turns of a ShareGPT-format JSON file.
- "mixed": short decode-heavy requests with long-prompt requests spread among them,
  so long prefills arrive while short requests are decoding (what P/D is for).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.errors import BenchConfigError, DatasetError
from benchmarks.records import SampleRequest
from benchmarks.tokens import allowed_token_ids, count_tokens, random_ids, text_of_length


@dataclass(slots=True)
class WorkloadSpec:
    """Everything that decides a workload's requests (the seed included)."""

    name: str = "random"
    num_prompts: int = 1000
    seed: int = 0
    dataset_path: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    input_range_ratio: float = 0.0
    output_range_ratio: float = 0.0
    random_prefix_len: int = 0
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128
    sharegpt_output_len: int | None = None
    mixed_long_input_len: int = 2048
    mixed_long_output_len: int = 16
    mixed_long_fraction: float = 0.2


def uniform_lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> list[int]:
    """Integer lengths uniform on [floor(mean*(1-r)), ceil(mean*(1+r))], at least 1."""
    if not 0.0 <= ratio < 1.0:
        raise BenchConfigError(f"range ratio must be in [0, 1), got {ratio}")
    low = max(1, math.floor(mean * (1 - ratio)))
    high = max(low, math.ceil(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


class _Builder:
    """Shared state of one workload build: tokenizer, seeded RNG, allowed ids."""

    def __init__(self, spec: WorkloadSpec, tokenizer: Any) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(spec.seed)
        self.allowed = allowed_token_ids(tokenizer)

    def ids(self, n: int) -> list[int]:
        return random_ids(self.rng, self.allowed, n)

    def request(self, i: int, ids: list[int], output_len: int,
                kind: str = "default") -> SampleRequest:
        text, length = text_of_length(self.tokenizer, ids, self.rng, self.allowed)
        return SampleRequest(prompt=text, prompt_len=length, expected_output_len=output_len,
                             request_id=f"bench-{self.spec.seed}-{i}", kind=kind)


def _random(b: _Builder) -> list[SampleRequest]:
    s = b.spec
    ins = uniform_lengths(b.rng, s.random_input_len, s.input_range_ratio, s.num_prompts)
    outs = uniform_lengths(b.rng, s.random_output_len, s.output_range_ratio, s.num_prompts)
    prefix = b.ids(s.random_prefix_len)
    return [b.request(i, prefix + b.ids(ins[i]), outs[i]) for i in range(s.num_prompts)]


def _prefix_repetition(b: _Builder) -> list[SampleRequest]:
    s = b.spec
    if s.prefix_repetition_num_prefixes < 1:
        raise BenchConfigError("--prefix-repetition-num-prefixes must be >= 1")
    prefixes = [b.ids(s.prefix_repetition_prefix_len)
                for _ in range(s.prefix_repetition_num_prefixes)]
    order = b.rng.permutation(s.num_prompts).tolist()
    requests = []
    for i, slot in enumerate(order):
        group = slot % len(prefixes)
        ids = prefixes[group] + b.ids(s.prefix_repetition_suffix_len)
        requests.append(b.request(i, ids, s.prefix_repetition_output_len, kind=f"g{group}"))
    return requests


def _read_sharegpt(path: str | None) -> list[tuple[str, str]]:
    if not path:
        raise BenchConfigError("--dataset-name sharegpt needs --dataset-path FILE.json")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read ShareGPT file {path}: {err}") from err
    pairs = []
    for entry in data if isinstance(data, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2:
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    if not pairs:
        raise DatasetError(f"{path}: no entries with two 'conversations' turns")
    return pairs


def _sharegpt(b: _Builder) -> list[SampleRequest]:
    """vLLM's filter: prompt >= 4 tokens, output >= 4 (unless fixed), prompt <= 1024,
    prompt + output <= 2048. Rows are shuffled by the seed and reused if too few."""
    s = b.spec
    rows = _read_sharegpt(s.dataset_path)
    usable = []
    for k in b.rng.permutation(len(rows)).tolist():
        prompt, completion = rows[k]
        prompt_len = count_tokens(b.tokenizer, prompt)
        out_len = s.sharegpt_output_len or count_tokens(b.tokenizer, completion)
        if prompt_len < 4 or (s.sharegpt_output_len is None and out_len < 4):
            continue
        if prompt_len > 1024 or prompt_len + out_len > 2048:
            continue
        usable.append((prompt, prompt_len, out_len))
    if not usable:
        raise DatasetError(f"{s.dataset_path}: no conversation fits the length filter")
    return [SampleRequest(prompt=p, prompt_len=n, expected_output_len=o,
                          request_id=f"bench-{s.seed}-{i}")
            for i, (p, n, o) in enumerate(usable[i % len(usable)]
                                          for i in range(s.num_prompts))]


def long_positions(num_prompts: int, fraction: float, rng: np.random.Generator) -> set[int]:
    """Indices of the long requests: evenly spread (never first), jittered by the seed."""
    if not 0.0 <= fraction <= 1.0:
        raise BenchConfigError(f"--mixed-long-fraction must be in [0, 1], got {fraction}")
    num_long = round(num_prompts * fraction)
    if num_long == 0:
        return set()
    stride = num_prompts / num_long
    picks = {min(num_prompts - 1, int(stride * (k + 0.5) + rng.uniform(-0.25, 0.25) * stride))
             for k in range(num_long)}
    return picks


def _mixed(b: _Builder) -> list[SampleRequest]:
    s = b.spec
    longs = long_positions(s.num_prompts, s.mixed_long_fraction, b.rng)
    ins = uniform_lengths(b.rng, s.random_input_len, s.input_range_ratio, s.num_prompts)
    outs = uniform_lengths(b.rng, s.random_output_len, s.output_range_ratio, s.num_prompts)
    requests = []
    for i in range(s.num_prompts):
        if i in longs:
            requests.append(b.request(i, b.ids(s.mixed_long_input_len),
                                      s.mixed_long_output_len, kind="long"))
        else:
            requests.append(b.request(i, b.ids(ins[i]), outs[i], kind="short"))
    return requests


WORKLOADS: dict[str, Callable[[_Builder], list[SampleRequest]]] = {
    "random": _random,
    "prefix_repetition": _prefix_repetition,
    "shared_prefix": _prefix_repetition,
    "sharegpt": _sharegpt,
    "mixed": _mixed,
}


def build_workload(spec: WorkloadSpec, tokenizer: Any) -> list[SampleRequest]:
    """The requests of `spec`, deterministic for a given seed and tokenizer."""
    if spec.num_prompts < 1:
        raise BenchConfigError("--num-prompts must be >= 1")
    name = spec.name.replace("-", "_")
    if name not in WORKLOADS:
        raise BenchConfigError(f"unknown --dataset-name {spec.name!r}; known: "
                               + ", ".join(WORKLOADS))
    return WORKLOADS[name](_Builder(spec, tokenizer))
