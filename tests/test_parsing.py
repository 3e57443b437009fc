"""to_fields: the JSON view for ``syslog-archive cat --json``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from archive.json_view import to_fields
from tests.test_rfc5424 import EX1, EX3

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()
KEYS = {
    "format",
    "pri",
    "facility",
    "severity",
    "timestamp",
    "epoch",
    "hostname",
    "app_name",
    "procid",
    "msgid",
    "structured_data",
    "msg",
}


def fields(msg: bytes) -> dict[str, object]:
    out = to_fields(msg, UTC, NOW)
    assert json.loads(json.dumps(out)) == out  # JSON-serialisable, nothing lost
    assert KEYS <= out.keys() <= KEYS | {"error"}
    return out


def test_rfc5424_example_3() -> None:
    out = fields(EX3)
    assert out == {
        "format": "rfc5424",
        "pri": 165,
        "facility": 20,
        "severity": 5,
        "timestamp": "2003-10-11T22:14:15.003Z",
        "epoch": out["epoch"],
        "hostname": "mymachine.example.com",
        "app_name": "evntslog",
        "procid": None,
        "msgid": "ID47",
        "structured_data": {
            "exampleSDID@32473": {"iut": "3", "eventSource": "Application", "eventID": "1011"}
        },
        "msg": "An application event log entry...",
    }


def test_rfc5424_bom_dropped_and_invalid_utf8_replaced() -> None:
    assert fields(EX1)["msg"] == "'su root' failed for lonvick on /dev/pts/8"
    assert fields(b"<13>1 - - - - - - a\xffb\x00")["msg"] == "a\ufffdb\x00"


def test_repeated_param_becomes_a_list() -> None:
    out = fields(b'<13>1 - - - - - [x@1 ip="1" ip="2" ip="3" k="v"][y@1 a="b"]')
    assert out["structured_data"] == {"x@1": {"ip": ["1", "2", "3"], "k": "v"}, "y@1": {"a": "b"}}


def test_rfc5424_error_keeps_fields_read_before_it() -> None:
    out = fields(b"<13>1 2026-11-26T01:02:03Z host app 12 - [unterminated")
    assert out["format"] == "rfc5424"
    assert (out["hostname"], out["app_name"], out["procid"]) == ("host", "app", "12")
    assert out["error"] == "structured_data at offset 54: message ends inside an SD-ELEMENT"
    assert out["msg"] == "<13>1 2026-11-26T01:02:03Z host app 12 - [unterminated"


def test_rfc3164() -> None:
    out = fields(b"<86>Nov  6 01:02:03 web01 sshd[4242]: Accepted")
    assert out["format"] == "rfc3164"
    assert out["timestamp"] == "Nov  6 01:02:03"
    assert out["epoch"] == datetime(2026, 11, 6, 1, 2, 3, tzinfo=UTC).timestamp()
    assert (out["hostname"], out["app_name"], out["procid"]) == ("web01", "sshd", "4242")
    assert out["msgid"] is None and out["structured_data"] == {}
    assert out["msg"] == "Accepted"
    assert "error" not in out


def test_rfc3164_without_timestamp_is_flagged() -> None:
    out = fields(b"<13>myapp: hi")
    assert out["format"] == "rfc3164" and out["app_name"] == "myapp" and out["msg"] == "hi"
    assert out["error"] == "timestamp at offset 4: no RFC 3164 or RFC 3339 timestamp"


def test_rfc3164_bad_timestamp() -> None:
    out = fields(b"<13>Nov 31 01:02:03 h t: m")
    assert out["format"] == "rfc3164" and out["pri"] == 13 and out["severity"] == 5
    assert str(out["error"]).startswith("timestamp at offset 8: ")
    assert out["msg"] == "<13>Nov 31 01:02:03 h t: m"


def test_unknown() -> None:
    out = fields(b"\xffgarbage\x00")
    assert out["format"] == "unknown"
    assert out["msg"] == "\ufffdgarbage\x00"
    assert out["pri"] is None and out["hostname"] is None
    assert out["error"] == "pri at offset 0: message does not start with '<'"


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"", b"<13>", b"<13>1 ", b"<13>1 - h a p m [", b"<13>Nov  6 "]),
    st.binary(max_size=80),
)
def test_never_raises(prefix: bytes, data: bytes) -> None:
    out = fields(prefix + data)
    assert out["format"] in ("rfc5424", "rfc3164", "unknown")
