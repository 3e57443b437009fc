"""What a configuration reload (SIGHUP) changes: a pure diff of two Configs.

The service applies the plan (relay/service.py ``RelayService.reload``).
Identity of a listener is (host, port, transport, framing): anything else
about it (its name) changes in place; a changed identity closes the old
socket and opens the new one (a stream listener that keeps its address cannot:
the new socket does not bind while the old one listens, and the reload is
refused). A forward output is identified by its name; any change to it
restarts its connections on the same spool.

``Coalescer`` runs reloads one at a time: SIGHUPs that arrive while one runs
become a single further reload once it is done (it reads the file then, so
the newest configuration wins and none is lost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer

from relay.config import Config, ForwardConfig, ListenConfig


def listener_key(lc: ListenConfig) -> tuple[str, int, str, str]:
    return (lc.host, lc.port, lc.transport, lc.framing)


@dataclass
class ReloadPlan:
    restart_required: list[str] = field(default_factory=list)
    listeners_close: list[ListenConfig] = field(default_factory=list)
    listeners_open: list[tuple[int, ListenConfig]] = field(default_factory=list)
    outputs_remove: list[str] = field(default_factory=list)
    outputs_add: list[ForwardConfig] = field(default_factory=list)
    outputs_change: list[ForwardConfig] = field(default_factory=list)

    def summary(self) -> str:
        def names(lcs: list[ListenConfig]) -> str:
            return ", ".join(f"{lc.address}/{lc.transport}" for lc in lcs)

        parts = []
        if self.listeners_open:
            parts.append("open " + names([lc for _, lc in self.listeners_open]))
        if self.listeners_close:
            parts.append("close " + names(self.listeners_close))
        if self.outputs_add:
            parts.append("add outputs " + ", ".join(f.name for f in self.outputs_add))
        if self.outputs_change:
            parts.append("change outputs " + ", ".join(f.name for f in self.outputs_change))
        if self.outputs_remove:
            parts.append("remove outputs " + ", ".join(self.outputs_remove))
        return "; ".join(parts) or "no listener or output changes"


def plan(old: Config, new: Config) -> ReloadPlan:
    p = ReloadPlan()
    if old.relay.id != new.relay.id:
        p.restart_required.append("relay.id")
    if old.relay.state_dir != new.relay.state_dir:
        p.restart_required.append("relay.state_dir")
    if old.staging.enabled != new.staging.enabled:
        p.restart_required.append("staging.enabled")
    if old.metrics != new.metrics:
        p.restart_required.append("metrics")
    old_keys = {listener_key(lc): lc for lc in old.listen}
    new_keys = {listener_key(lc) for lc in new.listen}
    p.listeners_close = [lc for k, lc in old_keys.items() if k not in new_keys]
    p.listeners_open = [
        (i, lc) for i, lc in enumerate(new.listen) if listener_key(lc) not in old_keys
    ]
    old_out = {f.name: f for f in old.forward}
    new_out = {f.name: f for f in new.forward}
    p.outputs_remove = [n for n in old_out if n not in new_out]
    p.outputs_add = [f for n, f in new_out.items() if n not in old_out]
    p.outputs_change = [f for n, f in new_out.items() if n in old_out and old_out[n] != f]
    return p


class Coalescer:
    """Runs ``action`` (returning a Deferred) one at a time; requests made while it
    runs are coalesced into one more run after it."""

    def __init__(self, action: Callable[[], object]) -> None:  # a Deferred, or a result
        self._action = action
        self._running = False
        self._again = False

    @property
    def running(self) -> bool:
        return self._running

    def request(self) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        while True:  # a loop, not recursion: an action that finishes at once runs again here
            self._again = False
            d = defer.maybeDeferred(self._action)
            if not d.called:
                d.addBoth(self._finished)
                return
            d.addErrback(lambda _: None)  # the action reports its own failures
            if not self._again:
                self._running = False
                return

    def _finished(self, _: object) -> None:
        self._running = False
        if self._again:
            self.request()
