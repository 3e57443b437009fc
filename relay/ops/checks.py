"""Checks beyond the configuration schema, shared by ``check``, ``run`` and reload."""

from __future__ import annotations

import os
import socket

from relay.config import TLS_TRANSPORTS, Config


def bind_problems(
    key: str, host: str, port: int, kind: int = socket.SOCK_STREAM
) -> list[tuple[str, str]]:
    """``[(key, reason)]`` if ``host:port`` cannot be bound now (``check --bind``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return [(key, f"cannot listen on {host}:{port}: {exc.strerror}")]
    return []


def problems_of(cfg: Config, bind: bool) -> list[tuple[str, str]]:
    """Checks beyond the schema: TLS material loads, the state directory is writable and,
    with ``bind`` (``check --bind``), the addresses are free. ``check`` binds nothing by
    default: it must pass against the configuration of a running relay, which holds them."""
    problems: list[tuple[str, str]] = []
    if any(lc.transport in TLS_TRANSPORTS for lc in cfg.listen) or cfg.tls.certificate:
        from relay.inputs import tls_server

        problems.extend(tls_server.check_tls(cfg.tls))
    for i, fc in enumerate(cfg.forward):
        if fc.uses_tls:
            from relay.forward.tls_client import ClientTLSError, client_options_factory

            try:
                client_options_factory(fc, f"forward[{i}]")
            except ClientTLSError as exc:
                problems.append((exc.key, exc.reason))
    if bind:
        for i, lc in enumerate(cfg.listen):
            kind = socket.SOCK_DGRAM if lc.transport == "udp" else socket.SOCK_STREAM
            problems.extend(bind_problems(f"listen[{i}].address", lc.host, lc.port, kind))
        if cfg.metrics.enabled:
            host, port = cfg.metrics.endpoint
            problems.extend(bind_problems("metrics.address", host, port))
    state = cfg.relay.state_dir
    probe = state if state.exists() else state.parent
    if not os.access(probe, os.W_OK):
        problems.append(("relay.state_dir", f"not writable: {probe}"))
    return problems
