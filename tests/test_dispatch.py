"""serving.dispatch: what the ingress tokenizes for the routing policy; the decode call
made only once the first token is out."""

from __future__ import annotations

import asyncio

import pytest

from serving.config import AppConfig
from serving.dispatch import DeferredReply, Dispatcher

POOL = {"num_replicas": 1}


def dispatcher(policy: str, threshold: int = 64) -> Dispatcher:
    config = AppConfig.model_validate({
        "prefill": POOL, "decode": POOL,
        "router": {"policy": policy, "local_prefill_max_tokens": threshold}})
    return Dispatcher(config, router=None, engines={})


@pytest.fixture(scope="module")
def conditional() -> Dispatcher:
    return dispatcher("conditional")


def test_a_prompt_that_may_be_short_is_tokenized_exactly(conditional):
    body = {"prompt": "Hello, my name is"}
    ids = conditional._prompt_token_ids("completions", body)
    assert ids == conditional.tokenizer("Hello, my name is")["input_ids"]


def test_a_surely_long_prompt_is_left_to_the_prefill_replica(conditional):
    """Its exact length cannot change the conditional policy's decision, so the prefill
    replica tokenizes it (inside its engine time) and returns the ids."""
    text = "Hello, my name is " * 200
    assert conditional._prompt_token_ids("completions", {"prompt": text}) is None
    num_ids = len(conditional.tokenizer(text)["input_ids"])
    lower = conditional._fewest_tokens(text)
    assert 64 < lower <= num_ids  # a true lower bound, above the threshold
    chat = {"messages": [{"role": "user", "content": text}]}
    assert conditional._prompt_token_ids("chat", chat) is None


def test_the_skip_bound_holds_for_every_vocabulary_entry(conditional):
    """No single token covers more bytes than the bound assumes."""
    tok = conditional.tokenizer
    for token_id in range(tok.vocab_size):
        text = tok.decode([token_id])
        assert len(text.encode()) <= conditional.max_token_bytes, (token_id, text)


def test_prefix_aware_always_tokenizes():
    prefix_aware = dispatcher("prefix_aware")
    text = "Hello, my name is " * 200
    assert prefix_aware._prompt_token_ids("completions", {"prompt": text}) == \
        prefix_aware.tokenizer(text)["input_ids"]


def test_token_id_prompts_pass_as_they_are(conditional):
    assert conditional._prompt_token_ids("completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]


class Stream:
    """A reply stream as Serve's and the direct client's: async iteration, cancel()."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled or not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


def deferred(items):
    calls = []

    async def start():
        calls.append(Stream(items))
        return calls[-1]

    return DeferredReply(start), calls


def test_the_decode_call_is_made_at_the_first_read():
    async def run():
        reply, calls = deferred(["a", "b"])
        await asyncio.sleep(0)
        assert calls == []  # the first token goes out before the decode replica wakes
        got = [item async for item in reply]
        assert got == ["a", "b"] and len(calls) == 1
        reply.cancel()
        assert calls[0].cancelled

    asyncio.run(run())


def test_a_reply_cancelled_before_its_first_read_makes_no_call():
    async def run():
        reply, calls = deferred(["a"])
        reply.cancel()  # the client went away with the first token
        assert [item async for item in reply] == []
        assert calls == []

    asyncio.run(run())
