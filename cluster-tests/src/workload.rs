//! A register workload that records a history for `coffer_chaos`'s checkers: clients write
//! unique values to a few keys and read them linearizably, each through a random node, and
//! every operation is recorded with its invoke and complete times and outcome.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_api::v1 as pb;
use coffer_api::v1::kv_client::KvClient;
use coffer_chaos::{History, Op, OpKind, Outcome};
use tokio::time::Instant;
use tonic::transport::Channel;

/// A running workload.
#[derive(Debug)]
pub struct Workload {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    history: Arc<Mutex<History>>,
    start: Instant,
    channels: Vec<Channel>,
}

fn key(k: usize) -> String {
    format!("reg/{k}")
}

/// Records one read of `key` through `channel` as client `client`.
async fn read(channel: Channel, client: u32, key: &str, start: Instant) -> Op {
    let invoked = start.elapsed().as_nanos() as u64;
    let r = KvClient::new(channel)
        .get(pb::GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: pb::Consistency::Linearizable as i32,
        })
        .await;
    let completed = start.elapsed().as_nanos() as u64;
    let (seen, outcome) = match r {
        Ok(resp) => {
            let value = resp
                .into_inner()
                .kv
                .and_then(|kv| String::from_utf8(kv.value).ok())
                .and_then(|s| s.parse().ok());
            (value, Outcome::Ok)
        }
        Err(s) if s.code() == tonic::Code::NotFound => (None, Outcome::Ok),
        // A failed read observed nothing.
        Err(_) => (None, Outcome::Failed),
    };
    Op {
        client,
        key: key.to_string(),
        kind: OpKind::Read(seen),
        invoked,
        completed,
        outcome,
    }
}

async fn write(channel: Channel, client: u32, key: &str, value: u64, start: Instant) -> Op {
    let invoked = start.elapsed().as_nanos() as u64;
    let r = KvClient::new(channel)
        .put(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_string().into_bytes(),
            request_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
        })
        .await;
    let completed = start.elapsed().as_nanos() as u64;
    let outcome = match r {
        Ok(_) => Outcome::Ok,
        // The API's contract: these were certainly not applied.
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
            ) =>
        {
            Outcome::Failed
        }
        Err(_) => Outcome::Unknown,
    };
    Op {
        client,
        key: key.to_string(),
        kind: OpKind::Write(value),
        invoked,
        completed,
        outcome,
    }
}

impl Workload {
    /// Starts `clients` clients on `keys` keys, spreading requests over `channels`.
    pub fn start(channels: Vec<Channel>, clients: u32, keys: usize) -> Workload {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let history = Arc::new(Mutex::new(History::default()));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..clients {
            let (channels, history, stop_rx) = (channels.clone(), history.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !*stop_rx.borrow() {
                    n += 1;
                    let pick: u64 = rand::random();
                    let channel = channels[(pick % channels.len() as u64) as usize].clone();
                    let k = key(((pick >> 8) % keys as u64) as usize);
                    let op = if (pick >> 16).is_multiple_of(2) {
                        // Unique values: client in the high bits, a counter in the low ones.
                        write(channel, client, &k, (u64::from(client) << 32) | n, start).await
                    } else {
                        read(channel, client, &k, start).await
                    };
                    if let Ok(mut h) = history.lock() {
                        h.push(op);
                    }
                }
            }));
        }
        Workload {
            stop,
            tasks,
            history,
            start,
            channels,
        }
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.history.lock().map(|h| h.ops.len()).unwrap_or(0)
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until `more` further operations completed successfully, at most `timeout`.
    pub async fn must_progress(&self, more: usize, timeout: Duration) {
        let ok = || {
            self.history
                .lock()
                .map(|h| h.ops.iter().filter(|o| o.outcome == Outcome::Ok).count())
                .unwrap_or(0)
        };
        let target = ok() + more;
        let what = format!(
            "the workload to make progress (now {} operations: {:?})",
            self.len(),
            self.history.lock().ok().and_then(|h| h.ops.last().cloned())
        );
        crate::wait_until(timeout, &what, || {
            let done = ok() >= target;
            async move { done.then_some(()) }
        })
        .await;
    }

    /// Stops the clients, then reads every key through every node once more (so the final
    /// state is part of the history), and returns the history.
    pub async fn stop(self, keys: usize) -> History {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut history = self.history.lock().map(|h| h.clone()).unwrap_or_default();
        for (i, channel) in self.channels.iter().enumerate() {
            for k in 0..keys {
                history.push(read(channel.clone(), 1000 + i as u32, &key(k), self.start).await);
            }
        }
        history
    }
}
