"""The relay link between real relay processes: loss, duplicates and refusals, message by
message at the core (loopback only, bounded in time)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from relay.formats import octet
from relay.link import wire
from relay.link.protocol import build_batch
from tests.support.certs import PKI, pki, server_tls  # noqa: F401  (fixture)
from tests.support.http import get
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import Load, seq_counts, wait_seq_counts
from tests.test_full_disk import small_disk  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration
WAIT = 40.0


def link_forward(pki: PKI, ports: list[int], **kw: Any) -> dict[str, Any]:  # noqa: F811
    fwd: dict[str, Any] = {
        "name": "core",
        "peers": [f"127.0.0.1:{p}" for p in ports],
        "transport": "link+tls",
        "reconnect_min": "0.1s",
        "reconnect_max": "0.5s",
        "ack_timeout": "5s",
        "max_spool": "256MiB",
        "tls_ca": str(pki.ca),
        "tls_certificate": str(pki.clients["good"].cert),
        "tls_key": str(pki.clients["good"].key),
        "tls_peer_name": "relay.test",
    }
    fwd.update(kw)
    return fwd


def make_pair(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    core_port: int | None = None,
    **fwd: Any,
) -> tuple[RelayProcess, RelayProcess, Listener]:
    core_port = core_port or free_port()
    core = RelayProcess(
        tmp_path / "core",
        [Listener("link+tls", port=core_port)],
        tls=server_tls(pki, ["*.clients.test"]),
        relay_id="core",
    )
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[link_forward(pki, [core_port], **fwd)],
        relay_id="edge",
    )
    return core, edge, edge_in


def assert_exact(got: Any, n: int, log: str) -> None:
    missing = sorted(set(range(n)) - set(got))
    assert not missing, f"{len(missing)} missing, first {missing[:5]}\n{log}"
    dups = {s: c for s, c in got.items() if c > 1}
    assert not dups, f"{len(dups)} duplicated, first {sorted(dups)[:5]}\n{log}"


def test_edge_to_core_byte_exact_and_counted(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    core, edge, edge_in = make_pair(tmp_path, pki)
    core.start()
    edge.start()
    try:
        tag = uuid.uuid4().hex
        Load(edge_in.port, tag, n=3000, rate=3000).start().join()
        got = wait_seq_counts(core, tag, 3000, WAIT)
        assert_exact(got, 3000, edge.log() + core.log())
        # Byte-exact: the core staged what the edge received (no in-band loop-guard mark).
        sample = [r.msg for r in core.records() if tag.encode() in r.msg][:3]
        assert all(b"relay@32473" not in m for m in sample), sample
        metrics = get(edge.metrics_url + "/metrics")[1]
        assert 'syslog_relay_link_bytes_wire_total{output="core"}' in metrics
        assert "syslog_relay_link_ack_latency_seconds_bucket" in metrics
        status, body = get(edge.metrics_url + "/status")
        (out,) = json.loads(body)["outputs"]
        assert status == 200 and out["forwarded"] == 3000, body[:2000]
    finally:
        edge.stop()
        core.stop()


def blast(port: int, tag: str, n: int, start: int = 0, per_connection: int = 5000) -> None:
    """``n`` messages into a TCP listener as fast as it takes them, over a new connection
    every ``per_connection``: each connection's reads are spool records of their own (one
    read can take a whole connection's load), so a backlog is many records, as from many
    senders."""
    for first in range(start, start + n, per_connection):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            end = min(first + per_connection, start + n)
            for lo in range(first, end, 1000):
                msgs = [
                    f"<14>1 - edgehost app - - - {tag} seq={i:07d}".encode()
                    for i in range(lo, min(lo + 1000, end))
                ]
                sock.sendall(b"".join(octet.encode(m) for m in msgs))


def counter(relay: RelayProcess, name: str, **labels: str) -> float:
    """Sum of a counter's samples whose labels include ``labels`` (0 when absent)."""
    try:
        text = get(relay.metrics_url + "/metrics")[1]
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"syslog_relay_{name}") and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(what: str, probe: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def staged_seqs(relay: RelayProcess, tag: str) -> int:
    pattern = re.compile(rb"seq=")
    return sum(1 for r in relay.records() if tag.encode() in r.msg and pattern.search(r.msg))


def kill9(relay: RelayProcess) -> None:
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGKILL)
    relay.proc.wait(10)


N_CRASH = 60_000


@pytest.mark.parametrize("victim", ["edge", "core", "core-stops"])
def test_kill_9_mid_batch_loses_and_duplicates_nothing(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    victim: str,
) -> None:
    """A backlog drains over the link; one side is killed -9 (or the core stops: its
    listener closes under the batches in flight) while batches are in flight (small
    batches: many of them), restarted, and the core has every message once."""
    core, edge, edge_in = make_pair(tmp_path, pki, batch_size="16KiB")
    edge.start()
    try:
        tag = uuid.uuid4().hex
        blast(edge_in.port, tag, N_CRASH)
        wait_until("the edge staged the load", lambda: staged_seqs(edge, tag) >= N_CRASH)
        core.start()
        # Mid-drain: some batches acknowledged, more in flight (a batch holds whole spool
        # records, one received chunk each: at least 12 for this load, see blast).
        wait_until(
            "batches at the core",
            lambda: counter(core, "link_batches_received_total") >= 5,
        )
        if victim == "core-stops":
            core.stop()
        else:
            kill9(edge if victim == "edge" else core)
        (edge if victim == "edge" else core).start()
        got = wait_seq_counts(core, tag, N_CRASH, WAIT)
        assert_exact(got, N_CRASH, edge.log() + core.log())
        if victim.startswith("core"):
            # The core came back with its ledger: the edge resent what was unacknowledged.
            assert "relay link ledger: 1 sending relays/epochs known" in core.log()
        wait_until("the edge's spool drained", lambda: counter(edge, "spool_records") == 0)
    finally:
        edge.stop()
        core.stop()


def test_resent_batches_after_reconnect_are_acked_not_written(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
) -> None:
    """A sender that lost its connection before the acks came resends on a new one what
    the WELCOME did not declare committed: acknowledged, never staged twice."""
    core, _, _ = make_pair(tmp_path, pki)
    core.start()
    try:
        tag = uuid.uuid4().hex
        recs = [
            (i + 1, octet.encode(f"<14>1 - h a - - - {tag} seq={i:07d}".encode())) for i in range(6)
        ]
        batches = [build_batch(recs[lo : lo + 3], (b"edge-raw",), "zstd", 1) for lo in (0, 3)]
        hello = wire.encode_hello(wire.Hello(1, 1, 99, "edge-raw", ("zstd",)))
        first = RawLink(core, pki)
        first.send(hello)
        assert isinstance(first.read(1)[0], wire.Welcome)
        first.send(batches[0].frame + batches[1].frame)
        first.close()  # gone before reading any ack
        for _ in range(2):  # resent once while the first may still be in the writer, once after
            again = RawLink(core, pki)
            again.send(hello)
            (welcome,) = again.read(1)
            assert isinstance(welcome, wire.Welcome)
            todo = [b for b in batches if b.seq > welcome.committed]
            for b in todo:
                again.send(b.frame)
            if todo:
                assert again.read(len(todo))[-1] == wire.Ack(6)
            again.close()
        assert welcome.committed == 6
        time.sleep(0.5)  # let anything wrongly written twice reach staging
        got = wait_seq_counts(core, tag, 6, WAIT)
        assert_exact(got, 6, core.log())
    finally:
        core.stop()


class RawLink:
    """A hand-driven link sender over TLS (the test plays the edge, byte by byte)."""

    def __init__(self, core: RelayProcess, pki: PKI, cert: str = "good") -> None:  # noqa: F811
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.check_hostname = False
        if cert:
            ctx.load_cert_chain(str(pki.clients[cert].cert), str(pki.clients[cert].key))
        raw = socket.create_connection(("127.0.0.1", core.listeners[0].port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="relay.test")
        self.dec = wire.FrameDecoder(1 << 20)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int) -> list[wire.Frame]:
        """Until ``n`` frames arrived or the peer closed (bounded by the socket timeout)."""
        frames: list[wire.Frame] = []
        while len(frames) < n:
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                break
            if not data:
                break
            frames += self.dec.feed(data)
        return frames

    def close(self) -> None:
        self.sock.close()


def _raw(tag: str) -> tuple[bytes, list[tuple[int, bytes]]]:
    recs = [(1, octet.encode(f"<14>1 - h a - - - {tag} seq=0000000".encode()))]
    return wire.encode_records(recs), recs


def _bad_checksum(tag: str) -> bytes:
    raw, _ = _raw(tag)
    h = wire.BatchHeader(1, 1, 1, len(raw), wire.checksum(raw) ^ 1, wire.CODEC_NONE, (b"x",))
    return wire.encode_batch(h, raw)


def _truncated(tag: str) -> bytes:
    raw, _ = _raw(tag)
    body = wire.compress(raw, 1)[:-4]
    h = wire.BatchHeader(1, 1, 1, len(raw), wire.checksum(raw), wire.CODEC_ZSTD, (b"x",))
    return wire.encode_batch(h, body)


def _not_zstd(tag: str) -> bytes:
    raw, _ = _raw(tag)
    h = wire.BatchHeader(1, 1, 1, len(raw), wire.checksum(raw), wire.CODEC_ZSTD, (b"x",))
    return wire.encode_batch(h, b"\x28\xb5\x2f\xfd garbage " + raw)


def _bomb(tag: str) -> bytes:
    body = wire.compress(b"\0" * (64 << 20), 19)
    h = wire.BatchHeader(1, 1, 1, 64 << 20, 0, wire.CODEC_ZSTD, (b"x",))
    return wire.encode_batch(h, body)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_bad_checksum, "checksum"),
        (_truncated, "decompress"),
        (_not_zstd, "decompress"),
        (_bomb, "too-large"),
    ],
    ids=["bad-checksum", "truncated", "not-zstd", "decompression-bomb"],
)
def test_corrupted_batches_are_refused_counted_and_not_stored(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    make: Any,
    reason: str,
) -> None:
    core, _, _ = make_pair(tmp_path, pki)
    core.start()
    try:
        tag = uuid.uuid4().hex
        sock = RawLink(core, pki)
        sock.send(wire.encode_hello(wire.Hello(1, 1, 5, "edge-raw", ("zstd", "none"))))
        assert isinstance(sock.read(1)[0], wire.Welcome)
        sock.send(make(tag))
        frames = sock.read(5)  # the REFUSE, then the core closes
        assert frames and isinstance(frames[-1], wire.Refuse), frames
        assert wire.REFUSAL_NAMES[frames[-1].code] == reason
        wait_until(
            "the refusal counted", lambda: counter(core, "link_refused_total", reason=reason) == 1
        )
        assert f"{reason}:" in core.log()
        assert not [r for r in core.records() if tag.encode() in r.msg]
    finally:
        core.stop()


def test_other_protocols_and_wrong_clients_are_refused(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    core, _, _ = make_pair(tmp_path, pki)
    core.start()
    try:
        tag = uuid.uuid4().hex
        # A syslog-over-TLS sender (rsyslog omfwd gtls) pointed at the link port.
        sock = RawLink(core, pki)
        sock.send(octet.encode(f"<14>1 - h a - - - {tag} seq=0000000".encode()))
        frames = sock.read(2)
        assert frames == [wire.Refuse(wire.R_PROTOCOL, frames[0].reason)]  # type: ignore[union-attr]
        wait_until(
            "refused as protocol",
            lambda: counter(core, "link_refused_total", reason="protocol") == 1,
        )
        assert "not a relay link peer" in core.log()
        # A TLS client without a certificate is refused at the handshake.
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            sock = RawLink(core, pki, cert="")
            sock.send(wire.encode_hello(wire.Hello(1, 1, 5, "edge-raw", ("zstd",))))
            assert not sock.read(1)
            raise ConnectionError("closed")
        wait_until("TLS refusal counted", lambda: counter(core, "tls_handshake_refused_total") >= 1)
        # A newer protocol version only.
        sock = RawLink(core, pki)
        sock.send(wire.encode_hello(wire.Hello(7, 9, 5, "edge-raw", ("zstd",))))
        frames = sock.read(2)
        assert isinstance(frames[-1], wire.Refuse) and frames[-1].code == wire.R_VERSION
        assert not [r for r in core.records() if tag.encode() in r.msg]
    finally:
        core.stop()


def test_link_output_against_a_relp_listener_is_refused(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    """An edge pointed at a port that speaks RELP: it says why, counts it and retries."""
    core = RelayProcess(
        tmp_path / "core",
        [Listener("relp+tls")],
        tls=server_tls(pki, ["*.clients.test"]),
        relay_id="core",
    )
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[link_forward(pki, [core.listeners[0].port])],
        relay_id="edge",
    )
    core.start()
    edge.start()
    try:
        blast(edge_in.port, uuid.uuid4().hex, 10)
        wait_until(
            "the edge counted the mismatch",
            lambda: counter(edge, "link_refused_total", output="core") >= 1,
        )
        assert "relay link" in edge.log() and "RELP error" in core.log()
    finally:
        edge.stop()
        core.stop()


def test_core_disk_full_mid_drain_then_freed(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    small_disk: Path,  # noqa: F811
) -> None:
    """The core's disk fills while batches arrive: nothing is acknowledged that is not on
    disk, the edge gives up on the silent core and resends, and once space is back every
    message is at the core once."""
    core, edge, edge_in = make_pair(tmp_path, pki, batch_size="16KiB", ack_timeout="2s")
    core.state = small_disk / "state"
    core.staging = {"fsync_interval": "100ms", "max_pending": "1MiB"}
    core.relay = {"min_free": 0, "min_free_percent": 0}  # no free-space floor: fill the disk
    core.start()
    filler = small_disk / "filler"
    st = os.statvfs(small_disk)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 300 * 1024))
    edge.start()
    try:
        tag = uuid.uuid4().hex
        n = 20_000  # about 1.5 MB staged at the core: five times the space left
        blast(edge_in.port, tag, n)
        wait_until("the core's disk full", lambda: "No space left" in core.log_path.read_text())
        assert core.alive()
        time.sleep(3)  # the edge abandons the silent core at least once (ack_timeout 2s)
        filler.unlink()
        got = wait_seq_counts(core, tag, n, WAIT)
        assert_exact(got, n, edge.log() + core.log())
        assert counter(edge, "link_ack_timeouts_total") >= 1
        assert counter(core, "link_ledger_senders") == 2  # one key per lane of the edge
    finally:
        edge.stop()
        core.stop()


def test_failover_and_back_to_the_same_core_writes_nothing_twice_there(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
) -> None:
    """core1 is killed mid-drain: the edge fails over to core2, then back to core1 when it
    returns. No message is lost; neither core holds one twice (what was in flight when
    core1 died may be at both: the ledgers are per core)."""
    ports = [free_port(), free_port()]
    cores = [
        RelayProcess(
            tmp_path / f"core{i}",
            [Listener("link+tls", port=port)],
            tls=server_tls(pki, ["*.clients.test"]),
            relay_id=f"core{i}",
        )
        for i, port in enumerate(ports)
    ]
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[link_forward(pki, ports, batch_size="16KiB", failback_interval="1s")],
        relay_id="edge",
    )
    for c in cores:
        c.start()
    edge.start()
    try:
        tag = uuid.uuid4().hex
        n = 40_000
        blast(edge_in.port, tag, n // 2)
        wait_until("batches at core0", lambda: counter(cores[0], "link_batches_received_total") > 5)
        kill9(cores[0])
        blast(edge_in.port, tag, n // 2, start=n // 2)
        wait_until("batches at core1", lambda: counter(cores[1], "link_batches_received_total") > 0)
        cores[0].start()
        wait_until(
            "failback to core0",
            lambda: (
                counter(edge, "forward_failbacks_total") >= 1
                or "failing back" in edge.log_path.read_text()
            ),
        )
        wait_until("the edge's spool drained", lambda: counter(edge, "spool_records") == 0)
        wait_until(
            "everything delivered",
            lambda: len(set(seq_counts(cores[0], tag)) | set(seq_counts(cores[1], tag))) >= n,
        )
        per_core = [seq_counts(c, tag) for c in cores]
        for got in per_core:
            dups = {s: k for s, k in got.items() if k > 1}
            assert not dups, f"{len(dups)} written twice at one core"
        assert set(per_core[0]) | set(per_core[1]) == set(range(n))
    finally:
        edge.stop()
        for c in cores:
            c.stop()


def test_live_lane_beside_a_backlog_and_a_kill_9_of_the_edge(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
) -> None:
    """A backlog waits in the edge's spool while the core is down (one lane: everything is
    backlog then). The core comes back; live traffic takes the spool's second lane (the
    backlog is older than live_lane_after) and its own connection. The edge is killed -9
    with both lanes busy, restarted, more live traffic follows; the core has every message
    once, and live messages were staged there before the backlog's end (a window of one
    batch of one small record makes the backlog drain in hundreds of round trips)."""
    core, edge, edge_in = make_pair(
        tmp_path, pki, batch_size="4KiB", window=1, live_lane_after="0.5s"
    )
    edge.start()
    try:
        tag, live1, live2 = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
        blast(edge_in.port, tag, N_CRASH, per_connection=100)  # 600 records at least
        wait_until("the edge staged the load", lambda: staged_seqs(edge, tag) >= N_CRASH)
        assert counter(edge, "spool_lane_records", lane="2") == 0  # an outage: one lane
        core.start()
        wait_until("the drain", lambda: counter(core, "link_batches_received_total") >= 2)
        Load(edge_in.port, live1, n=2000, rate=4000).start().join()
        wait_until(
            "live records taking lane 2",
            lambda: counter(edge, "link_lane_switches_total") == 1,
        )
        assert counter(edge, "link_lane_switches_total") == 1
        assert counter(edge, "spool_lane_records", lane="1") > 0  # the edge dies mid-drain
        kill9(edge)
        edge.start()
        Load(edge_in.port, live2, n=2000, rate=4000).start().join()
        got = wait_seq_counts(core, tag, N_CRASH, WAIT)
        assert_exact(got, N_CRASH, edge.log() + core.log())
        for live in (live1, live2):
            assert_exact(wait_seq_counts(core, live, 2000, WAIT), 2000, edge.log() + core.log())
        order = [
            (tag.encode() in r.msg, live1.encode() in r.msg)
            for r in core.records()
            if tag.encode() in r.msg or live1.encode() in r.msg
        ]
        last_backlog = max(i for i, (b, _) in enumerate(order) if b)
        first_live = min(i for i, (_, live) in enumerate(order) if live)
        assert first_live < last_backlog, "live records waited for the whole backlog"
        # One ledger key per lane, kept across the edge's restart (same boot, same epochs).
        assert counter(core, "link_ledger_senders") == 2
        wait_until("the edge's spool drained", lambda: counter(edge, "spool_records") == 0)
    finally:
        edge.stop()
        core.stop()
