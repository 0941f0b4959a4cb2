"""A tiny dependency-free progress bar: one line on stderr, redrawn in place.

    with Progress(total_bytes, "writing") as bar:
        for name, array in items:
            ...
            bar.update(array.nbytes, name)

On a terminal the line is redrawn (at most every `min_interval` seconds) with a carriage return;
when the stream is not a terminal (a log, a pipe, pytest's capture) only the final line is printed,
so logs get one line per phase instead of thousands.
"""

from __future__ import annotations

import sys
import time

_BAR_WIDTH = 24


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class Progress:
    """A single updating progress line for `total` units (bytes by default)."""

    def __init__(self, total: float, label: str, *, stream=None, bytes_unit: bool = True,
                 live: bool | None = None, min_interval: float = 0.1):
        self.total = max(float(total), 0.0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.bytes_unit = bytes_unit
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                live = bool(isatty and isatty())
            except ValueError:  # a closed stream
                live = False
        self.live = live
        self.min_interval = min_interval
        self.done = 0.0
        self.note = ""
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._width = 0
        self._closed = False

    def line(self) -> str:
        """The current progress line (without carriage return or newline)."""
        frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        filled = int(round(frac * _BAR_WIDTH))
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        if self.bytes_unit:
            amount = f"{_human(self.done)}/{_human(self.total)}"
        else:
            amount = f"{self.done:.0f}/{self.total:.0f}"
        elapsed = time.monotonic() - self._start
        text = f"{self.label} [{bar}] {frac * 100:3.0f}% {amount} {elapsed:.1f}s"
        if self.note:
            text += f" {self.note}"
        return text

    def update(self, n: float = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now = time.monotonic()
        if self.live and (now - self._last_draw >= self.min_interval or self.done >= self.total):
            self._draw()
            self._last_draw = now

    def _draw(self, end: str = "") -> None:
        text = self.line()
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        prefix = "\r" if self.live else ""
        try:
            self.stream.write(prefix + text + " " * pad + end)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break the work
            pass

    def close(self, note: str | None = "") -> None:
        """Draws the final line and ends it with a newline (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if note is not None:
            self.note = note
        self._draw(end="\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.live:  # leave the interrupted line as it was, but end it
            self._closed = True
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        else:
            self._closed = True
