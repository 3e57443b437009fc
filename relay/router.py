"""Router: one received chunk -> staging blocks and forward payloads.

This is the hot path. Per chunk: one receive time, one pass over the bytes
that frames them and reads only each message's hour (relay.framing.hour_runs), and the
result handed to the durable writer as ONE chunk: per hour a list of staging
blocks (runs of frames, as received, referenced not copied) and the payloads
for the forward spools; one write per hour file and one per spool.

Loop guard (relay.formats.loop_guard): a message that already passed through this
relay is a loop and is neither staged again nor forwarded; counted and logged.
Only on listeners whose senders are authenticated relays (``trust_loop_guard``,
decided per listener from the configuration): anyone else could add the element
to hide a message from staging, so elsewhere such a message is staged, flagged
L, and not forwarded (which still ends a cycle).
Only a chunk in which some message might be one (``loopguard.may_loop``, one
scan of the chunk) is taken apart message by message; a forwarding relay
stages the runs as received and builds only the forward list per message
(each message is marked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import tzinfo
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from twisted.logger import Logger

from relay.formats import loop_guard as loopguard
from relay.formats import octet
from relay.formats.staging_block import FLAG_LOOP, FRAMING_OCTET, Block, OctetFrames
from relay.framing.hour_runs import HourIndex, Run
from relay.framing.rfc6587 import Frame, Framer, FramingError, messages
from relay.ops.log_rate_limit import RateLimiter
from relay.ops.metrics import Metrics
from relay.selection import STAGE, TAKE, Selection, output_bit

if TYPE_CHECKING:
    from relay.link.ledger import Commit

log = Logger(namespace="relay.router")


class Sink(Protocol):
    def submit_chunk(
        self,
        hours: Mapping[int, list[Block]],
        forward: Sequence[bytes] | OctetFrames,
        now: float,
        on_durable: Callable[[], None] | None = None,
        sender: bytes = b"-",
        on_written: Callable[[], None] | None = None,
        path: Sequence[bytes] = (),
        selected: Mapping[str, Sequence[bytes]] | None = None,
        commit: Commit | None = None,
    ) -> None: ...


class Framed(NamedTuple):
    """A chunk framed by ``Router.frame``, to be routed by ``Router.route``."""

    data: bytes
    items: list[Run | Frame]
    errors: list[FramingError]
    now: float

    @property
    def messages(self) -> int:
        return sum(item[2] if type(item) is tuple else 1 for item in self.items)  # type: ignore[misc]


class Router:
    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        tz: tzinfo,
        max_skew: float,
        clock: Callable[[], float],
        relay_id: str = "relay",
        forwarding: bool = False,
        loop_guard: bool = True,
        max_hops: int = 16,
        staging: bool = True,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._clock = clock
        self._index = HourIndex(tz, max_skew)
        self._forwarding = forwarding
        self._guard = loop_guard
        self._max_hops = max_hops
        self._id = loopguard.safe_id(relay_id)
        self._limiter = RateLimiter(clock)
        self._trusted: frozenset[str] = frozenset()
        # False when every output is a relay link: the path travels in the batch
        # header (relay.link) and forwarded messages stay byte-exact.
        self.mark_inband = True
        self._selection: Selection | None = None
        self._staging = staging  # [staging] enabled (a restart changes it)
        self._index.framing_only = not staging

    def select(self, selection: Selection | None) -> None:
        """New selectors (start, reload; None: none); the next chunk uses them.

        What is already queued or spooled was selected before and stays as it is."""
        self._selection = selection
        # Selectors look at flags (malformed); staging at hours and flags.
        self._index.framing_only = not self._staging and selection is None

    def trust_loop_guard(self, listeners: Iterable[str]) -> None:
        """Names of the listeners whose loop-guard elements drop a looped message unstaged."""
        self._trusted = frozenset(listeners)

    def configure(
        self, tz: tzinfo, max_skew: float, forwarding: bool, loop_guard: bool, max_hops: int
    ) -> None:
        """New settings from a reload; the next chunk uses them."""
        self._index.configure(tz, max_skew)
        self._forwarding = forwarding
        self._guard = loop_guard
        self._max_hops = max_hops

    def receive(
        self,
        framer: Framer,
        data: bytes,
        sender: bytes,
        listener: str,
        on_durable: Callable[[], None] | None = None,
        on_written: Callable[[], None] | None = None,
        path: Sequence[bytes] = (),
        commit: Commit | None = None,
    ) -> list[FramingError]:
        """Frame and route one chunk of a stream; returns the framing reports.

        ``on_durable``, ``on_written``, ``path`` and ``commit`` as for ``accept``.
        """
        return self.route(
            self.frame(framer, data), sender, listener, on_durable, on_written, path, commit
        )

    def frame(self, framer: Framer, data: bytes) -> Framed:
        """The first half of ``receive``: ``data`` framed and each run's hour decided.

        A relay link batch is framed before its sender's ledger admits it, so that its
        message count is checked on this walk (not on a second one)."""
        now = self._clock()
        index = self._index
        index.at(now)
        items, errors = framer.feed_runs(data, index)
        return Framed(data, items, errors, now)

    def route(
        self,
        framed: Framed,
        sender: bytes,
        listener: str,
        on_durable: Callable[[], None] | None = None,
        on_written: Callable[[], None] | None = None,
        path: Sequence[bytes] = (),
        commit: Commit | None = None,
    ) -> list[FramingError]:
        """The second half of ``receive``: stage and spool what ``frame`` found."""
        data, items, errors, now = framed
        if not items:
            if on_durable is not None or on_written is not None or commit is not None:
                self.accept([], sender, listener, on_durable, now, 0, on_written, path, commit)
            return errors
        sel = self._selection
        selective = sel is not None and sel.plan(listener).const != sel.full
        if (self._guard and loopguard.may_loop(data, self._id, self._max_hops)) or (
            selective
            and (on_durable is not None or on_written is not None or path or commit is not None)
        ):
            # Some message may have passed through here before, or a relay link batch
            # meets a selector: the per-message path looks at each and keeps the hooks.
            wire = sum(_wire(item) for item in items)
            self.accept(
                messages(data, items),
                sender,
                listener,
                on_durable,
                now,
                wire,
                on_written,
                path,
                commit,
            )
            return errors
        if selective and sel is not None:
            self._receive_selected(sel, data, items, sender, listener, now)
            return errors
        hours: dict[int, list[Block]] = {}
        count = 0
        nbytes = 0
        flagged = 0
        view = memoryview(data)  # blocks are slices of the chunk, not copies
        for item in items:
            if type(item) is tuple:
                start, end, n, (hour, flags), framing = item  # type: ignore[misc]
                block: Block = (framing, flags, n, view[start:end])
                count += n
                nbytes += end - start
                if flags != b"-":
                    flagged += n
            else:
                hour, block = self._odd(item)  # type: ignore[arg-type]
                count += 1
                nbytes += len(item.msg)  # type: ignore[union-attr]
                if block[1] != b"-":  # a frame that only spanned two reads has no flag
                    flagged += 1
            bucket = hours.get(hour)
            if bucket is None:
                hours[hour] = [block]
            else:
                bucket.append(block)
        forward: Sequence[bytes] | OctetFrames = []
        unguarded = 0
        marking = self._guard and self.mark_inband
        parts = _octet_parts(data, items) if self._forwarding and not marking else None
        marked = None
        if marking and self._forwarding:
            marked = _marked_octet(data, items, self._id)
        if parts is not None:
            # Nothing to mark (relay link outputs carry the path): the spools get the
            # octet-counted frames as received, without taking the chunk apart.
            forward = OctetFrames(b"".join(parts), count)
        elif marked is not None:
            forward, unguarded = marked
        elif self._forwarding:
            # Staging keeps the bytes as received; the spools get each message marked.
            msgs = [m.msg if isinstance(m, Frame) else m for m in messages(data, items)]
            if marking:
                mark, me = loopguard.mark, self._id
                forward = [mark(m, me) for m in msgs]
                unguarded = sum(1 for m, f in zip(msgs, forward, strict=True) if m is f)
            else:
                forward = msgs
        if on_durable is None and on_written is None and not path and commit is None:
            self._sink.submit_chunk(hours, forward, now, None, sender)
        else:
            self._sink.submit_chunk(
                hours,
                forward,
                now,
                on_durable,
                sender,
                on_written=on_written,
                path=path,
                commit=commit,
            )
        self._count(listener, count, nbytes, flagged, 0, unguarded)
        return errors

    def _receive_selected(
        self,
        sel: Selection,
        data: bytes,
        items: list[Run | Frame],
        sender: bytes,
        listener: str,
        now: float,
    ) -> None:
        """``receive`` for a chunk that some output or staging takes only part of."""
        unguarded = 0
        mark: Callable[[bytes], bytes] | None = None
        if self._forwarding and self._guard:
            me = self._id

            def mark(m: bytes) -> bytes:
                nonlocal unguarded
                f = loopguard.mark(m, me)
                if f is m:
                    unguarded += 1
                return f

        hours, forward, selected, tally = sel.route(
            data, items, listener, self._odd, mark, self._forwarding
        )
        self._sink.submit_chunk(hours, forward, now, None, sender, selected=selected)
        count = nbytes = flagged = 0
        for item in items:
            if type(item) is tuple:
                start, end, n, (_, flags), _ = item  # type: ignore[misc]
                count += n
                nbytes += end - start
                if flags != b"-":
                    flagged += n
            else:
                count += 1
                nbytes += len(item.msg)  # type: ignore[union-attr]
                if self._odd_flags(item)[1] != b"-":  # type: ignore[arg-type]
                    flagged += 1
        self._count(listener, count, nbytes, flagged, 0, unguarded)
        self._count_selected(sel, tally)

    def _count_selected(self, sel: Selection, tally: Mapping[int, int]) -> None:
        inc = self._metrics.inc
        for name, yes, no in sel.counts(tally):
            if yes:
                inc("messages_selected_total", yes, selector=name)
            if no:
                inc("messages_not_selected_total", no, selector=name)

    def accept(
        self,
        frames: Sequence[bytes | Frame],
        sender: bytes,
        listener: str,
        on_durable: Callable[[], None] | None = None,
        now: float | None = None,
        wire_bytes: int | None = None,
        on_written: Callable[[], None] | None = None,
        path: Sequence[bytes] = (),
        commit: Commit | None = None,
    ) -> None:
        """Stage (and queue for forwarding) each message; malformed input is flagged, not lost.

        The per-message path: RELP and UDP input, stream chunks that may hold
        loops. ``on_durable`` runs once the whole chunk is fsynced in
        staging and every spool. ``wire_bytes``: the stream bytes these frames
        came in (bytes_received_total counts messages as received, framing included).
        ``on_written`` runs in the writer thread right after the chunk is written
        and ``path`` (relays passed) is kept with its spool records (relay link input);
        ``commit`` (relay link input) makes the chunk's writing atomic with its ledger
        position (relay.link.ledger).
        """
        if not frames and on_written is None and commit is None:
            if on_durable is not None:
                on_durable()
            return
        if now is None:
            now = self._clock()
            self._index.at(now)
        classify = self._index.message
        hours: dict[int, list[Block]] = {}
        run: list[bytes] = []
        run_key: tuple[int, bytes] | None = None
        forward: list[bytes] = []
        guard = self._guard
        mark_inband = self.mark_inband
        forwarding = self._forwarding
        sd_id = loopguard.SD_ID
        trusted: bool | None = None  # this listener's, looked up at the first loop only
        nbytes = flagged = looped = unguarded = 0
        sel = self._selection
        plan = None if sel is None else sel.plan(listener)
        if plan is not None and sel is not None and plan.const == sel.full:
            plan = None  # this listener's messages go everywhere
        tally: dict[int, int] = {}
        selected: dict[str, list[bytes]] | None = None
        if plan is not None and sel is not None:
            selected = {name: [] for name in sel.outputs}
        everything = STAGE | TAKE
        for frame in frames:
            if type(frame) is bytes:
                msg = frame
                hour, flags = classify(msg)
            else:
                msg = frame.msg  # type: ignore[union-attr]
                hour, flags = self._odd_flags(frame)  # type: ignore[arg-type]
            nbytes += len(msg)
            # bytes.find, not `in`: `x in bytes` first tries x as an int and raises inside.
            if guard and msg.find(sd_id) >= 0:
                verdict, via = loopguard.inspect(msg, self._id, self._max_hops)
                if verdict in (loopguard.Verdict.LOOP, loopguard.Verdict.TOO_MANY_HOPS):
                    if trusted is None:
                        trusted = listener in self._trusted
                    if trusted:
                        looped += 1
                        self._log_loop(verdict, via, sender)
                        continue
                    # Unauthenticated sender: stage it flagged, never forward it.
                    self._log_loop(verdict, via, sender, listener)
                    self._metrics.inc("loop_guard_untrusted_total", listener=listener)
                    flags = FLAG_LOOP if flags == b"-" else flags + FLAG_LOOP
                    flagged += 1
                    if (hour, flags) != run_key:
                        if run_key is not None:
                            _add_run(hours, run_key, run)
                        run_key, run = (hour, flags), []
                    run.append(msg)
                    continue
            if flags != b"-":
                flagged += 1
            d = everything if plan is None else plan.decide(msg, b"M" in flags)
            if plan is not None:
                tally[d] = tally.get(d, 0) + 1
            if d & STAGE:
                if (hour, flags) != run_key:
                    if run_key is not None:
                        _add_run(hours, run_key, run)
                    run_key, run = (hour, flags), []
                run.append(msg)
            if forwarding and d & TAKE:
                marked = loopguard.mark(msg, self._id) if guard and mark_inband else msg
                if marked is msg and mark_inband:
                    unguarded += 1
                forward.append(marked)
                if selected is not None:
                    for k, lst in enumerate(selected.values()):
                        if d & output_bit(k):
                            lst.append(marked)
        if run_key is not None:
            _add_run(hours, run_key, run)
        extra: dict[str, Any] = {}  # only what is set: sinks of other inputs take less
        if on_written is not None or path or commit is not None:
            extra.update(on_written=on_written, path=path, commit=commit)
        if selected is not None:
            extra["selected"] = selected
        self._sink.submit_chunk(hours, forward, now, on_durable, sender, **extra)
        if wire_bytes is not None:
            nbytes = wire_bytes
        self._count(listener, len(frames), nbytes, flagged, looped, unguarded)
        if tally and sel is not None:
            self._count_selected(sel, tally)

    def _odd_flags(self, frame: Frame) -> tuple[int, bytes]:
        """Hour and flags of a frame the framer had to treat specially: one that spanned
        two reads (one a chunk), truncated, cut or malformed."""
        hour, flags = self._index.message(frame.msg)
        extra = (b"T" if frame.truncated else b"") + (b"C" if frame.cut else b"")
        if frame.malformed and b"M" not in flags:
            extra += b"M"
        if extra:
            flags = extra if flags == b"-" else flags + extra
        return hour, flags

    def _odd(self, frame: Frame) -> tuple[int, Block]:
        hour, flags = self._odd_flags(frame)
        msg = frame.msg
        return hour, (FRAMING_OCTET, flags, 1, octet.encode(msg))

    def _count(
        self, listener: str, count: int, nbytes: int, flagged: int, looped: int, unguarded: int
    ) -> None:
        metrics = self._metrics
        metrics.inc("messages_received_total", count, listener=listener)
        metrics.inc("bytes_received_total", nbytes, listener=listener)
        if flagged:
            metrics.inc("messages_flagged_total", flagged, listener=listener)
        if looped:
            metrics.inc("messages_looped_total", looped, listener=listener)
        if unguarded and self._guard:
            metrics.inc("forward_unguarded_total", unguarded)

    def _log_loop(
        self, verdict: loopguard.Verdict, via: list[bytes], sender: bytes, untrusted: str = ""
    ) -> None:
        ok, suppressed = self._limiter.allow(verdict.value + ("_untrusted" if untrusted else ""))
        if not ok:
            return
        what = (
            "staging a message from {sender} flagged L and not forwarding it, as {listener} "
            "does not authenticate relays"
            if untrusted
            else "dropping a message from {sender}"
        )
        log.warn(
            what + ": {why} (via {via}){more}",
            sender=sender.decode(),
            listener=untrusted,
            why="it already passed through this relay (forwarding loop)"
            if verdict is loopguard.Verdict.LOOP
            else "too many relay hops",
            # The sender wrote these bytes: never let them raise here.
            via=",".join(v.decode("utf-8", "replace") for v in via),
            more=f" ({suppressed} similar suppressed)" if suppressed else "",
        )


def _add_run(hours: dict[int, list[Block]], key: tuple[int, bytes], msgs: list[bytes]) -> None:
    hour, flags = key
    block: Block = (FRAMING_OCTET, flags, len(msgs), octet.encode_many(msgs))
    bucket = hours.get(hour)
    if bucket is None:
        hours[hour] = [block]
    else:
        bucket.append(block)


def _octet_parts(data: bytes, items: Sequence[Run | Frame]) -> list[bytes] | None:
    """The chunk's messages as octet-counted frames: runs as received, the odd Frame
    (spanning reads, truncated) framed on its own; None if a run is LF-framed."""
    parts: list[bytes] = []
    for item in items:
        if type(item) is tuple:
            if item[4] != FRAMING_OCTET:  # type: ignore[misc]
                return None
            parts.append(data[item[0] : item[1]])  # type: ignore[misc]
        else:
            msg = item.msg  # type: ignore[union-attr]
            parts.append(octet.encode(msg))
    return parts


def _marked_octet(
    data: bytes, items: Sequence[Run | Frame], me: bytes
) -> tuple[OctetFrames, int] | None:
    """The chunk's messages marked for forwarding, octet-counted, in one pass over its
    runs (the odd Frame, one that spanned two reads, marked and framed on its own), and
    how many could not be marked; None if a run is LF-framed."""
    out: list[bytes] = []
    unguarded = count = 0
    mark = loopguard.mark_octet
    relayed = loopguard.has_sd_id(data)
    for item in items:
        if type(item) is tuple:
            if item[4] != FRAMING_OCTET:  # type: ignore[misc]
                return None
            unguarded += mark(data, item[0], item[1], me, out, relayed)  # type: ignore[misc]
            count += item[2]  # type: ignore[misc]
        else:
            msg = item.msg  # type: ignore[union-attr]
            marked = loopguard.mark(msg, me)
            unguarded += marked is msg
            out.append(octet.encode(marked))
            count += 1
    return OctetFrames(b"".join(out), count), unguarded


def _wire(item: Run | Frame) -> int:
    return len(item.msg) if isinstance(item, Frame) else item[1] - item[0]
