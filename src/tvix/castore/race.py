"""Racing sources: every source asked at once, the first answer that verifies wins.

:func:`first_answer` is the loop, and :class:`RaceConfig` the composition
settings (``type = "race"``, ``sources``), shared by the race combinators of
all three kinds (:mod:`tvix.castore.blobservice.race`,
:mod:`tvix.castore.directoryservice.race`, :mod:`tvix.store.pathinfoservice.race`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.errors import StorageError, ValidationError

__all__ = ["RaceConfig", "first_answer", "source_name"]

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")


def source_name(service: object, index: int) -> str:
    """How logs and errors name source ``index``: its address when it has one."""
    address = getattr(service, "address", None)
    return f"source {index} ({address or type(service).__name__})"


async def first_answer(
    sources: Sequence[S],
    ask: Callable[[S], Awaitable[T | None]],
    what: str,
    *,
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> tuple[int, T] | None:
    """Ask every source at once; the index and answer of the first that is not ``None``.

    ``ask`` verifies what a source returns and raises when it does not hold
    up. The other sources' calls are cancelled as soon as one answer wins
    (and awaited, so nothing outlives the call); answers that arrive
    together with the winner are passed to ``discard`` (e.g. to close a
    reader). A source whose call raises (unavailable, wrong data) is logged
    as a warning naming it, and skipped. Returns ``None`` only when every
    source answered ``None``. When no source answered and some failed, raises
    the failure: of its own type if all failures share one, else
    :class:`StorageError` listing them.
    """
    tasks = [asyncio.ensure_future(ask(s)) for s in sources]
    index: dict[asyncio.Future[T | None], int] = {t: i for i, t in enumerate(tasks)}
    failures: list[tuple[int, Exception]] = []
    winner: tuple[int, T] | None = None
    try:
        pending: set[asyncio.Future[T | None]] = set(tasks)
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # In source order, so ties go to the earlier source (deterministic).
            for task in sorted(done, key=index.__getitem__):
                i = index[task]
                # A call cancelled by someone else than us counts as a failing source.
                exc = (
                    StorageError("the call was cancelled") if task.cancelled() else task.exception()
                )
                if exc is not None and not isinstance(exc, Exception):
                    raise exc  # KeyboardInterrupt and the like are not a source's failure
                if exc is not None:
                    name = source_name(sources[i], i)
                    log.warning("race: %s: %s failed, skipping it: %s", what, name, exc)
                    failures.append((i, exc))
                    continue
                answer = task.result()
                if answer is None:
                    continue
                if winner is None:
                    winner = (i, answer)
                elif discard is not None:
                    await discard(answer)
    finally:
        losers = [t for t in tasks if not t.done()]
        for t in losers:
            t.cancel()
        if losers:
            # Let the cancellations land (a remote call ends, a reader closes) before
            # returning; their outcome no longer matters.
            await asyncio.wait(losers)
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: a loser's failure is not "never retrieved"
    if winner is not None:
        return winner
    if failures:
        raise _combined(what, sources, failures)
    return None


def _combined(
    what: str, sources: Sequence[object], failures: list[tuple[int, Exception]]
) -> Exception:
    detail = "; ".join(f"{source_name(sources[i], i)}: {e}" for i, e in failures)
    message = f"{what}: no source had it and {len(failures)} of {len(sources)} failed: {detail}"
    kinds = {type(e) for _, e in failures}
    if len(kinds) == 1:
        try:
            return kinds.pop()(message)
        except TypeError:  # an exception type with another constructor
            pass
    return StorageError(message)


@dataclass(frozen=True)
class RaceConfig(ServiceConfig):
    """Type ``race``: ``sources``, names of services of the same kind, asked at once.

    The base of the race combinators' configs, one per kind.
    """

    sources: list[str] = setting("refs")

    def source_services(self, ctx: BuildContext) -> list[Any]:
        """The sources, built; raises if there is none."""
        if not self.sources:
            raise ValidationError("'sources' must name at least one service")
        return [ctx.service(name) for name in self.sources]
