"""Headline scenario: P/D on CPU (prefill pinned to core 0, decode to core 1) against
one aggregated engine on both cores, `bench` model, the mixed workload (long prompts
arriving while short requests decode). Goal for P/D: ITL p99 <= 0.5x aggregated at
equal or better goodput.

    python -m benchmarks.scenarios.pd_vs_aggregated                 # the headline
    python -m benchmarks.scenarios.pd_vs_aggregated --preset agg-vs-vllm
    python -m benchmarks.scenarios.pd_vs_aggregated --a-cmd "..." --b-base-url URL

Any `pdserve bench ab` flag given after the scenario's own overrides its default
(e.g. --num-prompts 20, --request-rate 0.5, --b-cmd "..."). Writes everything
`pdserve bench ab` writes plus S-headline.md into --result-dir.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.ab import run_ab
from benchmarks.compare import fmt_value
from benchmarks.errors import BenchConfigError, BenchError
from benchmarks.suite import safe_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = "pdserve:bench"
KV_CACHE_GIB = "2"
GOAL_ITL_RATIO = 0.5

WORKLOAD = [
    # Sized for 2 cores: a 1024-token prefill of the bench model takes ~1 s on both cores
    # (~2 s on one), a decode step ~45 ms. A long prompt stalls the decode steps that
    # share its engine step, so stalled ITL samples are about (long arrivals/s) x (step
    # time) of all: 0.4/s x 45 ms ~ 2%, enough that ITL p99 measures the stalls rather
    # than sitting on their knee (at 0.125 long/s it swung 200 ms <-> 1.1 s by round).
    "--dataset-name", "mixed", "--num-prompts", "40", "--seed", "0",
    "--random-input-len", "64", "--random-output-len", "64",
    "--mixed-long-input-len", "1024", "--mixed-long-output-len", "8",
    "--mixed-long-fraction", "0.4",
    "--request-rate", "1.0", "--burstiness", "1.0", "--num-warmups", "2",
    "--goodput", "ttft:5000", "tpot:150", "--metric-percentiles", "50,90,99,99.9",
    "--endpoint", "/v1/completions", "--tokenizer", MODEL, "--request-timeout", "300",
]


def scenario_config(source: str, target: Path, pins: dict[str, str]) -> Path:
    """The repo's config `source` (configs/), serving the bench model, pools pinned as
    `pins` says (pool -> VLLM_CPU_OMP_THREADS_BIND); the lead's config stays the truth
    for everything else (router policy, KV connector)."""
    path = REPO / "configs" / source
    if not path.exists():
        raise BenchConfigError(f"{path} is missing: this scenario side needs it")
    data = yaml.safe_load(path.read_text())
    args = data["applications"][0]["args"]
    args["model"] = MODEL
    for pool, cores in pins.items():
        if not isinstance(args.get(pool), dict):
            raise BenchConfigError(f"{path}: no '{pool}' pool")
        env = args[pool].setdefault("env", {})
        env.update({"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, "VLLM_CPU_OMP_THREADS_BIND": cores})
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def aggregated_config(result_dir: Path) -> Path:
    """One engine, threads on both cores."""
    return scenario_config("cpu-aggregated.yaml", result_dir / "config-aggregated.yaml",
                           {"aggregated": "0-1"})


def pd_config(result_dir: Path) -> Path:
    """Prefill engine on core 0, decode engine on core 1."""
    return scenario_config("cpu-pd.yaml", result_dir / "config-pd.yaml",
                           {"prefill": "0", "decode": "1"})


def pdserve_cmd(config: Path) -> str:
    return shlex.join([sys.executable, "-m", "serving.cli", "serve", str(config),
                       "--port", "{port}"])


def vllm_cmd() -> str:
    """vLLM's own OpenAI server on the same model, engine threads on both cores."""
    from serving.model import resolve_model

    return (f"{shlex.quote(sys.executable)} -m vllm.entrypoints.openai.api_server "
            f"--model {resolve_model(MODEL)} --served-model-name bench "
            "--host 127.0.0.1 --port {port} --dtype float32 --enforce-eager "
            "--block-size 32 --max-model-len 4096 --max-num-seqs 64")


VLLM_ENV = ["VLLM_CPU_KVCACHE_SPACE=2", "VLLM_CPU_OMP_THREADS_BIND=0-1"]


def preset_sides(preset: str, result_dir: Path) -> list[str]:
    """`ab` side flags of a preset: A is the baseline, B the candidate."""
    if preset == "pd-vs-agg":
        return ["--a-label", "aggregated", "--a-cmd", pdserve_cmd(aggregated_config(result_dir)),
                "--b-label", "pd", "--b-cmd", pdserve_cmd(pd_config(result_dir))]
    if preset == "agg-vs-vllm":
        return ["--a-label", "vllm", "--a-cmd", vllm_cmd(),
                *[x for e in VLLM_ENV for x in ("--a-env", e)],
                "--b-label", "pdserve-agg", "--b-cmd",
                pdserve_cmd(aggregated_config(result_dir))]
    if preset == "vllm-vs-vllm":
        env = [x for e in VLLM_ENV for x in ("--a-env", e)]
        return ["--a-label", "vllm-1", "--a-cmd", vllm_cmd(), *env,
                "--b-label", "vllm-2", "--b-cmd", vllm_cmd(),
                *[x.replace("--a-", "--b-") for x in env]]
    raise BenchConfigError(f"unknown --preset {preset!r}; known: pd-vs-agg, agg-vs-vllm, "
                           "vllm-vs-vllm")


def preflight(argv: list[str]) -> None:
    """Fail fast, before any server starts, if our server refuses a side's config."""
    from serving.app import build_app
    from serving.config import app_config_from_file

    for cmd in (v for f, v in zip(argv, argv[1:]) if f in ("--a-cmd", "--b-cmd")):
        parts = shlex.split(cmd)
        if parts[1:4] != ["-m", "serving.cli", "serve"]:
            continue
        try:
            build_app(app_config_from_file(parts[4])[0])
        except ValueError as err:
            raise BenchConfigError(
                f"{parts[4]}: pdserve cannot serve this config yet ({err}); try "
                "--preset agg-vs-vllm, or give the side as --b-cmd/--b-base-url") from err


def last_value(argv: list[str], flag: str, default: str) -> str:
    values = [argv[i + 1] for i, x in enumerate(argv[:-1]) if x == flag]
    return values[-1] if values else default


SOURCE_FLAGS = ("-cmd", "-config", "-base-url")


def overridden_sides(extra: list[str]) -> set[str]:
    """Sides ('a', 'b') whose server the user gives on the command line."""
    return {flag[2] for flag in extra
            if flag[:4] in ("--a-", "--b-") and flag.split("=")[0][3:] in SOURCE_FLAGS}


def ab_argv(preset: str, result_dir: Path, stem: str, extra: list[str]) -> list[str]:
    """The `ab` flags: workload, the preset's sides minus any the user replaces, extras."""
    sides, mine = preset_sides(preset, result_dir), overridden_sides(extra)
    kept: list[str] = []
    for flag, value in zip(sides[::2], sides[1::2]):
        if not (flag[2] in mine and flag[3:] in SOURCE_FLAGS + ("-env",)):
            kept += [flag, value]
    return [*WORKLOAD, *kept, "--result-dir", str(result_dir),
            "--result-filename", f"{stem}.json", "--server-timeout", "900", *extra]


def _side_result(result_dir: Path, stem: str, label: str) -> dict[str, Any]:
    path = result_dir / f"{stem}-{safe_name(label)}.json"
    if not path.exists():
        raise BenchConfigError(f"no {path.name}: the headline table needs one load point "
                               "(one --request-rate and one --max-concurrency)")
    return json.loads(path.read_text())


def headline_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(title, A value, B value): the figures the issue asks for, overall and for the
    short requests whose decoding the long prefills interrupt."""
    rows = [("ITL p99 (ms)", a["p99_itl_ms"], b["p99_itl_ms"]),
            ("TTFT p99 (ms)", a["p99_ttft_ms"], b["p99_ttft_ms"]),
            ("goodput (req/s)", a["request_goodput"], b["request_goodput"])]
    short_a, short_b = a.get("per_kind", {}).get("short"), b.get("per_kind", {}).get("short")
    if short_a and short_b:
        rows.append(("short requests' ITL p99 (ms)", short_a["p99_itl_ms"],
                     short_b["p99_itl_ms"]))
    rows += [("ITL median (ms)", a["median_itl_ms"], b["median_itl_ms"]),
             ("TTFT median (ms)", a["median_ttft_ms"], b["median_ttft_ms"]),
             ("output throughput (tok/s)", a["output_throughput"], b["output_throughput"]),
             ("failed requests", a["failed"], b["failed"])]
    return rows


def headline_markdown(a: dict[str, Any], b: dict[str, Any], with_goal: bool = True) -> str:
    la, lb = a["label"], b["label"]
    lines = [f"| metric | {la} (A) | {lb} (B) | B/A |", "|---|---:|---:|---:|"]
    for title, va, vb in headline_rows(a, b):
        r = f"{vb / va:.2f}x" if va else "-"
        lines.append(f"| {title} | {fmt_value(va)} | {fmt_value(vb)} | {r} |")
    if a.get("rounds"):
        lines += ["", f"Medians over {a['rounds']} rounds; each round's values:", ""]
        for key, values in a.get("round_values", {}).items():
            theirs = b.get("round_values", {}).get(key, [])
            lines.append(f"- {key}: {la} {', '.join(map(fmt_value, values))}; "
                         f"{lb} {', '.join(map(fmt_value, theirs))}")
    if not with_goal:
        return "\n".join(lines) + "\n"
    itl = b["p99_itl_ms"] / a["p99_itl_ms"] if a["p99_itl_ms"] else float("inf")
    # "Equal" goodput within 2%: run-to-run noise here is larger than that.
    good_ok = (b["request_goodput"] or 0) >= 0.98 * (a["request_goodput"] or 0)
    met = itl <= GOAL_ITL_RATIO and good_ok
    lines += ["", f"Goal (B ITL p99 <= {GOAL_ITL_RATIO}x A at equal or better goodput): "
              f"{'met' if met else 'not met'} (ITL p99 ratio {itl:.2f}x, goodput "
              f"{'>=' if good_ok else '<'} A within 2%)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench scenario pd_vs_aggregated",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pd-vs-agg",
                        choices=["pd-vs-agg", "agg-vs-vllm", "vllm-vs-vllm"])
    parser.add_argument("--result-dir", default=None,
                        help="default: results/pd_vs_aggregated-<date>")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the `pdserve bench ab` command and stop")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    now = datetime.now().strftime("%Y%m%d-%H%M%S")
    result_dir = Path(args.result_dir or f"results/pd_vs_aggregated-{now}")
    stem = f"{args.preset}"
    try:
        ab = ab_argv(args.preset, result_dir, stem, extra)
        if args.dry_run:
            print(shlex.join([sys.executable, "-m", "benchmarks", "ab", *ab]))
            return 0
        preflight(ab)
        rc = run_ab(ab)
        labels = [last_value(ab, f"--{k}-label", k.upper()) for k in ("a", "b")]
        a, b = (_side_result(result_dir, stem, label) for label in labels)
    except BenchError as err:
        print(f"scenario: error: {err}", file=sys.stderr)
        return err.exit_code
    table = (f"# Headline: {args.preset}\n\n"
             + headline_markdown(a, b, with_goal=args.preset == "pd-vs-agg"))
    (result_dir / f"{stem}-headline.md").write_text(table)
    print("\n" + table)
    return rc


if __name__ == "__main__":
    sys.exit(main())
