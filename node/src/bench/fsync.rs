//! `coffer bench fsync`: the latency of one small durable write on this machine, the physical
//! floor under every commit of a Raft log (Coffer's and etcd's alike).
//!
//! Like etcd's guidance for its WAL disk (fio with `--ioengine=sync --fdatasync=1`), it writes
//! blocks one after another into a file and calls `fdatasync` after each one, timing the pair.
//! The file is laid out first (as fio does, and as etcd preallocates its WAL segments), so an
//! fdatasync flushes data, not a file size change through the filesystem journal; it wraps
//! around at its end.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

/// Options of `coffer bench fsync`.
#[derive(Debug, Clone, Args)]
pub struct FsyncArgs {
    /// Directory to measure (on the disk the data directories use). A scratch file is made
    /// there and removed afterwards.
    #[arg(long)]
    pub dir: PathBuf,
    /// Bytes written before each fdatasync.
    #[arg(long, default_value_t = 4096)]
    pub block_size: usize,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The size of the file written to, laid out before measuring.
const FILE_BYTES: usize = 16 << 20;

/// The result of `coffer bench fsync`.
#[derive(Debug, Serialize)]
pub struct FsyncReport {
    /// The directory measured.
    pub dir: PathBuf,
    /// Bytes written before each fdatasync.
    pub block_size: usize,
    /// Write + fdatasync pairs done.
    pub syncs: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// Pairs per second (one writer).
    pub syncs_per_sec: f64,
    /// Latency of one write + fdatasync.
    #[serde(flatten)]
    pub latency: super::Latency,
}

/// Removes the scratch file however the measurement ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Measures write + fdatasync latency in `args.dir` (blocking: call it off the async workers).
pub fn measure(args: &FsyncArgs) -> Result<FsyncReport> {
    if args.block_size == 0 || args.block_size > FILE_BYTES || args.duration <= 0.0 {
        bail!("--block-size (at most 16 MiB) and --duration must be positive");
    }
    if !args.dir.is_dir() {
        bail!(
            "{} is not a directory: give --dir a directory on the disk to measure",
            args.dir.display()
        );
    }
    let scratch = Scratch(
        args.dir
            .join(format!(".coffer-fsync-bench-{}", std::process::id())),
    );
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&scratch.0)
        .with_context(|| format!("cannot create {}", scratch.0.display()))?;
    let block = vec![0x5a_u8; args.block_size];
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..FILE_BYTES / zeros.len() {
        file.write_all(&zeros)
            .with_context(|| format!("lay out {}", scratch.0.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("fsync of {}", scratch.0.display()))?;
    let blocks = (FILE_BYTES / args.block_size) as u64;
    let mut hist = super::histogram()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let mut syncs = 0u64;
    while Instant::now() < deadline {
        let t = Instant::now();
        let offset = (syncs % blocks) * args.block_size as u64;
        file.write_all_at(&block, offset)
            .with_context(|| format!("write to {}", scratch.0.display()))?;
        file.sync_data()
            .with_context(|| format!("fdatasync of {}", scratch.0.display()))?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        syncs += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(FsyncReport {
        dir: args.dir.clone(),
        block_size: args.block_size,
        syncs,
        seconds,
        syncs_per_sec: syncs as f64 / seconds,
        latency: super::Latency::of(&hist),
    })
}

/// Prints a report as a line or JSON.
pub fn print(report: &FsyncReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "fsync {}: {} B write + fdatasync, {} in {:.1} s ({:.0}/s): p50={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
            report.dir.display(),
            report.block_size,
            report.syncs,
            report.seconds,
            report.syncs_per_sec,
            report.latency.p50_ms,
            report.latency.p99_ms,
            report.latency.p999_ms,
            report.latency.max_ms
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_and_leaves_no_file_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = measure(&FsyncArgs {
            dir: dir.path().to_path_buf(),
            block_size: 4096,
            duration: 0.2,
            json: true,
        })
        .expect("measure");
        assert!(report.syncs > 0);
        let l = report.latency;
        assert!(l.p50_ms <= l.p99_ms && l.p99_ms <= l.max_ms);
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
    }

    #[test]
    fn a_missing_directory_is_refused() {
        let err = measure(&FsyncArgs {
            dir: "/nonexistent/coffer".into(),
            block_size: 4096,
            duration: 0.1,
            json: false,
        })
        .expect_err("no such directory");
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
