#!/usr/bin/env bash
# Refresh the images' hashed dependency locks from pyproject.toml (Dockerfile.app and Dockerfile.operator install
# them with `pip install --require-hashes`):
#   bash requirements/lock.sh             # follow pyproject.toml: add and drop what it asks, keep every other pin
#   bash requirements/lock.sh --upgrade   # also move every pin to the newest version pyproject.toml allows
# pip-tools (pip-compile) runs in a throwaway venv of the images' Python minor (PYTHON, default python3.11) and
# uses pip's own index settings; tests/unit/test_image_locks.py checks that the locks still match pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$python" -m venv "$tools"
"$tools/bin/pip" install --quiet "pip-tools>=7.6,<8"
export CUSTOM_COMPILE_COMMAND="bash requirements/lock.sh"  # what the locks' headers say to run
lock() {
    # --all-build-deps + --allow-unsafe: setuptools (pyproject's build backend) is locked too, so the images
    # build the project itself without fetching an unhashed build environment.
    "$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
        --no-emit-index-url --no-emit-trusted-host --no-emit-find-links "$@" pyproject.toml
}
lock --extra app --output-file requirements/app-lock.txt "$@"
# The operator's pins of what both images use are the app's (one version of pydantic, azure-*, model-signing).
lock --extra operator --constraint requirements/app-lock.txt --output-file requirements/operator-lock.txt "$@"
