"""userfaultfd operations the lazy-pages server needs: read messages, COPY, ZEROPAGE, WAKE,
UNREGISTER, on a uffd that someone else created (CRIU's restorer, or the kernel for a fork event).

Interim implementation with ctypes ioctl() calls (ctypes releases the GIL around each call);
gfvm.native's C versions (csrc/, being built on the `native` branch) replace these once merged,
together with a GIL-free native fault loop (see /work/wt/_notes/criu-needs-native.md). The
functions keep the C layer's conventions: they return results, and report kernel errors as an
errno value rather than raising, because EEXIST/EAGAIN/ENOENT are ordinary outcomes on the hot path.

ABI (include/uapi/linux/userfaultfd.h): struct uffd_msg is 32 bytes: u8 event, 7 reserved bytes,
then a 24-byte union (pagefault: u64 flags, u64 address, u32 ptid; fork: u32 ufd; remap: u64 from,
to, len; remove/unmap: u64 start, end).

Every function blocks only for its syscall.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1

UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_API = 0xC018AA3F
UFFD_API = 0xAA
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0

MSG_SIZE = 32
_MSG = struct.Struct("<B7xQQQ")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zero(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


assert ctypes.sizeof(_Copy) == 40 and ctypes.sizeof(_Zero) == 32 and ctypes.sizeof(_Register) == 32


@dataclass(frozen=True)
class UffdMsg:
    """One message read from a uffd. Field meaning depends on `event`: PAGEFAULT uses
    (flags, address); FORK uses ufd; REMAP uses (src, dst, length); REMOVE/UNMAP use (start, end)."""

    event: int
    a: int
    b: int
    c: int

    @property
    def address(self) -> int:
        return self.b

    @property
    def flags(self) -> int:
        return self.a

    @property
    def ufd(self) -> int:
        return self.a & 0xFFFFFFFF

    @property
    def start(self) -> int:
        return self.a

    @property
    def end(self) -> int:
        return self.b


def read_msgs(fd: int, max_msgs: int = 64) -> list[UffdMsg]:
    """Every message ready on the (non-blocking) uffd `fd`, up to max_msgs; [] when none."""
    try:
        data = os.read(fd, MSG_SIZE * max_msgs)
    except BlockingIOError:
        return []
    if len(data) % MSG_SIZE:
        raise OSError(errno.EIO, f"short userfaultfd message ({len(data)} bytes)")
    return [UffdMsg(*_MSG.unpack_from(data, off)) for off in range(0, len(data), MSG_SIZE)]


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """0, or the errno of a failed ioctl."""
    if _libc.ioctl(fd, request, ctypes.byref(arg)) == 0:
        return 0
    return ctypes.get_errno()


def copy(fd: int, dst: int, src_addr: int, length: int, mode: int = 0) -> tuple[int, int]:
    """UFFDIO_COPY of `length` bytes from our address `src_addr` to `dst` in the uffd's mm.
    Returns (errno or 0, bytes copied); a partial copy reports its error with the bytes done."""
    arg = _Copy(dst, src_addr, length, mode, 0)
    err = _ioctl(fd, UFFDIO_COPY, arg)
    done = arg.copy if arg.copy > 0 else 0
    return err, (length if err == 0 else done)


def zeropage(fd: int, start: int, length: int, mode: int = 0) -> tuple[int, int]:
    """UFFDIO_ZEROPAGE; returns (errno or 0, bytes zero-filled)."""
    arg = _Zero(_Range(start, length), mode, 0)
    err = _ioctl(fd, UFFDIO_ZEROPAGE, arg)
    done = arg.zeropage if arg.zeropage > 0 else 0
    return err, (length if err == 0 else done)


def wake(fd: int, start: int, length: int) -> int:
    """UFFDIO_WAKE: wakes threads blocked on faults in [start, start+length); errno or 0."""
    return _ioctl(fd, UFFDIO_WAKE, _Range(start, length))


def unregister(fd: int, start: int, length: int) -> int:
    """UFFDIO_UNREGISTER of [start, start+length); errno or 0."""
    return _ioctl(fd, UFFDIO_UNREGISTER, _Range(start, length))


def register_missing(fd: int, start: int, length: int) -> int:
    """UFFDIO_REGISTER in MISSING mode (used by tests that build their own uffd); errno or 0."""
    return _ioctl(fd, UFFDIO_REGISTER, _Register(_Range(start, length), UFFDIO_REGISTER_MODE_MISSING, 0))


def new_uffd(features: int = 0) -> int:
    """A new non-blocking userfaultfd for this process with UFFDIO_API done (tests)."""
    fd = _libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)  # __NR_userfaultfd on x86-64
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    api = _Api(UFFD_API, features, 0)
    err = _ioctl(fd, UFFDIO_API, api)
    if err:
        os.close(fd)
        raise OSError(err, f"UFFDIO_API: {os.strerror(err)}")
    return fd
