//! Autopilot: the leader removes members it stopped hearing from (`--autopilot-dead-after-s`,
//! off by default), never leaving fewer voters than `--autopilot-min-voters`.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::Api;

/// What autopilot decides about one member in one round.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Heard from recently enough.
    Alive,
    /// Silent too long: remove it.
    Remove { silent_for: Duration },
    /// Silent too long, but removing this voter would leave too few.
    Keep {
        silent_for: Duration,
        voters_left: usize,
    },
}

/// Decides about a member silent for `silent_for`, with `voters` voters now (`voter`: whether
/// it is one of them).
pub(crate) fn verdict(
    silent_for: Duration,
    voter: bool,
    voters: usize,
    dead_after: Duration,
    min_voters: usize,
) -> Verdict {
    if silent_for < dead_after {
        return Verdict::Alive;
    }
    if voter && voters.saturating_sub(1) < min_voters {
        return Verdict::Keep {
            silent_for,
            voters_left: voters.saturating_sub(1),
        };
    }
    Verdict::Remove { silent_for }
}

impl Api {
    /// On the leader, every second: members silent for `dead_after` are removed (one per
    /// round, each with its id retired as `coffer cluster remove` does). A member the leader
    /// never heard from counts as silent from when this node saw it as leader. Returns at once
    /// when autopilot is off.
    pub async fn autopilot_loop(self) {
        let Some(dead_after) = self.autopilot.dead_after else {
            return;
        };
        let min_voters = self.autopilot.min_voters;
        tracing::info!(?dead_after, min_voters, "autopilot removes dead members");
        let mut unseen_since: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut kept_said: BTreeMap<u64, usize> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let s = self.node.status();
            if s.leader != Some(s.id) || s.fatal.is_some() {
                unseen_since.clear();
                continue;
            }
            let members = s
                .voters
                .keys()
                .map(|id| (*id, true))
                .chain(s.learners.keys().map(|id| (*id, false)))
                .filter(|(id, _)| *id != s.id);
            for (id, voter) in members {
                let silent_for = match s.last_contact.get(&id).copied().flatten() {
                    Some(d) => {
                        unseen_since.remove(&id);
                        d
                    }
                    None => unseen_since
                        .entry(id)
                        .or_insert_with(Instant::now)
                        .elapsed(),
                };
                match verdict(silent_for, voter, s.voters.len(), dead_after, min_voters) {
                    Verdict::Alive => {
                        kept_said.remove(&id);
                    }
                    Verdict::Keep {
                        silent_for,
                        voters_left,
                    } => {
                        if kept_said.insert(id, voters_left) != Some(voters_left) {
                            tracing::warn!(
                                member = id,
                                ?silent_for,
                                voters_left,
                                min_voters,
                                "autopilot keeps a dead voter: removing it would leave fewer voters than --autopilot-min-voters; replace it (docs/operations/replacing-a-node.md)"
                            );
                        }
                    }
                    Verdict::Remove { silent_for } => {
                        match self.remove_member(id).await {
                            Ok(index) => tracing::warn!(
                                member = id,
                                voter,
                                ?silent_for,
                                raft_index = index,
                                "autopilot removed a dead member; its id is retired"
                            ),
                            Err(e) => tracing::warn!(
                                member = id,
                                error = %e.message(),
                                "autopilot could not remove a dead member; trying again"
                            ),
                        }
                        unseen_since.remove(&id);
                        // The membership changed: decide again on the next status.
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: Duration = Duration::from_secs(60);

    #[test]
    fn a_member_is_removed_only_when_silent_long_enough_and_voters_remain() {
        let s = Duration::from_secs;
        assert_eq!(verdict(s(59), true, 5, DEAD, 3), Verdict::Alive);
        assert_eq!(
            verdict(s(60), true, 5, DEAD, 3),
            Verdict::Remove { silent_for: s(60) }
        );
        assert_eq!(
            verdict(s(90), true, 4, DEAD, 3),
            Verdict::Remove { silent_for: s(90) }
        );
        assert_eq!(
            verdict(s(90), true, 3, DEAD, 3),
            Verdict::Keep {
                silent_for: s(90),
                voters_left: 2
            }
        );
        // A learner counts for no quorum: removed whatever the voters.
        assert_eq!(
            verdict(s(90), false, 3, DEAD, 3),
            Verdict::Remove { silent_for: s(90) }
        );
    }
}
