"""Store-and-forward between real relay processes (loopback only, bounded in time)."""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import termios
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.formats import octet
from tests.support.certs import PKI, pki, server_tls  # noqa: F401  (fixture)
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import Load, seq_counts, wait_seq_counts

pytestmark = pytest.mark.integration
WAIT = 40.0


def relp_forward(name: str, ports: list[int], **kw: Any) -> dict[str, Any]:
    fwd: dict[str, Any] = {
        "name": name,
        "peers": [f"127.0.0.1:{p}" for p in ports],
        "transport": "relp",
        "reconnect_min": "0.1s",
        "reconnect_max": "0.5s",
        "ack_timeout": "5s",
        "max_spool": "256MiB",
    }
    fwd.update(kw)
    return fwd


def test_core_down_for_a_while_under_load_relp_tls(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    core_port = free_port()
    core = RelayProcess(
        tmp_path / "core",
        [Listener("relp+tls", port=core_port)],
        tls=server_tls(pki, ["*.clients.test"]),
        relay_id="core",
    )
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[
            relp_forward(
                "core",
                [core_port],
                transport="relp+tls",
                tls_ca=str(pki.ca),
                tls_certificate=str(pki.clients["good"].cert),
                tls_key=str(pki.clients["good"].key),
                tls_peer_name="relay.test",
            )
        ],
        relay_id="edge",
    )
    core.start()
    edge.start()
    tag = uuid.uuid4().hex
    load = Load(edge_in.port, tag, n=6000, rate=2000).start()
    time.sleep(1.0)
    core.stop()  # the core goes away in the middle of the load ...
    time.sleep(1.5)
    core.start()  # ... and comes back
    load.join()
    got = wait_seq_counts(core, tag, 6000, WAIT)
    missing = sorted(set(range(6000)) - set(got))
    assert not missing, f"{len(missing)} missing, first {missing[:5]}\n{edge.log()}"
    dups = sum(c - 1 for c in got.values())
    # Duplicates are possible only for what was in flight when the core stopped.
    assert dups <= 2 * 128, dups
    edge.stop()
    core.stop()


def test_failover_and_failback(tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    primary = RelayProcess(tmp_path / "p1", [Listener("relp", port=p1)], relay_id="primary")
    secondary = RelayProcess(tmp_path / "p2", [Listener("relp", port=p2)], relay_id="secondary")
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[relp_forward("core", [p1, p2], failback_interval="0.5s")],
        relay_id="edge",
    )
    secondary.start()
    edge.start()  # primary down: the secondary takes over
    tag = uuid.uuid4().hex
    Load(edge_in.port, tag + "-a", n=500, rate=5000).start().join()
    assert len(wait_seq_counts(secondary, tag + "-a", 500, WAIT)) == 500
    primary.start()  # primary back: the edge fails back to it
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and "failing back" not in edge.log_path.read_text():
        time.sleep(0.1)
    Load(edge_in.port, tag + "-b", n=500, rate=5000).start().join()
    got_primary = wait_seq_counts(primary, tag + "-b", 500, WAIT)
    assert len(got_primary) == 500, edge.log()
    assert not seq_counts(secondary, tag + "-b")
    for r in (edge, primary, secondary):
        r.stop()


def test_balance_across_two_peers(tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    a = RelayProcess(tmp_path / "a", [Listener("relp", port=p1)], relay_id="a")
    b = RelayProcess(tmp_path / "b", [Listener("relp", port=p2)], relay_id="b")
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[relp_forward("core", [p1, p2], mode="balance", window=16)],
        relay_id="edge",
    )
    a.start()
    b.start()
    edge.start()
    deadline = time.monotonic() + WAIT  # both connections up before the load starts
    while time.monotonic() < deadline and edge.log_path.read_text().count("connected to") < 2:
        time.sleep(0.05)
    tag = uuid.uuid4().hex
    Load(edge_in.port, tag, n=4000, rate=4000).start().join()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        got_a, got_b = seq_counts(a, tag), seq_counts(b, tag)
        if len(got_a) + len(got_b) >= 4000:
            break
        time.sleep(0.2)
    assert set(got_a) | set(got_b) == set(range(4000))
    assert got_a and got_b, "both peers must get a share"
    for r in (edge, a, b):
        r.stop()


@pytest.mark.parametrize("authenticated", [True, False], ids=["relp+tls", "relp"])
def test_three_relay_cycle_stops(tmp_path: Path, pki: PKI, authenticated: bool) -> None:  # noqa: F811
    # Between relays that authenticate each other (mutual TLS) the relay where the cycle
    # closes drops the loop unstaged; over plain RELP it cannot tell a relay from a forger,
    # so it stages that copy flagged L and stops forwarding it (issue 11.12).
    ports = [free_port() for _ in range(3)]
    names = ["r0", "r1", "r2"]
    transport = "relp+tls" if authenticated else "relp"
    tls_forward: dict[str, Any] = {}
    if authenticated:
        tls_forward = {
            "transport": "relp+tls",
            "tls_ca": str(pki.ca),
            "tls_certificate": str(pki.clients["good"].cert),
            "tls_key": str(pki.clients["good"].key),
            "tls_peer_name": "relay.test",
        }
    relays = [
        RelayProcess(
            tmp_path / names[i],
            [Listener(transport, port=ports[i])],
            forward=[relp_forward("next", [ports[(i + 1) % 3]], **tls_forward)],
            relay_id=names[i],
            tls=server_tls(pki, ["*.clients.test"]) if authenticated else {},
        )
        for i in range(3)
    ]
    # Messages enter through a plain TCP listener of r0's own.
    tcp_in = Listener("tcp")
    relays[0].listeners.append(tcp_in)
    for r in relays:
        r.start()
    tag = uuid.uuid4().hex
    Load(tcp_in.port, tag, n=50, rate=1000).start().join()
    for r in relays:
        assert len(wait_seq_counts(r, tag, 50, WAIT)) == 50
    deadline = time.monotonic() + WAIT  # the loop comes back to r0, which stops it
    while time.monotonic() < deadline and "forwarding loop" not in relays[0].log_path.read_text():
        time.sleep(0.1)
    assert "forwarding loop" in relays[0].log_path.read_text()
    if not authenticated:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and min(seq_counts(relays[0], tag).values()) < 2:
            time.sleep(0.1)
    time.sleep(0.5)
    for r in relays[1:]:
        got = seq_counts(r, tag)
        assert set(got.values()) == {1}, f"{r.relay_id} staged a message twice"
    flags = [rec.flags for rec in relays[0].records() if tag.encode() in rec.msg]
    if authenticated:
        assert set(seq_counts(relays[0], tag).values()) == {1}
        assert not any(b"L" in f for f in flags)
    else:
        assert set(seq_counts(relays[0], tag).values()) == {2}  # the second copy: flagged
        assert sum(b"L" in f for f in flags) == 50
    for r in relays:
        r.stop()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_backlog_drains_with_bounded_memory_while_live_traffic_continues(tmp_path: Path) -> None:
    core_port = free_port()
    core = RelayProcess(tmp_path / "core", [Listener("relp", port=core_port)], relay_id="core")
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge", [edge_in], forward=[relp_forward("core", [core_port])], relay_id="edge"
    )
    edge.start()
    tag = uuid.uuid4().hex + "-b"
    live_tag = tag[:-2] + "-l"
    backlog = 100_000
    # The peer is down: a backlog builds up in the spool.
    with socket.create_connection(("127.0.0.1", edge_in.port), timeout=30) as s:
        for start in range(0, backlog, 10_000):
            s.sendall(
                b"".join(
                    octet.encode(f"<14>1 - h app - - - {tag} seq={i:07d} {'x' * 200}".encode())
                    for i in range(start, start + 10_000)
                )
            )
    assert len(wait_seq_counts(edge, tag, backlog, 120)) == backlog
    assert edge.proc is not None
    rss_before = _rss_mb(edge.proc.pid)
    core.start()  # the peer comes back; live traffic continues meanwhile
    live = Load(edge_in.port, live_tag, n=2000, rate=1000).start()
    peak = rss_before
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        peak = max(peak, _rss_mb(edge.proc.pid))
        if len(seq_counts(core, tag)) >= backlog and len(seq_counts(core, live_tag)) >= 2000:
            break
        time.sleep(1.0)
    live.join()
    assert len(seq_counts(core, tag)) == backlog
    assert len(seq_counts(core, live_tag)) == 2000
    # Bounded: the drain reads a window of the spool, never the whole backlog.
    assert peak < rss_before + 100, (rss_before, peak)
    edge.stop()
    core.stop()


def test_tls_forward_without_acks_delivers_everything(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    core_port = free_port()
    core = RelayProcess(
        tmp_path / "core",
        [Listener("tls", framing="octet-counting", port=core_port)],
        tls=server_tls(pki),
        relay_id="core",
    )
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[
            relp_forward(
                "core",
                [core_port],
                transport="tls",
                tls_ca=str(pki.ca),
                tls_peer_name="relay.test",
            )
        ],
        relay_id="edge",
    )
    edge.start()
    tag = uuid.uuid4().hex
    Load(edge_in.port, tag + "-a", n=2000, rate=10000).start().join()  # core still down
    core.start()
    Load(edge_in.port, tag + "-b", n=20000, rate=20000).start().join()
    assert len(wait_seq_counts(core, tag + "-a", 2000, WAIT)) == 2000
    assert len(wait_seq_counts(core, tag + "-b", 20000, WAIT)) == 20000
    # Byte-exact apart from the loop guard element the edge adds.
    sample = next(r.msg for r in core.records() if (tag + "-b").encode() in r.msg)
    assert sample.startswith(b'<14>1 - edgehost app - - [relay@32473 via="edge"] ')
    edge.stop()
    core.stop()


class BlackHole:
    """A peer that accepts connections and reads everything but never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.setblocking(False)
            self._conns.append(conn)
            for c in list(self._conns):  # drain so the sender is not blocked by TCP
                try:
                    c.recv(1 << 16)
                except (BlockingIOError, OSError):
                    pass

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for c in self._conns:
            c.close()
        self.sock.close()


def test_silent_peer_is_abandoned_for_the_next(tmp_path: Path) -> None:
    hole = BlackHole()
    core_port = free_port()
    core = RelayProcess(tmp_path / "core", [Listener("relp", port=core_port)], relay_id="core")
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[relp_forward("core", [hole.port, core_port], ack_timeout="1s")],
        relay_id="edge",
    )
    try:
        core.start()
        edge.start()
        tag = uuid.uuid4().hex
        Load(edge_in.port, tag, n=300, rate=3000).start().join()
        got = wait_seq_counts(core, tag, 300, WAIT)
        assert set(got) == set(range(300)), edge.log()
        assert hole.accepted >= 1
        assert "answered nothing for 1s" in edge.log_path.read_text()
    finally:
        edge.stop()
        core.stop()
        hole.close()


class StallingPeer:
    """A plain TCP syslog receiver that can stall and then crash like a killed process.

    It keeps what it read. On ``stall()`` it stops reading: the sender's send queue and
    buffers fill behind a full receive window. ``crash()`` then takes, without reading
    it (``MSG_PEEK``), what its kernel had acknowledged, which a peer process killed
    now would lose although TCP acknowledged it, and resets the connection (a kill
    -9 with unread data). The next connection is read normally.
    """

    def __init__(self, rcvbuf: int = 64 * 1024, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # TLS is terminated from raw bytes, so what was peeked decrypts too
        self._tls: tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None = None
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.streams: list[bytearray] = []  # per connection: bytes read or acknowledged
        self.acked_unread = 0
        self.connections = 0
        self._stall = threading.Event()
        self._stalled = threading.Event()
        self._stop = threading.Event()
        self._conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._conn = conn
            self.streams.append(bytearray())
            if self.tls is not None:
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                obj = self.tls.wrap_bio(incoming, outgoing, server_side=True)
                self._tls = (obj, incoming, outgoing)
            conn.settimeout(0.1)
            while not self._stop.is_set():
                if self._stall.is_set():
                    self._stalled.set()
                    break
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                self._take(conn, data)
            if self._stalled.is_set():
                return  # crash() takes over this connection

    def _take(self, conn: socket.socket, data: bytes) -> None:
        if self._tls is None:
            self.streams[-1] += data
            return
        obj, incoming, outgoing = self._tls
        incoming.write(data)
        while True:
            try:
                obj.do_handshake()
                chunk = obj.read(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            self.streams[-1] += chunk
        pending = outgoing.read()
        if pending:
            conn.setblocking(True)
            conn.sendall(pending)
            conn.settimeout(0.1)

    def stall(self) -> None:
        self._stall.set()
        assert self._stalled.wait(5)

    def crash(self) -> None:
        """Keep what the kernel acknowledged, then reset; the next connection is read."""
        conn = self._conn
        assert conn is not None
        inq = _inq(conn)
        while True:  # the window is shut: nothing arrives while we look
            time.sleep(0.5)
            now = _inq(conn)
            if now == inq:
                break
            inq = now
        conn.setblocking(False)
        peeked = conn.recv(inq + 1, socket.MSG_PEEK)
        assert len(peeked) == inq
        self._take(conn, peeked)
        self.acked_unread = inq
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST
        self._stall.clear()
        self._stalled.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def messages(self) -> list[bytes]:
        """The whole octet-counted frames of every connection (a cut tail is dropped)."""
        out: list[bytes] = []
        for stream in self.streams:
            buf, i = bytes(stream), 0
            while (sp := buf.find(b" ", i, i + 12)) > i:
                end = sp + 1 + int(buf[i:sp])
                if end > len(buf):
                    break
                out.append(buf[sp + 1 : end])
                i = end
        return out

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def _inq(conn: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0" * 4))[0]


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_tcp_forward_peer_crash_loses_nothing_its_tcp_did_not_acknowledge(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    transport: str,
) -> None:
    """Settled = acknowledged by the peer's TCP: a peer that dies with megabytes queued
    towards it (in the edge's socket and buffers) gets all of them again."""
    ctx = None
    extra: dict[str, Any] = {}
    if transport == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server.cert, pki.server.key)
        extra = {"tls_ca": str(pki.ca), "tls_peer_name": "relay.test"}
    peer = StallingPeer(tls=ctx)
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[relp_forward("peer", [peer.port], transport=transport, **extra)],
        relay_id="edge",
    )
    n = 100_000  # ~7 MB: more than the edge's send buffer and the peer's window
    try:
        edge.start()
        tag = uuid.uuid4().hex
        wait_for_bytes = time.monotonic() + WAIT
        load = Load(edge_in.port, tag, n=n, rate=50_000).start()
        while sum(map(len, peer.streams)) < 200_000 and time.monotonic() < wait_for_bytes:
            time.sleep(0.05)
        peer.stall()
        load.join()
        peer.crash()  # the edge resends all it had not seen acknowledged
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            seqs = Counter(
                int(m.rsplit(b"seq=", 1)[1]) for m in peer.messages() if tag.encode() in m
            )
            if len(seqs) == n:
                break
            time.sleep(0.2)
        missing = sorted(set(range(n)) - set(seqs))
        assert not missing, (len(missing), missing[:5], edge.log()[-2000:])
        assert peer.connections >= 2
        assert peer.acked_unread > 0  # the crash did drop acknowledged bytes, and no loss
    finally:
        edge.stop()
        peer.close()
