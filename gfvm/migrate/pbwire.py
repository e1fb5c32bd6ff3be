"""A small, strict decoder of the protobuf wire format, for the few CRIU image messages gfvm reads.

gfvm does not depend on a protobuf library: the messages it needs (pagemap entries, inventory,
pstree, mm/VMAs, dump statistics) are described here by hand as `Schema`s, field number by field
number, from CRIU's `images/*.proto` (proto2).

Strictness (every violation raises `WireError` saying what and at which byte offset):
  - truncated varints/lengths/fixed fields, varints above 2**64 - 1 (or longer than 10 bytes);
  - wire types 3/4 (groups) and 6/7 (undefined), field number 0;
  - a known field sent with a wire type its kind cannot have;
  - values out of range for their kind (uint32 >= 2**32, bool other than 0/1, bad UTF-8);
  - a non-repeated field that appears twice (CRIU never writes that; "last one wins" would hide
    corruption);
  - a required field that is missing.
Unknown fields with a valid wire type are skipped: newer CRIU versions add optional fields.

Pure functions on bytes; nothing here blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

__all__ = ["WireError", "F", "Schema", "decode", "read_varint"]

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

_VARINT_KINDS = {"uint32", "uint64", "int32", "int64", "sint32", "sint64", "bool", "enum"}
_LENGTH_KINDS = {"string", "bytes"}


class WireError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


@dataclass(frozen=True)
class F:
    """One field of a message: its number, name, kind and label.

    kind is one of uint32, uint64, int32, int64, sint32, sint64, bool, enum, string, bytes,
    fixed32, fixed64, or a nested `Schema`.
    """

    number: int
    name: str
    kind: Union[str, "Schema"]
    label: str = "optional"  # "required", "optional" or "repeated"

    def __post_init__(self) -> None:
        if self.label not in ("required", "optional", "repeated"):
            raise ValueError(f"field {self.name}: bad label {self.label!r}")
        if isinstance(self.kind, str) and self.kind not in (
            _VARINT_KINDS | _LENGTH_KINDS | {"fixed32", "fixed64"}
        ):
            raise ValueError(f"field {self.name}: unknown kind {self.kind!r}")


class Schema:
    """A message type: a name (for error messages) and its fields."""

    def __init__(self, name: str, *fields: F) -> None:
        self.name = name
        self.fields = fields
        self.by_number = {f.number: f for f in fields}
        if len(self.by_number) != len(fields):
            raise ValueError(f"{name}: duplicate field numbers")

    def __repr__(self) -> str:
        return f"Schema({self.name})"


def read_varint(data: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decodes the varint at `pos`; returns (value, position after it). Raises WireError."""
    if end is None:
        end = len(data)
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at byte {start}")
        byte = data[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise WireError(f"varint at byte {start} does not fit in 64 bits")
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7  # a 10th byte above 1 was refused above, so shift never passes 63


def _convert_varint(kind: str, raw: int, where: str) -> Any:
    if kind in ("uint64",):
        return raw
    if kind in ("uint32", "enum"):
        if raw >= 1 << 32:
            raise WireError(f"{where}: {raw} does not fit in {kind}")
        return raw
    if kind == "bool":
        if raw not in (0, 1):
            raise WireError(f"{where}: bool must be 0 or 1, not {raw}")
        return bool(raw)
    if kind in ("int32", "int64"):
        value = raw - (1 << 64) if raw >= 1 << 63 else raw
        if kind == "int32" and not -(1 << 31) <= value < 1 << 31:
            raise WireError(f"{where}: {value} does not fit in int32")
        return value
    if kind in ("sint32", "sint64"):
        value = (raw >> 1) ^ -(raw & 1)
        if kind == "sint32" and not -(1 << 31) <= value < 1 << 31:
            raise WireError(f"{where}: {value} does not fit in sint32")
        return value
    raise AssertionError(kind)


def decode(schema: Schema, data: bytes | memoryview, *, _base: int = 0) -> dict[str, Any]:
    """Decodes one message of type `schema` from all of `data`.

    Returns a dict with every field of the schema: absent optional fields are None, repeated
    fields are lists. Raises WireError on any malformed input (byte offsets are relative to the
    start of `data`, plus `_base` for nested messages).
    """
    data = memoryview(data)
    end = len(data)
    out: dict[str, Any] = {f.name: ([] if f.label == "repeated" else None) for f in schema.fields}
    seen: set[int] = set()
    pos = 0
    while pos < end:
        key_at = pos
        key, pos = read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        where = f"{schema.name} field {number} at byte {_base + key_at}"
        if number == 0:
            raise WireError(f"{schema.name}: field number 0 at byte {_base + key_at}")
        if wire == VARINT:
            raw, pos = read_varint(data, pos, end)
            payload: Any = raw
        elif wire == FIXED64:
            if pos + 8 > end:
                raise WireError(f"{where}: truncated 64-bit value")
            payload = int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == FIXED32:
            if pos + 4 > end:
                raise WireError(f"{where}: truncated 32-bit value")
            payload = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        elif wire == LENGTH:
            length, pos = read_varint(data, pos, end)
            if length > end - pos:
                raise WireError(f"{where}: length {length} runs past the end ({end - pos} bytes left)")
            payload = data[pos : pos + length]
            payload_at = pos
            pos += length
        else:
            raise WireError(f"{where}: unsupported wire type {wire}")

        field = schema.by_number.get(number)
        if field is None:
            continue  # an unknown field from a newer writer: skipped on purpose
        where = f"{schema.name}.{field.name} at byte {_base + key_at}"
        if field.label != "repeated":
            if number in seen:
                raise WireError(f"{where}: field appears twice")
            seen.add(number)
        values = _field_values(field, wire, payload, where, _base + (payload_at if wire == LENGTH else 0))
        if field.label == "repeated":
            out[field.name].extend(values)
        else:
            out[field.name] = values[0]

    for f in schema.fields:
        if f.label == "required" and f.number not in seen:
            raise WireError(f"{schema.name}: required field {f.name} is missing")
    return out


def _field_values(field: F, wire: int, payload: Any, where: str, payload_base: int) -> list[Any]:
    kind = field.kind
    if isinstance(kind, Schema):
        if wire != LENGTH:
            raise WireError(f"{where}: message field sent with wire type {wire}")
        return [decode(kind, payload, _base=payload_base)]
    if kind in _VARINT_KINDS:
        if wire == VARINT:
            return [_convert_varint(kind, payload, where)]
        if wire == LENGTH and field.label == "repeated":  # packed repeated scalars
            values, pos, raw_bytes = [], 0, payload
            while pos < len(raw_bytes):
                raw, pos = read_varint(raw_bytes, pos)
                values.append(_convert_varint(kind, raw, where))
            return values
        raise WireError(f"{where}: {kind} field sent with wire type {wire}")
    if kind in _LENGTH_KINDS:
        if wire != LENGTH:
            raise WireError(f"{where}: {kind} field sent with wire type {wire}")
        if kind == "bytes":
            return [bytes(payload)]
        try:
            return [bytes(payload).decode("utf-8")]
        except UnicodeDecodeError:
            raise WireError(f"{where}: string is not valid UTF-8") from None
    if kind in ("fixed32", "fixed64"):
        want = FIXED32 if kind == "fixed32" else FIXED64
        if wire != want:
            raise WireError(f"{where}: {kind} field sent with wire type {wire}")
        return [payload]
    raise AssertionError(kind)
