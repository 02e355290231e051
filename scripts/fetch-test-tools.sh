#!/usr/bin/env bash
# Installs the Python tools of scripts/test-tools.txt into a virtual environment,
# .cache/pytools (tests find its python there). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=.cache/pytools
stamp="$venv/.done-$(sha256sum scripts/test-tools.txt | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
rm -rf "$venv"
"$PYTHON" -m venv "$venv" || { echo "fetch-test-tools: $PYTHON -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r scripts/test-tools.txt
touch "$stamp"
echo "fetch-test-tools: $(grep -v '^#' scripts/test-tools.txt | tr '\n' ' ')in $venv"
