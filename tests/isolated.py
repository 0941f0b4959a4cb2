"""Base-size work in processes of its own: each `slow` test, the building of the base models, and
single calls (isolated.call) whose memory must not stay with the test.

A test marked `slow` (base-size work: a model of 138M parameters in TensorFlow, float32 and float64)
runs in a fresh interpreter, `python -m pytest NODEID`, whenever the run holds more than one test,
and these run first.
The memory it takes goes back to the OS when that process ends, so the test process stays at the
size of the small models, and the suite's peak is the test process plus one base-size test, not
the sum of what every base-size test left allocated (TensorFlow keeps loaded models and its
buffers, malloc keeps freed blocks). The child's reports (outcome, captured output, failure text,
duration) come back as this process's reports, so -x, -rA, --durations and the summary work as
usual; a child that ends without its reports (killed for memory, say) is a failure that says so.

The base reference models (engine.tf.reference.cached, then engine.tf.extract.cached_extraction)
are built or found by a child process too: building one takes about 3 GB that the builder's
process keeps. The test process has them ready before its first isolated test, so a child finds
them on disk.

isolated.call(function, *args) runs one function in a fresh interpreter and returns its result:
for a base-size test, TensorFlow's side of a comparison (TF keeps a loaded model and its buffers
for the life of the process) or a command that loads models of its own.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
import tempfile

import pytest

from tests.memory_record import own_peak_mb

REPORTS_ENV = "TALKHEADS_TEST_REPORTS"   # set in the child: the JSON-lines file its reports go to
BASE_CONDITIONINGS = ("random", "trained")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_child() -> bool:
    return REPORTS_ENV in os.environ


# ------------------------------------------------------------------------------------ base models

@functools.cache
def base_model(conditioning: str) -> tuple[str, str]:
    """(SavedModel folder, HDF5 extraction) of the base reference model, seed 0: found in this
    process inside an isolated test (the test process built it before starting the child), built or
    found by a child process elsewhere."""
    if in_child():
        from engine.tf import extract, reference
        savedmodel = reference.cached("base", seed=0, conditioning=conditioning)
        return savedmodel, extract.cached_extraction(savedmodel)
    code = ("from engine.tf import extract, reference; "
            f"sm = reference.cached('base', seed=0, conditioning={conditioning!r}); "
            "h5 = extract.cached_extraction(sm); print(sm); print(h5)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the base {conditioning} reference model failed (exit status "
                           f"{proc.returncode}):\n{proc.stderr[-4000:]}")
    savedmodel, h5 = proc.stdout.strip().splitlines()[-2:]
    return savedmodel, h5


# ------------------------------------------------------------------------------------ isolation

class IsolatedFailure(Exception):
    """A failure of the test's own process: the text is its report."""


class IsolatedTest(pytest.Item):
    """A test run by a fresh `python -m pytest NODEID`, standing in for it in this process (same
    node id, markers and location; no fixtures here: the child sets up its own)."""

    def __init__(self, *, original: pytest.Item, **kwargs):
        super().__init__(**kwargs)
        self.original = original
        self.own_markers = list(original.own_markers)
        self.keywords.update(original.keywords)

    def reportinfo(self):
        return self.original.reportinfo()

    def runtest(self) -> None:
        for conditioning in BASE_CONDITIONINGS:
            base_model(conditioning)
        records, tail = self._run_child()
        for r in records:
            if "peak_rss_mb" in r:
                self.user_properties.append(("own_peak_rss_mb", r["peak_rss_mb"]))
        reports = [r for r in records if "when" in r]
        for title, content in reports[-1]["sections"] if reports else ():   # each phase's, the last one has all
            _, key, when = title.split(" ", 2)
            self.add_report_section(when, key, content)
        failed = [r for r in reports if r["outcome"] == "failed"]
        if failed:
            raise IsolatedFailure("\n".join(f"[{r['when']}, in the test's own process]\n{r['text']}" for r in failed))
        skipped = [r for r in reports if r["outcome"] == "skipped"]
        if skipped:
            pytest.skip(skipped[0]["reason"])
        if not any(r["when"] == "teardown" for r in reports):
            raise IsolatedFailure(tail)

    def _run_child(self) -> tuple[list[dict], str]:
        config = self.config
        fd, path = tempfile.mkstemp(prefix="isolated-", suffix=".jsonl")
        os.close(fd)
        live = config.getoption("capture") == "no"     # -s: the test's prints as they come
        cmd = [sys.executable, "-m", "pytest", self.nodeid, "-q", "--no-header", "-p", "no:cacheprovider",
               f"--capture={config.getoption('capture')}", "-o", "addopts=--strict-markers"]
        try:
            proc = subprocess.run(cmd, cwd=str(config.rootpath), env=dict(os.environ, **{REPORTS_ENV: path}), text=True,
                                  stdout=None if live else subprocess.PIPE, stderr=None if live else subprocess.STDOUT)
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip()]
        finally:
            os.unlink(path)
        code = proc.returncode
        why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        output = "its output is above" if live else f"the end of its output:\n{(proc.stdout or '')[-4000:]}"
        tail = (f"the test's own process ended without its reports ({why}; signal 9 is usually the kernel's "
                f"out-of-memory killer); {output}")
        return records, tail

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, IsolatedFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def isolate(items: list) -> None:
    """Replaces each `slow` test by its IsolatedTest when the run holds more than one test, and runs
    them first, in their order: the test process is then at its smallest (0.8 GB after collecting
    the suite, against 2 to 3 GB once the tiny-model tests have run), and it is the test process
    plus one child that makes the suite's peak."""
    if in_child() or len(items) < 2:
        return
    def runs_apart(item):   # a slow test that will run (one skipped by its marks is skipped here)
        return item.get_closest_marker("slow") is not None and item.get_closest_marker("skip") is None
    heavy = [IsolatedTest.from_parent(item.parent, name=item.name, original=item) for item in items if runs_apart(item)]
    items[:] = heavy + [item for item in items if not runs_apart(item)]


# ------------------------------------------------------------------------------------ in the child

def send_report(report: pytest.TestReport) -> None:
    """Each phase's outcome, failure text, captured output and skip reason, to the test process's file."""
    reason = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        path, line, message = report.longrepr
        reason = f"{message.removeprefix('Skipped: ')} (in the test's own process, {path}:{line})"
    record = {"when": report.when, "outcome": report.outcome, "text": report.longreprtext if report.failed else "",
              "sections": [list(s) for s in report.sections], "reason": reason}
    with open(os.environ[REPORTS_ENV], "a") as f:
        f.write(json.dumps(record) + "\n")


def send_peak() -> None:
    """The child's own peak resident size, exact (getrusage of this process alone)."""
    with open(os.environ[REPORTS_ENV], "a") as f:
        f.write(json.dumps({"peak_rss_mb": round(own_peak_mb(), 1)}) + "\n")


# ------------------------------------------------------------------------------------ one call

def call(function, *args, **kwargs):
    """`function(*args, **kwargs)` in a fresh interpreter, its result pickled back: for work whose
    memory must not stay with the caller (TensorFlow keeps a loaded model and its buffers for the
    life of the process). `function` is importable by name (a module's top-level function); its
    arguments and result pickle; what it prints is printed here."""
    with tempfile.TemporaryDirectory(prefix="isolated-call-") as tmp:
        with open(os.path.join(tmp, "call.pkl"), "wb") as f:
            pickle.dump((function, args, kwargs), f, protocol=pickle.HIGHEST_PROTOCOL)
        proc = subprocess.run([sys.executable, "-m", "tests.isolated", tmp], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{function.__module__}.{function.__qualname__} in its own process failed (exit status "
                               f"{proc.returncode}):\n{proc.stderr[-4000:]}")
        sys.stdout.write(proc.stdout)   # what it printed, into this test's captured output
        sys.stderr.write(proc.stderr)
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return pickle.load(f)


def _serve_call(folder: str) -> None:
    with open(os.path.join(folder, "call.pkl"), "rb") as f:
        function, args, kwargs = pickle.load(f)
    result = function(*args, **kwargs)
    with open(os.path.join(folder, "result.pkl"), "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    _serve_call(sys.argv[1])
