"""The suite's memory, made visible: a thread samples the resident size of the test process and its
children every 0.25 s and keeps each test's highest; the session's summary prints the peak of the
whole tree, the test process's own peak (getrusage) and the five tests that reached the highest
peaks, so a CI log states the suite's memory against its 8 GB budget (tests/conftest.py)."""

from __future__ import annotations

import os
import resource
import threading

SAMPLE_S = 0.25
BUDGET_MB = 8 * 1024


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident size of `pid` and all its descendants, MB (0 where there is no /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _rss_kib(p)
        todo += _children(p)
    return total / 1024


def own_peak_mb() -> float:
    """This process's peak resident size, MB (getrusage; Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryRecord:
    """Per test: the highest resident size of the test process and its children sampled while it ran;
    for a test run in a process of its own (tests/isolated.py), that process's exact peak too."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.own_peaks: dict[str, float] = {}
        self.current: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-record", daemon=True)

    def start(self) -> None:
        if os.path.isdir(f"/proc/{os.getpid()}"):
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _sample(self) -> None:
        pid = os.getpid()
        while not self._stop.wait(SAMPLE_S):
            name = self.current
            if name is not None:
                mb = tree_rss_mb(pid)
                if mb > self.peaks.get(name, 0.0):
                    self.peaks[name] = mb

    def summary(self) -> list[str]:
        if not self.peaks:
            return []
        top = sorted(self.peaks.items(), key=lambda kv: -kv[1])[:5]
        peak = top[0][1]
        lines = [f"peak resident size of the test process and its children: {peak:,.0f} MB, sampled every "
                 f"{SAMPLE_S:g} s ({'within' if peak < BUDGET_MB else 'OVER'} the {BUDGET_MB:,} MB budget); "
                 f"of the test process alone: {own_peak_mb():,.0f} MB (getrusage)",
                 "the five tests with the highest peaks (MB, test process and children together):"]
        for name, mb in top:
            own = f"  (its own process: {self.own_peaks[name]:,.0f})" if name in self.own_peaks else ""
            lines.append(f"  {mb:8,.0f}  {name}{own}")
        return lines
