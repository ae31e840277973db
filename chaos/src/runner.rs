//! One chaos run: build (or reuse) the image, start the containers, run the workload while the
//! seeded schedule injects and heals faults, heal everything, then judge what the clients saw
//! and write the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_api::kv::v1 as kvpb;
use coffer_api::kv::v1::kv_client::KvClient;
use coffer_api::v1 as pb;
use coffer_api::v1::cluster_client::ClusterClient;
use serde::Serialize;
use tokio::time::Instant;

use crate::checkers::{self, Availability, Check};
use crate::docker::{self, DockerCluster};
use crate::history::Outcome;
use crate::nemesis::{self, Fault, Step};
use crate::workload::{self, Recorded, SET_PREFIX, Shape, Targets, Workload};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Scenario name (see [`nemesis::SCENARIOS`]).
    pub scenario: String,
    /// Voters: 3 or 5.
    pub nodes: u64,
    /// How long the workload runs.
    pub duration: Duration,
    /// The seed of the fault schedule.
    pub seed: u64,
    /// The `coffer` binary for the image (a failpoints build).
    pub binary: PathBuf,
    /// Where reports (and, for a failing run, histories and logs) go.
    pub out_dir: PathBuf,
    /// Test only: serve "linearizable" reads from local state (no read-index), a bug the
    /// checker must catch.
    pub broken_reads: bool,
}

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// Injected at, in milliseconds from the start.
    pub at_ms: u64,
    /// Healed at, in milliseconds from the start.
    pub healed_ms: u64,
    /// The scheduled fault.
    pub fault: Fault,
    /// The chaos-mesh experiment it imitates.
    pub chaos_mesh: &'static str,
    /// The nodes it hit and what they did.
    pub detail: String,
}

/// Operation counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// All operations (register and set).
    pub total: u64,
    /// Successful.
    pub ok: u64,
    /// Certainly without effect.
    pub failed: u64,
    /// Outcome unknown.
    pub unknown: u64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Voters.
    pub nodes: u64,
    /// Workload duration in seconds.
    pub duration_s: f64,
    /// The image the nodes ran.
    pub image: String,
    /// Operation counts during the workload.
    pub ops: Counts,
    /// Operations per second during the workload.
    pub ops_per_sec: f64,
    /// ok / total.
    pub ok_ratio: f64,
    /// unknown / total.
    pub unknown_ratio: f64,
    /// Successful fractions during and outside faults.
    pub availability: Availability,
    /// From the last fault's heal to a write and a linearizable read succeeding through
    /// every node, in milliseconds (`None`: no fault, or not within a minute).
    pub recovery_ms: Option<u64>,
    /// The faults, in order.
    pub faults: Vec<FaultRecord>,
    /// Each checker's verdict.
    pub checks: BTreeMap<String, Check>,
    /// Whether every checker passed.
    pub passed: bool,
    /// Where the report (and, on failure, the history and node logs) is.
    pub dir: String,
}

impl Report {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "scenario {} seed {} ({} nodes, {:.0} s): {}\n  ops {} ok {} failed {} unknown {} ({:.0} ops/s; ok {:.1} % during faults, {:.1} % outside)\n  recovery after the last fault: {}\n",
            self.scenario,
            self.seed,
            self.nodes,
            self.duration_s,
            if self.passed { "PASS" } else { "FAIL" },
            self.ops.total,
            self.ops.ok,
            self.ops.failed,
            self.ops.unknown,
            self.ops_per_sec,
            100.0 * self.availability.during_faults_ok,
            100.0 * self.availability.outside_faults_ok,
            self.recovery_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_else(|| "n/a".into()),
        );
        for f in &self.faults {
            s.push_str(&format!(
                "  {:>6.1}s-{:>5.1}s {:<55} {}\n",
                f.at_ms as f64 / 1000.0,
                f.healed_ms as f64 / 1000.0,
                f.detail,
                f.chaos_mesh
            ));
        }
        for (name, c) in &self.checks {
            s.push_str(&format!(
                "  [{}] {name}: {}\n",
                if c.ok { "ok" } else { "FAIL" },
                c.detail
            ));
        }
        if !self.passed {
            s.push_str(&format!(
                "  history and node logs kept in {}; reproduce with --scenario {} --seed {} --nodes {}\n",
                self.dir, self.scenario, self.seed, self.nodes
            ));
        }
        s
    }
}

/// What a fault left to undo.
#[derive(Debug, Default)]
struct Undo {
    start: Vec<u64>,
    unpause: Vec<u64>,
    network: bool,
    failpoints: Vec<(u64, &'static str)>,
    unskew: Vec<u64>,
}

struct Harness {
    cluster: DockerCluster,
    targets: Arc<Targets>,
    next_id: u64,
    /// Disk faults: (node, exit code within the deadline, or None if it kept running).
    disk_stops: Vec<(u64, Option<i64>)>,
    membership_errors: Vec<String>,
    membership_changes: u64,
    /// Nodes found stopped when a fault was to kill them.
    unexpected_exits: Vec<String>,
    skew_observed: Vec<String>,
    skew_errors: Vec<String>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Harness {
    fn members(&self) -> Vec<u64> {
        self.cluster.nodes.keys().copied().collect()
    }

    fn refresh_targets(&self) -> Result<()> {
        let mut channels = Vec::new();
        for id in self.members() {
            channels.push((id, self.cluster.channel(id, REQUEST_TIMEOUT)?));
        }
        self.targets.set(channels);
        Ok(())
    }

    async fn leader(&self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let l = self.cluster.leader().await;
            if l != 0 && self.cluster.nodes.contains_key(&l) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pick(&self, pick: usize) -> u64 {
        let m = self.members();
        m[pick % m.len()]
    }

    /// The members rotated by `pick`, leader first when `leader_first`.
    async fn rotation(&self, pick: usize, leader_first: bool) -> Result<Vec<u64>> {
        let mut m = self.members();
        let len = m.len();
        m.rotate_left(pick % len);
        if leader_first {
            let l = self.leader().await?;
            m.retain(|x| *x != l);
            m.insert(0, l);
        }
        Ok(m)
    }

    async fn inject(&mut self, fault: &Fault, undo: &mut Undo) -> Result<String> {
        Ok(match fault {
            Fault::KillOne { pick } => {
                let id = self.pick(*pick);
                self.kill(id, undo)?;
                format!("kill -9 node {id}")
            }
            Fault::KillLeader => {
                let id = self.leader().await?;
                self.kill(id, undo)?;
                format!("kill -9 leader {id}")
            }
            Fault::KillMajority { pick } => {
                let m = self.rotation(*pick, true).await?;
                let victims: Vec<u64> = m[..m.len() / 2 + 1].to_vec();
                for id in &victims {
                    self.kill(*id, undo)?;
                }
                format!("kill -9 majority {victims:?} (leader first)")
            }
            Fault::PauseOne { pick } => {
                let id = self.pick(*pick);
                self.cluster.pause(id)?;
                undo.unpause.push(id);
                format!("pause node {id}")
            }
            Fault::PauseLeader => {
                let id = self.leader().await?;
                self.cluster.pause(id)?;
                undo.unpause.push(id);
                format!("pause leader {id}")
            }
            Fault::PartitionLeader => {
                let l = self.leader().await?;
                undo.network = true;
                for other in self.members().into_iter().filter(|o| *o != l) {
                    self.cluster.cut(l, other)?;
                }
                format!("isolate leader {l}")
            }
            Fault::PartitionMajority { pick } => {
                let m = self.rotation(*pick, false).await?;
                let (minority, majority) = m.split_at((m.len() - 1) / 2);
                undo.network = true;
                for a in minority {
                    for b in majority {
                        self.cluster.cut(*a, *b)?;
                    }
                }
                format!("split {minority:?} | {majority:?}")
            }
            Fault::PartitionBridge { pick } => {
                let l = self.leader().await?;
                let mut m = self.rotation(*pick, false).await?;
                let bridge = *m.iter().find(|x| **x != l).unwrap_or(&m[0]);
                m.retain(|x| *x != bridge);
                let (left, right) = m.split_at(m.len() / 2);
                undo.network = true;
                for a in left {
                    for b in right {
                        self.cluster.cut(*a, *b)?;
                    }
                }
                format!("bridge {left:?} - {bridge} - {right:?}")
            }
            Fault::PartitionOneWay => {
                let l = self.leader().await?;
                undo.network = true;
                for other in self.members().into_iter().filter(|o| *o != l) {
                    self.cluster.drop_packets(l, other)?;
                }
                format!("drop leader {l}'s outgoing packets")
            }
            Fault::Delay { pick, ms } => {
                let id = self.pick(*pick);
                self.cluster
                    .failpoint(id, "raft::peer_delay", Some(&format!("return({ms})")))
                    .await?;
                undo.failpoints.push((id, "raft::peer_delay"));
                format!("delay node {id}'s Raft messages by {ms} ms")
            }
            Fault::DiskFault { pick, failpoint } => {
                let id = self.pick(*pick);
                self.cluster
                    .failpoint(id, failpoint, Some("return"))
                    .await?;
                // The node must stop (exit code 3) rather than serve what it did not persist.
                let deadline = Instant::now() + Duration::from_secs(15);
                let stopped = loop {
                    let (running, code) = self.cluster.state(id)?;
                    if !running {
                        break Some(code);
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                self.targets.bump_epoch(id);
                self.disk_stops.push((id, stopped));
                undo.start.push(id);
                match stopped {
                    Some(code) => format!("{failpoint} error on node {id}: exited with {code}"),
                    None => format!("{failpoint} error on node {id}: KEPT RUNNING"),
                }
            }
            Fault::ClockSkew { pick, seconds } => {
                let id = self.pick(*pick);
                let Some(lib) = docker::faketime_library() else {
                    bail!(
                        "the clock-skew fault needs libfaketime: apt-get install faketime, then run again (the image is rebuilt with it)"
                    );
                };
                let node = self.cluster.nodes.get_mut(&id).expect("member");
                node.env = vec![
                    ("LD_PRELOAD".into(), lib.into()),
                    ("FAKETIME".into(), format!("{seconds:+}")),
                    ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                ];
                self.cluster.run_container(id)?;
                self.targets.bump_epoch(id);
                undo.unskew.push(id);
                match self.observed_skew(id).await {
                    Ok(s) if (s - seconds).abs() <= 5 => {
                        self.skew_observed.push(format!("node {id}: {s:+} s"));
                    }
                    Ok(s) => self.skew_errors.push(format!(
                        "node {id}'s clock is {s:+} s off, wanted {seconds:+} s"
                    )),
                    Err(e) => self
                        .skew_errors
                        .push(format!("node {id}'s clock not readable: {e:#}")),
                }
                format!("node {id}'s clock {seconds:+} s")
            }
            Fault::Membership { pick } => match self.change_membership(*pick).await {
                Ok(d) => {
                    self.membership_changes += 1;
                    d
                }
                Err(e) => {
                    self.membership_errors.push(format!("{e:#}"));
                    format!("membership change FAILED: {e:#}")
                }
            },
        })
    }

    fn kill(&mut self, id: u64, undo: &mut Undo) -> Result<()> {
        let (running, code) = self.cluster.state(id)?;
        if running {
            self.cluster.kill(id)?;
        } else {
            // It stopped on its own (no fault of ours was holding it down): a crash, which the
            // run reports with the end of the node's log instead of giving up.
            let log = self.cluster.logs(id);
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            self.unexpected_exits.push(format!(
                "node {id} had exited with code {code} before the fault; its log ends:\n{tail}"
            ));
        }
        self.targets.bump_epoch(id);
        undo.start.push(id);
        Ok(())
    }

    /// A node's wall clock minus ours, from the `Date` header of its metrics endpoint.
    async fn observed_skew(&self, id: u64) -> Result<i64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = format!("{}:{}", self.cluster.nodes[&id].ip, docker::METRICS_PORT);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let attempt = async {
                let mut s = tokio::net::TcpStream::connect(&addr).await?;
                s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await?;
                let mut r = String::new();
                s.read_to_string(&mut r).await?;
                Ok::<_, std::io::Error>(r)
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), attempt).await
                && let Some(date) = r.lines().find_map(|l| {
                    l.strip_prefix("date: ")
                        .or_else(|| l.strip_prefix("Date: "))
                })
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs() as i64;
                let theirs = parse_http_date(date.trim())
                    .with_context(|| format!("bad Date header {date:?}"))?;
                return Ok(theirs - now);
            }
            if Instant::now() > deadline {
                bail!("its metrics endpoint did not answer within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn change_membership(&mut self, pick: usize) -> Result<String> {
        let leader = self.leader().await?;
        let new = self.next_id;
        self.next_id += 1;
        self.cluster.prepare(new, false)?;
        // The new node proves the node key the administrator registered and adds itself.
        self.cluster.register_joining_node(new, leader)?;
        self.cluster.run_container(new)?;
        let mut admin = ClusterClient::new(self.cluster.channel(leader, Duration::from_secs(30))?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = admin
                .status(pb::StatusRequest { digest: false })
                .await
                .with_context(|| format!("status of {leader}"))?
                .into_inner();
            if status.members.iter().any(|m| m.id == new) {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {new} did not join within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        admin
            .promote(pb::NodeRequest { id: new })
            .await
            .with_context(|| format!("promote {new}"))?;
        let removable: Vec<u64> = self
            .members()
            .into_iter()
            .filter(|x| *x != leader && *x != new)
            .collect();
        let old = removable[pick % removable.len()];
        admin
            .remove(pb::NodeRequest { id: old })
            .await
            .with_context(|| format!("remove {old}"))?;
        self.cluster.destroy_node(old)?;
        self.refresh_targets()?;
        Ok(format!(
            "node {new} joined and was promoted; node {old} removed"
        ))
    }

    async fn heal(&mut self, undo: Undo) -> Result<()> {
        if undo.network {
            self.cluster.heal_network()?;
        }
        for id in undo.unpause {
            self.cluster.unpause(id)?;
        }
        for (id, fp) in undo.failpoints {
            if self.cluster.state(id).map(|s| s.0).unwrap_or(false) {
                self.cluster.failpoint(id, fp, None).await?;
            }
        }
        for id in undo.start {
            self.cluster.start(id)?;
            self.targets.bump_epoch(id);
        }
        for id in undo.unskew {
            if let Some(n) = self.cluster.nodes.get_mut(&id) {
                n.env.clear();
                self.cluster.run_container(id)?;
                self.targets.bump_epoch(id);
            }
        }
        Ok(())
    }

    /// Waits until a write and a linearizable read succeed through every member.
    async fn wait_available(&self, timeout: Duration) -> Option<Duration> {
        let begin = Instant::now();
        let mut n = 0u64;
        while begin.elapsed() < timeout {
            let mut all = true;
            for (id, channel) in self.targets.all() {
                n += 1;
                let mut kv = KvClient::new(channel);
                let probe = format!("probe/{id}");
                let put = kv
                    .put(workload::put_request(&probe, n.to_string(), None))
                    .await;
                let get = kv
                    .get(kvpb::GetRequest {
                        mount: workload::MOUNT.into(),
                        path: probe,
                        ..Default::default()
                    })
                    .await;
                if put.is_err() || get.is_err() {
                    all = false;
                    break;
                }
            }
            if all {
                return Some(begin.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an HTTP date ("Mon, 23 Nov 2026 21:06:45 GMT") into Unix seconds.
fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| x == month)? as i64 + 1;
    let hms: Vec<i64> = time.split(':').filter_map(|x| x.parse().ok()).collect();
    let [h, mi, se] = hms.as_slice() else {
        return None;
    };
    let days = days_from_civil(year.parse().ok()?, m, day.parse().ok()?);
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Reads every set key on node `id` (linearizable, paginated): the secrets in each set
/// client's folder.
async fn list_set(cluster: &DockerCluster, id: u64) -> Result<BTreeSet<String>> {
    let mut kv = KvClient::new(cluster.channel(id, Duration::from_secs(10))?);
    let mut keys = BTreeSet::new();
    let mut folders = vec![SET_PREFIX.to_string()];
    while let Some(folder) = folders.pop() {
        let mut start_after = String::new();
        loop {
            let page = kv
                .list(kvpb::ListRequest {
                    mount: workload::MOUNT.into(),
                    prefix: folder.clone(),
                    start_after: start_after.clone(),
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("list {folder} on node {id}"))?
                .into_inner();
            if let Some(last) = page.names.last() {
                start_after = last.clone();
            }
            for name in page.names {
                if name.ends_with('/') {
                    folders.push(format!("{folder}{name}"));
                } else {
                    keys.insert(format!("{folder}{name}"));
                }
            }
            if !page.more {
                break;
            }
        }
    }
    Ok(keys)
}

fn counts(rec: &Recorded) -> Counts {
    let mut c = Counts::default();
    let outcomes = rec
        .history
        .ops
        .iter()
        .map(|o| o.outcome)
        .chain(rec.set.iter().map(|s| s.outcome));
    for o in outcomes {
        c.total += 1;
        match o {
            Outcome::Ok => c.ok += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::Unknown => c.unknown += 1,
        }
    }
    c
}

/// The report directory of a run.
pub fn run_dir(out: &Path, scenario: &str, seed: u64) -> PathBuf {
    out.join(format!("{scenario}-seed{seed}"))
}

/// Runs one scenario and writes its report; an `Err` is a harness failure (Docker missing, a
/// fault that could not be injected), not a verdict.
pub async fn run(cfg: &RunConfig) -> Result<Report> {
    let Some(kinds) = nemesis::scenario(&cfg.scenario) else {
        bail!(
            "unknown scenario {:?}; `coffer-chaos list` shows them",
            cfg.scenario
        );
    };
    if !(cfg.nodes == 3 || cfg.nodes == 5) {
        bail!("--nodes must be 3 or 5, not {}", cfg.nodes);
    }
    let duration_ms = cfg.duration.as_millis() as u64;
    if duration_ms < 15_000 {
        bail!("--duration must be at least 15s, to leave room for a fault and the recovery");
    }
    let schedule: Vec<Step> = nemesis::schedule(kinds, duration_ms, cfg.seed);
    let dir = run_dir(&cfg.out_dir, &cfg.scenario, cfg.seed);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let image = docker::ensure_image(&cfg.binary)?;
    let mut cluster = DockerCluster::create(
        &cfg.binary,
        &image,
        &dir.join("cluster"),
        cfg.nodes,
        cfg.seed,
        if cfg.broken_reads {
            vec![("FAILPOINTS".into(), "raft::linearize_local=return".into())]
        } else {
            Vec::new()
        },
    )?;
    cluster.keep = true; // the run decides below
    let targets = Arc::new(Targets::default());
    let mut h = Harness {
        cluster,
        targets: targets.clone(),
        next_id: cfg.nodes + 1,
        disk_stops: Vec::new(),
        membership_errors: Vec::new(),
        membership_changes: 0,
        unexpected_exits: Vec::new(),
        skew_observed: Vec::new(),
        skew_errors: Vec::new(),
    };
    h.refresh_targets()?;
    let leader = h
        .leader()
        .await
        .context("the new cluster elected no leader")?;
    h.cluster
        .initialize(leader)
        .context("initializing and unsealing the new cluster")?;
    // The clients present the administrator's session from now on.
    h.refresh_targets()?;
    if h.wait_available(Duration::from_secs(30)).await.is_none() {
        bail!("the new cluster did not serve writes within 30 s");
    }

    let start = Instant::now();
    let shape = Shape {
        register_clients: 2 * cfg.nodes as u32,
        keys: 4,
        stale_readers: cfg.nodes as u32,
        set_clients: 2,
    };
    let load = Workload::start(targets.clone(), shape, start);
    let mut faults = Vec::new();
    let mut recovery = None;
    for (i, step) in schedule.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(step.at_ms)).await;
        let at_ms = start.elapsed().as_millis() as u64;
        let mut undo = Undo::default();
        let injected = h.inject(&step.fault, &mut undo).await;
        tokio::time::sleep_until(start + Duration::from_millis(step.at_ms + step.hold_ms)).await;
        h.heal(undo).await?;
        let healed = Instant::now();
        let detail = injected?;
        faults.push(FaultRecord {
            at_ms,
            healed_ms: start.elapsed().as_millis() as u64,
            fault: step.fault.clone(),
            chaos_mesh: step.fault.chaos_mesh(),
            detail,
        });
        if i + 1 == schedule.len() {
            recovery = h
                .wait_available(Duration::from_secs(60))
                .await
                .map(|_| healed.elapsed().as_millis() as u64);
        }
    }
    tokio::time::sleep_until(start + cfg.duration).await;
    let ok_before_stop = load.ok_count();
    let (mut rec, _, keys) = load.stop().await;
    let elapsed = start.elapsed().as_secs_f64();
    let ops = counts(&rec);
    let windows: Vec<(u64, u64)> = faults
        .iter()
        .map(|f| (f.at_ms * 1_000_000, f.healed_ms * 1_000_000))
        .collect();
    let availability = checkers::availability(
        rec.history
            .ops
            .iter()
            .map(|o| (o.invoked, o.outcome))
            .chain(rec.set.iter().map(|s| (s.invoked, s.outcome))),
        &windows,
    );

    // Everything is healed; the final state joins the history, read through every node.
    let mut checks = BTreeMap::new();
    if h.wait_available(Duration::from_secs(60)).await.is_none() {
        checks.insert(
            "available-after-heal".to_string(),
            Check {
                ok: false,
                detail:
                    "a write and a read through every node did not succeed within 60 s of healing"
                        .into(),
            },
        );
    }
    for (i, (_, channel)) in targets.all().into_iter().enumerate() {
        for k in 0..keys {
            let key = workload::register_key(k);
            let (op, _) = workload::read_op(channel.clone(), 20_000 + i as u32, &key, start).await;
            rec.history.push(op);
        }
    }
    let mut finals = BTreeMap::new();
    for id in h.members() {
        match list_set(&h.cluster, id).await {
            Ok(keys) => {
                finals.insert(id, keys);
            }
            Err(e) => {
                checks.insert(
                    format!("final-list-node-{id}"),
                    Check {
                        ok: false,
                        detail: format!("{e:#}"),
                    },
                );
            }
        }
    }
    checks.insert("set".into(), checkers::check_set(&rec.set, &finals));
    checks.insert(
        "stale-reads".into(),
        checkers::check_stale_reads(&rec.stale, &rec.history),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let convergence = loop {
        let mut states = BTreeMap::new();
        for id in h.members() {
            let s = h.cluster.status(id, true).await;
            states.insert(id, s.map(|s| (s.applied_index, s.digest)));
        }
        let c = checkers::check_convergence(&states);
        if c.ok || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    checks.insert("convergence".into(), convergence);
    if !h.disk_stops.is_empty() {
        let bad: Vec<String> = h
            .disk_stops
            .iter()
            .filter(|(_, code)| *code != Some(3))
            .map(|(id, code)| format!("node {id}: {code:?}"))
            .collect();
        checks.insert(
            "disk-fault-stops-node".into(),
            Check {
                ok: bad.is_empty(),
                detail: if bad.is_empty() {
                    format!(
                        "{} storage faults, each node stopped with exit code 3",
                        h.disk_stops.len()
                    )
                } else {
                    format!("nodes did not stop with exit code 3: {}", bad.join(", "))
                },
            },
        );
    }
    if !h.skew_observed.is_empty() || !h.skew_errors.is_empty() {
        checks.insert(
            "clock-skew-applied".into(),
            Check {
                ok: h.skew_errors.is_empty(),
                detail: if h.skew_errors.is_empty() {
                    format!("skewed clocks seen: {}", h.skew_observed.join(", "))
                } else {
                    h.skew_errors.join("; ")
                },
            },
        );
    }
    if h.membership_changes > 0 || !h.membership_errors.is_empty() {
        checks.insert(
            "membership".into(),
            Check {
                ok: h.membership_errors.is_empty(),
                detail: if h.membership_errors.is_empty() {
                    format!("{} membership changes completed", h.membership_changes)
                } else {
                    h.membership_errors.join("; ")
                },
            },
        );
    }
    checks.insert(
        "nodes-stay-up".into(),
        Check {
            ok: h.unexpected_exits.is_empty(),
            detail: if h.unexpected_exits.is_empty() {
                "no node stopped on its own".into()
            } else {
                h.unexpected_exits.join("; ")
            },
        },
    );
    checks.insert(
        "progress".into(),
        Check {
            ok: ok_before_stop >= 50,
            detail: format!("{ok_before_stop} successful register operations during the run"),
        },
    );
    let history = rec.history.clone();
    let verdict = tokio::task::spawn_blocking(move || crate::check(&history)).await?;
    checks.insert(
        "linearizability".into(),
        Check {
            ok: verdict.is_linearizable(),
            detail: format!(
                "{} register operations on {} keys: {:?}",
                rec.history.ops.len(),
                verdict.keys.len(),
                verdict.keys
            ),
        },
    );
    let passed = checks.values().all(|c| c.ok);
    let total = ops.total.max(1) as f64;
    let report = Report {
        scenario: cfg.scenario.clone(),
        seed: cfg.seed,
        nodes: cfg.nodes,
        duration_s: elapsed,
        image,
        ops_per_sec: ops.total as f64 / elapsed,
        ok_ratio: ops.ok as f64 / total,
        unknown_ratio: ops.unknown as f64 / total,
        ops,
        availability,
        recovery_ms: recovery,
        faults,
        checks,
        passed,
        dir: dir.display().to_string(),
    };
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(dir.join("summary.txt"), report.summary())?;
    if passed {
        h.cluster.keep = false;
    } else {
        std::fs::write(dir.join("history.json"), serde_json::to_vec(&rec)?)?;
        for id in h.members() {
            std::fs::write(dir.join(format!("node-{id}.log")), h.cluster.logs(id))?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse_to_unix_seconds() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:10 GMT"), Some(10));
        assert_eq!(
            parse_http_date("Mon, 23 Nov 2026 21:06:45 GMT"),
            Some(1_795_468_005)
        );
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
