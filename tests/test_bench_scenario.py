"""The headline scenario's plumbing, without the minutes its real run takes
(`python -m benchmarks.scenarios.pd_vs_aggregated` is the real run)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.scenarios import pd_vs_aggregated as scenario
from serving.config import app_config_from_file


def test_scenario_configs_are_the_repo_configs_on_the_bench_model(tmp_path: Path) -> None:
    agg, _ = app_config_from_file(scenario.aggregated_config(tmp_path))
    assert agg.model == "pdserve:bench"
    assert agg.aggregated.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    if not (scenario.REPO / "configs" / "cpu-pd.yaml").exists():
        pytest.skip("configs/cpu-pd.yaml has not landed")
    pd, _ = app_config_from_file(scenario.pd_config(tmp_path))
    assert pd.model == "pdserve:bench"
    assert pd.prefill.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert pd.decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_dry_run_prints_one_ab_command_with_overrides_last(capsys, tmp_path: Path) -> None:
    assert main(["scenario", "pd_vs_aggregated", "--preset", "agg-vs-vllm", "--dry-run",
                 "--result-dir", str(tmp_path), "--num-prompts", "8"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[1:4] == ["-m", "benchmarks", "ab"]
    assert argv[argv.index("--dataset-name") + 1] == "mixed"
    assert argv[len(argv) - 1 - argv[::-1].index("--num-prompts") + 1] == "8"
    assert "vllm.entrypoints.openai.api_server" in argv[argv.index("--a-cmd") + 1]
    assert str(tmp_path / "config-aggregated.yaml") in argv[argv.index("--b-cmd") + 1]


def test_unknown_scenario_and_preset_are_refused(capsys) -> None:
    assert main(["scenario", "nope"]) == 2
    assert "pd_vs_aggregated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scenario.main(["--preset", "nope"])


def result(label: str, itl: float, ttft: float, goodput: float, short_itl: float) -> dict:
    return {"label": label, "p99_itl_ms": itl, "p99_ttft_ms": ttft, "request_goodput": goodput,
            "median_itl_ms": itl / 4, "median_ttft_ms": ttft / 4, "output_throughput": 50.0,
            "failed": 0, "per_kind": {"short": {"p99_itl_ms": short_itl}}}


def test_headline_table_reports_ratios_and_the_goal() -> None:
    table = scenario.headline_markdown(result("aggregated", 400.0, 2000.0, 0.8, 500.0),
                                       result("pd", 100.0, 2400.0, 0.8, 80.0))
    assert "| ITL p99 (ms) | 400.0 | 100.0 | 0.25x |" in table
    assert "| TTFT p99 (ms) | 2000.0 | 2400.0 | 1.20x |" in table
    assert "| short requests' ITL p99 (ms) | 500.0 | 80.0 | 0.16x |" in table
    assert "met (ITL p99 ratio 0.25x" in table
    worse = scenario.headline_markdown(result("aggregated", 400.0, 2000.0, 0.8, 500.0),
                                       result("pd", 100.0, 2400.0, 0.5, 80.0))
    assert "not met" in worse
    plain = scenario.headline_markdown(result("vllm", 1.0, 1.0, 1.0, 1.0),
                                       result("pdserve", 1.0, 1.0, 1.0, 1.0), with_goal=False)
    assert "Goal" not in plain


def test_a_side_given_on_the_command_line_replaces_the_presets(capsys, tmp_path) -> None:
    assert main(["scenario", "pd_vs_aggregated", "--dry-run", "--preset", "agg-vs-vllm",
                 "--result-dir", str(tmp_path),
                 "--b-base-url", "http://127.0.0.1:8123", "--b-label", "mine"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert "--b-cmd" not in argv and "--a-cmd" in argv  # vLLM stays as A
    assert argv[argv.index("--b-base-url") + 1] == "http://127.0.0.1:8123"


def test_ab_sides_take_a_url_a_command_or_a_pdserve_config() -> None:
    from benchmarks.ab import build_ab_parser, side_of
    from benchmarks.errors import BenchConfigError

    args = build_ab_parser().parse_args(["--a-config", "configs/cpu-aggregated.yaml",
                                         "--b-base-url", "http://127.0.0.1:1",
                                         "--b-cmd", "x"])
    a = side_of(args, "a")
    assert shlex.split(a.command)[1:4] == ["-m", "serving.cli", "serve"]
    with pytest.raises(BenchConfigError, match="exactly one"):
        side_of(args, "b")


def test_pd_overhead_pins_the_aggregated_engine_to_the_last_cores(tmp_path: Path) -> None:
    """Off the cores configs/cpu-pd.yaml keeps Ray and the serving processes on."""
    import os

    from benchmarks.pd_overhead import pinned_config

    last = max(os.sched_getaffinity(0))
    one, _ = app_config_from_file(pinned_config(str(scenario.REPO / "configs" /
                                                    "cpu-aggregated.yaml"), 1, str(tmp_path)))
    assert one.aggregated.env["VLLM_CPU_OMP_THREADS_BIND"] == str(last)
    if last >= 1:
        two, _ = app_config_from_file(pinned_config(str(scenario.REPO / "configs" /
                                                        "cpu-aggregated.yaml"), 2,
                                                    str(tmp_path)))
        assert two.aggregated.env["VLLM_CPU_OMP_THREADS_BIND"] == f"{last - 1}-{last}"
