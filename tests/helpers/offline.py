"""Reference outputs from vLLM's offline API (`LLM.generate` / `LLM.chat`).

Run as a script in its own process (vLLM spawns workers and needs a __main__ guard):
    python -m tests.helpers.offline REQUESTS.json OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def reference_outputs(model: str, engine_kwargs: dict, requests: list[dict],
                      tmp_path: Path) -> list[dict]:
    """Greedy outputs for `requests` ({"prompt": str} or {"messages": [...]}, max_tokens)."""
    spec = tmp_path / "offline-in.json"
    out = tmp_path / "offline-out.json"
    spec.write_text(json.dumps({"model": model, "engine_kwargs": engine_kwargs,
                                "requests": requests}))
    subprocess.run([sys.executable, "-m", "tests.helpers.offline", str(spec), str(out)],
                   cwd=REPO, check=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    return json.loads(out.read_text())


def _main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    started = time.monotonic()
    llm = LLM(model=spec["model"], **spec["engine_kwargs"])
    start_s = time.monotonic() - started
    results = []
    for req in spec["requests"]:
        params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"],
                                ignore_eos=req.get("ignore_eos", False))
        t0 = time.perf_counter()
        if "messages" in req:
            (output,) = llm.chat(req["messages"], params, use_tqdm=False)
        else:
            (output,) = llm.generate([req["prompt"]], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        completion = output.outputs[0]
        results.append({"text": completion.text, "token_ids": list(completion.token_ids),
                        "prompt_token_ids": list(output.prompt_token_ids),
                        "elapsed_s": elapsed, "engine_start_s": start_s})
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
