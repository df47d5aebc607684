"""The NAR wire format's building blocks, shared by the reader and the writer.

A NAR is a sequence of strings, each a little-endian u64 length, the bytes,
and zero padding to a multiple of 8. Fixed token sequences are precomputed
so that the writer emits them, and the reader matches them, in one step.
"""

from __future__ import annotations

__all__ = [
    "MAX_NAME_LEN",
    "MAX_TARGET_LEN",
    "invalid_name_reason",
    "padding",
    "token",
]

#: Longest entry name accepted (Linux ``NAME_MAX``; nothing Nix dumps is longer).
MAX_NAME_LEN = 255
#: Longest symlink target accepted (Linux ``PATH_MAX``).
MAX_TARGET_LEN = 4096


def padding(n: int) -> int:
    """Return the number of zero bytes that pad a string of *n* bytes to a multiple of 8."""
    return -n & 7


def token(s: bytes) -> bytes:
    """Return the wire encoding of the string *s*: length, bytes, padding."""
    return len(s).to_bytes(8, "little") + s + bytes(padding(len(s)))


def invalid_name_reason(name: bytes) -> str | None:
    """Return why *name* cannot be a directory entry name, or None if it can."""
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LEN:
        return f"is longer than {MAX_NAME_LEN} bytes"
    if b"/" in name:
        return "contains '/'"
    if b"\0" in name:
        return "contains a NUL byte"
    if name in (b".", b".."):
        return "is '.' or '..'"
    return None


MAGIC = token(b"nix-archive-1")
OPEN = token(b"(")
CLOSE = token(b")")
TYPE = token(b"type")
REGULAR = token(b"regular")
SYMLINK = token(b"symlink")
DIRECTORY = token(b"directory")
EXECUTABLE = token(b"executable")
EMPTY = token(b"")
CONTENTS = token(b"contents")
TARGET = token(b"target")
ENTRY = token(b"entry")
NAME = token(b"name")
NODE = token(b"node")

#: ``(`` ``type`` — every node starts like this.
NODE_START = OPEN + TYPE
#: Up to and including the ``contents`` token of a (non-)executable regular file.
REGULAR_HEADER = NODE_START + REGULAR + CONTENTS
EXECUTABLE_HEADER = NODE_START + REGULAR + EXECUTABLE + EMPTY + CONTENTS
SYMLINK_HEADER = NODE_START + SYMLINK + TARGET
DIRECTORY_HEADER = NODE_START + DIRECTORY
#: ``entry`` ``(`` ``name`` — starts every directory entry.
ENTRY_HEADER = ENTRY + OPEN + NAME
#: What follows ``contents <size> <bytes>``: the padding and ``)``, by padding length.
REGULAR_TRAILERS = tuple(bytes(p) + CLOSE for p in range(8))
