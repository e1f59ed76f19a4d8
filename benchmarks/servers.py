"""Servers the tool starts and stops itself (A/B runs, scenarios, tests).

A server is any command line that serves the OpenAI API on a port: `pdserve serve
CONFIG --port {port}`, `python -m vllm.entrypoints.openai.api_server ... --port
{port}`, a shell script. `{port}` in the command is replaced by a free loopback port.
The command runs in its own process group, so stopping it (SIGINT, then SIGTERM, then
SIGKILL) reaches the workers it spawned and nothing else.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.errors import ServerError
from serving.placement import process_tree, start_time
from serving.ports import free_port

POLL_S = 0.5
LOG_TAIL_CHARS = 3000


def is_ready(base_url: str) -> bool:
    """GET /health answers 200 and /v1/models lists a model."""
    try:
        if httpx.get(f"{base_url}/health", timeout=2.0, trust_env=False).status_code != 200:
            return False
        models = httpx.get(f"{base_url}/v1/models", timeout=5.0, trust_env=False)
        return models.status_code == 200 and bool(models.json().get("data"))
    except (httpx.HTTPError, ValueError):
        return False


class ManagedServer:
    """Start a server command, wait until it is ready, stop it on exit.

        with ManagedServer("pdserve serve cfg.yaml --port {port}", log_path=p) as url:
            ...  # url is http://127.0.0.1:PORT
    """

    def __init__(self, command: str | list[str], *, env: dict[str, str] | None = None,
                 log_path: Path | None = None, ready_timeout_s: float = 300.0,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        parts = shlex.split(command) if isinstance(command, str) else list(command)
        self.argv = [p.replace("{port}", str(self.port)) for p in parts]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        """Run the command and block until it is ready; ServerError if it never is."""
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path or os.devnull, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as err:
            raise ServerError(f"cannot run {shlex.join(self.argv)}: {err}") from err
        finally:
            log.close()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with code {self.proc.returncode} before "
                                  f"it was ready: {shlex.join(self.argv)}\n{self.log_tail()}")
            if is_ready(self.base_url):
                return self.base_url
            time.sleep(POLL_S)
        self.stop()
        raise ServerError(f"server not ready after {self.ready_timeout_s:.0f}s: "
                          f"{shlex.join(self.argv)}\n{self.log_tail()}")

    def pause(self) -> None:
        """Suspend the whole process tree (SIGSTOP): it takes no CPU until `resume`."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, sig: signal.Signals) -> None:
        """The server's process group and every process below it: Ray starts each of
        its workers (an engine replica with its EngineCore and worker, Serve's
        controller, ...) in a process group of its own."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(sig, process_tree(self.proc.pid))

    def _signal(self, sig: signal.Signals, pids: list[int]) -> None:
        """`sig` to the server's process group and to `pids`, those still there."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = 30.0) -> int | None:
        """Stop the whole process tree; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        self.resume()  # a suspended tree would hold the signals below
        tree = ({pid: start_time(pid) for pid in process_tree(self.proc.pid)}
                if self.proc.poll() is None else {})
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0),
                            (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        # What is left of the tree (the group, and processes in groups of their own
        # that the shutdown orphaned, such as an engine replica's EngineCore) is killed.
        self._signal(signal.SIGKILL, [pid for pid, started in tree.items()
                                      if pid != self.proc.pid and start_time(pid) == started])
        return self.proc.returncode

    def log_tail(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop(grace_s=5.0)
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pdserve_auth_headers() -> dict[str, str]:
    """Headers for a `pdserve serve` started with PDSERVE_API_KEY in the environment."""
    key = os.environ.get("PDSERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def start_pdserve(config_path: str, log_path: Path | None = None,
                  env: dict[str, str] | None = None) -> tuple[ManagedServer, float]:
    """`pdserve serve CONFIG` on a free port, started and ready; (server, seconds to
    ready). The caller stops it."""
    command = [sys.executable, "-m", "serving.cli", "serve", config_path, "--port", "{port}"]
    return start_timed(ManagedServer(shlex.join(command), log_path=log_path,
                                     ready_timeout_s=600, env=env))


def start_timed(server: ManagedServer) -> tuple[ManagedServer, float]:
    """Start `server` and wait until it is ready; (server, seconds to ready). Stopped
    again if it fails to start; otherwise the caller stops it."""
    started = time.monotonic()
    try:
        server.start()
    except BaseException:
        server.stop(grace_s=5.0)
        raise
    return server, time.monotonic() - started
