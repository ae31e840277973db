//! The clients of a chaos run. Three kinds run concurrently, each request through a node drawn
//! at random from the current members:
//!
//! - register clients on a few secrets: writes of unique values, linearizable reads, and
//!   compare-and-set (a linearizable read, then a write with `cas` = the version read: with
//!   unique values that is a compare on the value);
//! - stale readers: local reads without read-index, judged only for monotonicity per node and
//!   for never showing a value nobody wrote;
//! - set clients: each adds keys of its own that are never overwritten, so the end of the run
//!   can tell whether any acknowledged write is missing.
//!
//! Every operation is recorded with invoke and complete times (nanoseconds since the start)
//! and its outcome: ok, failed (certainly no effect) or unknown.
//!
//! Every request goes through the kv secrets engine (`coffer.kv.v1`) at the built-in `secret`
//! mount, as a service's would: authorized by the session, encrypted by the barrier. A register
//! is the secret's field `v`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use coffer_api::kv::v1 as pb;
use coffer_api::kv::v1::kv_client::KvClient;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::history::{History, Op, OpKind, Outcome, Value};

/// The mount the workloads write to.
pub const MOUNT: &str = "secret";
/// How the kv engine says a check-and-set did not hold (FAILED_PRECONDITION).
const CAS_FAILED: &str = "check-and-set failed";
/// The field of a secret that holds a register's value.
pub const FIELD: &str = "v";

/// The register keys.
pub fn register_key(k: usize) -> String {
    format!("reg/{k}")
}

/// The set keys' prefix.
pub const SET_PREFIX: &str = "set/";

/// A stale (local) read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StaleRead {
    /// The client.
    pub client: u32,
    /// The node that answered.
    pub node: u64,
    /// That node's restart count when the read was sent (state may go back across a restart).
    pub epoch: u64,
    /// The key.
    pub key: String,
    /// The value seen (`None`: absent).
    pub value: Option<Value>,
    /// The secret's version (0 when absent).
    pub version: u64,
    /// Completion time.
    pub at: u64,
}

/// One attempted set insertion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetAdd {
    /// The key added.
    pub key: String,
    /// Invocation time.
    pub invoked: u64,
    /// Completion time.
    pub completed: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// Everything the clients recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Recorded {
    /// Register operations, for the linearizability checker.
    pub history: History,
    /// Stale reads.
    pub stale: Vec<StaleRead>,
    /// Set insertions.
    pub set: Vec<SetAdd>,
}

/// Which nodes clients may use, and each node's restart count. The harness updates both as it
/// injects faults and changes the membership.
#[derive(Debug, Default)]
pub struct Targets {
    channels: RwLock<Vec<(u64, Channel)>>,
    epochs: Mutex<BTreeMap<u64, u64>>,
}

impl Targets {
    /// Replaces the node list.
    pub fn set(&self, channels: Vec<(u64, Channel)>) {
        if let Ok(mut c) = self.channels.write() {
            *c = channels;
        }
    }

    /// Notes that node `id` restarted (or lost its process).
    pub fn bump_epoch(&self, id: u64) {
        if let Ok(mut e) = self.epochs.lock() {
            *e.entry(id).or_default() += 1;
        }
    }

    fn epoch(&self, id: u64) -> u64 {
        self.epochs
            .lock()
            .map(|e| e.get(&id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn pick(&self, r: u64) -> Option<(u64, Channel)> {
        let c = self.channels.read().ok()?;
        if c.is_empty() {
            return None;
        }
        Some(c[(r % c.len() as u64) as usize].clone())
    }

    /// The current nodes.
    pub fn all(&self) -> Vec<(u64, Channel)> {
        self.channels.read().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Whether an error certainly means "not applied": our server's own UNAVAILABLE (not proposed),
/// RESOURCE_EXHAUSTED (refused), ABORTED (the kv engine gave up deciding a write: each of its
/// attempts was refused by its compare) or a validation error. A transport error (no answer from the
/// server, e.g. the connection broke after the request went out) proves nothing.
fn certainly_failed(s: &tonic::Status) -> bool {
    let from_server = std::error::Error::source(s).is_none();
    from_server
        && matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
        )
}

fn write_outcome<T>(r: &Result<T, tonic::Status>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(s) if certainly_failed(s) => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

/// A put of `value` as the field [`FIELD`] of secret `key`, with check-and-set `cas`.
pub fn put_request(key: &str, value: String, cas: Option<u64>) -> pb::PutRequest {
    pb::PutRequest {
        mount: MOUNT.into(),
        path: key.into(),
        data: [(FIELD.to_string(), value)].into_iter().collect(),
        cas,
        request_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
    }
}

/// A read of secret `key`: (value, version) or the error.
async fn get(
    channel: Channel,
    key: &str,
    consistency: pb::Consistency,
) -> Result<(Option<Value>, u64), tonic::Status> {
    match KvClient::new(channel)
        .get(pb::GetRequest {
            mount: MOUNT.into(),
            path: key.into(),
            consistency: consistency as i32,
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let value = r.data.get(FIELD).and_then(|v| v.parse().ok());
            Ok((value, r.version.map_or(0, |v| v.version)))
        }
        Err(s) if s.code() == tonic::Code::NotFound => Ok((None, 0)),
        Err(s) => Err(s),
    }
}

/// Records a linearizable read of `key` through `channel`.
pub async fn read_op(channel: Channel, client: u32, key: &str, start: Instant) -> (Op, u64) {
    let invoked = start.elapsed().as_nanos() as u64;
    let r = get(channel, key, pb::Consistency::Linearizable).await;
    let completed = start.elapsed().as_nanos() as u64;
    let ((seen, rev), outcome) = match r {
        Ok(v) => (v, Outcome::Ok),
        Err(_) => ((None, 0), Outcome::Failed),
    };
    let op = Op {
        client,
        key: key.to_string(),
        kind: OpKind::Read(seen),
        invoked,
        completed,
        outcome,
    };
    (op, rev)
}

/// Records a write of `value` to `key` through `channel`.
pub async fn write_op(
    channel: Channel,
    client: u32,
    key: &str,
    value: Value,
    start: Instant,
) -> Op {
    let invoked = start.elapsed().as_nanos() as u64;
    let r = KvClient::new(channel)
        .put(put_request(key, value.to_string(), None))
        .await;
    Op {
        client,
        key: key.to_string(),
        kind: OpKind::Write(value),
        invoked,
        completed: start.elapsed().as_nanos() as u64,
        outcome: write_outcome(&r),
    }
}

async fn cas_op(
    channel: Channel,
    client: u32,
    key: &str,
    expected: Option<Value>,
    version: u64,
    new: Value,
    start: Instant,
) -> Op {
    // A secret that was never written has no version: `cas` 0 writes only if there is none.
    let cas = if expected.is_some() { version } else { 0 };
    let invoked = start.elapsed().as_nanos() as u64;
    let r = KvClient::new(channel)
        .put(put_request(key, new.to_string(), Some(cas)))
        .await;
    let completed = start.elapsed().as_nanos() as u64;
    // A check-and-set that did not hold is an answer too: the register did not hold `expected`.
    let refused = matches!(&r, Err(s) if s.code() == tonic::Code::FailedPrecondition
        && s.message().contains(CAS_FAILED));
    let succeeded = r.is_ok();
    Op {
        client,
        key: key.to_string(),
        kind: OpKind::Cas {
            expected,
            new,
            succeeded,
        },
        invoked,
        completed,
        outcome: if refused {
            Outcome::Ok
        } else {
            write_outcome(&r)
        },
    }
}

/// A running workload.
#[derive(Debug)]
pub struct Workload {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    recorded: Arc<Mutex<Recorded>>,
    start: Instant,
    keys: usize,
    ok: Arc<AtomicU64>,
}

/// The workload's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Register clients.
    pub register_clients: u32,
    /// Register keys.
    pub keys: usize,
    /// Stale readers.
    pub stale_readers: u32,
    /// Set clients.
    pub set_clients: u32,
}

impl Workload {
    /// Starts the clients against `targets`. Times are measured from `start`.
    pub fn start(targets: Arc<Targets>, shape: Shape, start: Instant) -> Workload {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let ok = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for client in 0..shape.register_clients {
            let (targets, recorded, stop_rx, ok) = (
                targets.clone(),
                recorded.clone(),
                stop_rx.clone(),
                ok.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !*stop_rx.borrow() {
                    let r: u64 = rand::random();
                    let Some((_, channel)) = targets.pick(r) else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let key = register_key(((r >> 16) % shape.keys as u64) as usize);
                    let mut ops = Vec::new();
                    n += 1;
                    // Unique values: the client in the high bits, a counter in the low ones.
                    let value = (u64::from(client + 1) << 32) | n;
                    match (r >> 32) % 10 {
                        0..=3 => ops.push(write_op(channel, client, &key, value, start).await),
                        4..=7 => ops.push(read_op(channel, client, &key, start).await.0),
                        _ => {
                            let (read, rev) = read_op(channel.clone(), client, &key, start).await;
                            let expected = match (&read.kind, read.outcome) {
                                (OpKind::Read(v), Outcome::Ok) => Some(*v),
                                _ => None,
                            };
                            ops.push(read);
                            if let Some(expected) = expected {
                                ops.push(
                                    cas_op(channel, client, &key, expected, rev, value, start)
                                        .await,
                                );
                            }
                        }
                    }
                    let oks = ops.iter().filter(|o| o.outcome == Outcome::Ok).count();
                    ok.fetch_add(oks as u64, Ordering::Relaxed);
                    if let Ok(mut rec) = recorded.lock() {
                        rec.history.ops.extend(ops);
                    }
                }
            }));
        }
        for i in 0..shape.stale_readers {
            let client = 10_000 + i;
            let (targets, recorded, stop_rx) = (targets.clone(), recorded.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                while !*stop_rx.borrow() {
                    let r: u64 = rand::random();
                    let Some((node, channel)) = targets.pick(r) else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let key = register_key(((r >> 16) % shape.keys as u64) as usize);
                    let epoch = targets.epoch(node);
                    // Paced: local reads are cheap, and unpaced they would take the CPU the
                    // register and set clients need on a two-core machine.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let got = get(channel, &key, pb::Consistency::Stale).await;
                    // A read that raced a restart of its node proves nothing about monotonicity.
                    if let Ok((value, version)) = got
                        && targets.epoch(node) == epoch
                        && let Ok(mut rec) = recorded.lock()
                    {
                        rec.stale.push(StaleRead {
                            client,
                            node,
                            epoch,
                            key,
                            value,
                            version,
                            at: start.elapsed().as_nanos() as u64,
                        });
                    }
                }
            }));
        }
        for i in 0..shape.set_clients {
            let (targets, recorded, stop_rx) = (targets.clone(), recorded.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !*stop_rx.borrow() {
                    let r: u64 = rand::random();
                    let Some((_, channel)) = targets.pick(r) else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    n += 1;
                    let key = format!("{SET_PREFIX}{i}/{n:08}");
                    let invoked = start.elapsed().as_nanos() as u64;
                    let res = KvClient::new(channel)
                        .put(put_request(&key, "x".into(), None))
                        .await;
                    let add = SetAdd {
                        key,
                        invoked,
                        completed: start.elapsed().as_nanos() as u64,
                        outcome: write_outcome(&res),
                    };
                    if let Ok(mut rec) = recorded.lock() {
                        rec.set.push(add);
                    }
                }
            }));
        }
        Workload {
            stop,
            tasks,
            recorded,
            start,
            keys: shape.keys,
            ok,
        }
    }

    /// Successful register operations so far.
    pub fn ok_count(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients (each finishes its operation in flight) and returns what they recorded.
    pub async fn stop(self) -> (Recorded, Instant, usize) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let recorded = self.recorded.lock().map(|r| r.clone()).unwrap_or_default();
        (recorded, self.start, self.keys)
    }
}
