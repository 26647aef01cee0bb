#!/bin/sh
# Run by the control plane's entrypoint in docker-compose.yml, after gpu-router is installed and
# before the control plane starts: the fleet's CA and certificates for mutual TLS on the control
# plane's gRPC port (gpu_router/pki.py). First start makes them; later starts keep every valid
# file (`gpu-router certs init` never overwrites one), so a CA of your own placed in the pki
# volume is used as it is. Each role gets its own volume, mounted only into that role's
# containers: an ext_proc container cannot read an edge key (the only role given provider keys),
# and no container but the control plane holds the CA key.
#   pki volume (control plane only): ca.pem, ca-key.pem, control-plane.pem/-key.pem, the others
#   <node>-certs    -> that Envoy only, at /etc/gpu-router/certs: ca.pem, edge.pem, edge-key.pem,
#                      its own certificate (the control plane takes an edge's node id only from
#                      the certificate naming it), for each node in EDGE_NODES
#   <replica>-certs -> that ext_proc only, at /certs: ca.pem, ext-proc.pem, ext-proc-key.pem,
#                      its own certificate (named by the replica: revoking one leaves the
#                      others), and redis-password, its own Redis user's, for each replica in
#                      EXT_PROC_REPLICAS; the CRL reaches them over xDS
#   redis volume    -> Redis only, at /redis: redis-password (its default user's: PING only,
#                      for the healthcheck), and redis.conf (for redis-server: a user per
#                      replica, the counters' commands only; TLS only; nothing persisted)
#   redis-tls volume -> Redis only, at /redis-tls: ca.pem, redis.pem, redis-key.pem (its server
#                      certificate, DNS name "redis": the replicas dial rediss://redis:6379
#                      with their own ext-proc certificate, which Redis checks against the CA)
# The directories can be moved for tests: PKI_DIR, EDGE_ROOT (holding the <node>-certs
# directories), EXT_PROC_ROOT (holding the <replica>-certs directories), REDIS_DIR,
# REDIS_TLS_DIR.
set -eu
pki=${PKI_DIR:-/pki}
edge_root=${EDGE_ROOT:-}
edge_nodes=${EDGE_NODES:-envoy-1 envoy-2}  # the --service-node of each Envoy service
ext_proc_root=${EXT_PROC_ROOT:-}
ext_proc_replicas=${EXT_PROC_REPLICAS:-ext-proc-1 ext-proc-2}  # the ext_proc services
redis=${REDIS_DIR:-/redis-secret}
redis_tls=${REDIS_TLS_DIR:-/redis-tls}

# Each file is copied beside its place and renamed over it, key first: a process reading the
# volume meanwhile sees the old file or the new, never half (the Envoys and the ext_proc
# replicas take a renewed pair from their volume without a restart, on the rename).
place() {  # SOURCE DESTINATION MODE
  cp "$1" "$2.tmp"
  chmod "$3" "$2.tmp"
  mv -f "$2.tmp" "$2"
}

names=""
for node in $edge_nodes; do names="$names --edge $node"; done
for replica in $ext_proc_replicas; do names="$names --ext-proc $replica"; done
# shellcheck disable=SC2086  # one --edge or --ext-proc NAME pair per node and replica
gpu-router certs init --dir "$pki" $names --redis redis > /dev/null

mkdir -p "$redis" "$redis_tls"
for node in $edge_nodes; do
  dir="$edge_root/$node-certs"
  mkdir -p "$dir"
  # The Envoy image runs Envoy as its own unprivileged user, which must read the key: the file
  # is readable by all, in a volume that only this node's container mounts.
  place "$pki/$node-key.pem" "$dir/edge-key.pem" 0644
  place "$pki/$node.pem" "$dir/edge.pem" 0644
  place "$pki/ca.pem" "$dir/ca.pem" 0644
done
for replica in $ext_proc_replicas; do
  dir="$ext_proc_root/$replica-certs"
  mkdir -p "$dir"
  place "$pki/$replica-key.pem" "$dir/ext-proc-key.pem" 0600
  place "$pki/$replica.pem" "$dir/ext-proc.pem" 0644
  place "$pki/ca.pem" "$dir/ca.pem" 0644
  # Its own Redis user's password, where gpu-router keeps it (redis_service.password_file).
  cp "$(python -c 'import pathlib, sys; from gpu_router.redis_service import password_file
print(password_file(pathlib.Path(sys.argv[1]), sys.argv[2]))' "$pki" "$replica")" \
    "$dir/redis-password"
done
# The Redis image runs redis-server as its own user, which must read these files: readable by
# all, in volumes that only Redis mounts.
install -m 0644 "$pki/redis-password" "$redis/redis-password"
cp "$pki/ca.pem" "$pki/redis.pem" "$redis_tls/"
install -m 0644 "$pki/redis-key.pem" "$redis_tls/redis-key.pem"
{
  # A user per replica, as `gpu-router up` makes them: the counters' commands only; the
  # default user's password (the healthcheck's) runs PING only.
  # shellcheck disable=SC2086  # one argument per replica
  python -c 'import pathlib, sys; from gpu_router.redis_service import access_rules
sys.stdout.write(access_rules(pathlib.Path(sys.argv[1]), sys.argv[2:]))' "$pki" $ext_proc_replicas
  printf 'save ""\nappendonly no\n'
  printf 'port 0\ntls-port 6379\ntls-auth-clients yes\n'
  printf 'tls-cert-file /redis-tls/redis.pem\ntls-key-file /redis-tls/redis-key.pem\n'
  printf 'tls-ca-cert-file /redis-tls/ca.pem\n'
} > "$redis/.redis.conf.tmp"
chmod 0644 "$redis/.redis.conf.tmp"
mv "$redis/.redis.conf.tmp" "$redis/redis.conf"  # whole, or the last one kept
exec "$@"
