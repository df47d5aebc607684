"""The exceptions of :mod:`tvix.nix_daemon`, and the one place that maps errors to replies.

::

    NixDaemonError
    ├── WireError         malformed or oversized protocol data: the client is told, then
    │                     the connection is closed (the stream cannot be resynchronised)
    └── OperationError    an operation fails: the client shows the message (STDERR_ERROR)
        ├── Refused       the operation is not supported here (builds, GC, …)
        └── NotTrusted    the client is not trusted to do it

Errors of the layers below are sent to the client as OperationErrors
(:func:`message_for`): a malformed path, NAR, hash or content address and a
NAR that does not match its claims are the client's fault; storage faults
are ours, and say so.
"""

from __future__ import annotations

from tvix.castore import CastoreError, ValidationError
from tvix.nixcompat import NixCompatError
from tvix.store import StoreError

__all__ = [
    "NixDaemonError",
    "NotTrusted",
    "OperationError",
    "Refused",
    "WireError",
    "message_for",
]


class NixDaemonError(Exception):
    """Root of every error raised by :mod:`tvix.nix_daemon`."""


class WireError(NixDaemonError):
    """The peer sent something that is not the worker protocol (or exceeds a limit)."""


class OperationError(NixDaemonError):
    """An operation cannot be done; the message is shown to the client as is."""


class Refused(OperationError):
    """An operation this daemon does not offer (it does not build, for one)."""


class NotTrusted(OperationError):
    """An operation only trusted clients may do."""


def message_for(exc: BaseException) -> str | None:
    """The message the client should see for ``exc``, or ``None`` if it is a bug of ours."""
    if isinstance(exc, NixDaemonError | NixCompatError | ValidationError):
        return str(exc)
    if isinstance(exc, StoreError | CastoreError):
        return f"tvix-store: {exc}"
    if isinstance(exc, OSError):
        return f"tvix-store: I/O error: {exc}"
    return None
