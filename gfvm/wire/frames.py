"""The frame layout: a fixed 20-byte header, then the message body.

    offset size field
    0      4    magic    b"GFVW"  (a peer that does not speak this protocol fails at byte 0)
    4      1    version  FRAME_VERSION: the layout of this header; any other value is refused
    5      1    flags    reserved, must be 0 (so a later use cannot be misread by old nodes)
    6      2    type     message type code (u16), see gfvm.wire.messages
    8      8    rid      request id (u64): 0 for one-way frames, echoed by responses
    16     4    length   body length in bytes (u32), checked against the cap *before* reading it
    all integers little-endian

Two version numbers exist on purpose: FRAME_VERSION changes only if this header changes (a
breaking change, detected on the first frame); the protocol version (PROTOCOL_MIN..MAX) names the
set of messages and is negotiated in HELLO, so nodes of adjacent releases can still talk.

No checksum in the frame: every byte travels inside TLS 1.3, whose AEAD already rejects any
modified, truncated or replayed record (a corrupted packet breaks the connection, which the File
Manager treats as a lost link). What TLS cannot see - bits rotting on a disk or in a buffer before
sending - is covered end to end by the per-page checksums the File Manager stores and verifies
(RELIABILITY.md promise 5); a frame CRC would add CPU per MiB and protect nothing more.
"""

from __future__ import annotations

import struct

from gfvm.wire.errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"GFVW"
FRAME_VERSION = 1
HEADER = struct.Struct("<4sBBHQI")
HEADER_SIZE = HEADER.size  # 20

#: versions of the message set this build speaks (negotiated in HELLO)
PROTOCOL_MIN = 1
PROTOCOL_MAX = 1

#: default cap on one frame's body: 1 MiB of page data plus headers, with room to spare
DEFAULT_MAX_FRAME = 4 << 20
#: cap on any frame before the handshake completes (a HELLO is < 100 bytes)
HANDSHAKE_MAX_FRAME = 1024
#: no configuration may raise the cap above this (lengths stay far from 2^31)
MAX_FRAME_LIMIT = 1 << 30


def parse_header(raw: bytes | bytearray | memoryview, max_length: int) -> tuple[int, int, int]:
    """(type, rid, length) of a 20-byte header; RemoteProtocolError if it is not valid here."""
    magic, version, flags, code, rid, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise RemoteProtocolError(
            f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a gfvm peer"
        )
    if version != FRAME_VERSION:
        raise RemoteProtocolError(
            f"unsupported frame version {version} (this node speaks {FRAME_VERSION})"
        )
    if flags != 0:
        raise RemoteProtocolError(f"reserved flags {flags:#04x} set")
    if length > max_length:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds the cap of {max_length}")
    return code, rid, length


def build_frame(
    code: int, rid: int, parts: list[bytes | memoryview], length: int, max_length: int
) -> list[bytes | memoryview]:
    """Header + body parts, ready to write in order; LocalProtocolError if the body is too big."""
    if length > max_length:
        raise LocalProtocolError(f"message of {length} bytes exceeds the frame cap of {max_length}")
    header = HEADER.pack(MAGIC, FRAME_VERSION, 0, code, rid, length)
    if parts and isinstance(parts[0], bytes) and len(parts[0]) < 65536:
        return [header + parts[0], *parts[1:]]  # small first part: one buffer instead of two
    return [header, *parts]
