#!/usr/bin/env bash
# The README's test command: sets everything up on a fresh machine, then runs the test suite.
# Extra arguments go to pytest (for example `-m "not slow"` or `-k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_peer.sh
bash scripts/setup_browser.sh </dev/null
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2} TF_USE_LEGACY_KERAS=1
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit $rc
