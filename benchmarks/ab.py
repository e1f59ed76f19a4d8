"""`pdserve bench ab`: two servers, the same seeded workload, back to back.

Each side is a running server (`--a-base-url URL`), a command the tool starts and
stops itself (`--a-cmd "pdserve serve CONFIG --port {port}"`), or a pdserve config
(`--a-config CONFIG`, short for that command). Sides run one after
the other, never together, so they do not share the machine. Files (stem S):
S-<A>.json ... and S-<B>.json ... per side (as a single run writes them), then
S-ab.md (ratio tables), S-ab.json (both sides' summaries), S-ab-cdf.png and, for a
sweep, S-ab-vs-load.png. With `--rounds N` the sides alternate N times, each round's
files get a `-rK` suffix, and S-<label>.json holds the medians over the rounds
(per-request samples pooled), which the tables and plots use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from benchmarks.cli import build_parser, load_specs, stat_options, workload_spec
from benchmarks.compare import ab_markdown
from benchmarks.errors import BenchConfigError
from benchmarks.plots import plot_cdfs, plot_vs_load
from benchmarks.report import summary_row, write_json
from benchmarks.rounds import combine_rounds
from benchmarks.servers import ManagedServer
from benchmarks.suite import SaveOptions, StatOptions, default_stem, run_suite, safe_name
from benchmarks.targets import choose_tokenizer, make_target
from benchmarks.workloads import build_workload


@dataclass(slots=True)
class Side:
    label: str
    base_url: str | None
    command: str | None
    model: str | None
    env: dict[str, str]


def build_ab_parser() -> argparse.ArgumentParser:
    p = build_parser(prog="pdserve bench ab")
    p.description = ("Compare two OpenAI-compatible servers on the same seeded workload. "
                     "Every flag of `pdserve bench` applies to both sides.")
    for side in ("a", "b"):
        g = p.add_argument_group(f"side {side.upper()}")
        g.add_argument(f"--{side}-label", default=side.upper())
        g.add_argument(f"--{side}-base-url", help="A running server")
        g.add_argument(f"--{side}-cmd", help="A server command to start; '{port}' is "
                                             "replaced by a free port")
        g.add_argument(f"--{side}-config", help="A pdserve config to serve: short for "
                                                "--X-cmd 'pdserve serve CONFIG --port {port}'")
        g.add_argument(f"--{side}-model", help="Model name on this side (default: --model, "
                                               "else what the server lists)")
        g.add_argument(f"--{side}-env", action="append", default=[], metavar="KEY=VALUE",
                       help="Environment for --X-cmd; repeatable")
    p.add_argument("--server-timeout", type=float, default=600.0,
                   help="Seconds a started server may take to become ready")
    p.add_argument("--rounds", type=int, default=1,
                   help="Alternate A, B, A, B ... this many rounds; tables show medians "
                        "(a noisy host drifts between sides)")
    return p


def side_of(args: argparse.Namespace, key: str) -> Side:
    url, cmd = getattr(args, f"{key}_base_url"), getattr(args, f"{key}_cmd")
    config = getattr(args, f"{key}_config")
    if sum(map(bool, (url, cmd, config))) != 1:
        raise BenchConfigError(f"side {key.upper()}: give exactly one of --{key}-base-url, "
                               f"--{key}-cmd and --{key}-config")
    if config:
        cmd = shlex.join([sys.executable, "-m", "serving.cli", "serve", config,
                          "--port", "{port}"])
    env = {}
    for pair in getattr(args, f"{key}_env"):
        k, sep, v = pair.partition("=")
        if not sep:
            raise BenchConfigError(f"--{key}-env: want KEY=VALUE, got {pair!r}")
        env[k] = v
    return Side(getattr(args, f"{key}_label"), url, cmd, getattr(args, f"{key}_model"), env)


@contextlib.contextmanager
def running(side: Side, log_dir: Path, timeout_s: float) -> Iterator[str]:
    """The side's base URL, with its server started (and stopped after) if it has a cmd."""
    if side.base_url:
        yield side.base_url
        return
    log = log_dir / f"server-{safe_name(side.label)}.log"
    server = ManagedServer(side.command, env=side.env, log_path=log, ready_timeout_s=timeout_s)
    print(f"starting {side.label}: {shlex.join(server.argv)} (log: {log})", flush=True)
    with server as url:
        yield url
    print(f"stopped {side.label}", flush=True)


@dataclass(slots=True)
class _Workload:
    """The requests both sides get, built once from the first side's tokenizer."""

    requests: list | None = None
    tokenizer: Any = None
    tokenizer_id: str = ""


def measure_side(args: argparse.Namespace, side: Side, stem: str, workload: _Workload,
                 stats: StatOptions) -> list[dict[str, Any]]:
    """Start (if needed) and measure one side at every load point."""
    out_dir = Path(args.result_dir or ".")
    with running(side, out_dir, args.server_timeout) as url:
        target = make_target(args, base_url=url, model=side.model)
        if workload.requests is None:
            workload.tokenizer, workload.tokenizer_id = choose_tokenizer(args, target)
            workload.requests = build_workload(workload_spec(args), workload.tokenizer)
        meta = {"endpoint_type": target.backend, "backend": target.backend,
                "label": side.label, "base_url": url, "server_command": side.command,
                "model_id": target.endpoint.model, "tokenizer_id": workload.tokenizer_id,
                "num_prompts": args.num_prompts, "dataset_name": args.dataset_name,
                "seed": args.seed}
        save = SaveOptions(out_dir, stem, plots=not args.no_plots)
        return run_suite(target.endpoint, workload.requests, load_specs(args),
                         workload.tokenizer, stats, meta, save).results


def run_ab(argv: list[str]) -> int:
    args = build_ab_parser().parse_args(argv)
    sides = [side_of(args, "a"), side_of(args, "b")]
    if sides[0].label == sides[1].label:
        raise BenchConfigError("--a-label and --b-label must differ")
    if args.rounds < 1:
        raise BenchConfigError("--rounds must be >= 1")
    percentiles, metrics, slos = stat_options(args)
    stats = StatOptions(percentiles, metrics, slos, args.save_detailed)
    load_specs(args)  # validate before any server starts
    out_dir = Path(args.result_dir or ".")
    stem = (Path(args.result_filename).with_suffix("").name if args.result_filename
            else default_stem("ab", args.dataset_name, None))
    workload = _Workload()
    per_round: dict[str, list[list[dict[str, Any]]]] = {s.label: [] for s in sides}
    for k in range(1, args.rounds + 1):
        for side in sides:
            side_stem = f"{stem}-{safe_name(side.label)}"
            if args.rounds > 1:
                side_stem += f"-r{k}"
                print(f"round {k}/{args.rounds}: {side.label}", flush=True)
            per_round[side.label].append(measure_side(args, side, side_stem, workload, stats))
    results = {label: [combine_rounds(list(points)) for points in zip(*rounds)]
               for label, rounds in per_round.items()}
    if args.rounds > 1:  # the folded results, where a single round would have put them
        for side in sides:
            write_folded(results[side.label], out_dir / f"{stem}-{safe_name(side.label)}")
    write_ab_files(results, sides, percentiles, out_dir / stem, plots=not args.no_plots)
    return 0 if all(any(r["completed"] for r in rs) for rs in results.values()) else 1


def write_folded(results: list[dict[str, Any]], base: Path) -> None:
    if len(results) == 1:
        write_json(results[0], base.with_suffix(".json"))
        return
    for result in results:
        write_json(result, base.parent / f"{base.name}-{result['load_label']}.json")


def write_ab_files(results: dict[str, list[dict[str, Any]]], sides: list[Side],
                   percentiles: list[float], base: Path, plots: bool) -> None:
    a, b = (results[s.label] for s in sides)
    markdown = ab_markdown(a, b, sides[0].label, sides[1].label, percentiles)
    print("\n" + markdown, flush=True)
    files = [base.parent / f"{base.name}-ab.md", base.parent / f"{base.name}-ab.json"]
    files[0].write_text(markdown)
    files[1].write_text(json.dumps(
        {label: [summary_row(r) for r in rs] for label, rs in results.items()}, indent=1))
    if plots:
        files.append(plot_cdfs({s.label: results[s.label][-1] for s in sides},
                               base.parent / f"{base.name}-ab-cdf.png"))
        if len(a) > 1:
            files.append(plot_vs_load(results, base.parent / f"{base.name}-ab-vs-load.png"))
    for path in files:
        print(f"wrote {path}")
