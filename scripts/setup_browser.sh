#!/usr/bin/env bash
# Installs Debian's chromium for the explain page's browser tests when it is missing and this
# machine allows it (root, apt-get). Never fails its caller: without a browser those tests skip,
# saying why.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: not root or no apt-get: the browser tests will skip" >&2
    exit 0
fi
echo "setup_browser: installing Debian's chromium for the explain page's tests (a minute or two)" >&2
log=$(mktemp)
if DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >>"$log" 2>&1; then
    echo "setup_browser: done" >&2
else
    echo "setup_browser: apt-get could not install chromium (log: $log); the browser tests will skip" >&2
fi
exit 0
