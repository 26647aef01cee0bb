"""Parse a protobuf message whose `string` fields may hold invalid UTF-8, instead of failing.

Python protobuf (upb and pure alike, with no option to relax it) refuses a whole message when
one proto3 `string` field is not UTF-8. Envoy replaces invalid bytes in the access-log fields
it fills itself (headers, path, user agent become "!"), but not in the values of dynamic
metadata: the edge's request-fields Lua copies the body's `model` into a Struct string as it
came, so `{"model": "x\\xff"}` made the whole StreamAccessLogsMessage, and with it the batch
and the stream, unreadable (measured on Envoy 1.40).

`parse_lenient` parses as usual and, only when that fails, rewrites the wire: walking the
message by its descriptor, each length-delimited field that is a `string` gets its invalid
bytes replaced with U+FFFD, each sub-message is walked in turn, everything else is copied
byte for byte. It says which strings it repaired, by path, so a caller can count entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)

FieldPath = tuple[tuple[int, int], ...]
"""Where a repaired string is: (field number, occurrence among that field's values) per level,
outermost first."""

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def parse_lenient(message_class: type[M], data: bytes) -> tuple[M, tuple[FieldPath, ...]]:
    """The message, and the paths of the strings whose invalid UTF-8 was replaced (none when
    it parsed as it was). DecodeError when the wire itself is malformed."""
    try:
        return message_class.FromString(data), ()
    except DecodeError:
        repaired: list[FieldPath] = []
        fixed = _repair(memoryview(data), message_class.DESCRIPTOR, (), repaired)
        return message_class.FromString(fixed), tuple(repaired)


def _repair(data: memoryview, descriptor: Descriptor, path: FieldPath,
            repaired: list[FieldPath]) -> bytes:
    out = bytearray()
    seen: dict[int, int] = {}
    for number, wire_type, start, tag_end, value_start, end in _fields(data):
        field = descriptor.fields_by_number.get(number)
        occurrence = seen[number] = seen.get(number, -1) + 1
        if wire_type != _LENGTH_DELIMITED or field is None:
            out += data[start:end]
            continue
        value = data[value_start:end]
        here = (*path, (number, occurrence))
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                bytes(value).decode("utf-8")
                fixed = bytes(value)
            except UnicodeDecodeError:
                fixed = bytes(value).decode("utf-8", "replace").encode("utf-8")
                repaired.append(here)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            fixed = _repair(value, field.message_type, here, repaired)
        else:
            out += data[start:end]
            continue
        out += data[start:tag_end]
        out += _encode_varint(len(fixed)) + fixed
    return bytes(out)


def _fields(data: memoryview) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(field number, wire type, start of its tag, end of its tag, start of its value, end)
    per field; a length-delimited value starts after its length."""
    position = 0
    while position < len(data):
        start = position
        tag, position = _read_varint(data, position)
        tag_end = position
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            _, end = _read_varint(data, position)
        elif wire_type == _FIXED64:
            end = position + 8
        elif wire_type == _FIXED32:
            end = position + 4
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(data, position)
            end = position + length
        else:
            raise DecodeError(f"wire type {wire_type} (field {number}) is not supported")
        if number == 0 or end > len(data):
            raise DecodeError(f"truncated or invalid field {number} at byte {start}")
        yield number, wire_type, start, tag_end, position, end
        position = end


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise DecodeError(f"truncated varint at byte {position}")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Received(Generic[M]):
    """One gRPC request message as `lenient_deserializer` read it."""

    message: M | None
    """None when even the repaired wire did not parse."""
    repaired: tuple[FieldPath, ...] = ()


def lenient_deserializer(message_class: type[M]) -> Callable[[bytes], Received[M]]:
    """A grpc request_deserializer that never raises: a raising one ends the whole stream."""

    def deserialize(data: bytes) -> Received[M]:
        try:
            return Received(*parse_lenient(message_class, data))
        except DecodeError:
            return Received(None)

    return deserialize


def register_lenient(server: grpc.aio.Server, service: str, method: str, behaviour: Any,
                     request_class: type[Message], response_class: type[Message], *,
                     stream_response: bool) -> None:
    """Serve one client-streaming method as the generated add_*Servicer_to_server would, but
    with `lenient_deserializer`, so invalid UTF-8 does not end the stream."""
    make = (grpc.stream_stream_rpc_method_handler if stream_response
            else grpc.stream_unary_rpc_method_handler)
    handler = make(behaviour, request_deserializer=lenient_deserializer(request_class),
                   response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))


def repaired_parts(repaired: tuple[FieldPath, ...]) -> int:
    """How many top-level repeated values (e.g. access-log entries) the repairs touched."""
    return len({path[:2] for path in repaired})
