"""The aggregated server as a client sees it: real Ray Serve, real vLLM (CPU), tiny model.

Greedy output through HTTP must equal vLLM's offline API token for token.
"""

from __future__ import annotations

import json

import httpx
import pytest

from serving.model import resolve_model
from tests.conftest import API_KEY
from tests.helpers.offline import reference_outputs
from tests.helpers.servers import metric, wait_for

pytestmark = pytest.mark.e2e

WORDS = ("alpha river stone cloud seven orange window quiet market bright "
         "garden silver planet number yellow winter").split()


def long_prompt(num_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] + str(i % 7) for i in range(num_words))


REQUESTS = [
    {"prompt": "Hello, my name is", "max_tokens": 24},
    {"prompt": "The capital of France is", "max_tokens": 24},
    {"prompt": long_prompt(250), "max_tokens": 24},
    {"messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
     "max_tokens": 24},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is two plus two?"}], "max_tokens": 16},
]


@pytest.fixture(scope="module")
def reference(aggregated_config, tmp_path_factory):
    return reference_outputs(resolve_model(aggregated_config.model),
                             aggregated_config.aggregated.engine_kwargs, REQUESTS,
                             tmp_path_factory.mktemp("offline"))


def _ask(client, req: dict, **extra):
    common = dict(model="pdserve:tiny", max_tokens=req["max_tokens"], temperature=0.0,
                  extra_body={"return_token_ids": True}, **extra)
    if "messages" in req:
        response = client.chat.completions.create(messages=req["messages"], **common)
        choice = response.choices[0]
        return choice.message.content, choice.token_ids, response
    response = client.completions.create(prompt=req["prompt"], **common)
    choice = response.choices[0]
    return choice.text, choice.token_ids, response


def test_greedy_output_equals_offline_vllm(client, reference):
    for req, expected in zip(REQUESTS, reference):
        text, token_ids, response = _ask(client, req)
        assert token_ids == expected["token_ids"], req
        assert text == expected["text"]
        assert response.usage.completion_tokens == len(expected["token_ids"])
        assert response.usage.prompt_tokens == len(expected["prompt_token_ids"])


def test_streaming_equals_non_streaming(client, reference):
    for req, expected in zip(REQUESTS, reference):
        common = dict(model="pdserve:tiny", max_tokens=req["max_tokens"], temperature=0.0,
                      stream=True, stream_options={"include_usage": True},
                      extra_body={"return_token_ids": True})
        if "messages" in req:
            chunks = list(client.chat.completions.create(messages=req["messages"], **common))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            chunks = list(client.completions.create(prompt=req["prompt"], **common))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected["text"]
        assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])
        per_event = [c.choices[0].token_ids for c in chunks
                     if c.choices and getattr(c.choices[0], "token_ids", None)]
        assert sum(per_event, []) == expected["token_ids"]
        assert all(len(ids) == 1 for ids in per_event)  # one SSE event per token


def test_stream_without_usage_request_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model="pdserve:tiny", prompt="Hi", max_tokens=5,
                                            stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_sampling_parameters(client):
    pair = client.completions.create(model="pdserve:tiny", prompt="Once upon", n=2,
                                     max_tokens=8, temperature=1.0, seed=7)
    assert sorted(c.index for c in pair.choices) == [0, 1]
    again = client.completions.create(model="pdserve:tiny", prompt="Once upon", n=2,
                                      max_tokens=8, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in pair.choices]

    with_logprobs = client.completions.create(model="pdserve:tiny", prompt="Once upon",
                                              max_tokens=4, temperature=0.0, logprobs=3)
    assert len(with_logprobs.choices[0].logprobs.tokens) == 4
    assert all(len(top) >= 3 for top in with_logprobs.choices[0].logprobs.top_logprobs)

    greedy = client.completions.create(model="pdserve:tiny", prompt="Once upon",
                                       max_tokens=12, temperature=0.0)
    text = greedy.choices[0].text
    stop = text[4:8]
    stopped = client.completions.create(model="pdserve:tiny", prompt="Once upon",
                                        max_tokens=12, temperature=0.0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(stop)]

    chat = client.chat.completions.create(
        model="pdserve:tiny", messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=6, temperature=0.8, top_p=0.9, logprobs=True, top_logprobs=2)
    assert chat.usage.completion_tokens <= 6
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_models_health_metrics(client, aggregated_server):
    assert [m.id for m in client.models.list().data] == ["pdserve:tiny"]
    assert httpx.get(aggregated_server.base_url + "/health").json() == {"status": "ok"}
    client.completions.create(model="pdserve:tiny", prompt="metrics", max_tokens=3,
                              stream=True).close()
    text = httpx.get(aggregated_server.base_url + "/metrics").text
    for family in ("pdserve_requests_total", "pdserve_time_to_first_token_seconds_bucket",
                   "pdserve_inter_token_latency_seconds_bucket",
                   "pdserve_e2e_request_latency_seconds_bucket", "pdserve_prompt_tokens_total",
                   "pdserve_generation_tokens_total", "pdserve_replica_running_requests",
                   "pdserve_replica_waiting_requests"):
        assert family in text, family
    assert 'pool="aggregated"' in text


AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": "pdserve:tiny", "prompt": "Count on and on:", "max_tokens": 2000,
        "ignore_eos": True}  # 2000 tokens take 8 s or more


def _left(server) -> float:
    """Requests the client left before the end of their reply."""
    return metric(server, "pdserve_requests_total", endpoint="completions", status="499")


def _wait_until_left_and_dropped(server, left_before: float) -> None:
    wait_for(lambda: _left(server) == left_before + 1, 10,
             "the ingress counting the request left")
    wait_for(lambda: metric(server, "pdserve_replica_running_requests",
                            pool="aggregated") == 0, 10, "the engine dropping the request")


def test_client_leaving_mid_stream_is_counted_and_stops_the_engine(aggregated_server):
    """A client that closes its connection mid-stream: the request counts as status 499
    and the engine drops it (its running count falls to 0 long before 2000 tokens)."""
    body = {**LONG, "stream": True}
    left_before = _left(aggregated_server)
    with httpx.stream("POST", aggregated_server.base_url + "/v1/completions", json=body,
                      headers=AUTH, timeout=60) as reply:
        assert reply.status_code == 200
        events = 0
        for line in reply.iter_lines():
            events += line.startswith("data: {")
            if events == 3:
                break  # leaving the block closes the connection
    _wait_until_left_and_dropped(aggregated_server, left_before)
    with httpx.stream("POST", aggregated_server.base_url + "/v1/completions",
                      json={**body, "max_tokens": 3}, headers=AUTH, timeout=60) as reply:
        assert reply.read().decode().endswith("data: [DONE]\n\n")
    assert _left(aggregated_server) == left_before + 1  # read to its end: not left


def test_client_leaving_before_the_reply_is_counted_and_stops_the_engine(aggregated_server):
    """Not streamed: the client gives up waiting for the whole reply."""
    left_before = _left(aggregated_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(aggregated_server.base_url + "/v1/completions", json=LONG, headers=AUTH,
                   timeout=1.5)
    _wait_until_left_and_dropped(aggregated_server, left_before)


GOOD_COMPLETION = {"model": "pdserve:tiny", "prompt": "Hello", "max_tokens": 4}
GOOD_CHAT = {"model": "pdserve:tiny", "messages": [{"role": "user", "content": "Hi"}],
             "max_tokens": 4}


def _with(base: dict, **changes) -> bytes:
    body = {**base, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


BAD_REQUESTS = [
    # (name, method, path, body bytes, expected status, expected param or None)
    ("malformed json", "POST", "/v1/completions", b'{"model": ', 400, None),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", 400, None),
    ("empty body", "POST", "/v1/chat/completions", b"", 400, None),
    ("missing prompt", "POST", "/v1/completions", _with(GOOD_COMPLETION, prompt=...), 400, None),
    ("prompt wrong type", "POST", "/v1/completions", _with(GOOD_COMPLETION, prompt={"a": 1}),
     400, None),
    ("missing messages", "POST", "/v1/chat/completions", _with(GOOD_CHAT, messages=...), 400,
     None),
    ("messages not a list", "POST", "/v1/chat/completions", _with(GOOD_CHAT, messages="hi"),
     400, None),
    ("message without role", "POST", "/v1/chat/completions",
     _with(GOOD_CHAT, messages=[{"content": "hi"}]), 400, None),
    ("max_tokens zero", "POST", "/v1/completions", _with(GOOD_COMPLETION, max_tokens=0), 400,
     "max_tokens"),
    ("max_tokens negative", "POST", "/v1/completions", _with(GOOD_COMPLETION, max_tokens=-5),
     400, "max_tokens"),
    ("max_tokens string", "POST", "/v1/completions", _with(GOOD_COMPLETION, max_tokens="ten"),
     400, None),
    ("max_completion_tokens zero", "POST", "/v1/chat/completions",
     _with(GOOD_CHAT, max_tokens=..., max_completion_tokens=0), 400, "max_completion_tokens"),
    ("temperature string", "POST", "/v1/completions",
     _with(GOOD_COMPLETION, temperature="hot"), 400, None),
    ("temperature negative", "POST", "/v1/completions", _with(GOOD_COMPLETION, temperature=-1),
     400, None),
    ("top_p above one", "POST", "/v1/completions", _with(GOOD_COMPLETION, top_p=2.0), 400,
     None),
    ("n zero", "POST", "/v1/completions", _with(GOOD_COMPLETION, n=0), 400, None),
    ("stream not a bool", "POST", "/v1/completions", _with(GOOD_COMPLETION, stream="yes"),
     400, None),
    ("stop wrong type", "POST", "/v1/completions", _with(GOOD_COMPLETION, stop=42), 400, None),
    ("logprobs too many", "POST", "/v1/completions", _with(GOOD_COMPLETION, logprobs=1000),
     400, None),
    ("unknown model", "POST", "/v1/completions", _with(GOOD_COMPLETION, model="gpt-99"), 404,
     "model"),
    ("unknown model chat", "POST", "/v1/chat/completions", _with(GOOD_CHAT, model="nope"), 404,
     "model"),
    ("prompt longer than context", "POST", "/v1/completions",
     _with(GOOD_COMPLETION, prompt=long_prompt(3000)), 400, None),
    ("unknown endpoint", "POST", "/v1/nothing", _with(GOOD_COMPLETION), 404, None),
    ("wrong method", "GET", "/v1/completions", None, 405, None),
    ("body too large", "POST", "/v1/completions",
     _with(GOOD_COMPLETION, prompt="x" * (5 * 1024 * 1024)), 413, None),
]


@pytest.mark.parametrize("name, method, path, body, status, param", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_openai_error(aggregated_server, name, method, path, body, status,
                                       param):
    response = httpx.request(method, aggregated_server.base_url + path, content=body,
                             headers={**AUTH, "Content-Type": "application/json"},
                             timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param


def test_server_still_answers_after_bad_requests(client, aggregated_server):
    for _, method, path, body, _, _ in BAD_REQUESTS:
        httpx.request(method, aggregated_server.base_url + path, content=body,
                      headers=AUTH, timeout=60)
    response = client.completions.create(model="pdserve:tiny", prompt="Still there?",
                                         max_tokens=4)
    assert response.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": API_KEY}])
def test_api_key_is_required(aggregated_server, headers):
    response = httpx.post(aggregated_server.base_url + "/v1/completions",
                          json=GOOD_COMPLETION, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "AuthenticationError"
