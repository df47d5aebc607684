"""Blocking calls on a thread pool, batched per turn of the event loop.

Each asyncio-to-thread handoff costs ~0.4-0.5 ms here (see ``bench/NOTES.md``),
more than reading or writing a small local file. :class:`BatchingExecutor`
groups the calls made in the same turn of the event loop (a reader
prefetching, many small files written at once) into at most one pool job per
thread, and each job resolves its calls' futures with one wakeup of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from tvix.castore.errors import StorageError

__all__ = ["BatchingExecutor"]

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class BatchingExecutor:
    """``threads`` worker threads.

    After :meth:`shutdown`, calls raise
    :class:`~tvix.castore.errors.StorageError` with ``closed_message``.
    """

    def __init__(self, threads: int, name: str, closed_message: str) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._closed_message = closed_message
        self._queued: list[_Job] = []
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, grouped with the calls of this loop turn."""
        if self._closed:
            raise StorageError(self._closed_message)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queued.append((fn, args, future))
        if len(self._queued) == 1:
            loop.call_soon(self._dispatch, loop)
        return await future

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """``fn(*args)`` in a worker thread, alone; for callers that are threads themselves."""
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        """Refuse new calls and cancel the queued ones; running ones finish."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs, self._queued = self._queued, []
        groups = min(self.threads, len(jobs))
        for i in range(groups):
            group = jobs[i::groups]
            try:
                done = self._pool.submit(_run_group, group)
            except RuntimeError:  # the pool is shut down
                for _fn, _args, future in group:
                    if not future.done():
                        future.set_exception(StorageError(self._closed_message))
                continue
            done.add_done_callback(partial(_wake, loop, group, self._closed_message))


def _run_group(group: list[_Job]) -> list[tuple[bool, Any]]:
    """Run a group of calls in a pool thread: (ok, result or exception) each."""
    out: list[tuple[bool, Any]] = []
    for fn, args, future in group:
        if future.cancelled():
            out.append((False, None))
            continue
        try:
            out.append((True, fn(*args)))
        except BaseException as e:
            out.append((False, e))
    return out


def _wake(
    loop: asyncio.AbstractEventLoop,
    group: list[_Job],
    closed_message: str,
    done: Future[list[tuple[bool, Any]]],
) -> None:
    """From the pool thread: resolve the group's futures in the loop, with one wakeup."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_resolve_group, group, closed_message, done)


def _resolve_group(
    group: list[_Job], closed_message: str, done: Future[list[tuple[bool, Any]]]
) -> None:
    """Hand a group's results to its futures (in the event loop)."""
    if done.cancelled():  # the pool shut down before running it
        closed = StorageError(closed_message)
        results: list[tuple[bool, Any]] = [(False, closed)] * len(group)
    else:
        try:
            results = done.result()
        except BaseException as e:
            results = [(False, e)] * len(group)
    for (_fn, _args, future), (ok, value) in zip(group, results, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        elif value is not None:
            future.set_exception(value)
        else:
            future.cancel()
