"""The first token of a P/D completion, sent to the client from the prefill's reply.

The prefill replica samples a first token anyway (`max_tokens=1`). vLLM's P/D
convention throws it away: the decode replica recomputes the prompt's last position and
samples the first token again, so the client's first token waits for the decode hop,
the KV pull and a decode step. Here, for a completion whose remaining tokens do not
depend on where the first one was sampled, the ingress streams the prefill's token at
once and asks the decode replica to continue from prompt + that token: its connector
pulls the prompt's blocks (the connector loads no more than the peer computed), it
computes the one new position and samples the second token.

Which completions qualify (`may_answer_head`): one prompt (token ids, or text, which
the prefill replica tokenizes and returns as ids), one sequence, and sampling that sees
only the prompt-plus-output token sequence: no seed with temperature > 0 (a seeded
decode would draw the second token from a fresh generator), no presence or frequency
penalty (they count output tokens only), no stop strings (one could span the first two
tokens), no logprobs, no structured output, and at least two tokens to make. Anything
not listed keeps vLLM's convention.

Which first tokens are sent (`head_from_prefill`): one the prefill stopped on for length
(a stop token or EOS ends the request: vLLM's convention answers it), whose text is
whole (no held-back or partial UTF-8 piece the decode's detokenizer would not see).

What the client gets is what one engine would return: the decode replica's chunks and
body are relayed with the first token in front, its prompt (one token longer than the
client's) and usage counts moved back by one token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Fields that change nothing about how tokens after the first are chosen or reported.
FREE_FIELDS = frozenset((
    "model", "prompt", "temperature", "top_p", "top_k", "min_p", "stream",
    "stream_options", "ignore_eos", "return_token_ids", "user", "repetition_penalty",
    "stop_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
    "add_special_tokens", "request_id", "cache_salt", "priority", "min_tokens",
    "max_tokens", "seed",
))
# Fields that qualify only at their "off" value.
OFF_VALUES = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False),
              "logprobs": (None,), "prompt_logprobs": (None,), "stop": (None, "", []),
              "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
              "suffix": (None,), "truncate_prompt_tokens": (None,)}


@dataclass(frozen=True, slots=True)
class Head:
    """The first token, as the prefill replica sampled and detokenized it."""

    token_id: int
    text: str
    response_id: str
    created: int
    model: str
    prompt_token_ids: list[int]  # the client's prompt
    return_token_ids: bool


def may_answer_head(endpoint: str, body: dict) -> bool:
    """A completion whose first token may come from the prefill replica; see the module
    docstring."""
    if endpoint != "completions" or not _is_one_prompt(body.get("prompt")):
        return False
    for key, value in body.items():
        if key in OFF_VALUES:
            if value not in OFF_VALUES[key]:
                return False
        elif key not in FREE_FIELDS:
            return False
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and max_tokens < 2:
        return False
    seeded = body.get("seed") is not None and body.get("temperature", 1.0) != 0
    return not seeded


def prefill_fields(body: dict) -> dict:
    """What the prefill request needs on top of vLLM's convention."""
    fields = {"return_token_ids": True}
    if body.get("min_tokens"):
        fields["min_tokens"] = 1  # no stop token or EOS as the first token either
    return fields


def head_from_prefill(body: dict, reply: dict) -> Head | None:
    """The first token to send, or None when the decode replica should sample it.
    `body["prompt"]` is token ids by now: the prefill's, if the client sent text."""
    try:
        (choice,) = reply["choices"]
        (token_id,) = choice["token_ids"]
        text = choice["text"]
    except (KeyError, TypeError, ValueError):
        return None
    if (choice.get("finish_reason") != "length" or not text or "\ufffd" in text
            or not is_token_ids(body.get("prompt"))):
        return None
    return Head(token_id=int(token_id), text=text, response_id=reply["id"],
                created=int(reply["created"]), model=reply["model"],
                prompt_token_ids=list(body["prompt"]),
                return_token_ids=bool(body.get("return_token_ids")))


def decode_body(body: dict, head: Head, kv_transfer_params: dict) -> dict:
    """The decode request: continue after the first token, from the peer's KV."""
    decode = {**body, "prompt": [*head.prompt_token_ids, head.token_id],
              "kv_transfer_params": kv_transfer_params}
    if body.get("max_tokens") is not None:
        decode["max_tokens"] = body["max_tokens"] - 1
    if body.get("min_tokens"):
        decode["min_tokens"] = body["min_tokens"] - 1
    return decode


def head_event(head: Head) -> str:
    """The first SSE event, as vLLM's completion stream writes it."""
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponseStreamChoice, CompletionStreamResponse,
    )

    choice = CompletionResponseStreamChoice(
        index=0, text=head.text, logprobs=None, finish_reason=None, stop_reason=None,
        prompt_token_ids=head.prompt_token_ids if head.return_token_ids else None,
        token_ids=[head.token_id] if head.return_token_ids else None)
    chunk = CompletionStreamResponse(id=head.response_id, object="text_completion",
                                     created=head.created, model=head.model,
                                     choices=[choice])
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


def relay_event(event: str, payload: dict | None) -> str:
    """A decode replica's SSE event with the first token accounted for."""
    if payload is None:
        return event
    changed = _shift_usage(payload.get("usage"))
    for choice in payload.get("choices") or ():
        if choice.pop("prompt_token_ids", None) is not None:  # ours went first
            changed = True
    if not changed:
        return event
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def merge_response(reply: dict, head: Head) -> dict:
    """A decode replica's whole completion body with the first token in front."""
    if "error" in reply:
        return reply
    for choice in reply.get("choices") or ():
        choice["text"] = head.text + (choice.get("text") or "")
        if choice.get("token_ids") is not None:
            choice["token_ids"] = [head.token_id, *choice["token_ids"]]
        if choice.get("prompt_token_ids") is not None:
            choice["prompt_token_ids"] = head.prompt_token_ids
    _shift_usage(reply.get("usage"))
    return reply


def _shift_usage(usage: dict | None) -> bool:
    """Counts of the decode request (prompt one token longer) as the client's."""
    if not usage or "prompt_tokens" not in usage:
        return False
    usage["prompt_tokens"] -= 1
    usage["completion_tokens"] = (usage.get("completion_tokens") or 0) + 1
    return True


def _is_one_prompt(prompt) -> bool:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    return isinstance(prompt, str) or is_token_ids(prompt)


def is_token_ids(prompt) -> bool:
    """A prompt given as token ids (a non-empty list of ints), not text."""
    return (isinstance(prompt, list) and bool(prompt)
            and all(isinstance(t, int) for t in prompt[:1]))
