"""The peer (Hugging Face transformers + sentence-transformers on PyTorch, CPU) from the tests: one
request in, one result out, through benchmarks/hf_peer.py run by .venv-peer/bin/python in a
subprocess (the peer's venv is its own: torch never enters the test process).

    from tests.peer import run_peer
    res = run_peer({"model": folder, "kind": "bert", "input_word_ids": ids, "input_mask": mask,
                    "input_type_ids": types, "dtype": "float64"})
    res["sequence_output"], res["pooled_output"], res["encoder_outputs"]   # the last: a list of L arrays
    res["info"]                                                            # a dict: versions, missing keys, tokens

The request's keys are those of benchmarks/hf_peer.py (its docstring lists them): arrays, strings,
lists of strings and numbers. run_peer skips the test (naming `bash scripts/setup_peer.sh`) when
.venv-peer is absent, and fails with the peer's stderr when the peer fails or runs past `timeout`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = os.path.join(REPO, ".venv-peer", "bin", "python")
PEER_SCRIPT = os.path.join(REPO, "benchmarks", "hf_peer.py")
PEER_STAMP = os.path.join(REPO, ".venv-peer", ".setup-stamp")


def peer_missing() -> str | None:
    """Why the peer cannot run here (a skip reason), or None when it can."""
    if not os.path.isfile(PEER_STAMP) or not os.access(PEER_PYTHON, os.X_OK):
        return ("the peer venv .venv-peer (torch CPU, transformers, sentence-transformers) is not set up: "
                "run `bash scripts/setup_peer.sh` (scripts/test.sh does)")
    return None


requires_peer = pytest.mark.skipif(peer_missing() is not None, reason=str(peer_missing()))


def _request_array(key: str, value):
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return np.array(list(value), dtype=str)
    if isinstance(value, (str, bool, int, float)):
        return np.array(value)
    return np.asarray(value)


def run_peer(request: dict, timeout: float = 300) -> dict:
    """Run benchmarks/hf_peer.py on `request`; its result arrays, with `info` as a dict and
    `encoder_outputs` as a list of [B,S,H] arrays."""
    reason = peer_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        req_path = os.path.join(tmp, "request.npz")
        out_path = os.path.join(tmp, "result.npz")
        np.savez(req_path, **{k: _request_array(k, v) for k, v in request.items()})
        cmd = [PEER_PYTHON, PEER_SCRIPT, req_path, out_path]
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            pytest.fail(f"the peer ran past {timeout:.0f} s on kind={request.get('kind')!r}; its stderr:\n{err[-4000:]}")
        if proc.returncode != 0 or not os.path.isfile(out_path):
            pytest.fail(f"the peer failed (exit {proc.returncode}) on kind={request.get('kind')!r} "
                        f"model={request.get('model')!r}; its stderr:\n{proc.stderr[-4000:]}")
        with np.load(out_path, allow_pickle=False) as z:
            result = {k: z[k] for k in z.files}
    result["info"] = json.loads(str(result["info"]))
    if "encoder_outputs" in result:
        result["encoder_outputs"] = list(result["encoder_outputs"])
    return result
