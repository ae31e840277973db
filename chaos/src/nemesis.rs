//! Faults (nemeses) and the seeded schedule that injects them. Each fault names the chaos-mesh
//! experiment it imitates, so a run here and an experiment against the StatefulSet (see
//! `chaos/mesh/`) exercise the same failure.
//!
//! A schedule is a pure function of the scenario, the node count, the duration and the seed:
//! the same seed gives the same faults at the same offsets with the same choices. Which node is
//! the leader is only known while running, so "the leader" is a target, not a node id.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "fault")]
pub enum Fault {
    /// kill -9 of one follower-or-leader node chosen by `pick`, restarted at heal.
    KillOne {
        /// Index into the sorted member ids.
        pick: usize,
    },
    /// kill -9 of the current leader, restarted at heal.
    KillLeader,
    /// kill -9 of a majority (the leader among them), restarted at heal.
    KillMajority {
        /// Rotation of the member list that chooses the others.
        pick: usize,
    },
    /// Freeze one node.
    PauseOne {
        /// Index into the sorted member ids.
        pick: usize,
    },
    /// Freeze the leader.
    PauseLeader,
    /// The leader cut off from every other node (clients still reach it).
    PartitionLeader,
    /// A random minority cut off from the majority.
    PartitionMajority {
        /// Rotation of the member list that chooses the minority.
        pick: usize,
    },
    /// A bridge: two halves that cannot talk to each other, both reaching one node in the
    /// middle (which is not the leader at the start).
    PartitionBridge {
        /// Rotation that chooses the bridge node.
        pick: usize,
    },
    /// The leader's packets to the others are dropped; theirs still arrive.
    PartitionOneWay,
    /// Every Raft message a node sends is held back for `ms` (user-space delay).
    Delay {
        /// Index into the sorted member ids (the delayed node).
        pick: usize,
        /// Milliseconds per message.
        ms: u64,
    },
    /// A storage failpoint in a node's process: it must stop rather than continue with state
    /// it did not persist; it is restarted at heal.
    DiskFault {
        /// Index into the sorted member ids.
        pick: usize,
        /// `storage::fsync` (the durable commit fails) or `storage::append` (a write fails).
        failpoint: &'static str,
    },
    /// One node restarted with its wall clock moved by `seconds` (libfaketime), then restarted
    /// again with the true time at heal.
    ClockSkew {
        /// Index into the sorted member ids.
        pick: usize,
        /// Offset in seconds (negative: behind).
        seconds: i64,
    },
    /// A new node joins (learner, then voter) and an old non-leader voter is removed: the
    /// voter count stays the same, the ids move on.
    Membership {
        /// Index into the removable voters.
        pick: usize,
    },
}

impl Fault {
    /// The chaos-mesh experiment this fault imitates.
    pub fn chaos_mesh(&self) -> &'static str {
        match self {
            Fault::KillOne { .. } | Fault::KillLeader | Fault::KillMajority { .. } => {
                "PodChaos pod-kill"
            }
            Fault::PauseOne { .. } | Fault::PauseLeader => "PodChaos pod-failure",
            Fault::PartitionLeader
            | Fault::PartitionMajority { .. }
            | Fault::PartitionBridge { .. } => "NetworkChaos partition (direction both)",
            Fault::PartitionOneWay => "NetworkChaos partition (direction to)",
            Fault::Delay { .. } => "NetworkChaos delay",
            Fault::DiskFault { .. } => "IOChaos fault",
            Fault::ClockSkew { .. } => "TimeChaos",
            Fault::Membership { .. } => "(scale the StatefulSet and `coffer cluster`)",
        }
    }
}

/// The fault kinds a scenario draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`Fault::KillOne`]
    KillOne,
    /// [`Fault::KillLeader`]
    KillLeader,
    /// [`Fault::KillMajority`]
    KillMajority,
    /// [`Fault::PauseOne`]
    PauseOne,
    /// [`Fault::PauseLeader`]
    PauseLeader,
    /// [`Fault::PartitionLeader`]
    PartitionLeader,
    /// [`Fault::PartitionMajority`]
    PartitionMajority,
    /// [`Fault::PartitionBridge`]
    PartitionBridge,
    /// [`Fault::PartitionOneWay`]
    PartitionOneWay,
    /// [`Fault::Delay`]
    Delay,
    /// [`Fault::DiskFault`]
    DiskFault,
    /// [`Fault::ClockSkew`]
    ClockSkew,
    /// [`Fault::Membership`]
    Membership,
}

/// The scenarios: a name, what it does, and the fault kinds it draws from. The first ones are
/// the groups `--all` runs; the single-fault names after them pick out one fault.
pub const SCENARIOS: &[(&str, &str, &[Kind])] = &[
    (
        "kill",
        "kill -9 of one node, of the leader, of a majority; restart",
        &[Kind::KillOne, Kind::KillLeader, Kind::KillMajority],
    ),
    (
        "pause",
        "freeze one node or the leader; thaw",
        &[Kind::PauseOne, Kind::PauseLeader],
    ),
    (
        "partition",
        "isolate the leader, split minority/majority, a bridge, one-way loss",
        &[
            Kind::PartitionLeader,
            Kind::PartitionMajority,
            Kind::PartitionBridge,
            Kind::PartitionOneWay,
        ],
    ),
    (
        "delay",
        "user-space delay on one node's Raft messages",
        &[Kind::Delay],
    ),
    (
        "disk",
        "fsync or write errors in one node's storage; it must stop, then restarts",
        &[Kind::DiskFault],
    ),
    (
        "clock-skew",
        "one node's wall clock minutes off",
        &[Kind::ClockSkew],
    ),
    (
        "membership",
        "add a node and remove another while nodes are killed and cut off",
        &[Kind::Membership, Kind::KillOne, Kind::PartitionLeader],
    ),
    (
        "mixed",
        "all of the above, drawn at random",
        &[
            Kind::KillOne,
            Kind::KillLeader,
            Kind::KillMajority,
            Kind::PauseOne,
            Kind::PauseLeader,
            Kind::PartitionLeader,
            Kind::PartitionMajority,
            Kind::PartitionBridge,
            Kind::PartitionOneWay,
            Kind::Delay,
            Kind::DiskFault,
            Kind::ClockSkew,
            Kind::Membership,
        ],
    ),
    ("kill-one", "kill -9 of one node", &[Kind::KillOne]),
    ("kill-leader", "kill -9 of the leader", &[Kind::KillLeader]),
    (
        "kill-majority",
        "kill -9 of a majority",
        &[Kind::KillMajority],
    ),
    ("pause-leader", "freeze the leader", &[Kind::PauseLeader]),
    (
        "partition-leader",
        "the leader cut off from the others",
        &[Kind::PartitionLeader],
    ),
    (
        "partition-majority",
        "a minority cut off from the majority",
        &[Kind::PartitionMajority],
    ),
    (
        "partition-bridge",
        "two halves joined by one node",
        &[Kind::PartitionBridge],
    ),
    (
        "partition-oneway",
        "the leader's outgoing packets dropped",
        &[Kind::PartitionOneWay],
    ),
];

/// The group scenarios `run --all` runs.
pub const ALL: &[&str] = &[
    "kill",
    "pause",
    "partition",
    "delay",
    "disk",
    "clock-skew",
    "membership",
    "mixed",
];

/// Looks a scenario up by name.
pub fn scenario(name: &str) -> Option<&'static [Kind]> {
    SCENARIOS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, kinds)| *kinds)
}

/// One scheduled fault: injected at `at_ms` after the workload started, healed `hold_ms` later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Offset of the injection from the start, in milliseconds.
    pub at_ms: u64,
    /// How long the fault holds, in milliseconds.
    pub hold_ms: u64,
    /// The fault.
    pub fault: Fault,
}

fn draw(kind: Kind, rng: &mut StdRng) -> Fault {
    let pick = rng.random_range(0..1000);
    match kind {
        Kind::KillOne => Fault::KillOne { pick },
        Kind::KillLeader => Fault::KillLeader,
        Kind::KillMajority => Fault::KillMajority { pick },
        Kind::PauseOne => Fault::PauseOne { pick },
        Kind::PauseLeader => Fault::PauseLeader,
        Kind::PartitionLeader => Fault::PartitionLeader,
        Kind::PartitionMajority => Fault::PartitionMajority { pick },
        Kind::PartitionBridge => Fault::PartitionBridge { pick },
        Kind::PartitionOneWay => Fault::PartitionOneWay,
        Kind::Delay => Fault::Delay {
            pick,
            ms: rng.random_range(50..=300),
        },
        Kind::DiskFault => Fault::DiskFault {
            pick,
            failpoint: if rng.random_bool(0.5) {
                "storage::fsync"
            } else {
                "storage::append"
            },
        },
        Kind::ClockSkew => Fault::ClockSkew {
            pick,
            seconds: if rng.random_bool(0.5) { 1 } else { -1 } * rng.random_range(120..=600),
        },
        Kind::Membership => Fault::Membership { pick },
    }
}

/// The fault schedule of a run of `duration_ms`: a quiet lead-in, then faults of 3 to 8 s with
/// quiet gaps of 2 to 5 s, the last one healed at least 3 s before the end (the rest of the
/// run measures recovery).
pub fn schedule(kinds: &[Kind], duration_ms: u64, seed: u64) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut at = 3_000;
    let mut i = rng.random_range(0..kinds.len().max(1));
    while !kinds.is_empty() {
        let hold = rng.random_range(3_000..=8_000);
        if at + hold + 3_000 > duration_ms {
            break;
        }
        // Walk the kinds in a seeded order so that every kind shows up in a short run.
        let kind = kinds[i % kinds.len()];
        i += 1 + usize::from(rng.random_bool(0.3));
        steps.push(Step {
            at_ms: at,
            hold_ms: hold,
            fault: draw(kind, &mut rng),
        });
        at += hold + rng.random_range(2_000..=5_000);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let kinds = scenario("mixed").expect("mixed exists");
        let a = schedule(kinds, 120_000, 7);
        assert_eq!(a, schedule(kinds, 120_000, 7));
        assert_ne!(a, schedule(kinds, 120_000, 8));
        assert!(a.len() >= 8, "a two-minute run injects many faults: {a:?}");
    }

    #[test]
    fn faults_do_not_overlap_and_end_before_the_run_does() {
        for seed in 0..50 {
            let steps = schedule(scenario("partition").expect("exists"), 45_000, seed);
            assert!(!steps.is_empty());
            for w in steps.windows(2) {
                assert!(w[0].at_ms + w[0].hold_ms < w[1].at_ms, "{w:?}");
            }
            let last = steps.last().expect("non-empty");
            assert!(last.at_ms + last.hold_ms + 3_000 <= 45_000);
        }
    }

    #[test]
    fn a_group_scenario_uses_each_of_its_kinds_in_a_45_second_run() {
        let kinds = scenario("kill").expect("exists");
        for seed in 0..20 {
            let steps = schedule(kinds, 45_000, seed);
            let names: std::collections::BTreeSet<&str> = steps
                .iter()
                .map(|s| match s.fault {
                    Fault::KillOne { .. } => "one",
                    Fault::KillLeader => "leader",
                    Fault::KillMajority { .. } => "majority",
                    _ => "other",
                })
                .collect();
            assert!(names.len() >= 2, "seed {seed}: {steps:?}");
            assert!(!names.contains("other"));
        }
    }

    #[test]
    fn every_group_scenario_exists() {
        for name in ALL {
            assert!(scenario(name).is_some(), "{name}");
        }
        assert!(scenario("no-such").is_none());
    }
}
