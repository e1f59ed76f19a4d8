"""KV tiers in a real vLLM CPU engine (tiny model, greedy): a repeated 1,500-token
prefix loads from DRAM, blocks evicted from DRAM load from NVMe, the NVMe tier hits
after an engine restart, and a corrupt block file is recomputed. Every output is
compared with an engine without tiers (vLLM's prefix cache is off in both, so only
the tiers can supply a prefix)."""

from __future__ import annotations

import pytest

from serving.model import resolve_model
from tests.kvtransfer_helpers.engines import EngineProcess, engine_kwargs, wait_until
from tests.test_kvtransfer_e2e import make_prompt

pytestmark = pytest.mark.e2e

BLOCK = 32
BLOCK_BYTES = 4 * 2 * BLOCK * 2 * 64 * 4  # tiny model: layers x kv heads x block x 2*head x fp32
PREFIX = 1500
MAX_TOKENS = 8


class Tiered:
    """The engine under test; `restart` replaces it by a fresh one on the same disk."""

    def __init__(self, model: str, nvme_dir: str):
        tiers = {"dram_bytes": 64 * BLOCK_BYTES, "nvme_dir": nvme_dir}
        self.kwargs = engine_kwargs(model, "kv_both", {"tiers": tiers})
        self.nvme_dir = nvme_dir
        self.engine = EngineProcess(self.kwargs).wait_ready()

    def restart(self) -> None:
        self.engine.stop()
        self.engine = EngineProcess(self.kwargs).wait_ready()

    def counters(self) -> dict:
        return self.engine.stats().connector

    def run(self, prompt: list[int]) -> tuple[list[int], dict]:
        """Generate, wait until its blocks are stored; the counters' change."""
        before = self.counters()
        (out,) = self.engine.generate([prompt], MAX_TOKENS)
        stored = ("dram_bytes_stored", "nvme_bytes_stored")
        total = lambda c: sum(c.get(k, 0) for k in stored)  # noqa: E731
        wait_until(lambda: total(self.counters()) > total(before), timeout=20, interval=0.2)
        after = self.counters()
        delta = {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}
        return out.token_ids, delta


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model = resolve_model("pdserve:tiny")
    reference = EngineProcess(engine_kwargs(model))
    tiered = None
    try:
        tiered = Tiered(model, str(tmp_path_factory.mktemp("nvme")))
        reference.wait_ready()
        yield reference, tiered
    finally:
        reference.stop()
        if tiered is not None:
            tiered.engine.stop()


def expected(reference: EngineProcess, prompt: list[int]) -> list[int]:
    return reference.generate([prompt], MAX_TOKENS)[0].token_ids


def with_suffix(prefix: list[int], seed: int) -> list[int]:
    return prefix + make_prompt(40, seed)


def test_repeated_prefix_loads_from_dram(engines):
    reference, tiered = engines
    prefix = make_prompt(PREFIX, seed=1)
    tiered.run(with_suffix(prefix, 100))
    prompt = with_suffix(prefix, 101)
    tokens, delta = tiered.run(prompt)
    assert tokens == expected(reference, prompt)
    assert delta["dram_hits"] >= PREFIX // BLOCK
    assert delta["external_hits"] >= (PREFIX // BLOCK) * BLOCK


def test_blocks_evicted_from_dram_load_from_nvme(engines):
    reference, tiered = engines
    prefix = make_prompt(PREFIX, seed=2)
    tiered.run(with_suffix(prefix, 200))
    evicted = 0
    for seed in (3, 4):  # two more prefixes overflow the 64-block DRAM budget
        evicted += tiered.run(with_suffix(make_prompt(PREFIX, seed), 300 + seed))[1][
            "dram_evictions"]
    assert evicted >= PREFIX // BLOCK
    prompt = with_suffix(prefix, 201)
    tokens, delta = tiered.run(prompt)
    assert tokens == expected(reference, prompt)
    assert delta["nvme_hits"] >= PREFIX // BLOCK // 2
    assert delta["dram_hits"] + delta["nvme_hits"] >= PREFIX // BLOCK


def test_nvme_tier_hits_after_restart(engines):
    reference, tiered = engines
    tiered.restart()
    prompt = with_suffix(make_prompt(PREFIX, seed=2), 202)
    tokens, delta = tiered.run(prompt)
    assert tokens == expected(reference, prompt)
    assert delta["nvme_hits"] >= PREFIX // BLOCK // 2
    assert delta.get("tier_load_failures", 0) == 0


def test_corrupt_block_file_is_recomputed(engines):
    reference, tiered = engines
    from pathlib import Path

    files = sorted(Path(tiered.nvme_dir).rglob("*.kv"))
    assert files
    for path in files:  # flip one payload byte in every block file
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(raw)
    prompt = with_suffix(make_prompt(PREFIX, seed=2), 203)
    tokens, delta = tiered.run(prompt)
    assert tokens == expected(reference, prompt)
    assert delta["tier_load_failures"] > 0
