# syntax=docker/dockerfile:1
# kaireon-pub: the outbox publisher tier. Build: docker build -t kaireon-pub .
# Two stages: dependencies are installed into a virtualenv in the build stage and only that
# virtualenv is copied into the runtime image (no pip cache, no build leftovers).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Every runtime dependency ships manylinux wheels, so no compiler is needed here.
COPY pyproject.toml README.md ./
COPY kaireon_pub ./kaireon_pub
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
# tini is PID 1: it forwards SIGTERM to the supervisor (which drains its workers) and reaps
# orphans; the kernel gives no default signal handling to a bare PID 1.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kaireon \
    && useradd --system --uid 10001 --gid kaireon --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kaireon
COPY --from=build /opt/venv /opt/venv
# The metrics directory and the liveness file live under /tmp, so the root filesystem can be
# read-only with a tmpfs (Kubernetes: an emptyDir) on /tmp; the supervisor creates the directory.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/kaireon-metrics
USER 10001:10001
WORKDIR /tmp
# /metrics, /healthz, /readyz and the reaper cron route (OUTBOX_HTTP_PORT).
EXPOSE 9464
STOPSIGNAL SIGTERM
# The same check as the Helm chart's liveness probe (outboxPublisher.livenessProbe.maxStaleSeconds).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["kaireon-pub", "liveness-check", "--max-stale-seconds", "90"]
# `docker run IMAGE migrate` (or reap, liveness-check) runs another command of the CLI.
ENTRYPOINT ["tini", "--", "kaireon-pub"]
CMD ["run"]
