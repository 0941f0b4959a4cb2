#!/usr/bin/env bash
# Builds .cache/onnx-venv: an overlay venv with the pinned ONNX peers of requirements/bench.txt that
# also sees the project's .venv site-packages (so tf2onnx uses the project's TensorFlow). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/onnx-venv
stamp=$venv/.stamp
want=$(sha256sum requirements/bench.txt | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
base_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -x $venv/bin/python ] || .venv/bin/python -m venv $venv
site=$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base_site" > "$site/_project_venv.pth"
$venv/bin/python -m pip --disable-pip-version-check --no-input install -q -r requirements/bench.txt
echo "$want" > "$stamp"
