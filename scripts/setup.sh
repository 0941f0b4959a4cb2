#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs every pinned requirement into it.
# Idempotent: a stamp holding the hash of the requirement files makes a second run instant.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat requirements/lock.txt requirements/no-deps.txt setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setup: creating .venv and installing pinned requirements (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check --no-input)
"${pip[@]}" install -q -r requirements/lock.txt
"${pip[@]}" install -q --no-deps -r requirements/no-deps.txt
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: done" >&2
