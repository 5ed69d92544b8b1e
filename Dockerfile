# DMAT container images. Targets (docker build --target NAME):
#   pipeline  the package with torch, DVC and MLflow: `dvc repro` or any `dmat` command on a mounted checkout
#   serve     onnxruntime and the HTTP server only (no torch), non-root, health-checked
#   tracking  an MLflow tracking server with the PostgreSQL driver, for docker-compose.yml
#
#   docker build --target pipeline -t dmat-pipeline .
#   docker run --rm -v "$PWD:/workspace" --user "$(id -u):$(id -g)" dmat-pipeline dvc repro
#   docker run --rm -v "$PWD:/workspace" --user "$(id -u):$(id -g)" dmat-pipeline dmat train --params params.yaml
#   docker build --target serve -t dmat-serve .
#   docker run --rm -p 127.0.0.1:8080:8080 -v "$PWD/models/export:/models:ro" dmat-serve
#
# GPUs: the CUDA builds of torch carry the CUDA runtime and cuDNN inside the wheels; the host's driver
# reaches the container through the NVIDIA Container Toolkit. So a GPU image needs only another wheel
# index (cu126, cu128, ...: the one your driver supports), not another base image:
#   docker build --target pipeline --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t dmat-pipeline:cuda .
#   docker run --rm --gpus all -v "$PWD:/workspace" dmat-pipeline:cuda dvc repro
# PYTHON_IMAGE may name any other Debian-based image with Python 3.11 as `python3` and its `venv` module (an in-house
# CUDA image, a mirror, Debian's own python3 + python3-venv). Every target installs into a virtual environment,
# /opt/dmat, built in a stage of its own and copied into the runtime stage, never into the base's interpreter: Debian
# and other distributions mark theirs "externally managed" (PEP 668) and refuse `pip install` there. Without a
# registry, containers/build-local-base.sh makes a stand-in for the official image and (target debian-python) such a
# plain Debian Python base:
#   --build-arg PYTHON_IMAGE=localhost/dmat-base-python:3.11-bookworm
#   --build-arg PYTHON_IMAGE=localhost/dmat-base-debian-python:bookworm
# Podman: build with --format docker, or HEALTHCHECK is dropped (the OCI image format has none).
#
# Pinned by exact tag (Python patch release + Debian release). For byte-identical rebuilds pin the digest too:
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm   ->   python:3.11.14-slim-bookworm@sha256:...
# CI lints this file with hadolint (`make lint`) and builds and runs the serve and tracking images with podman
# (tests/containers/); `make container-pipeline-test` does the same for the pipeline image.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
# Keep in step with pyproject.toml's version (tests/test_containers.py checks it).
ARG DMAT_VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.vendor="DMAT" \
      org.opencontainers.image.version="${DMAT_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# The virtual environment's python, pip and commands come first: `python`, `dmat`, `dvc`, `mlflow` are its own.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/dmat \
    PATH=/opt/dmat/bin:$PATH

# ---------------------------------------------------------------------------------------------------------------------
# The dmat wheel, built once and copied into each target: the final images hold no source tree and no build tools.
FROM base AS wheel
WORKDIR /build
# pyproject.toml reads its dependencies and readme from these files.
COPY pyproject.toml README.md requirements.txt requirements-dev.txt ./
COPY src ./src
RUN python3 -m venv /tmp/build \
    && /tmp/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------------------------
# The pipeline's virtual environment: its dependencies only (the large layer), so that editing the source reuses it.
FROM base AS pipeline-venv
# CPU wheels by default; see the top of this file for CUDA. The extra index adds torch's CPU (or CUDA) wheels; the
# local version label (+cpu) makes pip prefer them to PyPI's for the pinned torch==X.Y.Z.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# From the same pinned file the Makefile and CI install.
COPY requirements.txt /tmp/dmat/requirements.txt
RUN python3 -m venv /opt/dmat \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/dmat/requirements.txt

# ---------------------------------------------------------------------------------------------------------------------
FROM base AS pipeline
LABEL org.opencontainers.image.title="dmat-pipeline" \
      org.opencontainers.image.description="DMAT pipeline: dvc repro or any dmat stage (torch, DVC, MLflow)"
# git: `dvc repro` works inside a git repository and every run is tagged with its commit.
# tini: PID 1 that forwards SIGTERM/SIGINT, so `docker stop` interrupts a stage cleanly and it resumes later.
# safe.directory: the mounted checkout belongs to a host user, whom git would otherwise refuse to trust.
# DL3008 (pin apt versions) is ignored on purpose: Debian removes superseded package versions from its
# mirrors with each security update, so exact pins break rebuilds; the pinned base fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /workspace
COPY --from=pipeline-venv /opt/dmat /opt/dmat
COPY --from=wheel /wheels /tmp/dmat/wheels
RUN pip install --no-cache-dir --no-deps /tmp/dmat/wheels/dmat-*.whl \
    && rm -rf /tmp/dmat \
    && useradd --no-log-init --create-home --uid 1000 --user-group dmat
# The checkout is mounted here. Its src/ comes first on the import path: DVC hashes src/dmat/... as stage
# dependencies, so the code that runs must be the code it hashed, not the copy baked into the image.
WORKDIR /workspace
ENV PYTHONPATH=/workspace/src
USER 1000:1000
ENTRYPOINT ["tini", "--"]
CMD ["dvc", "repro"]

# ---------------------------------------------------------------------------------------------------------------------
# Only what serving needs: requirements-serve.txt (onnxruntime, numpy, pillow, mlflow-skinny), same pins as
# requirements.txt.
FROM base AS serve-venv
COPY requirements-serve.txt /tmp/dmat/requirements-serve.txt
RUN python3 -m venv /opt/dmat \
    && pip install --no-cache-dir -r /tmp/dmat/requirements-serve.txt

# ---------------------------------------------------------------------------------------------------------------------
FROM base AS serve
LABEL org.opencontainers.image.title="dmat-serve" \
      org.opencontainers.image.description="DMAT ONNX classifier over HTTP (onnxruntime only, no torch)"
# The package without its training dependencies.
COPY --from=serve-venv /opt/dmat /opt/dmat
COPY --from=wheel /wheels /tmp/dmat/wheels
RUN pip install --no-cache-dir --no-deps /tmp/dmat/wheels/dmat-*.whl \
    && rm -rf /tmp/dmat \
    && useradd --no-log-init --create-home --uid 10001 --user-group dmat
USER 10001:10001
WORKDIR /home/dmat
EXPOSE 8080
# python's urllib: slim images have no curl. /health answers once the model is loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["dmat", "serve"]
# 0.0.0.0: inside a container, 127.0.0.1 is the container's own loopback, which a published port never
# reaches. Exposure to the outside is decided where the port is published (-p 127.0.0.1:8080:8080).
CMD ["/models/classifier.onnx", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------------------------------------------------------------
# MLflow's own image lacks the PostgreSQL driver, so the compose file's tracking server is built here.
FROM base AS tracking-venv
# Keep in step with requirements.txt (mlflow) and requirements-dev.txt (psycopg[binary]); a test checks.
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG_VERSION=3.3.9
RUN python3 -m venv /opt/dmat \
    && pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg[binary]==${PSYCOPG_VERSION}"

# ---------------------------------------------------------------------------------------------------------------------
FROM base AS tracking
LABEL org.opencontainers.image.title="dmat-tracking" \
      org.opencontainers.image.description="MLflow tracking server with PostgreSQL support for DMAT teams"
COPY --from=tracking-venv /opt/dmat /opt/dmat
# /mlartifacts belongs to the server's user: a fresh named volume mounted there inherits that ownership.
RUN useradd --no-log-init --create-home --uid 10001 --user-group mlflow \
    && install -d -o 10001 -g 10001 /mlartifacts
USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
