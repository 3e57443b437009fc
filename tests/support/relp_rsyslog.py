"""Debian's rsyslogd with RELP (rsyslog-relp: omrelp, imrelp), for interop tests.

- ``OmrelpForward``: an imptcp input on a free loopback port, bound to a ruleset with the
  omrelp action under test and an omfile copy rendered with the same template plus an LF,
  so the test knows exactly which bytes omrelp put in each RELP ``syslog`` frame.
- ``ImrelpInput``: an imrelp listener on a free loopback port whose messages are written
  with ``%rawmsg%`` + LF (the data of each ``syslog`` frame as received).

rsyslogd must exist: a missing binary is a failure, never a skip. Built beside
tests/support/rsyslog.py (omfwd), reusing its helpers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.certs import PKI
from tests.support.rsyslog import TRADITIONAL, RsyslogdProcess, free_port

# omrelp's frames carry the template output as is; the copy adds the line delimiter.
FWD_TEMPLATE = TRADITIONAL


@dataclass(frozen=True)
class OmrelpForward:
    """omrelp to 127.0.0.1:``port``; ``tls`` uses the PKI's ``good`` client certificate."""

    name: str
    port: int
    tls: bool = False
    auth_mode: str = "name"  # tls.authMode: name | certvalid | fingerprint
    permitted_peer: str = "relay.test"
    tls_lib: str = ""  # omrelp's module tls.tlslib: "" (librelp's default), gnutls, openssl
    window: int = 0  # windowSize; 0 = librelp's default (128)


@dataclass(frozen=True)
class ImrelpInput:
    name: str
    port: int = field(default_factory=free_port)


class RelpRsyslog(RsyslogdProcess):
    def __init__(
        self,
        workdir: Path,
        forwards: list[OmrelpForward] | None = None,
        inputs: list[ImrelpInput] | None = None,
        pki: PKI | None = None,
    ) -> None:
        super().__init__(workdir)
        self.forwards = {f.name: f for f in forwards or []}
        self.inputs = {i.name: i for i in inputs or []}
        if any(f.tls for f in self.forwards.values()) and pki is None:
            raise ValueError("a TLS forward needs the test PKI")
        self.pki = pki
        self.feed_ports = {name: free_port() for name in self.forwards}

    def ports(self) -> list[int]:
        return [*self.feed_ports.values(), *(i.port for i in self.inputs.values())]

    def copy_path(self, name: str) -> Path:
        return self.dir / f"sent-{name}.log"

    def received_path(self, name: str) -> Path:
        return self.dir / f"received-{name}.log"

    def config(self) -> str:
        lines = [
            f'global(workDirectory="{self.dir / "work"}")',
            f'template(name="relp_fwd" type="string" string={FWD_TEMPLATE})',
            f'template(name="relp_copy" type="string" string={FWD_TEMPLATE[:-1]}\\n")',
            'template(name="relp_raw" type="string" string="%rawmsg%\\n")',
            f'*.* action(type="omfile" file="{self.internal_log}")',
        ]
        if self.forwards:
            lines.insert(1, 'module(load="imptcp")')
            # the TLS library is chosen per module, not per action
            libs = {f.tls_lib for f in self.forwards.values() if f.tls_lib}
            if len(libs) > 1:
                raise ValueError("one rsyslogd can only use one tls.tlslib for omrelp")
            lib = f' tls.tlslib="{libs.pop()}"' if libs else ""
            lines.insert(2, f'module(load="omrelp"{lib})')
        if self.inputs:
            lines.insert(1, 'module(load="imrelp")')
        for name, fwd in self.forwards.items():
            lines.append(
                f'input(type="imptcp" address="127.0.0.1" port="{self.feed_ports[name]}" '
                f'ruleset="r_{name}")'
            )
            opts = [
                'type="omrelp"',
                'target="127.0.0.1"',
                f'port="{fwd.port}"',
                'template="relp_fwd"',
                'action.resumeRetryCount="-1"',
                'action.resumeInterval="1"',
                'queue.type="LinkedList"',
                'queue.size="100000"',
            ]
            if fwd.window:
                opts.append(f'windowSize="{fwd.window}"')
            if fwd.tls:
                assert self.pki is not None
                client = self.pki.clients["good"]
                opts += [
                    'tls="on"',
                    f'tls.caCert="{self.pki.ca}"',
                    f'tls.myCert="{client.cert}"',
                    f'tls.myPrivKey="{client.key}"',
                    f'tls.authMode="{fwd.auth_mode}"',
                ]
                if fwd.auth_mode == "name":
                    opts.append(f'tls.permittedPeer=["{fwd.permitted_peer}"]')
            lines += [
                f'ruleset(name="r_{name}") {{',
                f"  action({' '.join(opts)})",
                f'  action(type="omfile" file="{self.copy_path(name)}" template="relp_copy")',
                "}",
            ]
        for name, inp in self.inputs.items():
            lines += [
                f'input(type="imrelp" address="127.0.0.1" port="{inp.port}" ruleset="r_{name}")',
                f'ruleset(name="r_{name}") {{',
                f'  action(type="omfile" file="{self.received_path(name)}" template="relp_raw")',
                "}",
            ]
        return "\n".join(lines) + "\n"

    def send(self, name: str, messages: list[bytes]) -> None:
        """Feed syslog lines (without LF) to the imptcp input in front of forward ``name``."""
        import socket

        payload = b"".join(m + b"\n" for m in messages)
        with socket.create_connection(("127.0.0.1", self.feed_ports[name]), timeout=10) as s:
            s.sendall(payload)

    @staticmethod
    def _lines(path: Path) -> list[bytes]:
        if not path.exists():
            return []
        return path.read_bytes().split(b"\n")[:-1]

    def sent(self, name: str) -> list[bytes]:
        """What omrelp forward ``name`` was given, frame data exactly (from the omfile copy)."""
        return self._lines(self.copy_path(name))

    def received(self, name: str) -> list[bytes]:
        """What imrelp input ``name`` received, one frame's data per entry."""
        return self._lines(self.received_path(name))

    def wait_lines(self, path: Path, n: int, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            got = self._lines(path)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{path.name}: {len(got)}/{n} lines after {timeout:g}s\n{self.diagnostics()}"
                )
            time.sleep(0.05)
