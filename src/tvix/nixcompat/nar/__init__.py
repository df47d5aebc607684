"""The NAR (Nix ARchive) format: a streaming reader and a streaming writer."""

from tvix.nixcompat.nar.reader import (
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    EntryEnd,
    NarEvent,
    NarParser,
    Regular,
    RegularEnd,
    Symlink,
    aread_nar,
    aread_nar_chunks,
    read_nar,
    read_nar_chunks,
)
from tvix.nixcompat.nar.writer import NarWriter, dump_path

__all__ = [
    "Contents",
    "DirectoryEnd",
    "DirectoryStart",
    "Entry",
    "EntryEnd",
    "NarEvent",
    "NarParser",
    "NarWriter",
    "Regular",
    "RegularEnd",
    "Symlink",
    "aread_nar",
    "aread_nar_chunks",
    "dump_path",
    "read_nar",
    "read_nar_chunks",
]
