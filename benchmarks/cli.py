"""Command-line flags. Names follow `vllm bench serve` wherever the concept is the
same, so its users switch without relearning; ours are marked "(pdserve)"."""

from __future__ import annotations

import argparse
import json
import math

from benchmarks.errors import BenchConfigError
from benchmarks.metrics import parse_goodput, parse_percentile_metrics, parse_percentiles
from benchmarks.runner import LoadSpec
from benchmarks.workloads import WORKLOADS, WorkloadSpec


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help="Server base URL, e.g. http://127.0.0.1:8000 "
                                      "(default: http://HOST:PORT)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions or /v1/chat/completions")
    g.add_argument("--backend", choices=["openai", "openai-chat", "vllm"], default=None,
                   help="Request format (default: from --endpoint)")
    g.add_argument("--model", help="Model name sent in requests (default: the first "
                                    "model the server lists at /v1/models)")
    g.add_argument("--served-model-name", help="Alias of --model, as in vLLM")
    g.add_argument("--tokenizer", help="Tokenizer directory or hub id (default: --model, "
                                       "else the 'root' the server lists for it)")
    g.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra HTTP header; repeatable")
    g.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="Ask for exact output lengths (vLLM's ignore_eos/min_tokens); "
                        "on by default (pdserve)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="Seconds before a request counts as failed (pdserve)")


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", choices=sorted(WORKLOADS))
    g.add_argument("--dataset-path", help="ShareGPT-format JSON file (--dataset-name sharegpt)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", default="0.0",
                   help='One float in [0, 1), or JSON {"input": r, "output": r}')
    g.add_argument("--random-prefix-len", type=int, default=0)
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-repetition-output-len", type=int, default=128)
    g.add_argument("--sharegpt-output-len", type=int, default=None)
    g.add_argument("--mixed-long-input-len", type=int, default=2048,
                   help="Prompt length of the long requests of 'mixed' (pdserve)")
    g.add_argument("--mixed-long-output-len", type=int, default=16, help="(pdserve)")
    g.add_argument("--mixed-long-fraction", type=float, default=0.2,
                   help="Share of long requests in 'mixed'; short ones use "
                        "--random-input-len/--random-output-len (pdserve)")


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", default="inf",
                   help="Requests/s (Poisson or gamma arrivals); a comma list sweeps")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the gaps: 1 Poisson, <1 burstier, >1 even")
    g.add_argument("--max-concurrency", default=None,
                   help="Cap on requests in flight; a comma list sweeps")
    g.add_argument("--num-warmups", type=int, default=0,
                   help="Unmeasured requests sent before each load point")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    g.add_argument("--metric-percentiles", default="90,99")
    g.add_argument("--save-result", action="store_true",
                   help="Write the JSON result, CSVs and plots")
    g.add_argument("--save-detailed", action="store_true",
                   help="Also keep generated texts in the JSON")
    g.add_argument("--result-dir", default=None)
    g.add_argument("--result-filename", default=None,
                   help="JSON file name; CSVs and PNGs share its stem")
    g.add_argument("--label", default=None)
    g.add_argument("--no-plots", action="store_true", help="Skip PNG plots (pdserve)")
    g.add_argument("--disable-tqdm", action="store_true")


def build_parser(prog: str = "pdserve bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="TTFT/ITL/TPOT/E2E benchmark of an OpenAI-compatible "
        "server. `pdserve bench ab --help`: compare two servers.")
    _add_target_flags(p)
    _add_workload_flags(p)
    _add_load_flags(p)
    _add_output_flags(p)
    return p


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError as err:
        raise BenchConfigError(f"{flag}: not a number or comma list: {text!r}") from err


def parse_range_ratio(text: str) -> tuple[float, float]:
    """'0.5' -> (0.5, 0.5); '{"input": 0.3, "output": 0.5}' -> (0.3, 0.5)."""
    text = str(text).strip()
    try:
        if text.startswith("{"):
            d = json.loads(text)
            return float(d.get("input", 0.0)), float(d.get("output", 0.0))
        return float(text), float(text)
    except (ValueError, AttributeError) as err:
        raise BenchConfigError(f"--random-range-ratio: bad value {text!r}") from err


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    in_ratio, out_ratio = parse_range_ratio(args.random_range_ratio)
    names = [f for f in WorkloadSpec.__dataclass_fields__
             if f not in ("name", "input_range_ratio", "output_range_ratio")]
    return WorkloadSpec(name=args.dataset_name, input_range_ratio=in_ratio,
                        output_range_ratio=out_ratio,
                        **{n: getattr(args, n) for n in names})


def load_specs(args: argparse.Namespace) -> list[LoadSpec]:
    """One LoadSpec per sweep point (rates x concurrencies)."""
    rates = _floats(args.request_rate, "--request-rate") or [math.inf]
    concs: list[int | None] = [None]
    if args.max_concurrency not in (None, ""):
        concs = [int(c) for c in _floats(args.max_concurrency, "--max-concurrency")]
        if any(c < 1 for c in concs):
            raise BenchConfigError("--max-concurrency must be >= 1")
    return [LoadSpec(request_rate=r, burstiness=args.burstiness, max_concurrency=c,
                     num_warmups=args.num_warmups, seed=args.seed,
                     request_timeout_s=args.request_timeout,
                     show_progress=not args.disable_tqdm)
            for r in rates for c in concs]


def parse_headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BenchConfigError(f"--header: want KEY=VALUE, got {pair!r}")
        headers[key.strip()] = value.strip()
    return headers


def parse_extra_body(text: str | None) -> dict:
    if not text:
        return {}
    try:
        body = json.loads(text)
    except ValueError as err:
        raise BenchConfigError(f"--extra-body: not JSON: {err}") from err
    if not isinstance(body, dict):
        raise BenchConfigError("--extra-body: want a JSON object")
    return body


def stat_options(args: argparse.Namespace) -> tuple[list[float], list[str], dict[str, float]]:
    """(percentiles, percentile metrics, goodput SLOs in ms), validated."""
    return (parse_percentiles(args.metric_percentiles),
            parse_percentile_metrics(args.percentile_metrics),
            parse_goodput(args.goodput))
