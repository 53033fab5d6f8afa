# k3d-registry-dockerd as k3d runs a registry: a container with the Docker (or Podman) socket mounted,
# REGISTRY_HTTP_ADDR set by k3d, listening on :5000.
#
#   docker build -t k3d-registry-dockerd .
#   docker run -d -p 5000:5000 -v /var/run/docker.sock:/var/run/docker.sock k3d-registry-dockerd
#
# BASE and PIP_INSTALL exist so tests can build offline (a local base image and pre-built wheels);
# a normal build needs neither. Python >= 3.12: aiohttp starts a request's handler in the event loop turn
# that read it (eager tasks), which under a thousand connections keeps a manifest answer from waiting a
# whole turn of the loop.
ARG BASE=python:3.13-slim-bookworm

FROM ${BASE} AS builder
ARG PIP_INSTALL=.
COPY . /src
WORKDIR /src
# The dependencies ship binary wheels, so no compiler is needed here or left in the runtime stage.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile ${PIP_INSTALL} \
 && /opt/venv/bin/python -m compileall -q /opt/venv

FROM ${BASE}
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REGISTRY_HTTP_ADDR=:5000 \
    K3D_REGISTRY_DOCKERD_CACHE_DIR=/var/cache/k3d-registry-dockerd
VOLUME /var/cache/k3d-registry-dockerd
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('REGISTRY_HTTP_ADDR', ':5000').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["k3d-registry-dockerd"]
