"""``syslog-relay loadgen``: a syslog load generator (like syslog-ng's loggen).

Shaped so that the generator is never the bottleneck it is meant to measure:

* Messages are generated (and, for TLS, encrypted) before the clock starts,
  as a list of wire-ready batches per connection; the timed loop only calls
  ``sendall`` on large buffers, so the kernel and the receiver do the work.
* TLS goes through ``ssl.SSLObject`` over memory BIOs: the handshake runs on
  the socket, then every batch is encrypted ahead of time, either as large
  records (16 KiB, what a batching forwarder sends) or one record per message
  (what most forwarders send). Both reach the wire through plain ``sendall``.
* Several connections run in several processes (fork), so one Python core
  does not cap the load; each connection has its own thread in its process
  (``sendall`` releases the GIL).
* RELP (``relp``, ``relp+tls``): every command carries the next TXNR, and those
  follow from the session's ``open``, so the commands are framed ahead too; the
  timed loop sends slices of them, up to ``window`` in flight per connection,
  and checks the answers against the ones expected (one comparison per read).
  Only acknowledged messages count as sent.

Every message carries a unique ``seq=NNNNNNNNNN`` token (connection k of C
sends S+k, S+k+C, S+k+2C, ... from ``seq_start`` S), and the run reports the count and an
order-independent checksum of every message sent, so a receiver's output can
be checked with :class:`Digest` (see bench/).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import select
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from relay.formats import octet
from relay.relp.session import (
    MAX_TXNR,
    ClientEvent,
    ClientSession,
    RelpError,
    RelpFrame,
    RelpParser,
    encode,
    next_txnr,
    ok_answers,
    syslog_commands,
)
from relay.tools import fleet

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

TRANSPORTS = ("tcp", "tls", "udp", "relp", "relp+tls")
FRAMINGS = ("octet-counting", "lf")
FORMATS = ("5424", "3164")
TLS_RECORDS = ("large", "per-message")

SEQ_RE = re.compile(rb" seq=(\d{10}) ")
_MASK64 = (1 << 64) - 1
# Largest UDP payload we send; bigger targets are clipped for UDP.
_UDP_MAX = 8192
_TLS_RECORD = 16384
_FIRST_SYSLOG = 2  # a RELP session's open is TXNR 1: its syslog commands start at 2


class LoadgenError(Exception):
    """The load could not be generated or sent (bad options, connection failed)."""


@dataclass(frozen=True)
class LoadSpec:
    host: str = "127.0.0.1"
    port: int = 514
    transport: str = "tcp"
    framing: str = "octet-counting"
    format: str = "5424"
    connections: int = 1
    processes: int = 0  # 0 = min(connections, CPUs)
    count: int = 0  # total messages; 0 = until duration
    duration: float = 0.0  # seconds; 0 = until count
    rate: float = 0.0  # total messages/s; 0 = flat out
    size: int = 0  # message size (bytes, before framing): uniform's mean, fleet's median
    batch: int = 256 * 1024  # bytes per sendall
    seed: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_verify: bool = False
    tls_server_name: str | None = None
    tls_records: str = "large"
    connect_timeout: float = 10.0
    seq_start: int = 0  # first sequence number (two runs into one receiver stay distinct)
    window: int = 128  # RELP: messages in flight per connection (librelp's default)
    ack_timeout: float = 30.0  # RELP: longest wait for an answer with messages in flight
    profile: str = "uniform"  # relay.tools.fleet.PROFILES

    @property
    def msg_size(self) -> int:
        """The size asked for, or the profile's default."""
        if self.size:
            return self.size
        return 300 if self.profile == "uniform" else fleet.DEFAULT_MEDIAN

    @property
    def relp(self) -> bool:
        return self.transport.startswith("relp")

    @property
    def uses_tls(self) -> bool:
        return self.transport in ("tls", "relp+tls")

    def check(self) -> None:
        problems = []
        if self.transport not in TRANSPORTS:
            problems.append(f"transport must be one of {', '.join(TRANSPORTS)}")
        if self.framing not in FRAMINGS:
            problems.append(f"framing must be one of {', '.join(FRAMINGS)}")
        if self.format not in FORMATS:
            problems.append(f"format must be one of {', '.join(FORMATS)}")
        if self.tls_records not in TLS_RECORDS:
            problems.append(f"tls records must be one of {', '.join(TLS_RECORDS)}")
        if self.connections < 1:
            problems.append("connections must be at least 1")
        if self.count <= 0 and self.duration <= 0:
            problems.append("give a count or a duration (or both)")
        if self.count < 0 or self.duration < 0 or self.rate < 0:
            problems.append("count, duration and rate must not be negative")
        if self.size and not 64 <= self.size <= 1024 * 1024:
            problems.append("size must be between 64 and 1048576 bytes")
        if self.profile not in fleet.PROFILES:
            problems.append(f"profile must be one of {', '.join(fleet.PROFILES)}")
        if self.batch < 1024:
            problems.append("batch must be at least 1024 bytes")
        if self.seq_start < 0 or self.seq_start + _total(self) > 9_999_999_999:
            problems.append("sequence numbers must stay within 10 digits")
        if not 1 <= self.window <= 1_000_000:
            problems.append("window must be between 1 and 1000000")
        if self.ack_timeout <= 0:
            problems.append("ack timeout must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("a client certificate needs its key (and the other way round)")
        if problems:
            raise LoadgenError("; ".join(problems))


@dataclass
class Digest:
    """Count and order-independent checksum of a set of messages.

    The checksum is the sum (mod 2**64) of each message's 8-byte BLAKE2b,
    so it does not depend on the order in which messages arrive or on how
    they were spread over connections.
    """

    count: int = 0
    checksum: int = 0

    def add(self, msg: bytes) -> None:
        self.count += 1
        self.checksum = (
            self.checksum + int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "big")
        ) & _MASK64

    def update(self, msgs: Iterable[bytes]) -> Digest:
        b2 = hashlib.blake2b
        n = 0
        total = self.checksum
        for m in msgs:
            total += int.from_bytes(b2(m, digest_size=8).digest(), "big")
            n += 1
        self.count += n
        self.checksum = total & _MASK64
        return self

    def merge(self, other: Digest) -> None:
        self.count += other.count
        self.checksum = (self.checksum + other.checksum) & _MASK64


@dataclass
class Result:
    spec: dict[str, Any]
    sent: int = 0
    bytes: int = 0  # wire bytes, framing included (TLS: plaintext)
    payload: int = 0  # message bytes alone (no framing)
    start: float = 0.0  # epoch seconds when sending began
    end: float = 0.0
    elapsed: float = 0.0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    checksum: int = 0
    pregen_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def report(self) -> str:
        s = self.spec
        verb = "sent and acknowledged" if s["transport"].startswith("relp") else "sent"
        return (
            f"{verb} {self.sent} messages ({self.bytes / 1e6:.1f} MB) over {s['connections']} "
            f"{s['transport']} connection(s) in {self.elapsed:.3f} s: "
            f"{self.msgs_per_s:,.0f} msg/s, {self.mb_per_s:.1f} MB/s "
            f"(pre-generation {self.pregen_seconds:.2f} s, checksum {self.checksum:016x})"
            + "".join(f"\nerror: {e}" for e in self.errors)
        )


# --- message mix --------------------------------------------------------------

_APPS = (
    ("sshd", True),
    ("kernel", False),
    ("CRON", True),
    ("nginx", True),
    ("postfix/smtpd", True),
    ("systemd", True),
    ("app-server", True),
    ("dhclient", True),
    ("sudo", False),
    ("haproxy", True),
)
_TEXTS = (
    "Accepted publickey for deploy from 10.1.2.3 port 51234 ssh2: ED25519 SHA256:abc",
    "GET /api/v1/orders?id=12345 HTTP/1.1 200 512 0.004 upstream=10.0.0.7:8080",
    "connect from unknown[192.0.2.15] helo=mail.example.net",
    "Started Session 4711 of user alice.",
    "pam_unix(sudo:session): session opened for user root(uid=0) by bob(uid=1000)",
    "eth0: link up, 10000 Mbps, full duplex, flow control rx/tx",
    "Benutzer Jürgen hat sich angemeldet: Grüße aus Köln",
    "ошибка подключения к базе данных: тайм-аут",
    "ジョブが正常に完了しました (経過時間 1.2 秒)",
    "backend web/srv2 is DOWN, reason: Layer4 timeout, check duration: 2001ms",
)
_SD = (
    b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]',
    b'[origin ip="192.0.2.1" software="app-server" swVersion="4.2"][meta sequenceId="17"]',
    b'[timeQuality tzKnown="1" isSynced="1"]',
)
_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class _Template:
    head: bytes  # everything before the timestamp
    mid: bytes  # between the timestamp and the sequence number
    tail: bytes  # after the sequence number


def _templates(spec: LoadSpec, conn: int, n: int = 256) -> list[_Template]:
    """``n`` varied message shapes; sizes spread around ``spec.size``."""
    rng = random.Random(spec.seed * 1_000_003 + conn)
    out = []
    target = min(spec.msg_size, _UDP_MAX) if spec.transport == "udp" else spec.msg_size
    for _ in range(n):
        app, has_pid = rng.choice(_APPS)
        host = f"host{rng.randrange(50):02d}.dc{rng.randrange(3)}.example.net"
        pri = rng.randrange(8) + 8 * rng.choice((1, 3, 4, 10, 16, 23))
        pid = rng.randrange(1, 65536)
        text = rng.choice(_TEXTS)
        if spec.format == "5424":
            sd = rng.choice(_SD) if rng.random() < 0.3 else b"-"
            msgid = rng.choice((b"-", b"ID47", b"AUDIT", b"REQ"))
            procid = str(pid).encode() if has_pid else b"-"
            head = b"<%d>1 " % pri
            mid = b" %s %s %s %s %s" % (host.encode(), app.encode(), procid, msgid, sd)
        else:
            head = b"<%d>" % pri
            tag = f"{app}[{pid}]:" if has_pid else f"{app}:"
            mid = b" %s %s" % (host.encode(), tag.encode())
        # Sizes vary +-30% around the target; the filler is ASCII so the cut
        # never splits a UTF-8 sequence of the text before it.
        want = max(64, int(target * rng.uniform(0.7, 1.3)))
        base = len(head) + 27 + len(mid) + len(" seq=0000000000 ")
        body = text.encode()
        room = want - base - len(body) - 1
        pad = (_FILLER * (room // len(_FILLER) + 1))[: max(room, 0)].encode()
        tail = b" " + body + (b" " + pad if pad else b"")
        out.append(_Template(head, mid, tail))
    return out


def _timestamp(fmt: str, now: float) -> bytes:
    t = time.gmtime(now)
    if fmt == "5424":
        return b"%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
            t.tm_year,
            t.tm_mon,
            t.tm_mday,
            t.tm_hour,
            t.tm_min,
            t.tm_sec,
            int(now % 1 * 1e6),
        )
    return b"%s %2d %02d:%02d:%02d" % (
        _MONTHS[t.tm_mon - 1].encode(),
        t.tm_mday,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


@functools.lru_cache(maxsize=64)
def _cached_templates(spec: LoadSpec, conn: int) -> list[_Template]:
    return _templates(spec, conn)


def generate(spec: LoadSpec, conn: int, seqs: Iterable[int]) -> list[bytes]:
    """The messages (without framing) connection ``conn`` sends for ``seqs``.

    ``uniform``: all carry the current time as their timestamp (one per call:
    the hour is what a relay routes by, and formatting a clock per message
    costs). Other profiles (relay.tools.fleet): every message its own timestamp,
    advancing from now at the rate asked for (1 µs apart when flat out).
    """
    if spec.profile != "uniform":
        step = (1.0 / spec.rate if spec.rate else 1e-6) * spec.connections
        clip = _UDP_MAX if spec.transport == "udp" else 0
        return fleet.generate(
            spec.profile, spec.seed, conn, seqs, spec.msg_size, step=step, max_size=clip
        )
    tpls = _cached_templates(spec, conn)
    ts = _timestamp(spec.format, time.time())
    n = len(tpls)
    return [
        b"%s%s%s seq=%010d%s" % (t.head, ts, t.mid, seq, t.tail)
        for seq in seqs
        for t in (tpls[seq % n],)
    ]


def frame(msgs: Sequence[bytes], framing: str) -> bytes:
    """RFC 6587 framing of ``msgs``: octet-counted ("LEN SP MSG") or LF-terminated."""
    if framing == "lf":
        return b"\n".join(msgs) + b"\n" if msgs else b""
    return octet.encode_many(msgs)


def parse_frames(data: bytes, framing: str) -> list[bytes]:
    """Inverse of :func:`frame` for a complete buffer (tests and simple receivers)."""
    if framing == "lf":
        return data.split(b"\n")[:-1] if data else []
    out = []
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        n = int(data[pos:sp])
        out.append(data[sp + 1 : sp + 1 + n])
        pos = sp + 1 + n
    return out


# --- connections --------------------------------------------------------------


def _tls_context(spec: LoadSpec) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if spec.tls_verify:
        if spec.tls_ca:
            ctx.load_verify_locations(spec.tls_ca)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.tls_cert and spec.tls_key:
        ctx.load_cert_chain(spec.tls_cert, spec.tls_key)
    return ctx


class _Conn:
    """One connection: a socket and, for TLS, an SSLObject over memory BIOs."""

    def __init__(self, spec: LoadSpec, ctx: ssl.SSLContext | None) -> None:
        self.spec = spec
        kind = socket.SOCK_DGRAM if spec.transport == "udp" else socket.SOCK_STREAM
        infos = socket.getaddrinfo(spec.host, spec.port, type=kind)
        if not infos:
            raise LoadgenError(f"cannot resolve {spec.host}")
        family, _, _, _, addr = infos[0]
        self.sock = socket.socket(family, kind)
        self.sock.settimeout(spec.connect_timeout)
        try:
            self.sock.connect(addr)
        except OSError as exc:
            self.sock.close()
            raise LoadgenError(f"cannot connect to {spec.host}:{spec.port}: {exc}") from exc
        if kind == socket.SOCK_DGRAM:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        else:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls: ssl.SSLObject | None = None
        self._out = ssl.MemoryBIO()
        self._in = ssl.MemoryBIO()
        if ctx is not None:
            self._handshake(ctx)
        # Sends block (the kernel buffer is the flow control); the timeout only
        # bounds a receiver that stops reading altogether.
        self.sock.settimeout(max(60.0, spec.duration + 60.0))

    def _handshake(self, ctx: ssl.SSLContext) -> None:
        inc = self._in
        name = self.spec.tls_server_name or (self.spec.host if self.spec.tls_verify else None)
        tls = ctx.wrap_bio(inc, self._out, server_hostname=name)
        deadline = time.monotonic() + self.spec.connect_timeout
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                raise LoadgenError(f"TLS handshake failed: {exc}") from exc
            self._flush()
            if time.monotonic() > deadline:
                raise LoadgenError("TLS handshake timed out")
            data = self.sock.recv(65536)
            if not data:
                raise LoadgenError("connection closed during the TLS handshake")
            inc.write(data)
        self._flush()
        self.tls = tls

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def wire(self, plain: bytes, msgs: Sequence[bytes] | None = None) -> bytes:
        """Bytes to put on the wire for ``plain`` (encrypted for TLS).

        With per-message TLS records, ``msgs`` gives the record boundaries.
        """
        if self.tls is None:
            return plain
        if msgs is not None and self.spec.tls_records == "per-message":
            lf = self.spec.framing == "lf"
            for m in msgs:
                self.tls.write(m + b"\n" if lf else octet.encode(m))
        else:
            view = memoryview(plain)
            for i in range(0, len(view), _TLS_RECORD):
                self.tls.write(view[i : i + _TLS_RECORD])
        return self._out.read()

    def send(self, plain: bytes) -> None:
        """Send ``plain`` now (encrypted for TLS, in large records)."""
        self.sock.sendall(self.wire(plain))

    def receive(self, timeout: float) -> bytes | None:
        """Plaintext received within ``timeout`` (b"" if none yet); None when the peer closed."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return b""
        data = self.sock.recv(65536)
        if not data:
            return None
        if self.tls is None:
            return data
        self._in.write(data)
        out: list[bytes] = []
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                return b"".join(out) if out else None
            if not chunk:
                break
            out.append(chunk)
        self._flush()  # TLS 1.3 may answer post-handshake messages
        return b"".join(out)

    def close(self) -> None:
        try:
            if self.tls is not None:
                try:
                    self.tls.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLError):
                    pass  # close_notify is queued; we do not wait for the peer's
                self._flush()
            if self.spec.transport != "udp":
                self.sock.shutdown(socket.SHUT_WR)
                # Wait briefly for the receiver to close too, so everything sent
                # has been read before the run is declared finished.
                self.sock.settimeout(5.0)
                end = time.monotonic() + 5.0
                while time.monotonic() < end:
                    if not self.sock.recv(65536):
                        break
        except OSError:
            pass
        finally:
            self.sock.close()


@dataclass
class _Batch:
    wire: bytes | list[bytes]  # a list: UDP datagrams, one per message
    msgs: int
    nbytes: int  # plaintext bytes, framing included
    digest: Digest
    payload: int = 0
    relp: list[bytes] | None = None  # RELP: the messages (``wire``: their commands)
    command_ends: list[int] = field(default_factory=list)  # RELP: end of each command
    answers: bytes | None = None  # RELP: the answers expected to them
    answer_ends: list[int] = field(default_factory=list)
    first: int = 0  # RELP: TXNR of the first command
    after: int = 0  # RELP: the TXNR that follows the last


def _batches(
    spec: LoadSpec, conn: int, conn_rate: float, seqs: Iterator[int], c: _Conn
) -> Iterator[_Batch]:
    """Wire-ready batches for one connection (lazy; callers may pre-generate)."""
    per = max(1, spec.batch // spec.msg_size)
    if conn_rate > 0:
        # At most ~10 ms of the rate per batch, so pacing stays smooth.
        per = max(1, min(per, int(conn_rate / 100)))
    txnr = _FIRST_SYSLOG
    while True:
        chunk = list(itertools.islice(seqs, per))
        if not chunk:
            return
        msgs = generate(spec, conn, chunk)
        digest = Digest().update(msgs)
        payload = sum(map(len, msgs))
        if spec.transport == "udp":
            yield _Batch(msgs, len(msgs), payload, digest, payload)
        elif spec.relp:
            wire, ends, after = syslog_commands(msgs, txnr)
            answers, answer_ends = ok_answers(txnr, len(msgs))
            yield _Batch(
                wire,
                len(msgs),
                payload,
                digest,
                payload,
                msgs,
                ends,
                answers,
                answer_ends,
                txnr,
                after,
            )
            txnr = after
        else:
            plain = frame(msgs, spec.framing)
            yield _Batch(c.wire(plain, msgs), len(msgs), len(plain), digest, payload)


@dataclass
class _Stats:
    sent: int = 0
    nbytes: int = 0
    payload: int = 0
    digest: Digest = field(default_factory=Digest)
    start: float = 0.0
    end: float = 0.0
    error: str | None = None


@dataclass
class _Prepared:
    conn: int
    c: _Conn
    batches: Iterable[_Batch]
    rate: float


def _total(spec: LoadSpec) -> int:
    if spec.count:
        return spec.count
    if spec.rate:
        return int(spec.rate * spec.duration) + 1
    return 0


def _prepare(spec: LoadSpec, conns: Sequence[int]) -> list[_Prepared]:
    ctx = _tls_context(spec) if spec.uses_tls else None
    total = _total(spec)
    conn_rate = spec.rate / spec.connections
    out = []
    for k in conns:
        c = _Conn(spec, ctx)
        first = spec.seq_start + k
        seqs: Iterator[int] = (
            iter(range(first, spec.seq_start + total, spec.connections))
            if total
            else itertools.count(first, spec.connections)
        )
        gen = _batches(spec, k, conn_rate, seqs, c)
        # Pre-generate whenever the amount is known: generation (and TLS
        # encryption) then stays outside the measured interval.
        out.append(_Prepared(k, c, list(gen) if total else gen, conn_rate))
    return out


def _send(p: _Prepared, duration: float, stats: _Stats) -> None:
    if p.c.spec.relp:
        _send_relp(p, duration, stats)
        return
    sock = p.c.sock
    stats.start = time.time()
    t0 = time.monotonic()
    stop_at = t0 + duration if duration else float("inf")
    try:
        for b in p.batches:
            now = time.monotonic()
            if p.rate:
                due = t0 + stats.sent / p.rate
                if due > now:
                    time.sleep(min(due, stop_at) - now)
                    now = time.monotonic()
            if now >= stop_at:
                break
            if isinstance(b.wire, list):
                for m in b.wire:
                    sock.send(m)
            else:
                sock.sendall(b.wire)
            stats.sent += b.msgs
            stats.nbytes += b.nbytes
            stats.payload += b.payload
            stats.digest.merge(b.digest)
    except OSError as exc:
        stats.error = f"connection {p.conn}: {exc}"
    stats.end = time.time()
    p.c.close()


def _relp_wait(c: _Conn, session: ClientSession, timeout: float) -> list[ClientEvent]:
    """RELP events from what the server sends within ``timeout`` (none: [])."""
    data = c.receive(timeout)
    if data is None:
        raise LoadgenError("the server closed the connection")
    return session.feed(data) if data else []


class _RelpAcks:
    """Which of the pre-framed commands the server answered ``200 OK``, in order.

    The answers a server sends (ServerSession, librelp) are known ahead: a read is
    checked with one comparison against them, and a search of their ends counts the
    complete ones, so the generator spends next to nothing per message on them.
    Anything else (answers out of order, a refusal, ``serverclose``) switches the
    connection to the general parser for good, which accepts answers in any order
    and counts the acknowledged prefix.
    """

    def __init__(self, first: int) -> None:
        self.acked = 0  # commands answered 200, a prefix of those sent
        self.sent = 0
        self.closed = False
        self._first = first
        self._next = first  # TXNR of the oldest command not answered (general parser)
        self._closing = 0  # TXNR of ``close`` once sent
        # Answers expected, a batch each: (answers, end of each, TXNR of the first).
        self._expected: deque[tuple[bytes, list[int], int]] = deque()
        self._off = 0  # bytes of the first batch's answers received
        self._done = 0  # its answers received whole
        self._parser: RelpParser | None = None
        self._answered: set[int] = set()
        self._pending = b""  # for the parser: the answer begun before it took over

    def expect(self, batch: _Batch) -> None:
        assert batch.answers is not None
        self._expected.append((batch.answers, batch.answer_ends, batch.first))

    def close(self, txnr: int) -> None:
        """``close`` was sent as ``txnr``: its answer ends the session."""
        self._closing = txnr
        self._general(b"")

    def feed(self, data: bytes) -> int:
        """How many more commands are acknowledged (in order) with ``data``."""
        before = self.acked
        if self._parser is None:
            i = self._fast(data)
            if i < 0:
                return self.acked - before
            self._general(data[i:])
            data = b""
        self._slow(data)
        return self.acked - before

    def _fast(self, data: bytes) -> int:
        """Count the expected answers ``data`` holds; -1, or where it differs from them."""
        i, size = 0, len(data)
        expected = self._expected
        while i < size:
            if not expected:
                return i
            answers, ends, _ = expected[0]
            off = self._off
            take = min(size - i, len(answers) - off)
            if not answers.startswith(data[i : i + take] if i or take < size else data, off):
                return i
            i += take
            off += take
            done = bisect.bisect_right(ends, off)
            self.acked += done - self._done
            if off == len(answers):
                expected.popleft()
                self._off = self._done = 0
            else:
                self._off, self._done = off, done
        return -1

    def _general(self, rest: bytes) -> None:
        """From here on, answers go through the parser (with the answer begun in part)."""
        if self._parser is not None:
            return
        begun = b""
        if self._expected:
            answers, ends, _ = self._expected[0]
            begun = answers[ends[self._done - 1] if self._done else 0 : self._off]
        self._next = _txnr_after(self._first, self.acked)
        self._expected.clear()
        self._parser = RelpParser(64 * 1024)
        self._pending = begun + rest

    def _slow(self, data: bytes) -> None:
        assert self._parser is not None
        data, self._pending = self._pending + data, b""
        refused = None
        for frame in self._parser.feed(data):
            txnr = frame.txnr  # type: ignore[union-attr]
            command = frame.command  # type: ignore[union-attr]
            if txnr == 0:
                if command == "serverclose" and self._closing:
                    self.closed = True  # after the answer to close, as librelp does
                elif command == "serverclose":
                    refused = "the server closed the session (serverclose)"
                    break
                continue  # unknown hints are ignorable
            if command != "rsp":
                raise LoadgenError(f"server sent command {command!r}")
            if txnr == self._closing:
                self.closed = True
                continue
            if (txnr - self._next) % MAX_TXNR >= self.sent - self.acked:
                raise LoadgenError(f"rsp for unknown txnr {txnr}")
            status = frame.data  # type: ignore[union-attr]
            if not status.startswith(b"200"):
                refused = "message refused: " + status[:80].decode("utf-8", "replace")
                break
            self._answered.add(txnr)
        answered = self._answered
        while self._next in answered:
            answered.discard(self._next)
            self._next = next_txnr(self._next)
            self.acked += 1
        if refused is not None:
            raise LoadgenError(refused)


def _txnr_after(txnr: int, k: int) -> int:
    return (txnr - 1 + k) % MAX_TXNR + 1


def _send_relp(p: _Prepared, duration: float, stats: _Stats) -> None:
    """RELP: keep up to ``window`` messages in flight; count what was acknowledged.

    The commands are framed ahead (their TXNRs follow the ``open``'s), so a refill of
    the window is one send of a slice of them; the answers are checked as
    :class:`_RelpAcks` says. On the wire this is what omrelp sends: one ``syslog``
    command per message, at most ``window`` unanswered.
    """
    spec, c = p.c.spec, p.c
    session = ClientSession(spec.window, software="syslog-relay-loadgen")
    sent: list[_Batch] = []  # batches whose messages were (at least partly) sent
    acks = _RelpAcks(_FIRST_SYSLOG)
    try:
        c.send(session.open())
        deadline = time.monotonic() + spec.connect_timeout
        while session.state != "open":
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadgenError("no answer to RELP open")
            _relp_wait(c, session, min(left, 0.5))
        if session.txnr != _FIRST_SYSLOG:  # pragma: no cover - open is always TXNR 1
            raise LoadgenError("RELP session numbered otherwise than expected")
        stats.start = time.time()
        t0 = time.monotonic()
        stop_at = t0 + duration if duration else float("inf")
        batches = iter(p.batches)
        cur: _Batch | None = None
        pos = 0  # commands of ``cur`` sent
        after = _FIRST_SYSLOG  # TXNR after the last command framed
        more = True
        last_answer = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= stop_at:
                more = False
            out: list[bytes | memoryview] = []
            room = spec.window - (acks.sent - acks.acked)
            wait = spec.ack_timeout
            while more and room:
                if cur is None or pos == cur.msgs:
                    nxt = next(batches, None)
                    if nxt is None or nxt.relp is None:
                        more = False
                        break
                    if nxt.first != after:  # pragma: no cover - batches are framed in order
                        raise LoadgenError("RELP batches framed out of order")
                    after = nxt.after
                    sent.append(nxt)
                    acks.expect(nxt)
                    cur, pos = nxt, 0
                take = min(room, cur.msgs - pos)
                if p.rate:
                    allowed = int((now - t0) * p.rate) + 1 - acks.sent
                    if allowed <= 0:
                        wait = t0 + acks.sent / p.rate - now
                        break
                    take = min(take, allowed)
                ends = cur.command_ends
                wire = memoryview(cur.wire)  # type: ignore[arg-type]
                out.append(wire[ends[pos - 1] if pos else 0 : ends[pos + take - 1]])
                pos += take
                acks.sent += take
                room -= take
            if out:
                data = out[0] if len(out) == 1 else b"".join(out)
                c.send(data)  # type: ignore[arg-type]
                stats.nbytes += len(data)
            if acks.sent == acks.acked:
                if not more:
                    break
                time.sleep(max(0.0, min(wait, stop_at - time.monotonic())))
                continue
            got = c.receive(min(wait, spec.ack_timeout) if more else 0.5)
            if got is None:
                raise LoadgenError("the server closed the connection")
            if got and acks.feed(got):
                last_answer = time.monotonic()
            if time.monotonic() - last_answer > spec.ack_timeout:
                raise LoadgenError(f"no answer for {spec.ack_timeout:g} s")
        c.send(encode(RelpFrame(after, "close")))
        acks.close(after)
        end = time.monotonic() + 5.0
        while not acks.closed and time.monotonic() < end:
            got = c.receive(0.5)
            if got is None:
                break
            acks.feed(got)
    except (OSError, ssl.SSLError, RelpError, LoadgenError) as exc:
        stats.error = f"connection {p.conn}: {exc}"
    stats.end = time.time()
    # Acknowledgements are in order: what counts is the acknowledged prefix.
    left = acks.acked
    for b in sent:
        assert b.relp is not None
        take = min(left, b.msgs)
        if take == b.msgs:
            stats.digest.merge(b.digest)
            stats.payload += b.payload
        elif take:
            part = b.relp[:take]
            stats.digest.merge(Digest().update(part))
            stats.payload += sum(map(len, part))
        left -= take
    stats.sent = acks.acked
    c.close()


def _run_prepared(spec: LoadSpec, prepared: Sequence[_Prepared]) -> list[_Stats]:
    stats = [_Stats() for _ in prepared]
    threads = [
        threading.Thread(target=_send, args=(p, spec.duration, s), daemon=True)
        for p, s in zip(prepared, stats, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


class _Part(TypedDict):
    """One connection's _Stats, as a worker process sends them back."""

    sent: int
    nbytes: int
    payload: int
    count: int
    checksum: int
    start: float
    end: float
    error: str | None


def _stats_to_dict(s: _Stats) -> _Part:
    return {
        "sent": s.sent,
        "nbytes": s.nbytes,
        "payload": s.payload,
        "count": s.digest.count,
        "checksum": s.digest.checksum,
        "start": s.start,
        "end": s.end,
        "error": s.error,
    }


def _worker(
    spec: LoadSpec,
    conns: list[int],
    ready: Queue[tuple[str, str | float]],
    go: Event,
    results: Queue[list[_Part]],
) -> None:
    """Child process: connect and pre-generate, report ready, wait, send."""
    t = time.monotonic()
    try:
        prepared = _prepare(spec, conns)
    except (LoadgenError, OSError, ssl.SSLError) as exc:
        ready.put(("error", str(exc)))
        return
    ready.put(("ready", time.monotonic() - t))
    if not go.wait(timeout=_READY_TIMEOUT):
        return
    results.put([_stats_to_dict(s) for s in _run_prepared(spec, prepared)])


_READY_TIMEOUT = 600.0


def _collect(spec: LoadSpec, parts: list[_Part], pregen: float) -> Result:
    res = Result(spec=asdict(spec), pregen_seconds=pregen)
    digest = Digest()
    for p in parts:
        res.sent += p["sent"]
        res.bytes += p["nbytes"]
        res.payload += p["payload"]
        digest.merge(Digest(p["count"], p["checksum"]))
        if p["error"]:
            res.errors.append(p["error"])
    started = [p["start"] for p in parts if p["start"]]
    ended = [p["end"] for p in parts if p["end"]]
    res.start = min(started) if started else 0.0
    res.end = max(ended) if ended else 0.0
    res.elapsed = max(res.end - res.start, 1e-9)
    res.msgs_per_s = res.sent / res.elapsed
    res.mb_per_s = res.bytes / res.elapsed / 1e6
    res.checksum = digest.checksum
    return res


def run(spec: LoadSpec) -> Result:
    """Generate and send the load described by ``spec``; blocks until done."""
    spec.check()
    procs = spec.processes or min(spec.connections, os.cpu_count() or 1)
    procs = max(1, min(procs, spec.connections))
    if procs == 1:
        t = time.monotonic()
        prepared = _prepare(spec, range(spec.connections))
        pregen = time.monotonic() - t
        stats = _run_prepared(spec, prepared)
        return _collect(spec, [_stats_to_dict(s) for s in stats], pregen)

    mp = multiprocessing.get_context("fork")
    ready, results = mp.Queue(), mp.Queue()
    go = mp.Event()
    groups = [list(range(i, spec.connections, procs)) for i in range(procs)]
    workers = [
        mp.Process(target=_worker, args=(spec, g, ready, go, results), daemon=True) for g in groups
    ]
    for w in workers:
        w.start()
    try:
        pregen = 0.0
        errors = []
        for _ in workers:
            kind, value = ready.get(timeout=_READY_TIMEOUT)
            if kind == "error":
                errors.append(value)
            else:
                pregen = max(pregen, value)
        if errors:
            raise LoadgenError("; ".join(errors))
        go.set()
        parts: list[_Part] = []
        limit = time.monotonic() + (spec.duration or 0) + _READY_TIMEOUT
        for _ in workers:
            parts.extend(results.get(timeout=max(1.0, limit - time.monotonic())))
        return _collect(spec, parts, pregen)
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()


# --- command line ---------------------------------------------------------------


def _address(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="syslog-relay loadgen",
        description="Send generated syslog messages and report the throughput.",
    )
    p.add_argument("address", type=_address, help="HOST:PORT of the receiver")
    p.add_argument("-t", "--transport", choices=TRANSPORTS, default="tcp")
    p.add_argument(
        "-F",
        "--framing",
        choices=(*FRAMINGS, "octet"),
        default="octet-counting",
        help="RFC 6587 framing for tcp/tls (default octet-counting)",
    )
    p.add_argument("-f", "--format", choices=FORMATS, default="5424", help="syslog format")
    p.add_argument("-c", "--connections", type=int, default=1)
    p.add_argument(
        "-P", "--processes", type=int, default=0, help="sender processes (default: min(c, CPUs))"
    )
    p.add_argument("-n", "--count", type=int, default=0, help="messages in total")
    p.add_argument("-d", "--duration", type=float, default=0.0, help="seconds to send for")
    p.add_argument(
        "-r", "--rate", type=float, default=0.0, help="messages/s in total (default: flat out)"
    )
    p.add_argument(
        "-s",
        "--size",
        type=int,
        default=0,
        help="message size in bytes: the mean (uniform, default 300) or the median "
        f"(other profiles, default {fleet.DEFAULT_MEDIAN})",
    )
    p.add_argument(
        "-p",
        "--profile",
        choices=fleet.PROFILES,
        default="uniform",
        help="traffic: " + "; ".join(f"{k}: {v}" for k, v in fleet.PROFILE_HELP.items()),
    )
    p.add_argument("--batch", type=int, default=256 * 1024, help="bytes per send (default 256K)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seq-start", type=int, default=0, help="first seq= number (default 0)")
    p.add_argument(
        "--window", type=int, default=128, help="RELP: messages in flight per connection"
    )
    p.add_argument(
        "--ack-timeout", type=float, default=30.0, help="RELP: seconds to wait for an answer"
    )
    p.add_argument("--tls-cert", help="client certificate (PEM), for tls and relp+tls")
    p.add_argument("--tls-key", help="client key (PEM)")
    p.add_argument("--tls-ca", help="CA to verify the server with (implies --tls-verify)")
    p.add_argument("--tls-verify", action="store_true", help="verify the server certificate")
    p.add_argument("--tls-server-name", help="name to verify and send as SNI")
    p.add_argument(
        "--tls-records",
        choices=TLS_RECORDS,
        default="large",
        help="large: 16 KiB TLS records; per-message: one TLS record per message",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    host, port = args.address
    spec = LoadSpec(
        host=host,
        port=port,
        transport=args.transport,
        framing="octet-counting" if args.framing == "octet" else args.framing,
        format=args.format,
        connections=args.connections,
        processes=args.processes,
        count=args.count,
        duration=args.duration,
        rate=args.rate,
        size=args.size,
        profile=args.profile,
        batch=args.batch,
        seed=args.seed,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        tls_verify=args.tls_verify or bool(args.tls_ca),
        tls_server_name=args.tls_server_name,
        tls_records=args.tls_records,
        seq_start=args.seq_start,
        window=args.window,
        ack_timeout=args.ack_timeout,
    )
    try:
        result = run(spec)
    except LoadgenError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)) if args.json else result.report())
    return 1 if result.errors else 0
