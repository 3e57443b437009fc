"""Human units in the configuration: sizes ("64KiB", "10GiB") and durations ("5m", "1.5s")."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "64KiB"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as 65536 or "64KiB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "b").lower()])
    raise ValueError(f'expected a size such as 65536 or "64KiB", got {value!r}')


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "5m", "250ms"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30 or "5m"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_FACTORS[m.group(2) or "s"]
    raise ValueError(f'expected a duration such as 30, "250ms", "5m" or "1h", got {value!r}')
