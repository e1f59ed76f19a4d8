"""serving.direct: the ingress's same-node calls to engine replicas over Unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import sys

import pytest

from serving.direct import (DirectClient, DirectServer, DirectUnavailable, RemoteError,
                            ReplicaGone)
from serving.errors import BadRequestError


class Replica:
    """Stands in for EngineServer's methods: the calls' own behaviour, real sockets."""

    def __init__(self) -> None:
        self.closed_streams = 0
        self.release = asyncio.Event()

    async def prefill(self, endpoint: str, body: dict) -> dict:
        if body.get("fail") == "bad":
            raise BadRequestError("prompt: too long", param="prompt")
        if body.get("fail") == "crash":
            raise KeyError("oops")
        if body.get("wait"):
            await self.release.wait()
        return {"endpoint": endpoint, "echo": body, "ids": [1, 2, 3]}

    async def generate(self, endpoint: str, body: dict):
        try:
            for i in range(body["n"]):
                if body.get("wait") and i == 1:
                    await self.release.wait()
                yield f"data: {i}\n\n"
            if body.get("then_fail"):
                raise BadRequestError("late refusal")
        finally:
            self.closed_streams += 1


def _server(replica: Replica) -> DirectServer:
    return DirectServer({"prefill": replica.prefill}, {"generate": replica.generate})


@contextlib.asynccontextmanager
async def connected(replica: Replica):
    server = _server(replica)
    client = DirectClient(server.address)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


def test_unary_and_stream_round_trip():
    async def main():
        replica = Replica()
        async with connected(replica) as (server, client):
            body = {"prompt": [1, 2, 3], "nested": {"a": None, "b": 1.5}}
            assert await client.call("prefill", "completions", body) == {
                "endpoint": "completions", "echo": body, "ids": [1, 2, 3]}
            events = [e async for e in await client.stream("generate", "chat", {"n": 3})]
            assert events == ["data: 0\n\n", "data: 1\n\n", "data: 2\n\n"]
            # concurrent calls on one connection keep their own replies
            replies = await asyncio.gather(*(client.call("prefill", "completions", {"i": i})
                                             for i in range(20)))
            assert [r["echo"]["i"] for r in replies] == list(range(20))

    asyncio.run(main())


def test_calls_work_on_uvloop_as_in_serve_replicas():
    """Serve runs replicas on uvloop, which refuses abstract socket names itself."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with connected(Replica()) as (server, client):
            assert (await client.call("prefill", "c", {}))["endpoint"] == "c"
            events = [e async for e in await client.stream("generate", "chat", {"n": 2})]
            assert events == ["data: 0\n\n", "data: 1\n\n"]

    uvloop.run(main())


def test_the_socket_is_abstract_and_gone_with_its_server():
    """No file to leave behind: a name in Linux's abstract socket namespace."""
    async def main():
        server = _server(Replica())
        name = server.address.removeprefix("unix://")
        assert name.startswith("@pdserve-")
        with open("/proc/net/unix") as f:
            assert name in f.read()
        server.close()
        await asyncio.sleep(0.05)
        with open("/proc/net/unix") as f:
            assert name not in f.read()
        client = DirectClient(server.address)
        with pytest.raises(DirectUnavailable):
            await client.call("prefill", "c", {})

    asyncio.run(main())


OTHER_USER_CALL = """
import os, socket, struct, sys
import msgspec
os.setuid(65534)  # nobody
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1])
frame = msgspec.msgpack.encode([0, "prefill", ["c", {}]])
sock.sendall(struct.pack("<I", len(frame)) + frame)
sock.settimeout(10)
try:
    print("answered" if sock.recv(100) else "closed")
except ConnectionResetError:
    print("closed")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call as another user")
def test_another_users_process_is_refused():
    async def main():
        replica = Replica()
        server = _server(replica)
        try:
            name = server.address.removeprefix("unix://@")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", OTHER_USER_CALL, name,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip() == "closed"  # unanswered
            client = DirectClient(server.address)  # this user is still served
            assert (await client.call("prefill", "c", {}))["endpoint"] == "c"
        finally:
            server.close()

    asyncio.run(main())


def test_errors_cross_as_client_errors_or_failures():
    async def main():
        async with connected(Replica()) as (server, client):
            with pytest.raises(RemoteError) as err:
                await client.call("prefill", "completions", {"fail": "bad"})
            assert (err.value.status, err.value.type, err.value.param) == (
                400, "BadRequestError", "prompt")
            with pytest.raises(RuntimeError, match="KeyError"):
                await client.call("prefill", "completions", {"fail": "crash"})
            with pytest.raises(RuntimeError, match="no method"):
                await client.call("nope")
            stream = await client.stream("generate", "completions", {"n": 1, "then_fail": 1})
            assert await stream.__anext__() == "data: 0\n\n"
            with pytest.raises(RemoteError, match="late refusal"):
                await stream.__anext__()
            # the connection still serves after errors
            assert (await client.call("prefill", "x", {}))["endpoint"] == "x"

    asyncio.run(main())


def test_cancel_stops_the_replica_side():
    async def main():
        replica = Replica()
        async with connected(replica) as (server, client):
            stream = await client.stream("generate", "completions", {"n": 5, "wait": True})
            assert await stream.__anext__() == "data: 0\n\n"
            stream.cancel()
            for _ in range(100):
                if replica.closed_streams:
                    break
                await asyncio.sleep(0.01)
            assert replica.closed_streams == 1 and not server._calls
            call = asyncio.create_task(client.call("prefill", "c", {"wait": True}))
            await asyncio.sleep(0.05)
            call.cancel()
            for _ in range(100):
                if not server._calls:
                    break
                await asyncio.sleep(0.01)
            assert not server._calls

    asyncio.run(main())


def test_a_caller_that_goes_away_stops_its_calls():
    async def main():
        replica = Replica()
        server = _server(replica)
        client = DirectClient(server.address)
        try:
            stream = await client.stream("generate", "completions", {"n": 5, "wait": True})
            assert await stream.__anext__() == "data: 0\n\n"
            call = asyncio.create_task(client.call("prefill", "c", {"wait": True}))
            await asyncio.sleep(0.05)
            assert len(server._calls) == 2
            client.close()  # e.g. the ingress replica died
            for _ in range(100):
                if not server._calls:
                    break
                await asyncio.sleep(0.01)
            assert not server._calls and replica.closed_streams == 1
            with pytest.raises(ReplicaGone):
                await call
        finally:
            server.close()

    asyncio.run(main())


def test_drain_waits_for_calls_in_flight():
    async def main():
        replica = Replica()
        async with connected(replica) as (server, client):
            assert await server.drain(5) == 0  # nothing in flight: at once
            stream = await client.stream("generate", "completions", {"n": 3, "wait": True})
            assert await stream.__anext__() == "data: 0\n\n"
            asyncio.get_running_loop().call_later(0.3, replica.release.set)
            assert await server.drain(5) == 0
            assert [e async for e in stream] == ["data: 1\n\n", "data: 2\n\n"]
            replica.release.clear()
            call = asyncio.create_task(client.call("prefill", "c", {"wait": True}))
            await asyncio.sleep(0.05)
            assert await server.drain(0.2) == 1  # the caller then sees the socket close
            server.close()
            with pytest.raises(ReplicaGone):
                await asyncio.wait_for(call, 5)

    asyncio.run(main())


def _serve_in_child(conn) -> None:
    async def main():
        replica = Replica()
        server = _server(replica)
        conn.send(server.address)
        await asyncio.Event().wait()

    asyncio.run(main())


def test_a_dead_replica_fails_calls_in_flight_and_refuses_new_ones():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_in_child, args=(child,), daemon=True)
    proc.start()
    try:
        address = parent.recv()

        async def main():
            client = DirectClient(address)
            try:
                assert (await client.call("prefill", "c", {}))["endpoint"] == "c"
                stream = await client.stream("generate", "c", {"n": 3, "wait": True})
                call = asyncio.create_task(client.call("prefill", "c", {"wait": True}))
                assert await stream.__anext__() == "data: 0\n\n"
                proc.kill()
                with pytest.raises(ReplicaGone):
                    await asyncio.wait_for(call, 5)
                with pytest.raises(ReplicaGone):
                    await asyncio.wait_for(stream.__anext__(), 5)
                assert client.broken
                with pytest.raises(DirectUnavailable):
                    await client.call("prefill", "c", {})
            finally:
                client.close()

        asyncio.run(main())
    finally:
        proc.kill()
        proc.join()


def test_no_listener_is_unavailable_not_a_hang(tmp_path):
    async def main():
        client = DirectClient(f"unix://{tmp_path}/none.sock")
        try:
            with pytest.raises(DirectUnavailable):
                await asyncio.wait_for(client.call("prefill", "c", {}), 5)
        finally:
            client.close()

    asyncio.run(main())
