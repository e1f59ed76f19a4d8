"""A run against a server that misbehaves still finishes and reports every failure.

The misbehaving servers are small local fakes (for these failure cases only): one that
answers HTTP 500, one that cuts its stream after two tokens, one that sends an error
event mid-stream, and a base URL where nothing listens.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from benchmarks.__main__ import main
from benchmarks.errors import ServerError
from benchmarks.servers import ManagedServer
from serving.ports import free_port

CHUNK = 'data: {"choices":[{"index":0,"text":"tok"}]}\n\n'


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "ok"  # set per server class: ok, error, cut, error_event, not_streaming, every_other
    count = 0

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._send_json(200, {"data": [{"id": "fake"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        cls = type(self)
        cls.count += 1
        mode = cls.mode
        if mode == "every_other":
            mode = "ok" if cls.count % 2 else "error"
        if mode == "error":
            self._send_json(500, {"error": {"message": "engine overloaded", "code": 500}})
            return
        if mode == "not_streaming":
            self._send_json(200, {"choices": [{"text": "all at once"}]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write((CHUNK * 2).encode())
        if mode == "error_event":
            self.wfile.write(b'data: {"error": {"message": "decode replica died"}}\n\n')
        elif mode == "ok":
            self.wfile.write(b'data: {"choices":[],"usage":{"prompt_tokens":9,'
                             b'"completion_tokens":2}}\n\ndata: [DONE]\n\n')
        self.wfile.flush()  # "cut": the connection closes here, without [DONE]
        self.close_connection = True

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(mode: str) -> Iterator[str]:
    handler = type(f"Fake_{mode}", (FakeHandler,), {"mode": mode, "count": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def bench(base_url: str, out: Path, *extra: str) -> dict:
    rc = main(["--base-url", base_url, "--model", "fake", "--tokenizer", "pdserve:tiny",
               "--num-prompts", "6", "--random-input-len", "16", "--random-output-len", "2",
               "--max-concurrency", "3", "--request-timeout", "20", "--disable-tqdm",
               "--result-filename", str(out / "r.json"), *extra])
    result = json.loads((out / "r.json").read_text())
    assert (out / "r.csv").exists() and (out / "r-cdf.png").exists()
    assert rc == (0 if result["completed"] else 1)
    return result


@pytest.mark.parametrize("mode, reason, detail", [
    ("error", "http 500", "engine overloaded"),
    ("cut", "stream cut", "after 2 token chunks without [DONE]"),
    ("error_event", "stream error", "decode replica died"),
    ("not_streaming", "bad response", "not an event stream (application/json)"),
])
def test_a_misbehaving_server_is_reported_not_fatal(mode: str, reason: str, detail: str,
                                                     tmp_path: Path) -> None:
    for url in serve(mode):
        result = bench(url, tmp_path)
    assert (result["completed"], result["failed"]) == (0, 6)
    assert result["failure_reasons"] == {reason: 6}
    assert all(detail in e for e in result["errors"])
    assert result["output_lens"] == [0] * 6


def test_nothing_listening_at_the_base_url(tmp_path: Path) -> None:
    result = bench(f"http://127.0.0.1:{free_port()}", tmp_path, "--num-warmups", "2")
    assert result["failed"] == 6 and result["failure_reasons"] == {"connect error": 6}
    assert result["num_warmup_failed"] == 2


def test_some_failures_among_successes(tmp_path: Path) -> None:
    for url in serve("every_other"):
        result = bench(url, tmp_path, "--goodput", "ttft:10000")
    assert (result["completed"], result["failed"]) == (3, 3)
    assert result["failure_reasons"] == {"http 500": 3}
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    ok = [i for i, e in enumerate(result["errors"]) if not e]
    assert [result["output_lens"][i] for i in ok] == [2, 2, 2]
    assert [result["input_lens"][i] for i in ok] == [9, 9, 9]  # the server's usage counts


def test_bad_flags_exit_2_with_a_message(capsys) -> None:
    assert main(["--base-url", "localhost:8000", "--model", "m"]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert main(["--model", "m", "--goodput", "speed:3"]) == 2


def test_a_server_command_that_dies_is_a_clear_error(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = ManagedServer([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"],
                           log_path=log, ready_timeout_s=30)
    with pytest.raises(ServerError, match="exited with code 3") as err:
        with server:
            pass
    assert "no model here" in str(err.value)


def test_ab_with_a_dead_side_exits_1_and_says_why(tmp_path: Path, capsys) -> None:
    rc = main(["ab", "--a-cmd", f"{sys.executable} -c 'raise SystemExit(4)'",
               "--b-base-url", "http://127.0.0.1:9", "--model", "fake",
               "--result-dir", str(tmp_path), "--disable-tqdm"])
    assert rc == 1
    assert "exited with code 4" in capsys.readouterr().err


FAKE_SERVER = """
import json, sys, subprocess
from http.server import BaseHTTPRequestHandler, HTTPServer
# in a process group of its own, as Ray starts its workers
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake"}], "child": child.pid}).encode()
        self.send_response(200); self.send_header("content-length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_for_states(pid: int, child: int, done) -> None:
    """Signals arrive asynchronously: wait up to 5 s for both processes' states."""
    deadline = time.monotonic() + 5
    while not done(states := {_state(pid), _state(child)}):
        assert time.monotonic() < deadline, states
        time.sleep(0.01)


def test_a_paused_server_tree_is_stopped_until_resumed_and_still_stops(tmp_path: Path) -> None:
    server = ManagedServer([sys.executable, "-c", FAKE_SERVER, "{port}"], ready_timeout_s=30)
    with server as url:
        child = httpx.get(url + "/v1/models").json()["child"]
        server.pause()
        _wait_for_states(server.proc.pid, child, lambda states: states == {"T"})  # the tree
        server.resume()
        _wait_for_states(server.proc.pid, child, lambda states: "T" not in states)
        assert httpx.get(url + "/v1/models").status_code == 200
        server.pause()  # stop() resumes it first, or SIGINT would wait for a SIGCONT
    assert server.proc.returncode is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # killed with the tree, then reaped by init
        try:
            if _state(child) == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} outlived its stopped server")
