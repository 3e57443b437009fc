"""syslog-relay: receive syslog, stage it by hour on disk, relay it to peers."""

from __future__ import annotations

__version__ = "0.1.0"
