# syntax=docker/dockerfile:1
# The structsim service image: `structsim serve` (the serving DaemonSets) and `structsim autotune`
# (the tune Jobs) for NVIDIA GPUs. Build from the repository root:
#   docker build -f images/service.Dockerfile -t <registry>/structsim:0.1.0 .
#
# Base: python slim, not nvidia/cuda. PyPI's torch wheel (pinned in service.lock.txt) brings its own
# CUDA 13.0 runtime, cuBLAS and cuDNN as nvidia-* wheels, so a CUDA base image would only add a
# second, unused copy of those libraries. What the node must provide is the NVIDIA driver
# (>= 580 for CUDA 13.0), injected by the NVIDIA container toolkit with the device plugin's GPU.
# For older drivers, see docs/kubernetes.md (rebuild against a CUDA 12.x torch build).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Dependencies first, from the lock file alone, so code changes reuse this (large) layer.
COPY images/service.lock.txt /tmp/service.lock.txt
RUN python -m venv /opt/structsim \
    && /opt/structsim/bin/pip install -r /tmp/service.lock.txt
# structsim itself, from source, without re-resolving anything (everything is already pinned).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service service
COPY autotune autotune
COPY operator operator
RUN /opt/structsim/bin/pip install --no-deps . \
    && /opt/structsim/bin/pip check

FROM ${PYTHON_IMAGE}
# A fixed non-root user (10001), matching the pods' securityContext; /models is the only directory
# it owns: the model cache, normally a PersistentVolume (see spec.model.cache.pvc).
RUN groupadd --system --gid 10001 structsim \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin structsim \
    && mkdir /models \
    && chown 10001:10001 /models
COPY --from=build /opt/structsim /opt/structsim
ENV PATH=/opt/structsim/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    # `structsim serve` listens on all interfaces in a container (its default is loopback).
    STRUCTSIM_HOST=0.0.0.0 \
    # Model downloads (modelscope's snapshot_download) and structsim's own cache go to the volume.
    STRUCTSIM_CACHE_DIR=/models \
    MODELSCOPE_CACHE=/models \
    # The pods run with a read-only root filesystem and an emptyDir on /tmp: every other cache
    # (torch.compile/Triton kernels, matplotlib, Hugging Face) lands there.
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    # Asks the NVIDIA container runtime for the driver's compute and NVML (nvidia-smi) libraries;
    # which GPUs are visible is still decided by the device plugin's allocation.
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Verify the install at build time: the CLI starts and torch imports (no GPU is needed for that).
RUN structsim --version \
    && python -c "import torch, similarity_service, similarity_autotune"
VOLUME ["/models"]
USER 10001:10001
WORKDIR /tmp
# `structsim serve`'s default port; the operator's pods pass --port and its Service maps spec.port onto it.
EXPOSE 8000
ENTRYPOINT ["structsim"]
CMD ["serve"]
