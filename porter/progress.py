"""Progress of a long step (an engine start takes 20-60 s here), shown while it runs.

``with progress("porter verify") as say: say("starting engine")`` shows each stage as it comes:
on a terminal one status line with a spinner and the seconds since the step began (ticking even
while the engine is silent); otherwise (a log, a pipe, CI) one line per stage on stderr,
``porter verify: starting engine (TP=1) [3s]``. A repeated stage is not printed twice.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

Say = Callable[[str], None]


@contextlib.contextmanager
def progress(prefix: str, stream=None) -> Iterator[Say]:
    stream = stream or sys.stderr
    t0 = time.time()
    if getattr(stream, "isatty", lambda: False)():
        yield from _status(prefix, stream, t0)
        return
    last = [""]

    def say(text: str) -> None:
        if text != last[0]:
            last[0] = text
            stream.write(f"{prefix}: {text} [{time.time() - t0:.0f}s]\n")
            stream.flush()

    yield say


def _status(prefix: str, stream, t0: float) -> Iterator[Say]:
    from rich.console import Console

    console = Console(file=stream)
    current = [""]
    stop = threading.Event()
    with console.status(prefix) as status:
        def show() -> None:
            status.update(f"{prefix}: {current[0]} [{time.time() - t0:.0f}s]")

        def tick() -> None:  # the seconds keep counting while the engine says nothing
            while not stop.wait(1.0):
                show()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()

        def say(text: str) -> None:
            current[0] = text
            show()

        try:
            yield say
        finally:
            stop.set()
            ticker.join(timeout=2)
