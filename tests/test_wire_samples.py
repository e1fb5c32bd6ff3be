"""Sample messages used by the wire tests (type codes 0xF000-0xFFFF are reserved for tests),
and raw-frame helpers for feeding hand-made bytes to a connection."""

from __future__ import annotations

import struct

from gfvm import wire
from gfvm.wire import (
    I64,
    PAGE_SIZE,
    U8,
    U16,
    U32,
    U64,
    Bool,
    Bytes,
    List,
    Name,
    NodeName,
    Optional,
    RelPath,
    Str,
    Text,
    check_page_span,
)
from gfvm.wire.frames import FRAME_VERSION, HEADER, MAGIC
from gfvm.wire.messages import registered_codes


@wire.record
class Extent:
    start: U64
    count: U32


@wire.oneway(0xF001)
class Note:
    text: Text


@wire.request(0xF002)
class PutPages:
    file: RelPath
    epoch: U64
    offset: U64
    npages: U32
    data: Bytes(1 << 20)

    def validate(self) -> None:
        check_page_span(self.offset, self.npages)
        if len(self.data) != self.npages * PAGE_SIZE:
            raise ValueError(f"data is {len(self.data)} bytes, not {self.npages} pages")


@wire.response(0xF003)
class PutDone:
    seq: U64


@wire.oneway(0xF004)
class AllTypes:
    a: U8
    b: U16
    c: U32
    d: U64
    e: I64
    f: Bool
    g: Bytes(100)
    h: Str(50)
    i: Name
    j: List(U64, 100)
    k: List(Extent, 10)
    m: Optional(U32)
    n: Optional(Name)
    o: NodeName
    p: List(Name, 5)
    q: RelPath


@wire.oneway(0xF005)
class Empty:
    pass


@wire.request(0xF006)
class Ping:
    pass


@wire.response(0xF007)
class Pong:
    pass


def all_types(**overrides) -> AllTypes:
    values = dict(
        a=255,
        b=65535,
        c=1 << 31,
        d=(1 << 64) - 1,
        e=-(1 << 63),
        f=True,
        g=b"\x00\xff" * 10,
        h="héllo",
        i="file.img",
        j=(1, 2, 3),
        k=(Extent(4096, 7),),
        m=None,
        n="x",
        o="n3",
        p=("a", "b"),
        q="procs/12/pages",
    )
    values.update(overrides)
    return AllTypes(**values)


def sample_messages() -> list:
    """One instance of every sample and built-in application message (rids set for a client)."""
    return [
        Note("hello"),
        PutPages("procs/1/pages", 7, 8192, 2, bytes(range(256)) * 32, rid=11),
        all_types(),
        all_types(m=5, n=None, j=(), k=(), p=(), g=b"", h=""),
        Empty(),
        Ping(rid=12),
    ]


def raw_frame(
    code: int,
    body: bytes = b"",
    *,
    rid: int = 0,
    magic: bytes = MAGIC,
    version: int = FRAME_VERSION,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built by hand (nothing validated), for hostile-input tests."""
    n = len(body) if length is None else length
    return HEADER.pack(magic, version, flags, code, rid, n) + body


def lp(data: bytes) -> bytes:
    """A u32 length prefix followed by data (how Bytes/Str/List counts are encoded)."""
    return struct.pack("<I", len(data)) + data


@wire.oneway(0xF008)
class Blob:
    data: Bytes(1 << 20)


def test_sample_codes_are_registered():
    codes = registered_codes()
    for cls in (Note, PutPages, PutDone, AllTypes, Empty, Ping, Pong, Blob):
        assert codes[wire.spec_of(cls).code] is cls
