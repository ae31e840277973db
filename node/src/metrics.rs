//! Prometheus metrics of one node, served on their own port (`/metrics`), plus `/health`
//! (liveness) and `/ready` (readiness: serving, that is unsealed and caught up).
//! Test builds (`failpoints` feature) also take `PUT`/`DELETE /failpoints/{name}` there, so the
//! chaos harness can inject disk and network faults into a running node.
//!
//! Raft gauges are refreshed from the node's status at scrape time; request and storage metrics
//! are recorded as they happen. No label ever carries a key, a value or any secret material.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use coffer_raft::RaftNode;
use coffer_storage::FlushEvent;

use crate::seal::Seal;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

/// The metrics of one node.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    fsync_seconds: Histogram,
    flush_entries: Histogram,
    fsyncs: IntCounter,
    flushed_entries: IntCounter,
    raft: IntGaugeVec,
    lag: IntGaugeVec,
    is_leader: IntGauge,
    fatal: IntGauge,
    login_state_removed: IntCounterVec,
    linearizable_reads: IntCounter,
    read_index_rounds: IntCounter,
    forwarded_writes: IntCounter,
    forward_batches: IntCounter,
    append_streams: IntCounter,
    append_messages: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn buckets_latency() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

impl Metrics {
    /// A fresh registry with every Coffer metric.
    pub fn new(node_id: u64) -> Result<Metrics> {
        let registry = Registry::new_custom(
            Some("coffer".into()),
            Some([("node_id".to_string(), node_id.to_string())].into()),
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "API requests by method and gRPC status code",
            ),
            &["method", "code"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "API request latency by method")
                .buckets(buckets_latency()),
            &["method"],
        )?;
        let fsync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "storage_fsync_duration_seconds",
                "Duration of durable log commits (one fsync each)",
            )
            .buckets(buckets_latency()),
        )?;
        let flush_entries = Histogram::with_opts(
            HistogramOpts::new(
                "storage_entries_per_fsync",
                "Log entries made durable by one commit (group commit batch size)",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        )?;
        let fsyncs = IntCounter::new("storage_fsyncs_total", "Durable log commits")?;
        let flushed_entries = IntCounter::new(
            "storage_flushed_entries_total",
            "Log entries made durable (divide by storage_fsyncs_total for the batch size)",
        )?;
        let raft = IntGaugeVec::new(
            Opts::new("raft_index", "Raft log positions of this node"),
            &["kind"],
        )?;
        let lag = IntGaugeVec::new(
            Opts::new(
                "raft_replication_lag_entries",
                "On the leader: entries each member is behind the leader's last log index",
            ),
            &["peer"],
        )?;
        let is_leader = IntGauge::new("raft_is_leader", "1 when this node is the leader")?;
        let fatal = IntGauge::new("fatal", "1 when Raft or storage stopped on this node")?;
        let login_state_removed = IntCounterVec::new(
            Opts::new(
                "login_state_removed_total",
                "Used challenge nonces and ended sessions this node removed as leader",
            ),
            &["kind"],
        )?;
        let linearizable_reads = IntCounter::new(
            "linearizable_reads_total",
            "Linearizable reads on this node that waited for a read index",
        )?;
        let read_index_rounds = IntCounter::new(
            "read_index_rounds_total",
            "Read indexes this node fetched for its linearizable reads; concurrent reads share one",
        )?;
        let forwarded_writes = IntCounter::new(
            "forwarded_writes_total",
            "Writes this node forwarded to the leader",
        )?;
        let forward_batches = IntCounter::new(
            "forward_batches_total",
            "Requests to the leader that carried them; concurrent writes share one",
        )?;
        let append_streams = IntCounter::new(
            "append_streams_total",
            "As follower: replication streams from a leader that brought entries",
        )?;
        let append_messages = IntCounter::new(
            "append_messages_total",
            "As follower: messages on them that carried entries; one stream carries many",
        )?;
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(append_streams.clone()),
            Box::new(append_messages.clone()),
            Box::new(linearizable_reads.clone()),
            Box::new(read_index_rounds.clone()),
            Box::new(forwarded_writes.clone()),
            Box::new(forward_batches.clone()),
            Box::new(request_seconds.clone()),
            Box::new(fsync_seconds.clone()),
            Box::new(flush_entries.clone()),
            Box::new(fsyncs.clone()),
            Box::new(flushed_entries.clone()),
            Box::new(raft.clone()),
            Box::new(lag.clone()),
            Box::new(is_leader.clone()),
            Box::new(fatal.clone()),
            Box::new(login_state_removed.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Metrics {
            registry,
            requests,
            request_seconds,
            fsync_seconds,
            flush_entries,
            fsyncs,
            flushed_entries,
            raft,
            lag,
            is_leader,
            fatal,
            linearizable_reads,
            read_index_rounds,
            forwarded_writes,
            forward_batches,
            append_streams,
            append_messages,
            login_state_removed,
        })
    }

    /// Counts login state removed by the clean-up (`kind`: nonce or session).
    pub fn login_state_removed(&self, kind: &str, n: usize) {
        if n > 0 {
            self.login_state_removed
                .with_label_values(&[kind])
                .inc_by(n as u64);
        }
    }

    /// Records one API request.
    pub fn observe(&self, method: &str, started: Instant, code: tonic::Code) {
        self.requests
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
        self.request_seconds
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records one durable log commit.
    pub fn observe_flush(&self, e: FlushEvent) {
        self.fsyncs.inc();
        self.flushed_entries.inc_by(e.entries);
        self.fsync_seconds.observe(e.duration.as_secs_f64());
        self.flush_entries.observe(e.entries as f64);
    }

    /// (durable log commits, entries they made durable) since start.
    pub fn flush_totals(&self) -> (u64, u64) {
        (self.fsyncs.get(), self.flushed_entries.get())
    }

    fn refresh(&self, node: &RaftNode) {
        let s = node.status();
        let set = |k: &str, v: u64| self.raft.with_label_values(&[k]).set(v as i64);
        set("term", s.term);
        set("leader_id", s.leader.unwrap_or(0));
        set("last_log", s.last_log_index);
        set("committed", s.committed);
        set("applied", s.applied);
        set("snapshot", s.snapshot);
        set("purged", s.purged);
        self.is_leader.set(i64::from(s.leader == Some(s.id)));
        self.fatal.set(i64::from(node.fatal().is_some()));
        // Two scrapes at once must not both add the same difference.
        static COUNTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
        let (reads, rounds) = node.read_index_counts();
        self.linearizable_reads
            .inc_by(reads.saturating_sub(self.linearizable_reads.get()));
        self.read_index_rounds
            .inc_by(rounds.saturating_sub(self.read_index_rounds.get()));
        let (forwarded, batches) = node.forward_counts();
        self.forwarded_writes
            .inc_by(forwarded.saturating_sub(self.forwarded_writes.get()));
        self.forward_batches
            .inc_by(batches.saturating_sub(self.forward_batches.get()));
        let (streams, messages) = node.append_counts();
        self.append_streams
            .inc_by(streams.saturating_sub(self.append_streams.get()));
        self.append_messages
            .inc_by(messages.saturating_sub(self.append_messages.get()));
        self.lag.reset();
        for (peer, matched) in &s.replication {
            self.lag
                .with_label_values(&[&peer.to_string()])
                .set(s.last_log_index.saturating_sub(*matched) as i64);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self, node: &RaftNode) -> String {
        self.refresh(node);
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// How far (in log entries) a node's applied state may trail what it knows is committed and
/// still count as caught up.
pub const READY_LAG: u64 = 1000;

/// The answer of `/ready`: 200 when this node serves (a member that knows a leader, unsealed,
/// applied within [`READY_LAG`] entries of the commit it knows); otherwise 501 when the cluster
/// was never initialized (`coffer operator init`), 503 with the reason (stopped, not in a
/// cluster yet, a leader without a quorum, no leader, sealed, catching up). A Kubernetes readiness probe on it keeps a
/// pod out of the client service until it can answer, and never restarts it (that is
/// `/health`'s job), so a sealed pod waits for its operators without holding others back.
pub fn readiness(node: &RaftNode, seal: &Seal) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    let status = node.status();
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why);
    if let Some(why) = status.fatal {
        return unavailable(format!("stopped: {why}"));
    }
    let role = if status.voters.contains_key(&status.id) {
        "voter"
    } else if status.learners.contains_key(&status.id) {
        "learner"
    } else {
        return unavailable(
            "not in a cluster yet: waiting for the initial members to form it, or to be added (see the log)"
                .into(),
        );
    };
    // A leader that has not heard from a majority lately cannot commit (openraft does not
    // step down by itself): it does not serve.
    if let Some(why) = node.quorum_lost() {
        return unavailable(format!("no quorum: {why}"));
    }
    let Some(leader) = status.leader else {
        return unavailable(
            "no leader known: an election is under way or a majority is unreachable".into(),
        );
    };
    match seal.config() {
        Ok(Some(_)) => {}
        Ok(None) => {
            return (
                StatusCode::NOT_IMPLEMENTED,
                "not initialized: run `coffer operator init` against any node".into(),
            );
        }
        Err(e) => return unavailable(format!("cannot read the seal configuration: {e:#}")),
    }
    if seal.is_sealed() {
        return unavailable(
            "sealed: operators unseal it (`coffer operator unseal`), or its peers do with peer unseal on"
                .into(),
        );
    }
    if status.committed > status.applied + READY_LAG {
        return unavailable(format!(
            "catching up: applied {} of {} committed entries",
            status.applied, status.committed
        ));
    }
    (
        StatusCode::OK,
        format!("ready: {role}, leader {leader}, applied {}", status.applied),
    )
}

/// Serves `/metrics`, `/health` and `/ready` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    node: Arc<RaftNode>,
    seal: Arc<Seal>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::routing::get;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let local = listener.local_addr()?;
    let health_node = node.clone();
    let ready_node = node.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (m, n) = (metrics.clone(), node.clone());
                async move { m.render(&n) }
            }),
        )
        .route(
            "/health",
            get(move || {
                let n = health_node.clone();
                async move {
                    match n.fatal() {
                        Some(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
                        None => (axum::http::StatusCode::OK, "ok".to_string()),
                    }
                }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let (n, s) = (ready_node.clone(), seal.clone());
                async move { readiness(&n, &s) }
            }),
        );
    #[cfg(feature = "failpoints")]
    let app = app.route(
        "/failpoints/{name}",
        axum::routing::put(
            |axum::extract::Path(name): axum::extract::Path<String>, body: String| async move {
                match fail::cfg(&name, body.trim()) {
                    Ok(()) => {
                        tracing::warn!(failpoint = %name, action = %body.trim(), "failpoint set");
                        (axum::http::StatusCode::OK, "set".to_string())
                    }
                    Err(e) => (axum::http::StatusCode::BAD_REQUEST, e),
                }
            },
        )
        .delete(
            |axum::extract::Path(name): axum::extract::Path<String>| async move {
                fail::remove(&name);
                tracing::warn!(failpoint = %name, "failpoint removed");
                "removed"
            },
        ),
    );
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok((local, handle))
}
