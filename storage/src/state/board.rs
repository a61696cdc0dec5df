//! The step board: the leader announces each step's manifest
//! and world size; trainers claim ranks of it under leases with fencing epochs, complete them,
//! and the one trainer that completes the last rank (the *finisher*) publishes the weights and
//! marks the step finished.
//!
//! Rules, the same in every implementation:
//! - One step is live at a time. [`StateStore::announce_step`] is fenced by the leader lock
//!   (the token must be the live leader's) and is idempotent for the same announcement; a
//!   *newer* step can only be announced once the newest one is finished (its ranks would be
//!   lost otherwise); an older step, or a different announcement of the same step, is refused.
//! - [`StateStore::claim_rank`] hands out the lowest unclaimed rank, else the rank whose claim
//!   expired first (with a strictly higher epoch). `None` when every rank is held or done, or
//!   when `step` is not the announced, unfinished step.
//! - Renew and complete are fenced by (trainer, epoch) and the claim's expiry, like trajectory
//!   leases. A completed rank is never handed out again.
//! - `complete_rank` answers `all_done = true` to exactly one claim holder: the one completing
//!   the last rank. A retry of that same completion (same trainer and epoch) gets the same
//!   answer again, so a lost reply does not orphan the step.
//! - [`StateStore::finish_step`] needs every rank done and `version_published == step + 1`;
//!   it is idempotent.
//!
//! [`StateStore::announce_step`]: super::StateStore::announce_step
//! [`StateStore::claim_rank`]: super::StateStore::claim_rank
//! [`StateStore::finish_step`]: super::StateStore::finish_step

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{LeaderLease, StateError};
use crate::types::{PolicyVersion, StepId};

/// The most ranks a step can be announced with.
pub const MAX_WORLD_SIZE: u32 = 4096;

/// What the leader announced for a step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepAnnouncement {
    /// The step.
    pub step: StepId,
    /// Object key of the step's batch manifest (`storage::keys::step_manifest`).
    pub manifest_key: String,
    /// Ranks the step was cut for.
    pub world_size: u32,
}

/// A trainer's hold on one rank of a step (a lease like a trajectory's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RankClaim {
    /// The step.
    pub step: StepId,
    /// The rank, `< world_size`.
    pub rank: u32,
    /// Fencing epoch: strictly increases with each claim of this rank.
    pub epoch: u64,
}

/// The answer to [`super::StateStore::complete_rank`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankDone {
    /// True for exactly one caller: the one that completed the step's last rank. It becomes
    /// the step's finisher (sums the gradients, publishes the weights, calls `finish_step`).
    pub all_done: bool,
}

/// Why a rank write (renew, complete) was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RankFenceReason {
    /// The rank was claimed again since.
    StaleEpoch {
        /// The writer's epoch.
        given: u64,
        /// The rank's current epoch.
        current: u64,
    },
    /// The epoch matches but the trainer does not.
    ForeignOwner {
        /// The trainer recorded for that epoch.
        holder: String,
    },
    /// The claim expired; claim a rank again.
    Expired {
        /// When it expired (store clock, ms).
        expired_at_ms: u64,
    },
    /// Another claim of the rank already completed it.
    AlreadyDone,
    /// The step is not the announced one (a newer step replaced it, or it never was), or the
    /// rank is outside its world size.
    NotLive {
        /// The announced step, if any.
        announced: Option<StepId>,
    },
}

impl fmt::Display for RankFenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankFenceReason::StaleEpoch { given, current } => {
                write!(
                    f,
                    "stale rank epoch {given}, the current epoch is {current}"
                )
            }
            RankFenceReason::ForeignOwner { holder } => write!(f, "the claim belongs to {holder}"),
            RankFenceReason::Expired { expired_at_ms } => {
                write!(
                    f,
                    "the claim expired at {expired_at_ms} ms; claim a rank again"
                )
            }
            RankFenceReason::AlreadyDone => write!(f, "the rank is already completed"),
            RankFenceReason::NotLive { announced } => {
                write!(f, "not a rank of the live step (announced: {announced:?})")
            }
        }
    }
}

/// One rank's record on the board.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct RankSlot {
    /// The last claimant (empty before the first claim).
    pub owner: String,
    /// The last claim's epoch (0 before the first claim).
    pub epoch: u64,
    /// The last claim's expiry (store clock, ms).
    pub expires_at_ms: u64,
    /// Completed (by `owner` at `epoch`).
    pub done: bool,
}

/// The board of the memory store (the Redis store keeps the same fields in hashes).
#[derive(Clone, Debug, Default)]
pub(super) struct Board {
    /// The newest announcement.
    pub announced: Option<StepAnnouncement>,
    /// Its ranks.
    pub ranks: Vec<RankSlot>,
    /// The rank whose completion finished the step (the finisher's rank).
    pub last_rank: Option<u32>,
    /// The newest finished step.
    pub finished: Option<StepId>,
}

/// Checks an announcement's fields.
pub(super) fn check_announcement(a: &StepAnnouncement) -> Result<(), StateError> {
    if a.world_size == 0 || a.world_size > MAX_WORLD_SIZE {
        return Err(StateError::Invalid(format!(
            "step {}: world size must be 1..={MAX_WORLD_SIZE}, got {}",
            a.step, a.world_size
        )));
    }
    if a.manifest_key.is_empty() || a.manifest_key.len() > 1024 {
        return Err(StateError::Invalid(format!(
            "step {}: the manifest key must be 1..=1024 bytes",
            a.step
        )));
    }
    super::check::tokens("step", a.step)
}

impl Board {
    /// `announce_step` after the leader check.
    pub fn announce(&mut self, a: &StepAnnouncement) -> Result<(), StateError> {
        check_announcement(a)?;
        if let Some(cur) = &self.announced {
            if a.step == cur.step {
                if a == cur {
                    return Ok(());
                }
                return Err(StateError::StepConflict {
                    step: a.step,
                    reason: format!("it was announced differently: {cur:?}"),
                });
            }
            if a.step < cur.step {
                return Err(StateError::StepConflict {
                    step: a.step,
                    reason: format!("step {} is already announced", cur.step),
                });
            }
            if self.finished != Some(cur.step) {
                return Err(StateError::StepConflict {
                    step: a.step,
                    reason: format!("step {} is still training", cur.step),
                });
            }
        }
        self.announced = Some(a.clone());
        self.ranks = vec![RankSlot::default(); a.world_size as usize];
        self.last_rank = None;
        Ok(())
    }

    /// `claim_rank`.
    pub fn claim(
        &mut self,
        step: StepId,
        trainer: &str,
        ttl_ms: u64,
        now: u64,
    ) -> Option<RankClaim> {
        let live = self.announced.as_ref()?.step == step && self.finished.is_none_or(|f| f < step);
        if !live {
            return None;
        }
        let rank = self
            .ranks
            .iter()
            .position(|r| !r.done && r.epoch == 0)
            .or_else(|| {
                self.ranks
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| !r.done && r.expires_at_ms <= now)
                    .min_by_key(|(i, r)| (r.expires_at_ms, *i))
                    .map(|(i, _)| i)
            })?;
        let slot = &mut self.ranks[rank];
        slot.epoch += 1;
        slot.owner = trainer.to_owned();
        slot.expires_at_ms = now + ttl_ms;
        Some(RankClaim {
            step,
            rank: rank as u32,
            epoch: slot.epoch,
        })
    }

    /// Fences `(c, trainer)`; `allow_done_retry` lets the same claim's completion be retried.
    fn fence(
        &mut self,
        c: &RankClaim,
        trainer: &str,
        now: u64,
        allow_done_retry: bool,
    ) -> Result<&mut RankSlot, StateError> {
        let fenced = |reason| StateError::RankFenced {
            step: c.step,
            rank: c.rank,
            reason,
        };
        let announced = self.announced.as_ref().map(|a| a.step);
        if announced != Some(c.step) || c.rank as usize >= self.ranks.len() {
            return Err(fenced(RankFenceReason::NotLive { announced }));
        }
        let slot = &mut self.ranks[c.rank as usize];
        if slot.epoch != c.epoch {
            return Err(fenced(RankFenceReason::StaleEpoch {
                given: c.epoch,
                current: slot.epoch,
            }));
        }
        if slot.owner != trainer {
            return Err(fenced(RankFenceReason::ForeignOwner {
                holder: slot.owner.clone(),
            }));
        }
        if slot.done {
            if allow_done_retry {
                return Ok(slot);
            }
            return Err(fenced(RankFenceReason::AlreadyDone));
        }
        if slot.expires_at_ms <= now {
            return Err(fenced(RankFenceReason::Expired {
                expired_at_ms: slot.expires_at_ms,
            }));
        }
        Ok(slot)
    }

    /// `renew_rank`.
    pub fn renew(
        &mut self,
        c: &RankClaim,
        trainer: &str,
        ttl_ms: u64,
        now: u64,
    ) -> Result<(), StateError> {
        let slot = self.fence(c, trainer, now, false)?;
        slot.expires_at_ms = now + ttl_ms;
        Ok(())
    }

    /// `complete_rank`.
    pub fn complete(
        &mut self,
        c: &RankClaim,
        trainer: &str,
        now: u64,
    ) -> Result<RankDone, StateError> {
        let slot = self.fence(c, trainer, now, true)?;
        if slot.done {
            // A retry of this very completion: the same answer as the first time.
            return Ok(RankDone {
                all_done: self.last_rank == Some(c.rank),
            });
        }
        slot.done = true;
        slot.expires_at_ms = now;
        let all_done = self.ranks.iter().all(|r| r.done);
        if all_done {
            self.last_rank = Some(c.rank);
        }
        Ok(RankDone { all_done })
    }

    /// `finish_step`.
    pub fn finish(&mut self, step: StepId, version: PolicyVersion) -> Result<(), StateError> {
        check_finish(step, version)?;
        if self.finished.is_some_and(|f| f >= step) {
            return Ok(());
        }
        let conflict = |reason: String| StateError::StepConflict { step, reason };
        match &self.announced {
            Some(a) if a.step == step => {}
            other => {
                return Err(conflict(format!(
                    "it is not the announced step ({:?})",
                    other.as_ref().map(|a| a.step)
                )));
            }
        }
        let left = self.ranks.iter().filter(|r| !r.done).count();
        if left > 0 {
            return Err(conflict(format!("{left} rank(s) are not completed")));
        }
        self.finished = Some(step);
        Ok(())
    }
}

/// `finish_step`'s argument rule: step s publishes version s + 1.
pub(super) fn check_finish(step: StepId, version: PolicyVersion) -> Result<(), StateError> {
    super::check::tokens("step", step)?;
    if step.checked_add(1) != Some(version) {
        return Err(StateError::Invalid(format!(
            "step {step} publishes version {}, not {version}",
            step + 1
        )));
    }
    Ok(())
}

/// The leader-token check of every leader write (`announce_step`, `open_version`,
/// `regenerate`): the token must be the live leader's.
pub(super) fn check_leader(live: Option<&LeaderLease>, token: u64) -> Result<(), StateError> {
    match live {
        Some(l) if l.token == token => Ok(()),
        other => Err(StateError::LeaderFenced {
            token,
            current: other.cloned(),
        }),
    }
}
