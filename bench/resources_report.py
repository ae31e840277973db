#!/usr/bin/env python3
"""Writes the resources section of docs/performance.md from bench/resources.sh (never by hand).

Input: one JSON object per figure ({"key": ..., "value": ...}, values as strings). The section
goes between `<!-- resources:begin -->` and `<!-- resources:end -->` in --out, replacing what
is there, or at the end of the file when the markers are absent; the rest is left as it is.
"""
import argparse
import datetime
import json
import os
import platform
import re

from compare_report import cpu_model, mem_gib, replace_section, sh

BEGIN, END = "<!-- resources:begin -->", "<!-- resources:end -->"


def mib(kb):
    kb = int(kb)
    return "%.1f MiB" % (kb / 1024) if kb < 10 * 1024 else "%.0f MiB" % (kb / 1024)


def epoch(utc):
    """Seconds since the epoch of a log line's timestamp (`2026-01-02T03:04:05.678901Z`)."""
    return datetime.datetime.fromisoformat(utc.replace("Z", "+00:00")).timestamp()


def section(a, r):
    nodes = sorted({k.rsplit(".", 1)[1] for k in r if k.startswith("rss_kb.loaded.")})
    secrets, value_size = int(r["secrets"]), int(r["value_size"])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = sh("git", "rev-parse", "--short", "HEAD")
    if sh("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " plus uncommitted changes"
    if a.binary_given:
        commit += " (binary given by COFFER_BIN, not built from it: %s)" % a.coffer
    fstype = sh("findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", a.dir)
    reproduce = "bench/resources.sh" if (secrets, value_size) == (100000, 1024) else \
        "SECRETS=%d VALUE_SIZE=%d bench/resources.sh" % (secrets, value_size)
    snap_bytes = int(r["snapshot.bytes"])
    caught_up = float(r["snapshot.caught_up_s"])
    out = []
    w = out.append
    w(BEGIN)
    w("## Resources: memory, disk, restart, snapshot install")
    w("")
    w("Written by `bench/resources.sh` (with `bench/resources_report.py`); do not edit by hand:")
    w("rerun the script. Issue 7 asks for these figures with 100,000 secrets of 1 KiB.")
    w("")
    w("* **Reproduce:** `%s` (builds `coffer` in release; `COFFER_BIN` uses a given binary)." % reproduce)
    w("* **Cluster:** 3 `coffer server` nodes (release) on 127.0.0.1, file storage with an fsync per")
    w("  commit, TLS, initialized and unsealed, peer unseal on (a restarted or new node is unsealed")
    w("  by its peers, so no ceremony is timed). Default Raft settings (a snapshot every 10,000")
    w("  entries).")
    w("* **Data:** %s secrets of %s bytes in the kv engine, one version each, written by the" % (format(secrets, ","), format(value_size, ",")))
    w("  preload of `coffer bench --op get --keys %d --value-size %d` (every key once, 32 in" % (secrets, value_size))
    w("  flight; it took %.1f s including a 1 s read run), counted afterwards with" % float(r["load_seconds"]))
    w("  `coffer kv list secret/`.")
    w("* **Memory:** VmRSS (resident now) and VmHWM (peak resident) from `/proc/PID/status`; empty")
    w("  is right after init, loaded after every node applied the last write. **Disk:** `du -sk`")
    w("  of the node's data directory (Raft log file, redb database with the snapshot, node key).")
    w("* **Restart:** SIGTERM to one node, wait for it to exit (*stop*), start it again with the")
    w("  same flags; timed from that start until its metrics `/ready` answers 200 (*ready*) and")
    w("  until a linearizable `coffer kv get` through its API succeeds (*read*; a new CLI process")
    w("  each try, polled every 20 ms). First a follower, then the leader (the others elect a new")
    w("  one meanwhile; a leader hands its leadership over before it stops, hence its longer stop).")
    w("  For scale, the first row is the same read through a running follower.")
    w("* **Snapshot install:** `coffer cluster snapshot` on the leader (which compacts its log), then")
    w("  a 4th node starts with an empty data directory and `--join` (registered node key) and")
    w("  becomes a learner. Timed from the start of its process until its applied index, read from")
    w("  its `/metrics`, reaches the leader's applied index taken just before; this includes process")
    w("  start, the join handshake, peer unseal, the leader's export of the image (its state file")
    w("  is the snapshot, so the image is read when it is sent), the transfer and the install.")
    w("  Throughput is the snapshot's size (from the new node's log line `installing snapshot`,")
    w("  `bytes=`) divided by that whole interval, a lower bound. The interval is split with the")
    w("  log lines' timestamps (same clock): the leader's `sending snapshot` to node 4 (logged once")
    w("  the image is exported), node 4's `installing snapshot` (logged once every chunk has")
    w("  arrived, before the image is written into redb), and the caught-up time (polled every")
    w("  20 ms).")
    w("")
    w("Machine and run:")
    w("")
    w("* Date: %s; Coffer commit %s." % (now, commit))
    w("* %s, %d CPUs; %s memory; Linux %s." % (cpu_model(), os.cpu_count() or 0, mem_gib(), platform.release()))
    w("* Data directories on `%s`." % fstype)
    w("* Load average (1, 5, 15 min) before the nodes started: %s; after: %s." % (a.load_before, a.load_after))
    w("")
    w("| node | VmRSS empty | VmHWM empty | VmRSS loaded | VmHWM loaded | data dir empty | data dir loaded |")
    w("|---|---|---|---|---|---|---|")
    for n in nodes:
        w("| %s | %s | %s | %s | %s | %s | %s |" % (
            n, mib(r["rss_kb.empty." + n]), mib(r["hwm_kb.empty." + n]),
            mib(r["rss_kb.loaded." + n]), mib(r["hwm_kb.loaded." + n]),
            mib(r["disk_kb.empty." + n]), mib(r["disk_kb.loaded." + n])))
    extra = [(k.split(".")[1], k.rsplit(".", 1)[1]) for k in r if re.match(r"rss_kb\.(restarted|learner)\.", k)]
    if extra:
        w("")
    for label, n in extra:
        what = "node %s after its restart" % n if label == "restarted" else "node %s, the new learner, after the install" % n
        disk = ", data dir %s" % mib(r["disk_kb.%s.%s" % (label, n)]) if "disk_kb.%s.%s" % (label, n) in r else ""
        w("* %s: VmRSS %s, VmHWM %s%s." % (what[0].upper() + what[1:], mib(r["rss_kb.%s.%s" % (label, n)]),
                                        mib(r["hwm_kb.%s.%s" % (label, n)]), disk))
    w("")
    w("| restart (%s secrets) | stop | to `/ready` 200 | to a linearizable read |" % format(secrets, ","))
    w("|---|---|---|---|")
    if "restart.baseline.read_s" in r:
        w("| (no restart: the same read through a running follower) | - | - | %s s |" % r["restart.baseline.read_s"])
    for label in ("follower", "leader"):
        if "restart.%s.ready_s" % label in r:
            w("| %s | %s s | %s s | %s s |" % (label, r["restart.%s.stop_s" % label],
                                              r["restart.%s.ready_s" % label], r["restart.%s.read_s" % label]))
    w("")
    rows = [("node 4's process start to caught up (the whole join)", caught_up)]
    sending, installing = r.get("snapshot.sending_at"), r.get("snapshot.installing_at")
    done = float(r["snapshot.caught_up_at"])
    if sending:
        rows.append(("leader's `sending snapshot` to caught up (transfer and install)", done - epoch(sending)))
    if sending and installing:
        rows.append(("leader's `sending snapshot` to node 4's `installing snapshot` (transfer)", epoch(installing) - epoch(sending)))
    if installing:
        rows.append(("node 4's `installing snapshot` to caught up (install)", done - epoch(installing)))
    w("| snapshot of %.1f MB (log index %s) to a new learner | seconds | MB/s |" % (snap_bytes / 1e6, r["snapshot.index"]))
    w("|---|---|---|")
    for what, secs in rows:
        w("| %s | %.2f | %s |" % (what, secs, "%.1f" % (snap_bytes / 1e6 / secs) if secs > 0 else "-"))
    w("| node 4's process start to `/ready` 200 | %s | - |" % r["snapshot.ready_s"])
    w(END)
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--results", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--secrets", required=True)
    p.add_argument("--value-size", required=True)
    p.add_argument("--coffer", required=True)
    p.add_argument("--binary-given", action="store_true")
    p.add_argument("--load-before", required=True)
    p.add_argument("--load-after", required=True)
    a = p.parse_args()
    r = {}
    for line in open(a.results):
        if line.strip():
            o = json.loads(line)
            r[o["key"]] = o["value"]
    replace_section(a.out, BEGIN, END, section(a, r))

if __name__ == "__main__":
    main()
