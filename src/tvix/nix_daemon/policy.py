"""Who is trusted, and what a client may add to the store.

The daemon learns who connected from the socket (``SO_PEERCRED``: uid and
gid of the client process) and compares it with a list of trusted users,
written as Nix's ``trusted-users``: user names, numeric uids, ``@group``
(members and users whose primary group it is) and ``*`` (everyone).

What trust means, as in Nix:

- Everyone who can open the socket may query and read, and may add
  **content-addressed** paths: their store path is computed from their
  content, which the daemon verifies, so they cannot lie about it.
- An **input-addressed** path (built, with a deriver) is accepted only with
  a signature by one of the daemon's trusted public keys — unless the
  client is trusted *and* asked not to check signatures
  (``nix copy --no-check-sigs``).
- Only trusted clients may add signatures to stored paths.

Whatever the trust, every NAR is checked against its claimed hash and
size, every reference must already be in the store, and a path is stored
all or nothing.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass, field

from tvix.nixcompat import VerifyingKey

__all__ = ["Peer", "TrustPolicy"]


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a unix socket (``None`` where unknown)."""

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None

    def describe(self) -> str:
        """``uid=…`` with the user name, for log lines."""
        if self.uid is None:
            return "unknown peer"
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            name = "?"
        return f"pid {self.pid} uid {self.uid} ({name})"


@dataclass(frozen=True)
class TrustPolicy:
    """Trusted users and the public keys that make an input-addressed path acceptable."""

    trusted: tuple[str, ...] = ()
    public_keys: tuple[VerifyingKey, ...] = field(default=())

    @classmethod
    def parse(cls, entries: Iterable[str], public_keys: Iterable[VerifyingKey] = ()) -> TrustPolicy:
        """From entries each holding names separated by commas or spaces."""
        names: list[str] = []
        for entry in entries:
            names.extend(n for n in entry.replace(",", " ").split() if n)
        return cls(tuple(names), tuple(public_keys))

    @classmethod
    def default_trusted(cls) -> tuple[str, ...]:
        """``root`` and the user running the daemon."""
        return tuple(dict.fromkeys(("root", str(os.getuid()))))

    def is_trusted(self, peer: Peer) -> bool:
        """Whether ``peer`` is one of the trusted users."""
        if "*" in self.trusted:
            return True
        if peer.uid is None:
            return False
        try:
            user = pwd.getpwuid(peer.uid)
        except KeyError:
            user = None
        for name in self.trusted:
            if name.isdigit() and int(name) == peer.uid:
                return True
            if user is not None and name == user.pw_name:
                return True
            if name.startswith("@") and user is not None and _in_group(user, name[1:], peer.gid):
                return True
        return False


def _in_group(user: pwd.struct_passwd, group: str, gid: int | None) -> bool:
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    return entry.gr_gid in (user.pw_gid, gid) or user.pw_name in entry.gr_mem
