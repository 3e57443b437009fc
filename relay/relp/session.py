"""RELP (rsyslog's Reliable Event Logging Protocol), sans-IO: frame codec and session states.

Wire format (librelp doc/relp.md, checked against librelp's src/): a frame is
``TXNR SP COMMAND SP DATALEN [SP DATA] LF`` with TXNR and DATALEN of 1 to 9 digits and
COMMAND of 1 to 32 letters; when DATALEN is 0 the LF follows the length directly. A client
opens with ``open`` (offers), sends ``syslog`` commands (one message each) and ends with
``close``; the server answers every command with an ``rsp`` frame carrying the same TXNR,
in the order the commands came, whose data starts with a 3-digit status ("200 OK",
"500 reason"). ``0 serverclose 0`` is the server's hint that it is going away.

What librelp does, and so do we:
- the client's TXNRs start at 1 and go up by one; the server drops a session whose TXNR is
  out of sequence. After 999999999 comes 1 (the spec's latch; librelp's macro would emit a
  10-digit number there, which its own parser refuses).
- a frame whose DATALEN exceeds the maximum ends the session before any data is buffered;
  so does any framing error (the spec: the detecting peer closes, no recovery). The one
  exception is a ``syslog`` command on a server told an ``oversize`` policy (rsyslog's
  imrelp ``oversizeMode``): its data is read past without being buffered, kept up to the
  maximum (``truncate``, flagged) or not at all (``reject``, answered ``500``), and the
  session goes on.
- librelp announces ``relp_version=0`` and refuses a server answering a higher version; the
  server answers min(client's, 1) so both librelp and spec-following clients accept it.
- the rsp to ``open`` is ``200 OK`` LF offers; to ``close`` it is empty, and the server then
  sends ``serverclose`` and closes the connection.
- ``syslog`` before a successful ``open`` is answered ``500 command disabled``.

Nothing here touches a socket or a clock: ``feed()`` takes bytes and returns events, the
methods that answer return the bytes to write.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from relay import __version__

__all__ = [
    "MAX_TXNR",
    "Acked",
    "ClientSession",
    "Close",
    "Closed",
    "Messages",
    "Nacked",
    "Open",
    "Opened",
    "Rejected",
    "RelpError",
    "RelpFrame",
    "RelpParser",
    "ServerClose",
    "ServerSession",
    "SyslogRun",
    "encode",
    "format_offers",
    "next_txnr",
    "ok_answers",
    "parse_offers",
    "syslog_commands",
]

MAX_TXNR = 999_999_999
MAX_DATALEN = 999_999_999
_MIN_FRAME = 4096  # room for open offers whatever the configured message limit
_MAX_HEADER = 9 + 1 + 32 + 1 + 9 + 1  # TXNR SP COMMAND SP DATALEN (SP|LF)
SOFTWARE = "syslog-relay"


class RelpError(Exception):
    """Malformed or out-of-protocol input; the connection must be closed.

    ``offset`` is the position in the received stream (bytes since the connection
    started) of the byte that was refused, or of the frame that was.
    """

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(f"{reason} at byte {offset}")
        self.reason = reason
        self.offset = offset


class RelpFrame(NamedTuple):
    """One frame (a named tuple: one is made per message, and a dataclass costs more)."""

    txnr: int
    command: str
    data: bytes = b""
    oversize: int = 0  # DATALEN when it exceeded the maximum: data holds at most the maximum


class SyslogRun(NamedTuple):
    """Consecutive ``syslog`` commands read in one step: the fast path under load.

    ``frames`` holds their messages octet-counted, each as sent (a RELP frame's
    ``DATALEN SP DATA`` is an RFC 6587 frame), so the relay stages them as a
    stream listener's chunk; ``answers`` holds the ``200 OK`` of every one of
    them, released once they are durable.
    """

    first: int  # TXNR of the first command
    commands: int  # how many
    frames: bytes
    answers: bytes
    after: int  # the TXNR expected next


_RSP_OK = b"rsp 6 200 OK\n"
_RSP_OK_AT = b"%d " + _RSP_OK
_SIZES: dict[bytes, int] = {}  # DATALEN digits seen -> value (no leading zero)
_SIZES_MAX = 65536


def _syslog_run(
    buf: bytes | bytearray, pos: int, txnr: int, max_data: int, out: list[RelpFrame | SyslogRun]
) -> tuple[int, int]:
    """Complete ``syslog`` frames from ``buf[pos]`` with TXNRs ``txnr``, then one more each.

    Appends them to ``out`` as one SyslogRun and returns (where they end, the TXNR
    expected next). Stops at the first frame that is anything else (another
    command or TXNR, a DATALEN of 0, with a leading zero or above ``max_data``, a
    missing LF, a partial frame): the parser's general path takes it from there,
    with its errors and offsets. Per frame the loop does one formatting, one
    ``startswith``, one ``find``, one dict lookup and slices; the answers are
    built once per run.
    """
    if type(buf) is not bytes:
        buf = bytes(buf)  # one copy per read that completed a buffered frame: keys hash
    n = len(buf)
    startswith = buf.startswith
    find = buf.find
    sizes = _SIZES
    view = memoryview(buf)
    parts: list[memoryview] = []
    append = parts.append
    first = txnr
    try:
        while True:
            head = b"%d syslog " % txnr
            if not startswith(head, pos):
                break
            d = pos + len(head)
            sp = find(b" ", d, d + 10)
            if sp <= d:
                break
            size = sizes.get(buf[d:sp])
            if size is None:
                digits = buf[d:sp]
                if not digits.isdigit() or digits[0] == 48:
                    break
                size = int(digits)
                if len(sizes) >= _SIZES_MAX:
                    sizes.clear()
                sizes[digits] = size
            trailer = sp + 1 + size
            if size > max_data or trailer >= n or buf[trailer] != 10:
                break
            append(view[d:trailer])
            pos = trailer + 1
            txnr = 1 if txnr >= MAX_TXNR else txnr + 1
        if parts:
            count = len(parts)
            out.append(SyslogRun(first, count, b"".join(parts), _answers(first, count), txnr))
    finally:
        parts.clear()  # no view may outlive the call
        view.release()
    return pos, txnr


# The answers to TXNRs 100k .. 100k+99 (k >= 1) share the digits of k and have one
# length: they are made by one formatting of a template (a format per answer cost a
# fifth of the RELP parse) and cut out of it by offset.
_ANSWER_TEMPLATE = b"".join(b"%%s%02d %s" % (r, _RSP_OK) for r in range(100))
_answer_blocks: dict[int, bytes] = {}  # k -> its hundred answers; a few recent ones


def _answer_block(k: int) -> bytes:
    block = _answer_blocks.get(k)
    if block is None:
        if len(_answer_blocks) >= 16:
            _answer_blocks.clear()
        block = _answer_blocks[k] = _ANSWER_TEMPLATE % ((b"%d" % k,) * 100)
    return block


def _answers(first: int, count: int) -> bytes:
    """The ``200 OK`` answers to ``count`` commands from TXNR ``first``, as one buffer."""
    last = first + count
    if last > MAX_TXNR + 1:
        return b"".join(_RSP_OK_AT % _wrap(t) for t in range(first, last))
    if first < 100:
        return b"".join(map(_RSP_OK_AT.__mod__, range(first, last)))
    parts = []
    t = first
    while t < last:
        k, r = divmod(t, 100)
        end = min(last - 100 * k, 100)
        block = _answer_block(k)
        size = len(block) // 100
        parts.append(block[r * size : end * size])
        t += end - r
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _wrap(txnr: int) -> int:
    return (txnr - 1) % MAX_TXNR + 1


def next_txnr(txnr: int) -> int:
    return 1 if txnr >= MAX_TXNR else txnr + 1


def syslog_commands(msgs: Sequence[bytes], first: int) -> tuple[bytes, list[int], int]:
    """``syslog`` commands for ``msgs`` numbered from TXNR ``first``, for a client that
    knows its messages ahead (the load generator frames them before its clock starts).

    Returns the commands as one buffer, the end of each in it, and the TXNR that follows.
    """
    if any(len(msg) > MAX_DATALEN for msg in msgs):
        raise ValueError("data too long for RELP")
    txnrs = map(_wrap, range(first, first + len(msgs)))
    parts = [b"%d syslog %d %s\n" % (t, len(m), m) for t, m in zip(txnrs, msgs, strict=True)]
    return (*_joined(parts), _wrap(first + len(msgs)))


def ok_answers(first: int, count: int) -> tuple[bytes, list[int]]:
    """The ``200 OK`` answers to ``count`` commands from TXNR ``first``, byte for byte as
    a server sends them (ServerSession, librelp), and the end of each: a client that
    expects them checks a whole read with one comparison."""
    return _joined([_RSP_OK_AT % _wrap(t) for t in range(first, first + count)])


def _joined(parts: list[bytes]) -> tuple[bytes, list[int]]:
    """``parts`` as one buffer, and the end of each in it."""
    return b"".join(parts), list(itertools.accumulate(map(len, parts)))


def encode(frame: RelpFrame) -> bytes:
    if not 0 <= frame.txnr <= MAX_TXNR:
        raise ValueError(f"txnr {frame.txnr} out of range")
    if not (1 <= len(frame.command) <= 32 and frame.command.isascii() and frame.command.isalpha()):
        raise ValueError(f"invalid command {frame.command!r}")
    n = len(frame.data)
    if n > MAX_DATALEN:
        raise ValueError("data too long for RELP")
    if n == 0:
        return b"%d %s 0\n" % (frame.txnr, frame.command.encode())
    return b"%d %s %d %s\n" % (frame.txnr, frame.command.encode(), n, frame.data)


_HEADER = re.compile(rb"(\d{1,9}) ([A-Za-z]{1,32}) (\d{1,9})([ \n])")
# Command names seen, decoded once (one frame per message: decoding each costs).
_COMMANDS: dict[bytes, str] = {}


def _command(name: bytes) -> str:
    got = _COMMANDS.get(name)
    if got is None:
        got = name.decode()
        if len(_COMMANDS) < 64:
            _COMMANDS[name] = got
    return got


def _header_problem(buf: bytes | bytearray, start: int) -> tuple[str, int] | None:
    """Why the header at ``start`` is invalid (reason, index), or None if only incomplete."""
    i, end = start, len(buf)
    for name, limit, digits in (("txnr", 9, True), ("command", 32, False), ("datalen", 9, True)):
        j = i
        while j < end and j - i <= limit:
            c = buf[j]
            if not ((48 <= c <= 57) if digits else (65 <= c <= 90 or 97 <= c <= 122)):
                break
            j += 1
        if j - i > limit:
            return (f"{name} longer than {limit}", i + limit)
        if j == end:
            return None
        if j == i:
            return (f"{name} expected", j)
        if name == "datalen":
            return None if buf[j] in b" \n" else ("space or LF expected after datalen", j)
        if buf[j] != 0x20:
            return (f"space expected after {name}", j)
        i = j + 1
    return None  # pragma: no cover - the loop always returns


class RelpParser:
    """Incremental RELP frame parser with bounded buffering.

    At most one header (53 bytes) plus one frame's data (<= ``max_data``) is ever held.
    After a RelpError the parser is dead: the stream cannot be resynchronised.

    ``oversize`` (``truncate`` or ``reject``) lets a ``syslog`` frame above ``max_data``
    through as a RelpFrame with ``oversize`` set and its first ``max_data`` bytes
    (``truncate``) or none (``reject``); the rest is discarded as it arrives.
    """

    def __init__(
        self,
        max_data: int,
        max_open: int | None = None,
        oversize: str | None = None,
    ) -> None:
        self.max_data = max_data
        # open carries offers, not a message: it may get its own limit
        self.max_open = max_data if max_open is None else max_open
        self.oversize = oversize
        self._buf = bytearray()
        self._consumed = 0  # stream offset of _buf[0]
        self._failed: RelpError | None = None
        # an oversize frame being read past: (txnr, datalen), where it started, data left,
        # bytes kept
        self._over: tuple[int, int] | None = None
        self._over_start = 0
        self._over_left = 0
        self._over_kept = bytearray()
        # The TXNR of the next ``syslog`` command of an open session (its owner sets
        # it): frames from there are read by the fast path, as SyslogRuns.
        self.next_syslog: int | None = None

    @property
    def frame_start(self) -> int:
        """Stream offset of the frame received in part, or -1 at a frame boundary."""
        if self._over is not None:
            return self._over_start
        return self._consumed if self._buf else -1

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[RelpFrame | SyslogRun]:
        if self._failed is not None:
            raise self._failed
        # Parse the received bytes in place when nothing is buffered (the usual
        # case under load): a frame's data is then one slice, not two copies.
        buf: bytes | bytearray = data
        if self._buf:
            self._buf += data
            buf = self._buf
        frames: list[RelpFrame | SyslogRun] = []
        pos = 0
        n = len(buf)
        match = _HEADER.match
        try:
            while pos < n:
                if self._over is not None:
                    pos = self._read_past(buf, pos, frames)
                    continue
                if self.next_syslog is not None:
                    pos, self.next_syslog = _syslog_run(
                        buf, pos, self.next_syslog, self.max_data, frames
                    )
                    if pos >= n:
                        break
                m = match(buf, pos)
                if m is None:
                    problem = _header_problem(buf, pos)
                    if problem is not None:
                        raise RelpError(problem[0], self._consumed + problem[1])
                    if len(buf) - pos > _MAX_HEADER:  # pragma: no cover - caught above
                        raise RelpError("header too long", self._consumed + pos)
                    break
                txnr, command, length, sep = m.groups()
                datalen = int(length)
                data_start = m.end()
                if datalen == 0:
                    if sep != b"\n":
                        raise RelpError("LF expected after zero datalen", self._consumed + m.end(3))
                    self.next_syslog = None  # the session decides what comes next
                    frames.append(RelpFrame(int(txnr), _command(command), b""))
                    pos = data_start
                    continue
                if sep != b" ":
                    raise RelpError("data missing for non-zero datalen", self._consumed + m.end(3))
                limit = self.max_open if command == b"open" else self.max_data
                if datalen > limit:
                    if self.oversize is not None and command == b"syslog":
                        self.next_syslog = None
                        self._over = (int(txnr), datalen)
                        self._over_start = self._consumed + pos
                        self._over_left = datalen
                        self._over_kept = bytearray()
                        pos = data_start
                        continue
                    raise RelpError(
                        f"datalen {datalen} exceeds maximum {limit}",
                        self._consumed + m.start(3),
                    )
                trailer = data_start + datalen
                if trailer >= n:
                    break
                if buf[trailer] != 0x0A:
                    raise RelpError("LF trailer expected", self._consumed + trailer)
                number = int(txnr)
                frames.append(RelpFrame(number, _command(command), bytes(buf[data_start:trailer])))
                if self.next_syslog is not None:
                    # a syslog command in sequence (one that spanned two reads): the fast
                    # path goes on after it; anything else is for the session to judge
                    follows = command == b"syslog" and number == self.next_syslog
                    self.next_syslog = next_txnr(number) if follows else None
                # bytes(): a no-op on a slice of bytes, the copy out of a bytearray
                pos = trailer + 1
        except RelpError as e:
            self._failed = e
            self._buf = bytearray()
            raise
        self._consumed += pos
        if buf is self._buf:
            del buf[:pos]
        elif pos < n:
            self._buf = bytearray(buf[pos:])
        return frames

    def _read_past(
        self, buf: bytes | bytearray, pos: int, frames: list[RelpFrame | SyslogRun]
    ) -> int:
        """Consume what has arrived of an oversize frame; returns the new position."""
        assert self._over is not None
        take = min(self._over_left, len(buf) - pos)
        want = self.max_data - len(self._over_kept) if self.oversize == "truncate" else 0
        if want > 0:
            self._over_kept += buf[pos : pos + min(take, want)]
        self._over_left -= take
        pos += take
        if self._over_left or pos == len(buf):
            return pos  # more data, or the trailer, still to come
        if buf[pos] != 0x0A:
            raise RelpError("LF trailer expected", self._consumed + pos)
        txnr, datalen = self._over
        frames.append(RelpFrame(txnr, "syslog", bytes(self._over_kept), oversize=datalen))
        self._over = None
        self._over_kept = bytearray()
        return pos + 1


# --- offers ---------------------------------------------------------------------------------


def parse_offers(data: bytes) -> dict[str, list[str]]:
    """``name=v1,v2`` per line (librelp offers.c); a name without ``=`` has no values."""
    offers: dict[str, list[str]] = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        name, eq, values = line.partition(b"=")
        key = name.decode("utf-8", "replace")
        vals = [v.decode("utf-8", "replace") for v in values.split(b",") if v] if eq else []
        offers.setdefault(key, []).extend(vals)
    return offers


def format_offers(offers: Iterable[tuple[str, Iterable[str]]]) -> bytes:
    return b"\n".join((name + "=" + ",".join(values)).encode() for name, values in offers)


def _version(offers: dict[str, list[str]]) -> int | None:
    values = offers.get("relp_version") or []
    if not values or not values[0].isdigit():
        return None
    return int(values[0])


# --- server session -------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """The client opened the session; the answer is queued (``data_to_send``)."""

    offers: dict[str, list[str]]


@dataclass(frozen=True)
class Messages:
    """``syslog`` commands: (txnr, message exactly as sent). Answer with ack()/nack().

    ``truncated``: (txnr, size as sent) of those cut to the maximum (``oversize`` truncate).
    """

    messages: list[tuple[int, bytes]]
    truncated: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Rejected:
    """A ``syslog`` command above the maximum (``oversize`` reject): already answered 500."""

    txnr: int
    size: int


@dataclass(frozen=True)
class Close:
    """The client sent ``close``; its answer follows every pending one (``finished``)."""

    txnr: int


ServerEvent = Open | Messages | SyslogRun | Rejected | Close


class _Slot:
    __slots__ = ("count", "ok", "response", "txnr")

    def __init__(
        self, txnr: int, response: bytes | None = None, ok: bytes | None = None, count: int = 1
    ) -> None:
        self.txnr = txnr  # of the command, or of the first of a SyslogRun's
        self.response = response  # complete rsp frame(s) once decided
        self.ok = ok  # a SyslogRun's answers, prepared: the response once acked
        self.count = count  # commands answered by this slot


class ServerSession:
    """Server side of one RELP connection.

    Every command gets a response slot in arrival order; ``ack``/``nack`` fill message
    slots, and only the filled prefix is released, so responses leave in command order
    whatever order the deliveries finish in.
    """

    def __init__(
        self,
        max_data: int,
        software: str = SOFTWARE,
        version: str = __version__,
        oversize: str = "truncate",
        runs: bool = False,
    ) -> None:
        # open carries offers and must fit whatever the configured message limit is
        self._parser = RelpParser(max_data, max_open=max(max_data, _MIN_FRAME), oversize=oversize)
        self._expected = 1
        self._open = False
        self._closing = False
        self._finished = False
        self._slots: deque[_Slot] = deque()
        self._by_txnr: dict[int, _Slot] = {}
        self._ready = bytearray()
        self.software = software
        self.version = version
        self.offers: dict[str, list[str]] = {}
        # Syslog commands in sequence come as SyslogRuns (the relay's listener), not
        # as Messages, whose one (txnr, message) pair per command costs more.
        self._runs = runs

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def finished(self) -> bool:
        """The close answer (and the serverclose hint) has been released: hang up."""
        return self._finished

    @property
    def pending(self) -> int:
        """Commands received whose answer is not released yet."""
        return sum(slot.count for slot in self._slots)

    @property
    def frame_start(self) -> int:
        """Stream offset of the frame received in part, or -1 at a frame boundary."""
        return self._parser.frame_start

    def feed(self, data: bytes) -> list[ServerEvent]:
        if self._closing:
            return []  # the client may send nothing after close; librelp drops it too
        events: list[ServerEvent] = []
        batch: list[tuple[int, bytes]] = []
        truncated: list[tuple[int, int]] = []
        expected = self._expected
        slots, pending = self._slots, self._by_txnr
        parser = self._parser
        parser.next_syslog = expected if self._open and self._runs else None
        for frame in parser.feed(data):
            if type(frame) is SyslogRun:
                # checked by the parser against next_syslog, which was ``expected``
                if batch:
                    events.append(Messages(batch, tuple(truncated)))
                    batch, truncated = [], []
                slot = _Slot(frame.first, None, frame.answers, frame.commands)
                slots.append(slot)
                pending[frame.first] = slot
                expected = self._expected = frame.after
                events.append(frame)
                continue
            txnr, command, msg, oversize = frame  # type: ignore[misc]
            if txnr == 0:
                continue  # hints from a client: none are defined, and hints need no answer
            if txnr != expected:
                raise RelpError(
                    f"txnr {txnr} out of sequence (expected {expected})",
                    self._parser._consumed,
                )
            expected = self._expected = 1 if txnr >= MAX_TXNR else txnr + 1
            if command == "syslog" and self._open:
                if oversize:
                    if self._parser.oversize == "reject":
                        if batch:
                            events.append(Messages(batch, tuple(truncated)))
                            batch, truncated = [], []
                        limit = self._parser.max_data
                        self._answer(txnr, b"500 message too large (%d > %d)" % (oversize, limit))
                        events.append(Rejected(txnr, oversize))
                        continue
                    truncated.append((txnr, oversize))
                slot = _Slot(txnr)
                slots.append(slot)
                pending[txnr] = slot
                batch.append((txnr, msg))
                continue
            if command == "syslog":
                self._answer(txnr, b"500 command disabled")
                continue
            if batch:
                events.append(Messages(batch, tuple(truncated)))
                batch, truncated = [], []
            if command == "open":
                event = self._on_open(frame)  # type: ignore[arg-type]
                if event is not None:
                    events.append(event)
            elif command == "close":
                self._closing = True
                self._slots.append(_Slot(txnr, _rsp(txnr, b"") + SERVERCLOSE))
                events.append(Close(txnr))
                self._release()
                break
            else:
                raise RelpError(f"unknown command {command!r}", self._parser._consumed)
        if batch:
            events.append(Messages(batch, tuple(truncated)))
        return events

    def _on_open(self, frame: RelpFrame) -> Open | None:
        if self._open:
            self._answer(frame.txnr, b"200 connection already open - ignored")
            return None
        offers = parse_offers(frame.data)
        version = _version(offers)
        if version is None:
            self._answer(frame.txnr, b"500 relp_version offer missing or invalid")
            return None
        if "syslog" not in offers.get("commands", []):
            self._answer(frame.txnr, b"500 required command not supported by client")
            return None
        self.offers = offers
        self._open = True
        reply = format_offers(
            [
                ("relp_version", [str(min(version, 1))]),
                ("relp_software", [self.software, self.version]),
                ("commands", ["syslog"]),
            ]
        )
        self._answer(frame.txnr, b"200 OK\n" + reply)
        return Open(offers)

    def _answer(self, txnr: int, data: bytes) -> None:
        self._slots.append(_Slot(txnr, _rsp(txnr, data)))
        self._release()

    def _release(self) -> None:
        slots = self._slots
        while slots:
            response = slots[0].response
            if response is None:
                break
            slot = slots.popleft()
            self._by_txnr.pop(slot.txnr, None)
            self._ready += response
            if self._closing and not slots:
                self._finished = True

    def _decide(self, txnr: int, response: bytes) -> None:
        slot = self._by_txnr.get(txnr)
        if slot is None or slot.response is not None:
            raise ValueError(f"txnr {txnr} is not awaiting an answer")
        slot.response = response

    def ack(self, txnrs: Iterable[int]) -> bytes:
        """Mark messages durable; returns every answer now releasable, in command order.

        ``txnrs``: those of Messages, and the ``first`` of SyslogRuns (all of a run's).
        """
        pending = self._by_txnr
        for txnr in txnrs:
            slot = pending.get(txnr)
            if slot is None or slot.response is not None:
                raise ValueError(f"txnr {txnr} is not awaiting an answer")
            slot.response = slot.ok or b"%d rsp 6 200 OK\n" % txnr
        self._release()
        return self.data_to_send()

    def nack(self, txnr: int, reason: str) -> bytes:
        """Refuse a message (or every message of the SyslogRun that starts at ``txnr``)."""
        text = b"500 " + reason.replace("\n", " ").encode("utf-8", "replace")[:80]
        slot = self._by_txnr.get(txnr)
        answers, t = [], txnr
        for _ in range(1 if slot is None else slot.count):
            answers.append(_rsp(t, text))
            t = next_txnr(t)
        self._decide(txnr, b"".join(answers))
        self._release()
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        out = bytes(self._ready)
        self._ready.clear()
        return out

    @staticmethod
    def server_close() -> bytes:
        """The hint sent before the server hangs up (shutdown, idle timeout)."""
        return SERVERCLOSE


def _rsp(txnr: int, data: bytes) -> bytes:
    return b"%d rsp %d %s\n" % (txnr, len(data), data) if data else b"%d rsp 0\n" % txnr


SERVERCLOSE = encode(RelpFrame(0, "serverclose"))


# --- client session -------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    offers: dict[str, list[str]]


@dataclass(frozen=True)
class Acked:
    tokens: list[object]


@dataclass(frozen=True)
class Nacked:
    token: object
    reason: str


@dataclass(frozen=True)
class ServerClose:
    pass


@dataclass(frozen=True)
class Closed:
    """The server answered our ``close``: hang up."""


ClientEvent = Opened | Acked | Nacked | ServerClose | Closed


class RelpStateError(Exception):
    """The caller used the session out of turn (send before open, beyond the window)."""


class _Sent:
    __slots__ = ("code", "reason", "token", "txnr")

    def __init__(self, txnr: int, token: object) -> None:
        self.txnr = txnr
        self.token = token
        self.code: int | None = None
        self.reason = ""


class ClientSession:
    """Client side of one RELP connection: TXNRs, window, in-order acknowledgement.

    Answers may come in any order (the spec allows it; librelp sends them in order);
    ``Acked`` reports tokens only as a contiguous prefix of what was sent, so a caller
    can advance an ``ack(upto)`` position.
    """

    def __init__(self, window: int, software: str = SOFTWARE, version: str = __version__) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.software = software
        self.version = version
        # Answers are short; the open answer carries offers. Nothing legitimate is larger.
        self._parser = RelpParser(64 * 1024)
        self._txnr = 1
        self._state = "new"  # new opening open closing closed
        self._open_txnr = 0
        self._close_txnr = 0
        self._sent: deque[_Sent] = deque()
        self._by_txnr: dict[int, _Sent] = {}
        self.offers: dict[str, list[str]] = {}

    @property
    def state(self) -> str:
        return self._state

    @property
    def txnr(self) -> int:
        """The TXNR of the next command."""
        return self._txnr

    @property
    def can_send(self) -> bool:
        return self._state == "open" and len(self._sent) < self.window

    @property
    def room(self) -> int:
        return self.window - len(self._sent) if self._state == "open" else 0

    @property
    def in_flight(self) -> list[object]:
        return [s.token for s in self._sent]

    def _command(self, command: str, data: bytes) -> tuple[int, bytes]:
        txnr = self._txnr
        self._txnr = next_txnr(txnr)
        return txnr, encode(RelpFrame(txnr, command, data))

    def open(self) -> bytes:
        if self._state != "new":
            raise RelpStateError("open() twice")
        self._state = "opening"
        offers = format_offers(
            [
                ("relp_version", ["0"]),
                ("relp_software", [self.software, self.version]),
                ("commands", ["syslog"]),
            ]
        )
        self._open_txnr, out = self._command("open", offers)
        return out

    def send(self, msg: bytes, token: object) -> bytes:
        if self._state != "open" or len(self._sent) >= self.window:
            raise RelpStateError(
                f"cannot send in state {self._state} with {len(self._sent)} in flight"
            )
        if len(msg) > MAX_DATALEN:
            raise ValueError("data too long for RELP")
        txnr = self._txnr
        self._txnr = 1 if txnr >= MAX_TXNR else txnr + 1
        sent = _Sent(txnr, token)
        self._sent.append(sent)
        self._by_txnr[txnr] = sent
        return b"%d syslog %d %s\n" % (txnr, len(msg), msg)

    def close(self) -> bytes:
        """Send ``close``; no command may follow. Messages in flight still get answers."""
        if self._state not in ("open", "opening"):
            raise RelpStateError(f"cannot close in state {self._state}")
        self._state = "closing"
        self._close_txnr, out = self._command("close", b"")
        return out

    def feed(self, data: bytes) -> list[ClientEvent]:
        """Events from the server's answers; contiguous acknowledgements come as one Acked."""
        events: list[ClientEvent] = []
        for frame in self._parser.feed(data):
            assert type(frame) is RelpFrame  # next_syslog is never set on a client's parser
            if frame.txnr == 0:
                if frame.command == "serverclose":
                    events.append(ServerClose())
                continue  # unknown hints are ignorable by definition
            if frame.command != "rsp":
                raise RelpError(f"server sent command {frame.command!r}", self._parser._consumed)
            self._on_rsp(frame, events)
        return events

    def _on_rsp(self, frame: RelpFrame, events: list[ClientEvent]) -> None:
        txnr = frame.txnr
        if self._state == "opening" and txnr == self._open_txnr:
            code, text, rest = _parse_rsp(frame.data, self._parser._consumed)
            if code != 200:
                raise RelpError(f"server refused open: {code} {text}", self._parser._consumed)
            offers = parse_offers(rest)
            version = _version(offers)
            if version is None or version > 1:
                raise RelpError("server offers no usable relp_version", self._parser._consumed)
            if "syslog" not in offers.get("commands", []):
                raise RelpError("server does not offer the syslog command", self._parser._consumed)
            self.offers = offers
            self._state = "open"
            events.append(Opened(offers))
            return
        if self._state == "closing" and txnr == self._close_txnr:
            self._state = "closed"
            events.append(Closed())
            return
        sent = self._by_txnr.pop(txnr, None)
        if sent is None:
            raise RelpError(f"rsp for unknown txnr {txnr}", self._parser._consumed)
        if frame.data == b"200 OK":  # what nearly every answer is
            sent.code = 200
        else:
            sent.code, sent.reason, _ = _parse_rsp(frame.data, self._parser._consumed)
        pending = self._sent
        while pending and pending[0].code is not None:
            done = pending.popleft()
            if done.code == 200:
                # Extend the Acked these answers continue, so a caller gets one per run.
                last = events[-1] if events else None
                if isinstance(last, Acked):
                    last.tokens.append(done.token)
                else:
                    events.append(Acked([done.token]))
                continue
            events.append(Nacked(done.token, f"{done.code} {done.reason}".strip()))


def _parse_rsp(data: bytes, offset: int) -> tuple[int, str, bytes]:
    """(status, human text, rest after the first LF) of an rsp's data (librelp scrsp.c)."""
    head, _, rest = data.partition(b"\n")
    if len(head) < 3 or not head[:3].isdigit() or (len(head) > 3 and head[3:4] != b" "):
        raise RelpError("malformed rsp status", offset)
    return int(head[:3]), head[4:84].decode("utf-8", "replace"), rest
