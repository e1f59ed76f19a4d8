"""A user's day with the benchmark: start a real (tiny) vLLM server, measure it,
read the JSON, CSV and plots. vLLM's own OpenAI server stands in for any server."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.servers import ManagedServer
from serving.cli import main as pdserve_main
from serving.model import resolve_model

pytestmark = pytest.mark.e2e

REQUIRED_KEYS = [
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "input_lens", "output_lens", "ttfts", "itls", "errors",
] + [f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
     for stat in ("mean", "median", "std", "p90", "p99")]


def vllm_command(model_dir: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "{port}",
            "--dtype", "float32", "--enforce-eager", "--block-size", "32",
            "--max-model-len", "4096"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    with ManagedServer(vllm_command(resolve_model("pdserve:tiny")), log_path=log,
                       env={"VLLM_CPU_KVCACHE_SPACE": "1"}, ready_timeout_s=240) as url:
        yield url


SMALL = ["--num-prompts", "12", "--random-input-len", "48", "--random-output-len", "12",
         "--random-range-ratio", "0.25", "--seed", "5", "--disable-tqdm"]


def test_completions_run_writes_every_key_csv_and_plot(server: str, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    rc = main(["--base-url", server, *SMALL, "--max-concurrency", "4", "--num-warmups", "2",
               "--goodput", "ttft:5000", "tpot:1000", "--result-filename", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [k for k in REQUIRED_KEYS if k not in result] == []
    assert (result["completed"], result["failed"]) == (12, 0)
    assert result["model_id"] == "tiny" and result["max_concurrency"] == 4
    assert 0 < result["request_goodput"] <= result["request_throughput"]
    assert result["median_ttft_ms"] > 0 and result["p99_itl_ms"] >= result["median_itl_ms"]
    # Exact output lengths (ignore_eos): 12 +- 25% -> 9..15, as sampled.
    assert all(9 <= n <= 15 for n in result["output_lens"])
    # One gap per chunk after the first; a busy server may put two tokens in one chunk.
    assert all(len(gaps) <= n - 1 for gaps, n in zip(result["itls"], result["output_lens"]))
    assert sum(map(len, result["itls"])) > 12
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert len(rows) == 12 and all(r["success"] == "True" for r in rows)
    assert (tmp_path / "run-cdf.png").stat().st_size > 10_000


def test_chat_sweep_through_pdserve_bench(server: str, tmp_path: Path) -> None:
    rc = pdserve_main(["bench", "--base-url", server, "--endpoint", "/v1/chat/completions",
                       *SMALL, "--dataset-name", "mixed", "--mixed-long-input-len", "300",
                       "--mixed-long-output-len", "4", "--max-concurrency", "2,6",
                       "--goodput", "ttft:5000", "--label", "tiny-chat",
                       "--save-result", "--result-dir", str(tmp_path)])
    assert rc == 0
    sweep = json.loads(next(tmp_path.glob("*-sweep.json")).read_text())
    assert [p["max_concurrency"] for p in sweep["points"]] == [2, 6]
    assert all(p["completed"] == 12 for p in sweep["points"])
    point = json.loads(next(tmp_path.glob("*-concurrency6.json")).read_text())
    assert point["backend"] == "openai-chat" and set(point["per_kind"]) == {"long", "short"}
    # Chat's opening role-only chunk is not a token: at most one gap per token after the first.
    assert all(len(g) <= n - 1 for g, n in zip(point["itls"], point["output_lens"]))
    longs = [n for n, kind in zip(point["output_lens"], point["kinds"]) if kind == "long"]
    assert longs and set(longs) == {4}
    assert next(tmp_path.glob("*-vs-load.png")).stat().st_size > 10_000
    assert len(list(tmp_path.glob("*-cdf.png"))) == 2


def test_ab_of_two_endpoints_writes_a_ratio_table(server: str, tmp_path: Path) -> None:
    rc = main(["ab", "--a-base-url", server, "--a-label", "first",
               "--b-base-url", server, "--b-label", "second", *SMALL,
               "--max-concurrency", "4", "--goodput", "ttft:5000", "--rounds", "2",
               "--result-dir", str(tmp_path), "--result-filename", "cmp.json"])
    assert rc == 0
    table = (tmp_path / "cmp-ab.md").read_text()
    assert "| metric | first (A) | second (B) | B/A | better |" in table
    assert "| ITL p99 (ms) |" in table and "| goodput (req/s) |" in table
    summary = json.loads((tmp_path / "cmp-ab.json").read_text())
    assert [p["completed"] for p in summary["first"] + summary["second"]] == [12, 12]  # medians
    for side in ("first", "second"):
        for k in (1, 2):
            one = json.loads((tmp_path / f"cmp-{side}-r{k}.json").read_text())
            assert one["label"] == side and len(one["input_lens"]) == 12
        folded = json.loads((tmp_path / f"cmp-{side}.json").read_text())
        assert folded["rounds"] == 2 and len(folded["input_lens"]) == 24  # pooled
    # Both sides ran the very same requests.
    a, b = (json.loads((tmp_path / f"cmp-{s}.json").read_text()) for s in ("first", "second"))
    assert a["input_lens"] == b["input_lens"]
    assert (tmp_path / "cmp-ab-cdf.png").exists()
