#!/usr/bin/env bash
# Stop what tests/s3/rgw-up.sh started in RGW_DIR (the PIDs it recorded, newest first),
# then remove the directory. Usage: tests/s3/rgw-down.sh RGW_DIR
set -uo pipefail
D=${1:?usage: rgw-down.sh RGW_DIR}
[ -f "$D/pids" ] || { echo "rgw-down: $D has no pids file" >&2; exit 2; }
D=$(cd "$D" && pwd)
CONF=$D/ceph.conf
# A PID is still ours while its command line names our ceph.conf (PIDs get reused).
ours() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$CONF"; }
status=0
while read -r name pid; do
  ours "$pid" || continue
  kill -TERM "$pid"
  for _ in $(seq 50); do ours "$pid" || break; sleep 0.2; done
  ours "$pid" && kill -KILL "$pid"
  sleep 0.1
  ours "$pid" && { echo "rgw-down: $name ($pid) is still running" >&2; status=1; }
done < <(tac "$D/pids")
[ "$status" = 0 ] && rm -rf -- "$D"
exit "$status"
