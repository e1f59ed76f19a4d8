"""Prefix-aware routing as a client sees it: `pdserve serve configs/cpu-pd-prefix.yaml`
(one prefill, two decode engines, DRAM tiers). A long prompt goes to a decode replica,
whose tier keeps its blocks and tells the router; the same prefix with another ending
is then prefilled on that replica ("local_cached"), a second long prompt goes to the
other replica, and every output equals one aggregated engine's. The matched-prefix
metric equals the whole blocks the two prompts share: the ingress's block hashes are
the ones the engines computed, for a completion and a chat prompt."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from serving.config import app_config_from_file
from serving.model import resolve_model
from tests.helpers.offline import reference_outputs
from tests.helpers.servers import REPO, ServerProcess, metric, metric_lines, wait_for
from tests.test_serving_e2e import long_prompt

pytestmark = pytest.mark.e2e

CONFIG = "configs/cpu-pd-prefix.yaml"
BLOCK = 32
DOC = long_prompt(130)  # ~600 tokens
SYSTEM = "You answer questions about this text. " + long_prompt(120)
FIRST = [{"prompt": DOC + " Summary one", "max_tokens": 8},
         {"messages": [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": "What is first?"}], "max_tokens": 8}]
AGAIN = [{"prompt": DOC + " Another ending", "max_tokens": 8},
         {"messages": [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": "And what is last?"}], "max_tokens": 8}]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The server, and the reference outputs computed while its engines start."""
    config, _ = app_config_from_file(REPO / CONFIG)
    server = ServerProcess(CONFIG)
    try:
        reference = reference_outputs(resolve_model(config.model),
                                      config.decode.engine_kwargs, FIRST + AGAIN,
                                      tmp_path_factory.mktemp("prefix-offline"))
        server.wait_ready()
        wait_for(lambda: len(_per_replica(server, "pdserve_replica_tier_blocks")) == 3, 30)
        yield server, reference
    finally:
        server.stop()


def send(server, req) -> dict:
    body = {"model": "pdserve:tiny", "max_tokens": req["max_tokens"], "temperature": 0.0}
    if "messages" in req:
        url, body["messages"] = "/v1/chat/completions", req["messages"]
    else:
        url, body["prompt"] = "/v1/completions", req["prompt"]
    response = httpx.post(server.base_url + url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "route;dur=" in response.headers["server-timing"]
    choice = response.json()["choices"][0]
    return choice.get("text") if "text" in choice else choice["message"]["content"]


def test_prefix_goes_to_the_replica_holding_it(started):
    server, reference = started
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("pdserve:tiny"))
    holders = []
    for req, expected in zip(FIRST, reference):
        before = _per_replica(server, "pdserve_replica_tier_blocks", pool="decode")
        assert send(server, req) == expected["text"]
        # its decode replica stores the blocks and reports them; the next long prompt
        # goes to the replica holding fewer blocks
        wait_for(lambda: _grown(server, before), 30)
        holders.append(_grown(server, before))
    assert holders[0] != holders[1]
    for req, first, expected, holder in zip(AGAIN, FIRST, reference[2:], holders):
        hits_before = _hits(server, holder)
        matched_before = metric(server, "pdserve_router_matched_prefix_tokens_sum",
                                decision="local")
        cached_before = metric(server, "pdserve_router_decisions_total",
                               reason="local_cached")
        assert send(server, req) == expected["text"]
        shared = _common_prefix(_token_ids(tokenizer, first), _token_ids(tokenizer, req))
        assert shared >= 500
        matched = metric(server, "pdserve_router_matched_prefix_tokens_sum",
                         decision="local") - matched_before
        assert matched == shared // BLOCK * BLOCK
        assert metric(server, "pdserve_router_decisions_total",
                      reason="local_cached") == cached_before + 1
        wait_for(lambda: _hits(server, holder) - hits_before >= matched, 30)
    assert metric(server, "pdserve_router_decision_seconds_count", scope="assign") >= 4


def _token_ids(tokenizer, req) -> list[int]:
    if "messages" in req:
        text = tokenizer.apply_chat_template(req["messages"], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(req["prompt"])["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _grown(server, before: dict[str, float]) -> str | None:
    now = _per_replica(server, "pdserve_replica_tier_blocks", pool="decode")
    grown = [r for r, n in now.items() if n > before.get(r, 0)]
    return grown[0] if len(grown) == 1 else None


def _hits(server, replica: str) -> float:
    return sum(_per_replica(server, f"pdserve_replica_{name}_total").get(replica, 0)
               for name in ("local_hit_tokens", "external_hit_tokens"))


def _per_replica(server, name: str, **labels) -> dict[str, float]:
    return {line.split('replica="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metric_lines(server, name, **labels)}
