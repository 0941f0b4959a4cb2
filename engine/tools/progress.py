"""Progress for long work (extract, encode): tqdm's bar on a terminal, a quiet line otherwise.

    with Progress(total_bytes, "extract: writing") as bar:
        for name, array in items:
            ...
            bar.update(array.nbytes, name)

On a terminal (or live=True) it is tqdm's bar, redrawn in place, with rate and ETA. When the
stream is not a terminal (a log, a pipe, pytest's capture) a plain line is printed at most every
`quiet_every` seconds and once at the end, so logs get a few lines per phase instead of thousands.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _human(n: float, bytes_unit: bool) -> str:
    if not bytes_unit:
        return f"{n:.0f}"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class Progress:
    """Progress of `total` units (bytes by default) of one phase of work, labelled `label`."""

    def __init__(self, total: float, label: str, *, stream=None, bytes_unit: bool = True,
                 live: bool | None = None, min_interval: float = 0.1, quiet_every: float = 10.0):
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
        self.quiet_every = quiet_every
        self.done = 0.0
        self.note = ""
        self._start = self._last = time.monotonic()
        self._closed = False
        self._bar = None
        if live:
            self._bar = tqdm(total=self.total, desc=label, file=self.stream, mininterval=min_interval,
                             unit="B" if bytes_unit else "it", unit_scale=bytes_unit, unit_divisor=1000,
                             dynamic_ncols=True, leave=True)

    def line(self) -> str:
        """The plain progress line (no bar): label, percent, amount, elapsed seconds, note."""
        frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = (f"{self.label}: {frac * 100:3.0f}% {_human(self.done, self.bytes_unit)}/"
                f"{_human(self.total, self.bytes_unit)} in {elapsed:.1f}s ({_human(rate, self.bytes_unit)}/s)")
        return text + (f" {self.note}" if self.note else "")

    def update(self, n: float = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.quiet_every and self.done < self.total:
            self._last = now
            self._write(self.line() + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break the work
            pass

    def close(self, note: str | None = "") -> None:
        """Ends the bar (or prints the final line); idempotent."""
        if self._closed:
            return
        self._closed = True
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.close()
        else:
            self._write(self.line() + "\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # interrupted: end the bar where it stood, print no final line
            self._closed = True
            if self._bar is not None:
                self._bar.close()
