"""Message definitions: construction checks, deterministic encoding, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_wire_samples import (
    AllTypes,
    Empty,
    Extent,
    Note,
    PutDone,
    PutPages,
    all_types,
    sample_messages,
)

from gfvm import wire
from gfvm.wire import LocalProtocolError, RemoteProtocolError
from gfvm.wire.messages import (
    ErrorReply,
    Hello,
    HelloAck,
    HelloReject,
    decode_body,
    encode_body,
    registered_codes,
    spec_of,
)
from gfvm.wire.testing import message_strategy


def roundtrip(msg):
    spec, out = encode_body(msg)
    body = b"".join(out.finish())
    assert len(body) == out.size
    return decode_body(spec, msg.rid, memoryview(body).toreadonly()), body


BUILTINS = [
    Hello(1, 3, "c1", "n1", 99),
    HelloAck(2, "c1", "n2", 5),
    HelloReject("no common protocol version"),
    ErrorReply(5, "I/O error on replica", rid=3),
]


@pytest.mark.parametrize("msg", sample_messages() + BUILTINS + [PutDone(1, rid=1)], ids=repr)
def test_every_message_round_trips(msg):
    back, _ = roundtrip(msg)
    assert back == msg
    assert type(back) is type(msg)


def test_every_registered_class_is_covered_by_the_round_trip_test():
    covered = {type(m) for m in sample_messages() + BUILTINS} | {PutDone}
    ours = {cls for code, cls in registered_codes().items() if code < 0x100 or code >= 0xF000}
    from test_wire_samples import Blob, Pong

    assert ours - covered == {Pong, Blob}
    for msg in (Pong(rid=4), Blob(bytes(range(256)) * 4096)):
        assert roundtrip(msg)[0] == msg


@given(message_strategy(AllTypes))
def test_all_field_types_round_trip(msg):
    back, body = roundtrip(msg)
    assert back == msg
    assert roundtrip(back)[1] == body  # deterministic: re-encoding gives the same bytes


@given(message_strategy(Hello, min_version=st.just(1)))
def test_hello_round_trips(msg):
    assert roundtrip(msg)[0] == msg


def test_encoding_is_deterministic_and_little_endian():
    _, out = encode_body(PutDone(0x0102030405060708, rid=1))
    assert b"".join(out.finish()) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert roundtrip(all_types())[1] == roundtrip(all_types())[1]


def test_decoded_bytes_are_readonly_views_of_the_frame():
    msg = PutPages("f", 1, 0, 1, bytes(4096), rid=1)
    back, _ = roundtrip(msg)
    assert isinstance(back.data, memoryview) and back.data.readonly
    assert back.data == bytes(4096)


def test_bulk_bytes_are_not_copied_when_encoding():
    data = bytes(1 << 20)
    _, out = encode_body(PutPages("f", 1, 0, 256, data, rid=1))
    parts = out.finish()
    assert any(p is data for p in parts)


def test_readonly_memoryview_is_kept_and_writable_buffer_copied():
    page = bytearray(4096)
    view = memoryview(bytes(4096))
    kept = PutPages("f", 1, 0, 1, view, rid=1)
    assert kept.data is view
    copied = PutPages("f", 1, 0, 1, page, rid=1)
    page[0] = 1
    assert copied.data[0] == 0  # the message did not change with the caller's buffer


def test_repr_never_shows_bytes_contents():
    text = repr(PutPages("f", 1, 0, 1, b"SECRET-CANARY" + bytes(4083), rid=1))
    assert "SECRET" not in text and "<4096 bytes>" in text


def test_rid_is_keyword_only_and_checked_by_kind():
    with pytest.raises(LocalProtocolError, match="response"):
        PutDone(1)  # a response must echo a rid
    with pytest.raises(LocalProtocolError, match="oneway"):
        Note("x", rid=3)
    with pytest.raises(TypeError):
        PutDone(1, 2)  # rid is keyword-only
    assert PutPages("f", 1, 0, 0, b"").with_rid(9).rid == 9


@pytest.mark.parametrize(
    "field,value",
    [
        ("a", 256),
        ("a", -1),
        ("b", 1 << 16),
        ("c", 1 << 32),
        ("d", 1 << 64),
        ("e", 1 << 63),
        ("a", True),
        ("a", 1.0),
        ("f", 1),
        ("g", b"x" * 101),
        ("g", "text"),
        ("h", "x" * 51),
        ("h", "\ud800"),
        ("i", "a/b"),
        ("i", ".."),
        ("i", "."),
        ("i", ""),
        ("i", "a\x00b"),
        ("i", "a\nb"),
        ("i", "a\x7f"),
        ("i", "x" * 256),
        ("j", [1] * 101),
        ("j", [-1]),
        ("j", 5),
        ("k", [(1, 2)]),
        ("m", -1),
        ("n", "../x"),
        ("o", "N1"),
        ("o", "n" * 32),
        ("p", ["a"] * 6),
        ("q", "/etc/passwd"),
        ("q", "a/../b"),
        ("q", "a//b"),
        ("q", "a/"),
    ],
)
def test_invalid_field_values_are_refused_at_construction(field, value):
    with pytest.raises(LocalProtocolError, match=f"AllTypes.{field}"):
        all_types(**{field: value})


def test_validate_catches_page_count_overflow_and_misalignment():
    with pytest.raises(LocalProtocolError, match="end past"):
        PutPages("f", 1, (1 << 63) - 4096, 2, bytes(8192))
    with pytest.raises(LocalProtocolError, match="multiple of 4096"):
        PutPages("f", 1, 100, 0, b"")
    with pytest.raises(LocalProtocolError, match="not 2 pages"):
        PutPages("f", 1, 0, 2, bytes(4096))


def test_decode_refuses_values_the_constructor_refuses():
    spec = spec_of(PutPages)
    _, out = encode_body(PutPages("f", 1, 0, 1, bytes(4096), rid=1))
    body = bytearray(b"".join(out.finish()))
    body[5 + 8 : 5 + 16] = (4095).to_bytes(8, "little")  # offset: unaligned
    with pytest.raises(RemoteProtocolError, match="multiple of 4096"):
        decode_body(spec, 1, memoryview(bytes(body)))


def test_text_validator_refuses_control_characters():
    with pytest.raises(LocalProtocolError):
        Note("line1\nline2")
    with pytest.raises(LocalProtocolError):
        Note("bell\x07")


def test_record_checks_its_fields():
    with pytest.raises(LocalProtocolError, match="Extent.count"):
        Extent(0, 1 << 32)


def test_empty_message_has_an_empty_body():
    back, body = roundtrip(Empty())
    assert body == b"" and back == Empty()


# --- definition errors are caught when the class is defined ---------------------------------------


def test_duplicate_type_code_is_refused():
    with pytest.raises(TypeError, match="already Note"):

        @wire.oneway(0xF001)
        class Again:
            x: wire.U8


def test_reserved_code_range_is_refused_for_applications():
    with pytest.raises(TypeError, match="outside"):

        @wire.oneway(0x0042)
        class Mine:
            x: wire.U8


def test_reserved_field_names_are_refused():
    with pytest.raises(TypeError, match="reserved"):

        @wire.oneway(0xFF01)
        class HasRid:
            rid: wire.U64


def test_post_init_is_refused_in_favour_of_validate():
    with pytest.raises(TypeError, match="validate"):

        @wire.oneway(0xFF02)
        class Hooked:
            x: wire.U8

            def __post_init__(self):
                pass


def test_non_wire_annotation_is_refused():
    with pytest.raises(TypeError, match="not a wire field type"):

        @wire.oneway(0xFF03)
        class Plain:
            x: int


def test_messages_are_frozen():
    msg = Note("x")
    with pytest.raises(AttributeError):
        msg.text = "y"
