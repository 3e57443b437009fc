"""Parsed view of a stored message for ``syslog-archive cat --json``.

The stored bytes stay the truth; this is a derived, best-effort reading. An
RFC 5424 message that breaks the grammar half-way keeps the fields read
before the break and names the break in ``error``.
"""

from __future__ import annotations

from datetime import tzinfo

from relay.formats import rfc3164, rfc5424

_KEYS = (
    "pri",
    "facility",
    "severity",
    "timestamp",
    "epoch",
    "hostname",
    "app_name",
    "procid",
    "msgid",
)


def to_fields(msg: bytes, tz: tzinfo, now: float) -> dict[str, object]:
    """JSON-serialisable fields of ``msg``; never raises."""
    out: dict[str, object] = {"format": "unknown"}
    out.update(dict.fromkeys(_KEYS))
    out["structured_data"] = {}
    out["msg"] = msg.decode("utf-8", "replace")
    try:
        _, i = rfc5424.parse_pri(msg)
    except rfc5424.ParseError as e:
        out["error"] = str(e)
        return out
    if rfc5424.version_1_at(msg, i - 1) >= 0:
        _from_5424(msg, out)
    else:
        _from_3164(msg, tz, now, out)
    return out


def _from_5424(msg: bytes, out: dict[str, object]) -> None:
    out["format"] = "rfc5424"
    fields, error = rfc5424.parse_partial(msg)
    for key in _KEYS:
        if key in fields:
            out[key] = fields[key]
    sd: dict[str, dict[str, object]] = {}
    elements = fields.get("structured_data", ())
    assert isinstance(elements, tuple)
    for el in elements:
        params = sd.setdefault(el.id, {})
        for name, value in el.params:
            # A repeated PARAM-NAME (allowed by RFC 5424) becomes a list.
            if name in params:
                old = params[name]
                params[name] = [*old, value] if isinstance(old, list) else [old, value]
            else:
                params[name] = value
    out["structured_data"] = sd
    if "msg" in fields:
        body = fields["msg"]
        assert isinstance(body, bytes)
        out["msg"] = body.decode("utf-8", "replace")
    if error is not None:
        out["error"] = str(error)


def _from_3164(msg: bytes, tz: tzinfo, now: float, out: dict[str, object]) -> None:
    out["format"] = "rfc3164"
    try:
        m = rfc3164.parse(msg, tz, now)
    except rfc3164.ParseError as e:
        pri, _ = rfc5424.parse_pri(msg)  # already known to be valid
        out.update(pri=pri, facility=pri >> 3, severity=pri & 7, error=str(e))
        return
    out.update(
        pri=m.pri,
        facility=m.facility,
        severity=m.severity,
        timestamp=m.timestamp,
        epoch=m.epoch,
        hostname=m.hostname,
        app_name=m.tag,
        procid=m.procid,
        msg=m.content.decode("utf-8", "replace"),
    )
    if m.timestamp is None:
        offset = msg.index(b">") + 1
        out["error"] = f"timestamp at offset {offset}: no RFC 3164 or RFC 3339 timestamp"
