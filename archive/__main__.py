"""``python -m archive``: same as the ``syslog-archive`` script."""

from __future__ import annotations

import sys

from archive.cli import script

sys.exit(script())
