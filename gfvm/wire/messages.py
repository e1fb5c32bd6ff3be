"""Message definitions: frozen dataclasses with a registered type code and typed fields.

Define a message with one of three decorators, which say how it takes part in request/response:
- `@oneway(code)`: a message that expects no answer; its `rid` is always 0;
- `@request(code)`: expects exactly one response; the channel gives it a fresh `rid` (!= 0);
- `@response(code)`: answers one request; its `rid` must echo that request's `rid`.
`ErrorReply` is a built-in response any request may get instead of its normal one.

    @request(0x1001)
    class WritePages:
        file: RelPath
        epoch: U64
        offset: U64
        npages: U32
        data: Bytes(1 << 20)

        def validate(self) -> None:  # optional cross-field checks; raise ValueError
            check_page_span(self.offset, self.npages)
            if len(self.data) != self.npages * PAGE_SIZE:
                raise ValueError("data is not npages pages long")

    @response(0x1002)
    class WriteDone:
        seq: U64

Every message class gets a keyword-only field `rid: int = 0` (the request id, carried in the frame
header) and `with_rid(rid)`; `rid`, `with_rid` and `validate` are reserved names. Construction
checks every field (type, range, length, validators) and then `validate()`; an invalid value raises
LocalProtocolError. Decoding builds messages through the same constructor, so a peer can never
hand us a message we could not have built ourselves.

`@record` defines a nested structure (no code, no rid) usable as a field type, e.g.
`List(Extent, 1024)`.

Type codes: 0x0001-0x00FF belong to gfvm.wire itself; applications use 0x0100-0xEFFF
(convention: the File Manager 0x1000-0x1FFF, migration 0x2000-0x2FFF); 0xF000-0xFFFF are for
tests and benchmarks. A code is registered once
per process; define messages at module level (annotations are resolved in the module's globals).
The repr of a message never shows Bytes contents (they are process memory): `<N bytes>`.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from gfvm.wire.errors import LocalProtocolError, RemoteProtocolError
from gfvm.wire.fields import (
    U16,
    U32,
    U64,
    DecodeError,
    NodeName,
    Reader,
    Text,
    UInt,
    WireType,
    Writer,
    wire_type_of,
)

RESERVED_CODES = range(0x0001, 0x0100)
USER_CODES = range(0x0100, 0x10000)
_RESERVED_NAMES = ("rid", "with_rid")
_RID = UInt(8)


class Kind(enum.Enum):
    """How a message takes part in request/response (see the module docstring)."""

    ONEWAY = "oneway"
    REQUEST = "request"
    RESPONSE = "response"
    HANDSHAKE = "handshake"  # HELLO, HELLO_ACK, HELLO_REJECT: gfvm.wire's own


@dataclasses.dataclass(frozen=True)
class MessageSpec:
    """What the registry knows about one message class."""

    cls: type
    code: int
    kind: Kind
    names: tuple[str, ...]  # body fields in wire order (rid excluded: it is in the header)
    types: tuple[WireType, ...]


_REGISTRY: dict[int, MessageSpec] = {}


def spec_of(cls_or_msg: Any) -> MessageSpec:
    """The MessageSpec of a message class or instance; raises LocalProtocolError otherwise."""
    spec = getattr(cls_or_msg, "__wire__", None)
    if not isinstance(spec, MessageSpec):
        raise LocalProtocolError(f"{cls_or_msg!r} is not a wire message")
    return spec


def lookup(code: int) -> MessageSpec | None:
    """The spec registered for type `code`, or None."""
    return _REGISTRY.get(code)


def registered_codes() -> dict[int, type]:
    """Every registered type code and its class (for tests and docs)."""
    return {code: spec.cls for code, spec in _REGISTRY.items()}


def oneway(code: int):
    """Class decorator: a message that expects no answer (rid always 0)."""
    return lambda cls: _define(cls, code, Kind.ONEWAY)


def request(code: int):
    """Class decorator: a message answered by exactly one response carrying the same rid."""
    return lambda cls: _define(cls, code, Kind.REQUEST)


def response(code: int):
    """Class decorator: the answer to a request; construct it with `rid=the_request.rid`."""
    return lambda cls: _define(cls, code, Kind.RESPONSE)


def record(cls):
    """Class decorator: a frozen structure usable as a field type (no type code, no rid)."""
    _check_class(cls)
    new = _dataclass(cls, with_rid=False)
    names, types = _field_types(new, cls)
    new.__wire_record__ = _RecordType(new, names, types)
    return new


# --- building classes ---------------------------------------------------------------------------


def _check_class(cls: type) -> None:
    if "__post_init__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: put checks in validate(self), not __post_init__")
    for name in _RESERVED_NAMES:
        if name in cls.__dict__.get("__annotations__", {}) or name in cls.__dict__:
            raise TypeError(f"{cls.__name__}: {name!r} is reserved by gfvm.wire")


def _define(cls: type, code: int, kind: Kind) -> type:
    _check_class(cls)
    allowed = RESERVED_CODES if kind is Kind.HANDSHAKE or cls.__module__ == __name__ else USER_CODES
    if code not in allowed:
        raise TypeError(
            f"{cls.__name__}: type code {code:#06x} is outside "
            f"{allowed.start:#06x}-{allowed.stop - 1:#06x}"
        )
    if code in _REGISTRY:
        raise TypeError(
            f"{cls.__name__}: type code {code:#06x} is already {_REGISTRY[code].cls.__name__}"
        )
    new = _dataclass(cls, with_rid=True)
    names, types = _field_types(new, cls)
    spec = MessageSpec(new, code, kind, names, types)
    new.__wire__ = spec
    _REGISTRY[code] = spec
    return new


def _dataclass(cls: type, *, with_rid: bool) -> type:
    if with_rid:
        cls.__annotations__ = {**cls.__dict__.get("__annotations__", {}), "rid": "int"}
        cls.rid = dataclasses.field(default=0, kw_only=True)
        cls.with_rid = _with_rid
    cls.__post_init__ = _post_init
    cls.__repr__ = _repr
    return dataclasses.dataclass(frozen=True, slots=True, repr=False)(cls)


def _field_types(new: type, original: type) -> tuple[tuple[str, ...], tuple[WireType, ...]]:
    try:
        hints = typing.get_type_hints(original, include_extras=True)
    except NameError as exc:
        raise TypeError(
            f"{original.__name__}: cannot resolve a field annotation ({exc}); "
            "define messages at module level"
        ) from None
    names, types = [], []
    for f in dataclasses.fields(new):
        if f.name == "rid":
            continue
        try:
            types.append(wire_type_of(hints[f.name]))
        except TypeError as exc:
            raise TypeError(f"{original.__name__}.{f.name}: {exc}") from None
        names.append(f.name)
    return tuple(names), tuple(types)


def _fields_of(obj: Any) -> tuple[str, tuple[str, ...], tuple[WireType, ...]]:
    spec = getattr(type(obj), "__wire__", None)
    if spec is not None:
        return spec.cls.__name__, spec.names, spec.types
    rec = type(obj).__wire_record__
    return rec.cls.__name__, rec.names, rec.types


def _post_init(self) -> None:
    cls_name, names, types = _fields_of(self)
    for name, wt in zip(names, types, strict=True):
        try:
            value = wt.check(getattr(self, name))
        except ValueError as exc:
            raise LocalProtocolError(f"{cls_name}.{name}: {exc}") from None
        object.__setattr__(self, name, value)
    spec = getattr(type(self), "__wire__", None)
    if spec is not None:
        _check_rid(spec, self.rid)
    validate = getattr(self, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise LocalProtocolError(f"{cls_name}: {exc}") from None


def _check_rid(spec: MessageSpec, rid: Any) -> None:
    try:
        _RID.check(rid)
    except ValueError as exc:
        raise LocalProtocolError(f"{spec.cls.__name__}.rid: {exc}") from None
    if spec.kind in (Kind.ONEWAY, Kind.HANDSHAKE) and rid != 0:
        raise LocalProtocolError(f"{spec.cls.__name__} is {spec.kind.value}: its rid must be 0")
    if spec.kind is Kind.RESPONSE and rid == 0:
        raise LocalProtocolError(f"{spec.cls.__name__} is a response: set rid=<the request's rid>")


def _with_rid(self, rid: int):
    """A copy of this message with request id `rid` (no re-validation of the other fields)."""
    spec = type(self).__wire__
    _check_rid(spec, rid)
    new = object.__new__(type(self))
    for name in spec.names:
        object.__setattr__(new, name, getattr(self, name))
    object.__setattr__(new, "rid", rid)
    return new


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, tuple):
        items = [_short(v) for v in value[:8]]
        if len(value) > 8:
            items.append(f"...+{len(value) - 8}")
        return "[" + ", ".join(items) + "]"
    return repr(value)


def _repr(self) -> str:
    cls_name, names, _ = _fields_of(self)
    parts = [f"{n}={_short(getattr(self, n))}" for n in names]
    if hasattr(type(self), "__wire__"):
        parts.append(f"rid={self.rid}")
    return f"{cls_name}({', '.join(parts)})"


class _RecordType(WireType):
    """A @record class used as a field: its fields in order."""

    def __init__(self, cls: type, names: tuple[str, ...], types: tuple[WireType, ...]) -> None:
        self.cls, self.names, self.types = cls, names, types

    def check(self, value: Any) -> Any:
        if type(value) is not self.cls:
            raise ValueError(f"expected a {self.cls.__name__}, got {type(value).__name__}")
        return value  # already checked when it was constructed

    def encode(self, value: Any, out: Writer) -> None:
        for name, wt in zip(self.names, self.types, strict=True):
            wt.encode(getattr(value, name), out)

    def decode(self, inp: Reader) -> Any:
        values = {name: wt.decode(inp) for name, wt in zip(self.names, self.types, strict=True)}
        return self.cls(**values)

    def describe(self) -> str:
        return self.cls.__name__


# --- encoding and decoding bodies ---------------------------------------------------------------


def encode_body(msg: Any) -> tuple[MessageSpec, Writer]:
    """The spec of `msg` and its encoded body. Never blocks."""
    spec = spec_of(msg)
    out = Writer()
    for name, wt in zip(spec.names, spec.types, strict=True):
        wt.encode(getattr(msg, name), out)
    return spec, out


def decode_body(spec: MessageSpec, rid: int, body: memoryview) -> Any:
    """The message of type `spec` encoded in `body`; RemoteProtocolError if it is not one.

    `body` must be read-only: decoded Bytes fields are views into it. Never blocks.
    """
    name = spec.cls.__name__
    inp = Reader(body)
    try:
        values = {n: wt.decode(inp) for n, wt in zip(spec.names, spec.types, strict=True)}
    except DecodeError as exc:
        raise RemoteProtocolError(f"malformed {name}: {exc}") from None
    except LocalProtocolError as exc:  # a nested record failed its own checks
        raise RemoteProtocolError(f"invalid {name}: {exc}") from None
    if inp.pos != len(body):
        raise RemoteProtocolError(
            f"{name} frame length {len(body)} does not match its content ({inp.pos} bytes): "
            f"{len(body) - inp.pos} trailing bytes"
        )
    try:
        return spec.cls(**values, rid=rid)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {name}: {exc}") from None


# --- gfvm.wire's own messages -------------------------------------------------------------------


def _handshake(code: int):
    return lambda cls: _define(cls, code, Kind.HANDSHAKE)


@_handshake(0x0001)
class Hello:
    """Client -> server, first frame: who I am and which protocol versions I speak."""

    min_version: U16
    max_version: U16
    cluster: NodeName
    node: NodeName
    incarnation: U64  # changes every time the node's daemon starts

    def validate(self) -> None:
        if self.min_version > self.max_version or self.min_version == 0:
            raise ValueError(f"bad version range {self.min_version}-{self.max_version}")


@_handshake(0x0002)
class HelloAck:
    """Server -> client: accepted; the version both will speak, and who the server is."""

    version: U16
    cluster: NodeName
    node: NodeName
    incarnation: U64


@_handshake(0x0003)
class HelloReject:
    """Server -> client: refused, and why; the server closes the connection after it."""

    reason: Text


@response(0x0010)
class ErrorReply:
    """A response any request may get instead of its normal one: an errno and a sentence."""

    errno: U32
    message: Text
