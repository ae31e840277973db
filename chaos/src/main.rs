//! `coffer-chaos`: runs chaos scenarios against Coffer nodes in containers and judges them.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use coffer_chaos::nemesis;
use coffer_chaos::runner::{self, RunConfig};

/// Chaos runs for Coffer: nodes as containers, seeded faults, checked histories.
#[derive(Debug, Parser)]
#[command(name = "coffer-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one scenario (or all), print a summary, write report.json per run. Exit code 1 when
    /// any checker fails, 2 when the harness itself could not run.
    Run(RunArgs),
    /// List the scenarios.
    List,
    /// Re-check a history a failing run kept (its history.json) with the linearizability
    /// checker; exit code 1 when it is not linearizable.
    Check {
        /// The history.json file.
        history: PathBuf,
    },
    /// Measure leader failover: kill -9 the leader, time until a write succeeds.
    Failover {
        /// Rounds.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Voters.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// The coffer binary (a failpoints build; default: coffer-under-test beside this program).
        #[arg(long)]
        coffer_bin: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Scenario name (`coffer-chaos list`).
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    scenario: Option<String>,
    /// Run every group scenario.
    #[arg(long)]
    all: bool,
    /// Voters: 3 or 5.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Workload duration per run, e.g. 60s or 2m.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the fault schedule: the same seed replays the same faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs per scenario, with seeds seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The coffer binary (a failpoints build; default: coffer-under-test beside this program).
    #[arg(long)]
    coffer_bin: Option<PathBuf>,
    /// Where reports go.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Test only: nodes answer "linearizable" reads from local state; the run must FAIL.
    #[arg(long)]
    broken_reads: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 45s or 2m"))?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?}: use s or m")),
    }
}

fn default_bin(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(b) = given {
        return Ok(b);
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no program directory")?;
    let bin = dir.join("coffer-under-test");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p coffer-cluster-tests --bins`, or pass --coffer-bin",
            bin.display()
        );
    }
    Ok(bin)
}

async fn run(args: RunArgs) -> Result<bool> {
    let binary = default_bin(args.coffer_bin)?;
    let scenarios: Vec<String> = match args.scenario {
        Some(s) => vec![s],
        None => nemesis::ALL.iter().map(|s| s.to_string()).collect(),
    };
    let mut all_passed = true;
    let mut reports = Vec::new();
    for scenario in scenarios {
        for seed in args.seed..args.seed + args.seeds {
            let cfg = RunConfig {
                scenario: scenario.clone(),
                nodes: args.nodes,
                duration: args.duration,
                seed,
                binary: binary.clone(),
                out_dir: args.out.clone(),
                broken_reads: args.broken_reads,
            };
            let report = runner::run(&cfg)
                .await
                .with_context(|| format!("scenario {scenario} seed {seed}"))?;
            print!("{}", report.summary());
            all_passed &= report.passed;
            reports.push(report);
        }
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("reports.json"),
        serde_json::to_vec_pretty(&reports)?,
    )?;
    Ok(all_passed)
}

async fn failover(runs: usize, nodes: u64, bin: Option<PathBuf>) -> Result<()> {
    let binary = default_bin(bin)?;
    let dir = std::env::temp_dir().join(format!("coffer-failover-{}", std::process::id()));
    let times = coffer_chaos::failover::measure(&binary, Path::new(&dir), nodes, runs).await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut ms: Vec<u64> = times?.iter().map(|d| d.as_millis() as u64).collect();
    println!("failover times (ms): {ms:?}");
    ms.sort_unstable();
    println!(
        "median {} ms, max {} ms over {} runs",
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        ms.len()
    );
    Ok(())
}

fn recheck(path: &Path) -> Result<bool> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let recorded: coffer_chaos::workload::Recorded = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a history.json of coffer-chaos", path.display()))?;
    let verdict = coffer_chaos::check(&recorded.history);
    for (key, v) in &verdict.keys {
        println!("{key}: {v:?}");
    }
    Ok(verdict.is_linearizable())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Cmd::List => {
                for (name, what, _) in nemesis::SCENARIOS {
                    println!("{name:<20} {what}");
                }
                Ok(true)
            }
            Cmd::Run(args) => run(args).await,
            Cmd::Check { history } => recheck(&history),
            Cmd::Failover {
                runs,
                nodes,
                coffer_bin,
            } => failover(runs, nodes, coffer_bin).await.map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
