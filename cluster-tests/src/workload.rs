//! A register workload that records a history for `coffer_chaos`'s checkers: clients write
//! unique values to a few keys and read them linearizably, each through a random node, and
//! every operation is recorded with its invoke and complete times and outcome.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_chaos::{History, Op, Outcome};
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

async fn read(channel: Channel, client: u32, key: &str, start: Instant) -> Op {
    coffer_chaos::workload::read_op(channel, client, key, start)
        .await
        .0
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
                        coffer_chaos::workload::write_op(
                            channel,
                            client,
                            &k,
                            (u64::from(client) << 32) | n,
                            start,
                        )
                        .await
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
