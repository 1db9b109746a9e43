# The ModelApp serving image: gunicorn + Flask, downloads and verifies the pinned model at start-up.
# Build from the repository root: docker build -f Dockerfile.app -t modelapp-serving .
# Runs as a non-root numeric user with a read-only root filesystem; writable paths are volumes:
#   /var/cache/modelapp (model cache, emptyDir) and /tmp (PROMETHEUS_MULTIPROC_DIR, emptyDir).

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/modelapp
WORKDIR /src
# The project is one distribution with three source roots; setuptools needs all of them to build it.
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY deploy/local/modelapp_localstack/ deploy/local/modelapp_localstack/
COPY app/ app/
RUN /opt/modelapp/bin/pip install ".[app]" \
    && /opt/modelapp/bin/python -m compileall -q /opt/modelapp

FROM python:3.11-slim
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
