//! [`StateStore`] in process memory, for the embedded mode: one mutex over plain maps, so
//! every method is atomic exactly like a Redis script. Nothing survives the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::board::Board;
use super::{
    Budget, Claim, ClaimSource, FailureRecorded, FenceReason, FinishedEntry, GiveUp, LeaderLease,
    Member, MemberRole, NotClaimable, RankClaim, RankDone, Registration, RestoredTrajectory,
    StateCounts, StateError, StateStore, StepAnnouncement, StreamCursor, VersionOpened, check,
};
use crate::types::{
    Lease, PolicyVersion, Prompt, PromptId, SegmentRef, StepId, TrajectoryId, TrajectoryState,
    TrajectoryStatus,
};

/// The memory state store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct MemoryStateStore {
    /// The run id, reported by [`StateStore::run_id`]; a store holds one run.
    run_id: String,
    /// Everything, behind one lock (operations are short and never await while holding it).
    inner: Mutex<Inner>,
}

/// A trajectory and its place in the registration order.
#[derive(Debug)]
struct Entry {
    /// The state as reported.
    state: TrajectoryState,
    /// Registration sequence number: the pending order.
    seq: u64,
}

/// The run's state; each index mirrors a Redis key of the Redis implementation.
#[derive(Debug, Default)]
struct Inner {
    /// Registered prompts.
    prompts: HashMap<PromptId, Prompt>,
    /// All trajectories.
    trajectories: HashMap<TrajectoryId, Entry>,
    /// Next registration sequence number.
    next_seq: u64,
    /// Pending trajectories by registration seq.
    pending: BTreeMap<u64, TrajectoryId>,
    /// Parked trajectories by (first version, member key); the member key breaks ties the way
    /// the Redis sorted set does.
    parked: BTreeSet<(PolicyVersion, String)>,
    /// Generating trajectories by (lease expiry, member key).
    leases: BTreeSet<(u64, String)>,
    /// Member key → id, for the two sets above.
    members: HashMap<String, TrajectoryId>,
    /// The finished stream.
    finished: Vec<FinishedEntry>,
    /// The current version's budget.
    budget: Option<Budget>,
    /// Heartbeats: role → id → expiry.
    heartbeats: HashMap<MemberRole, HashMap<String, u64>>,
    /// The leader lock's holder, if any (possibly expired).
    leader: Option<LeaderLease>,
    /// Last fencing token handed out.
    leader_token: u64,
    /// Finished, purged and dropped totals.
    finished_count: u64,
    purged_count: u64,
    dropped_count: u64,
    /// The step board.
    board: Board,
    /// Whether registrations and claims are served (see [`StateStore::initialised`]).
    initialised: bool,
}

/// The member key of a trajectory: `<sample>:<prompt>` as in Redis.
pub(super) fn member_key(id: &TrajectoryId) -> String {
    format!("{}:{}", id.sample, id.prompt)
}

/// Milliseconds since the Unix epoch on the process clock.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl MemoryStateStore {
    /// An empty, initialised store for run `run_id` (nothing was lost).
    pub fn new(run_id: impl Into<String>) -> Self {
        MemoryStateStore {
            run_id: run_id.into(),
            inner: Mutex::new(Inner {
                initialised: true,
                ..Inner::default()
            }),
        }
    }

    /// Refuses registrations and claims until the state is initialised.
    fn lock_initialised(&self) -> Result<MutexGuard<'_, Inner>, StateError> {
        let g = self.lock();
        if !g.initialised {
            return Err(StateError::NotInitialised {
                run: self.run_id.clone(),
            });
        }
        Ok(g)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied transition (every method
        // validates before it mutates), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn entry(&mut self, id: &TrajectoryId) -> Result<&mut Entry, StateError> {
        self.trajectories
            .get_mut(id)
            .ok_or_else(|| StateError::UnknownTrajectory(id.clone()))
    }

    /// Checks that `(owner, epoch)` is the live, current lease of `id`.
    fn fence(
        &mut self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        now: u64,
    ) -> Result<(), StateError> {
        let e = self.entry(id)?;
        let fenced = |reason| StateError::Fenced {
            id: id.clone(),
            reason,
        };
        let lease = e.state.lease.as_ref();
        let current = lease.map_or(0, |l| l.epoch);
        if current != epoch {
            return Err(fenced(FenceReason::StaleEpoch {
                given: epoch,
                current,
            }));
        }
        if e.state.status != TrajectoryStatus::Generating {
            return Err(fenced(FenceReason::NotGenerating(e.state.status)));
        }
        let lease = lease.expect("a generating trajectory has a lease");
        if lease.owner != owner {
            return Err(fenced(FenceReason::ForeignOwner {
                holder: lease.owner.clone(),
            }));
        }
        if lease.expires_at_ms <= now {
            return Err(fenced(FenceReason::Expired {
                expired_at_ms: lease.expires_at_ms,
            }));
        }
        Ok(())
    }

    /// Removes `id` from whichever queue holds it.
    fn unqueue(&mut self, id: &TrajectoryId) {
        let key = member_key(id);
        let e = &self.trajectories[id];
        match e.state.status {
            TrajectoryStatus::Pending => {
                self.pending.remove(&e.seq);
            }
            TrajectoryStatus::Parked => {
                self.parked
                    .remove(&(e.state.first_version.unwrap_or(0), key));
            }
            TrajectoryStatus::Generating => {
                if let Some(l) = &e.state.lease {
                    self.leases.remove(&(l.expires_at_ms, key));
                }
            }
            TrajectoryStatus::Finished | TrajectoryStatus::Purged | TrajectoryStatus::Dropped => {}
        }
    }

    /// Ends the lease of a fenced trajectory now and queues it as `release` does: pending
    /// without committed segments, parked with them.
    fn release(&mut self, id: &TrajectoryId, now: u64) -> TrajectoryStatus {
        self.unqueue(id);
        let key = member_key(id);
        let e = self.trajectories.get_mut(id).expect("fenced");
        // The lease record stays (its epoch is the fencing history) but ends now.
        if let Some(l) = e.state.lease.as_mut() {
            l.expires_at_ms = now;
        }
        let (seq, first) = (e.seq, e.state.first_version);
        e.state.status = match first {
            None => TrajectoryStatus::Pending,
            Some(_) => TrajectoryStatus::Parked,
        };
        let status = e.state.status;
        match first {
            None => {
                self.pending.insert(seq, id.clone());
            }
            Some(v) => {
                self.parked.insert((v, key));
            }
        }
        status
    }

    /// Stops `id` for good: `dropped`, out of every queue, its lease (if any) ended.
    fn stop(&mut self, id: &TrajectoryId, now: u64) {
        self.unqueue(id);
        let s = &mut self.trajectories.get_mut(id).expect("caller checked").state;
        s.status = TrajectoryStatus::Dropped;
        if let Some(l) = s.lease.as_mut() {
            l.expires_at_ms = l.expires_at_ms.min(now);
        }
        self.dropped_count += 1;
    }

    /// Appends a finished-stream entry for `id` (its state as it is now).
    fn push_finished(
        &mut self,
        id: &TrajectoryId,
        now: u64,
        reward: f32,
        gave_up: Option<GiveUp>,
    ) -> FinishedEntry {
        let s = &self.trajectories[id].state;
        let (tokens, first_version, last_version) = (s.tokens, s.first_version, s.last_version);
        // Cursors follow Redis stream ids: (ms, seq), strictly increasing.
        let cursor = match self.finished.last() {
            Some(last) if last.cursor.ms >= now => StreamCursor {
                ms: last.cursor.ms,
                seq: last.cursor.seq + 1,
            },
            _ => StreamCursor { ms: now, seq: 0 },
        };
        let entry = FinishedEntry {
            cursor,
            trajectory: id.clone(),
            reward,
            tokens,
            first_version,
            last_version,
            gave_up,
        };
        self.finished.push(entry.clone());
        entry
    }

    /// Gives `id` a new lease with the next epoch.
    fn take(
        &mut self,
        id: &TrajectoryId,
        owner: &str,
        ttl_ms: u64,
        now: u64,
        source: ClaimSource,
    ) -> Claim {
        self.unqueue(id);
        let expires_at_ms = now + ttl_ms;
        let e = self.trajectories.get_mut(id).expect("caller checked");
        let epoch = e.state.lease.as_ref().map_or(0, |l| l.epoch) + 1;
        e.state.status = TrajectoryStatus::Generating;
        e.state.lease = Some(Lease {
            owner: owner.to_owned(),
            epoch,
            expires_at_ms,
        });
        let state = e.state.clone();
        let key = member_key(id);
        self.leases.insert((expires_at_ms, key.clone()));
        self.members.insert(key, id.clone());
        Claim { state, source }
    }

    /// Sets the live lease of a fenced trajectory to expire at `expires_at_ms`.
    fn extend(&mut self, id: &TrajectoryId, expires_at_ms: u64) -> Lease {
        let key = member_key(id);
        let e = self.trajectories.get_mut(id).expect("caller fenced");
        let lease = e.state.lease.as_mut().expect("fenced lease");
        self.leases.remove(&(lease.expires_at_ms, key.clone()));
        lease.expires_at_ms = expires_at_ms;
        self.leases.insert((expires_at_ms, key));
        lease.clone()
    }

    fn live_leader(&self, now: u64) -> Option<&LeaderLease> {
        self.leader.as_ref().filter(|l| l.expires_at_ms > now)
    }

    /// Registers `prompt` (unless it is): trajectories in `restored` are parked with their
    /// segments (pending without) and keep their epoch; the others are pending.
    fn register(
        &mut self,
        prompt: &Prompt,
        restored: &[RestoredTrajectory],
        now: u64,
    ) -> Registration {
        if self.prompts.contains_key(&prompt.id) {
            return Registration::AlreadyRegistered;
        }
        self.prompts.insert(prompt.id.clone(), prompt.clone());
        for id in prompt.trajectory_ids() {
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut state = TrajectoryState {
                id: id.clone(),
                status: TrajectoryStatus::Pending,
                segments: Vec::new(),
                tokens: 0,
                first_version: None,
                last_version: None,
                retention: 0,
                lease: None,
                reward: None,
                failures: 0,
            };
            let key = member_key(&id);
            if let Some(t) = restored.iter().find(|t| t.sample == id.sample) {
                // An ended lease keeps the epoch history, as a released one does.
                state.lease = (t.epoch > 0).then(|| Lease {
                    owner: RESTORED_OWNER.to_owned(),
                    epoch: t.epoch,
                    expires_at_ms: now,
                });
                state.tokens = t.segments.iter().map(|s| u64::from(s.tokens)).sum();
                state.first_version = t.segments.first().map(|s| s.version);
                state.last_version = t.segments.last().map(|s| s.version);
                state.segments = t.segments.clone();
            }
            match state.first_version {
                Some(first) => {
                    state.status = TrajectoryStatus::Parked;
                    self.parked.insert((first, key.clone()));
                }
                None => {
                    self.pending.insert(seq, id.clone());
                }
            }
            self.members.insert(key, id.clone());
            self.trajectories.insert(id, Entry { state, seq });
        }
        Registration::Registered
    }
}

/// The owner recorded on a restored trajectory's ended lease (it holds the epoch history).
pub(super) const RESTORED_OWNER: &str = "rebuild";

#[async_trait]
impl StateStore for MemoryStateStore {
    fn run_id(&self) -> &str {
        &self.run_id
    }

    async fn register_prompt(&self, prompt: &Prompt) -> Result<Registration, StateError> {
        check::prompt(prompt)?;
        Ok(self.lock_initialised()?.register(prompt, &[], now_ms()))
    }

    async fn prompt(&self, id: &PromptId) -> Result<Option<Prompt>, StateError> {
        Ok(self.lock().prompts.get(id).cloned())
    }

    async fn trajectory(&self, id: &TrajectoryId) -> Result<Option<TrajectoryState>, StateError> {
        Ok(self.lock().trajectories.get(id).map(|e| e.state.clone()))
    }

    async fn claim_next(&self, owner: &str, ttl: Duration) -> Result<Option<Claim>, StateError> {
        check::name("owner", owner)?;
        let ttl_ms = check::ttl(ttl)?;
        let mut g = self.lock_initialised()?;
        let now = now_ms();
        let expired = g
            .leases
            .first()
            .filter(|(exp, _)| *exp <= now)
            .map(|(_, key)| (g.members[key].clone(), ClaimSource::Expired));
        let next = if let Some((_, key)) = g.parked.first() {
            Some((g.members[key].clone(), ClaimSource::Parked))
        } else if expired.is_some() {
            expired
        } else {
            g.pending
                .first_key_value()
                .map(|(_, id)| (id.clone(), ClaimSource::Pending))
        };
        Ok(next.map(|(id, source)| g.take(&id, owner, ttl_ms, now, source)))
    }

    async fn claim(
        &self,
        id: &TrajectoryId,
        owner: &str,
        ttl: Duration,
    ) -> Result<Claim, StateError> {
        check::name("owner", owner)?;
        let ttl_ms = check::ttl(ttl)?;
        let mut g = self.lock_initialised()?;
        let now = now_ms();
        let state = &g.entry(id)?.state;
        let source = match state.status {
            TrajectoryStatus::Pending => ClaimSource::Pending,
            TrajectoryStatus::Parked => ClaimSource::Parked,
            TrajectoryStatus::Generating => {
                let lease = state
                    .lease
                    .clone()
                    .expect("a generating trajectory has a lease");
                if lease.expires_at_ms > now {
                    return Err(StateError::NotClaimable {
                        id: id.clone(),
                        reason: NotClaimable::Held(lease),
                    });
                }
                ClaimSource::Expired
            }
            s @ (TrajectoryStatus::Finished
            | TrajectoryStatus::Purged
            | TrajectoryStatus::Dropped) => {
                return Err(StateError::NotClaimable {
                    id: id.clone(),
                    reason: NotClaimable::Done(s),
                });
            }
        };
        Ok(g.take(id, owner, ttl_ms, now, source))
    }

    async fn renew(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Lease, StateError> {
        let ttl_ms = check::ttl(ttl)?;
        let mut g = self.lock();
        let now = now_ms();
        g.fence(id, owner, epoch, now)?;
        Ok(g.extend(id, now + ttl_ms))
    }

    async fn release(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
    ) -> Result<TrajectoryStatus, StateError> {
        let mut g = self.lock();
        let now = now_ms();
        g.fence(id, owner, epoch, now)?;
        Ok(g.release(id, now))
    }

    async fn commit_segment(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        segment: &SegmentRef,
        ttl: Duration,
    ) -> Result<TrajectoryState, StateError> {
        let ttl_ms = check::ttl(ttl)?;
        check::segment(segment)?;
        let mut g = self.lock();
        let now = now_ms();
        g.fence(id, owner, epoch, now)?;
        let e = g.entry(id)?;
        let expected = e.state.segments.len() as u32;
        if segment.seq < expected {
            if e.state.segments[segment.seq as usize] != *segment {
                return Err(StateError::SegmentConflict {
                    id: id.clone(),
                    seq: segment.seq,
                });
            }
        } else if segment.seq > expected {
            return Err(StateError::SegmentOutOfOrder {
                id: id.clone(),
                given: segment.seq,
                expected,
            });
        } else {
            let s = &mut e.state;
            s.segments.push(segment.clone());
            s.tokens += u64::from(segment.tokens);
            s.first_version.get_or_insert(segment.version);
            s.last_version = Some(segment.version);
        }
        g.extend(id, now + ttl_ms);
        Ok(g.trajectories[id].state.clone())
    }

    async fn finish(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        reward: f32,
    ) -> Result<FinishedEntry, StateError> {
        check::reward(reward)?;
        let mut g = self.lock();
        let now = now_ms();
        g.fence(id, owner, epoch, now)?;
        g.unqueue(id);
        let s = &mut g.entry(id)?.state;
        s.status = TrajectoryStatus::Finished;
        s.reward = Some(reward);
        if let Some(l) = s.lease.as_mut() {
            l.expires_at_ms = now;
        }
        g.finished_count += 1;
        Ok(g.push_finished(id, now, reward, None))
    }

    async fn record_failure(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        give_up: &GiveUp,
        limit: u32,
    ) -> Result<FailureRecorded, StateError> {
        let mut g = self.lock();
        let now = now_ms();
        g.fence(id, owner, epoch, now)?;
        let failures = {
            let s = &mut g.entry(id)?.state;
            s.failures += 1;
            s.failures
        };
        if failures < limit {
            let status = g.release(id, now);
            return Ok(FailureRecorded::Released { status, failures });
        }
        g.stop(id, now);
        Ok(FailureRecorded::GaveUp(g.push_finished(
            id,
            now,
            0.0,
            Some(give_up.clone()),
        )))
    }

    async fn truncate(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        keep: u32,
    ) -> Result<TrajectoryState, StateError> {
        let mut g = self.lock();
        let now = now_ms();
        g.fence(id, owner, epoch, now)?;
        let s = &mut g.entry(id)?.state;
        s.segments.truncate(keep as usize);
        s.tokens = s.segments.iter().map(|r| u64::from(r.tokens)).sum();
        s.first_version = s.segments.first().map(|r| r.version);
        s.last_version = s.segments.last().map(|r| r.version);
        Ok(s.clone())
    }

    async fn close_group(
        &self,
        prompt: &PromptId,
        leader_token: u64,
    ) -> Result<Vec<TrajectoryId>, StateError> {
        let mut g = self.lock();
        let now = now_ms();
        let live = g.live_leader(now).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        let Some(k) = g.prompts.get(prompt).map(|p| p.group_size) else {
            return Ok(Vec::new());
        };
        let mut stopped = Vec::new();
        for sample in 0..k {
            let id = TrajectoryId {
                prompt: prompt.clone(),
                sample,
            };
            let status = g.trajectories[&id].state.status;
            // A purged trajectory is already stopped (and counted as purged).
            if matches!(
                status,
                TrajectoryStatus::Pending | TrajectoryStatus::Generating | TrajectoryStatus::Parked
            ) {
                g.stop(&id, now);
                stopped.push(id);
            }
        }
        Ok(stopped)
    }

    async fn open_version(
        &self,
        version: PolicyVersion,
        budget: u64,
        retention_limit: u32,
        leader_token: u64,
    ) -> Result<VersionOpened, StateError> {
        check::tokens("version", version)?;
        check::tokens("budget", budget)?;
        let mut g = self.lock();
        let live = g.live_leader(now_ms()).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        if let Some(b) = g.budget
            && version <= b.version
        {
            return Err(StateError::VersionNotNewer {
                requested: version,
                current: b.version,
            });
        }
        g.budget = Some(Budget {
            version,
            total: budget,
            remaining: budget,
        });
        let mut out = VersionOpened::default();
        for (first, key) in std::mem::take(&mut g.parked) {
            let id = g.members[&key].clone();
            let s = &mut g.trajectories.get_mut(&id).expect("indexed").state;
            s.retention += 1;
            if s.retention > retention_limit {
                s.status = TrajectoryStatus::Purged;
                g.purged_count += 1;
                out.purged.push(id);
            } else {
                out.retained += 1;
                g.parked.insert((first, key));
            }
        }
        Ok(out)
    }

    async fn regenerate(&self, id: &TrajectoryId, leader_token: u64) -> Result<(), StateError> {
        let mut g = self.lock();
        let live = g.live_leader(now_ms()).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        let e = g.entry(id)?;
        if e.state.status != TrajectoryStatus::Purged {
            return Err(StateError::NotPurged {
                id: id.clone(),
                status: e.state.status,
            });
        }
        let s = &mut e.state;
        s.status = TrajectoryStatus::Pending;
        s.segments.clear();
        s.tokens = 0;
        (s.first_version, s.last_version, s.reward) = (None, None, None);
        s.retention = 0;
        let seq = e.seq;
        g.pending.insert(seq, id.clone());
        g.purged_count -= 1;
        Ok(())
    }

    async fn current_version(&self) -> Result<Option<PolicyVersion>, StateError> {
        Ok(self.lock().budget.map(|b| b.version))
    }

    async fn budget(&self) -> Result<Option<Budget>, StateError> {
        Ok(self.lock().budget)
    }

    async fn reserve(&self, version: PolicyVersion, want: u64) -> Result<u64, StateError> {
        check::tokens("reservation", want)?;
        let mut g = self.lock();
        Ok(match g.budget.as_mut() {
            Some(b) if b.version == version => {
                let granted = want.min(b.remaining);
                b.remaining -= granted;
                granted
            }
            _ => 0,
        })
    }

    async fn widen_budget(
        &self,
        version: PolicyVersion,
        tokens: u64,
        leader_token: u64,
    ) -> Result<Option<Budget>, StateError> {
        check::tokens("widening", tokens)?;
        let mut g = self.lock();
        let live = g.live_leader(now_ms()).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        Ok(match g.budget.as_mut() {
            Some(b) if b.version == version => {
                b.total = (b.total + tokens).min(super::MAX_TOKENS);
                b.remaining = (b.remaining + tokens).min(b.total);
                Some(*b)
            }
            _ => None,
        })
    }

    async fn refund(&self, version: PolicyVersion, tokens: u64) -> Result<u64, StateError> {
        check::tokens("refund", tokens)?;
        let mut g = self.lock();
        Ok(match g.budget.as_mut() {
            Some(b) if b.version == version => {
                let credited = tokens.min(b.total - b.remaining);
                b.remaining += credited;
                credited
            }
            _ => 0,
        })
    }

    async fn read_finished(
        &self,
        after: StreamCursor,
        limit: usize,
    ) -> Result<Vec<FinishedEntry>, StateError> {
        let g = self.lock();
        let start = g.finished.partition_point(|e| e.cursor <= after);
        Ok(g.finished[start..].iter().take(limit).cloned().collect())
    }

    async fn trim_finished(
        &self,
        first_kept: StreamCursor,
        leader_token: u64,
    ) -> Result<u64, StateError> {
        let mut g = self.lock();
        let live = g.live_leader(now_ms()).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        let end = g.finished.partition_point(|e| e.cursor < first_kept);
        g.finished.drain(..end);
        Ok(end as u64)
    }

    async fn heartbeat(&self, role: MemberRole, id: &str, ttl: Duration) -> Result<(), StateError> {
        check::name("member id", id)?;
        let ttl_ms = check::ttl(ttl)?;
        let mut g = self.lock();
        let now = now_ms();
        let members = g.heartbeats.entry(role).or_default();
        members.retain(|_, exp| *exp > now);
        members.insert(id.to_owned(), now + ttl_ms);
        Ok(())
    }

    async fn leave(&self, role: MemberRole, id: &str) -> Result<(), StateError> {
        if let Some(m) = self.lock().heartbeats.get_mut(&role) {
            m.remove(id);
        }
        Ok(())
    }

    async fn live_members(&self, role: MemberRole) -> Result<Vec<Member>, StateError> {
        let g = self.lock();
        let now = now_ms();
        let mut live: Vec<Member> = g
            .heartbeats
            .get(&role)
            .into_iter()
            .flatten()
            .filter(|(_, exp)| **exp > now)
            .map(|(id, exp)| Member {
                id: id.clone(),
                expires_at_ms: *exp,
            })
            .collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn acquire_leader(
        &self,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Option<LeaderLease>, StateError> {
        check::name("candidate", candidate)?;
        let ttl_ms = check::ttl(ttl)?;
        let mut g = self.lock();
        let now = now_ms();
        if g.live_leader(now).is_some() {
            return Ok(None);
        }
        g.leader_token += 1;
        let lease = LeaderLease {
            holder: candidate.to_owned(),
            token: g.leader_token,
            expires_at_ms: now + ttl_ms,
        };
        g.leader = Some(lease.clone());
        Ok(Some(lease))
    }

    async fn renew_leader(
        &self,
        candidate: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<LeaderLease, StateError> {
        let ttl_ms = check::ttl(ttl)?;
        let mut g = self.lock();
        let now = now_ms();
        let live = g.live_leader(now).cloned();
        match g.leader.as_mut() {
            Some(l) if live.is_some() && l.holder == candidate && l.token == token => {
                l.expires_at_ms = now + ttl_ms;
                Ok(l.clone())
            }
            _ => Err(StateError::NotLeader {
                candidate: candidate.to_owned(),
                token,
                current: live,
            }),
        }
    }

    async fn release_leader(&self, candidate: &str, token: u64) -> Result<(), StateError> {
        let mut g = self.lock();
        let now = now_ms();
        match &g.leader {
            Some(l) if l.holder == candidate && l.token == token => {
                g.leader = None;
                Ok(())
            }
            _ => Err(StateError::NotLeader {
                candidate: candidate.to_owned(),
                token,
                current: g.live_leader(now).cloned(),
            }),
        }
    }

    async fn leader(&self) -> Result<Option<LeaderLease>, StateError> {
        Ok(self.lock().live_leader(now_ms()).cloned())
    }

    async fn counts(&self) -> Result<StateCounts, StateError> {
        let g = self.lock();
        let now = now_ms();
        Ok(StateCounts {
            prompts: g.prompts.len() as u64,
            pending: g.pending.len() as u64,
            generating: g.leases.len() as u64,
            lease_expired: g.leases.iter().take_while(|(exp, _)| *exp <= now).count() as u64,
            parked: g.parked.len() as u64,
            finished: g.finished_count,
            purged: g.purged_count,
            dropped: g.dropped_count,
        })
    }

    async fn announce_step(
        &self,
        announcement: &StepAnnouncement,
        leader_token: u64,
    ) -> Result<(), StateError> {
        let mut g = self.lock();
        let live = g.live_leader(now_ms()).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        g.board.announce(announcement)
    }

    async fn announced_step(&self) -> Result<Option<StepAnnouncement>, StateError> {
        Ok(self.lock().board.announced.clone())
    }

    async fn claim_rank(
        &self,
        step: StepId,
        trainer: &str,
        ttl: Duration,
    ) -> Result<Option<RankClaim>, StateError> {
        check::name("trainer", trainer)?;
        let ttl_ms = check::ttl(ttl)?;
        Ok(self.lock().board.claim(step, trainer, ttl_ms, now_ms()))
    }

    async fn renew_rank(
        &self,
        claim: &RankClaim,
        trainer: &str,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let ttl_ms = check::ttl(ttl)?;
        self.lock().board.renew(claim, trainer, ttl_ms, now_ms())
    }

    async fn complete_rank(
        &self,
        claim: &RankClaim,
        trainer: &str,
    ) -> Result<RankDone, StateError> {
        self.lock().board.complete(claim, trainer, now_ms())
    }

    async fn finish_step(
        &self,
        step: StepId,
        version_published: PolicyVersion,
    ) -> Result<(), StateError> {
        self.lock().board.finish(step, version_published)
    }

    async fn finished_step(&self) -> Result<Option<StepId>, StateError> {
        Ok(self.lock().board.finished)
    }

    async fn initialised(&self) -> Result<bool, StateError> {
        Ok(self.lock().initialised)
    }

    async fn mark_initialised(&self) -> Result<(), StateError> {
        self.lock().initialised = true;
        Ok(())
    }

    async fn restore_prompt(
        &self,
        prompt: &Prompt,
        trajectories: &[RestoredTrajectory],
        leader_token: u64,
    ) -> Result<Registration, StateError> {
        check::restored(prompt, trajectories)?;
        let mut g = self.lock();
        let now = now_ms();
        let live = g.live_leader(now).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        Ok(g.register(prompt, trajectories, now))
    }

    async fn restore_finished_step(
        &self,
        step: StepId,
        leader_token: u64,
    ) -> Result<(), StateError> {
        check::tokens("step", step)?;
        let mut g = self.lock();
        let live = g.live_leader(now_ms()).cloned();
        super::board::check_leader(live.as_ref(), leader_token)?;
        if g.board.finished.is_none_or(|f| f < step) {
            g.board.finished = Some(step);
        }
        Ok(())
    }

    async fn raise_leader_token(&self, floor: u64) -> Result<(), StateError> {
        check::tokens("leader token", floor)?;
        let mut g = self.lock();
        g.leader_token = g.leader_token.max(floor);
        Ok(())
    }

    async fn delete_run(&self) -> Result<u64, StateError> {
        let mut g = self.lock();
        let n = g.prompts.len() + g.trajectories.len() + g.finished.len();
        *g = Inner::default();
        Ok(n as u64)
    }
}
