#!/usr/bin/env python3
"""Writes docs/performance.md from the results of bench/compare-etcd.sh (never by hand).

Input: the fsync measurement and one JSON line per `coffer bench` run, each tagged with the
workload label and the repeat number. Ratios are Coffer / etcd, paired by repeat (run r of
Coffer against run r of etcd, which ran right after it); the table gives the median ratio and
the smallest and largest over the repeats.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_gib():
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return "%.0f GiB" % (kib / 1024 / 1024)
    except (OSError, ValueError, IndexError):
        return "unknown"


def marker_sections(path):
    """Every `<!-- NAME:begin -->...<!-- NAME:end -->` block of the file, in order: sections
    other scripts (bench/resources.sh, ...) wrote into it, kept when this one rewrites it."""
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, TypeError):
        return []
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", text, re.S)]


def replace_section(path, begin, end, new):
    """Puts `new` (which starts with `begin` and ends with `end`) in place of the file's section
    between those markers, or at the end of the file when it has none; the rest is kept."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + new + "\n"
    with open(path, "w") as f:
        f.write(text)


def spread(values, fmt):
    return "%s (%s to %s)" % (fmt % statistics.median(values), fmt % min(values), fmt % max(values))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fsync", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--duration", required=True)
    p.add_argument("--warmup", required=True)
    p.add_argument("--repeats", required=True)
    p.add_argument("--coffer", required=True)
    p.add_argument("--load-before", required=True)
    p.add_argument("--load-after", required=True)
    p.add_argument("--keep-sections", help="the file this output replaces: its marker sections are kept")
    a = p.parse_args()
    with open(a.fsync) as f:
        fs = json.load(f)
    runs = [json.loads(l) for l in open(a.results) if l.strip()]
    labels = []
    by = {}
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
        by.setdefault((r["label"], r["target"]), {})[r["repeat"]] = r

    rows = {}
    for label in labels:
        c, e = by.get((label, "coffer"), {}), by.get((label, "etcd"), {})
        pairs = [(c[k], e[k]) for k in sorted(c) if k in e]
        if not pairs:
            continue

        def ratio(field):
            return [x[field] / y[field] for x, y in pairs if y[field] > 0]

        def med(side, field):
            vals = [s[field] for s in side.values() if s[field] is not None]
            return statistics.median(vals) if vals else None

        rows[label] = {
            "ops": ratio("ops_per_sec"),
            "p50": ratio("p50_ms"),
            "p99": ratio("p99_ms"),
            "c_ops": med(c, "ops_per_sec"), "e_ops": med(e, "ops_per_sec"),
            "c_p50": med(c, "p50_ms"), "e_p50": med(e, "p50_ms"),
            "c_p99": med(c, "p99_ms"), "e_p99": med(e, "p99_ms"),
            "c_p999": med(c, "p999_ms"), "e_p999": med(e, "p999_ms"),
            "c_batch": med(c, "entries_per_fsync"), "e_batch": med(e, "entries_per_fsync"),
            "errors": sum(s["errors"] for s in list(c.values()) + list(e.values())),
            "runs": len(pairs),
        }

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = sh("git", "rev-parse", "--short", "HEAD")
    if sh("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " plus uncommitted changes"
    fstype = sh("findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", a.dir)
    etcd_version = sh("etcd", "--version").splitlines()[0] if sh("etcd", "--version") != "unknown" else "unknown"
    out = []
    w = out.append
    w("# Performance: Coffer and etcd side by side")
    w("")
    w("This file is written by `bench/compare-etcd.sh` (with `bench/compare_report.py`); do not")
    w("edit it by hand: rerun the script. Requirement R14 and issue 7 ask Coffer to beat etcd on")
    w("the same machine, in the same run, with the same workload.")
    w("")
    w("## How it is measured")
    w("")
    w("* **Reproduce:** `DURATION=%s WARMUP=%s REPEATS=%s bench/compare-etcd.sh` (builds `coffer`" % (a.duration, a.warmup, a.repeats))
    w("  in release, installs Debian's `etcd-server` if `etcd` is missing).")
    w("* **Clusters:** 3 etcd members and 3 `coffer server` nodes, all on 127.0.0.1 of this one")
    w("  machine, with data directories side by side on one filesystem; both fsync every commit.")
    w("  Coffer runs as in production: TLS on every connection, every value encrypted by the")
    w("  barrier, every request authorized by its session certificate, and kv puts are versioned")
    w("  secrets (metadata and data in one transaction). etcd runs plaintext without auth.")
    w("* **Load:** one `coffer bench` process (same machine) drives both: `--target coffer`")
    w("  through the kv secrets engine at mount `secret`, `--target etcd` through etcd's v3 KV")
    w("  gRPC API (`Put`, `Range`; `serializable` for the stale get). 1,000 keys of 8 bytes, values")
    w("  of 256 bytes unless said otherwise, keys uniform at random, 4 connections per node; each")
    w("  worker sends its successive requests over successive connections, so every node gets a")
    w("  third of them. Reads are preceded by a preload of every key.")
    w("* **Runs:** each workload runs Coffer then etcd, %s times, each run %s s of warm-up then" % (a.repeats, a.warmup))
    w("  %s s measured. Closed loop (each of c workers sends when its last answer came) except" % a.duration)
    w("  the open-loop row, where requests are due at a fixed rate and latency counts from the due")
    w("  time (no coordinated omission); there c bounds the requests in flight.")
    w("* **Ratios** are Coffer / etcd, paired by repeat: the median, and in parentheses the")
    w("  smallest and largest of the %s pairs. For ops/s higher is better for Coffer; for" % a.repeats)
    w("  latency lower is better.")
    w("* **Writes per fsync** is the leader's log entries per durable commit during the measured")
    w("  window (Coffer: its flusher's counters in `coffer status`; etcd: committed proposals per")
    w("  WAL fsync from its `/metrics`).")
    w("")
    w("## Machine and run")
    w("")
    w("* Date: %s; Coffer commit %s; %s." % (now, commit, etcd_version))
    w("* %s, %d CPUs; %s memory; Linux %s." % (cpu_model(), os.cpu_count() or 0, mem_gib(), platform.release()))
    w("* Data directories on `%s`." % fstype)
    w("* Load generator on the same machine as all six servers (%d CPUs shared by everything)." % (os.cpu_count() or 0))
    w("* Load average (1, 5, 15 min) before the servers started: %s; after the last run: %s." % (a.load_before, a.load_after))
    w("  Before the run this should be near 0: other work on the machine (a build, a test suite)")
    w("  takes CPU and disk from both systems, and more from the one that needs more CPU per request.")
    w("")
    w("## Disk: the floor under one commit")
    w("")
    w("`coffer bench fsync` (a %d-byte write then fdatasync, in a loop, one writer, %.0f s, into a" % (fs["block_size"], fs["seconds"]))
    w("file laid out beforehand, in the directory that holds the data directories):")
    w("")
    w("| p50 | p99 | p99.9 | max | syncs/s |")
    w("|---|---|---|---|---|")
    w("| %.3f ms | %.3f ms | %.3f ms | %.3f ms | %.0f |" % (fs["p50_ms"], fs["p99_ms"], fs["p999_ms"], fs["max_ms"], fs["syncs_per_sec"]))
    w("")
    w("## Ratios (Coffer / etcd)")
    w("")
    w("| workload | ops/s ratio | p50 ratio | p99 ratio | Coffer writes/fsync | etcd writes/fsync |")
    w("|---|---|---|---|---|---|")
    num = lambda v, f="%.1f": "-" if v is None else f % v
    for label, r in rows.items():
        w("| %s | %s | %s | %s | %s | %s |" % (
            label, spread(r["ops"], "%.2f"), spread(r["p50"], "%.2f"), spread(r["p99"], "%.2f"),
            num(r["c_batch"]), num(r["e_batch"])))
    w("")
    w("## Absolute figures (medians over the repeats)")
    w("")
    w("| workload | Coffer ops/s | etcd ops/s | Coffer p50 / p99 / p99.9 ms | etcd p50 / p99 / p99.9 ms | errors |")
    w("|---|---|---|---|---|---|")
    for label, r in rows.items():
        w("| %s | %.0f | %.0f | %.2f / %.2f / %.2f | %.2f / %.2f / %.2f | %d |" % (
            label, r["c_ops"], r["e_ops"], r["c_p50"], r["c_p99"], r["c_p999"],
            r["e_p50"], r["e_p99"], r["e_p999"], r["errors"]))
    w("")
    w("## Targets of issue 7")
    w("")
    w("| target | measured (median, range) | |")
    w("|---|---|---|")

    def target(name, label, field, op, bound):
        r = rows.get(label)
        if r is None:
            w("| %s | not run | - |" % name)
            return
        vals = r[field] if isinstance(r[field], list) else [r[field]]
        vals = [v for v in vals if v is not None]
        if not vals:
            w("| %s | not measured | - |" % name)
            return
        m = statistics.median(vals)
        met = m >= bound if op == ">=" else m <= bound
        w("| %s | %s | %s |" % (name, spread(vals, "%.2f"), "met" if met else "**missed**"))

    target("put 256 B c=64: ops/s >= 1.3 x etcd", "put 256 B, c=64", "ops", ">=", 1.3)
    target("put 256 B c=64: p99 <= 1.0 x etcd", "put 256 B, c=64", "p99", "<=", 1.0)
    target("put 4 KiB c=64: ops/s >= 1.3 x etcd", "put 4 KiB, c=64", "ops", ">=", 1.3)
    target("linearizable get c=64: ops/s >= 1.3 x etcd", "linearizable get, c=64", "ops", ">=", 1.3)
    target("put c=1: p50 <= 1.0 x etcd", "put 256 B, c=1", "p50", "<=", 1.0)
    c64 = by.get(("put 256 B, c=64", "coffer"), {})
    batches = [s["entries_per_fsync"] for s in c64.values() if s["entries_per_fsync"] is not None]
    if batches:
        m = statistics.median(batches)
        w("| Coffer writes per fsync at c=64 >= 16 | %s | %s |" % (spread(batches, "%.1f"), "met" if m >= 16 else "**missed**"))
    else:
        w("| Coffer writes per fsync at c=64 >= 16 | not measured | - |")
    w("")
    w("The follower-read scaling and resource figures of issue 7 are measured by bench/follower-reads.sh and bench/resources.sh (their sections below).")
    for block in marker_sections(a.keep_sections):
        w("")
        w(block)
    print("\n".join(out))


if __name__ == "__main__":
    main()
