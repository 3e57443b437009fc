"""Log lines under journald carry their priority; elsewhere they are plain JSON or text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.ops.log_setup import on_journal
from tests.support.relayproc import REPO

# A child process logs one line per level to the file given as stderr.
CHILD = """
import sys
from twisted.logger import Logger
from relay.ops.log_setup import start_logging
start_logging(sys.argv[1], level="debug")
log = Logger(namespace="t")
log.debug("d {peer}", peer="10.0.0.7")
log.info("i {peer}", peer="10.0.0.7")
log.warn("w {peer}", peer="10.0.0.7")
log.error("e {peer}", peer="10.0.0.7")
try:
    1 / 0
except ZeroDivisionError:
    log.failure("f")
"""


def _run(tmp_path: Path, fmt: str, journal: bool) -> list[str]:
    out = tmp_path / f"{fmt}-{journal}.log"
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run(
            [sys.executable, "-c", CHILD, fmt], stderr=f, env=env, check=True, timeout=60
        )
    return out.read_text().splitlines()


def test_journal_lines_carry_priority_and_stay_json(tmp_path: Path) -> None:
    lines = _run(tmp_path, "auto", journal=True)
    prios = [line[:3] for line in lines]
    assert prios == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [e["msg"] for e in events[:4]] == [
        "d 10.0.0.7",
        "i 10.0.0.7",
        "w 10.0.0.7",
        "e 10.0.0.7",
    ]
    assert all(e["peer"] == "10.0.0.7" for e in events[:4])  # fields stay searchable
    assert "ZeroDivisionError" in events[4]["traceback"]


def test_journal_text_lines_all_carry_priority(tmp_path: Path) -> None:
    lines = _run(tmp_path, "text", journal=True)
    assert lines[2].startswith("<4>") and "w 10.0.0.7" in lines[2]
    traceback = [line for line in lines if line.startswith("<2>")]
    assert len(traceback) > 2 and any("ZeroDivisionError" in line for line in traceback)
    assert all(line[:1] == "<" for line in lines)


def test_no_prefix_outside_the_journal(tmp_path: Path) -> None:
    lines = _run(tmp_path, "auto", journal=False)
    assert [json.loads(line)["level"] for line in lines] == [
        "debug",
        "info",
        "warn",
        "error",
        "critical",
    ]


@pytest.mark.parametrize("value", ["", "x:y", "1:2", "12"])
def test_journal_stream_must_name_this_stream(tmp_path: Path, value: str) -> None:
    with open(tmp_path / "f", "w") as f:
        assert not on_journal(f, {"JOURNAL_STREAM": value})
        st = os.fstat(f.fileno())
        assert on_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
