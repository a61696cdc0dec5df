//! The one conformance suite every [`StateStore`] must pass (DESIGN.md §9).
//!
//! Each `pub async fn` is one test; [`crate::state_store_conformance!`] turns all of them into
//! `#[tokio::test]`s for a [`StoreFactory`]. Expiry is tested with short leases and sleeps past
//! them; nothing asserts how long anything took. Assertions that something is still *live*
//! only use long leases, so a slow machine cannot make them flaky.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Barrier;

use super::{
    ClaimSource, FailureRecorded, FenceReason, GiveUp, MAX_TOKENS, MemberRole, NotClaimable,
    RankFenceReason, Registration, RestoredTrajectory, StateError, StateStore, StepAnnouncement,
    StreamCursor,
};
use crate::ledger::DropReason;
use crate::testkit::{prompt, trajectory as tid};
use crate::types::{PromptId, SegmentRef, TrajectoryId, TrajectoryStatus};

/// Makes stores for the suite.
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// A store over a new, empty run that no other test uses. Panics with a message naming
    /// the backend (and how to start it) when it is unreachable: the test must fail, not skip.
    async fn fresh(&self) -> Arc<dyn StateStore>;

    /// Another handle on `store`'s run, with its own connection where the backend has one:
    /// what a second process joining the run would open.
    async fn attach(&self, store: &Arc<dyn StateStore>) -> Arc<dyn StateStore>;
}

/// A lease that outlives any test.
const LONG: Duration = Duration::from_secs(60);
/// A lease meant to expire: tests sleep [`PAST_SHORT`] before relying on its expiry.
const SHORT: Duration = Duration::from_millis(300);
/// Comfortably longer than [`SHORT`].
const PAST_SHORT: Duration = Duration::from_millis(700);

/// Racers in the concurrency tests.
const RACERS: usize = 16;

fn seg(id: &TrajectoryId, seq: u32, tokens: u32, version: u64) -> SegmentRef {
    SegmentRef {
        seq,
        key: format!("segments/{id}/{seq}"),
        tokens,
        version,
    }
}

/// Registration stores the prompt and K pending trajectories, once, even when raced.
pub async fn registration_is_idempotent(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let p = prompt("p/1 with spaces:and:colons", 3);
    assert_eq!(
        store.register_prompt(&p).await.unwrap(),
        Registration::Registered
    );
    assert_eq!(store.prompt(&p.id).await.unwrap(), Some(p.clone()));
    for id in p.trajectory_ids() {
        let s = store.trajectory(&id).await.unwrap().expect("registered");
        assert_eq!(s.id, id);
        assert_eq!(s.status, TrajectoryStatus::Pending);
        assert_eq!((s.tokens, s.retention, s.segments.len()), (0, 0, 0));
        assert_eq!(
            (s.first_version, s.last_version, s.lease, s.reward),
            (None, None, None, None)
        );
    }
    let mut again = p.clone();
    again.group_size = 5;
    assert_eq!(
        store.register_prompt(&again).await.unwrap(),
        Registration::AlreadyRegistered
    );
    assert_eq!(
        store.prompt(&p.id).await.unwrap(),
        Some(p.clone()),
        "nothing overwritten"
    );
    assert!(store.trajectory(&tid(&p.id.0, 3)).await.unwrap().is_none());
    assert!(
        store
            .prompt(&PromptId("nope".into()))
            .await
            .unwrap()
            .is_none()
    );

    // A redelivered prompt raced by many workers registers exactly once.
    let q = prompt("raced", 4);
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let (s, q, b) = (f.attach(&store).await, q.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            s.register_prompt(&q).await.unwrap()
        }));
    }
    let mut registered = 0;
    for t in tasks {
        registered += usize::from(t.await.unwrap() == Registration::Registered);
    }
    assert_eq!(registered, 1);
    let c = store.counts().await.unwrap();
    assert_eq!((c.prompts, c.pending, c.generating), (2, 7, 0));
}

/// Claims take parked trajectories first (oldest first version first), then pending ones in
/// registration order; a trajectory released before any segment keeps its place.
pub async fn claim_order_parked_first_then_pending(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    for p in ["a", "b", "c", "d"] {
        store.register_prompt(&prompt(p, 1)).await.unwrap();
    }
    // Park a (first version 5) and b (first version 3).
    for (p, version) in [("a", 5), ("b", 3)] {
        let id = tid(p, 0);
        let claim = store.claim(&id, "setup", LONG).await.unwrap();
        assert_eq!(claim.source, ClaimSource::Pending);
        let epoch = claim.lease().epoch;
        store
            .commit_segment(&id, "setup", epoch, &seg(&id, 0, 10, version), LONG)
            .await
            .unwrap();
        let status = store.release(&id, "setup", epoch).await.unwrap();
        assert_eq!(status, TrajectoryStatus::Parked);
    }
    let c = store.counts().await.unwrap();
    assert_eq!((c.parked, c.pending, c.generating), (2, 2, 0));

    let next = |owner: &'static str| {
        let store = store.clone();
        async move { store.claim_next(owner, LONG).await.unwrap() }
    };
    let first = next("w").await.expect("b is parked");
    assert_eq!(
        (first.state.id.clone(), first.source),
        (tid("b", 0), ClaimSource::Parked)
    );
    assert_eq!(
        first.state.segments,
        vec![seg(&tid("b", 0), 0, 10, 3)],
        "resume from committed"
    );
    assert_eq!(first.lease().epoch, 2, "second claim of b");
    let second = next("w").await.expect("a is parked");
    assert_eq!(
        (second.state.id.clone(), second.source),
        (tid("a", 0), ClaimSource::Parked)
    );
    let third = next("w").await.expect("c is pending");
    assert_eq!(
        (third.state.id.clone(), third.source),
        (tid("c", 0), ClaimSource::Pending)
    );
    assert_eq!(third.state.status, TrajectoryStatus::Generating);
    assert_eq!(third.lease().owner, "w");
    assert_eq!(third.lease().epoch, 1);

    // Released before any segment: back to pending, ahead of d.
    let status = store.release(&tid("c", 0), "w", 1).await.unwrap();
    assert_eq!(status, TrajectoryStatus::Pending);
    let again = next("v").await.expect("c is pending again");
    assert_eq!(
        (again.state.id.clone(), again.lease().epoch),
        (tid("c", 0), 2)
    );
    let last = next("v").await.expect("d is pending");
    assert_eq!(last.state.id, tid("d", 0));
    assert!(
        next("v").await.is_none(),
        "everything is under a live lease"
    );
    let c = store.counts().await.unwrap();
    assert_eq!(
        (c.parked, c.pending, c.generating, c.lease_expired),
        (0, 0, 4, 0)
    );
}

/// Segments are contiguous, update tokens and versions, and a retried commit is idempotent.
pub async fn segment_commit_updates_state(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    store.register_prompt(&prompt("p", 2)).await.unwrap();
    let id = tid("p", 1);
    let epoch = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;

    let s0 = seg(&id, 0, 100, 7);
    let s1 = seg(&id, 1, 50, 8);
    store
        .commit_segment(&id, "w", epoch, &s0, LONG)
        .await
        .unwrap();
    let state = store
        .commit_segment(&id, "w", epoch, &s1, LONG)
        .await
        .unwrap();
    assert_eq!(state.segments, vec![s0.clone(), s1.clone()]);
    assert_eq!(
        (state.tokens, state.first_version, state.last_version),
        (150, Some(7), Some(8))
    );

    // A retried commit of the same segment changes nothing.
    let retried = store
        .commit_segment(&id, "w", epoch, &s1, LONG)
        .await
        .unwrap();
    assert_eq!(retried.tokens, 150);
    assert_eq!(retried.segments.len(), 2);
    // The same seq with other content is a conflict; a gap is out of order.
    let other = SegmentRef {
        tokens: 51,
        ..s1.clone()
    };
    let err = store
        .commit_segment(&id, "w", epoch, &other, LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StateError::SegmentConflict { seq: 1, .. }),
        "{err}"
    );
    let gap = seg(&id, 3, 10, 8);
    let err = store
        .commit_segment(&id, "w", epoch, &gap, LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StateError::SegmentOutOfOrder {
                given: 3,
                expected: 2,
                ..
            }
        ),
        "{err}"
    );

    let entry = store.finish(&id, "w", epoch, 0.75).await.unwrap();
    assert_eq!(
        (entry.trajectory.clone(), entry.reward, entry.tokens),
        (id.clone(), 0.75, 150)
    );
    assert_eq!(
        (entry.first_version, entry.last_version),
        (Some(7), Some(8))
    );
    let state = store.trajectory(&id).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.reward, state.tokens),
        (TrajectoryStatus::Finished, Some(0.75), 150)
    );
    assert_eq!(
        state.lease.as_ref().map(|l| l.epoch),
        Some(epoch),
        "the lease record stays"
    );

    // Finished is final: no more writes, no claims.
    let s2 = seg(&id, 2, 10, 9);
    let err = store
        .commit_segment(&id, "w", epoch, &s2, LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Fenced {
                reason: FenceReason::NotGenerating(TrajectoryStatus::Finished),
                ..
            }
        ),
        "{err}"
    );
    let err = store.claim(&id, "x", LONG).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::NotClaimable {
                reason: NotClaimable::Done(TrajectoryStatus::Finished),
                ..
            }
        ),
        "{err}"
    );
    let c = store.counts().await.unwrap();
    assert_eq!((c.finished, c.pending, c.generating), (1, 1, 0));
}

/// A writer whose lease expired, or whose trajectory was claimed again, is fenced out; the new
/// holder resumes from the last committed segment.
pub async fn stale_epoch_writer_is_fenced(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    store.register_prompt(&prompt("p", 1)).await.unwrap();
    let id = tid("p", 0);
    let a = store.claim_next("a", LONG).await.unwrap().expect("pending");
    let ea = a.lease().epoch;
    store
        .commit_segment(&id, "a", ea, &seg(&id, 0, 10, 1), LONG)
        .await
        .unwrap();
    // Shorten the lease, and sleep past it.
    store.renew(&id, "a", ea, SHORT).await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;

    let err = store
        .commit_segment(&id, "a", ea, &seg(&id, 1, 10, 1), LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Fenced {
                reason: FenceReason::Expired { .. },
                ..
            }
        ),
        "{err}"
    );
    let err = store.renew(&id, "a", ea, LONG).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Fenced {
                reason: FenceReason::Expired { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.counts().await.unwrap().lease_expired, 1);

    let b = store
        .claim_next("b", LONG)
        .await
        .unwrap()
        .expect("expired lease");
    let eb = b.lease().epoch;
    assert_eq!(b.source, ClaimSource::Expired);
    assert!(eb > ea, "a steal gets a higher epoch ({eb} > {ea})");
    assert_eq!(b.state.segments, vec![seg(&id, 0, 10, 1)]);

    // Every write of the old holder is rejected as stale.
    let stale = |err: StateError| {
        assert!(
            matches!(err, StateError::Fenced { reason: FenceReason::StaleEpoch { given, current }, .. } if given == ea && current == eb),
            "{err}"
        )
    };
    stale(
        store
            .commit_segment(&id, "a", ea, &seg(&id, 1, 99, 1), LONG)
            .await
            .unwrap_err(),
    );
    stale(store.renew(&id, "a", ea, LONG).await.unwrap_err());
    stale(store.finish(&id, "a", ea, 1.0).await.unwrap_err());
    stale(store.release(&id, "a", ea).await.unwrap_err());
    // The right epoch with the wrong owner is refused too.
    let err = store.renew(&id, "c", eb, LONG).await.unwrap_err();
    assert!(
        matches!(&err, StateError::Fenced { reason: FenceReason::ForeignOwner { holder }, .. } if holder == "b"),
        "{err}"
    );

    let state = store
        .commit_segment(&id, "b", eb, &seg(&id, 1, 20, 2), LONG)
        .await
        .unwrap();
    assert_eq!(state.tokens, 30, "nothing of the stale writer counted");
    assert_eq!(state.segments.len(), 2);
    store.finish(&id, "b", eb, 1.0).await.unwrap();
    let err = store.release(&id, "b", eb).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Fenced {
                reason: FenceReason::NotGenerating(_),
                ..
            }
        ),
        "{err}"
    );
}

/// Only expired leases are stolen, after pending work, and each steal raises the epoch.
pub async fn expired_lease_is_stolen_with_higher_epoch(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    store.register_prompt(&prompt("live", 1)).await.unwrap();
    store.register_prompt(&prompt("dies", 1)).await.unwrap();
    let live = store.claim(&tid("live", 0), "a", LONG).await.unwrap();
    let dies = store.claim(&tid("dies", 0), "a", SHORT).await.unwrap();
    assert_eq!((live.lease().epoch, dies.lease().epoch), (1, 1));

    let err = store.claim(&tid("live", 0), "b", LONG).await.unwrap_err();
    assert!(
        matches!(&err, StateError::NotClaimable { reason: NotClaimable::Held(l), .. } if l.owner == "a" && l.epoch == 1),
        "{err}"
    );
    store.renew(&tid("live", 0), "a", 1, LONG).await.unwrap();

    tokio::time::sleep(PAST_SHORT).await;
    // A dead holder's trajectory resumes before any new pending work.
    store.register_prompt(&prompt("fresh", 1)).await.unwrap();
    let c = store.claim_next("b", LONG).await.unwrap().unwrap();
    assert_eq!(
        (c.state.id.clone(), c.source),
        (tid("dies", 0), ClaimSource::Expired)
    );
    assert_eq!(c.lease().epoch, 2);
    let fresh = store.claim_next("b", LONG).await.unwrap().unwrap();
    assert_eq!(
        (fresh.state.id, fresh.source),
        (tid("fresh", 0), ClaimSource::Pending)
    );
    assert!(
        store.claim_next("b", LONG).await.unwrap().is_none(),
        "'live' is still held"
    );

    // A specific claim of an expired lease is a steal as well.
    store.renew(&tid("dies", 0), "b", 2, SHORT).await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    let c = store.claim(&tid("dies", 0), "c", LONG).await.unwrap();
    assert_eq!(
        (c.source, c.lease().epoch, c.lease().owner.as_str()),
        (ClaimSource::Expired, 3, "c")
    );
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.generating, counts.lease_expired), (3, 0));
}

/// Many claimers race for one trajectory (specific claim, next claim, and a steal): exactly
/// one wins each time; racing over many trajectories, each is claimed exactly once.
pub async fn concurrent_claimers_exactly_one_wins(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let mut handles = Vec::new();
    for _ in 0..RACERS {
        handles.push(f.attach(&store).await);
    }

    // Racing for one specific trajectory.
    store.register_prompt(&prompt("one", 1)).await.unwrap();
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for (i, s) in handles.iter().enumerate() {
        let (s, b) = (s.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            s.claim(&tid("one", 0), &format!("w{i}"), LONG).await
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => winners.push(c.lease().clone()),
            Err(StateError::NotClaimable {
                reason: NotClaimable::Held(_),
                ..
            }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claimer wins: {winners:?}");
    assert_eq!(winners[0].epoch, 1);
    let held = store
        .trajectory(&tid("one", 0))
        .await
        .unwrap()
        .unwrap()
        .lease
        .unwrap();
    assert_eq!(held, winners[0]);

    // Racing claim_next for one pending trajectory.
    store.register_prompt(&prompt("two", 1)).await.unwrap();
    let mut tasks = Vec::new();
    for (i, s) in handles.iter().enumerate() {
        let (s, b) = (s.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            s.claim_next(&format!("w{i}"), LONG).await.unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap());
    }
    assert_eq!(got.len(), 1, "exactly one claim_next gets it");
    assert_eq!(got[0].state.id, tid("two", 0));

    // Racing to steal one expired lease.
    store.register_prompt(&prompt("three", 1)).await.unwrap();
    store.claim(&tid("three", 0), "dead", SHORT).await.unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    let mut tasks = Vec::new();
    for (i, s) in handles.iter().enumerate() {
        let (s, b) = (s.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            s.claim_next(&format!("w{i}"), LONG).await.unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap());
    }
    assert_eq!(got.len(), 1, "exactly one steals it");
    assert_eq!(
        (got[0].source, got[0].lease().epoch),
        (ClaimSource::Expired, 2)
    );

    // Draining many trajectories: each is claimed exactly once.
    for p in 0..8 {
        store
            .register_prompt(&prompt(&format!("many{p}"), 4))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for (i, s) in handles.iter().enumerate() {
        let (s, b) = (s.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let mut mine = Vec::new();
            while let Some(c) = s.claim_next(&format!("w{i}"), LONG).await.unwrap() {
                mine.push(c.state.id);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(
        (all.len(), unique.len()),
        (32, 32),
        "each of 32 claimed exactly once"
    );
}

/// Reservations never overdraw the budget, even raced; refunds never exceed what was opened;
/// old versions get nothing.
pub async fn budget_reserve_refund_never_overdraws(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    assert_eq!(store.current_version().await.unwrap(), None);
    assert_eq!(store.budget().await.unwrap(), None);
    assert_eq!(
        store.reserve(0, 10).await.unwrap(),
        0,
        "no version open yet"
    );

    let lt = store
        .acquire_leader("c", LONG)
        .await
        .unwrap()
        .unwrap()
        .token;
    store.open_version(1, 1000, 2, lt).await.unwrap();
    assert_eq!(store.current_version().await.unwrap(), Some(1));
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let (s, b) = (f.attach(&store).await, barrier.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let (mut granted, mut refunded) = (0u64, 0u64);
            loop {
                let g = s.reserve(1, 7).await.unwrap();
                assert!(g <= 7);
                if g == 0 {
                    break;
                }
                granted += g;
                // Use some, refund the rest now and then.
                if g == 7 && granted % 3 == 0 {
                    refunded += s.refund(1, 2).await.unwrap();
                }
            }
            (granted, refunded)
        }));
    }
    let (mut granted, mut refunded) = (0, 0);
    for t in tasks {
        let (g, r) = t.await.unwrap();
        granted += g;
        refunded += r;
    }
    assert_eq!(granted - refunded, 1000, "the whole budget, never more");
    let b = store.budget().await.unwrap().unwrap();
    assert_eq!((b.version, b.total, b.remaining), (1, 1000, 0));
    assert_eq!(store.reserve(1, 5).await.unwrap(), 0, "spent");

    assert_eq!(store.refund(1, 50).await.unwrap(), 50);
    assert_eq!(
        store.reserve(1, 80).await.unwrap(),
        50,
        "min(want, remaining)"
    );
    assert_eq!(
        store.refund(1, 5000).await.unwrap(),
        1000,
        "capped at the total"
    );
    assert_eq!(store.budget().await.unwrap().unwrap().remaining, 1000);

    store.open_version(2, 300, 2, lt).await.unwrap();
    assert_eq!(
        store.reserve(1, 10).await.unwrap(),
        0,
        "version 1 is closed"
    );
    assert_eq!(
        store.refund(1, 10).await.unwrap(),
        0,
        "refund to a closed version is dropped"
    );
    assert_eq!(store.reserve(2, 1000).await.unwrap(), 300);
    let err = store.open_version(2, 300, 2, lt).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::VersionNotNewer {
                requested: 2,
                current: 2
            }
        ),
        "{err}"
    );
    let err = store.open_version(1, 300, 2, lt).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::VersionNotNewer {
                requested: 1,
                current: 2
            }
        ),
        "{err}"
    );
    assert_eq!(store.current_version().await.unwrap(), Some(2));
}

/// Opening a version bumps the retention of parked trajectories only, and purges those past σ.
pub async fn open_version_bumps_retention_and_purges(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let lt = store
        .acquire_leader("c", LONG)
        .await
        .unwrap()
        .unwrap()
        .token;
    store.open_version(0, 1000, 1, lt).await.unwrap();
    for p in ["a", "b", "c"] {
        store.register_prompt(&prompt(p, 1)).await.unwrap();
    }
    let park = |p: &'static str, version: u64| {
        let store = store.clone();
        async move {
            let id = tid(p, 0);
            let e = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
            store
                .commit_segment(&id, "w", e, &seg(&id, 0, 5, version), LONG)
                .await
                .unwrap();
            assert_eq!(
                store.release(&id, "w", e).await.unwrap(),
                TrajectoryStatus::Parked
            );
        }
    };
    park("a", 0).await;
    park("b", 0).await;

    let opened = store.open_version(1, 1000, 1, lt).await.unwrap();
    assert_eq!((opened.retained, opened.purged.len()), (2, 0));
    for p in ["a", "b"] {
        assert_eq!(
            store
                .trajectory(&tid(p, 0))
                .await
                .unwrap()
                .unwrap()
                .retention,
            1
        );
    }
    // a resumes (generating: not bumped), b stays parked, c is pending (not bumped).
    let a = store.claim(&tid("a", 0), "w", LONG).await.unwrap();
    assert_eq!(a.source, ClaimSource::Parked);
    let opened = store.open_version(2, 1000, 1, lt).await.unwrap();
    assert_eq!(
        (opened.retained, opened.purged.clone()),
        (0, vec![tid("b", 0)])
    );
    let b = store.trajectory(&tid("b", 0)).await.unwrap().unwrap();
    assert_eq!((b.status, b.retention), (TrajectoryStatus::Purged, 2));
    let a_state = store.trajectory(&tid("a", 0)).await.unwrap().unwrap();
    assert_eq!(
        (a_state.status, a_state.retention),
        (TrajectoryStatus::Generating, 1)
    );
    assert_eq!(
        store
            .trajectory(&tid("c", 0))
            .await
            .unwrap()
            .unwrap()
            .retention,
        0
    );
    let err = store.claim(&tid("b", 0), "w", LONG).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::NotClaimable {
                reason: NotClaimable::Done(TrajectoryStatus::Purged),
                ..
            }
        ),
        "{err}"
    );

    // a parks again and outlives σ at the next version.
    assert_eq!(
        store
            .release(&tid("a", 0), "w", a.lease().epoch)
            .await
            .unwrap(),
        TrajectoryStatus::Parked
    );
    let opened = store.open_version(3, 1000, 1, lt).await.unwrap();
    assert_eq!(opened.purged, vec![tid("a", 0)]);
    let c = store.counts().await.unwrap();
    assert_eq!((c.purged, c.parked, c.pending), (2, 0, 1));
    // Purged trajectories are never handed out again.
    let next = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(next.state.id, tid("c", 0));
    assert!(store.claim_next("w", LONG).await.unwrap().is_none());

    // Unless regenerated from scratch: pending again, nothing committed, a fresh epoch.
    let err = store.regenerate(&tid("c", 0), lt).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::NotPurged {
                status: TrajectoryStatus::Generating,
                ..
            }
        ),
        "{err}"
    );
    store.regenerate(&tid("b", 0), lt).await.unwrap();
    let b = store.trajectory(&tid("b", 0)).await.unwrap().unwrap();
    assert_eq!(
        (b.status, b.tokens, b.retention),
        (TrajectoryStatus::Pending, 0, 0)
    );
    assert_eq!(
        (b.segments.len(), b.first_version, b.last_version),
        (0, None, None)
    );
    let c = store.counts().await.unwrap();
    assert_eq!((c.purged, c.pending), (1, 1));
    let again = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(
        (again.state.id.clone(), again.source),
        (tid("b", 0), ClaimSource::Pending)
    );
    assert_eq!(again.lease().epoch, 2, "the epoch history is kept");
    let err = store.regenerate(&tid("ghost", 0), lt).await.unwrap_err();
    assert!(matches!(err, StateError::UnknownTrajectory(_)), "{err}");
}

/// The finished stream is read after a cursor, so a consumer resumes where it left off, even
/// from a new connection.
pub async fn finished_stream_resumes_from_cursor(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    assert!(
        store
            .read_finished(StreamCursor::START, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let mut written = Vec::new();
    for i in 0..5u32 {
        let p = format!("p{i}");
        store.register_prompt(&prompt(&p, 1)).await.unwrap();
        let id = tid(&p, 0);
        let e = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
        store
            .commit_segment(&id, "w", e, &seg(&id, 0, 10 + i, 4), LONG)
            .await
            .unwrap();
        written.push(store.finish(&id, "w", e, i as f32 / 4.0).await.unwrap());
    }
    for pair in written.windows(2) {
        assert!(pair[0].cursor < pair[1].cursor, "cursors increase");
    }

    let head = store.read_finished(StreamCursor::START, 2).await.unwrap();
    assert_eq!(head, written[..2].to_vec());
    assert_eq!(
        (head[1].trajectory.clone(), head[1].reward, head[1].tokens),
        (tid("p1", 0), 0.25, 11)
    );
    assert_eq!(
        (head[1].first_version, head[1].last_version),
        (Some(4), Some(4))
    );

    // The consumer stores the cursor as text (e.g. in the ledger) and resumes after a restart.
    let saved = head[1].cursor.to_string();
    let resumed = f.attach(&store).await;
    let cursor: StreamCursor = saved.parse().unwrap();
    assert_eq!(cursor, head[1].cursor);
    let rest = resumed.read_finished(cursor, 100).await.unwrap();
    assert_eq!(rest, written[2..].to_vec());
    assert!(
        resumed
            .read_finished(rest[2].cursor, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        resumed
            .read_finished(StreamCursor::START, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!("12".parse::<StreamCursor>().is_err());
    assert_eq!(resumed.counts().await.unwrap().finished, 5);
}

/// Heartbeats make members live until their TTL runs out; leaving removes them at once.
pub async fn heartbeats_expire(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    assert!(
        store
            .live_members(MemberRole::Worker)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .heartbeat(MemberRole::Worker, "w-live", LONG)
        .await
        .unwrap();
    store
        .heartbeat(MemberRole::Worker, "w-dies", SHORT)
        .await
        .unwrap();
    store
        .heartbeat(MemberRole::Trainer, "t-0", LONG)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;

    let ids = |m: Vec<super::Member>| m.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.live_members(MemberRole::Worker).await.unwrap()),
        ["w-live"]
    );
    assert_eq!(
        ids(store.live_members(MemberRole::Trainer).await.unwrap()),
        ["t-0"]
    );

    // A lapsed member comes back with its next heartbeat.
    store
        .heartbeat(MemberRole::Worker, "w-dies", LONG)
        .await
        .unwrap();
    assert_eq!(
        ids(store.live_members(MemberRole::Worker).await.unwrap()),
        ["w-dies", "w-live"]
    );
    store.leave(MemberRole::Worker, "w-live").await.unwrap();
    assert_eq!(
        ids(store.live_members(MemberRole::Worker).await.unwrap()),
        ["w-dies"]
    );
    assert_eq!(
        ids(store.live_members(MemberRole::Trainer).await.unwrap()),
        ["t-0"]
    );
}

/// The leader lock: one holder at a time, tokens strictly increase per acquisition, and a
/// holder that lapsed or was taken over cannot renew or release.
pub async fn leader_lock_fencing(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    assert_eq!(store.leader().await.unwrap(), None);
    let a = store
        .acquire_leader("a", LONG)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(a.holder, "a");
    assert!(
        store.acquire_leader("b", LONG).await.unwrap().is_none(),
        "a holds it"
    );
    assert!(
        store.acquire_leader("a", LONG).await.unwrap().is_none(),
        "no re-entry"
    );
    assert_eq!(
        store.leader().await.unwrap().map(|l| l.token),
        Some(a.token)
    );
    let renewed = store.renew_leader("a", a.token, LONG).await.unwrap();
    assert_eq!(renewed.token, a.token);
    let err = store.renew_leader("b", a.token, LONG).await.unwrap_err();
    assert!(matches!(err, StateError::NotLeader { .. }), "{err}");
    store.release_leader("a", a.token).await.unwrap();
    assert_eq!(store.leader().await.unwrap(), None);

    // b takes over with a short lock and lapses.
    let b = store
        .acquire_leader("b", SHORT)
        .await
        .unwrap()
        .expect("released");
    assert!(b.token > a.token);
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.leader().await.unwrap(), None);
    let err = store.renew_leader("b", b.token, LONG).await.unwrap_err();
    assert!(
        matches!(&err, StateError::NotLeader { current: None, .. }),
        "{err}"
    );

    // Raced acquisition: exactly one candidate wins.
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let (s, b) = (f.attach(&store).await, barrier.clone());
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            s.acquire_leader(&format!("c{i}"), LONG).await.unwrap()
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.unwrap());
    }
    assert_eq!(won.len(), 1, "exactly one leader: {won:?}");
    let c = won.pop().unwrap();
    assert!(c.token > b.token, "tokens strictly increase");

    // The fenced-out old holders can neither renew nor release.
    for (who, token) in [("b", b.token), ("a", a.token)] {
        let err = store.renew_leader(who, token, LONG).await.unwrap_err();
        assert!(
            matches!(&err, StateError::NotLeader { current: Some(l), .. } if l.holder == c.holder),
            "{err}"
        );
        assert!(store.release_leader(who, token).await.is_err());
    }
    assert_eq!(
        store.leader().await.unwrap().map(|l| l.token),
        Some(c.token)
    );
    store.renew_leader(&c.holder, c.token, LONG).await.unwrap();
}

/// Bad arguments get typed errors, never a panic or a silent write.
pub async fn invalid_input_is_rejected(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let invalid = |r: Result<(), StateError>| {
        let err = r.unwrap_err();
        assert!(matches!(err, StateError::Invalid(_)), "{err}");
    };
    invalid(store.register_prompt(&prompt("zero", 0)).await.map(drop));
    invalid(store.register_prompt(&prompt("", 1)).await.map(drop));
    assert_eq!(store.counts().await.unwrap().prompts, 0);

    store.register_prompt(&prompt("p", 1)).await.unwrap();
    let id = tid("p", 0);
    invalid(store.claim_next("", LONG).await.map(drop));
    invalid(store.claim_next("w", Duration::ZERO).await.map(drop));
    invalid(store.open_version(1, MAX_TOKENS + 1, 1, 0).await.map(drop));
    invalid(store.heartbeat(MemberRole::Worker, "", LONG).await);
    invalid(store.acquire_leader("", LONG).await.map(drop));
    let e = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
    invalid(store.finish(&id, "w", e, f32::NAN).await.map(drop));
    invalid(store.reserve(1, u64::MAX).await.map(drop));
    assert_eq!(
        store.trajectory(&id).await.unwrap().unwrap().status,
        TrajectoryStatus::Generating
    );

    let unknown = tid("ghost", 0);
    let err = store.claim(&unknown, "w", LONG).await.unwrap_err();
    assert!(matches!(err, StateError::UnknownTrajectory(_)), "{err}");
    let err = store
        .commit_segment(&unknown, "w", 1, &seg(&unknown, 0, 1, 0), LONG)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::UnknownTrajectory(_)), "{err}");
}

/// Version openings and regenerations are leader writes: fenced by the leader token like step
/// announcements, so a deposed leader changes nothing.
pub async fn leader_writes_are_fenced(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    // No leader: fenced, nothing written.
    let err = store.open_version(0, 100, 1, 1).await.unwrap_err();
    assert!(
        matches!(err, StateError::LeaderFenced { current: None, .. }),
        "{err}"
    );
    assert_eq!(store.current_version().await.unwrap(), None);

    let old = store.acquire_leader("old", LONG).await.unwrap().unwrap();
    store.open_version(0, 100, 1, old.token).await.unwrap();
    store.release_leader("old", old.token).await.unwrap();
    let new = store.acquire_leader("new", LONG).await.unwrap().unwrap();
    assert!(new.token > old.token);

    // The deposed leader is fenced out of every leader write.
    let err = store.open_version(1, 100, 1, old.token).await.unwrap_err();
    assert!(
        matches!(&err, StateError::LeaderFenced { token, current: Some(l) }
            if *token == old.token && l.token == new.token),
        "{err}"
    );
    assert_eq!(
        store.current_version().await.unwrap(),
        Some(0),
        "nothing written"
    );
    let err = store
        .regenerate(&tid("ghost", 0), old.token)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");

    // The live leader writes.
    store.open_version(1, 100, 1, new.token).await.unwrap();
    assert_eq!(store.current_version().await.unwrap(), Some(1));
}

/// The step board: announcements are fenced by the leader token and idempotent; a newer step
/// waits for the newest to finish; ranks are claimed lowest first, held claims are not handed
/// out, and `finish_step` needs every rank done.
pub async fn step_board_announce_claim_finish(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    assert_eq!(store.announced_step().await.unwrap(), None);
    assert_eq!(store.finished_step().await.unwrap(), None);
    let a = StepAnnouncement {
        step: 0,
        manifest_key: "run/steps/0000000000/manifest.json".into(),
        world_size: 2,
    };
    // No leader: fenced.
    let err = store.announce_step(&a, 1).await.unwrap_err();
    assert!(
        matches!(err, StateError::LeaderFenced { current: None, .. }),
        "{err}"
    );
    let lead = store.acquire_leader("c", LONG).await.unwrap().unwrap();
    let err = store.announce_step(&a, lead.token + 1).await.unwrap_err();
    assert!(
        matches!(&err, StateError::LeaderFenced { current: Some(l), .. } if l.token == lead.token),
        "{err}"
    );
    assert_eq!(
        store.announced_step().await.unwrap(),
        None,
        "nothing written"
    );
    store.announce_step(&a, lead.token).await.unwrap();
    store.announce_step(&a, lead.token).await.unwrap(); // idempotent
    assert_eq!(store.announced_step().await.unwrap(), Some(a.clone()));
    let mut other = a.clone();
    other.world_size = 3;
    let err = store.announce_step(&other, lead.token).await.unwrap_err();
    assert!(matches!(err, StateError::StepConflict { .. }), "{err}");
    let next = StepAnnouncement {
        step: 1,
        manifest_key: "run/steps/0000000001/manifest.json".into(),
        world_size: 1,
    };
    let err = store.announce_step(&next, lead.token).await.unwrap_err();
    assert!(
        matches!(err, StateError::StepConflict { step: 1, .. }),
        "step 0 still trains: {err}"
    );
    let mut bad = a.clone();
    bad.world_size = 0;
    let err = store.announce_step(&bad, lead.token).await.unwrap_err();
    assert!(matches!(err, StateError::Invalid(_)), "{err}");

    // Ranks: lowest first; a third claimant gets nothing while both are held.
    assert_eq!(
        store.claim_rank(7, "t0", LONG).await.unwrap(),
        None,
        "not announced"
    );
    let r0 = store.claim_rank(0, "t0", LONG).await.unwrap().unwrap();
    let r1 = store.claim_rank(0, "t1", LONG).await.unwrap().unwrap();
    assert_eq!((r0.rank, r0.epoch, r1.rank, r1.epoch), (0, 1, 1, 1));
    assert_eq!(store.claim_rank(0, "t2", LONG).await.unwrap(), None);
    store.renew_rank(&r0, "t0", LONG).await.unwrap();
    let err = store.renew_rank(&r0, "t1", LONG).await.unwrap_err();
    assert!(
        matches!(
            &err,
            StateError::RankFenced {
                reason: RankFenceReason::ForeignOwner { .. },
                ..
            }
        ),
        "{err}"
    );
    let err = store.finish_step(0, 1).await.unwrap_err();
    assert!(matches!(err, StateError::StepConflict { .. }), "{err}");
    assert!(!store.complete_rank(&r0, "t0").await.unwrap().all_done);
    let err = store.renew_rank(&r0, "t0", LONG).await.unwrap_err();
    assert!(
        matches!(
            &err,
            StateError::RankFenced {
                reason: RankFenceReason::AlreadyDone,
                ..
            }
        ),
        "{err}"
    );
    assert!(store.complete_rank(&r1, "t1").await.unwrap().all_done);
    assert!(
        store.complete_rank(&r1, "t1").await.unwrap().all_done,
        "a retried completion gets the same answer"
    );
    assert!(!store.complete_rank(&r0, "t0").await.unwrap().all_done);
    assert_eq!(
        store.claim_rank(0, "t2", LONG).await.unwrap(),
        None,
        "all done"
    );
    let err = store.finish_step(0, 5).await.unwrap_err();
    assert!(matches!(err, StateError::Invalid(_)), "{err}");
    store.finish_step(0, 1).await.unwrap();
    store.finish_step(0, 1).await.unwrap(); // idempotent
    assert_eq!(store.finished_step().await.unwrap(), Some(0));
    assert_eq!(store.claim_rank(0, "t2", LONG).await.unwrap(), None);

    // Now the next step can be announced; an older one cannot.
    store.announce_step(&next, lead.token).await.unwrap();
    let err = store.announce_step(&a, lead.token).await.unwrap_err();
    assert!(
        matches!(err, StateError::StepConflict { step: 0, .. }),
        "{err}"
    );
    assert_eq!(store.announced_step().await.unwrap(), Some(next.clone()));
    assert_eq!(store.finished_step().await.unwrap(), Some(0));
    let c = store.claim_rank(1, "t0", LONG).await.unwrap().unwrap();
    assert_eq!((c.step, c.rank, c.epoch), (1, 0, 1), "fresh ranks per step");
    let err = store.complete_rank(&r0, "t0").await.unwrap_err();
    assert!(
        matches!(
            &err,
            StateError::RankFenced {
                reason: RankFenceReason::NotLive { announced: Some(1) },
                ..
            }
        ),
        "an old step's claim is dead: {err}"
    );

    // A deposed leader cannot announce.
    store.release_leader("c", lead.token).await.unwrap();
    let new = store.acquire_leader("d", LONG).await.unwrap().unwrap();
    assert!(store.complete_rank(&c, "t0").await.unwrap().all_done);
    store.finish_step(1, 2).await.unwrap();
    let third = StepAnnouncement {
        step: 2,
        manifest_key: "k2".into(),
        world_size: 1,
    };
    let err = store.announce_step(&third, lead.token).await.unwrap_err();
    assert!(
        matches!(&err, StateError::LeaderFenced { current: Some(l), .. } if l.token == new.token),
        "{err}"
    );
    store.announce_step(&third, new.token).await.unwrap();
}

/// An expired rank claim is re-claimed with a higher epoch; the old holder is fenced out of
/// renew and complete.
pub async fn step_board_expired_rank_is_reclaimed(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let lead = store.acquire_leader("c", LONG).await.unwrap().unwrap();
    let a = StepAnnouncement {
        step: 3,
        manifest_key: "k".into(),
        world_size: 2,
    };
    store.announce_step(&a, lead.token).await.unwrap();
    let dies = store.claim_rank(3, "dies", SHORT).await.unwrap().unwrap();
    let lives = store.claim_rank(3, "lives", LONG).await.unwrap().unwrap();
    assert_eq!((dies.rank, lives.rank), (0, 1));
    tokio::time::sleep(PAST_SHORT).await;
    let err = store.renew_rank(&dies, "dies", LONG).await.unwrap_err();
    assert!(
        matches!(
            &err,
            StateError::RankFenced {
                reason: RankFenceReason::Expired { .. },
                ..
            }
        ),
        "{err}"
    );
    let again = store
        .claim_rank(3, "replacement", LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.rank, again.epoch), (0, dies.epoch + 1));
    let err = store.complete_rank(&dies, "dies").await.unwrap_err();
    assert!(
        matches!(
            &err,
            StateError::RankFenced {
                reason: RankFenceReason::StaleEpoch {
                    given: 1,
                    current: 2
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(!store.complete_rank(&lives, "lives").await.unwrap().all_done);
    assert!(
        store
            .complete_rank(&again, "replacement")
            .await
            .unwrap()
            .all_done
    );
    store.finish_step(3, 4).await.unwrap();
    assert_eq!(store.finished_step().await.unwrap(), Some(3));
}

/// Many trainers race to claim and complete the ranks: each rank goes to one claimant, and
/// exactly one `complete_rank` caller gets `all_done`.
pub async fn step_board_exactly_one_finisher(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let lead = store.acquire_leader("c", LONG).await.unwrap().unwrap();
    let world = 5u32;
    let a = StepAnnouncement {
        step: 0,
        manifest_key: "k".into(),
        world_size: world,
    };
    store.announce_step(&a, lead.token).await.unwrap();
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let (s, b) = (f.attach(&store).await, barrier.clone());
        tasks.push(tokio::spawn(async move {
            let me = format!("t{i}");
            b.wait().await;
            let Some(c) = s.claim_rank(0, &me, LONG).await.unwrap() else {
                return (None, false);
            };
            let done = s.complete_rank(&c, &me).await.unwrap();
            (Some(c.rank), done.all_done)
        }));
    }
    let mut ranks = HashSet::new();
    let mut finishers = 0;
    for t in tasks {
        let (rank, all_done) = t.await.unwrap();
        if let Some(r) = rank {
            assert!(ranks.insert(r), "rank {r} handed out twice");
        }
        finishers += usize::from(all_done);
    }
    assert_eq!(ranks.len(), world as usize);
    assert_eq!(finishers, 1, "exactly one finisher");
    store.finish_step(0, 1).await.unwrap();
}

/// Failed attempts are counted on the trajectory: below the bound it is released (pending
/// without segments, parked with them); at the bound it gives up: `dropped`, never handed out
/// again, with a give-up entry on the finished stream. Stale writers cannot record failures.
pub async fn failures_release_then_give_up(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    store.register_prompt(&prompt("p", 2)).await.unwrap();
    let id = tid("p", 0);
    let failed = |detail: &str| GiveUp {
        reason: DropReason::GenerationFailed,
        detail: detail.into(),
    };
    let e1 = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
    let first = store
        .record_failure(&id, "w", e1, &failed("engine rejected the request"), 3)
        .await
        .unwrap();
    assert_eq!(
        first,
        FailureRecorded::Released {
            status: TrajectoryStatus::Pending,
            failures: 1
        }
    );
    // The released lease is over: its holder cannot record again.
    let err = store
        .record_failure(&id, "w", e1, &failed("again"), 3)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Fenced { .. }), "{err}");

    let e2 = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
    store
        .commit_segment(&id, "w", e2, &seg(&id, 0, 4, 2), LONG)
        .await
        .unwrap();
    let second = store
        .record_failure(&id, "w", e2, &failed("timeout"), 3)
        .await
        .unwrap();
    assert_eq!(
        second,
        FailureRecorded::Released {
            status: TrajectoryStatus::Parked,
            failures: 2
        }
    );
    let e3 = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
    let FailureRecorded::GaveUp(entry) = store
        .record_failure(&id, "w", e3, &failed("verifier: no such answer"), 3)
        .await
        .unwrap()
    else {
        panic!("the third failure gives up");
    };
    assert_eq!(
        (
            entry.trajectory.clone(),
            entry.gave_up.clone(),
            entry.tokens
        ),
        (id.clone(), Some(failed("verifier: no such answer")), 4)
    );
    let t = store.trajectory(&id).await.unwrap().unwrap();
    assert_eq!((t.status, t.failures), (TrajectoryStatus::Dropped, 3));
    let err = store.claim(&id, "x", LONG).await.unwrap_err();
    assert!(
        matches!(
            err,
            StateError::NotClaimable {
                reason: NotClaimable::Done(TrajectoryStatus::Dropped),
                ..
            }
        ),
        "{err}"
    );
    let stream = store.read_finished(StreamCursor::START, 10).await.unwrap();
    assert_eq!(stream, vec![entry]);
    let c = store.counts().await.unwrap();
    assert_eq!((c.dropped, c.finished, c.pending, c.parked), (1, 0, 1, 0));
    // The sibling is untouched: still claimable. A give-up at the first attempt (limit 1),
    // with another reason.
    let lagging = GiveUp {
        reason: DropReason::LagExceeded,
        detail: "first version 1, current 5".into(),
    };
    let sibling = tid("p", 1);
    let e = store
        .claim(&sibling, "w", LONG)
        .await
        .unwrap()
        .lease()
        .epoch;
    let FailureRecorded::GaveUp(entry) = store
        .record_failure(&sibling, "w", e, &lagging, 1)
        .await
        .unwrap()
    else {
        panic!("limit 1 gives up at once");
    };
    assert_eq!(entry.gave_up, Some(lagging));
    assert_eq!(
        store
            .read_finished(StreamCursor::START, 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

/// Truncation forgets the segments from `keep` on, under the live lease, and recomputes the
/// token count and versions; the next commit continues from there.
pub async fn truncate_goes_back_to_the_last_good_segment(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    store.register_prompt(&prompt("p", 1)).await.unwrap();
    let id = tid("p", 0);
    let e = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
    for (seq, version) in [(0, 3), (1, 4), (2, 5)] {
        store
            .commit_segment(&id, "w", e, &seg(&id, seq, 10 + seq, version), LONG)
            .await
            .unwrap();
    }
    let t = store.truncate(&id, "w", e, 1).await.unwrap();
    assert_eq!(t.segments, vec![seg(&id, 0, 10, 3)]);
    assert_eq!(
        (t.tokens, t.first_version, t.last_version),
        (10, Some(3), Some(3))
    );
    let t = store
        .commit_segment(&id, "w", e, &seg(&id, 1, 7, 6), LONG)
        .await
        .unwrap();
    assert_eq!(
        (t.segments.len(), t.tokens, t.last_version),
        (2, 17, Some(6))
    );
    let t = store.truncate(&id, "w", e, 0).await.unwrap();
    assert_eq!(
        (t.segments.len(), t.tokens, t.first_version, t.last_version),
        (0, 0, None, None)
    );
    assert_eq!(t.status, TrajectoryStatus::Generating);
    // Not under a live lease: fenced.
    let err = store.truncate(&id, "other", e, 0).await.unwrap_err();
    assert!(matches!(err, StateError::Fenced { .. }), "{err}");
    // With nothing committed, a release returns it to pending.
    assert_eq!(
        store.release(&id, "w", e).await.unwrap(),
        TrajectoryStatus::Pending
    );
}

/// Closing a dropped group stops its pending, generating and parked trajectories: a worker
/// still generating one is fenced at its next write; finished and purged ones stay as they
/// are. A leader write.
pub async fn closing_a_group_stops_its_unfinished_trajectories(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let lt = store
        .acquire_leader("c", LONG)
        .await
        .unwrap()
        .unwrap()
        .token;
    store.open_version(0, 1000, 1, lt).await.unwrap();
    store.register_prompt(&prompt("g", 4)).await.unwrap();
    store.register_prompt(&prompt("other", 1)).await.unwrap();
    let (done, running, parked) = (tid("g", 0), tid("g", 1), tid("g", 2));
    let e = store.claim(&done, "w", LONG).await.unwrap().lease().epoch;
    store.finish(&done, "w", e, 1.0).await.unwrap();
    let e = store.claim(&parked, "w", LONG).await.unwrap().lease().epoch;
    store
        .commit_segment(&parked, "w", e, &seg(&parked, 0, 3, 0), LONG)
        .await
        .unwrap();
    store.release(&parked, "w", e).await.unwrap();
    let running_epoch = store
        .claim(&running, "w", LONG)
        .await
        .unwrap()
        .lease()
        .epoch;

    let err = store.close_group(&"g".into(), lt + 1).await.unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");
    let mut stopped = store.close_group(&"g".into(), lt).await.unwrap();
    stopped.sort();
    assert_eq!(stopped, vec![running.clone(), parked.clone(), tid("g", 3)]);
    for id in &stopped {
        let t = store.trajectory(id).await.unwrap().unwrap();
        assert_eq!(t.status, TrajectoryStatus::Dropped, "{id}");
    }
    assert_eq!(
        store.trajectory(&done).await.unwrap().unwrap().status,
        TrajectoryStatus::Finished
    );
    let err = store
        .commit_segment(&running, "w", running_epoch, &seg(&running, 0, 3, 0), LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Fenced {
                reason: FenceReason::NotGenerating(TrajectoryStatus::Dropped),
                ..
            }
        ),
        "{err}"
    );
    let c = store.counts().await.unwrap();
    assert_eq!(
        (c.dropped, c.generating, c.parked, c.pending, c.finished),
        (3, 0, 0, 1, 1)
    );
    // Only the other prompt is left to claim; closing again stops nothing.
    let next = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(next.state.id, tid("other", 0));
    assert!(store.close_group(&"g".into(), lt).await.unwrap().is_empty());
    assert!(
        store
            .close_group(&"never-registered".into(), lt)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Widening adds to the current version's budget (total and remaining); another version is
/// left alone; a leader write.
pub async fn widening_adds_to_the_current_budget(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let lt = store
        .acquire_leader("c", LONG)
        .await
        .unwrap()
        .unwrap()
        .token;
    assert_eq!(store.widen_budget(0, 10, lt).await.unwrap(), None);
    store.open_version(3, 100, 1, lt).await.unwrap();
    assert_eq!(store.reserve(3, 100).await.unwrap(), 100);
    let b = store.widen_budget(3, 40, lt).await.unwrap().unwrap();
    assert_eq!((b.version, b.total, b.remaining), (3, 140, 40));
    assert_eq!(store.budget().await.unwrap(), Some(b));
    assert_eq!(store.reserve(3, 50).await.unwrap(), 40);
    assert_eq!(store.widen_budget(2, 10, lt).await.unwrap(), None);
    let err = store.widen_budget(3, 10, lt + 1).await.unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");
    let b = store
        .widen_budget(3, MAX_TOKENS, lt)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.total, MAX_TOKENS, "capped at the largest budget");
}

/// Trimming deletes the entries before a cursor; later reads see the rest, and a trim is a
/// leader write.
pub async fn finished_stream_is_trimmed(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    let lt = store
        .acquire_leader("c", LONG)
        .await
        .unwrap()
        .unwrap()
        .token;
    let mut written = Vec::new();
    for i in 0..4u32 {
        let p = format!("t{i}");
        store.register_prompt(&prompt(&p, 1)).await.unwrap();
        let id = tid(&p, 0);
        let e = store.claim(&id, "w", LONG).await.unwrap().lease().epoch;
        written.push(store.finish(&id, "w", e, 0.5).await.unwrap());
    }
    let err = store
        .trim_finished(written[2].cursor, lt + 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");
    assert_eq!(store.trim_finished(written[2].cursor, lt).await.unwrap(), 2);
    let rest = store.read_finished(StreamCursor::START, 10).await.unwrap();
    assert_eq!(rest, written[2..].to_vec());
    assert_eq!(store.trim_finished(written[2].cursor, lt).await.unwrap(), 0);
    // Trimming before the cursor after the last entry empties the stream.
    assert_eq!(
        store
            .trim_finished(written[3].cursor.next(), lt)
            .await
            .unwrap(),
        2
    );
    assert!(
        store
            .read_finished(StreamCursor::START, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.counts().await.unwrap().finished, 4, "counts stay");
}

/// Generates one `#[tokio::test]` per conformance function for a [`StoreFactory`] expression.
///
/// ```ignore
/// flywheel_storage::state_store_conformance!(MyFactory::new());
/// ```
/// Losing the state: after [`StateStore::delete_run`] registrations and claims are refused
/// until the leader has rebuilt it; a restored prompt's trajectories come back parked with
/// their segments (or pending), their next claims get epochs above the restored ones, the
/// board's finished step comes back, and leader tokens resume above the floor.
pub async fn lost_state_is_refused_until_rebuilt(f: &dyn StoreFactory) {
    let store = f.fresh().await;
    assert!(store.initialised().await.unwrap());
    let old = store.acquire_leader("a", LONG).await.unwrap().unwrap();
    let p = prompt("lost", 3);
    store.register_prompt(&p).await.unwrap();
    assert!(store.delete_run().await.unwrap() > 0);

    assert!(!store.initialised().await.unwrap());
    assert_eq!(store.prompt(&p.id).await.unwrap(), None);
    assert_eq!(store.leader().await.unwrap(), None);
    let refused = |r: Result<(), StateError>| {
        assert!(matches!(r, Err(StateError::NotInitialised { .. })), "{r:?}")
    };
    refused(store.register_prompt(&prompt("new", 1)).await.map(drop));
    refused(store.claim_next("w", LONG).await.map(drop));
    refused(store.claim(&tid("lost", 0), "w", LONG).await.map(drop));

    let floor = old.token + 10;
    store.raise_leader_token(floor).await.unwrap();
    store.raise_leader_token(1).await.unwrap(); // never lowers it
    let leader = store.acquire_leader("b", LONG).await.unwrap().unwrap();
    assert!(leader.token > floor, "{} ≤ {floor}", leader.token);

    let t0 = tid("lost", 0);
    let segments = vec![seg(&t0, 0, 8, 3), seg(&t0, 1, 5, 4)];
    let restored = [
        RestoredTrajectory {
            sample: 0,
            segments: segments.clone(),
            epoch: 4,
        },
        RestoredTrajectory {
            sample: 1,
            segments: Vec::new(),
            epoch: 2,
        },
    ];
    let err = store
        .restore_prompt(&p, &restored, old.token)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");
    let bad = [RestoredTrajectory {
        sample: 3,
        segments: Vec::new(),
        epoch: 1,
    }];
    let err = store
        .restore_prompt(&p, &bad, leader.token)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Invalid(_)), "{err}");
    assert_eq!(
        store
            .restore_prompt(&p, &restored, leader.token)
            .await
            .unwrap(),
        Registration::Registered
    );
    assert_eq!(
        store
            .restore_prompt(&p, &restored, leader.token)
            .await
            .unwrap(),
        Registration::AlreadyRegistered
    );
    assert_eq!(store.prompt(&p.id).await.unwrap(), Some(p.clone()));
    let s0 = store.trajectory(&t0).await.unwrap().unwrap();
    assert_eq!(s0.status, TrajectoryStatus::Parked);
    assert_eq!(s0.segments, segments);
    assert_eq!(
        (s0.tokens, s0.first_version, s0.last_version),
        (13, Some(3), Some(4))
    );
    assert_eq!(s0.retention, 0);

    store.restore_finished_step(6, leader.token).await.unwrap();
    store.restore_finished_step(2, leader.token).await.unwrap(); // never goes back
    assert_eq!(store.finished_step().await.unwrap(), Some(6));
    let err = store.restore_finished_step(7, old.token).await.unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");

    // Still refused until the leader says the rebuild is complete.
    refused(store.claim_next("w", LONG).await.map(drop));
    store.mark_initialised().await.unwrap();
    assert!(store.initialised().await.unwrap());

    let c = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(
        (c.state.id.clone(), c.source),
        (t0.clone(), ClaimSource::Parked)
    );
    assert_eq!(c.lease().epoch, 5);
    let next = seg(&t0, 2, 4, 7);
    store
        .commit_segment(&t0, "w", 5, &next, LONG)
        .await
        .unwrap();
    let c = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(
        (c.state.id.sample, c.source, c.lease().epoch),
        (1, ClaimSource::Pending, 3)
    );
    let c = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(
        (c.state.id.sample, c.source, c.lease().epoch),
        (2, ClaimSource::Pending, 1)
    );
    assert_eq!(store.counts().await.unwrap().prompts, 1);

    // The board takes the next step's announcement.
    let a = StepAnnouncement {
        step: 7,
        manifest_key: "steps/7".into(),
        world_size: 1,
    };
    store.announce_step(&a, leader.token).await.unwrap();
    assert!(store.claim_rank(7, "t", LONG).await.unwrap().is_some());
}

#[macro_export]
macro_rules! state_store_conformance {
    ($factory:expr) => {
        $crate::state_store_conformance!(@tests $factory;
            registration_is_idempotent,
            claim_order_parked_first_then_pending,
            segment_commit_updates_state,
            stale_epoch_writer_is_fenced,
            expired_lease_is_stolen_with_higher_epoch,
            concurrent_claimers_exactly_one_wins,
            budget_reserve_refund_never_overdraws,
            open_version_bumps_retention_and_purges,
            finished_stream_resumes_from_cursor,
            heartbeats_expire,
            leader_lock_fencing,
            leader_writes_are_fenced,
            invalid_input_is_rejected,
            step_board_announce_claim_finish,
            step_board_expired_rank_is_reclaimed,
            step_board_exactly_one_finisher,
            failures_release_then_give_up,
            truncate_goes_back_to_the_last_good_segment,
            closing_a_group_stops_its_unfinished_trajectories,
            widening_adds_to_the_current_budget,
            finished_stream_is_trimmed,
            lost_state_is_refused_until_rebuilt,
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let factory = $factory;
                $crate::state::conformance::$name(&factory).await;
            }
        )*
    };
}
