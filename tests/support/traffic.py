"""Test traffic into real relays, and counting it back out of their staging."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter

from relay.formats import octet
from tests.support.relayproc import RelayProcess

SEQ = re.compile(rb"seq=(\d+)")


class Load:
    """Steady load into a relay's TCP listener from a thread: ``n`` messages at ``rate``/s."""

    def __init__(self, port: int, tag: str, n: int, rate: float) -> None:
        self.port, self.tag, self.n, self.rate = port, tag, n, rate
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        batch = max(1, int(self.rate / 20))
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            while self.sent < self.n:
                k = min(batch, self.n - self.sent)
                msgs = [
                    f"<14>1 - edgehost app - - - {self.tag} seq={self.sent + j:07d}".encode()
                    for j in range(k)
                ]
                s.sendall(b"".join(octet.encode(m) for m in msgs))
                self.sent += k
                time.sleep(batch / self.rate)

    def start(self) -> Load:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


def tagged(relay: RelayProcess, tag: str) -> list[bytes]:
    """Staged messages containing ``tag``, in staging order."""
    return [r.msg for r in relay.records() if tag.encode() in r.msg]


def wait_tagged(relay: RelayProcess, tag: str, n: int, timeout: float) -> list[bytes]:
    deadline = time.monotonic() + timeout
    got = tagged(relay, tag)
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.05)
        got = tagged(relay, tag)
    return got


def seq_counts(relay: RelayProcess, tag: str) -> Counter[int]:
    """How often each ``seq=N`` of the messages containing ``tag`` was staged."""
    out: Counter[int] = Counter()
    for msg in tagged(relay, tag):
        m = SEQ.search(msg)
        assert m is not None
        out[int(m.group(1))] += 1
    return out


def wait_seq_counts(relay: RelayProcess, tag: str, n: int, timeout: float) -> Counter[int]:
    """``seq_counts`` once ``n`` distinct sequence numbers arrived (or the time is up)."""
    deadline = time.monotonic() + timeout
    got = seq_counts(relay, tag)
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.2)
        got = seq_counts(relay, tag)
    return got
