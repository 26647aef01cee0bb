#!/bin/sh
# Entrypoint of the Python services in docker-compose.yml: install gpu-router from the
# read-only source mount (/src) into the container, then exec the service's command.
# The build runs on a copy, so nothing is written into the user's checkout.
set -eu
rm -rf /tmp/gpu-router && mkdir /tmp/gpu-router
cd /src
cp -r pyproject.toml setup.py README.md proto gpu_router control_plane ext_proc simulator /tmp/gpu-router/
pip install --no-cache-dir --quiet --disable-pip-version-check --root-user-action=ignore \
  -c /src/constraints.txt /tmp/gpu-router
exec "$@"
