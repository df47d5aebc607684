"""Telling a cleanly ended request stream from a cancelled one, in grpc.aio servers."""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["ensure_stream_completed"]


async def ensure_stream_completed(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Raise unless the client ended its request stream cleanly (half-closed it).

    grpc.aio ends a servicer's request iterator the same way whether the
    client finished sending, cancelled the call, or the connection dropped:
    it merges a failed receive into end-of-stream, and injects the
    cancellation into the handler task only later, through a separate
    operation (measured: from microseconds to over a millisecond after).
    A handler that commits on end-of-stream would store a truncated upload.
    By the time the receive has failed, though, the call is already dead in
    grpc core, so any send on it fails: sending the initial metadata (which
    the response needs anyway) raises for a cancelled or broken call and
    succeeds on a live one. Call this after the last message and before
    making anything visible.
    """
    await context.send_initial_metadata(())
