#!/usr/bin/env bash
# Coffer's resource figures on this machine (issue 7, item 5): memory, disk, restart time and
# snapshot install throughput of a 3-node cluster holding SECRETS secrets.
#
# Starts a 3-node Coffer on loopback with file storage (release build, TLS, initialized,
# unsealed, peer unseal on, an admin session), as bench/compare-etcd.sh does, and measures:
#   1. each node's resident memory (VmRSS, and its peak VmHWM, from /proc/PID/status) with the
#      cluster empty, then after `coffer bench --op get` preloaded SECRETS secrets of VALUE_SIZE
#      bytes (every key written once; their count is checked with `coffer kv list`), and each
#      node's data directory size (du);
#   2. the restart of a follower, then of the leader: SIGTERM, wait for the exit, start it again
#      with the same flags, and time from that start until its metrics `/ready` answers 200 and
#      until a linearizable `coffer kv get` through that node succeeds;
#   3. snapshot install to a new member: `coffer cluster snapshot` on the leader, then a 4th
#      node joins as a learner (`--join` with a registered node key); timed from its start until
#      its applied index reaches the leader's (read from its `/metrics`), with the snapshot's
#      size from its log ("installing snapshot" bytes=N); the log lines' timestamps split that
#      time into transfer (leader's "sending snapshot" to "installing snapshot") and install.
# It writes its section of docs/performance.md between `<!-- resources:begin -->` and
# `<!-- resources:end -->` (with bench/resources_report.py); nothing there is typed by hand.
#
#   bench/resources.sh                          # SECRETS=100000 VALUE_SIZE=1024 OUT=docs/performance.md
#   SECRETS=20000 COFFER_BIN=target/release/coffer bench/resources.sh
#
# Builds `coffer` in release unless COFFER_BIN names a binary; KEEP=1 keeps the scratch directory
# (data directories, logs, results.jsonl). Needs python3, curl, and free
# ports 127.0.0.1:18200-18249 (node i: API 182i0, peer 182i1, metrics 182i2).
set -euo pipefail
cd "$(dirname "$0")/.."
SECRETS=${SECRETS:-100000}
VALUE_SIZE=${VALUE_SIZE:-1024}
OUT=${OUT:-docs/performance.md}

source bench/lib.sh
coffer_binary

work=$(mktemp -d "${TMPDIR:-/tmp}/coffer-resources.XXXXXX")
declare -A pid=()
cleanup() {
  for p in "${pid[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "== kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# One JSON object per figure, read by the report.
results=$work/results.jsonl
: > "$results"
rec() { python3 -c 'import json,sys; print(json.dumps({"key": sys.argv[1], "value": sys.argv[2]}))' "$1" "$2" >> "$results"; }
now() { date +%s.%N; }
# Seconds from the time $1 to $2 (default: now).
since() { python3 -c 'import sys; print("%.2f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$1" "${2:-$(now)}"; }
api() { echo "127.0.0.1:182${1}0"; }
metrics() { echo "127.0.0.1:182${1}2"; }
# A gauge of node $1's `coffer_raft` family (`applied`, `leader_id`, ...), or empty. awk reads
# to the end: an early exit makes curl fail with a write error (23), which pipefail reports.
raft_gauge() {
  curl -sf "http://$(metrics "$1")/metrics" 2> /dev/null \
    | awk -v k="\"$2\"" '!found && index($0, k) && $1 !~ /^#/ && $1 ~ /raft/ { print $NF; found = 1 }'
}
ready() { curl -sf -o /dev/null "http://$(metrics "$1")/ready"; }
# Polls the command every 20 ms until it succeeds; fails the script after $1 seconds. The
# failed tries' output goes to wait.log.
wait_for() {
  local deadline=$(( $(date +%s) + $1 ))
  shift
  until "$@" >> "$work/wait.log" 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for: $*"; tail -n 5 "$work/wait.log"; exit 1; }
    sleep 0.02
  done
}
applied_at_least() { [ "$(raft_gauge "$1" applied)" -ge "$2" ]; }

cut -d' ' -f1-3 /proc/loadavg > "$work/load-before"
echo "== coffer: 3 nodes, file storage, initialized, unsealed, admin session (in $work)"
"$bin" certs --dir "$work/tls" --node 1 --node 2 --node 3 --node 4 > /dev/null
members=()
for i in 1 2 3; do members+=(--initial-member "$i=127.0.0.1:182${i}1/$(api "$i")"); done
# Starts node $1 with the flags it always has, and any more given after it.
start_node() {
  local i=$1
  shift
  "$bin" server --node-id "$i" --data-dir "$work/coffer-$i" \
    --api-addr "$(api "$i")" --peer-addr "127.0.0.1:182${i}1" --metrics-addr "$(metrics "$i")" \
    --tls-cert "$work/tls/node-$i.pem" --tls-key "$work/tls/node-$i-key.pem" --tls-ca "$work/tls/ca.pem" \
    "$@" >> "$work/coffer-$i.log" 2>&1 &
  pid[$i]=$!
}
for i in 1 2 3; do start_node "$i" "${members[@]}"; done
export COFFER_ADDR=$(api 1),$(api 2),$(api 3) COFFER_CACERT=$work/tls/ca.pem
coffer_admin_session "$work"
"$bin" keygen --out "$work/keys/node-4" > /dev/null
# Restarted and new nodes are unsealed by their peers, so their timings include no ceremony.
for _ in $(seq 300); do "$bin" operator peer-unseal on --key "$work/keys/operator.key" > /dev/null 2>&1 && break; sleep 0.1; done
for i in 1 2 3; do
  for _ in $(seq 300); do ready "$i" && break; sleep 0.1; done
  ready "$i" || { echo "node $i is not ready:"; curl -s "http://$(metrics "$i")/ready"; tail "$work/coffer-$i.log"; exit 1; }
done

# VmRSS and VmHWM of node $2 in kB, recorded under the label $1.
memory() {
  local label=$1 i=$2 rss hwm
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/${pid[$i]}/status")
  hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/${pid[$i]}/status")
  rec "rss_kb.$label.$i" "$rss"
  rec "hwm_kb.$label.$i" "$hwm"
  printf '%-10s node %s: VmRSS %6d MiB, VmHWM %6d MiB\n' "$label" "$i" $((rss / 1024)) $((hwm / 1024))
}
disk() {
  local label=$1 i=$2 used
  used=$(du -sk "$work/coffer-$i" | cut -f1)
  rec "disk_kb.$label.$i" "$used"
  printf '%-10s node %s: data directory %d KiB\n' "$label" "$i" "$used"
}
# The leader's id as some live node of 1 to 3 sees it (0 when none is known).
leader() {
  local i id
  for i in 1 2 3; do id=$(raft_gauge "$i" leader_id) && [ -n "$id" ] && { echo "$id"; return; }; done
  echo 0
}
has_leader() { [ "$(leader)" != 0 ]; }
read_through() { "$bin" kv get "secret/$(printf '%08d' $((SECRETS - 1)))" --addr "$(api "$1")"; }

echo "== empty cluster"
for i in 1 2 3; do memory empty "$i"; disk empty "$i"; done

echo "== loading $SECRETS secrets of $VALUE_SIZE bytes (coffer bench --op get preloads every key once)"
t=$(now)
"$bin" bench --op get --keys "$SECRETS" --value-size "$VALUE_SIZE" --concurrency 16 --duration 1 --json > "$work/load.json"
rec load_seconds "$(since "$t")"
count=$("$bin" kv list secret/ --format json | python3 -c '
import json, re, sys
names = json.load(sys.stdin)
names = names.get("names", names) if isinstance(names, dict) else names
print(sum(1 for n in names if re.fullmatch(r"[0-9]+", n)))')
echo "secrets stored: $count"
[ "$count" -eq "$SECRETS" ] || { echo "expected $SECRETS secrets, found $count"; exit 1; }
rec secrets "$count"
rec value_size "$VALUE_SIZE"
# Every node applies the last write before it is measured.
target=$(raft_gauge "$(leader)" applied) || true
[ -n "$target" ] || { echo "no leader's applied index (is a leader elected?)"; exit 1; }
for i in 1 2 3; do wait_for 120 applied_at_least "$i" "$target"; done
for i in 1 2 3; do memory loaded "$i"; disk loaded "$i"; done

# Stops node $1 with SIGTERM and starts it again with the same flags; records the seconds to
# exit, to `/ready` 200 and to a linearizable read through it, under the label $2.
restart() {
  local i=$1 label=$2 t
  t=$(now)
  kill -TERM "${pid[$i]}"
  wait "${pid[$i]}" || true
  rec "restart.$label.stop_s" "$(since "$t")"
  t=$(now)
  start_node "$i" "${members[@]}"
  wait_for 300 ready "$i"
  rec "restart.$label.ready_s" "$(since "$t")"
  echo "-- reads through node $i after its restart" >> "$work/wait.log"
  wait_for 300 read_through "$i"
  rec "restart.$label.read_s" "$(since "$t")"
  echo "restart of the $label (node $i): $(tail -n 3 "$results" | python3 -c 'import json,sys; print(", ".join("%s %s s" % (json.loads(l)["key"].rsplit(".", 1)[1], json.loads(l)["value"]) for l in sys.stdin))')"
}
l=$(leader)
f=$(( l % 3 + 1 ))
# What the read alone costs (a new CLI process, its TLS handshake, the read index), for scale.
t=$(now)
read_through "$f" > /dev/null
rec restart.baseline.read_s "$(since "$t")"
echo "== restart of follower $f, then of leader $l"
restart "$f" follower
memory restarted "$f"
wait_for 120 applied_at_least "$f" "$target"
restart "$l" leader
wait_for 60 has_leader

echo "== snapshot install to a new learner (node 4)"
l=$(leader)
"$bin" cluster snapshot --addr "$(api "$l")" > /dev/null
"$bin" cluster register-node --id 4 --public-key "$work/keys/node-4.pub" > /dev/null
target=$(raft_gauge "$l" applied) || true
[ -n "$target" ] || { echo "no applied index from the leader, node $l"; exit 1; }
t=$(now)
start_node 4 --join "$COFFER_ADDR" --node-key "$work/keys/node-4.key"
wait_for 600 applied_at_least 4 "$target"
t1=$(now)
rec snapshot.started_at "$t"
rec snapshot.caught_up_at "$t1"
rec snapshot.caught_up_s "$(since "$t" "$t1")"
wait_for 60 ready 4
rec snapshot.ready_s "$(since "$t")"
# The logs are colored: drop the escapes before reading fields.
plain() { sed 's/\x1b\[[0-9;]*m//g' "$work/coffer-$1.log"; }
bytes=$(plain 4 | grep 'installing snapshot' | grep -o 'bytes=[0-9]*' | tail -n 1 | cut -d= -f2 || true)
[ -n "$bytes" ] || { echo "node 4 installed no snapshot:"; tail "$work/coffer-4.log"; exit 1; }
rec snapshot.bytes "$bytes"
# When the leader began to send it (its log's UTC timestamp), for the transfer-and-install time.
rec snapshot.sending_at "$(plain "$l" | grep 'sending snapshot' | grep 'target_node=4' | tail -n 1 | cut -d' ' -f1)"
# And when node 4 had received all of it and began to install it.
rec snapshot.installing_at "$(plain 4 | grep 'installing snapshot' | tail -n 1 | cut -d' ' -f1)"
rec snapshot.index "$target"
echo "node 4 caught up to index $target after $(since "$t" "$t1") s (snapshot of $bytes bytes)"
memory learner 4
disk learner 4

cut -d' ' -f1-3 /proc/loadavg > "$work/load-after"
python3 bench/resources_report.py --results "$results" --dir "$work" --out "$OUT" \
  --load-before "$(cat "$work/load-before")" --load-after "$(cat "$work/load-after")" \
  --secrets "$SECRETS" --value-size "$VALUE_SIZE" --coffer "$bin" ${COFFER_BIN:+--binary-given}
echo "== wrote the resources section of $OUT"
sed -n '/<!-- resources:begin -->/,/<!-- resources:end -->/p' "$OUT"
