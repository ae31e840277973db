#!/usr/bin/env bash
# Coffer and etcd side by side on this machine (issue 7, requirement R14).
#
# Starts a 3-node etcd and a 3-node Coffer on loopback, both with file storage and an fsync per
# commit, data directories in one scratch directory (one filesystem). Coffer runs as in
# production: every value through the encryption barrier, every request authorized by a session
# certificate over TLS; etcd runs plaintext without authentication (its default). It records
# the disk's fsync latency first, then runs every workload with `coffer bench` (the same load
# generator and keys for both) alternately, Coffer then etcd, REPEATS times, each run with a
# warm-up, and writes docs/performance.md (method, machine, tables of Coffer/etcd ratios with
# their spread over the repeats, targets met or missed). Nothing in that file is typed by hand.
#
#   bench/compare-etcd.sh                 # DURATION=5 WARMUP=1 REPEATS=3 OUT=docs/performance.md
#   DURATION=10 REPEATS=5 bench/compare-etcd.sh
#
# Needs root for apt-get if `etcd` is not on PATH (installs Debian's etcd-server), python3,
# curl, and free ports 127.0.0.1:18100-18131 and 23710-23731.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
REPEATS=${REPEATS:-3}
OUT=${OUT:-docs/performance.md}

if ! command -v etcd > /dev/null; then
  echo "== installing etcd-server (Debian)"
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server
fi
source bench/lib.sh
coffer_binary

work=$(mktemp -d "${TMPDIR:-/tmp}/coffer-vs-etcd.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The load on the machine before our servers start: anything else running skews both systems.
cut -d' ' -f1-3 /proc/loadavg > "$work/load-before"
echo "== fsync latency in $work"
"$bin" bench fsync --dir "$work" --duration 5 --json > "$work/fsync.json"
cat "$work/fsync.json"

echo "== etcd: 3 members"
cluster=e1=http://127.0.0.1:23711,e2=http://127.0.0.1:23721,e3=http://127.0.0.1:23731
etcd_endpoints=127.0.0.1:23710,127.0.0.1:23720,127.0.0.1:23730
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$work/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:237${i}0" --advertise-client-urls "http://127.0.0.1:237${i}0" \
    --listen-peer-urls "http://127.0.0.1:237${i}1" --initial-advertise-peer-urls "http://127.0.0.1:237${i}1" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token coffer-bench \
    > "$work/etcd-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:237${i}0/health" > /dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:237${i}0/health" > /dev/null || { echo "etcd member $i did not start:"; tail "$work/etcd-$i.log"; exit 1; }
done

echo "== coffer: 3 nodes, file storage, initialized, unsealed, admin session"
"$bin" certs --dir "$work/tls" --node 1 --node 2 --node 3 > /dev/null
members=()
for i in 1 2 3; do members+=(--initial-member "$i=127.0.0.1:181${i}1/127.0.0.1:181${i}0"); done
for i in 1 2 3; do
  "$bin" server --node-id "$i" --data-dir "$work/coffer-$i" \
    --api-addr "127.0.0.1:181${i}0" --peer-addr "127.0.0.1:181${i}1" \
    --tls-cert "$work/tls/node-$i.pem" --tls-key "$work/tls/node-$i-key.pem" --tls-ca "$work/tls/ca.pem" \
    "${members[@]}" > "$work/coffer-$i.log" 2>&1 &
  pids+=($!)
done
export COFFER_ADDR=127.0.0.1:18110,127.0.0.1:18120,127.0.0.1:18130 COFFER_CACERT=$work/tls/ca.pem
coffer_admin_session "$work"

# Workloads: a label, then the `coffer bench` options (the same for both systems).
workloads=(
  "put 256 B, c=1|--op put --concurrency 1"
  "put 256 B, c=16|--op put --concurrency 16"
  "put 256 B, c=64|--op put --concurrency 64"
  "put 256 B, c=256|--op put --concurrency 256"
  "put 4 KiB, c=64|--op put --concurrency 64 --value-size 4096"
  "linearizable get, c=1|--op get --concurrency 1"
  "linearizable get, c=64|--op get --concurrency 64"
  "linearizable get, c=256|--op get --concurrency 256"
  "stale/serializable get, c=64|--op get-stale --concurrency 64"
  "90 % get / 10 % put, c=64|--op mix --read-ratio 0.9 --concurrency 64"
  "put 256 B, open loop 1000/s|--op put --rate 1000 --concurrency 256"
)
results=$work/results.jsonl
: > "$results"
for w in "${workloads[@]}"; do
  label=${w%%|*}
  read -r -a opts <<< "${w#*|}"
  for r in $(seq "$REPEATS"); do
    for system in coffer etcd; do
      if [ "$system" = coffer ]; then target=(--target coffer); else target=(--target etcd --endpoints "$etcd_endpoints"); fi
      line=$("$bin" bench "${target[@]}" "${opts[@]}" --duration "$DURATION" --warmup "$WARMUP" --json)
      printf '%s\n' "$line" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["label"]=sys.argv[1]; r["repeat"]=int(sys.argv[2]); print(json.dumps(r))' "$label" "$r" >> "$results"
      printf '%-34s #%s %-6s %s\n' "$label" "$r" "$system" "$(printf '%s' "$line" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("ops/s=%.0f p50=%.2fms p99=%.2fms errors=%d%s" % (r["ops_per_sec"], r["p50_ms"], r["p99_ms"], r["errors"], "" if r["entries_per_fsync"] is None else " entries/fsync=%.1f" % r["entries_per_fsync"]))')"
    done
  done
done

cut -d' ' -f1-3 /proc/loadavg > "$work/load-after"
python3 bench/compare_report.py --fsync "$work/fsync.json" --results "$results" --dir "$work" \
  --load-before "$(cat "$work/load-before")" --load-after "$(cat "$work/load-after")" \
  --duration "$DURATION" --warmup "$WARMUP" --repeats "$REPEATS" --coffer "$bin" \
  --keep-sections "$OUT" > "$work/performance.md"
cp "$work/performance.md" "$OUT"
echo "== wrote $OUT"
sed -n '/^## Ratios/,$p' "$OUT"
