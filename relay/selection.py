"""Applying selectors to received chunks (the router's selective path).

A message's *decision* is one int: bit 0 (TAKE) set unless a drop rule took
it, which is what every output without a selector receives; bit 1 (STAGE)
when staging takes it; bit 2+k when the k-th forward output with a selector
takes it. A message dropped by rule r has only ``(r + 1) << 32``.

Decisions are paid as rarely as the selectors allow. The listener is the same
for a whole chunk, so every selector is first specialised to it
(``Plan``): when that decides everything, one decision covers the chunk; when
only the PRI is left to read, a message costs one slice of its first five
bytes and a dict lookup; when host or app-name are read too (no regex), the
decision is cached under the PRI text and the "HOST APP" bytes of the header,
found with three ``bytes.find`` (a fleet has a few thousand such pairs; the
cache is bounded and emptied when full); otherwise the PRI settles what it can
and the rest is read per message. Staging receives the selected messages of a
run as sub-runs: slices of the received chunk, never copies. Messages that no
spool takes are not marked by the loop guard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from relay.formats.staging_block import FRAMING_OCTET, Block
from relay.framing.hour_runs import HourFlags
from relay.framing.rfc6587 import Frame, messages
from relay.selectors import (
    Node,
    Selectors,
    _pri_verdict,
    has_regex,
    header_of,
    matches,
    pri_of,
)

TAKE = 1
STAGE = 2
_OUT = 2  # bit of the first forward output with a selector
_RULE = 32
_CACHE_MAX = 4096
_KEYS_MAX = 65536
Rest = tuple[int, tuple[tuple[int, "Node | None"], ...], tuple[tuple[int, Node], ...]]


def output_bit(k: int) -> int:
    """The decision bit of the k-th forward output with a selector (``Selection.outputs``)."""
    return 1 << (_OUT + k)


class Plan:
    """The selectors specialised to one listener."""

    def __init__(self, sel: Selectors, outputs: Sequence[str], listener: str) -> None:
        self._listener = listener
        fwd = sel.forward or {}
        drop = [(i, node) for i, (_, node) in enumerate(sel.drop)]
        keep: list[tuple[int, Node]] = [
            *([(STAGE, sel.staging)] if sel.staging is not None else []),
            *((1 << (_OUT + k), fwd[name]) for k, name in enumerate(outputs)),
        ]
        plain = 0 if sel.staging is not None else STAGE  # staging without a selector
        # By PRI: the decision, or None and what is left to read: (bits decided so far,
        # drop rules to evaluate in order (None: matches), selectors to evaluate).
        self._pri: list[int | None] = []
        self._rest: list[Rest | None] = []
        for pri in range(192):
            rest = self._specialise(pri, drop, keep, plain)
            if rest[1] or rest[2]:
                self._pri.append(None)
                self._rest.append(rest)
            else:
                self._pri.append(rest[0])
                self._rest.append(None)
        decided = set(self._pri)
        # One decision for every message from this listener (None: it depends).
        self.const: int | None = self._pri[0] if len(decided) == 1 else None
        self.pri_only = None not in decided
        # Without a regex, a readable RFC 5424 message's decision depends on its PRI,
        # HOSTNAME and APP-NAME only: cached by those bytes.
        self.keyed = not any(has_regex(n) for _, n in (*drop, *keep))
        self.by_head: dict[bytes, int] = {}
        # PRI text ("<46>") -> "HOST APP" -> decision.
        self.by_key: dict[bytes, dict[bytes, int]] = {}
        self._keys = 0

    def _specialise(
        self, pri: int, drop: list[tuple[int, Node]], keep: list[tuple[int, Node]], plain: int
    ) -> Rest:
        listener = self._listener
        drops: list[tuple[int, Node | None]] = []
        for i, node in drop:
            v = _pri_verdict(node, pri, listener)
            if v is None:
                drops.append((i, node))
            elif v:
                if not drops:
                    return (i + 1) << _RULE, (), ()
                drops.append((i, None))
                break
        d = TAKE | plain
        keeps: list[tuple[int, Node]] = []
        for bit, node in keep:
            v = _pri_verdict(node, pri, listener)
            if v is None:
                keeps.append((bit, node))
            elif v:
                d |= bit
        return d, tuple(drops), tuple(keeps)

    def head(self, key: bytes) -> int:
        """The decision for a message that starts with ``key`` (its first 5 bytes; PRI only)."""
        d = self._pri[pri_of(key)]
        assert d is not None
        if len(self.by_head) >= _CACHE_MAX:
            self.by_head.clear()
        self.by_head[key] = d
        return d

    def keyed_decide(self, pri: bytes, names: bytes, msg: bytes) -> int:
        """``decide`` for a readable RFC 5424 message, remembered under its PRI and names."""
        d = self.decide(msg, False)
        self._keys += 1
        if self._keys > _KEYS_MAX:
            self.by_key.clear()
            self._keys = 1
        table = self.by_key.get(pri)
        if table is None:
            table = self.by_key[pri] = {}
        table[names] = d
        return d

    def decide(self, msg: bytes, malformed: bool) -> int:
        """The decision for one message (any selector)."""
        pri = pri_of(msg)
        d = self._pri[pri]
        if d is not None:
            return d
        rest = self._rest[pri]
        assert rest is not None
        d, drops, keeps = rest
        header = None if malformed else header_of(msg)
        listener = self._listener
        for i, node in drops:
            if node is None or matches(node, msg, listener, malformed, header):
                return (i + 1) << _RULE
        for bit, keep in keeps:
            if matches(keep, msg, listener, malformed, header):
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
    ) -> tuple[dict[int, list[Block]], list[bytes], dict[str, list[bytes]], Counter[int]]:
        """(staging blocks by hour, messages for outputs without a selector, messages per
        output with one, count of each decision) of one chunk's runs and odd frames."""
        plan = self.plan(listener)
        if plan.const is not None:
            return self._route_whole(plan.const, data, items, odd, mark, forwarding)
        hours: dict[int, list[Block]] = {}
        default: list[bytes] = []
        outs: list[list[bytes]] = [[] for _ in self.outputs]
        decisions: list[int] = []  # one per message, counted at the end
        tally = decisions.append
        view = memoryview(data)
        by_head = plan.by_head
        head = plan.head
        by_key = plan.by_key
        keyed_decide = plan.keyed_decide
        decide = plan.decide
        pri_only = plan.pri_only
        # Decisions that send a message to some spool (the others are not marked).
        want = 0
        if forwarding:
            want = self.full & ~(TAKE | STAGE)
            if self.selectors.plain_outputs:
                want |= TAKE
        # The list for outputs without a selector: every message not dropped.
        plain = default if self.selectors.plain_outputs else None
        find = data.find
        startswith = data.startswith
        for item in items:
            if type(item) is not tuple:
                hour, block = odd(item)
                d = decide(item.msg, b"M" in block[1])
                tally(d)
                if d & STAGE:
                    _put(hours, hour, block)
                if d & want:
                    _fan(d, mark(item.msg) if mark else item.msg, plain, outs)
                continue
            start, end, _, hf, framing = item
            hf_: HourFlags = hf
            malformed = b"M" in hf_[1]
            keyed = plan.keyed and not malformed
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
                elif keyed:
                    # RFC 5424 "<PRI>1 STAMP HOST APP ": the key is "<PRI" and "HOST APP".
                    # RFC 3164 "<PRI>Mmm dd hh:mm:ss HOST TAG": "<PRI>" and "HOST TAG"
                    # (in a run without flag M such a stamp is valid: see header_of).
                    gt = find(b">", m + 1, m + 5)
                    p = gt
                    if gt < 0:
                        a = -1
                    elif startswith(b"1 ", gt + 1, e):
                        a = find(b" ", gt + 3, e)
                    elif (
                        gt + 17 < e
                        and data[gt + 16] == 32
                        and data[gt + 4] == 32
                        and data[gt + 7] == 32
                        and data[gt + 10] == 58
                        and data[gt + 13] == 58
                    ):
                        a = gt + 16
                        p = gt + 1
                    else:
                        a = -1
                    b = find(b" ", a + 1, e) if a >= 0 else -1
                    c = find(b" ", b + 1, e) if b >= 0 else -1
                    if c >= 0:
                        table = by_key.get(data[m:p])
                        got = None if table is None else table.get(data[a + 1 : c])
                        if got is None:
                            msg = data[m:e]
                            got = keyed_decide(data[m:p], data[a + 1 : c], msg)
                        d = got
                    else:
                        msg = data[m:e]
                        d = decide(msg, malformed)
                else:
                    msg = data[m:e]
                    d = decide(msg, malformed)
                tally(d)
                if d & STAGE:
                    if sub < 0:
                        sub = i
                    subn += 1
                elif sub >= 0:
                    _put(hours, hf_[0], (framing, hf_[1], subn, view[sub:i]))
                    sub, subn = -1, 0
                if d & want:
                    if msg is None:
                        msg = data[m:e]
                    _fan(d, mark(msg) if mark else msg, plain, outs)
                i = nxt
            if sub >= 0:
                _put(hours, hf_[0], (framing, hf_[1], subn, view[sub:end]))
        return hours, default, dict(zip(self.outputs, outs, strict=True)), Counter(decisions)

    def _route_whole(
        self,
        d: int,
        data: bytes,
        items: Sequence[Any],
        odd: Callable[[Frame], tuple[int, Block]],
        mark: Callable[[bytes], bytes] | None,
        forwarding: bool,
    ) -> tuple[dict[int, list[Block]], list[bytes], dict[str, list[bytes]], Counter[int]]:
        """``route`` for a chunk whose messages all have decision ``d`` (the listener decides)."""
        hours: dict[int, list[Block]] = {}
        view = memoryview(data)
        n = 0
        for item in items:
            if type(item) is tuple:
                start, end, count, (hour, flags), framing = item
                n += count
                if d & STAGE:
                    _put(hours, hour, (framing, flags, count, view[start:end]))
            else:
                n += 1
                if d & STAGE:
                    _put(hours, *odd(item))
        msgs: list[bytes] = []
        want = self.full & ~(TAKE | STAGE) | (TAKE if self.selectors.plain_outputs else 0)
        if forwarding and d & want:
            msgs = [m.msg if isinstance(m, Frame) else m for m in messages(data, list(items))]
            if mark is not None:
                msgs = [mark(m) for m in msgs]
        default = msgs if self.selectors.plain_outputs and d & TAKE else []
        outs = {name: msgs if d & (1 << (_OUT + k)) else [] for k, name in enumerate(self.outputs)}
        return hours, default, outs, Counter({d: n})

    def counts(self, tally: Mapping[int, int]) -> list[tuple[str, int, int]]:
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


def _fan(d: int, msg: bytes, default: list[bytes] | None, outs: list[list[bytes]]) -> None:
    if default is not None:
        default.append(msg)
    bits = d >> _OUT
    k = 0
    while bits and k < len(outs):
        if bits & 1:
            outs[k].append(msg)
        bits >>= 1
        k += 1
