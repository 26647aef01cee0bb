"""ext_proc's latency on a line of the edge's durable request log, as each Envoy config wrote it."""

from __future__ import annotations

import json

import pytest

from control_plane.telemetry.client_request import record_from_edge_entry
from control_plane.telemetry.edge_file import entry_from_line
from control_plane.translate.durable_log import EDGE_FILE_FIELDS


def ext_proc_us(**latency: object) -> int:
    fields = {"request_id": "r-1", "log_type": "DownstreamEnd", "start_us": "1796137749087170",
              "status": 200, "cluster": "lambda", **latency}
    record = record_from_edge_entry(entry_from_line(json.dumps(fields)))
    assert record is not None and record.request_id == "r-1"
    return record.ext_proc_us


def test_the_line_reads_ext_procs_latency_by_field_not_its_whole_state() -> None:
    assert EDGE_FILE_FIELDS["ext_proc_us"] == (
        "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)%")
    assert not any("TYPED" in value for value in EDGE_FILE_FIELDS.values())


@pytest.mark.parametrize(("latency", "expected"), [
    ({"ext_proc_us": "8529"}, 8529),  # Envoy renders the field as text
    ({"ext_proc_us": 8529}, 8529),
    ({"ext_proc": {"request_header_latency_us": 800, "bytes_sent": 90}}, 800),  # older lines
    ({"ext_proc_us": None}, 0),  # ext_proc did not answer
    ({}, 0),
    ({"ext_proc_us": "-"}, 0),  # costs the latency, not the line
    ({"ext_proc_us": "nan"}, 0),
    ({"ext_proc_us": "inf"}, 0),
    ({"ext_proc_us": "1e400"}, 0),
    ({"ext_proc_us": "-5"}, 0),
    ({"ext_proc_us": [1]}, 0),
])
def test_ext_procs_latency_from_either_form_and_none(latency: dict[str, object],
                                                     expected: int) -> None:
    assert ext_proc_us(**latency) == expected
