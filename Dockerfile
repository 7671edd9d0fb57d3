# syntax=docker/dockerfile:1
# One image, three commands:
#   outbound-operator ...   the kopf operator and the sidecar-injection webhook (the chart's Deployment)
#   outbound-hook-checker   checks Lua hooks for the operator, in a container of its Pod without a token
#   outbound-relay serve    the SMTP relay sidecar (injected into opted-in Pods)
# Build from the repository root:  docker build -t ghcr.io/outbound-relay/outbound-relay:0.1.0 .
# It runs as UID/GID 65532 on a read-only root filesystem; nothing is written at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, from pyproject.toml alone: a source change does not reinstall them.
COPY pyproject.toml ./
# One line, no heredoc: Debian's buildah (hack/image) predates heredocs in RUN.
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
    > /tmp/requirements.txt
RUN python -m venv /opt/outbound-relay \
 && /opt/outbound-relay/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY relay/ relay/
COPY operator/ operator/
RUN /opt/outbound-relay/bin/pip install --no-deps . \
 # Bytecode now: at run time the root filesystem is read-only.
 && /opt/outbound-relay/bin/python -m compileall -q -j 0 /opt/outbound-relay \
 && /opt/outbound-relay/bin/outbound-relay --help >/dev/null \
 && /opt/outbound-relay/bin/outbound-operator --help >/dev/null \
 && /opt/outbound-relay/bin/outbound-hook-checker --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="outbound-relay" \
      org.opencontainers.image.description="Authenticated outbound SMTP relay sidecar and its Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 relay \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin relay
# The python images ship the standard library without bytecode: compile it here, as root, or every start
# of the operator and of each sidecar (read-only root filesystem, PYTHONDONTWRITEBYTECODE) compiles the
# stdlib modules it imports all over again (seconds of CPU per Pod start).
RUN python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
# Same base image in both stages: the venv's python symlink (/usr/local/bin/python3.11) resolves here too.
COPY --from=build /opt/outbound-relay /opt/outbound-relay
ENV PATH=/opt/outbound-relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 2525: SMTP on loopback (the app's side); 9425: relay /metrics; 9426: operator /metrics; 9443: webhook.
EXPOSE 9425 9426 9443
# No ENTRYPOINT: the chart names the command (outbound-operator, outbound-hook-checker, or outbound-relay
# for the sidecar).
CMD ["outbound-relay", "--help"]
