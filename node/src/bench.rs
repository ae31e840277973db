//! `coffer bench`: a load generator that drives Coffer or etcd with the same workloads, so that
//! the two can be compared side by side on one machine (`bench/compare-etcd.sh`). Prints
//! throughput and latency percentiles (HdrHistogram), and the leader's writes per fsync (the
//! group commit batch).
//!
//! Against Coffer, puts and gets go through the kv secrets engine at the built-in `secret`
//! mount (the path is the padded key number, the value one field `value`), as a service's
//! would: a put is a new version with its metadata, authorized and encrypted. Against etcd
//! (`--target etcd`), they are etcd v3 `Put` and `Range` calls on the same keys and values.
//!
//! Two load models:
//!
//! * **Closed loop** (the default): each of `--concurrency` workers sends its next request when
//!   the previous one is answered. This measures the throughput the system can sustain, but a
//!   slow response also delays the requests that would have come during it, so the latency
//!   tail is understated (coordinated omission).
//! * **Open loop** (`--rate N`): requests are due on a fixed schedule, N per second; a request's
//!   latency counts from the time it was due, not from when a worker got to send it, so a
//!   stall shows in the percentiles of every request it delayed. `--concurrency` bounds the
//!   requests in flight (as a client's connection pool would).

pub mod etcd;
pub mod fsync;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use coffer_api::kv::v1 as kvpb;
use coffer_api::kv::v1::kv_client::KvClient;
use coffer_api::v1 as pb;
use coffer_api::v1::auth_client::AuthClient;
use coffer_api::v1::cluster_client::ClusterClient;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::client::Target;
use etcd::etcdpb;
use etcd::etcdpb::kv_client::KvClient as EtcdKvClient;

/// Which system the bench drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchSystem {
    /// Coffer's kv secrets engine over TLS with a session (`--addr`, `COFFER_ADDR`).
    Coffer,
    /// etcd's v3 KV API over plaintext gRPC (`--endpoints`).
    Etcd,
}

/// What each bench request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchOp {
    /// Put a random key of the key set.
    Put,
    /// Linearizable get of a random key.
    Get,
    /// Stale (local) get of a random key: Coffer's stale read, etcd's serializable range.
    GetStale,
    /// Linearizable gets and puts of random keys, a get with probability --read-ratio.
    Mix,
    /// A whole Private Key Challenge login (challenge, signature, login transaction) with the
    /// key given by --login-key (Coffer only). The nodes' per-source login rate limit applies
    /// (`--login-rate-per-second` on the servers).
    Login,
}

/// Subcommands of `coffer bench` that are not load against a cluster.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Measures write + fdatasync latency in a directory: the floor under one commit.
    Fsync(fsync::FsyncArgs),
}

/// Options of `coffer bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The system to drive.
    #[arg(long, value_enum, default_value = "coffer")]
    pub target: BenchSystem,
    /// etcd client endpoints (`host:port`, plaintext), comma-separated; with --target etcd.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Operation to drive.
    #[arg(long, value_enum, default_value = "put")]
    pub op: BenchOp,
    /// Concurrent requests in flight; a comma-separated list runs once per value, in order.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// How long to measure, in seconds (per concurrency).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of the same load before measuring (not counted).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Open loop: offer this many requests per second on a fixed schedule, and measure each
    /// latency from the time its request was due. Without it, the bench runs a closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// With --op mix: the fraction of requests that are linearizable gets (the rest are puts).
    #[arg(long)]
    pub read_ratio: Option<f64>,
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
    /// Print each run's result as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// The identity key that `--op login` logs in with.
    #[arg(long)]
    pub login_key: Option<std::path::PathBuf>,
}

/// The read ratio of `--op mix` when --read-ratio is not given.
const DEFAULT_READ_RATIO: f64 = 0.9;

/// The result of one bench run (one concurrency).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The system driven.
    pub target: BenchSystem,
    /// The operation.
    pub op: BenchOp,
    /// For `mix`: the fraction of gets.
    pub read_ratio: Option<f64>,
    /// Concurrency (workers; in the open loop, the most requests in flight).
    pub concurrency: usize,
    /// Endpoints driven.
    pub endpoints: usize,
    /// Distinct keys.
    pub keys: usize,
    /// Key size in bytes.
    pub key_size: usize,
    /// Value size in bytes.
    pub value_size: usize,
    /// Open loop: requests offered per second. `None` for the closed loop.
    pub rate: Option<f64>,
    /// Open loop: requests due in the measured window (rate x duration).
    pub offered: Option<u64>,
    /// Requests sent in the measured window (`ok` + `errors`). In the open loop every request
    /// due is sent, late if the workers fell behind (the lateness is in its latency), so this
    /// equals `offered`.
    pub issued: u64,
    /// Successful operations.
    pub ok: u64,
    /// Failed operations.
    pub errors: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Latency percentiles (open loop: a request sent late counts from its due time).
    #[serde(flatten)]
    pub latency: Latency,
    /// For puts and mixes: log entries per durable commit (fsync) on the leader during the
    /// measured window (Coffer: its flusher's counters; etcd: committed proposals per WAL
    /// fsync from its metrics). `None` if the leader changed or could not be asked.
    pub entries_per_fsync: Option<f64>,
    /// First error messages, if any.
    pub sample_errors: Vec<String>,
}

/// The system under load, resolved from the command line.
#[derive(Debug, Clone)]
pub enum BenchTarget {
    /// Coffer nodes, with the session every request presents.
    Coffer(Target),
    /// etcd client endpoints, and the per-request timeout.
    Etcd {
        /// `host:port` of each member's client URL.
        endpoints: Vec<String>,
        /// Per-request timeout.
        timeout: Duration,
    },
}

/// One request of the workload.
#[derive(Debug, Clone, Copy)]
enum Request {
    Put,
    Get { linearizable: bool },
    Login,
}

/// A worker's connection to the system.
#[derive(Debug, Clone)]
enum Conn {
    Coffer {
        kv: KvClient<Channel>,
        auth: AuthClient<Channel>,
        login_key: Option<Arc<crate::keys::KeyPair>>,
    },
    Etcd(EtcdKvClient<Channel>),
}

/// The mount the bench writes to and reads from.
const BENCH_MOUNT: &str = "secret";

fn key(i: usize, size: usize) -> String {
    format!("{i:0size$}")
}

/// A put of `value` to the secret `path` (a new version), with a request id as the SDK sends.
fn put_request(path: String, value: &str) -> kvpb::PutRequest {
    kvpb::PutRequest {
        mount: BENCH_MOUNT.into(),
        path,
        data: [("value".to_string(), value.to_string())]
            .into_iter()
            .collect(),
        cas: None,
        // Time-ordered, as the SDK's (see coffer_client's `request_id`).
        request_id: uuid::Uuid::now_v7().as_bytes().to_vec(),
    }
}

impl Conn {
    /// Sends one request for key `k`; an error is the message to report.
    async fn send(&mut self, request: Request, k: String, value: &str) -> Result<(), String> {
        let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
        match (self, request) {
            (Conn::Coffer { kv, .. }, Request::Put) => kv
                .put(put_request(k, value))
                .await
                .map(|_| ())
                .map_err(status),
            (Conn::Coffer { kv, .. }, Request::Get { linearizable }) => kv
                .get(kvpb::GetRequest {
                    mount: BENCH_MOUNT.into(),
                    path: k,
                    consistency: if linearizable {
                        kvpb::Consistency::Linearizable as i32
                    } else {
                        kvpb::Consistency::Stale as i32
                    },
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(status),
            (
                Conn::Coffer {
                    auth, login_key, ..
                },
                Request::Login,
            ) => match login_key {
                Some(identity) => crate::auth::login_on(auth, identity, 0)
                    .await
                    .map(|_| ())
                    .map_err(status),
                None => Err("no login key".into()),
            },
            (Conn::Etcd(kv), Request::Put) => kv
                .put(etcdpb::PutRequest {
                    key: k.into_bytes(),
                    value: value.as_bytes().to_vec(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(status),
            (Conn::Etcd(kv), Request::Get { linearizable }) => {
                let found = kv
                    .range(etcdpb::RangeRequest {
                        key: k.into_bytes(),
                        serializable: !linearizable,
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .kvs
                    .len();
                if found == 1 {
                    Ok(())
                } else {
                    Err(format!("etcd returned {found} keys for one preloaded key"))
                }
            }
            (Conn::Etcd(_), Request::Login) => Err("etcd has no login operation".into()),
        }
    }
}

/// Checks the options against each other and the target, with a message that says what to do.
fn validate(target: &BenchTarget, args: &BenchArgs) -> Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency must be one or more positive numbers, e.g. --concurrency 1,16,64");
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if args.keys == 0 || !positive(args.duration) || !(positive(args.warmup) || args.warmup == 0.0)
    {
        bail!("--keys and --duration must be positive and --warmup not negative");
    }
    if let Some(rate) = args.rate
        && !positive(rate)
    {
        bail!("--rate must be a positive number of requests per second");
    }
    match (args.op, args.read_ratio) {
        (BenchOp::Mix, Some(r)) if !(0.0..=1.0).contains(&r) => {
            bail!("--read-ratio must be between 0 and 1 (0.9 = 90 % gets, 10 % puts)")
        }
        (BenchOp::Mix, _) | (_, None) => {}
        (op, Some(_)) => bail!(
            "--read-ratio applies to --op mix only (this run is --op {})",
            op.to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        ),
    }
    if args.key_size < args.keys.saturating_sub(1).to_string().len() {
        bail!(
            "--key-size {} is too short for {} distinct keys (padded numbers)",
            args.key_size,
            args.keys
        );
    }
    match target {
        BenchTarget::Etcd { endpoints, .. } => {
            if endpoints.is_empty() {
                bail!(
                    "--target etcd needs --endpoints HOST:PORT[,HOST:PORT...] (the members' plaintext client URLs)"
                );
            }
            if args.op == BenchOp::Login {
                bail!(
                    "--op login is Coffer's Private Key Challenge login; etcd has no such operation: use --target coffer, or --op put, get, get-stale or mix"
                );
            }
        }
        BenchTarget::Coffer(_) => {
            if !args.endpoints.is_empty() {
                bail!(
                    "--endpoints is for --target etcd; Coffer nodes are given with --addr (or COFFER_ADDR)"
                );
            }
            if args.op == BenchOp::Login && args.login_key.is_none() {
                bail!("--op login needs --login-key FILE");
            }
        }
    }
    Ok(())
}

/// Runs the benchmark once per concurrency given, and returns one report per run.
pub async fn run(target: &BenchTarget, args: &BenchArgs) -> Result<Vec<BenchReport>> {
    validate(target, args)?;
    let conns = connect(target, args)?;
    let value = "v".repeat(args.value_size);
    if matches!(args.op, BenchOp::Get | BenchOp::GetStale | BenchOp::Mix) {
        preload(&conns, args, &value).await?;
    }
    let mut reports = Vec::new();
    for &concurrency in &args.concurrency {
        reports.push(run_one(target, args, &conns, &value, concurrency).await?);
    }
    Ok(reports)
}

/// One connection per endpoint and `--connections`; each worker sends over them in turn.
fn connect(target: &BenchTarget, args: &BenchArgs) -> Result<Vec<Conn>> {
    let mut conns = Vec::new();
    match target {
        BenchTarget::Coffer(target) => {
            let login_key = match (&args.login_key, args.op) {
                (Some(path), BenchOp::Login) => Some(Arc::new(
                    crate::keys::KeyPair::load(path)
                        .with_context(|| format!("cannot load the login key {}", path.display()))?,
                )),
                _ => None,
            };
            for addr in &target.addrs {
                for _ in 0..args.connections.max(1) {
                    let channel = target.channel_to(addr)?;
                    conns.push(Conn::Coffer {
                        kv: KvClient::new(channel.clone()),
                        auth: AuthClient::new(channel),
                        login_key: login_key.clone(),
                    });
                }
            }
        }
        BenchTarget::Etcd { endpoints, timeout } => {
            for addr in endpoints {
                for _ in 0..args.connections.max(1) {
                    conns.push(Conn::Etcd(EtcdKvClient::new(etcd::channel_to(
                        addr, *timeout,
                    )?)));
                }
            }
        }
    }
    Ok(conns)
}

/// Writes every key once, so that reads find them.
async fn preload(conns: &[Conn], args: &BenchArgs, value: &str) -> Result<()> {
    let results: Vec<Result<(), String>> = futures::stream::iter(0..args.keys)
        .map(|i| {
            let mut conn = conns[i % conns.len()].clone();
            let k = key(i, args.key_size);
            async move { conn.send(Request::Put, k, value).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        bail!("preloading the {} keys failed: {e}", args.keys);
    }
    Ok(())
}

/// The leader's (fsyncs, entries made durable) counters, and which node it was.
async fn leader_flush_totals(target: &BenchTarget) -> Option<(String, u64, u64)> {
    match target {
        BenchTarget::Coffer(target) => {
            let mut cluster = ClusterClient::new(target.connect().await.ok()?);
            let status = cluster
                .status(pb::StatusRequest::default())
                .await
                .ok()?
                .into_inner();
            let leader = status.members.iter().find(|m| m.id == status.leader_id)?;
            let mut c = ClusterClient::new(target.channel_to(&leader.api_addr).ok()?);
            let s = c
                .status(pb::StatusRequest::default())
                .await
                .ok()?
                .into_inner();
            Some((leader.api_addr.clone(), s.fsyncs, s.flushed_entries))
        }
        BenchTarget::Etcd { endpoints, .. } => etcd::leader_flush_totals(endpoints).await,
    }
}

/// When each phase of a run starts and ends, and the open loop's schedule.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// The load starts (warm-up begins).
    start: Instant,
    /// Measuring begins.
    measure_from: Instant,
    /// No request starts (closed loop) or is due (open loop) from here on.
    deadline: Instant,
    /// Open loop: requests due per second (request n is due n / rate seconds after `start`).
    rate: Option<f64>,
}

/// What one worker saw.
struct WorkerResult {
    hist: Histogram<u64>,
    ok: u64,
    failed: u64,
}

/// A histogram of latencies in microseconds, up to a minute.
fn histogram() -> Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| anyhow::anyhow!("histogram: {e}"))
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl Latency {
    /// The percentiles of a [`histogram`] of microseconds.
    fn of(hist: &Histogram<u64>) -> Latency {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: hist.max() as f64 / 1000.0,
        }
    }
}

async fn run_one(
    target: &BenchTarget,
    args: &BenchArgs,
    conns: &[Conn],
    value: &str,
    concurrency: usize,
) -> Result<BenchReport> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let schedule = Schedule {
        start,
        measure_from,
        deadline: measure_from + Duration::from_secs_f64(args.duration),
        rate: args.rate,
    };
    let read_ratio = match args.op {
        BenchOp::Mix => Some(args.read_ratio.unwrap_or(DEFAULT_READ_RATIO)),
        _ => None,
    };
    let next_slot = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        // Each worker sends its successive requests over successive connections, so every
        // node gets the same share of each worker's requests (as a client's round-robin
        // balancer would), whichever node answers faster.
        let mut conns: Vec<Conn> = conns.to_vec();
        let mut next_conn = w;
        let (op, keys, key_size) = (args.op, args.keys, args.key_size);
        let value = value.to_string();
        let (errors, next_slot) = (errors.clone(), next_slot.clone());
        workers.push(tokio::spawn(async move {
            let mut hist = histogram()?;
            let (mut ok, mut failed) = (0u64, 0u64);
            loop {
                // `due`: when the request is due, now (closed loop) or its slot in the schedule
                // (open loop). `from`: where its latency counts from. A worker that is late for
                // its slot (it was waiting for an earlier answer: the system's slowness) counts
                // from the due time, so a stall shows in every request it delayed; a worker that
                // is early sleeps and counts from when it wakes, so the timer's lateness (up to
                // a millisecond in tokio) is not charged to the system.
                let (due, from) = match schedule.rate {
                    None => {
                        let now = Instant::now();
                        (now, now)
                    }
                    Some(rate) => {
                        let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                        let due = schedule.start + Duration::from_secs_f64(slot as f64 / rate);
                        if due < schedule.deadline && Instant::now() < due {
                            tokio::time::sleep_until(due).await;
                            (due, Instant::now())
                        } else {
                            (due, due)
                        }
                    }
                };
                if due >= schedule.deadline {
                    break;
                }
                let request = match op {
                    BenchOp::Put => Request::Put,
                    BenchOp::Get => Request::Get { linearizable: true },
                    BenchOp::GetStale => Request::Get {
                        linearizable: false,
                    },
                    BenchOp::Mix => {
                        if rand::random::<f64>() < read_ratio.unwrap_or(DEFAULT_READ_RATIO) {
                            Request::Get { linearizable: true }
                        } else {
                            Request::Put
                        }
                    }
                    BenchOp::Login => Request::Login,
                };
                // Uniform over the key set (a linear congruential sequence modulo the key count
                // has short cycles that all workers fall into: a few hot keys).
                let k = key(rand::random_range(0..keys), key_size);
                let at = next_conn % conns.len();
                let conn = &mut conns[at];
                next_conn = next_conn.wrapping_add(1);
                let result = conn.send(request, k, &value).await;
                if due < schedule.measure_from {
                    continue;
                }
                match result {
                    Ok(()) => {
                        ok += 1;
                        hist.saturating_record(from.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        failed += 1;
                        if let Ok(mut errors) = errors.lock()
                            && errors.len() < 5
                        {
                            errors.push(e);
                        }
                    }
                }
            }
            anyhow::Ok(WorkerResult { hist, ok, failed })
        }));
    }
    let counts_writes = matches!(args.op, BenchOp::Put | BenchOp::Mix);
    tokio::time::sleep_until(measure_from).await;
    let before = match counts_writes {
        true => leader_flush_totals(target).await,
        false => None,
    };
    let mut hist = histogram()?;
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let r = w.await.context("bench worker")??;
        hist.add(r.hist)
            .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
        ok += r.ok;
        failed += r.failed;
    }
    let seconds = measure_from.elapsed().as_secs_f64();
    let after = match counts_writes {
        true => leader_flush_totals(target).await,
        false => None,
    };
    let entries_per_fsync = match (before, after) {
        (Some((a, f0, e0)), Some((b, f1, e1))) if a == b && f1 > f0 => {
            Some(e1.saturating_sub(e0) as f64 / (f1 - f0) as f64)
        }
        _ => None,
    };
    let sample_errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(BenchReport {
        target: match target {
            BenchTarget::Coffer(_) => BenchSystem::Coffer,
            BenchTarget::Etcd { .. } => BenchSystem::Etcd,
        },
        op: args.op,
        read_ratio,
        concurrency,
        endpoints: match target {
            BenchTarget::Coffer(t) => t.addrs.len(),
            BenchTarget::Etcd { endpoints, .. } => endpoints.len(),
        },
        keys: args.keys,
        key_size: args.key_size,
        value_size: args.value_size,
        rate: args.rate,
        offered: args.rate.map(|r| (r * args.duration).round() as u64),
        issued: ok + failed,
        ok,
        errors: failed,
        seconds,
        ops_per_sec: ok as f64 / seconds,
        latency: Latency::of(&hist),
        entries_per_fsync,
        sample_errors,
    })
}

/// Prints a report as a table or one line of JSON.
pub fn print(report: &BenchReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let mix = report
        .read_ratio
        .map(|r| format!(" read-ratio={r}"))
        .unwrap_or_default();
    let rate = report
        .rate
        .map(|r| {
            format!(
                " open-loop rate={r}/s offered={}",
                report.offered.unwrap_or(0)
            )
        })
        .unwrap_or_default();
    println!(
        "target={:?} op={:?}{mix} concurrency={} endpoints={} value={}B seconds={:.1}{rate}",
        report.target,
        report.op,
        report.concurrency,
        report.endpoints,
        report.value_size,
        report.seconds
    );
    println!(
        "ok={} errors={} ops/s={:.0} p50={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
        report.ok,
        report.errors,
        report.ops_per_sec,
        report.latency.p50_ms,
        report.latency.p99_ms,
        report.latency.p999_ms,
        report.latency.max_ms
    );
    if let Some(b) = report.entries_per_fsync {
        println!("leader log entries per fsync: {b:.1}");
    }
    for e in &report.sample_errors {
        println!("error: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(line: &str) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(line.split_whitespace()))
            .expect("parse")
            .bench
    }

    fn etcd() -> BenchTarget {
        BenchTarget::Etcd {
            endpoints: vec!["127.0.0.1:2379".into()],
            timeout: Duration::from_secs(1),
        }
    }

    fn refusal(target: &BenchTarget, line: &str) -> String {
        validate(target, &args(line))
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn concurrency_takes_a_list() {
        assert_eq!(args("--concurrency 1,16,64").concurrency, [1, 16, 64]);
        assert!(validate(&etcd(), &args("--concurrency 1,16,64 --op mix")).is_ok());
    }

    #[test]
    fn bad_input_is_refused_with_what_to_do() {
        assert!(refusal(&etcd(), "--op login").contains("use --target coffer"));
        assert!(refusal(&etcd(), "--concurrency 4,0").contains("positive"));
        assert!(refusal(&etcd(), "--rate 0").contains("--rate"));
        assert!(refusal(&etcd(), "--op put --read-ratio 0.5").contains("--op mix only"));
        assert!(refusal(&etcd(), "--op mix --read-ratio 1.5").contains("between 0 and 1"));
        assert!(refusal(&etcd(), "--keys 1000 --key-size 2").contains("too short"));
        let no_endpoints = BenchTarget::Etcd {
            endpoints: Vec::new(),
            timeout: Duration::from_secs(1),
        };
        assert!(refusal(&no_endpoints, "--op put").contains("--endpoints"));
    }
}
