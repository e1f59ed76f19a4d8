"""serving.head: which completions the prefill's first token may answer, and how the
decode replica's reply is shifted by it. The end-to-end check (output equal to one
engine's, streamed and not) is in test_pd_e2e.py."""

from __future__ import annotations

import json

import pytest

from serving.head import (Head, decode_body, head_event, head_from_prefill, may_answer_head,
                          merge_response, relay_event)

PROMPT = [1, 5, 9, 14]
BODY = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}


def prefill_reply(text="lo", token_ids=(42,), finish_reason="length"):
    return {"id": "cmpl-r1", "object": "text_completion", "created": 1700, "model": "m",
            "choices": [{"index": 0, "text": text, "token_ids": list(token_ids),
                         "finish_reason": finish_reason}],
            "kv_transfer_params": {"do_remote_prefill": True}}


@pytest.mark.parametrize("extra", [
    {}, {"stream": True, "stream_options": {"include_usage": True}},
    {"temperature": 0.8}, {"temperature": 0.0, "seed": 3}, {"return_token_ids": True},
    {"n": 1, "echo": False, "logprobs": None, "stop": [], "presence_penalty": 0},
    {"min_tokens": 4, "ignore_eos": True, "stop_token_ids": [2], "top_k": 5},
])
def test_completions_whose_later_tokens_do_not_depend_on_the_first_sample_qualify(extra):
    assert may_answer_head("completions", {**BODY, **extra})


@pytest.mark.parametrize("extra", [
    {"temperature": 0.7, "seed": 3},  # a seeded decode would restart the generator
    {"presence_penalty": 0.5}, {"frequency_penalty": 0.1},  # count output tokens only
    {"stop": ["\n"]},  # may span the first two tokens
    {"logprobs": 2}, {"n": 2}, {"echo": True}, {"max_tokens": 1},
    {"response_format": {"type": "json_object"}}, {"structured_outputs": {"regex": "a"}},
    {"some_new_vllm_field": 1},  # unknown: vLLM's convention
])
def test_anything_else_keeps_the_decode_replica_sampling_the_first_token(extra):
    assert not may_answer_head("completions", {**BODY, **extra})


def test_only_single_prompt_completions_qualify():
    assert may_answer_head("completions", {**BODY, "prompt": "text"})
    assert may_answer_head("completions", {**BODY, "prompt": ["text"]})
    assert not may_answer_head("completions", {**BODY, "prompt": ["a", "b"]})
    assert not may_answer_head("completions", {**BODY, "prompt": [[1, 2], [3]]})
    assert not may_answer_head("chat", {**BODY, "messages": [], "prompt": PROMPT})


def test_a_text_prompt_continues_from_the_prefills_token_ids():
    """The prefill replica tokenized the text and returned the ids (return_token_ids);
    the decode request carries them, so the head needs them in the body."""
    from serving.dispatch import _with_prompt_ids

    text_body = {**BODY, "prompt": "text"}
    reply = prefill_reply()
    assert head_from_prefill(text_body, reply) is None  # no ids: the decode samples
    reply["choices"][0]["prompt_token_ids"] = PROMPT
    body = _with_prompt_ids("completions", text_body, reply)
    assert body["prompt"] == PROMPT and text_body["prompt"] == "text"
    assert decode_body(body, head_from_prefill(body, reply), {})["prompt"] == [*PROMPT, 42]
    assert _with_prompt_ids("chat", text_body, reply) is text_body
    del reply["choices"][0]["prompt_token_ids"]
    assert _with_prompt_ids("completions", text_body, reply) is text_body


@pytest.mark.parametrize("reply", [
    prefill_reply(finish_reason="stop"),  # EOS or a stop token ended the request
    prefill_reply(text=""),  # held back by the detokenizer, or a skipped special token
    prefill_reply(text="a\ufffd"),  # a partial UTF-8 piece
    prefill_reply(token_ids=()), {"error": {"code": 400}},
])
def test_a_first_token_that_ends_the_request_or_is_not_whole_text_is_not_sent(reply):
    assert head_from_prefill(BODY, reply) is None


def test_the_decode_request_continues_after_the_first_token():
    head = head_from_prefill(BODY, prefill_reply())
    body = decode_body({**BODY, "min_tokens": 3}, head, {"remote_block_ids": [0]})
    assert body["prompt"] == [*PROMPT, 42]
    assert (body["max_tokens"], body["min_tokens"]) == (7, 2)
    assert body["kv_transfer_params"] == {"remote_block_ids": [0]}
    assert BODY["prompt"] == PROMPT and BODY["max_tokens"] == 8  # the client's untouched
    assert decode_body({**BODY, "max_tokens": None}, head, {})["max_tokens"] is None


def test_head_event_is_vllms_first_stream_chunk():
    head = Head(42, "lo", "cmpl-r1", 1700, "m", PROMPT, return_token_ids=True)
    assert head_event(head).startswith("data: ") and head_event(head).endswith("\n\n")
    chunk = json.loads(head_event(head)[6:])
    assert chunk["id"] == "cmpl-r1" and chunk["object"] == "text_completion"
    (choice,) = chunk["choices"]
    assert (choice["text"], choice["token_ids"], choice["prompt_token_ids"]) == (
        "lo", [42], PROMPT)
    assert choice["finish_reason"] is None
    plain = json.loads(head_event(Head(42, "lo", "cmpl-r1", 1700, "m", PROMPT, False))[6:])
    assert plain["choices"][0]["token_ids"] is None


def test_decode_events_drop_their_prompt_and_count_usage_as_the_client_sent_it():
    event = 'data: {"choices":[{"text":"x","token_ids":[7],"prompt_token_ids":[1,5,9,14,42]}]}\n\n'
    shifted = json.loads(relay_event(event, json.loads(event[6:]))[6:])
    assert "prompt_token_ids" not in shifted["choices"][0]
    usage = 'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}\n\n'
    assert json.loads(relay_event(usage, json.loads(usage[6:]))[6:])["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
    plain = 'data: {"choices":[{"text":"x","prompt_token_ids":null}]}\n\n'
    assert relay_event(plain, json.loads(plain[6:])) is plain
    assert relay_event("data: [DONE]\n\n", None) == "data: [DONE]\n\n"


def test_whole_reply_gets_the_first_token_in_front():
    head = Head(42, "lo", "cmpl-r1", 1700, "m", PROMPT, return_token_ids=True)
    reply = {"choices": [{"text": " there", "token_ids": [7, 8],
                          "prompt_token_ids": [*PROMPT, 42], "finish_reason": "length"}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    merged = merge_response(reply, head)
    choice = merged["choices"][0]
    assert (choice["text"], choice["token_ids"], choice["prompt_token_ids"]) == (
        "lo there", [42, 7, 8], PROMPT)
    assert merged["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    error = {"error": {"code": 400, "message": "no"}}
    assert merge_response(error, head) == error
