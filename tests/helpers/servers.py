"""Start the real thing for tests: `pdserve serve` as a user runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving.ports import free_port

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`pdserve serve CONFIG` in a subprocess, on a free loopback port."""

    def __init__(self, config: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()  # Ray's metrics endpoint (vLLM's engine metrics)
        self.log = tempfile.NamedTemporaryFile(prefix="pdserve-test-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", config, "--port", str(self.port),
             "--metrics-port", str(self.metrics_port)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self.started = time.monotonic()

    def wait_ready(self, timeout_s: float = 300) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, as a process manager would; kill the group if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def metric_lines(server: ServerProcess, name: str, **labels: str) -> list[str]:
    """The server's /metrics samples of `name` whose labels include `labels`."""
    return [line for line in httpx.get(server.base_url + "/metrics").text.splitlines()
            if line.startswith(name + "{")
            and all(f'{k}="{v}"' in line for k, v in labels.items())]


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of the server's /metrics samples of `name` with these labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metric_lines(server, name, **labels))


def wait_for(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` every 0.25 s; fail naming `what` if it is not met in time."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met in {timeout_s:g} s"
        time.sleep(0.25)


@contextlib.contextmanager
def running_server(config: str, env: dict[str, str] | None = None):
    """A ready `ServerProcess` (its `ready_s` set), stopped on exit."""
    server = ServerProcess(config, env)
    try:
        server.ready_s = server.wait_ready()
        yield server
    finally:
        server.stop()
