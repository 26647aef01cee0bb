#!/bin/bash
# Entrypoint of the Envoy services in docker-compose.yml. Envoy closes its listeners at once on
# SIGTERM, dropping requests in flight; so on SIGTERM (docker stop) this first starts Envoy's
# graceful drain through its admin (POST /drain_listeners?graceful: for --drain-time-s it still
# accepts, and asks clients to close their connections), waits the drain time out, then passes
# the SIGTERM on and exits with Envoy's status. The image has no curl: the POST goes over bash's
# /dev/tcp, as the healthcheck's GET does. In the image Envoy starts through the image's own
# entrypoint (it drops to the envoy user); ENVOY_ADMIN_PORT is for running this outside it.
set -u
admin_port=${ENVOY_ADMIN_PORT:-9901}
drain_s=0
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --drain-time-s ]; then drain_s=${args[$((i + 1))]}; fi
done
launcher=()
if [ -x /docker-entrypoint.sh ]; then launcher=(/docker-entrypoint.sh); fi

"${launcher[@]}" "$@" &
envoy=$!

drain_then_stop() {
  trap '' TERM INT  # a second docker stop must not cut the drain short
  if exec 3<>"/dev/tcp/127.0.0.1/$admin_port"; then
    printf 'POST /drain_listeners?graceful HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' >&3
    while read -r -t 2 _ <&3; do :; done
    exec 3>&-
    sleep "$drain_s"
  fi
  kill -TERM "$envoy" 2>/dev/null
}
trap drain_then_stop TERM INT

wait "$envoy"
status=$?
while kill -0 "$envoy" 2>/dev/null; do  # the trap ended the first wait: Envoy is stopping
  wait "$envoy"
  status=$?
done
exit "$status"
