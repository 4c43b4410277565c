#!/usr/bin/env bash
# Start a throwaway Ceph RADOS Gateway on 127.0.0.1 for the S3 backend's tests: one monitor,
# one OSD and one radosgw, with cephx off, then an S3 user with fixed keys.
#
# Needs Debian's ceph-mon ceph-osd ceph-common radosgw uuid-runtime curl (scripts/setup).
# Runs as any user. Knobs (environment, all optional):
#   RGW_DIR          state directory, absent or empty (default: mktemp -d /tmp/rgw.XXXXXX);
#                    keep it short: Ceph's admin sockets live there (107-byte socket paths)
#   RGW_OBJECTSTORE  memstore (default: objects in the OSD's memory, the quickest start)
#                    or bluestore (a sparse 10 GiB file in RGW_DIR)
#   RGW_TIMEOUT      seconds each stage may take (default 120)
#
# Prints only `export NAME='value'` lines on stdout (RGW_DIR, S3_ENDPOINT, S3_ACCESS_KEY,
# S3_SECRET_KEY; also saved in $RGW_DIR/env); progress and, on failure, the daemons' log
# tails go to stderr. Stop it with tests/s3/rgw-down.sh "$RGW_DIR".
set -euo pipefail

ACCESS_KEY=nixeryd-rgw-access
SECRET_KEY=nixeryd-rgw-secret-key-for-tests-only
OBJECTSTORE=${RGW_OBJECTSTORE:-memstore}
TIMEOUT=${RGW_TIMEOUT:-120}

say() { printf 'rgw-up: %s\n' "$*" >&2; }
for tool in ceph-mon ceph-osd ceph monmaptool ceph-authtool radosgw radosgw-admin curl uuidgen; do
  command -v "$tool" >/dev/null || { say "$tool is missing: run scripts/setup"; exit 1; }
done

D=${RGW_DIR:-$(mktemp -d /tmp/rgw.XXXXXX)}
mkdir -p "$D"
[ -z "$(ls -A "$D")" ] || { say "$D is not empty"; exit 1; }
D=$(cd "$D" && pwd)
mkdir -p "$D/run" "$D/log" "$D/mon.a" "$D/osd.0" "$D/rgw"
CONF=$D/ceph.conf
: >"$D/pids" # "<daemon> <pid>" lines, for rgw-down.sh

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MON2=$(port)
MON1=$(port)
RGW=$(port)
# Each probe's socket is closed before the next: make sure they are three.
while [ "$MON1" = "$MON2" ]; do MON1=$(port); done
while [ "$RGW" = "$MON1" ] || [ "$RGW" = "$MON2" ]; do RGW=$(port); done
ENDPOINT=http://127.0.0.1:$RGW

# Each daemon's command line names $CONF: that is how rgw-down.sh knows a PID is still ours.
ours() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$CONF"; }
ready=0
on_exit() {
  [ "$ready" = 1 ] && return
  say "failed; last log lines:"
  for file in "$D"/log/*.log; do [ -f "$file" ] && { echo "== $file" >&2; tail -n 20 "$file" >&2; }; done
  while read -r _ pid; do ours "$pid" && kill -9 "$pid"; done <"$D/pids"
  say "state kept in $D"
}
trap on_exit EXIT

cat >"$CONF" <<CONF
[global]
fsid = $(uuidgen)
# Both protocols: with the monitor on v1 alone, an OSD's boot-time commands were sometimes
# refused ("wrong fsid") and it never came up.
mon host = [v2:127.0.0.1:$MON2,v1:127.0.0.1:$MON1]
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
# Without cephx only crc connections work; radosgw would otherwise insist on secure mode.
ms mon client mode = crc secure
keyring = $D/keyring
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
mon cluster log file = $D/log/cluster.log
crash dir = $D/crash
chdir = $D
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail crit = 1
mon data avail warn = 2

[mon]
mon data = $D/mon.\$id
# Commit map changes quickly: radosgw creates its pools one osdmap epoch at a time.
paxos propose interval = 0.1
paxos min wait = 0.01

[osd]
osd data = $D/osd.\$id
osd objectstore = $OBJECTSTORE
memstore device bytes = 4294967296
bluestore block create = true
bluestore block size = 10737418240

[client]
rgw data = $D/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW
rgw enable usage log = false
CONF

until_true() { # until_true <what> <command...>: poll, giving up after $TIMEOUT s or if a daemon died
  local what=$1 start=$SECONDS name pid
  shift
  until "$@" >/dev/null 2>&1; do
    while read -r name pid; do ours "$pid" || { say "$name died"; return 1; }; done <"$D/pids"
    ((SECONDS - start < TIMEOUT)) || { say "timed out waiting for $what"; return 1; }
    sleep 0.2
  done
}
started() { # started <daemon>: record the PID the daemon wrote
  until_true "$1's pid file" test -s "$D/run/$1.pid"
  echo "$1 $(cat "$D/run/$1.pid")" >>"$D/pids"
}
CEPH=(ceph -c "$CONF" --connect-timeout 10)

say "starting in $D ($OBJECTSTORE)"
ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --fsid "$(sed -n 's/^fsid = //p' "$CONF")" --addv a "[v2:127.0.0.1:$MON2,v1:127.0.0.1:$MON1]" "$D/monmap" >/dev/null
ceph-mon -c "$CONF" -i a --mkfs --monmap "$D/monmap" --keyring "$D/keyring"
timeout "$TIMEOUT" ceph-mon -c "$CONF" -i a # forks once initialised
started mon.a
until_true "the monitor" "${CEPH[@]}" mon stat

OSD_UUID=$(uuidgen)
OSD_ID=$("${CEPH[@]}" osd new "$OSD_UUID")
ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >/dev/null 2>&1
timeout "$TIMEOUT" ceph-osd -c "$CONF" -i "$OSD_ID"
started "osd.$OSD_ID"
until_true "the OSD" bash -c '"$@" osd dump | grep -q "^osd.'"$OSD_ID"' up"' _ "${CEPH[@]}"

timeout "$TIMEOUT" radosgw -c "$CONF" -n client.rgw.0
started client.rgw.0
until_true "radosgw's port" curl -sf -m 5 -o /dev/null "$ENDPOINT/"
radosgw-admin -c "$CONF" user create --uid=nixeryd --display-name=nixeryd \
  --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
# A signed ListBuckets with the new keys (RGW wants x-amz-content-sha256: here the empty body's).
until_true "a signed request" curl -sf -m 5 -o /dev/null --aws-sigv4 aws:amz:us-east-1:s3 \
  --user "$ACCESS_KEY:$SECRET_KEY" \
  -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
  "$ENDPOINT/"

cat >"$D/env" <<ENV
export RGW_DIR='$D'
export S3_ENDPOINT='$ENDPOINT'
export S3_ACCESS_KEY='$ACCESS_KEY'
export S3_SECRET_KEY='$SECRET_KEY'
ENV
ready=1
say "ready on $ENDPOINT in ${SECONDS}s"
cat "$D/env"
