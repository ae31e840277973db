#!/usr/bin/env bash
# Follower-read scaling of a 3-node Coffer cluster (issue 7, item 4).
#
# Runs 3 Coffer nodes as Docker containers on their own network, each limited to the same CPU
# share (`docker run --cpus $CPUS`): on one shared machine the CPU limit stands in for three
# separate machines, so that a node's throughput is bounded by its own share, not by whatever
# the other two leave free. The image is built here `FROM scratch` (the `coffer` binary and the
# libraries `ldd` lists, as the chaos harness builds its own), since no registry can be
# reached. The cluster runs as in production (file storage with fsync, TLS, the barrier, a
# session certificate per request). One `coffer bench` process on the host (not CPU-limited)
# drives linearizable gets at c=$CONCURRENCY, alternately (a) spread over all 3 nodes and (b)
# to the leader only, REPEATS times, each run with a warm-up, and writes its section of
# docs/performance.md (between the markers follower-reads:begin and :end; the rest of the file
# is left alone): ops/s, p50/p99, the spread / leader-only ratio (median and range over the
# repeats, paired by repeat) and whether the target (>= 2.5 x) is met. It also records each
# node's CPU (`docker stats` samples in the measured window) and the client's, which tell
# whether the nodes reached their limit or something else (the client, the rest of the
# machine) held the throughput down. Nothing is typed by hand.
#
#   bench/follower-reads.sh               # CPUS=0.6 CONCURRENCY=64 DURATION=5 WARMUP=1 REPEATS=3
#   CPUS=0.5 REPEATS=5 bench/follower-reads.sh
#   COFFER_BIN=target/release/coffer bench/follower-reads.sh   # use this binary, do not build
#
# Needs a running Docker engine (and the right to use it), python3, ldd, and a free subnet
# $NET_PREFIX.0/24 (default 172.31.77.0/24) for the network `coffer-follower-reads`; the nodes
# listen on $NET_PREFIX.11-13 ports 7000 (API), 7001 (peers), 9100 (metrics). The containers
# and the network are removed on exit; the image (tagged by a hash of its files) is kept and
# reused by the next run with the same binary.
set -euo pipefail
cd "$(dirname "$0")/.."
CPUS=${CPUS:-0.6}
CONCURRENCY=${CONCURRENCY:-64}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
REPEATS=${REPEATS:-3}
OUT=${OUT:-docs/performance.md}
NET_PREFIX=${NET_PREFIX:-172.31.77}
net=coffer-follower-reads

source bench/lib.sh
coffer_binary

work=$(mktemp -d "${TMPDIR:-/tmp}/coffer-follower-reads.XXXXXX")
remove_cluster() {
  docker rm -f coffer-fr-1 coffer-fr-2 coffer-fr-3 > /dev/null 2>&1 || true
  docker network rm "$net" > /dev/null 2>&1 || true
}
cleanup() {
  remove_cluster
  rm -rf "$work"
}
trap cleanup EXIT
remove_cluster # what an interrupted run may have left

echo "== image (FROM scratch: /coffer and the libraries ldd lists)"
files=("$bin")
while read -r lib; do files+=("$lib"); done < <(ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }' | sort -u)
tag=coffer-bench:$(for f in "${files[@]}"; do printf '%s ' "$f"; sha256sum < "$f"; done | sha256sum | cut -c1-16)
if ! docker image inspect "$tag" > /dev/null 2>&1; then
  root=$work/image
  mkdir -p "$root/tmp" "$root/data" "$root/tls"
  cp "$bin" "$root/coffer"
  for lib in "${files[@]:1}"; do mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; done
  tar --owner=0 --group=0 -C "$root" -c . | docker import --change 'ENTRYPOINT ["/coffer"]' - "$tag" > /dev/null
  rm -rf "$root"
fi
echo "$tag"

echo "== coffer: 3 containers, --cpus $CPUS each, network $net ($NET_PREFIX.0/24)"
docker network create --driver bridge --subnet "$NET_PREFIX.0/24" "$net" > /dev/null
node_ip() { echo "$NET_PREFIX.1$1"; }
"$bin" certs --dir "$work/tls" --node "1=$(node_ip 1)" --node "2=$(node_ip 2)" --node "3=$(node_ip 3)" > /dev/null
members=()
for i in 1 2 3; do members+=(--initial-member "$i=$(node_ip "$i"):7001/$(node_ip "$i"):7000"); done
for i in 1 2 3; do
  mkdir -p "$work/data-$i"
  docker run -d --name "coffer-fr-$i" --network "$net" --ip "$(node_ip "$i")" --cpus "$CPUS" \
    --user "$(id -u):$(id -g)" -v "$work/data-$i:/data" -v "$work/tls:/tls:ro" \
    -e RUST_LOG=info,openraft=warn "$tag" server --node-id "$i" --data-dir /data \
    --api-addr "$(node_ip "$i"):7000" --peer-addr "$(node_ip "$i"):7001" --metrics-addr "$(node_ip "$i"):9100" \
    --tls-cert "/tls/node-$i.pem" --tls-key "/tls/node-$i-key.pem" --tls-ca /tls/ca.pem \
    "${members[@]}" > /dev/null
done
all=$(node_ip 1):7000,$(node_ip 2):7000,$(node_ip 3):7000
export COFFER_ADDR=$all COFFER_CACERT=$work/tls/ca.pem
for _ in $(seq 300); do "$bin" status > /dev/null 2>&1 && break; sleep 0.1; done
"$bin" status > /dev/null 2>&1 || { for i in 1 2 3; do echo "-- node $i"; docker logs --tail 20 "coffer-fr-$i"; done; exit 1; }
coffer_admin_session "$work"

# The leader's API address, from the members' own view (`coffer status`).
leader() {
  "$bin" status --format json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(next(n["api_addr"] for n in s["nodes"] if n["id"] == s["leader"]))'
}

cut -d' ' -f1-3 /proc/loadavg > "$work/load-before"
results=$work/results.jsonl
: > "$results"
TIMEFORMAT='%R %U %S'
for r in $(seq "$REPEATS"); do
  for mode in spread leader; do
    lead=$(leader)
    if [ "$mode" = spread ]; then addrs=$all; else addrs=$lead; fi
    # The containers' CPU: `docker stats --no-stream` samples (each takes a second or two)
    # taken over and over while the bench runs, each stamped with when it ended; only those in
    # the measured window (the last DURATION seconds) count. The bench's own CPU time comes
    # from bash's `time`.
    rm -f "$work/done"
    : > "$work/stats"
    (while [ ! -e "$work/done" ]; do
      s=$(docker stats --no-stream --format '{{.Name}} {{.CPUPerc}}' coffer-fr-1 coffer-fr-2 coffer-fr-3 2> /dev/null || true)
      t=$(date +%s.%N)
      printf '%s\n' "$s" | sed "s/^/$t /" >> "$work/stats"
    done) &
    sampler=$!
    { time "$bin" bench --op get --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" \
      --json --addr "$addrs" > "$work/run.json" 2> "$work/run.err"; } 2> "$work/time" || {
      touch "$work/done"
      kill "$sampler" 2> /dev/null || true
      cat "$work/run.err"
      exit 1
    }
    date +%s.%N > "$work/end"
    touch "$work/done"
    wait "$sampler" || true
    lead_after=$(leader)
    python3 - "$mode" "$r" "$lead" "$lead_after" "$addrs" "$work/stats" "$work/time" "$work/run.json" "$work/end" "$DURATION" >> "$results" << 'EOF'
import json, statistics, sys
mode, rep, lead, lead_after, addrs, stats, times, run, end, duration = sys.argv[1:11]
r = json.loads(open(run).read().strip().splitlines()[-1])
real, user, syst = (float(x) for x in open(times).read().split()[-3:])
end, samples = float(open(end).read()), {}
for line in open(stats):
    f = line.split()
    if len(f) == 3 and end - float(duration) + 1 <= float(f[0]) <= end:
        try:  # a stopped container shows "--"
            samples.setdefault(f[1], []).append(float(f[2].rstrip("%")))
        except ValueError:
            pass
cpu = {name: statistics.mean(v) for name, v in samples.items()}
r.update(mode=mode, repeat=int(rep), leader=lead, leader_after=lead_after, addrs=addrs,
         node_cpu_pct=cpu, client_cores=(user + syst) / real if real > 0 else None)
print(json.dumps(r))
EOF
    tail -n 1 "$results" | python3 -c '
import json, sys
r = json.load(sys.stdin)
cpu = " ".join("%s=%.0f%%" % (k[-1], v) for k, v in sorted(r["node_cpu_pct"].items()))
print("#%d %-6s ops/s=%.0f p50=%.2fms p99=%.2fms errors=%d leader=%s%s cpu[%s] client=%.2f cores" % (
    r["repeat"], r["mode"], r["ops_per_sec"], r["p50_ms"], r["p99_ms"], r["errors"], r["leader"],
    "" if r["leader"] == r["leader_after"] else " (changed to %s)" % r["leader_after"], cpu, r["client_cores"] or 0))'
  done
done

cut -d' ' -f1-3 /proc/loadavg > "$work/load-after"
touch "$OUT"
python3 bench/follower_reads_report.py --results "$results" --out "$OUT" --cpus "$CPUS" \
  --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" --repeats "$REPEATS" \
  --load-before "$(cat "$work/load-before")" --load-after "$(cat "$work/load-after")" --image "$tag"
echo "== wrote its section of $OUT"
sed -n '/<!-- follower-reads:begin -->/,/<!-- follower-reads:end -->/p' "$OUT" | sed -n '/^## Follower reads/,$p' | grep -E '^\|' || true
