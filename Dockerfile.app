# The ModelApp serving image: gunicorn + Flask, downloads and verifies the pinned model at start-up.
# Build from the repository root: docker build -f Dockerfile.app -t modelapp-serving .
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and its venv module (default python:3.11-slim); the local
# stack builds on its own Debian base (modelapp_localstack/images.py, `modelapp-stack build`).
# Runs as a non-root numeric user with a read-only root filesystem; writable paths are volumes:
#   /var/cache/modelapp (model cache, emptyDir) and /tmp (PROMETHEUS_MULTIPROC_DIR, emptyDir).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/modelapp
WORKDIR /src
# Every dependency comes from the hashed lock (requirements/app-lock.txt, made from pyproject.toml by
# requirements/lock.sh): pip refuses a file whose sha256 is not listed and a requirement without one, and takes
# wheels only, so no package's build code runs here. It is installed before the sources are copied, so a source
# change reuses this layer.
COPY requirements/app-lock.txt requirements/
RUN /opt/modelapp/bin/pip install --require-hashes --only-binary=:all: -r requirements/app-lock.txt
# The project is one distribution with several source roots; this image takes only the app's and the contract
# it shares with the operator (setuptools builds the roots that are there), so an operator change never
# rebuilds it. The other roots' commands are not installed.
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY app/ app/
# The project itself with the locked setuptools (its build backend) and nothing from an index; `pip check` fails
# the build if the lock lacks a dependency. setuptools is then removed: nothing runs it.
RUN /opt/modelapp/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/modelapp/bin/pip check \
    && /opt/modelapp/bin/pip uninstall --yes --quiet setuptools \
    && rm -f /opt/modelapp/bin/modelapp /opt/modelapp/bin/kubectl-modelapp /opt/modelapp/bin/modelapp-operator \
        /opt/modelapp/bin/modelapp-stack /opt/modelapp/bin/modelapp-demo \
    && /opt/modelapp/bin/python -m compileall -q /opt/modelapp

# The same base as the builder, so the venv's interpreter path (/usr/bin/python3 or /usr/local/bin/python3) is valid.
FROM ${BASE_IMAGE}
ENV PATH=/opt/modelapp/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MODELAPP_PORT=8080 \
    MODELAPP_MODEL_CACHE_DIR=/var/cache/modelapp \
    PROMETHEUS_MULTIPROC_DIR=/tmp/modelapp-prometheus
COPY --from=builder /opt/modelapp /opt/modelapp
RUN mkdir -p /var/cache/modelapp \
    && chown 10001:10001 /var/cache/modelapp
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["modelapp-serve"]
