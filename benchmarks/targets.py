"""From flags to an `EndpointSpec`: base URL, request format, model and tokenizer."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from benchmarks.cli import parse_extra_body, parse_headers
from benchmarks.client import EndpointSpec
from benchmarks.errors import BenchConfigError
from benchmarks.suite import list_models
from benchmarks.tokens import load_tokenizer


@dataclass(slots=True)
class Target:
    """One server to measure, once its model is known."""

    endpoint: EndpointSpec
    base_url: str
    backend: str
    model_root: str | None = None  # where the server says it loaded the model from


def check_base_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BenchConfigError(f"--base-url: want http(s)://HOST:PORT, got {url!r}")
    return url.rstrip("/")


def backend_of(args: argparse.Namespace) -> str:
    if args.backend:
        return "openai-chat" if args.backend == "openai-chat" else "openai"
    return "openai-chat" if args.endpoint.rstrip("/").endswith("chat/completions") else "openai"


def make_target(args: argparse.Namespace, base_url: str | None = None,
                model: str | None = None) -> Target:
    """Resolve the model (asking /v1/models when not given) and the request format."""
    url = check_base_url(base_url or args.base_url or f"http://{args.host}:{args.port}")
    headers = parse_headers(args.header)
    if os.environ.get("OPENAI_API_KEY") and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"  # as vLLM's client
    model = model or args.model or args.served_model_name
    root = None
    listed = list_models(url, headers)
    if listed:
        entry = next((m for m in listed if m["id"] == model), listed[0] if not model else None)
        if entry:
            model, root = entry["id"], entry.get("root")
    if not model:
        raise BenchConfigError(f"cannot list models at {url}/v1/models; pass --model")
    extra = parse_extra_body(args.extra_body)
    if args.temperature is not None:
        extra.setdefault("temperature", args.temperature)
    backend = backend_of(args)
    endpoint = EndpointSpec(api_url=url + "/" + args.endpoint.lstrip("/"), model=model,
                            chat=backend == "openai-chat", ignore_eos=args.ignore_eos,
                            extra_body=extra, headers=headers)
    return Target(endpoint=endpoint, base_url=url, backend=backend, model_root=root)


def choose_tokenizer(args: argparse.Namespace, target: Target) -> tuple[Any, str]:
    """--tokenizer, else a local model directory (the model name, a built-in name, or the
    'root' the server reports), else the model name as a hub id."""
    if args.tokenizer:
        names = [args.tokenizer]
    else:
        model, root = target.endpoint.model, target.model_root
        local = [n for n in (model, root) if n and (Path(n).is_dir() or n.startswith("pdserve:"))]
        names = local + [model]
    last_error: BenchConfigError | None = None
    for name in [n for n in names if n]:
        try:
            return load_tokenizer(name), name
        except BenchConfigError as err:
            last_error = err
    raise last_error or BenchConfigError("no tokenizer: pass --tokenizer")
