//! The checkers besides linearizability: stale reads (monotonic per node and never a value
//! nobody wrote), the set (no acknowledged insertion missing at the end, no failed one
//! present), and the availability summary.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::history::{History, OpKind, Outcome, Value};
use crate::workload::{SetAdd, StaleRead};

/// A checker's verdict: passed, or what it found (at most a few examples).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Whether the property held.
    pub ok: bool,
    /// What was checked and, on failure, the first violations.
    pub detail: String,
}

impl Check {
    fn from(what: String, violations: Vec<String>) -> Check {
        if violations.is_empty() {
            Check {
                ok: true,
                detail: what,
            }
        } else {
            let n = violations.len();
            let first: Vec<String> = violations.into_iter().take(5).collect();
            Check {
                ok: false,
                detail: format!("{what}: {n} violation(s), e.g. {}", first.join("; ")),
            }
        }
    }
}

/// The values that may have been written (acknowledged, or with an unknown outcome) and the
/// ones that certainly were not (failed, or a compare-and-set the server said did not hold).
fn written_values(history: &History) -> (HashSet<Value>, HashSet<Value>) {
    let (mut maybe, mut never) = (HashSet::new(), HashSet::new());
    for op in &history.ops {
        let (value, applied) = match op.kind {
            OpKind::Write(v) => (v, op.outcome != Outcome::Failed),
            OpKind::Cas { new, succeeded, .. } => (
                new,
                op.outcome == Outcome::Unknown || (op.outcome == Outcome::Ok && succeeded),
            ),
            OpKind::Read(_) => continue,
        };
        if applied {
            maybe.insert(value);
        } else {
            never.insert(value);
        }
    }
    (maybe, never)
}

/// Stale reads: a node's state never goes back while it runs (per client, node, restart and
/// secret, the version seen never decreases), and every value seen was written by an
/// operation that was not refused.
pub fn check_stale_reads(stale: &[StaleRead], history: &History) -> Check {
    let (maybe, never) = written_values(history);
    let mut violations = Vec::new();
    let mut last: BTreeMap<(u32, u64, u64, &str), &StaleRead> = BTreeMap::new();
    for r in stale {
        if let Some(v) = r.value {
            if never.contains(&v) {
                violations.push(format!(
                    "node {} showed {v} on {}, the value of a write that failed",
                    r.node, r.key
                ));
            } else if !maybe.contains(&v) {
                violations.push(format!(
                    "node {} showed {v} on {}, which no client wrote",
                    r.node, r.key
                ));
            }
        }
        let k = (r.client, r.node, r.epoch, r.key.as_str());
        if let Some(prev) = last.get(&k)
            && r.version < prev.version
        {
            violations.push(format!(
                "node {} went back on {}: version {} then {} (client {})",
                r.node, r.key, prev.version, r.version, r.client
            ));
        }
        last.insert(k, r);
    }
    Check::from(
        format!(
            "{} stale reads monotonic per node, all values written",
            stale.len()
        ),
        violations,
    )
}

/// The set: every acknowledged insertion is on every node at the end, and no insertion that
/// failed is anywhere. `finals` is each node's final list of set keys.
pub fn check_set(adds: &[SetAdd], finals: &BTreeMap<u64, BTreeSet<String>>) -> Check {
    let mut violations = Vec::new();
    if finals.is_empty() {
        violations.push("no node answered the final list".to_string());
    }
    let acked = adds.iter().filter(|a| a.outcome == Outcome::Ok).count();
    for (node, present) in finals {
        for a in adds {
            match a.outcome {
                Outcome::Ok if !present.contains(&a.key) => {
                    violations.push(format!("acknowledged {} is missing on node {node}", a.key))
                }
                Outcome::Failed if present.contains(&a.key) => {
                    violations.push(format!("{} failed but is present on node {node}", a.key))
                }
                _ => {}
            }
        }
    }
    Check::from(
        format!(
            "{acked} acknowledged insertions present on all {} nodes",
            finals.len()
        ),
        violations,
    )
}

/// Convergence: every node reports the same applied state (index and digest).
pub fn check_convergence(states: &BTreeMap<u64, Option<(u64, u64)>>) -> Check {
    let mut violations = Vec::new();
    let answered: BTreeSet<(u64, u64)> = states.values().flatten().copied().collect();
    for (node, s) in states {
        if s.is_none() {
            violations.push(format!("node {node} did not answer"));
        }
    }
    if answered.len() > 1 {
        violations.push(format!(
            "nodes differ: {}",
            states
                .iter()
                .map(|(n, s)| format!("{n}: {s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Check::from(
        format!("{} nodes report one state digest", states.len()),
        violations,
    )
}

/// Availability: the fraction of operations that succeeded, among those invoked while a fault
/// held and among the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Availability {
    /// Operations invoked during a fault.
    pub during_faults: u64,
    /// Of those, the successful fraction.
    pub during_faults_ok: f64,
    /// Operations invoked outside any fault.
    pub outside_faults: u64,
    /// Of those, the successful fraction.
    pub outside_faults_ok: f64,
}

/// Computes [`Availability`] from operation (invoke time, outcome) pairs and fault windows
/// (start, end), all in nanoseconds from the start.
pub fn availability(
    ops: impl Iterator<Item = (u64, Outcome)>,
    windows: &[(u64, u64)],
) -> Availability {
    let (mut d, mut d_ok, mut o, mut o_ok) = (0u64, 0u64, 0u64, 0u64);
    for (at, outcome) in ops {
        let ok = u64::from(outcome == Outcome::Ok);
        if windows.iter().any(|(s, e)| *s <= at && at < *e) {
            d += 1;
            d_ok += ok;
        } else {
            o += 1;
            o_ok += ok;
        }
    }
    let frac = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    Availability {
        during_faults: d,
        during_faults_ok: frac(d_ok, d),
        outside_faults: o,
        outside_faults_ok: frac(o_ok, o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    fn write(v: Value, outcome: Outcome) -> Op {
        Op {
            client: 0,
            key: "k".into(),
            kind: OpKind::Write(v),
            invoked: 0,
            completed: 1,
            outcome,
        }
    }

    fn stale(node: u64, epoch: u64, value: Option<Value>, rev: u64) -> StaleRead {
        StaleRead {
            client: 1,
            node,
            epoch,
            key: "k".into(),
            value,
            version: rev,
            at: 0,
        }
    }

    fn history(ops: Vec<Op>) -> History {
        History { ops }
    }

    #[test]
    fn monotonic_stale_reads_of_written_values_pass() {
        let h = history(vec![write(1, Outcome::Ok), write(2, Outcome::Unknown)]);
        let reads = [
            stale(1, 0, None, 0),
            stale(1, 0, Some(1), 5),
            stale(1, 0, Some(2), 9),
            stale(2, 0, Some(1), 5),
        ];
        assert!(check_stale_reads(&reads, &h).ok);
    }

    #[test]
    fn a_node_going_back_is_caught_unless_it_restarted() {
        let h = history(vec![write(1, Outcome::Ok), write(2, Outcome::Ok)]);
        let back = [stale(1, 0, Some(2), 9), stale(1, 0, Some(1), 5)];
        let c = check_stale_reads(&back, &h);
        assert!(!c.ok && c.detail.contains("went back"), "{c:?}");
        let restarted = [stale(1, 0, Some(2), 9), stale(1, 1, Some(1), 5)];
        assert!(check_stale_reads(&restarted, &h).ok);
    }

    #[test]
    fn a_failed_or_unknown_value_seen_is_caught() {
        let h = history(vec![write(1, Outcome::Ok), write(2, Outcome::Failed)]);
        let c = check_stale_reads(&[stale(1, 0, Some(2), 3)], &h);
        assert!(!c.ok && c.detail.contains("failed"), "{c:?}");
        let c = check_stale_reads(&[stale(1, 0, Some(77), 3)], &h);
        assert!(!c.ok && c.detail.contains("no client wrote"), "{c:?}");
    }

    fn add(key: &str, outcome: Outcome) -> SetAdd {
        SetAdd {
            key: key.into(),
            invoked: 0,
            completed: 1,
            outcome,
        }
    }

    #[test]
    fn the_set_checker_finds_lost_and_phantom_insertions() {
        let adds = [
            add("a", Outcome::Ok),
            add("b", Outcome::Unknown),
            add("c", Outcome::Failed),
        ];
        let on = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>();
        let good = BTreeMap::from([(1, on(&["a"])), (2, on(&["a", "b"]))]);
        assert!(check_set(&adds, &good).ok);
        let lost = BTreeMap::from([(1, on(&["a"])), (2, on(&["b"]))]);
        let c = check_set(&adds, &lost);
        assert!(!c.ok && c.detail.contains("missing on node 2"), "{c:?}");
        let phantom = BTreeMap::from([(1, on(&["a", "c"]))]);
        assert!(!check_set(&adds, &phantom).ok);
        assert!(!check_set(&adds, &BTreeMap::new()).ok);
    }

    #[test]
    fn convergence_needs_every_node_on_one_state() {
        let same = BTreeMap::from([(1, Some((10, 7))), (2, Some((10, 7)))]);
        assert!(check_convergence(&same).ok);
        let differ = BTreeMap::from([(1, Some((10, 7))), (2, Some((10, 8)))]);
        assert!(!check_convergence(&differ).ok);
        let silent = BTreeMap::from([(1, Some((10, 7))), (2, None)]);
        assert!(!check_convergence(&silent).ok);
    }

    #[test]
    fn availability_splits_operations_by_fault_windows() {
        let ops = vec![
            (5, Outcome::Ok),
            (15, Outcome::Failed),
            (16, Outcome::Ok),
            (30, Outcome::Ok),
        ];
        let a = availability(ops.into_iter(), &[(10, 20)]);
        assert_eq!((a.during_faults, a.outside_faults), (2, 2));
        assert!((a.during_faults_ok - 0.5).abs() < 1e-9);
        assert!((a.outside_faults_ok - 1.0).abs() < 1e-9);
    }
}
