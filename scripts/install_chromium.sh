#!/usr/bin/env bash
# Install Chromium so tests/test_report.py can render report.html headlessly.
# Idempotent; never fails the caller: the browser test skips when chromium is missing.
set -u

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; then
    exit 0
fi

echo "install_chromium.sh: could not install chromium (no network or apt?); browser test will be skipped" >&2
exit 0
