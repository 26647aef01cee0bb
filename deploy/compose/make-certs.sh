#!/bin/sh
# Run by the control plane's entrypoint in docker-compose.yml, after gpu-router is installed and
# before the control plane starts: the fleet's CA and certificates for mutual TLS on the control
# plane's gRPC port (gpu_router/pki.py). First start makes them; later starts keep every valid
# file (`gpu-router certs init` never overwrites one), so a CA of your own placed in the pki
# volume is used as it is. Each role gets its own volume, mounted only into that role's
# containers: an ext_proc container cannot read an edge key (the only role given provider keys),
# and no container but the control plane holds the CA key.
#   pki volume (control plane only): ca.pem, ca-key.pem, control-plane.pem/-key.pem, the others
#   edge volume     -> every Envoy at /etc/gpu-router/certs: ca.pem, edge.pem, edge-key.pem
#   ext-proc volume -> every ext_proc at /certs: ca.pem, ext-proc.pem, ext-proc-key.pem
# The directories can be moved for tests: PKI_DIR, EDGE_DIR, EXT_PROC_DIR.
set -eu
pki=${PKI_DIR:-/pki}
edge=${EDGE_DIR:-/edge-certs}
ext_proc=${EXT_PROC_DIR:-/ext-proc-certs}

gpu-router certs init --dir "$pki" --edge edge --ext-proc ext-proc > /dev/null

mkdir -p "$edge" "$ext_proc"
cp "$pki/ca.pem" "$pki/edge.pem" "$edge/"
cp "$pki/ca.pem" "$pki/ext-proc.pem" "$pki/ext-proc-key.pem" "$ext_proc/"
# The Envoy image runs Envoy as its own unprivileged user, which must read the key: the file is
# readable by all, in a volume that only the Envoy containers mount.
install -m 0644 "$pki/edge-key.pem" "$edge/edge-key.pem"
exec "$@"
