"""Metrics, health and status endpoints (issue 7). Placeholder until that lands."""

from __future__ import annotations

from typing import Any


def attach(service: Any) -> None:
    """Add the observability services to a RelayService (no-op for now)."""
