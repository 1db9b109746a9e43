#!/usr/bin/env bash
# CI stage Test: the checks a developer runs before pushing (no cluster, no Azure, no registry).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=.venv/bin/python
"$python" -m ruff check .
"$python" -m mypy
"$python" -m pytest -m unit -q
# The pipelines themselves, with Azure's own validator (Microsoft's azure-pipelines-language-service, pinned in
# package.json, and the Azure Pipelines schema vendored in deploy/pipeline/schema/).
[[ -d node_modules/azure-pipelines-language-service ]] || npm ci --no-audit --no-fund --loglevel=error
report=$(node deploy/pipeline/validate-pipeline.js azure-pipelines.yml azure-pipelines-model.yml) || {
  echo "$report"
  exit 1
}
