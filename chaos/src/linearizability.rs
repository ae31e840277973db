//! A linearizability checker for registers, one key at a time (linearizability is
//! compositional, so a history is linearizable when each key's sub-history is).
//!
//! The search is the Wing-Gong algorithm with Lowe's memoization, as in Porcupine: walk the
//! invoke/complete events in time order, try to linearize each pending operation at its
//! invocation, backtrack when an operation completes before it could be placed, and skip
//! states (set of linearized operations, register value) already explored.
//!
//! Outcomes: a failed operation had no effect and is dropped. An operation with an unknown
//! outcome may have taken effect at any point after its invocation, or never: it is given an
//! infinite completion time, so it can always be placed last, which is the same as not having
//! happened when nothing observed it. A read with an unknown outcome tells nothing and is
//! dropped.

use std::collections::{BTreeMap, HashSet};

use crate::history::{History, Op, OpKind, Outcome, Value};

/// The value unknown writes nobody observed stand in with (workloads never write it).
const UNOBSERVED: Value = u64::MAX;

/// Most search steps per key before giving up with [`KeyVerdict::Unknown`].
pub const DEFAULT_STEP_BUDGET: u64 = 1_000_000;

/// The verdict for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    /// Some total order of the operations respects real time and register semantics.
    Linearizable,
    /// No such order exists.
    NotLinearizable {
        /// The most operations any explored order could place before getting stuck.
        longest_prefix: usize,
        /// An operation that could not be placed after that prefix (its client and kind).
        stuck_at: String,
    },
    /// The search ran out of its step budget.
    Unknown,
}

/// The verdict for a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Per key.
    pub keys: BTreeMap<String, KeyVerdict>,
}

impl Verdict {
    /// Whether every key is linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.keys.values().all(|v| *v == KeyVerdict::Linearizable)
    }

    /// The keys that are certainly not linearizable.
    pub fn violations(&self) -> Vec<&str> {
        self.keys
            .iter()
            .filter(|(_, v)| matches!(v, KeyVerdict::NotLinearizable { .. }))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// Checks every key of `history`, each key starting absent.
pub fn check(history: &History) -> Verdict {
    check_with_budget(history, DEFAULT_STEP_BUDGET)
}

/// [`check`] with an explicit step budget per key.
pub fn check_with_budget(history: &History, budget: u64) -> Verdict {
    let mut keys = BTreeMap::new();
    for key in history.keys() {
        let ops: Vec<&Op> = history.ops.iter().filter(|o| o.key == key).collect();
        keys.insert(key, check_key(&ops, budget));
    }
    Verdict { keys }
}

/// The register model: the value after `op` from `state`, or `None` if `op` cannot happen
/// there.
fn step(state: Option<Value>, op: &Op) -> Option<Option<Value>> {
    let known = op.outcome == Outcome::Ok;
    match &op.kind {
        OpKind::Write(v) => Some(Some(*v)),
        OpKind::Read(seen) => (state == *seen).then_some(state),
        OpKind::Cas {
            expected,
            new,
            succeeded,
        } => {
            let holds = state == *expected;
            match (known, holds, succeeded) {
                (true, true, true) | (false, true, _) => Some(Some(*new)),
                (true, false, false) | (false, false, _) => Some(state),
                (true, true, false) | (true, false, true) => None,
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// The matching event (call <-> return).
    partner: usize,
}

fn check_key(all: &[&Op], budget: u64) -> KeyVerdict {
    // Keep what carries information; unknown outcomes complete "never". An unknown write whose
    // value no read saw only matters as "some value nobody expects": it can explain a
    // compare-and-set that failed. So it is dropped (pending forever, it would only multiply
    // the orders to explore) unless a failed compare-and-set completed after it was invoked;
    // the ones kept all write one stand-in value, since no operation tells them apart.
    let observed: HashSet<Value> = all
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .filter_map(|o| match o.kind {
            OpKind::Read(Some(v)) => Some(v),
            OpKind::Cas {
                expected: Some(v), ..
            } => Some(v),
            _ => None,
        })
        .collect();
    let last_failed_cas = all
        .iter()
        .filter(|o| {
            o.outcome == Outcome::Ok
                && matches!(
                    o.kind,
                    OpKind::Cas {
                        succeeded: false,
                        ..
                    }
                )
        })
        .map(|o| o.completed)
        .max();
    let stand_ins: Vec<Op> = all
        .iter()
        .filter(|o| match o.kind {
            OpKind::Write(v) => {
                o.outcome == Outcome::Unknown
                    && !observed.contains(&v)
                    && last_failed_cas.is_some_and(|t| o.invoked < t)
            }
            _ => false,
        })
        .map(|o| Op {
            kind: OpKind::Write(UNOBSERVED),
            ..(*o).clone()
        })
        .collect();
    let ops: Vec<&Op> = all
        .iter()
        .copied()
        .filter(|o| match (&o.outcome, &o.kind) {
            (Outcome::Failed, _) => false,
            (Outcome::Unknown, OpKind::Read(_)) => false,
            (Outcome::Unknown, OpKind::Write(v)) => observed.contains(v),
            (Outcome::Unknown, OpKind::Cas { .. }) => true,
            (Outcome::Ok, _) => true,
        })
        .chain(stand_ins.iter())
        .collect();
    if ops.is_empty() {
        return KeyVerdict::Linearizable;
    }
    let completes = |o: &Op| {
        if o.outcome == Outcome::Unknown {
            u64::MAX
        } else {
            o.completed.max(o.invoked)
        }
    };
    // Events in time order; at equal times calls come first (such operations overlap).
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, o) in ops.iter().enumerate() {
        order.push((o.invoked, true, i));
        order.push((completes(o), false, i));
    }
    order.sort_by_key(|(t, is_call, i)| (*t, !*is_call, *i));
    let mut events: Vec<Event> = order
        .iter()
        .map(|(_, is_call, op)| Event {
            op: *op,
            is_call: *is_call,
            partner: 0,
        })
        .collect();
    let mut call_at = vec![0; ops.len()];
    let mut ret_at = vec![0; ops.len()];
    for (idx, e) in events.iter().enumerate() {
        if e.is_call {
            call_at[e.op] = idx;
        } else {
            ret_at[e.op] = idx;
        }
    }
    for e in events.iter_mut() {
        e.partner = if e.is_call {
            ret_at[e.op]
        } else {
            call_at[e.op]
        };
    }

    // A doubly linked list over the events, with a sentinel head at index n.
    let n = events.len();
    let head = n;
    let mut next: Vec<usize> = (1..=n).collect();
    next.push(0);
    let mut prev: Vec<usize> = Vec::with_capacity(n + 1);
    prev.push(head);
    prev.extend(0..n - 1);
    prev.push(n - 1);
    next[head] = 0;
    next[n - 1] = usize::MAX;
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != usize::MAX {
            prev[nx] = i;
        }
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Option<Value>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<Value>)> = Vec::new();
    let mut state: Option<Value> = None;
    let mut entry = next[head];
    let mut steps = 0u64;
    let mut longest = 0usize;
    let mut stuck_at = String::new();
    loop {
        if next[head] == usize::MAX {
            return KeyVerdict::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return KeyVerdict::Unknown;
        }
        let e = events[entry];
        if e.is_call {
            let op = ops[e.op];
            if let Some(new_state) = step(state, op) {
                let mut bits = linearized.clone();
                bits[e.op / 64] |= 1 << (e.op % 64);
                if seen.insert((bits.clone(), new_state)) {
                    stack.push((entry, state));
                    state = new_state;
                    linearized = bits;
                    unlink(&mut next, &mut prev, entry);
                    unlink(&mut next, &mut prev, e.partner);
                    if stack.len() > longest {
                        longest = stack.len();
                    }
                    entry = next[head];
                    continue;
                }
            } else if stack.len() >= longest {
                stuck_at = format!("client {} {:?}", op.client, op.kind);
            }
            entry = next[entry];
        } else {
            // An operation completed before it could be placed: undo the last placement.
            let Some((placed, before)) = stack.pop() else {
                return KeyVerdict::NotLinearizable {
                    longest_prefix: longest,
                    stuck_at,
                };
            };
            let pe = events[placed];
            state = before;
            linearized[pe.op / 64] &= !(1 << (pe.op % 64));
            relink(&mut next, &mut prev, pe.partner);
            relink(&mut next, &mut prev, placed);
            entry = next[placed];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct H(History);

    impl H {
        fn new() -> H {
            H(History::default())
        }
        fn op(
            mut self,
            client: u32,
            kind: OpKind,
            invoked: u64,
            completed: u64,
            outcome: Outcome,
        ) -> H {
            self.0.push(Op {
                client,
                key: "k".into(),
                kind,
                invoked,
                completed,
                outcome,
            });
            self
        }
        fn w(self, c: u32, v: Value, a: u64, b: u64) -> H {
            self.op(c, OpKind::Write(v), a, b, Outcome::Ok)
        }
        fn r(self, c: u32, v: Option<Value>, a: u64, b: u64) -> H {
            self.op(c, OpKind::Read(v), a, b, Outcome::Ok)
        }
        fn verdict(&self) -> KeyVerdict {
            let mut keys = check(&self.0).keys;
            keys.remove("k").unwrap_or(KeyVerdict::Linearizable)
        }
    }

    fn is_violation(v: &KeyVerdict) -> bool {
        matches!(v, KeyVerdict::NotLinearizable { .. })
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = H::new()
            .r(1, None, 0, 1)
            .w(1, 1, 2, 3)
            .r(2, Some(1), 4, 5)
            .w(2, 2, 6, 7)
            .r(1, Some(2), 8, 9);
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn overlapping_reads_may_see_either_side_of_a_write() {
        // The write overlaps both reads: one sees the old value, one the new.
        let h = H::new()
            .w(1, 1, 0, 1)
            .w(1, 2, 10, 20)
            .r(2, Some(1), 11, 12)
            .r(3, Some(2), 13, 14);
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        // Jepsen's etcd 0.4 bug: the write completed, then a read returned the old value.
        let h = H::new().w(1, 1, 0, 1).w(1, 2, 2, 3).r(2, Some(1), 4, 5);
        assert!(is_violation(&h.verdict()), "{:?}", h.verdict());
    }

    #[test]
    fn reads_going_back_in_time_are_caught() {
        // Two reads after one another see the new value and then the old one.
        let h = H::new()
            .w(1, 1, 0, 1)
            .w(1, 2, 2, 20)
            .r(2, Some(2), 3, 4)
            .r(3, Some(1), 5, 6);
        assert!(is_violation(&h.verdict()));
    }

    #[test]
    fn a_value_never_written_is_caught() {
        let h = H::new().w(1, 1, 0, 1).r(2, Some(7), 2, 3);
        assert!(is_violation(&h.verdict()));
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        // The write was acknowledged, yet a later read finds the key absent.
        let h = H::new().w(1, 1, 0, 1).r(2, None, 5, 6);
        assert!(is_violation(&h.verdict()));
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        // Seen by a later read: it happened.
        let seen = H::new()
            .op(1, OpKind::Write(1), 0, 0, Outcome::Unknown)
            .r(2, Some(1), 10, 11);
        assert_eq!(seen.verdict(), KeyVerdict::Linearizable);
        // Never seen: it did not happen (or happened last).
        let unseen = H::new()
            .op(1, OpKind::Write(1), 0, 0, Outcome::Unknown)
            .r(2, None, 10, 11);
        assert_eq!(unseen.verdict(), KeyVerdict::Linearizable);
        // Seen, then unseen again with no other write: impossible.
        let flicker = H::new()
            .op(1, OpKind::Write(1), 0, 0, Outcome::Unknown)
            .r(2, Some(1), 10, 11)
            .r(2, None, 12, 13);
        assert!(is_violation(&flicker.verdict()));
    }

    #[test]
    fn failed_writes_had_no_effect() {
        // A write that failed must not be observed.
        let h = H::new()
            .op(1, OpKind::Write(1), 0, 1, Outcome::Failed)
            .r(2, Some(1), 2, 3);
        assert!(is_violation(&h.verdict()));
        let h = H::new()
            .op(1, OpKind::Write(1), 0, 1, Outcome::Failed)
            .r(2, None, 2, 3);
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
    }

    #[test]
    fn compare_and_set_follows_the_register() {
        let cas = |expected, new, succeeded| OpKind::Cas {
            expected,
            new,
            succeeded,
        };
        let ok = H::new()
            .w(1, 1, 0, 1)
            .op(2, cas(Some(1), 2, true), 2, 3, Outcome::Ok)
            .op(3, cas(Some(1), 3, false), 4, 5, Outcome::Ok)
            .r(1, Some(2), 6, 7);
        assert_eq!(ok.verdict(), KeyVerdict::Linearizable);
        // A CAS that reports failure although the value matched is caught.
        let lying = H::new()
            .w(1, 1, 0, 1)
            .op(2, cas(Some(1), 2, false), 2, 3, Outcome::Ok)
            .r(1, Some(1), 4, 5);
        assert!(is_violation(&lying.verdict()));
    }

    #[test]
    fn two_successful_cas_from_one_value_are_caught() {
        let cas = |new| OpKind::Cas {
            expected: Some(1),
            new,
            succeeded: true,
        };
        let h = H::new().w(1, 1, 0, 1).op(2, cas(2), 2, 10, Outcome::Ok).op(
            3,
            cas(3),
            2,
            10,
            Outcome::Ok,
        );
        assert!(is_violation(&h.verdict()));
    }

    #[test]
    fn an_unobserved_unknown_write_can_explain_a_failed_cas() {
        // Seen in a chaos run: the value read is 1, a write of 5 times out (nobody reads 5), and
        // a compare-and-set expecting 1 fails. Linearizable: the write took effect in between.
        let failed_cas = OpKind::Cas {
            expected: Some(1),
            new: 7,
            succeeded: false,
        };
        let h = H::new()
            .w(1, 1, 0, 1)
            .r(2, Some(1), 2, 3)
            .op(3, OpKind::Write(5), 2, 3, Outcome::Unknown)
            .op(2, failed_cas.clone(), 4, 5, Outcome::Ok)
            .w(1, 9, 6, 7)
            .r(2, Some(9), 8, 9);
        assert_eq!(h.verdict(), KeyVerdict::Linearizable);
        // Without that write the failed compare-and-set has no explanation.
        let h =
            H::new()
                .w(1, 1, 0, 1)
                .r(2, Some(1), 2, 3)
                .op(2, failed_cas.clone(), 4, 5, Outcome::Ok);
        assert!(is_violation(&h.verdict()));
        // A write invoked after the compare-and-set completed cannot explain it either.
        let h = H::new()
            .w(1, 1, 0, 1)
            .r(2, Some(1), 2, 3)
            .op(2, failed_cas, 4, 5, Outcome::Ok)
            .op(3, OpKind::Write(5), 6, 7, Outcome::Unknown);
        assert!(is_violation(&h.verdict()));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = History::default();
        for (key, seen) in [("a", Some(1)), ("b", Some(9))] {
            h.push(Op {
                client: 1,
                key: key.into(),
                kind: OpKind::Write(1),
                invoked: 0,
                completed: 1,
                outcome: Outcome::Ok,
            });
            h.push(Op {
                client: 2,
                key: key.into(),
                kind: OpKind::Read(seen),
                invoked: 2,
                completed: 3,
                outcome: Outcome::Ok,
            });
        }
        let v = check(&h);
        assert_eq!(v.keys["a"], KeyVerdict::Linearizable);
        assert!(is_violation(&v.keys["b"]));
        assert_eq!(v.violations(), vec!["b"]);
        assert!(!v.is_linearizable());
    }

    #[test]
    fn many_unobserved_unknown_writes_do_not_blow_up_the_search() {
        // 200 writes with unknown outcomes that nobody saw, interleaved with known ones.
        let mut h = History::default();
        for i in 0..200u64 {
            h.push(Op {
                client: 1,
                key: "k".into(),
                kind: OpKind::Write(1000 + i),
                invoked: i * 10,
                completed: 0,
                outcome: Outcome::Unknown,
            });
            h.push(Op {
                client: 2,
                key: "k".into(),
                kind: OpKind::Write(i + 1),
                invoked: i * 10 + 1,
                completed: i * 10 + 2,
                outcome: Outcome::Ok,
            });
            h.push(Op {
                client: 3,
                key: "k".into(),
                kind: OpKind::Read(Some(i + 1)),
                invoked: i * 10 + 3,
                completed: i * 10 + 4,
                outcome: Outcome::Ok,
            });
        }
        assert!(check_with_budget(&h, 100_000).is_linearizable());
    }

    #[test]
    fn many_concurrent_clients_finish_within_budget() {
        // 8 clients, 40 rounds of overlapping writes and reads that are linearizable by
        // construction (each read sees the write of its own round).
        let mut h = History::default();
        for round in 0..40u64 {
            let t = round * 100;
            h.push(Op {
                client: 0,
                key: "k".into(),
                kind: OpKind::Write(round + 1),
                invoked: t,
                completed: t + 50,
                outcome: Outcome::Ok,
            });
            for c in 1..8u32 {
                h.push(Op {
                    client: c,
                    key: "k".into(),
                    kind: OpKind::Read(Some(round + 1)),
                    invoked: t + 10 + u64::from(c),
                    completed: t + 90,
                    outcome: Outcome::Ok,
                });
            }
        }
        assert!(check(&h).is_linearizable());
    }
}
