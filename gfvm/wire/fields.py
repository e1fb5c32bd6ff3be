"""Field types of wire messages: how one value is checked, encoded and decoded.

Encoding (deterministic: one value has exactly one encoding):
- integers: fixed width, little-endian (U8 U16 U32 U64 unsigned, I64 two's complement);
- Bool: one byte, 0 or 1 (anything else is rejected);
- Bytes / Str: u32 length, then the bytes (Str: UTF-8, strict);
- List: u32 item count, then the items;
- Optional: one byte 0 (absent) or 1 (present, followed by the value);
- a record (see `gfvm.wire.messages.record`): its fields in order.

Every length is checked against the field's maximum *before* anything is sliced, so a hostile
length can never make the decoder allocate or read more than the frame already holds.

A field is declared with a type annotation: the ready aliases (`U64`, `Bool`, `Name`...) or the
factories (`Bytes(max_len)`, `Str(max_len, check=...)`, `List(item, max_items)`, `Optional(item)`).
They are `typing.Annotated` types, so `int`, `bytes`, `str`, `tuple` remain the Python types.

Values: Bytes accepts bytes, bytearray or memoryview. bytes and read-only memoryviews are kept as
they are (no copy: this is how 1 MiB of page data travels); writable buffers are copied at
construction, because a message is immutable and may be sent after the caller reuses its buffer.
Decoded Bytes are read-only memoryviews into the received frame (no copy). Lists become tuples.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Annotated, Any

from gfvm.config import NODE_NAME_RE

PAGE_SIZE = 4096
#: largest byte offset a file may reach: offsets travel as u64 but end up in a signed off_t
MAX_FILE_OFFSET = (1 << 63) - 1
#: longest file-name component (as Linux NAME_MAX)
NAME_MAX = 255
#: longest relative path
PATH_MAX = 4096

# A Bytes value at least this large is handed to the transport as its own buffer instead of
# being copied into the frame's small-field buffer.
BULK_MIN = 16 * 1024

_LEN = struct.Struct("<I")


class DecodeError(ValueError):
    """The bytes do not decode as the declared type (raised as RemoteProtocolError upstream)."""


class Reader:
    """A cursor over one frame body (a read-only memoryview)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise DecodeError(
                f"field needs {n} bytes at offset {self.pos}, body has {len(self.buf)}"
            )
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def unpack(self, st: struct.Struct) -> tuple:
        end = self.pos + st.size
        if end > len(self.buf):
            raise DecodeError(
                f"field needs {st.size} bytes at offset {self.pos}, body has {len(self.buf)}"
            )
        values = st.unpack_from(self.buf, self.pos)
        self.pos = end
        return values

    def length(self, maximum: int, what: str) -> int:
        (n,) = self.unpack(_LEN)
        if n > maximum:
            raise DecodeError(f"{what} length {n} exceeds its maximum {maximum}")
        return n


class Writer:
    """Collects an encoded body: small fields are packed together, bulk bytes stay separate."""

    __slots__ = ("parts", "small", "size")

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.small = bytearray()
        self.size = 0

    def put(self, data: bytes | bytearray | memoryview) -> None:
        self.small += data
        self.size += len(data)

    def put_bulk(self, data: bytes | memoryview) -> None:
        if len(data) < BULK_MIN:
            self.put(data)
            return
        if self.small:
            self.parts.append(bytes(self.small))
            self.small = bytearray()
        self.parts.append(data)
        self.size += len(data)

    def finish(self) -> list[bytes | memoryview]:
        if self.small:
            self.parts.append(bytes(self.small))
            self.small = bytearray()
        return self.parts


class WireType:
    """How one field is checked, encoded and decoded. Subclasses are the field kinds."""

    def check(self, value: Any) -> Any:
        """Returns the value to store (maybe normalized); raises ValueError when invalid."""
        raise NotImplementedError

    def encode(self, value: Any, out: Writer) -> None:
        raise NotImplementedError

    def decode(self, inp: Reader) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class UInt(WireType):
    """An unsigned integer of `size` bytes (1, 2, 4 or 8)."""

    _FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}

    def __init__(self, size: int) -> None:
        self.size = size
        self.max = (1 << (8 * size)) - 1
        self.code = self._FORMATS[size]
        self.struct = struct.Struct("<" + self.code)

    def check(self, value: Any) -> int:
        if type(value) is not int:  # bool is an int subclass: refuse it too
            raise ValueError(f"expected an int, got {type(value).__name__}")
        if not 0 <= value <= self.max:
            raise ValueError(f"{value} is outside 0..{self.max}")
        return value

    def encode(self, value: int, out: Writer) -> None:
        out.put(self.struct.pack(value))

    def decode(self, inp: Reader) -> int:
        return inp.unpack(self.struct)[0]

    def describe(self) -> str:
        return f"u{8 * self.size}"


class SInt64(WireType):
    """A signed 64-bit integer."""

    code = "q"
    size = 8
    struct = struct.Struct("<q")

    def check(self, value: Any) -> int:
        if type(value) is not int:
            raise ValueError(f"expected an int, got {type(value).__name__}")
        if not -(1 << 63) <= value < (1 << 63):
            raise ValueError(f"{value} does not fit in i64")
        return value

    def encode(self, value: int, out: Writer) -> None:
        out.put(self.struct.pack(value))

    def decode(self, inp: Reader) -> int:
        return inp.unpack(self.struct)[0]

    def describe(self) -> str:
        return "i64"


class BoolType(WireType):
    """True or False, one byte."""

    _B = struct.Struct("<B")

    def check(self, value: Any) -> bool:
        if type(value) is not bool:
            raise ValueError(f"expected a bool, got {type(value).__name__}")
        return value

    def encode(self, value: bool, out: Writer) -> None:
        out.put(b"\x01" if value else b"\x00")

    def decode(self, inp: Reader) -> bool:
        (b,) = inp.unpack(self._B)
        if b > 1:
            raise DecodeError(f"bool byte is {b}, must be 0 or 1")
        return b == 1

    def describe(self) -> str:
        return "bool"


class BytesType(WireType):
    """Opaque bytes of at most `max_len` bytes."""

    def __init__(self, max_len: int) -> None:
        if not 0 <= max_len < (1 << 31):
            raise ValueError(f"Bytes max_len {max_len} must be in 0..2^31-1")
        self.max_len = max_len

    def check(self, value: Any) -> bytes | memoryview:
        if isinstance(value, bytes):
            pass
        elif isinstance(value, memoryview):
            if not value.c_contiguous:
                raise ValueError("a memoryview field must be contiguous")
            if value.format != "B" or value.ndim != 1:
                value = value.cast("B")
            if not value.readonly:
                value = bytes(value)  # see the module docstring: writable buffers are copied
        elif isinstance(value, bytearray):
            value = bytes(value)
        else:
            raise ValueError(f"expected bytes, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise ValueError(f"{len(value)} bytes exceed the maximum {self.max_len}")
        return value

    def encode(self, value: bytes | memoryview, out: Writer) -> None:
        out.put(_LEN.pack(len(value)))
        out.put_bulk(value)

    def decode(self, inp: Reader) -> memoryview:
        return inp.take(inp.length(self.max_len, "bytes"))

    def describe(self) -> str:
        return f"bytes[<={self.max_len}]"


class StrType(WireType):
    """UTF-8 text of at most `max_len` encoded bytes, optionally checked by `check_fn`."""

    def __init__(self, max_len: int, check: Callable[[str], None] | None = None) -> None:
        if not 0 <= max_len < (1 << 31):
            raise ValueError(f"Str max_len {max_len} must be in 0..2^31-1")
        self.max_len = max_len
        self.check_fn = check

    def check(self, value: Any) -> str:
        if type(value) is not str:
            raise ValueError(f"expected a str, got {type(value).__name__}")
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("text is not encodable as UTF-8 (lone surrogate)") from None
        if n > self.max_len:
            raise ValueError(f"text of {n} bytes exceeds the maximum {self.max_len}")
        if self.check_fn is not None:
            self.check_fn(value)
        return value

    def encode(self, value: str, out: Writer) -> None:
        data = value.encode("utf-8")
        out.put(_LEN.pack(len(data)))
        out.put(data)

    def decode(self, inp: Reader) -> str:
        raw = inp.take(inp.length(self.max_len, "text"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"text is not valid UTF-8: {exc.reason}") from None

    def describe(self) -> str:
        extra = f", {self.check_fn.__name__}" if self.check_fn else ""
        return f"str[<={self.max_len}{extra}]"


class ListType(WireType):
    """At most `max_items` values of one type; a tuple in Python."""

    def __init__(self, item: WireType, max_items: int) -> None:
        if not 0 <= max_items < (1 << 31):
            raise ValueError(f"List max_items {max_items} must be in 0..2^31-1")
        self.item = item
        self.max_items = max_items
        # Lists of fixed-width integers (page numbers, offsets) are packed in one struct call.
        self._fixed = getattr(item, "code", None) if isinstance(item, (UInt, SInt64)) else None

    def check(self, value: Any) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list or tuple, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise ValueError(f"{len(value)} items exceed the maximum {self.max_items}")
        if self._fixed is not None and value and isinstance(self.item, UInt):
            # page offsets by the hundred: whole-list checks in C; the loop below only runs
            # to name the first bad item
            if all(type(v) is int for v in value) and min(value) >= 0 and max(value) <= self.item.max:
                return tuple(value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(self.item.check(v))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return tuple(out)

    def encode(self, value: tuple, out: Writer) -> None:
        out.put(_LEN.pack(len(value)))
        if self._fixed is not None:
            out.put(struct.pack(f"<{len(value)}{self._fixed}", *value))
            return
        for v in value:
            self.item.encode(v, out)

    def decode(self, inp: Reader) -> tuple:
        n = inp.length(self.max_items, "list")
        if self._fixed is not None:
            st = struct.Struct(f"<{n}{self._fixed}")
            return inp.unpack(st)
        return tuple(self.item.decode(inp) for _ in range(n))

    def describe(self) -> str:
        return f"list[{self.item.describe()}, <={self.max_items}]"


class OptionalType(WireType):
    """A value or None."""

    _B = struct.Struct("<B")

    def __init__(self, item: WireType) -> None:
        self.item = item

    def check(self, value: Any) -> Any:
        return None if value is None else self.item.check(value)

    def encode(self, value: Any, out: Writer) -> None:
        if value is None:
            out.put(b"\x00")
        else:
            out.put(b"\x01")
            self.item.encode(value, out)

    def decode(self, inp: Reader) -> Any:
        (tag,) = inp.unpack(self._B)
        if tag == 0:
            return None
        if tag != 1:
            raise DecodeError(f"optional tag is {tag}, must be 0 or 1")
        return self.item.decode(inp)

    def describe(self) -> str:
        return f"optional[{self.item.describe()}]"


# --- validators for Str fields: raise ValueError, say what is wrong -----------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def check_text(value: str) -> None:
    """Free text (error messages, reasons): no control characters, so it is safe to log."""
    m = _CONTROL.search(value)
    if m:
        raise ValueError(f"text contains control character {m.group()!r}")


def check_name(value: str) -> None:
    """One file-name component: not empty, not '.' or '..', no '/', no NUL or control character."""
    if not value:
        raise ValueError("name is empty")
    if value in (".", ".."):
        raise ValueError(f"name {value!r} is not allowed")
    if "/" in value:
        raise ValueError(f"name {value!r} contains '/'")
    m = _CONTROL.search(value)
    if m:
        raise ValueError(f"name {value!r} contains control character {m.group()!r}")
    if len(value.encode("utf-8")) > NAME_MAX:
        raise ValueError(f"name is longer than {NAME_MAX} bytes")


def check_relpath(value: str) -> None:
    """A relative path: components joined by single '/', each one a valid `check_name` name."""
    if value.startswith("/"):
        raise ValueError(f"path {value!r} is absolute")
    for part in value.split("/"):
        check_name(part)  # also refuses '', '.', '..' (so no '//', no escape)


def check_node_name(value: str) -> None:
    """A node or cluster name as cluster.toml allows it (also what node certificates carry)."""
    if not NODE_NAME_RE.match(value):
        raise ValueError(f"node name {value!r} must match {NODE_NAME_RE.pattern}")


def check_page_span(offset: int, npages: int, *, limit: int = MAX_FILE_OFFSET) -> None:
    """`npages` pages from byte `offset`: page-aligned, and the end fits in a file (`limit`).

    Catches offsets that are unaligned, negative, or would overflow an off_t once multiplied out.
    Use it in a message's `validate()`.
    """
    if offset < 0 or npages < 0:
        raise ValueError(f"negative offset {offset} or page count {npages}")
    if offset % PAGE_SIZE:
        raise ValueError(f"offset {offset} is not a multiple of {PAGE_SIZE}")
    if offset + npages * PAGE_SIZE > limit:
        raise ValueError(f"{npages} pages at offset {offset} end past {limit}")


# --- the annotations users write ----------------------------------------------------------------

U8 = Annotated[int, UInt(1)]
U16 = Annotated[int, UInt(2)]
U32 = Annotated[int, UInt(4)]
U64 = Annotated[int, UInt(8)]
I64 = Annotated[int, SInt64()]
Bool = Annotated[bool, BoolType()]


def Bytes(max_len: int) -> Any:  # noqa: N802 - reads like a type in annotations
    """Annotation for a bytes field of at most `max_len` bytes (decoded as a memoryview)."""
    return Annotated[bytes, BytesType(max_len)]


def Str(max_len: int, check: Callable[[str], None] | None = None) -> Any:  # noqa: N802
    """Annotation for a UTF-8 text field of at most `max_len` bytes, checked by `check` if given."""
    return Annotated[str, StrType(max_len, check)]


def List(item: Any, max_items: int) -> Any:  # noqa: N802
    """Annotation for a list of `item` (an annotation such as U64, or a record class)."""
    return Annotated[tuple, ListType(wire_type_of(item), max_items)]


def Optional(item: Any) -> Any:  # noqa: N802
    """Annotation for a value of `item`'s type, or None."""
    return Annotated[Any, OptionalType(wire_type_of(item))]


#: one file-name component; a relative path; a node or cluster name; free text (errors)
Name = Str(NAME_MAX, check_name)
RelPath = Str(PATH_MAX, check_relpath)
NodeName = Str(31, check_node_name)
Text = Str(1024, check_text)


def wire_type_of(annotation: Any) -> WireType:
    """The WireType an annotation declares; raises TypeError for anything else."""
    if isinstance(annotation, WireType):
        return annotation
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, WireType):
            return meta
    record = getattr(annotation, "__wire_record__", None)
    if record is not None:
        return record
    raise TypeError(
        f"{annotation!r} is not a wire field type: use U8/U16/U32/U64/I64/Bool, Bytes(n), Str(n), "
        "List(item, n), Optional(item), Name/RelPath/NodeName/Text, or a @record class"
    )
