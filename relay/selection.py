"""Applying selectors to received chunks (the router's selective path).

A message's *decision* is one int: bit 0 (TAKE) set unless a drop rule took
it, which is what every output without a selector receives; bit 1 (STAGE)
when staging takes it; bit 2+k when the k-th forward output with a selector
takes it. A message dropped by rule r has only ``(r + 1) << 32``.

Decisions are paid as rarely as the selectors allow. The listener is the same
for a whole chunk, so every selector is first specialised to it
(``Plan``): when that decides everything, one decision covers the chunk; when
only the PRI is left to read, a message costs one slice of its first five
bytes and a dict lookup; otherwise the PRI settles what it can and the host,
app-name or regex are read for the rest. Staging receives the selected
messages of a run as sub-runs: slices of the received chunk, never copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from relay.framing import Frame
from relay.record import FRAMING_OCTET, Block
from relay.scan import HourFlags
from relay.selectors import Node, Selectors, _pri_verdict, header_of, matches, pri_of

TAKE = 1
STAGE = 2
_OUT = 2  # bit of the first forward output with a selector
_RULE = 32
_CACHE_MAX = 4096


class Plan:
    """The selectors specialised to one listener."""

    def __init__(self, sel: Selectors, outputs: Sequence[str], listener: str) -> None:
        # (bit, node) for staging and the outputs; drop rules are checked first.
        self._listener = listener
        self._drop = [(i, node) for i, (_, node) in enumerate(sel.drop)]
        fwd = sel.forward or {}
        self._keep: list[tuple[int, Node | None]] = [
            (STAGE, sel.staging),
            *((1 << (_OUT + k), fwd[name]) for k, name in enumerate(outputs)),
        ]
        self._pri: list[int | None] = [self._by_pri(p) for p in range(192)]
        decided = set(self._pri)
        # One decision for every message from this listener (None: it depends).
        self.const: int | None = self._pri[0] if len(decided) == 1 else None
        self.pri_only = None not in self._pri
        self._by_head: dict[bytes, int] = {}

    def _by_pri(self, pri: int) -> int | None:
        # An output without a selector is not in _keep: TAKE stands for it.
        """The decision for messages with this PRI, None when more must be read."""
        for i, node in self._drop:
            v = _pri_verdict(node, pri, self._listener)
            if v is None:
                return None
            if v:
                return (i + 1) << _RULE
        d = TAKE
        for bit, keep in self._keep:
            v = True if keep is None else _pri_verdict(keep, pri, self._listener)
            if v is None:
                return None
            if v:
                d |= bit
        return d

    def head(self, key: bytes) -> int:
        """The decision for a message that starts with ``key`` (its first 5 bytes; PRI only)."""
        d = self._pri[pri_of(key)]
        assert d is not None
        if len(self._by_head) >= _CACHE_MAX:
            self._by_head.clear()
        self._by_head[key] = d
        return d

    @property
    def by_head(self) -> dict[bytes, int]:
        return self._by_head

    def decide(self, msg: bytes, malformed: bool) -> int:
        """The decision for one message (any selector)."""
        d = self._pri[pri_of(msg)]
        if d is not None:
            return d
        header = None if malformed else header_of(msg)
        listener = self._listener
        for i, node in self._drop:
            if matches(node, msg, listener, malformed, header):
                return (i + 1) << _RULE
        d = TAKE
        for bit, keep in self._keep:
            if keep is None or matches(keep, msg, listener, malformed, header):
                d |= bit
        return d


class Selection:
    """The configured selectors, the forward outputs they apply to and the plans by listener."""

    def __init__(self, sel: Selectors) -> None:
        self.selectors = sel
        self.outputs = tuple(sorted((sel.forward or {}).keys()))
        self.rules = tuple(name for name, _ in sel.drop)
        # The decision of a message every output and staging take.
        self.full = TAKE | STAGE | sum(1 << (_OUT + k) for k in range(len(self.outputs)))
        self._plans: dict[str, Plan] = {}

    def plan(self, listener: str) -> Plan:
        p = self._plans.get(listener)
        if p is None:
            p = self._plans[listener] = Plan(self.selectors, self.outputs, listener)
        return p

    def route(
        self,
        data: bytes,
        items: Sequence[Any],
        listener: str,
        odd: Callable[[Frame], tuple[int, Block]],
        mark: Callable[[bytes], bytes] | None,
        forwarding: bool,
    ) -> tuple[dict[int, list[Block]], list[bytes], dict[str, list[bytes]], dict[int, int]]:
        """(staging blocks by hour, messages for outputs without a selector, messages per
        output with one, count of each decision) of one chunk's runs and odd frames."""
        plan = self.plan(listener)
        hours: dict[int, list[Block]] = {}
        default: list[bytes] = []
        outs: list[list[bytes]] = [[] for _ in self.outputs]
        tally: dict[int, int] = {}
        view = memoryview(data)
        by_head = plan.by_head
        head = plan.head
        pri_only = plan.pri_only
        find = data.find
        for item in items:
            if type(item) is not tuple:
                d = plan.decide(item.msg, b"M" in odd(item)[1][1])
                tally[d] = tally.get(d, 0) + 1
                if d & STAGE:
                    hour, block = odd(item)
                    _put(hours, hour, block)
                if forwarding and d & TAKE:
                    _fan(d, mark(item.msg) if mark else item.msg, default, outs)
                continue
            start, end, _, hf, framing = item
            hf_: HourFlags = hf
            malformed = b"M" in hf_[1]
            octet = framing == FRAMING_OCTET
            i = start
            sub = -1  # start of the current sub-run of staged messages
            subn = 0
            while i < end:
                if octet:
                    sp = find(b" ", i)
                    m = sp + 1
                    e = m + int(data[i:sp])
                    nxt = e
                else:
                    m = i
                    e = find(b"\n", i)
                    nxt = e + 1
                msg: bytes | None = None
                if pri_only:
                    got = by_head.get(data[m : m + 5])
                    d = head(data[m : m + 5]) if got is None else got
                else:
                    msg = data[m:e]
                    d = plan.decide(msg, malformed)
                tally[d] = tally.get(d, 0) + 1
                if d & STAGE:
                    if sub < 0:
                        sub = i
                    subn += 1
                elif sub >= 0:
                    _put(hours, hf_[0], (framing, hf_[1], subn, view[sub:i]))
                    sub, subn = -1, 0
                if forwarding and d & TAKE:
                    if msg is None:
                        msg = data[m:e]
                    _fan(d, mark(msg) if mark else msg, default, outs)
                i = nxt
            if sub >= 0:
                _put(hours, hf_[0], (framing, hf_[1], subn, view[sub:end]))
        return hours, default, dict(zip(self.outputs, outs, strict=True)), tally

    def counts(self, tally: dict[int, int]) -> list[tuple[str, int, int]]:
        """(selector, selected, not selected) from a chunk's decisions, for the metrics."""
        total = sum(tally.values())
        out: list[tuple[str, int, int]] = []
        kept = sum(n for d, n in tally.items() if d & TAKE)
        for r, name in enumerate(self.rules):
            n = sum(v for d, v in tally.items() if d >> _RULE == r + 1)
            out.append((f"drop.{name}", n, total - n))
        if self.selectors.staging is not None:
            n = sum(v for d, v in tally.items() if d & STAGE)
            out.append(("staging", n, kept - n))
        for k, name in enumerate(self.outputs):
            n = sum(v for d, v in tally.items() if d & (1 << (_OUT + k)))
            out.append((f"forward.{name}", n, kept - n))
        return out


def _put(hours: dict[int, list[Block]], hour: int, block: Block) -> None:
    bucket = hours.get(hour)
    if bucket is None:
        hours[hour] = [block]
    else:
        bucket.append(block)


def _fan(d: int, msg: bytes, default: list[bytes], outs: list[list[bytes]]) -> None:
    if d & TAKE:
        default.append(msg)
    bits = d >> _OUT
    k = 0
    while bits and k < len(outs):
        if bits & 1:
            outs[k].append(msg)
        bits >>= 1
        k += 1
