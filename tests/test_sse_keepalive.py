"""`with_keepalive`: a long-queued `/stream` sends comment lines instead of silence, and a client that goes away
still closes the job's watcher (which cancels the job)."""

from __future__ import annotations

import asyncio

from engine.server.status_stream import with_keepalive


def test_silence_becomes_keepalives_and_items_pass_in_order():
    async def slow():
        await asyncio.sleep(0.25)
        yield "a"
        yield "b"

    async def collect():
        return [item async for item in with_keepalive(slow(), every_s=0.05)]

    out = asyncio.run(collect())
    assert out[-2:] == ["a", "b"]
    assert out[:-2] and all(item is None for item in out[:-2])


def test_closing_early_closes_the_source_while_it_waits():
    async def main():
        state = {"closed": False}

        async def never():
            try:
                await asyncio.sleep(60)
                yield "late"
            finally:
                state["closed"] = True

        stream = with_keepalive(never(), every_s=0.01)
        assert await stream.__anext__() is None
        await asyncio.wait_for(stream.aclose(), timeout=5)
        return state["closed"]

    assert asyncio.run(main()) is True
