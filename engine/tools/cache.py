"""The on-disk cache of built reference models and their extractions: made once, shared by processes.

    path = cached_file("extracted", "tiny-<key>.h5", lambda out: extract(savedmodel, out, force=True))
    path = cached_folder("reference", "tiny-<key>", "reference.json", lambda out: build(out, ...))

Everything lives under cache_dir() ($TALKHEADS_CACHE, else ~/.cache/talkheads-ggelu-engine). A file
lock makes concurrent callers wait for one maker; what is made is renamed into place only when
complete (a folder by its maker's marker file, a file by an atomic write), so a cached entry that
exists is always whole. The key in the name says what the entry was made from: a changed input
gets a new entry, never a stale one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from typing import Callable


def cache_dir() -> str:
    """Where built reference models are kept: $TALKHEADS_CACHE, else ~/.cache/talkheads-ggelu-engine."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "talkheads-ggelu-engine")
    return os.environ.get("TALKHEADS_CACHE", default)


def cached_file(group: str, name: str, make: Callable[[str], object]) -> str:
    """`cache_dir()/group/name`, made once by `make(path)` (which must write the path atomically)
    under a lock beside it."""
    folder = os.path.join(cache_dir(), group)
    out = os.path.join(folder, name)
    if os.path.isfile(out):
        return out
    os.makedirs(folder, exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(out):
            make(out)
    return out


def cached_folder(group: str, name: str, marker: str, build_into: Callable[[str], object]) -> str:
    """`cache_dir()/group/name`, made once by `build_into(tmp_dir)` under one lock for the group, in a
    temporary folder renamed into place; `marker` is the file that says a build finished."""
    root = os.path.join(cache_dir(), group)
    path = os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:  # one builder at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(path, marker)):
            tmp = tempfile.mkdtemp(prefix=".building-", dir=root)
            try:
                build_into(os.path.join(tmp, "model"))
                if os.path.exists(path):
                    shutil.rmtree(path)
                os.rename(os.path.join(tmp, "model"), path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path
