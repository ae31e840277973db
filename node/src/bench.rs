//! `coffer bench`: a closed-loop load generator against any set of nodes. Prints throughput and
//! latency percentiles (HdrHistogram), and the group commit batch size seen by the servers.
//!
//! Puts and gets go through the kv secrets engine at the built-in `secret` mount (the path is
//! the padded key number, the value one field `value`), as a service's would: a put is a new
//! version with its metadata, authorized and encrypted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use coffer_api::kv::v1 as kvpb;
use coffer_api::kv::v1::kv_client::KvClient;
use coffer_api::v1 as pb;
use coffer_api::v1::cluster_client::ClusterClient;
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::Target;

/// What each bench request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchOp {
    /// Put a random key of the key set.
    Put,
    /// Linearizable get of a random key.
    Get,
    /// Stale (local) get of a random key.
    GetStale,
    /// A whole Private Key Challenge login (challenge, signature, login transaction) with the
    /// key given by --login-key. The nodes' per-source login rate limit applies
    /// (`--login-rate-per-second` on the servers).
    Login,
}

/// Options of `coffer bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Operation to drive.
    #[arg(long, value_enum, default_value = "put")]
    pub op: BenchOp,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Key size in bytes (keys are padded numbers).
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// TCP connections per endpoint (requests are spread over them).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The identity key that `--op login` logs in with.
    #[arg(long)]
    pub login_key: Option<std::path::PathBuf>,
}

/// The result of one bench run.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The operation.
    pub op: BenchOp,
    /// Concurrency.
    pub concurrency: usize,
    /// Endpoints driven.
    pub endpoints: usize,
    /// Successful operations.
    pub ok: u64,
    /// Failed operations.
    pub errors: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// For puts: log entries per durable commit on the leader during the run.
    pub entries_per_fsync: Option<f64>,
    /// First error messages, if any.
    pub sample_errors: Vec<String>,
}

fn key(i: usize, size: usize) -> String {
    format!("{i:0size$}")
}

/// The mount the bench writes to and reads from.
const BENCH_MOUNT: &str = "secret";

/// A put of `value` to the secret `path` (a new version), with a request id as the SDK sends.
fn put_request(path: String, value: &str) -> kvpb::PutRequest {
    kvpb::PutRequest {
        mount: BENCH_MOUNT.into(),
        path,
        data: [("value".to_string(), value.to_string())]
            .into_iter()
            .collect(),
        cas: None,
        request_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
    }
}

async fn leader_flush_totals(target: &Target) -> Result<Option<(String, u64, u64)>> {
    let mut cluster = ClusterClient::new(target.connect().await?);
    let status = cluster
        .status(pb::StatusRequest::default())
        .await?
        .into_inner();
    let Some(leader) = status.members.iter().find(|m| m.id == status.leader_id) else {
        return Ok(None);
    };
    let mut c = ClusterClient::new(target.channel_to(&leader.api_addr)?);
    let s = c.status(pb::StatusRequest::default()).await?.into_inner();
    Ok(Some((leader.api_addr.clone(), s.fsyncs, s.flushed_entries)))
}

/// Runs the benchmark.
pub async fn run(target: &Target, args: &BenchArgs) -> Result<BenchReport> {
    if args.concurrency == 0 || args.keys == 0 || args.duration <= 0.0 {
        bail!("--concurrency, --keys and --duration must be positive");
    }
    let mut channels = Vec::new();
    for addr in &target.addrs {
        for _ in 0..args.connections.max(1) {
            channels.push(target.channel_to(addr)?);
        }
    }
    let value = "v".repeat(args.value_size);
    let login_key = match (args.op, &args.login_key) {
        (BenchOp::Login, Some(path)) => Some(Arc::new(crate::keys::KeyPair::load(path)?)),
        (BenchOp::Login, None) => bail!("--op login needs --login-key FILE"),
        _ => None,
    };
    if matches!(args.op, BenchOp::Get | BenchOp::GetStale) {
        // Reads need the keys to exist.
        let mut kv = KvClient::new(channels[0].clone());
        for i in 0..args.keys {
            kv.put(put_request(key(i, args.key_size), &value))
                .await
                .context("preloading keys")?;
        }
    }
    let before = if args.op == BenchOp::Put {
        leader_flush_totals(target).await.ok().flatten()
    } else {
        None
    };
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let channel: Channel = channels[w % channels.len()].clone();
        let (op, keys, key_size, value) = (args.op, args.keys, args.key_size, value.clone());
        let errors = errors.clone();
        let login_key = login_key.clone();
        workers.push(tokio::spawn(async move {
            let mut auth = coffer_api::v1::auth_client::AuthClient::new(channel.clone());
            let mut kv = KvClient::new(channel);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                // Uniform over the key set (a linear congruential sequence modulo the key count
                // has short cycles that all workers fall into: a few hot keys).
                let i = rand::random_range(0..keys.max(1));
                let k = key(i, key_size);
                let t = Instant::now();
                let r = match op {
                    BenchOp::Put => kv.put(put_request(k, &value)).await.map(|_| ()),
                    BenchOp::Get | BenchOp::GetStale => kv
                        .get(kvpb::GetRequest {
                            mount: BENCH_MOUNT.into(),
                            path: k,
                            consistency: if op == BenchOp::Get {
                                kvpb::Consistency::Linearizable as i32
                            } else {
                                kvpb::Consistency::Stale as i32
                            },
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    BenchOp::Login => match &login_key {
                        Some(identity) => crate::auth::login_on(&mut auth, identity, 0)
                            .await
                            .map(|_| ()),
                        None => Err(tonic::Status::invalid_argument("no login key")),
                    },
                };
                match r {
                    Ok(()) => {
                        ok += 1;
                        hist.saturating_record(t.elapsed().as_micros() as u64);
                    }
                    Err(status) => {
                        failed += 1;
                        if let Ok(mut e) = errors.lock()
                            && e.len() < 5
                        {
                            e.push(format!("{:?}: {}", status.code(), status.message()));
                        }
                    }
                }
            }
            anyhow::Ok((hist, ok, failed))
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (h, o, f) = w.await??;
        hist.add(h).map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
        ok += o;
        failed += f;
    }
    let seconds = started.elapsed().as_secs_f64();
    let entries_per_fsync = match (before, leader_flush_totals(target).await.ok().flatten()) {
        (Some((a, f0, e0)), Some((b, f1, e1))) if a == b && f1 > f0 => {
            Some((e1 - e0) as f64 / (f1 - f0) as f64)
        }
        _ => None,
    };
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let sample_errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(BenchReport {
        op: args.op,
        concurrency: args.concurrency,
        endpoints: target.addrs.len(),
        ok,
        errors: failed,
        seconds,
        ops_per_sec: ok as f64 / seconds,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
        entries_per_fsync,
        sample_errors,
    })
}

/// Prints a report as a table or JSON.
pub fn print(report: &BenchReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "op={:?} concurrency={} endpoints={} seconds={:.1}",
        report.op, report.concurrency, report.endpoints, report.seconds
    );
    println!(
        "ok={} errors={} ops/s={:.0} p50={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
        report.ok,
        report.errors,
        report.ops_per_sec,
        report.p50_ms,
        report.p99_ms,
        report.p999_ms,
        report.max_ms
    );
    if let Some(b) = report.entries_per_fsync {
        println!("leader log entries per fsync: {b:.1}");
    }
    for e in &report.sample_errors {
        println!("error: {e}");
    }
    Ok(())
}
