#!/bin/bash
# `make run`: relay + archiver + local S3 (SeaweedFS) on 127.0.0.1; see tools/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tools/demo.py "$@"
