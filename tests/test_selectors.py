"""Selectors: the configuration names each problem; selection per run equals per message."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from archive.json_view import to_fields
from relay import config, selectors
from relay.formats import loop_guard, octet, staging_block
from relay.formats.routing_fields import routing_fields
from relay.framing.rfc6587 import Framer
from relay.ops.metrics import Metrics
from relay.router import Router
from relay.selection import Selection

NOW = 1_800_000_000.0 + 600
HOUR = int(NOW // 3600)
STAMP = b"2027-01-15T08:10:00.000000Z"
LISTEN = [
    {"address": "127.0.0.1:0", "transport": "tcp", "name": "in"},
    {"address": "127.0.0.1:0", "transport": "udp", "name": "other"},
]


def parse(select: dict[str, Any]) -> config.Config:
    return config.parse({"listen": LISTEN, "staging": {"select": select}})


# --- configuration


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        ({"facility": "kernel"}, "staging.select.facility: unknown facility 'kernel'"),
        ({"facility": []}, "staging.select.facility: expected a name or a non-empty list"),
        ({"severity": "loud"}, "staging.select.severity: unknown severity 'loud'"),
        ({"severity_below": "debug"}, "staging.select.severity_below: nothing is less severe"),
        ({"severity": "crit", "severity_below": "err"}, "staging.select: can never match"),
        ({"all": [{"facility": "mail"}, {"facility": "kern"}]}, "staging.select: can never match"),
        ({"host": "web[1"}, "staging.select.host: bad glob 'web[1'"),
        ({"app": "a b"}, "staging.select.app: bad glob 'a b'"),
        ({"regex": "("}, "staging.select.regex: bad regex '('"),
        ({"regex": "(a+)+$"}, "staging.select.regex: regex '(a+)+$': a repeated group"),
        ({"regex": "(x|y*){2,}"}, "staging.select.regex: regex '(x|y*){2,}': a repeated group"),
        ({"listener": "nowhere"}, "staging.select.listener: no [[listen]] is named 'nowhere'"),
        ({"malformed": "yes"}, "staging.select.malformed: expected true or false"),
        ({"any": []}, "staging.select.any: expected a non-empty array"),
        ({"any": [{"facility": "bogus"}]}, "staging.select.any[0].facility: unknown facility"),
        ({"not": {"hostname": "x"}}, "staging.select.not.hostname: unknown key"),
        ({}, "staging.select: empty selector"),
    ],
)
def test_check_names_the_key_of_a_bad_selector(select: dict[str, Any], expected: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        parse(select)
    assert any(line.startswith(expected) for line in err.value.lines()), err.value.lines()


def test_selectors_in_every_place_parse() -> None:
    cfg = config.parse(
        {
            "listen": LISTEN,
            "forward": [
                {"name": "sec", "peers": ["127.0.0.1:1"], "select": {"facility": "auth"}},
                {"name": "all", "peers": ["127.0.0.1:2"]},
            ],
            "staging": {"select": {"not": {"severity": ["debug"]}}},
            "drop": [{"name": "noisy", "select": {"app": "noisy"}}],
        }
    )
    sel = cfg.selectors
    assert sel is not None and set(sel.forward or {}) == {"sec"} and sel.drop[0][0] == "noisy"
    assert config.parse({"listen": LISTEN}).selectors is None


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        ({"select": {"app": "x"}}, "drop[0].name: missing"),
        ({"name": "r"}, "drop[0].select: missing"),
        ({"name": "r", "select": "app"}, "drop[0].select: expected a table"),
    ],
)
def test_drop_rules_are_checked(drop: dict[str, Any], expected: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({"listen": LISTEN, "drop": [drop]})
    assert any(line.startswith(expected) for line in err.value.lines()), err.value.lines()


@pytest.mark.parametrize(
    ("select", "pri", "taken"),
    [
        ({"severity": "warning"}, 4 * 8 + 4, True),  # $syslogseverity <= 4
        ({"severity": "warning"}, 4 * 8 + 5, False),
        ({"severity": ["warning"]}, 3, False),  # a list: exactly
        ({"severity_below": "warning"}, 5, True),
        ({"severity_below": "warning"}, 4, False),
        ({"facility": ["auth", "authpriv"]}, 10 * 8 + 6, True),
        ({"facility": "local7"}, 23 * 8, True),
        ({"facility": "audit"}, 13 * 8, True),
        ({"facility": "security"}, 13 * 8 + 1, True),
        ({"facility": "user", "severity": ["notice"]}, None, True),  # no PRI: user.notice
    ],
)
def test_facility_and_severity_read_the_pri(
    select: dict[str, Any], pri: int | None, taken: bool
) -> None:
    node = selectors.parse(select)
    msg = (b"" if pri is None else b"<%d>" % pri) + b"Jan 15 08:10:00 h t: x"
    assert selectors.matches(node, msg, "in", False, None) is taken


# --- selection: the router's per-run path against a per-message reference

HOSTS = [b"web-1", b"WEB-22", b"db1", b"mail.example", b"-"]
APPS = [b"sshd", b"cron", b"noisy", b"-", b"su"]


@st.composite
def message(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["5424", "5424", "3164", "malformed"]))
    # Few PRIs, hosts and apps: messages that share some of them test the caches' keys.
    pri = draw(st.one_of(st.sampled_from([14, 38, 191]), st.integers(0, 191)))
    host = draw(st.sampled_from(HOSTS[:2]) | st.sampled_from(HOSTS))
    app = draw(st.sampled_from(APPS[:2]) | st.sampled_from(APPS))
    text = draw(st.sampled_from([b"hello", b"Failed password for x", b"xx", b""]))
    if kind == "5424":
        return b"<%d>1 %b %b %b - - - %b" % (pri, STAMP, host, app, text)
    if kind == "3164":
        tag = app if app != b"-" else b"kernel"
        tag += draw(st.sampled_from([b"[12]:", b":", b"", b"[x"]))
        head = b"" if host == b"-" else host + b" "
        day = draw(st.sampled_from([b"15", b" 5", b"5"]))
        return b"<%d>Jan %b 08:10:00 %b%b %b" % (pri, day, head, tag, text)
    return draw(
        st.sampled_from([b"no pri " + text, b"<999>1 x", b"<13>junk " + host, b"<13>1 - " + host])
    )


FACILITY = st.sampled_from(["auth", "user", "local0", "kern"])
SEVERITY = st.sampled_from(["info", "notice", "emerg"])
LEAVES = st.one_of(
    st.builds(dict, facility=st.lists(FACILITY, min_size=1, max_size=2)),
    st.builds(dict, severity=st.sampled_from(["warning", "err", "debug"])),
    st.builds(dict, severity=st.lists(SEVERITY, min_size=1, max_size=2)),
    st.builds(dict, severity_below=st.sampled_from(["notice", "emerg"])),
    st.builds(dict, host=st.sampled_from(["web-*", "*", "db?", "-"])),
    st.builds(dict, app=st.sampled_from(["sshd", "c*", "*", "-"])),
    st.builds(dict, listener=st.sampled_from(["in", "other"])),
    st.builds(dict, regex=st.sampled_from(["password", "^<1", "x$"])),
    st.builds(dict, malformed=st.booleans()),
)


def _combined(sub: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(dict, any=st.lists(sub, min_size=1, max_size=3)),
        st.builds(dict, all=st.lists(sub, min_size=1, max_size=3)),
        st.builds(dict, **{"not": sub}),
    )


SELECTORS = st.recursive(LEAVES, _combined, max_leaves=4)


def reference(node: selectors.Node, msg: bytes, listener: str) -> bool:
    """Evaluation of one message from the full parsers (archive.json_view)."""
    fields = to_fields(msg, UTC, NOW)
    pri = fields["pri"] if isinstance(fields["pri"], int) else 13
    malformed = routing_fields(msg, UTC, NOW)[2]
    if isinstance(node, selectors.Pri):
        return pri in node.values
    if isinstance(node, selectors.Listener):
        return listener in node.names
    if isinstance(node, selectors.Malformed):
        return malformed is node.value
    if isinstance(node, selectors.Regex):
        return node.pattern.search(msg[: selectors.REGEX_WINDOW]) is not None
    if isinstance(node, selectors.Glob):
        value = fields["hostname" if node.field == "host" else "app_name"]
        text = (value or "-").encode() if isinstance(value, str | None) else b"-"
        return not malformed and node.pattern.match(text) is not None
    if isinstance(node, selectors.Not):
        return not reference(node.item, msg, listener)
    if isinstance(node, selectors.All):
        return all(reference(n, msg, listener) for n in node.items)
    assert isinstance(node, selectors.Any_)
    return any(reference(n, msg, listener) for n in node.items)


class Sink:
    def __init__(self) -> None:
        self.staged: list[bytes] = []
        self.forward: list[bytes] = []
        self.selected: dict[str, list[bytes]] | None = None

    def submit_chunk(
        self,
        hours: Any,
        forward: Any,
        now: float,
        on_durable: Any = None,
        sender: bytes = b"-",
        selected: Any = None,
    ) -> None:
        for blocks in hours.values():
            for framing, _, n, payload in blocks:
                msgs = staging_block.split_payload(bytes(payload), framing)
                assert len(msgs) == n
                self.staged += msgs
        if isinstance(forward, staging_block.OctetFrames):  # the messages of octet-counted frames
            forward = staging_block.split_payload(forward.data, staging_block.FRAMING_OCTET)
        self.forward += forward
        if selected is not None:
            self.selected = self.selected or {}
            for name, msgs in selected.items():
                self.selected.setdefault(name, []).extend(msgs)

    def output(self, name: str) -> list[bytes]:
        if self.selected is not None and name in self.selected:
            return self.selected[name]
        return self.forward


def _maybe(node: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any] | None]:
    return st.one_of(st.none(), node)


@settings(max_examples=200, deadline=None)
@example(  # two messages that differ only in APP-NAME: the cache keys must tell them apart
    msgs=[b"<14>1 " + STAMP + b" web-1 sshd - - - x", b"<14>1 " + STAMP + b" web-1 cron - - - x"],
    staging=None,
    out_a={"app": "sshd"},
    drops=[],
    listener="in",
    lf=False,
    per_message=False,
    plain=True,
)
@example(
    msgs=[b"<14>Jan 15 08:10:00 web-1 sshd: x", b"<14>Jan 15 08:10:00 web-1 cron: x"],
    staging={"app": "cron"},
    out_a=None,
    drops=[{"host": "db?"}],
    listener="in",
    lf=False,
    per_message=False,
    plain=True,
)
@given(
    msgs=st.lists(message(), min_size=1, max_size=24),
    staging=_maybe(SELECTORS),
    out_a=_maybe(SELECTORS),
    drops=st.lists(SELECTORS, max_size=2),
    listener=st.sampled_from(["in", "other"]),
    lf=st.booleans(),
    per_message=st.booleans(),
    plain=st.booleans(),
)
def test_selection_per_run_equals_selection_per_message(
    msgs: list[bytes],
    staging: dict[str, Any] | None,
    out_a: dict[str, Any] | None,
    drops: list[dict[str, Any]],
    listener: str,
    lf: bool,
    per_message: bool,
    plain: bool,
) -> None:
    def node(raw: dict[str, Any] | None) -> selectors.Node | None:
        try:
            return None if raw is None else selectors.parse(raw)
        except selectors.SelectorError:
            assume(False)
            raise

    sel = selectors.Selectors(
        staging=node(staging),
        forward={} if out_a is None else {"a": node(out_a)},  # type: ignore[dict-item]
        drop=tuple((f"r{i}", node(d)) for i, d in enumerate(drops)),  # type: ignore[misc]
        plain_outputs=plain or out_a is None,
    )
    assume(not sel.empty)
    sink, metrics = Sink(), Metrics()
    r = Router(sink, metrics, UTC, 3600.0, lambda: NOW, relay_id="edge", forwarding=True)
    r.select(Selection(sel))
    if per_message:
        r.accept(msgs, b"u", listener)
    elif lf:
        data = b"".join(m + b"\n" for m in msgs if not m[:1].isdigit())
        msgs = [m for m in msgs if not m[:1].isdigit()]
        r.receive(Framer("lf", 65536), data, b"t", listener)
    else:
        r.receive(Framer("auto", 65536), octet.encode_many(msgs), b"t", listener)

    def dropped(m: bytes) -> str | None:
        for name, n in sel.drop:
            if reference(n, m, listener):
                return name
        return None

    kept = [m for m in msgs if dropped(m) is None]
    want_staged = [m for m in kept if sel.staging is None or reference(sel.staging, m, listener)]
    assert sink.staged == want_staged

    def marked(ms: list[bytes]) -> list[bytes]:
        return [loop_guard.mark(m, b"edge") for m in ms]

    if sel.plain_outputs:
        assert sink.forward == marked(kept)  # outputs without a selector
    if out_a is not None:
        node_a = (sel.forward or {})["a"]
        assert sink.output("a") == marked([m for m in kept if reference(node_a, m, listener)])
    # Counted per selector (when the chunk took the selective path at all).
    for name, _ in sel.drop:
        hits = sum(1 for m in msgs if dropped(m) == name)
        assert metrics.get("messages_selected_total", selector=f"drop.{name}") in (0, hits)
        if hits:
            assert metrics.get("messages_selected_total", selector=f"drop.{name}") == hits
    if sel.staging is not None and len(want_staged) < len(kept):
        got = metrics.get("messages_not_selected_total", selector="staging")
        assert got == len(kept) - len(want_staged)


def test_a_chunk_every_output_takes_goes_the_unselective_way() -> None:
    """A listener the selectors do not concern: runs staged as received, one block."""
    sel = selectors.Selectors(forward={"a": selectors.parse({"listener": "other"})})
    sink = Sink()
    hours: list[Any] = []

    class Spy(Sink):
        def submit_chunk(self, h: Any, *args: Any, **kw: Any) -> None:
            hours.append(h)
            super().submit_chunk(h, *args, **kw)

    spy = Spy()
    r = Router(spy, Metrics(), UTC, 3600.0, lambda: NOW, relay_id="edge", forwarding=True)
    r.select(Selection(sel))
    msgs = [b"<13>1 " + STAMP + b" web1 app - - - one"] * 3
    data = octet.encode_many(msgs)
    r.receive(Framer("auto", 65536), data, b"t", "other")
    ((block,),) = hours[0].values()
    assert bytes(block[3]) == data and spy.selected is None
    del sink


def test_staging_gets_slices_of_the_chunk_not_copies() -> None:
    sel = selectors.Selectors(staging=selectors.parse({"severity": "err"}))
    hours: list[Any] = []

    class Spy(Sink):
        def submit_chunk(self, h: Any, *args: Any, **kw: Any) -> None:
            hours.append(h)

    r = Router(Spy(), Metrics(), UTC, 3600.0, lambda: NOW, forwarding=False)
    r.select(Selection(sel))
    msgs = [b"<%d>1 " % p + STAMP + b" web1 app - - - m" for p in (3, 3, 6, 2, 7, 7, 0)]
    data = octet.encode_many(msgs)
    r.receive(Framer("auto", 65536), data, b"t", "in")
    blocks = hours[0][HOUR]
    assert [b[2] for b in blocks] == [2, 1, 1]
    assert all(isinstance(b[3], memoryview) and b[3].obj is data for b in blocks)


def test_the_reference_configs_selector_examples_are_valid() -> None:
    """Every ``select = {...}`` in etc/syslog-relay.toml's comments parses and can match."""
    import tomllib
    from pathlib import Path

    lines = (Path(__file__).parent.parent / "etc" / "syslog-relay.toml").read_text().splitlines()
    found = 0
    for n, line in enumerate(lines):
        if "select = {" not in line or not line.lstrip().startswith("#"):
            continue
        text = line[line.index("select = {") :]
        k = n
        while text.count("{") + text.count("[") > text.count("}") + text.count("]"):
            k += 1
            text += " " + lines[k][len(line) - len(line.lstrip()) :].lstrip("# ").strip()
            text = text.split("  ")[0] if text.count("{") == text.count("}") else text
        raw = tomllib.loads(text)["select"]
        selectors.parse(raw)
        found += 1
    assert found >= 12
