# syntax=docker/dockerfile:1
# The elasticd image; its entrypoint is `elasticd` (the Helm chart runs
# `elasticd run --config /etc/elasticd/config.yaml --node-id $(POD_NAME)`).
# It installs the way the README's quickstart does, `bash .ci/install` (tests/helm checks that
# the two stay in step), into a virtual environment, plus the `s3` extra for S3 checkpoints.
#
#   GPU (default): docker build -t elasticd:0.1.0 .
#   CPU (tests):   docker build -t elasticd:0.1.0-cpu \
#                    --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# Where a CPU-only torch comes from (empty: .ci/install's torch==2.13.0 from the default
# index, a CUDA build). .ci/install never replaces a torch that is already installed.
ARG TORCH_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/elasticd/venv \
    PATH=/opt/elasticd/venv/bin:$PATH

# Python >= 3.11 with venv: the CUDA images have no Python, the python images do.
RUN if ! python3 -c "import sys, venv; assert sys.version_info >= (3, 11)" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/elasticd/venv \
    && groupadd --gid 10001 elasticd \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin elasticd

WORKDIR /opt/elasticd/src
COPY . .
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
      python -m pip install --quiet --index-url "$TORCH_INDEX_URL" "torch==2.13.0"; \
    fi \
    && PYTHON=python bash .ci/install \
    && python -m pip install --quiet -e ".[s3]" \
    && python -m compileall -q daemon elastic model ops

# The chart's pod security context runs as this user with a read-only root file system.
USER 10001:10001
ENTRYPOINT ["elasticd"]
CMD ["--help"]
