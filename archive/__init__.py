"""syslog-archive: turn closed staging hours into zstd chunks in S3-compatible storage."""

from __future__ import annotations

from relay import __version__

__all__ = ["__version__"]
