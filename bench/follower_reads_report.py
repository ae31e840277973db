#!/usr/bin/env python3
"""Writes the follower-reads section of docs/performance.md from bench/follower-reads.sh's runs.

Input: one JSON line per `coffer bench --op get` run, tagged with its mode (`spread` over the 3
nodes or `leader` only), repeat number, the leader before and after, the containers' CPU sample
and the client's CPU use. Ratios are spread / leader-only, paired by repeat (run r spread
against run r leader-only, which ran right after it); the median and the range over the
repeats. Only the text between `<!-- follower-reads:begin -->` and `<!-- follower-reads:end -->`
in --out is replaced (the markers are appended at the end when absent); the rest is kept.
"""
import argparse
import datetime
import json
import os
import platform
import statistics

from compare_report import cpu_model, mem_gib, replace_section, sh

BEGIN = "<!-- follower-reads:begin -->"
END = "<!-- follower-reads:end -->"
TARGET = 2.5


def spread(values, fmt):
    if not values:
        return "-"
    return "%s (%s to %s)" % (fmt % statistics.median(values), fmt % min(values), fmt % max(values))


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cpu_cell(r):
    cpu = r.get("node_cpu_pct") or {}
    if not cpu:
        return "-"
    return " / ".join("%.0f" % cpu[k] for k in sorted(cpu))


def section(a, runs):
    by = {}
    for r in runs:
        by.setdefault(r["mode"], {})[r["repeat"]] = r
    s, l = by.get("spread", {}), by.get("leader", {})
    pairs = [(s[k], l[k]) for k in sorted(s) if k in l]

    def ratio(field):
        return [x[field] / y[field] for x, y in pairs if y[field]]

    ops = ratio("ops_per_sec")
    cores = os.cpu_count() or 0
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = sh("git", "rev-parse", "--short", "HEAD")
    # The file this writes into does not count as a change to the code measured.
    if sh("git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!" + a.out):
        commit += " plus uncommitted changes"
    docker = sh("docker", "version", "--format", "{{.Server.Version}}")
    changed = [r for r in runs if r["leader"] != r["leader_after"]]

    out = []
    w = out.append
    w(BEGIN)
    w("")
    w("## Follower reads: 3 CPU-limited nodes, spread over all vs leader only")
    w("")
    w("This section is written by `bench/follower-reads.sh` (with `bench/follower_reads_report.py`);")
    w("do not edit it by hand: rerun the script. Issue 7 asks that linearizable reads scale with")
    w("the followers: gets spread over the 3 nodes of a cluster reach at least %.1f times the" % TARGET)
    w("throughput of the same gets sent to the leader alone.")
    w("")
    w("### How it is measured")
    w("")
    w("* **Reproduce:** `CPUS=%s CONCURRENCY=%s DURATION=%s WARMUP=%s REPEATS=%s bench/follower-reads.sh`"
      % (a.cpus, a.concurrency, a.duration, a.warmup, a.repeats))
    w("  (builds `coffer` in release; needs Docker).")
    w("* **Cluster:** 3 `coffer server` nodes, each in its own Docker container (image `%s`," % a.image)
    w("  built `FROM scratch` from the binary and the libraries it links) on a private bridge")
    w("  network, each limited to **%s CPU** (`docker run --cpus %s`). File storage with an fsync" % (a.cpus, a.cpus))
    w("  per commit, TLS on every connection, values through the barrier, every request authorized")
    w("  by a session certificate, as in production.")
    w("* **The CPU limit stands in for separate machines.** All three nodes run on this one")
    w("  shared machine of %d CPUs. Without a limit, the leader alone could use the CPU that the" % cores)
    w("  idle followers leave free when it gets every request, and spreading the load could not")
    w("  show how reads scale with nodes. With the same share for each node, a node's throughput is")
    w("  bounded by its own share, as on three machines of %s CPU each. It does not stand in for" % a.cpus)
    w("  separate disks (the data directories share one filesystem) or a real network (a bridge")
    w("  inside one kernel), and a limit is a ceiling, not a reservation: the nodes, the client")
    w("  and anything else running compete for the %d CPUs (the nodes may use %.1f of them)." % (cores, 3 * float(a.cpus)))
    w("* **Load:** one `coffer bench --op get` process on the host, not CPU-limited: linearizable")
    w("  gets of random keys among 1,000 (8-byte keys, 256-byte values, preloaded by the bench),")
    w("  closed loop, c=%s, 4 connections per endpoint. **Spread:** `--addr` names all 3 nodes and" % a.concurrency)
    w("  each worker sends its successive requests over the 12 connections in turn, so every node")
    w("  gets a third of them (a round-robin balancer; before 2026-11-25 each worker kept one")
    w("  connection, and the leader, answering faster, got more). **Leader only:** `--addr` names the")
    w("  leader, found with `coffer status` before each run (and checked again after it).")
    w("* **Runs:** spread then leader only, alternately, %s times, each run %s s of warm-up then" % (a.repeats, a.warmup))
    w("  %s s measured." % a.duration)
    w("* **Ratios** are spread / leader-only, paired by repeat: the median, and in parentheses the")
    w("  smallest and largest of the %d pairs. For ops/s higher is better; for latency lower." % len(pairs))
    w("* **CPU:** node CPU is the mean of the `docker stats --no-stream` samples (taken one after")
    w("  the other during each run) that ended in the measured window, in % of one CPU (the limit")
    w("  is %.0f %%; `-` when no sample ended in it); client CPU is the bench process's user +" % (100 * float(a.cpus)))
    w("  system time over its wall time (preload and warm-up included), in CPUs.")
    w("")
    w("### Machine and run")
    w("")
    w("* Date: %s; Coffer commit %s; Docker %s." % (now, commit, docker))
    w("* %s, %d CPUs; %s memory; Linux %s." % (cpu_model(), cores, mem_gib(), platform.release()))
    w("* CPU limit per node: %s CPU (%.1f of the %d CPUs for the three nodes); the load generator" % (a.cpus, 3 * float(a.cpus), cores))
    w("  runs on the same machine without a limit.")
    w("* Load average (1, 5, 15 min) before the first run: %s; after the last run: %s." % (a.load_before, a.load_after))
    if changed:
        w("* **The leader changed during %d run(s)** (marked below); those runs mix two leaders." % len(changed))
    w("")
    w("### Results (medians over the repeats)")
    w("")
    w("| mode | ops/s | p50 ms | p99 ms | p99.9 ms | errors | node CPU % (1 / 2 / 3) | client CPUs |")
    w("|---|---|---|---|---|---|---|---|")
    for mode, name in (("spread", "spread over 3 nodes"), ("leader", "leader only")):
        side = list(by.get(mode, {}).values())
        if not side:
            continue
        cpu = {}
        for r in side:
            for k, v in (r.get("node_cpu_pct") or {}).items():
                cpu.setdefault(k, []).append(v)
        cpu_txt = " / ".join("%.0f" % statistics.median(cpu[k]) for k in sorted(cpu)) or "-"
        client = med([r.get("client_cores") for r in side])
        w("| %s | %.0f | %.2f | %.2f | %.2f | %d | %s | %s |" % (
            name, med([r["ops_per_sec"] for r in side]), med([r["p50_ms"] for r in side]),
            med([r["p99_ms"] for r in side]), med([r["p999_ms"] for r in side]),
            sum(r["errors"] for r in side), cpu_txt, "-" if client is None else "%.2f" % client))
    w("")
    w("| ratio spread / leader only | ops/s | p50 | p99 |")
    w("|---|---|---|---|")
    w("| c=%s | %s | %s | %s |" % (a.concurrency, spread(ops, "%.2f"), spread(ratio("p50_ms"), "%.2f"),
                                  spread(ratio("p99_ms"), "%.2f")))
    w("")
    w("Every run:")
    w("")
    w("| repeat | mode | ops/s | p50 ms | p99 ms | errors | leader | node CPU % (1 / 2 / 3) | client CPUs |")
    w("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (r["repeat"], r["mode"] != "spread")):
        lead = r["leader"] if r["leader"] == r["leader_after"] else "%s, then %s" % (r["leader"], r["leader_after"])
        w("| %d | %s | %.0f | %.2f | %.2f | %d | %s | %s | %s |" % (
            r["repeat"], r["mode"], r["ops_per_sec"], r["p50_ms"], r["p99_ms"], r["errors"], lead,
            cpu_cell(r), "-" if r.get("client_cores") is None else "%.2f" % r["client_cores"]))
    w("")
    w("### Target of issue 7")
    w("")
    if ops:
        verdict = "met" if statistics.median(ops) >= TARGET else "**missed**"
        w("* follower reads: spread over 3 CPU-limited nodes >= %.1f x leader-only: %s" % (TARGET, verdict))
        w("  (ops/s ratio %s over %d pairs)." % (spread(ops, "%.2f"), len(ops)))
    else:
        w("* follower reads: spread over 3 CPU-limited nodes >= %.1f x leader-only: not measured" % TARGET)
    w("")
    w(END)
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    for name in ("results", "out", "cpus", "concurrency", "duration", "warmup", "repeats",
                 "load-before", "load-after", "image"):
        p.add_argument("--" + name, required=True)
    a = p.parse_args()
    runs = [json.loads(l) for l in open(a.results) if l.strip()]
    replace_section(a.out, BEGIN, END, section(a, runs))

if __name__ == "__main__":
    main()
