"""`pdserve` command line: serve a config, build the built-in models, run benchmarks."""

from __future__ import annotations

import argparse
import sys


def _make_model(args: argparse.Namespace) -> int:
    from serving.model import build_model, ensure_model, resolve_model

    if args.builtin:
        print(resolve_model(f"pdserve:{args.builtin}"))
        return 0
    if not args.dir:
        print("give a target DIR or --builtin SIZE", file=sys.stderr)
        return 2
    if args.force:
        build_model(args.dir, args.size, args.seed)
    else:
        ensure_model(args.dir, args.size, args.seed)
    print(args.dir)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from serving.server import serve_foreground

    return serve_foreground(args.config, host=args.host, port=args.port,
                            metrics_port=args.metrics_port)


def _bench(argv: list[str]) -> int:
    from benchmarks.__main__ import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a config file in the foreground")
    serve.add_argument("config", help="Serve config YAML, e.g. configs/cpu-aggregated.yaml")
    serve.add_argument("--host", default=None, help="HTTP host (default: the config's, "
                                                    "else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default: the "
                                                              "config's, else 8000)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="port of Ray's metrics endpoint: vLLM's engine metrics, "
                            "Ray's and Serve's (default: a free one, logged)")
    serve.set_defaults(func=_serve)

    make = sub.add_parser("make-model", help="build a random-weight Llama with a trained "
                                             "BPE tokenizer (offline, deterministic)")
    make.add_argument("dir", nargs="?", help="target directory")
    make.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--force", action="store_true", help="rebuild even if present")
    make.add_argument("--builtin", choices=["tiny", "bench"],
                      help="build into the model cache (PDSERVE_MODEL_CACHE) and print its path")
    make.set_defaults(func=_make_model)

    sub.add_parser("bench", help="TTFT/ITL benchmark (pdserve bench --help)")

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
