#!/usr/bin/env bash
# Measures the replicated store with `coffer bench`: put and linearizable get at concurrency 1
# and 64, against a 3-node `coffer dev` cluster (in memory) and against three `coffer server`
# processes with file storage (fsync on every commit), every value through the encryption
# barrier, with every request authorized by its session certificate. The file cluster is initialized with 3 operators, 2 needed; before the benches the
# script also times the unseal ceremony: from the 2nd operator's `coffer operator unseal`
# (a new process that decrypts its share, computes and signs a decryption share) to every node
# serving a read, 5 rounds of seal + unseal; and, last, logins per second (Private Key
# Challenge, the servers' per-source rate limit raised). Prints one line per run.
#   scripts/bench-core.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cargo build --release -p coffer-node --quiet
bin=$PWD/target/release/coffer
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

run_benches() {
  local label=$1
  for op in put get; do
    for c in 1 64; do
      printf '%-6s %-4s c=%-3s ' "$label" "$op" "$c"
      "$bin" bench --op "$op" --concurrency "$c" --duration "$secs" --json \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("ops/s=%.0f p50=%.2fms p99=%.2fms errors=%d%s" % (r["ops_per_sec"], r["p50_ms"], r["p99_ms"], r["errors"], ("" if r["entries_per_fsync"] is None else " entries/fsync=%.1f" % r["entries_per_fsync"])))'
    done
  done
}

# 1. The transient cluster.
"$bin" dev --nodes 3 --dir "$work/dev" > "$work/dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$work/dev/env" ] && break; sleep 0.1; done
# shellcheck disable=SC1091
source "$work/dev/env"
run_benches dev
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()

# 2. Three processes with file storage.
"$bin" certs --dir "$work/tls" --node 1 --node 2 --node 3 > /dev/null
members=()
for i in 1 2 3; do members+=(--initial-member "$i=127.0.0.1:$((17700 + 10 * i + 1))/127.0.0.1:$((17700 + 10 * i))"); done
for i in 1 2 3; do
  "$bin" server --node-id "$i" --data-dir "$work/data-$i" \
    --api-addr "127.0.0.1:$((17700 + 10 * i))" --peer-addr "127.0.0.1:$((17700 + 10 * i + 1))" \
    --tls-cert "$work/tls/node-$i.pem" --tls-key "$work/tls/node-$i-key.pem" --tls-ca "$work/tls/ca.pem" \
    --login-rate-per-second 100000 "${members[@]}" > "$work/server-$i.log" 2>&1 &
  pids+=($!)
done
export COFFER_ADDR=127.0.0.1:17710,127.0.0.1:17720,127.0.0.1:17730 COFFER_CACERT=$work/tls/ca.pem
for _ in $(seq 100); do "$bin" status > /dev/null 2>&1 && break; sleep 0.2; done
for k in alice bob carol admin; do "$bin" keygen --out "$work/keys/$k" > /dev/null; done
"$bin" operator init --operator-key "$work/keys/alice.pub" --operator-key "$work/keys/bob.pub" \
  --operator-key "$work/keys/carol.pub" --threshold 2 --admin-key "$work/keys/admin.pub" \
  --share-dir "$work/keys" > /dev/null
unseal() { "$bin" operator unseal --key "$work/keys/$1.key" --share "$work/keys/$1.share" > /dev/null; }
all_serve() {
  for a in ${COFFER_ADDR//,/ }; do
    until "$bin" kv get secret/bench/ready --addr "$a" > /dev/null 2>&1; do :; done
  done
}
unseal alice; unseal bob
# The administrator logs in (sessions on, as for every client) and is given data access.
export COFFER_KEY=$work/keys/admin.key COFFER_SESSION_FILE=$work/session.json
printf 'path "secret/*" {\n  capabilities = ["create", "read", "update", "delete", "list"]\n}\n' > "$work/data.hcl"
until "$bin" policy write bench-data "$work/data.hcl" > /dev/null 2>&1; do sleep 0.1; done
"$bin" identity update admin --policy bench-data > /dev/null
until "$bin" kv put secret/bench/ready v=1 > /dev/null 2>&1; do sleep 0.1; done
times=()
for _ in 1 2 3 4 5; do
  "$bin" operator seal --key "$work/keys/alice.key" > /dev/null
  until "$bin" status --format json | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if all(n.get("seal","").startswith("sealed") for n in s["nodes"]) else 1)' 2>/dev/null; do sleep 0.05; done
  unseal alice
  t0=$(date +%s%N); unseal bob; all_serve; t1=$(date +%s%N)
  times+=($(( (t1 - t0) / 1000000 )))
done
printf 'unseal: 2nd share to all 3 nodes serving, ms (5 rounds): %s\n' "${times[*]}"
run_benches file
# Logins: the whole Private Key Challenge (challenge, signature, one Raft transaction).
for c in 1 16; do
  printf '%-6s %-5s c=%-3s ' file login "$c"
  "$bin" bench --op login --login-key "$work/keys/admin.key" --concurrency "$c" --duration "$secs" --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("logins/s=%.0f p50=%.2fms p99=%.2fms errors=%d" % (r["ops_per_sec"], r["p50_ms"], r["p99_ms"], r["errors"]))'
done
