# syntax=docker/dockerfile:1
# The structsim operator image: `structsim operator` (kopf). No torch, no model.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t <registry>/structsim-operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY images/operator.lock.txt /tmp/operator.lock.txt
RUN python -m venv /opt/structsim \
    && /opt/structsim/bin/pip install -r /tmp/operator.lock.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service service
COPY autotune autotune
COPY operator operator
# --no-deps: structsim's core dependencies include torch, which the operator never imports; the
# lock file holds exactly what `structsim operator` needs.
RUN /opt/structsim/bin/pip install --no-deps .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 structsim \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin structsim
COPY --from=build /opt/structsim /opt/structsim
ENV PATH=/opt/structsim/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
# Verify at build time that the operator's CLI loads without torch.
RUN structsim operator --help >/dev/null \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
USER 10001:10001
WORKDIR /tmp
# kopf's liveness endpoint (--liveness-port), probed by the chart's Deployment.
EXPOSE 8080
ENTRYPOINT ["structsim"]
CMD ["operator", "--all-namespaces", "--liveness-port", "8080"]
