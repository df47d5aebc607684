"""Guest memory and split virtqueues (VIRTIO 1.x, section 2.7), as a vhost-user backend sees them.

No I/O here beyond reading and writing the shared memory it is given, so
the ring logic can be tested over a plain ``bytearray``.

Two address spaces meet: ring addresses (``SET_VRING_ADDR``) are the
frontend's (QEMU's) virtual addresses, descriptor addresses are guest
physical ones; :class:`GuestMemory` translates both through its regions.
Ring updates are plain stores in program order (element, then index), which
is enough on x86-64 (total store order); other architectures would need
barriers Python cannot issue.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from dataclasses import dataclass, field

__all__ = ["BadAddress", "Chain", "GuestMemory", "Region", "SplitQueue"]

_DESC = struct.Struct("<QIHH")  # addr len flags next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id len

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1


class BadAddress(Exception):
    """An address the guest gave lies outside the memory the frontend shared."""


@dataclass(slots=True)
class Region:
    """One region of guest memory: where it is for the guest, for the frontend, and here."""

    guest_phys: int
    size: int
    user_addr: int
    view: memoryview  # ``size`` bytes, mapped (or, in tests, any buffer)
    mapping: mmap.mmap | None = None

    def close(self) -> None:
        """Unmap the region (its views must no longer be used)."""
        self.view.release()
        if self.mapping is not None:
            # A view still held somewhere: the mapping goes when the GC frees it.
            with contextlib.suppress(BufferError):
                self.mapping.close()


@dataclass
class GuestMemory:
    """The regions of guest memory the frontend shared."""

    regions: list[Region] = field(default_factory=list)

    def close(self) -> None:
        """Unmap every region."""
        regions, self.regions = self.regions, []
        for r in regions:
            r.close()

    def guest(self, addr: int, length: int) -> list[memoryview]:
        """The buffer at guest physical ``addr``, as one view per region it spans."""
        views = []
        while length > 0:
            for r in self.regions:
                if r.guest_phys <= addr < r.guest_phys + r.size:
                    start = addr - r.guest_phys
                    n = min(length, r.size - start)
                    views.append(r.view[start : start + n])
                    addr += n
                    length -= n
                    break
            else:
                raise BadAddress(f"guest address {addr:#x} is in no shared memory region")
        return views

    def user(self, addr: int, length: int) -> memoryview:
        """The ring at frontend address ``addr`` (within one region)."""
        for r in self.regions:
            if r.user_addr <= addr and addr + length <= r.user_addr + r.size:
                start = addr - r.user_addr
                return r.view[start : start + length]
        raise BadAddress(f"frontend address {addr:#x} is in no shared memory region")


@dataclass(slots=True)
class Chain:
    """One request: its head index, the bytes the driver wrote, and the buffers for the answer."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    def request(self) -> bytes:
        """The driver's bytes, gathered."""
        return b"".join(self.readable)

    def reply(self, data: bytes) -> int:
        """Scatter ``data`` into the writable buffers; the number of bytes written."""
        done = 0
        for view in self.writable:
            if done >= len(data):
                break
            n = min(len(view), len(data) - done)
            view[:n] = data[done : done + n]
            done += n
        return done


class SplitQueue:
    """The device side of one split virtqueue of ``size`` entries."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        next_avail: int = 0,
        *,
        indirect: bool = False,
        event_idx: bool = False,
    ) -> None:
        self.memory = memory
        self.size = size
        self.desc = memory.user(desc_addr, 16 * size)
        self.avail = memory.user(avail_addr, 6 + 2 * size)
        self.used = memory.user(used_addr, 6 + 8 * size)
        self.next_avail = next_avail & 0xFFFF
        self.next_used: int = _U16.unpack_from(self.used, 2)[0]
        self.indirect = indirect
        # VIRTIO_RING_F_EVENT_IDX: each side says from which index on it wants
        # to hear from the other (used_event after the avail ring, avail_event
        # after the used ring) instead of flags.
        self.event_idx = event_idx
        self.signalled_used = self.next_used

    def release(self) -> None:
        """Drop the views of the rings (before the memory is unmapped)."""
        self.desc.release()
        self.avail.release()
        self.used.release()

    def pop(self) -> Chain | None:
        """The next request the driver made available, or ``None``."""
        avail_idx = _U16.unpack_from(self.avail, 2)[0]
        if avail_idx == self.next_avail:
            return None
        if (avail_idx - self.next_avail) & 0xFFFF > self.size:
            raise BadAddress(f"avail index {avail_idx} is more than a ring ahead")
        head = _U16.unpack_from(self.avail, 4 + 2 * (self.next_avail % self.size))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._chain(head)

    def _chain(self, head: int) -> Chain:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table, limit = self.desc, self.size
        index = head
        for _ in range(self.size + 1):
            if index >= limit:
                raise BadAddress(f"descriptor {index} is outside its table of {limit}")
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
            if flags & DESC_F_INDIRECT:
                if not self.indirect or length % 16 or table is not self.desc:
                    raise BadAddress("an indirect descriptor that was not negotiated")
                table = memoryview(b"".join(self.memory.guest(addr, length)))
                limit = length // 16
                index = 0
                continue
            views = self.memory.guest(addr, length)
            (writable if flags & DESC_F_WRITE else readable).extend(views)
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            index = nxt
        raise BadAddress(f"the descriptor chain at {head} loops")

    def push(self, head: int, length: int) -> None:
        """Give request ``head`` back, with ``length`` bytes written."""
        slot = self.next_used % self.size
        _USED_ELEM.pack_into(self.used, 4 + 8 * slot, head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF
        _U16.pack_into(self.used, 2, self.next_used)  # after the element: the driver reads it next

    def empty(self) -> bool:
        """Whether every request made available was taken.

        With EVENT_IDX it first asks the driver to kick once it makes the next
        one available; checking after that catches a request made meanwhile.
        """
        if self.event_idx:
            _U16.pack_into(self.used, 4 + 8 * self.size, self.next_avail)
        avail_idx: int = _U16.unpack_from(self.avail, 2)[0]
        return avail_idx == self.next_avail

    def wants_interrupt(self) -> bool:
        """Whether the driver wants to hear about the requests used since the last time."""
        if not self.event_idx:
            flags: int = _U16.unpack_from(self.avail, 0)[0]
            return not flags & AVAIL_F_NO_INTERRUPT
        new, old = self.next_used, self.signalled_used
        self.signalled_used = new
        used_event: int = _U16.unpack_from(self.avail, 4 + 2 * self.size)[0]
        # vring_need_event: did the index pass used_event since the last interrupt?
        return bool((new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF)
