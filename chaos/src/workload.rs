//! The clients of a chaos run. Three kinds run concurrently, each request through a node drawn
//! at random from the current members:
//!
//! - register clients on a few keys: writes of unique values, linearizable reads, and
//!   compare-and-set (a linearizable read, then a transaction that writes only if the key's
//!   `mod_revision` is still the one read: with unique values that is a compare on the value);
//! - stale readers: local reads without read-index, judged only for monotonicity per node and
//!   for never showing a value nobody wrote;
//! - set clients: each adds keys of its own that are never overwritten, so the end of the run
//!   can tell whether any acknowledged write is missing.
//!
//! Every operation is recorded with invoke and complete times (nanoseconds since the start)
//! and its outcome: ok, failed (certainly no effect) or unknown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_api::v1::kv_client::KvClient;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::history::{History, Op, OpKind, Outcome, Value};

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
    /// The key's `mod_revision` (0 when absent).
    pub mod_revision: u64,
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
/// RESOURCE_EXHAUSTED (refused) or a validation error. A transport error (no answer from the
/// server, e.g. the connection broke after the request went out) proves nothing.
fn certainly_failed(s: &tonic::Status) -> bool {
    let from_server = std::error::Error::source(s).is_none();
    from_server
        && matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::ResourceExhausted
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

fn parse_value(kv: &pb::KeyValue) -> Option<Value> {
    std::str::from_utf8(&kv.value).ok()?.parse().ok()
}

/// A linearizable read: (value, mod_revision) or the error.
async fn get(
    channel: Channel,
    key: &str,
    consistency: pb::Consistency,
) -> Result<(Option<Value>, u64), tonic::Status> {
    match KvClient::new(channel)
        .get(pb::GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: consistency as i32,
        })
        .await
    {
        Ok(r) => Ok(r
            .into_inner()
            .kv
            .map(|kv| (parse_value(&kv), kv.mod_revision))
            .unwrap_or((None, 0))),
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
        .put(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_string().into_bytes(),
            request_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
        })
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
    mod_revision: u64,
    new: Value,
    start: Instant,
) -> Op {
    let target = if expected.is_some() {
        pb::compare::Target::ModRevision(mod_revision)
    } else {
        pb::compare::Target::Absent(true)
    };
    let invoked = start.elapsed().as_nanos() as u64;
    let r = KvClient::new(channel)
        .txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                key: key.as_bytes().to_vec(),
                target: Some(target),
            }],
            success: vec![pb::RequestOp {
                op: Some(pb::request_op::Op::Put(pb::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: new.to_string().into_bytes(),
                    request_id: Vec::new(),
                })),
            }],
            failure: Vec::new(),
            request_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
        })
        .await;
    let completed = start.elapsed().as_nanos() as u64;
    let succeeded = r.as_ref().map(|t| t.get_ref().succeeded).unwrap_or(false);
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
        outcome: write_outcome(&r),
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
                    if let Ok((value, mod_revision)) = got
                        && targets.epoch(node) == epoch
                        && let Ok(mut rec) = recorded.lock()
                    {
                        rec.stale.push(StaleRead {
                            client,
                            node,
                            epoch,
                            key,
                            value,
                            mod_revision,
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
                        .put(pb::PutRequest {
                            key: key.as_bytes().to_vec(),
                            value: b"x".to_vec(),
                            request_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
                        })
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
