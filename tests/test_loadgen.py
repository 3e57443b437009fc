"""The load generator against simple in-test receivers on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.relp.session import (
    Messages,
    RelpError,
    RelpFrame,
    ServerSession,
    encode,
    ok_answers,
    syslog_commands,
)
from relay.tools import loadgen
from relay.tools.loadgen import SEQ_RE, Digest, LoadgenError, LoadSpec
from tests.support.certs import PKI, pki  # noqa: F401  (fixture)

TIMEOUT = 15.0


class Sink:
    """Accepts stream connections and keeps each connection's bytes."""

    def __init__(self, ctx: ssl.SSLContext | None = None) -> None:
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.streams: list[bytes] = []
        self.records: list[int] = []  # TLS: application records seen per connection
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, daemon=True)
        self._accept.start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._read, args=(c,), daemon=True)
            self._threads.append(t)
            t.start()

    def _read(self, c: socket.socket) -> None:
        c.settimeout(TIMEOUT)
        chunks = []
        reads = 0
        try:
            if self.ctx is not None:
                c = self.ctx.wrap_socket(c, server_side=True)
            while True:
                data = c.recv(1 << 20)
                if not data:
                    break
                reads += 1
                chunks.append(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            c.close()
        with self._lock:
            self.streams.append(b"".join(chunks))
            self.records.append(reads)

    def wait(self, n: int) -> list[bytes]:
        for t in list(self._threads):
            t.join(TIMEOUT)
        assert len(self.streams) == n
        return self.streams

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def _check(result: loadgen.Result, msgs: list[bytes]) -> None:
    seqs = [int(SEQ_RE.search(m).group(1)) for m in msgs]  # type: ignore[union-attr]
    assert sorted(seqs) == list(range(len(msgs)))
    d = Digest().update(msgs)
    assert (d.count, d.checksum) == (result.sent, result.checksum)


@pytest.mark.parametrize(
    ("framing", "fmt", "connections", "processes"),
    [
        ("octet-counting", "5424", 1, 1),
        ("lf", "5424", 3, 1),
        ("octet-counting", "3164", 4, 2),
        ("lf", "3164", 2, 2),
    ],
)
def test_stream_frames_parse_back(
    sink: Sink, framing: str, fmt: str, connections: int, processes: int
) -> None:
    spec = LoadSpec(
        port=sink.port,
        framing=framing,
        format=fmt,
        connections=connections,
        processes=processes,
        count=3001,
        batch=4096,
    )
    result = loadgen.run(spec)
    assert result.sent == 3001 and not result.errors
    streams = sink.wait(connections)
    msgs = [m for s in streams for m in loadgen.parse_frames(s, framing)]
    assert len(msgs) == 3001
    assert sum(len(s) for s in streams) == result.bytes
    assert sum(map(len, msgs)) == result.payload
    _check(result, msgs)
    for m in msgs:
        assert b"\n" not in m
        assert m.startswith(b"<")
        if fmt == "5424":
            assert m.split(b" ", 2)[0].endswith(b">1")


def test_message_mix_is_realistic() -> None:
    spec = LoadSpec(count=2000, size=300)
    msgs = loadgen.generate(spec, 0, range(2000))
    sizes = [len(m) for m in msgs]
    assert 250 <= sum(sizes) / len(sizes) <= 350
    assert min(sizes) < 250 and max(sizes) > 350
    assert len({m.split(b" ")[2] for m in msgs}) > 10  # hosts
    assert len({m.split(b" ")[3] for m in msgs}) >= 5  # apps
    assert any(b"[" in m.split(b" seq=")[0] for m in msgs)  # structured data
    assert any(max(m) > 0x7F for m in msgs)  # non-ASCII
    for m in msgs:
        m.decode("utf-8")  # valid UTF-8 throughout


def test_rate_limited_sends_exactly_count(sink: Sink) -> None:
    result = loadgen.run(LoadSpec(port=sink.port, count=300, rate=1000.0, connections=2))
    assert result.sent == 300
    msgs = [m for s in sink.wait(2) for m in loadgen.parse_frames(s, "octet-counting")]
    _check(result, msgs)


def test_duration_without_count(sink: Sink) -> None:
    result = loadgen.run(LoadSpec(port=sink.port, duration=0.3, rate=2000.0, batch=2048))
    msgs = loadgen.parse_frames(sink.wait(1)[0], "octet-counting")
    assert 0 < len(msgs) == result.sent
    _check(result, msgs)


def test_udp_one_datagram_per_message() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        rx.settimeout(TIMEOUT)
        spec = LoadSpec(port=rx.getsockname()[1], transport="udp", count=200, rate=4000.0)
        result = loadgen.run(spec)
        msgs = [rx.recv(65536) for _ in range(result.sent)]
    assert result.sent == 200
    _check(result, msgs)


@pytest.mark.parametrize("records", ["large", "per-message"])
def test_tls(pki: PKI, records: str) -> None:  # noqa: F811
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    ctx.load_verify_locations(str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    s = Sink(ctx)
    try:
        client = pki.clients["good"]
        spec = LoadSpec(
            port=s.port,
            transport="tls",
            count=500,
            connections=2,
            processes=1,
            tls_records=records,
            tls_ca=str(pki.ca),
            tls_verify=True,
            tls_server_name="localhost",
            tls_cert=str(client.cert),
            tls_key=str(client.key),
        )
        result = loadgen.run(spec)
        assert result.sent == 500 and not result.errors
        streams = s.wait(2)
    finally:
        s.close()
    msgs = [m for st_ in streams for m in loadgen.parse_frames(st_, "octet-counting")]
    _check(result, msgs)
    if records == "per-message":
        # One record per message: the server's reads can never hold more than
        # one record's worth, so there are at least as many reads as messages.
        assert sum(s.records) >= 500
    else:
        assert sum(s.records) < 500


def test_tls_verification_failure_is_an_error(pki: PKI, sink: Sink) -> None:  # noqa: F811
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    s = Sink(ctx)
    try:
        spec = LoadSpec(
            port=s.port, transport="tls", count=10, tls_ca=str(pki.other_ca), tls_verify=True
        )
        with pytest.raises(LoadgenError, match="TLS handshake failed"):
            loadgen.run(spec)
    finally:
        s.close()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"window": 0}, "window"),
        ({"seq_start": -1}, "10 digits"),
        ({"ack_timeout": 0.0}, "ack timeout"),
        ({"count": 0, "duration": 0.0}, "count or a duration"),
        ({"connections": 0}, "connections"),
        ({"tls_cert": "x.crt"}, "needs its key"),
        ({"size": 10}, "size"),
    ],
)
def test_bad_specs(changes: dict[str, object], match: str) -> None:
    with pytest.raises(LoadgenError, match=match):
        loadgen.run(replace(LoadSpec(count=1), **changes))  # type: ignore[arg-type]


def test_connection_refused_is_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(LoadgenError, match="cannot connect"):
            loadgen.run(LoadSpec(port=port, count=1))


def test_cli_json(sink: Sink, capsys: pytest.CaptureFixture[str]) -> None:
    rc = loadgen.main([f"127.0.0.1:{sink.port}", "-n", "100", "-F", "lf", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sent"] == 100 and out["spec"]["framing"] == "lf"
    assert len(loadgen.parse_frames(sink.wait(1)[0], "lf")) == 100


class RelpSink:
    """A RELP server thread on relay.relp.session.ServerSession: keeps every message, answers
    ``200 OK`` per received chunk, or ``500`` for the ``nack_at``-th message."""

    def __init__(self, ctx: ssl.SSLContext | None = None, nack_at: int = -1) -> None:
        self.ctx = ctx
        self.nack_at = nack_at
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.max_unanswered = 0  # most messages a client had in flight at once
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(TIMEOUT)
        session = ServerSession(max_data=128 * 1024)
        try:
            if self.ctx is not None:
                c = self.ctx.wrap_socket(c, server_side=True)
            while not session.finished:
                data = c.recv(65536)
                if not data:
                    break
                out = []
                for ev in session.feed(data):
                    out.append(session.data_to_send())  # the answer to open, close
                    if not isinstance(ev, Messages):
                        continue
                    with self._lock:
                        self.max_unanswered = max(self.max_unanswered, session.pending)
                        for txnr, msg in ev.messages:
                            if len(self.messages) == self.nack_at:
                                out.append(session.nack(txnr, "refused by the test"))
                                self.nack_at = -1
                                continue
                            self.messages.append(msg)
                            out.append(session.ack([txnr]))
                out.append(session.data_to_send())
                c.sendall(b"".join(out))
        except (OSError, ssl.SSLError, RelpError):
            pass
        finally:
            c.close()

    def wait(self) -> list[bytes]:
        for t in list(self._threads):
            t.join(TIMEOUT)
        return self.messages

    def close(self) -> None:
        self.sock.close()


def _server_ctx(pki: PKI) -> ssl.SSLContext:  # noqa: F811
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    return ctx


@pytest.mark.parametrize(
    ("transport", "connections", "processes", "window", "rate"),
    [
        ("relp", 1, 1, 1, 0.0),
        ("relp", 3, 2, 64, 0.0),
        ("relp", 2, 1, 16, 4000.0),
        ("relp+tls", 2, 1, 128, 0.0),
    ],
)
def test_relp_counts_acknowledged_messages(
    pki: PKI,  # noqa: F811
    transport: str,
    connections: int,
    processes: int,
    window: int,
    rate: float,
) -> None:
    s = RelpSink(_server_ctx(pki) if transport == "relp+tls" else None)
    try:
        spec = LoadSpec(
            port=s.port,
            transport=transport,
            connections=connections,
            processes=processes,
            count=600,
            window=window,
            rate=rate,
            seq_start=1000,
            batch=8192,
            tls_ca=str(pki.ca),
            tls_verify=True,
            tls_server_name="relay.test",
        )
        result = loadgen.run(spec)
        msgs = s.wait()
    finally:
        s.close()
    assert result.sent == 600 and not result.errors, result.errors
    assert sorted(int(SEQ_RE.search(m).group(1)) for m in msgs) == list(range(1000, 1600))  # type: ignore[union-attr]
    d = Digest().update(msgs)
    assert (d.count, d.checksum) == (result.sent, result.checksum)
    assert result.payload == sum(map(len, msgs))
    assert 1 <= s.max_unanswered <= window


def test_relp_refused_message_is_an_error_and_not_counted() -> None:
    s = RelpSink(nack_at=100)
    try:
        result = loadgen.run(LoadSpec(port=s.port, transport="relp", count=300, window=1))
        msgs = s.wait()
    finally:
        s.close()
    assert any("refused by the test" in e for e in result.errors)
    # Window 1: exactly the 100 messages before the refused one were acknowledged.
    assert result.sent == len(msgs) == 100
    assert result.checksum == Digest().update(msgs).checksum


def test_relp_peer_that_is_not_relp_is_an_error(sink: Sink) -> None:
    spec = LoadSpec(port=sink.port, transport="relp", count=10, connect_timeout=0.5)
    result = loadgen.run(spec)
    assert result.sent == 0
    assert any("no answer to RELP open" in e for e in result.errors)


def test_cli_relp_reports_acknowledged(capsys: pytest.CaptureFixture[str]) -> None:
    s = RelpSink()
    try:
        rc = loadgen.main([f"127.0.0.1:{s.port}", "-t", "relp", "-n", "50", "--window", "8"])
        s.wait()
    finally:
        s.close()
    assert rc == 0
    assert "sent and acknowledged 50 messages" in capsys.readouterr().out


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=300).filter(lambda b: b"\n" not in b), max_size=20),
    st.sampled_from(["octet-counting", "lf"]),
)
def test_frame_round_trip(msgs: list[bytes], framing: str) -> None:
    assert loadgen.parse_frames(loadgen.frame(msgs, framing), framing) == msgs


def test_digest_is_order_independent() -> None:
    msgs = [b"a", b"bb", b"ccc", b"a"]
    d1 = Digest().update(msgs)
    d2 = Digest().update(reversed(msgs))
    d3 = Digest().update(msgs[:2])
    d3.merge(Digest().update(msgs[2:]))
    assert (
        (d1.count, d1.checksum)
        == (d2.count, d2.checksum)
        == (d3.count, d3.checksum)
        == (
            4,
            d1.checksum,
        )
    )
    assert Digest().update(msgs[:3]).checksum != d1.checksum


def test_bench_quick_smoke(tmp_path: Path) -> None:
    """``python -m bench --quick``: ingest over TCP, relay to relay, backlog drain; every
    row verified (the TLS-per-message scenario is left out to keep the suite fast)."""
    out = tmp_path / "bench.json"
    only = "fleet tcp,relay->relay,backlog"
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", only, "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["scenario"], r["label"]): r for r in result["runs"]}
    expected = {
        ("fleet tcp octet 4 conn", "relay"): 20_000,
        ("fleet tcp octet 4 conn", "rsyslog"): 20_000,
        ("fleet tcp octet 4 conn", "rsyslog-imtcp"): 20_000,
        ("relay->relay RELP+TLS", "relay"): 5_000,
        ("relay->relay RELP+TLS", "rsyslog"): 5_000,
        # the backlog, then 1 s of live traffic at 2k/s behind it
        ("backlog drain 10k messages + live 2k/s", "relay"): 12_000,
    }
    for key, n in expected.items():
        assert rows[key]["ok"], (key, rows[key]["status"])
        assert rows[key]["received"] == rows[key]["sent"] == n, key
    drain = rows[("backlog drain 10k messages + live 2k/s", "relay")]["details"]
    assert drain["backlog"] == 10_000 and drain["live_messages"] == 2_000
    assert (
        drain["live_latency_until_caught_up_s"]["n"] + drain["live_latency_after_caught_up_s"]["n"]
        == 2_000
    )
    assert result["failures"] == 0
    assert "backlog drain" in result["drain"]


# --- the RELP answers the load generator expects (relay.tools.loadgen._RelpAcks) ------------------


def _relp_batches(sizes: list[int]) -> list[loadgen._Batch]:
    """Batches of ``sizes`` commands framed as loadgen frames them, TXNRs from 2."""
    spec = LoadSpec(transport="relp", count=sum(sizes), batch=1024, size=64)
    out, txnr = [], 2
    for n in sizes:
        msgs = loadgen.generate(spec, 0, range(n))
        wire, ends, after = syslog_commands(msgs, txnr)
        answers, answer_ends = ok_answers(txnr, n)
        out.append(
            loadgen._Batch(wire, n, 0, Digest(), 0, msgs, ends, answers, answer_ends, txnr, after)
        )
        txnr = after
    return out


def _acks(sizes: list[int]) -> tuple[loadgen._RelpAcks, list[loadgen._Batch]]:
    batches = _relp_batches(sizes)
    acks = loadgen._RelpAcks(2)
    for b in batches:
        acks.expect(b)
    acks.sent = sum(sizes)
    return acks, batches


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    cuts=st.lists(st.integers(1, 3000), max_size=12),
)
def test_relp_acks_in_order_however_the_reads_fall(sizes: list[int], cuts: list[int]) -> None:
    acks, batches = _acks(sizes)
    stream = b"".join(b.answers or b"" for b in batches)
    counted, pos = 0, 0
    for cut in sorted(set(cuts)):
        counted += acks.feed(stream[pos:cut])
        pos = min(cut, len(stream))
        # only whole answers count
        assert counted == stream[:pos].count(b"\n")
    counted += acks.feed(stream[pos:])
    assert counted == acks.acked == sum(sizes)
    assert acks._parser is None  # never left the fast path


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=3), split=st.integers(0, 2000))
def test_relp_acks_out_of_order_count_the_answered_prefix(sizes: list[int], split: int) -> None:
    """A server may answer in any order (RELP allows it): the general parser takes over,
    mid-answer if need be, and only the contiguous prefix is acknowledged."""
    acks, _ = _acks(sizes)
    total = sum(sizes)
    answers = [encode(RelpFrame(t, "rsp", b"200 OK")) for t in range(2, 2 + total)]
    first, rest = answers[: total // 2], answers[total // 2 :]
    stream = b"".join(first) + b"".join(reversed(rest))
    split = min(split, len(stream))
    counted = acks.feed(stream[:split])
    whole = stream[:split].count(b"\n")
    assert counted <= whole
    if split <= len(b"".join(first)):
        assert counted == whole  # the in-order part
    counted += acks.feed(stream[split:])
    assert counted == acks.acked == total


def test_relp_acks_refusal_keeps_the_prefix_and_is_an_error() -> None:
    acks, _ = _acks([10])
    stream = b"".join(encode(RelpFrame(t, "rsp", b"200 OK")) for t in range(2, 6))
    stream += encode(RelpFrame(6, "rsp", b"500 no room"))
    with pytest.raises(LoadgenError, match="message refused: 500 no room"):
        acks.feed(stream)
    assert acks.acked == 4


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (encode(RelpFrame(40, "rsp", b"200 OK")), "rsp for unknown txnr 40"),
        (encode(RelpFrame(0, "serverclose")), "serverclose"),
        (encode(RelpFrame(2, "syslog", b"x")), "server sent command 'syslog'"),
    ],
)
def test_relp_acks_unexpected_answers_are_errors(answer: bytes, error: str) -> None:
    acks, _ = _acks([10])
    with pytest.raises(LoadgenError, match=error):
        acks.feed(answer)
    assert acks.acked == 0


def test_relp_acks_close_after_the_last_answer() -> None:
    acks, batches = _acks([3])
    assert acks.feed(batches[0].answers or b"") == 3
    acks.close(5)
    assert not acks.closed
    acks.feed(encode(RelpFrame(5, "rsp")) + encode(RelpFrame(0, "serverclose")))
    assert acks.closed
