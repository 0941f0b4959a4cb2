#!/usr/bin/env bash
# Creates .venv-peer/ at the repo root: the peer (Hugging Face transformers + sentence-transformers
# on PyTorch, CPU) that benchmarks/hf_peer.py runs in, for the tests that check the engine against
# it. Every package is pinned in requirements/peer.txt and installed with --no-deps, so no resolver
# runs (a resolver left alone would fetch a CUDA torch of several GB); `pip check` verifies the set.
# Idempotent: a stamp holding the hash of requirements/peer.txt makes a second run instant.
# The main job (scripts/main.sh) does not need it; scripts/test.sh calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv-peer
stamp=$venv/.setup-stamp
want=$(sha256sum < requirements/peer.txt | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
fail() { echo "setup_peer: FAILED: $*" >&2; exit 1; }
echo "setup_peer: creating $venv and installing requirements/peer.txt (torch CPU, transformers, sentence-transformers; about a minute)" >&2
rm -f "$stamp"
[ -x $venv/bin/python ] || "$python" -m venv $venv || fail "cannot create $venv with $python"
pip=($venv/bin/python -m pip --disable-pip-version-check --no-input)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "${pip[@]}" install -q --no-deps -r requirements/peer.txt >"$log" 2>&1; then
    cat "$log" >&2
    fail "pip install --no-deps -r requirements/peer.txt: $(grep -v '^\s*$' "$log" | tail -1)"
fi
if ! "${pip[@]}" check >"$log" 2>&1; then
    cat "$log" >&2
    fail "pip check found broken requirements in $venv (requirements/peer.txt is incomplete)"
fi
if ! $venv/bin/python -c 'import torch, transformers, sentence_transformers; assert torch.__version__.endswith("+cpu"), torch.__version__' >"$log" 2>&1; then
    cat "$log" >&2
    fail "the peer does not import in $venv: $(tail -1 "$log")"
fi
echo "$want" > "$stamp"
echo "setup_peer: done" >&2
