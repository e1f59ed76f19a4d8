"""serving.ingress: waiting for a reply's next item."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.errors import UpstreamTimeoutError
from serving.ingress import _next_before


class Reply:
    """A reply stream whose next item is the future given."""

    def __init__(self, item: asyncio.Future):
        self.item = item

    def __anext__(self) -> asyncio.Future:
        return self.item


def test_a_cancel_that_meets_the_next_item_still_cancels():
    """The client leaves just as a token arrives: the relay must stop, not stream on
    (Python 3.11's asyncio.wait_for returned the token and dropped the cancel)."""
    async def run():
        item = asyncio.get_running_loop().create_future()
        relay = asyncio.create_task(_next_before(Reply(item), time.monotonic() + 60))
        await asyncio.sleep(0)  # the relay waits for the token
        item.set_result("token")
        relay.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relay

    asyncio.run(run())


def test_an_item_past_the_deadline_is_a_timeout():
    async def run():
        item = asyncio.get_running_loop().create_future()
        with pytest.raises(UpstreamTimeoutError):
            await _next_before(Reply(item), time.monotonic() + 0.05)
        assert item.cancelled()  # the wait for it ended too

    asyncio.run(run())


def test_an_item_in_time_is_returned():
    async def run():
        item = asyncio.get_running_loop().create_future()
        item.set_result("token")
        assert await _next_before(Reply(item), time.monotonic() + 60) == "token"

    asyncio.run(run())
