"""How slow work reports to the command that runs it: a titled step at a time, what it found in between.

The work calls `progress.step(title)` around each step and `progress.say(line)` for what it found or
did; it never prints. This base reports nothing; a command passes a subclass that prints, so the
same work runs quietly in tests and with progress lines in a terminal.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


class Progress:
    """Reports nothing; override `begin`, `say` and `end` to show the steps."""

    def begin(self, title: str) -> None:
        """A step starts."""

    def say(self, line: str) -> None:
        """What the current step found or did."""

    def end(self, title: str, seconds: float, *, failed: bool) -> None:
        """A step ended, after `seconds`; `failed` when it raised."""

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.begin(title)
        started = time.monotonic()
        try:
            yield
        except Exception:
            self.end(title, time.monotonic() - started, failed=True)
            raise
        self.end(title, time.monotonic() - started, failed=False)
