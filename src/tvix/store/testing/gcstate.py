"""The GCState conformance suite."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection

import pytest

from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import GCBusyError
from tvix.store.gcstate.base import GCState

__all__ = ["GCStateTests", "StateFactory"]

StateFactory = Callable[[], GCState]
"""Opens the GC state of one store, anew on each call (picklable: a holder process calls it)."""

_A = StorePath.from_absolute_path("/nix/store/" + "a" * 32 + "-a")
_B = StorePath.from_absolute_path("/nix/store/" + "b" * 32 + "-b")


def _hold(factory: StateFactory, conn: Connection) -> None:
    """In a process of its own: take the lock, say so, and keep it until killed."""

    async def hold() -> None:
        state = factory()
        try:
            async with state.lock():
                conn.send("locked")
                await asyncio.sleep(3600)
        except GCBusyError as e:
            conn.send(str(e))

    asyncio.run(hold())


class GCStateTests:
    """Tests every :class:`GCState` must pass.

    Subclasses provide a ``gc_state_factory`` fixture: a
    :data:`StateFactory` for a fresh store's state. Several states it opens
    stand for several processes (or machines) sharing the store.
    """

    @pytest.fixture
    async def open_state(self, gc_state_factory: StateFactory) -> AsyncIterator[StateFactory]:
        opened: list[GCState] = []

        def open_state() -> GCState:
            opened.append(gc_state_factory())
            return opened[-1]

        yield open_state
        for state in opened:
            await state.close()

    async def test_pins_add_list_remove(self, open_state: StateFactory) -> None:
        state, other = open_state(), open_state()
        assert await state.pins() == []
        await state.add_pin("release", _B)
        await state.add_pin("base", _A)
        assert await other.pins() == [("base", _A), ("release", _B)]
        await other.add_pin("release", _A)  # replaces
        assert await state.pins() == [("base", _A), ("release", _A)]
        assert await state.remove_pin("base")
        assert not await other.remove_pin("base")
        assert not await other.remove_pin("never")
        assert await other.pins() == [("release", _A)]

    async def test_second_lock_is_refused(self, open_state: StateFactory) -> None:
        state, other = open_state(), open_state()
        async with state.lock():
            with pytest.raises(GCBusyError, match="another garbage collection is running") as e:
                async with other.lock():
                    pytest.fail("two holders of the GC lock")
            assert state.where in str(e.value)
            with pytest.raises(GCBusyError):
                async with state.lock():
                    pytest.fail("the GC lock is not reentrant")
            # Pins stay usable while a GC holds the lock.
            await other.add_pin("p", _A)
            assert await state.pins() == [("p", _A)]
        async with other.lock():
            pass
        async with state.lock():
            pass

    async def test_lock_goes_when_its_holder_dies(
        self, open_state: StateFactory, gc_state_factory: StateFactory
    ) -> None:
        state = open_state()
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_hold, args=(gc_state_factory, theirs), daemon=True)
        proc.start()
        try:
            got = await asyncio.to_thread(lambda: ours.recv() if ours.poll(60) else "silent")
            assert got == "locked"
            with pytest.raises(GCBusyError):
                async with state.lock():
                    pass
        finally:
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.join, 30)
        deadline = time.monotonic() + 10
        while True:
            try:
                async with state.lock():
                    break
            except GCBusyError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
