"""Long steps show progress: one line per stage off a terminal, a ticking status line on one."""

from __future__ import annotations

import io
import time

from porter.progress import progress


def test_lines_per_stage_off_a_terminal():
    out = io.StringIO()
    with progress("porter verify", out) as say:
        say("importing vLLM")
        say("importing vLLM")  # the same stage again: not repeated
        say("starting engine (TP=1)")
    lines = out.getvalue().splitlines()
    assert [ln.rsplit(" [", 1)[0] for ln in lines] == [
        "porter verify: importing vLLM", "porter verify: starting engine (TP=1)"]
    assert all(ln.endswith("s]") for ln in lines)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_keeps_ticking_on_a_terminal():
    out = _Tty()
    with progress("porter serve", out) as say:
        say("starting engine")
        time.sleep(2.5)  # silent engine: the status still shows the seconds going by
    text = out.getvalue()
    assert "porter serve: starting engine [0s]" in text
    assert "porter serve: starting engine [2s]" in text
