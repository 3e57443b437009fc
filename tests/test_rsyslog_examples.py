"""The shipped rsyslog examples (etc/rsyslog.d/) work against the relay as written.

Each example is loaded by a real rsyslogd with only its target, port, peer name
and certificate paths replaced, and messages must arrive in the relay's staging.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.certs import PKI, pki, server_tls  # noqa: F401  (fixture)
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import RSYSLOGD, free_port, wait_port

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parent.parent / "etc" / "rsyslog.d"


def _run(tmp_path: Path, example: str, subst: dict[str, str], relay: RelayProcess) -> None:
    text = (EXAMPLES / example).read_text()
    for old, new in subst.items():
        assert old in text, f"{example} no longer contains {old!r}"
        text = text.replace(old, new)
    feed = free_port()
    work = tmp_path / "rsyslog-work"
    work.mkdir()
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{work}")\n'
        'module(load="imptcp")\n'
        f'input(type="imptcp" address="127.0.0.1" port="{feed}")\n' + text
    )
    proc = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslogd.pid")],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "rsyslog.err", "wb"),
    )
    try:
        wait_port(feed, 20)
        tag = uuid.uuid4().hex
        import socket

        with socket.create_connection(("127.0.0.1", feed), timeout=10) as s:
            s.sendall(b"".join(f"<14>example {tag} n={i}\n".encode() for i in range(100)))
        got = relay.wait_records(lambda r: tag.encode() in r.msg, 100, timeout=30)
        err = (tmp_path / "rsyslog.err").read_text(errors="replace")
        assert len(got) == 100, f"{len(got)}/100 arrived\n{err}\n{relay.log()}"
        assert len({r.msg for r in got}) == 100
    finally:
        proc.terminate()
        proc.wait(15)


def test_example_tls_octet_counted(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    port = free_port()
    relay = RelayProcess(
        tmp_path / "relay",
        [Listener("tls", framing="octet-counting", port=port)],
        tls=server_tls(pki),
    )
    relay.start()
    _run(
        tmp_path,
        "60-syslog-relay-tls.conf",
        {
            'target="relay.example.net"': 'target="127.0.0.1"',
            'port="6514"': f'port="{port}"',
            'PermittedPeers="relay.example.net"': 'PermittedPeers="relay.test"',
            "/etc/ssl/certs/syslog-relay-ca.pem": str(pki.ca),
        },
        relay,
    )
    relay.stop()


def test_example_relp_tls(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    port = free_port()
    relay = RelayProcess(
        tmp_path / "relay",
        [Listener("relp+tls", port=port)],
        tls=server_tls(pki, ["good.clients.test"]),
    )
    relay.start()
    wait_port(port, 10)
    _run(
        tmp_path,
        "62-syslog-relay-relp.conf",
        {
            'target="relay.example.net"': 'target="127.0.0.1"',
            'port="2514"': f'port="{port}"',
            'tls.permittedPeer=["relay.example.net"]': 'tls.permittedPeer=["relay.test"]',
            "/etc/ssl/certs/syslog-relay-ca.pem": str(pki.ca),
            "/etc/rsyslog.d/tls/client.crt": str(pki.clients["good"].cert),
            "/etc/rsyslog.d/tls/client.key": str(pki.clients["good"].key),
        },
        relay,
    )
    relay.stop()
