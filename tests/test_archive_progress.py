from __future__ import annotations

import io

from archive.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal() -> None:
    out = Tty()
    p = Progress(3, "verify", stream=out, interval=0)
    for _ in range(3):
        p.step(10, 1_000_000)
    p.finish()
    text = out.getvalue()
    assert "verify: 3/3 chunks, 30 messages, 3.0 MB" in text
    assert text.endswith("\r\x1b[K")


def test_progress_is_silent_in_pipes() -> None:
    out = io.StringIO()
    p = Progress(3, "cat", stream=out, interval=0)
    p.step(1, 1)
    p.finish()
    assert out.getvalue() == ""
