"""Lenient parsing: invalid UTF-8 in a string field is replaced, everything else kept as sent."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf.message import DecodeError

from control_plane.telemetry.wire_utf8 import lenient_deserializer, parse_lenient, repaired_parts


def test_only_the_invalid_strings_are_replaced_and_their_paths_given() -> None:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.user_agent = "ua-MARK"
    entry.request.path = "/v1/chat"
    entry.request.request_body_bytes = 300
    entry.common_properties.metadata.filter_metadata["gpu_router"].update({"model": "m-MARK"})
    entry.common_properties.filter_state_objects["raw"].value = b"\xff\xfe"  # bytes: not a string
    wire = entry.SerializeToString().replace(b"-MARK", b"\xffMARK")
    with pytest.raises(DecodeError):
        accesslog_pb2.HTTPAccessLogEntry.FromString(wire)

    parsed, repaired = parse_lenient(accesslog_pb2.HTTPAccessLogEntry, wire)

    assert parsed.request.user_agent == "ua\ufffdMARK"
    assert parsed.common_properties.metadata.filter_metadata["gpu_router"]["model"] == "m\ufffdMARK"
    assert (parsed.request.path, parsed.request.request_body_bytes) == ("/v1/chat", 300)
    assert parsed.common_properties.filter_state_objects["raw"].value == b"\xff\xfe"
    request = accesslog_pb2.HTTPAccessLogEntry.DESCRIPTOR.fields_by_name["request"].number
    user_agent = accesslog_pb2.HTTPRequestProperties.DESCRIPTOR.fields_by_name["user_agent"]
    assert len(repaired) == 2 and ((request, 0), (user_agent.number, 0)) in repaired
    assert repaired_parts(repaired) == 2
    assert parse_lenient(accesslog_pb2.HTTPAccessLogEntry, entry.SerializeToString())[1] == ()


def test_a_broken_wire_is_no_message_and_no_exception() -> None:
    deserialize = lenient_deserializer(accesslog_pb2.HTTPAccessLogEntry)

    assert deserialize(b"\x12\x05ab").message is None  # a length past the end
    assert deserialize(b"").message == accesslog_pb2.HTTPAccessLogEntry()
