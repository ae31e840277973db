# Shared by the benchmark scripts (sourced, not run): the binary and a cluster's admin session.

# Sets `bin`: $COFFER_BIN when given, else a release build of this checkout.
coffer_binary() {
  if [ -n "${COFFER_BIN:-}" ]; then
    bin=$(realpath "$COFFER_BIN")
  else
    echo "== building coffer (release)"
    cargo build --release --locked -p coffer-node --quiet
    bin=$PWD/target/release/coffer
  fi
}

# With COFFER_ADDR and COFFER_CACERT set and the nodes answering: initializes the cluster with
# one operator (threshold 1), unseals it, exports an admin session (COFFER_KEY,
# COFFER_SESSION_FILE) whose identity may use every secret under `secret/`, and waits until a
# put and a get of `secret/bench/ready` work through every node. Keys go to $1/keys.
coffer_admin_session() {
  local work=$1 a
  for _ in $(seq 300); do "$bin" status > /dev/null 2>&1 && break; sleep 0.1; done
  for k in operator admin; do "$bin" keygen --out "$work/keys/$k" > /dev/null; done
  "$bin" operator init --operator-key "$work/keys/operator.pub" --threshold 1 \
    --admin-key "$work/keys/admin.pub" --share-dir "$work/keys" > /dev/null
  "$bin" operator unseal --key "$work/keys/operator.key" --share "$work/keys/operator.share" > /dev/null
  export COFFER_KEY=$work/keys/admin.key COFFER_SESSION_FILE=$work/session.json
  printf 'path "secret/*" {\n  capabilities = ["create", "read", "update", "delete", "list"]\n}\n' > "$work/data.hcl"
  for _ in $(seq 300); do "$bin" policy write bench-data "$work/data.hcl" > /dev/null 2>&1 && break; sleep 0.1; done
  "$bin" identity update admin --policy bench-data > /dev/null
  for a in ${COFFER_ADDR//,/ }; do
    for _ in $(seq 300); do "$bin" kv put secret/bench/ready value=1 --addr "$a" > /dev/null 2>&1 && break; sleep 0.1; done
    "$bin" kv get secret/bench/ready --addr "$a" > /dev/null
  done
}
