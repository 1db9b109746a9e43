#!/usr/bin/env bash
# Install the project into .venv (the `modelapp` CLI and, with EXTRAS=dev, the test tools).
# CI runs this before the other steps; locally deploy/local/setup.sh has done it already.
set -euo pipefail
cd "$(dirname "$0")/../.."
extras=${EXTRAS:-operator}
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --editable ".[$extras]"
.venv/bin/modelapp --help >/dev/null
