# syntax=docker/dockerfile:1
# The cnnflow image: the training entrypoint (python -m cnnflow.train, torchrun), the CLI
# and the MLflow server, run as uid 1000 with a read-only root filesystem.
#
#   CPU:  docker build --build-arg VARIANT=cpu \
#             --build-arg TORCH_INDEX_URL=<the PyTorch CPU wheel index> -t cnnflow:0.1.0 .
#   CUDA: docker build --build-arg VARIANT=cuda -t cnnflow:0.1.0-cuda .
#
# TORCH_INDEX_URL (default empty = the package index pip is configured with): PyPI's
# Linux torch==2.13.0 wheel is the CUDA build (CUDA libraries come as pip packages; the
# node only needs the NVIDIA driver), so VARIANT=cuda needs nothing more. The CPU-only
# wheel (~10x smaller) is on PyTorch's CPU index ("/whl/cpu" on PyTorch's download
# host) or a mirror of it: pass it as TORCH_INDEX_URL. A VARIANT=cpu build that would
# install a CUDA wheel fails instead of silently shipping gigabytes of CUDA libraries.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index; the project's `torch==2.13.0` is then satisfied.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
 && python -c "import sys, torch; cuda = torch.version.cuda; v = '$VARIANT'; \
sys.exit(0 if (v == 'cpu') == (cuda is None) else \
f'VARIANT={v} but torch has CUDA={cuda}: for cpu pass --build-arg TORCH_INDEX_URL=<CPU index>')"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

FROM ${PYTHON_IMAGE}
ARG VARIANT=cpu
# The checkout the image is built from (pods have no .git): --build-arg
# GIT_COMMIT=$(git rev-parse HEAD) --build-arg GIT_DIRTY=$(test -z "$(git status
# --porcelain --untracked-files=no)" && echo false || echo true). Every run tags it.
ARG GIT_COMMIT=""
ARG GIT_DIRTY=unknown
LABEL org.opencontainers.image.title="cnnflow" \
      org.opencontainers.image.description="cnnflow training image (${VARIANT})" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV CNNFLOW_GIT_COMMIT=${GIT_COMMIT} CNNFLOW_GIT_DIRTY=${GIT_DIRTY}
RUN groupadd --gid 1000 cnnflow \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin cnnflow
COPY --from=build /opt/venv /opt/venv
# HOME=/tmp: the root filesystem is read-only in the pods; /tmp is an emptyDir there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /workspace
USER 1000:1000
CMD ["python", "-m", "cnnflow.train", "--help"]
