#!/usr/bin/env bash
# CI stage Test: the checks a developer runs before pushing (no cluster, no Azure, no registry).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=.venv/bin/python
"$python" -m ruff check .
"$python" -m mypy
"$python" -m pytest -m unit -q
