"""`pdserve bench ...` and `python -m benchmarks ...`: one entry point, `main(argv)`.

    pdserve bench [flags]        measure one server (flags: pdserve bench --help)
    pdserve bench ab [flags]     compare two servers or configs (pdserve bench ab --help)
    pdserve bench scenario NAME  a named scenario, e.g. pd_vs_aggregated (the headline)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.cli import build_parser, load_specs, stat_options, workload_spec
from benchmarks.errors import BenchError
from benchmarks.runner import LoadSpec
from benchmarks.suite import SaveOptions, StatOptions, default_stem, run_suite
from benchmarks.targets import choose_tokenizer, make_target
from benchmarks.workloads import build_workload


def save_options(args: argparse.Namespace, label: str, model: str,
                 loads: list[LoadSpec]) -> SaveOptions:
    """Files only with --save-result or --result-filename; a sweep's stem has no load."""
    if not (args.save_result or args.result_filename):
        return SaveOptions(stem=None)
    if args.result_filename:
        stem = Path(args.result_filename).with_suffix("").name
    else:
        stem = default_stem(label, model, loads[0] if len(loads) == 1 else None)
    result_dir = Path(args.result_dir or Path(args.result_filename or ".").parent or ".")
    return SaveOptions(result_dir=result_dir, stem=stem, plots=not args.no_plots)


def run_single(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    percentiles, metrics, slos = stat_options(args)
    loads = load_specs(args)
    target = make_target(args)
    tokenizer, tokenizer_id = choose_tokenizer(args, target)
    requests = build_workload(workload_spec(args), tokenizer)
    label = args.label or target.backend
    meta = {"endpoint_type": target.backend, "backend": target.backend, "label": label,
            "base_url": target.base_url, "model_id": target.endpoint.model,
            "tokenizer_id": tokenizer_id, "num_prompts": args.num_prompts,
            "dataset_name": args.dataset_name, "seed": args.seed}
    save = save_options(args, label, target.endpoint.model, loads)
    suite = run_suite(target.endpoint, requests, loads, tokenizer,
                      StatOptions(percentiles, metrics, slos, args.save_detailed), meta, save)
    for path in suite.files:
        print(f"wrote {path}")
    return 0 if suite.num_completed else 1


def run_scenario(argv: list[str]) -> int:
    import importlib

    from benchmarks.errors import BenchConfigError
    from benchmarks.scenarios import SCENARIOS

    name = argv[0].replace("-", "_") if argv else ""
    if name not in SCENARIOS:
        raise BenchConfigError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return importlib.import_module(SCENARIOS[name]).main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["scenario"]:
            return run_scenario(argv[1:])
        if argv[:1] == ["ab"]:
            from benchmarks.ab import run_ab

            return run_ab(argv[1:])
        return run_single(argv)
    except BenchError as err:
        print(f"pdserve bench: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("pdserve bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
