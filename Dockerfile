# syntax=docker/dockerfile:1
# kaireon-pub: the outbox publisher tier.
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" -t kaireon-pub .
# Two stages. The build stage installs the locked dependencies (requirements/runtime.txt, every
# file checked against its sha256) into a virtualenv in a layer of their own, then builds and adds
# the tier's own wheel last, so a code change rebuilds only that last layer. The runtime stage
# takes the virtualenv and has no pip, setuptools or wheel.

# The base is pinned by digest (a multi-arch index), with its tag beside it for the reader.
# Renovate or Dependabot (docker) refresh the digest; by hand:
#   docker buildx imagetools inspect python:3.12-slim-bookworm   (the "Digest:" line)
# The Python version here is the one requirements/*.txt are compiled for (--python-version).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm@sha256:782412e85d0f0984994c290652577d4018aff08145c85b262bb63dc0c7522254

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Dependencies: only the lock files, so this layer is rebuilt when a lock changes and never for
# a code change. Wheels only (every runtime dependency ships manylinux wheels for amd64 and
# arm64): no compiler, no sdist build. The build stage's own pip installs into the virtualenv
# (--python), so the virtualenv never gets a pip of its own.
COPY requirements/ ./requirements/
RUN python -m venv --without-pip /opt/venv \
    && pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: -r requirements/build.txt \
    && pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes --no-deps --only-binary=:all: -r requirements/runtime.txt
# The tier's code, last: built with the locked setuptools (no unpinned build isolation) and
# installed without touching the dependencies.
COPY pyproject.toml README.md ./
COPY kaireon_pub ./kaireon_pub
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
    && pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /tmp/dist/kaireon_pub-*.whl

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kaireon-pub" \
      org.opencontainers.image.description="Outbox publisher tier: PostgreSQL outbox_events -> Kafka, at least once, in order per key" \
      org.opencontainers.image.source="https://github.com/kaireon/kaireon-pub" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# tini is PID 1: it forwards SIGTERM to the supervisor (which drains its workers) and reaps
# orphans; the kernel gives no default signal handling to a bare PID 1.
# No installer at run time: the base image's pip (and setuptools/wheel where a base has them) is
# uninstalled and ensurepip's bundled wheels deleted, so nothing in the container can install code.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* \
    && rm -rf /var/lib/apt/lists/* \
    && python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
    && rm -rf "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/ensurepip" \
    && groupadd --system --gid 10001 kaireon \
    && useradd --system --uid 10001 --gid kaireon --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kaireon
COPY --from=build /opt/venv /opt/venv
# Read-only root friendly: nothing writes outside /tmp. The metrics directory and the liveness
# file live there, so the root filesystem can be read-only with a tmpfs (Kubernetes: an emptyDir)
# on /tmp; the supervisor creates the directory. No bytecode is written at run time (the wheels'
# .pyc files were compiled at install).
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
