//! The coordinator loop against the memory state store, an SQLite ledger and memory blobs:
//! step cuts, versions, drops, the commit protocol under injected crashes, and failover.

mod common;

use std::time::Duration;

use common::{LONG, World, crash_and_take_over, manifest, pid, three_groups, tick_until_settled};
use flywheel_coordinator::{CrashPoint, TickOutcome};
use flywheel_storage::config::RolloutMode;
use flywheel_storage::ledger::{DropReason, EventKind, LedgerError, PromptStatus};
use flywheel_storage::state::{GiveUp, StateError, StreamCursor};
use flywheel_storage::types::{FinishReason, Segment, SegmentRef, TrajectoryId, TrajectoryStatus};
use flywheel_storage::{codec, keys};

#[tokio::test]
async fn cuts_phi_tokens_announces_and_opens_the_next_version() {
    let w = World::memory().await;
    w.trainers(2).await;
    let mut c = w.coordinator("c1");
    // The first tick takes the lock and opens version 0.
    assert_eq!(
        tick_until_settled(&mut c).await.last(),
        Some(&TickOutcome::Idle)
    );
    assert_eq!(w.state.current_version().await.unwrap(), Some(0));
    let budget = w.state.budget().await.unwrap().unwrap();
    assert_eq!(budget.total, 1000);

    three_groups(&w).await;
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    let m = manifest(&w, 0).await;
    assert_eq!(
        m,
        common::expected_step0(&w, 2).await,
        "the C3PO plan, over the 2 live trainers"
    );
    assert_eq!(m.total_tokens, 100);
    assert_eq!(m.prompts, vec![pid("a"), pid("b")]);
    let rec = w
        .ledger
        .step(&w.run.storage.run_id, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.prompts, vec![pid("a"), pid("b")]);
    let a = w.state.announced_step().await.unwrap().unwrap();
    assert_eq!((a.step, a.world_size), (0, 2));

    // Step 1 waits for step 0 to finish even though c waits and the input is drained.
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Idle);
    assert_eq!(
        w.ledger.last_step(&w.run.storage.run_id).await.unwrap(),
        Some(0)
    );

    w.train_announced().await;
    // Version 1 opens; c (the input is drained) becomes step 1, alone.
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(1));
    assert_eq!(w.state.current_version().await.unwrap(), Some(1));
    assert_eq!(manifest(&w, 1).await.prompts, vec![pid("c")]);
    let metrics = flywheel_service::metrics::render(&c.metrics().registry);
    assert!(
        metrics.contains("flywheel_coordinator_steps_cut_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn drops_zero_variance_and_purged_groups_with_reasons() {
    let w = World::memory().await;
    let mut run = w.run.clone();
    run.rollout.retention_limit = 0;
    let w = World { run, ..w };
    let mut c = w.coordinator("c1");
    tick_until_settled(&mut c).await;
    // z: every reward equal → dropped (zero variance).
    w.finish_prompt("z", &[10, 10], &[1.0, 1.0]).await;
    // p: one sample parked with a segment under version 0 → purged when version 1 opens.
    w.park("p").await;
    // a + b make step 0.
    for q in ["a", "b"] {
        w.finish_prompt(q, &[30, 30], &[1.0, 0.0]).await;
    }
    let run_id = w.run.storage.run_id.clone();
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    assert!(matches!(
        w.ledger.prompt_status(&run_id, &pid("z")).await.unwrap(),
        Some(PromptStatus::Dropped {
            reason: DropReason::ZeroVariance,
            ..
        })
    ));
    // The dropped group's segments are deleted (nothing reads them again); the trained
    // groups' stay for the trainers, and the parked one's for its resume.
    let segments = |prefix: String| {
        let blobs = w.blobs.clone();
        async move { blobs.list(&prefix).await.unwrap().len() }
    };
    assert_eq!(segments(format!("{run_id}/segments/z/")).await, 0);
    assert_eq!(segments(format!("{run_id}/segments/a/")).await, 2);
    assert_eq!(segments(format!("{run_id}/segments/p/")).await, 1);
    w.train_announced().await;
    c.tick().await.unwrap();
    assert!(matches!(
        w.ledger.prompt_status(&run_id, &pid("p")).await.unwrap(),
        Some(PromptStatus::Dropped {
            reason: DropReason::PurgedRetention,
            ..
        })
    ));
    let metrics = flywheel_service::metrics::render(&c.metrics().registry);
    assert!(
        metrics
            .contains(r#"flywheel_coordinator_groups_dropped_total{reason="purged_retention"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"flywheel_coordinator_groups_dropped_total{reason="zero_variance"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn crash_before_manifest_replays_the_same_step() {
    crash_and_take_over(&World::memory().await, CrashPoint::BeforeManifest).await;
}

#[tokio::test]
async fn crash_after_manifest_replays_the_same_step() {
    crash_and_take_over(&World::memory().await, CrashPoint::AfterManifest).await;
}

#[tokio::test]
async fn crash_after_ledger_commit_announces_the_same_step() {
    crash_and_take_over(&World::memory().await, CrashPoint::AfterLedger).await;
}

#[tokio::test]
async fn crash_after_announce_keeps_the_step() {
    crash_and_take_over(&World::memory().await, CrashPoint::AfterAnnounce).await;
}

#[tokio::test]
async fn a_deposed_leader_stops_writing() {
    let w = World::memory().await;
    let mut old = w.coordinator("old");
    tick_until_settled(&mut old).await;
    let old_token = old.lease().unwrap().token;
    // The old leader stalls past its lock; a standby takes over.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut new = w.coordinator("new");
    tick_until_settled(&mut new).await;
    assert!(new.lease().unwrap().token > old_token);
    three_groups(&w).await;
    // The old leader wakes up: it finds out it was deposed and writes nothing.
    assert_eq!(old.tick().await.unwrap(), TickOutcome::Standby);
    assert!(old.lease().is_none());
    assert_eq!(
        w.ledger.last_step(&w.run.storage.run_id).await.unwrap(),
        None
    );
    // Its token cannot announce anything either.
    let a = flywheel_storage::state::StepAnnouncement {
        step: 0,
        manifest_key: "k".into(),
        world_size: 1,
    };
    let err = w.state.announce_step(&a, old_token).await.unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");
    assert_eq!(new.tick().await.unwrap(), TickOutcome::Committed(0));
    // Nor open a version, nor record a step (not even a replay of the new leader's): the
    // state store and the ledger both fence its token, and nothing changes.
    let version = w.state.current_version().await.unwrap();
    let err = w
        .state
        .open_version(version.unwrap() + 1, 100, 1, old_token)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::LeaderFenced { .. }), "{err}");
    assert_eq!(w.state.current_version().await.unwrap(), version);
    let run = &w.run.storage.run_id;
    let step0 = w.ledger.step(run, 0).await.unwrap().unwrap();
    let err = w
        .ledger
        .record_step(run, &step0, old_token)
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::LeaderFenced { .. }), "{err}");
    let err = w
        .ledger
        .drop_prompt(run, &pid("ghost"), DropReason::Malformed, "", old_token)
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::LeaderFenced { .. }), "{err}");
}

#[tokio::test]
async fn world_size_follows_live_trainers_and_pause_stops_cutting() {
    let w = World::memory().await;
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    three_groups(&w).await;
    c.controls()
        .paused
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Paused);
    assert_eq!(
        w.ledger.last_step(&w.run.storage.run_id).await.unwrap(),
        None
    );
    c.controls()
        .paused
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // No trainer alive: world size 1.
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    assert_eq!(manifest(&w, 0).await.world_size, 1);
    w.train_announced().await;
    w.trainers(3).await;
    w.finish_prompt("d", &[50, 50], &[0.0, 1.0]).await;
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(1));
    assert_eq!(manifest(&w, 1).await.world_size, 3);
}

#[tokio::test]
async fn a_spent_budget_cuts_a_short_step_when_nothing_generates() {
    let w = World::memory().await;
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    // One complete group (60 < Φ = 100) and a parked trajectory: not drained.
    w.finish_prompt("a", &[20, 40], &[1.0, 0.0]).await;
    w.park("p").await;
    assert_eq!(
        c.tick().await.unwrap(),
        TickOutcome::Idle,
        "budget left: wait"
    );
    // The workers spend the version's budget.
    assert_eq!(w.state.reserve(0, 5000).await.unwrap(), 1000);
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    let m = manifest(&w, 0).await;
    assert_eq!(
        (m.total_tokens, m.token_budget),
        (60, 100),
        "normaliser stays Φ"
    );
}

/// In `partial` mode a trajectory whose worker died (its lease expired) does not hold up a
/// spent version's step: nobody claims it while the budget is spent, and it resumes first
/// under the next version.
#[tokio::test]
async fn a_spent_budget_does_not_wait_for_a_dead_workers_trajectory() {
    let w = World::memory().await;
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    w.finish_prompt("a", &[20, 40], &[1.0, 0.0]).await;
    // A worker claims `d` for a moment and dies.
    let d = w.accept("d", 1).await;
    let dead = TrajectoryId {
        prompt: d.id,
        sample: 0,
    };
    w.state
        .claim(&dead, "dead-worker", Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(w.state.reserve(0, 5000).await.unwrap(), 1000);
    assert_eq!(
        c.tick().await.unwrap(),
        TickOutcome::Idle,
        "a live lease: the step waits for it"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.state.counts().await.unwrap().lease_expired, 1);
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
}

#[tokio::test]
async fn async_mode_drops_groups_past_the_lag_bound() {
    let w = World::memory().await;
    let mut run = w.run.clone();
    run.rollout.mode = flywheel_storage::config::RolloutMode::Async;
    run.rollout.max_lag = 0;
    let w = World { run, ..w };
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    assert_eq!(
        w.state.budget().await.unwrap().unwrap().total,
        w.run.rollout.version_budget_tokens,
        "async: versions open with (η + 1) · Φ_r, here η = 0"
    );
    // old: its first token under version 0, finished after version 1 opened.
    let old = w.accept("old", 2).await;
    let first = TrajectoryId {
        prompt: old.id.clone(),
        sample: 0,
    };
    let e = w.generate(&first, 30).await;
    w.state.finish(&first, "w", e, 1.0).await.unwrap();
    for q in ["a", "b"] {
        w.finish_prompt(q, &[30, 30], &[1.0, 0.0]).await;
    }
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    w.train_announced().await;
    c.tick().await.unwrap(); // opens version 1
    let second = TrajectoryId {
        prompt: old.id.clone(),
        sample: 1,
    };
    let e = w.generate(&second, 30).await;
    w.state.finish(&second, "w", e, 0.0).await.unwrap();
    c.tick().await.unwrap();
    assert_eq!(w.drop_reason("old").await, Some(DropReason::LagExceeded));
}

#[tokio::test]
async fn purged_trajectories_are_regenerated_when_configured() {
    let w = World::memory().await;
    let mut run = w.run.clone();
    run.rollout.retention_limit = 0;
    run.rollout.purge_action = flywheel_storage::config::PurgeAction::Regenerate;
    let w = World { run, ..w };
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    let tid = w.park("p").await;
    for q in ["a", "b"] {
        w.finish_prompt(q, &[30, 30], &[1.0, 0.0]).await;
    }
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    w.train_announced().await;
    c.tick().await.unwrap(); // version 1: p purged, then regenerated
    let t = w.state.trajectory(&tid).await.unwrap().unwrap();
    assert_eq!(
        (t.status, t.tokens),
        (flywheel_storage::types::TrajectoryStatus::Pending, 0)
    );
    assert_eq!(
        w.ledger
            .prompt_status(&w.run.storage.run_id, &pid("p"))
            .await
            .unwrap(),
        Some(PromptStatus::Pending)
    );
    assert!(
        flywheel_service::metrics::render(&c.metrics().registry)
            .contains(r#"reason="purged_regenerated"} 1"#)
    );
    // The ledger notes the regeneration.
    let events = w.ledger.events(&w.run.storage.run_id).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, EventKind::Regenerated);
    assert!(events[0].detail.contains("p#0"), "{events:?}");
    // It finishes from scratch and its group is formed like any other (K = 1: a single
    // reward has no variance, so it is dropped for that reason, not for the purge).
    let e = w.generate(&tid, 7).await;
    w.state.finish(&tid, "w", e, 1.0).await.unwrap();
    c.tick().await.unwrap();
    assert_eq!(w.drop_reason("p").await, Some(DropReason::ZeroVariance));
}

#[tokio::test]
async fn a_dead_trainers_rank_is_redone_by_a_live_one() {
    let w = World::memory().await;
    w.trainers(2).await;
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    three_groups(&w).await;
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    // trainer-1 takes a rank and dies; trainer-0 does its own.
    let dying = w
        .state
        .claim_rank(0, "trainer-1", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    let mine = w
        .state
        .claim_rank(0, "trainer-0", common::LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !w.state
            .complete_rank(&mine, "trainer-0")
            .await
            .unwrap()
            .all_done
    );
    assert_eq!(
        w.state
            .claim_rank(0, "trainer-0", common::LONG)
            .await
            .unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let redo = w
        .state
        .claim_rank(0, "trainer-0", common::LONG)
        .await
        .unwrap()
        .expect("the dead trainer's rank is free again");
    assert_eq!((redo.rank, redo.epoch), (dying.rank, dying.epoch + 1));
    assert!(
        w.state
            .complete_rank(&redo, "trainer-0")
            .await
            .unwrap()
            .all_done
    );
    w.state.finish_step(0, 1).await.unwrap();
    c.tick().await.unwrap();
    assert_eq!(w.state.current_version().await.unwrap(), Some(1));
}

/// A trajectory that gave up (its attempts kept failing) drops its group with the reason, and
/// the group's other trajectories are stopped: a worker still generating one is fenced out.
#[tokio::test]
async fn a_given_up_trajectory_drops_its_group_and_stops_its_siblings() {
    let w = World::memory().await;
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    let p = w.accept("poison", 3).await;
    let ids: Vec<TrajectoryId> = p.trajectory_ids().collect();
    let sibling_epoch = w.generate(&ids[1], 5).await; // still generating
    let e = w
        .state
        .claim(&ids[0], "w2", LONG)
        .await
        .unwrap()
        .lease()
        .epoch;
    let give_up = GiveUp {
        reason: DropReason::GenerationFailed,
        detail: "engine rejected the request".into(),
    };
    w.state
        .record_failure(&ids[0], "w2", e, &give_up, 1)
        .await
        .unwrap();
    c.tick().await.unwrap();
    assert_eq!(
        w.drop_reason("poison").await,
        Some(DropReason::GenerationFailed)
    );
    for id in &ids {
        let t = w.state.trajectory(id).await.unwrap().unwrap();
        assert_eq!(t.status, TrajectoryStatus::Dropped, "{id}");
    }
    let seg = SegmentRef {
        seq: 1,
        key: "k".into(),
        tokens: 3,
        version: 0,
    };
    let err = w
        .state
        .commit_segment(&ids[1], "w", sibling_epoch, &seg, LONG)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Fenced { .. }), "{err}");
}

/// A spent version that can complete no group (each group of 2 has one sample parked and
/// the other pending) has its budget widened by Φ_r after two ticks, with a ledger note and
/// a metric; then the work completes and a step is cut.
#[tokio::test]
async fn a_spent_budget_that_can_complete_no_group_is_widened() {
    let w = World::memory().await;
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    let run = &w.run.storage.run_id;
    for p in ["a", "b"] {
        let prompt = w.accept(p, 2).await;
        let first = prompt.trajectory_ids().next().unwrap();
        let e = w.generate(&first, 5).await;
        w.state.release(&first, "w", e).await.unwrap();
    }
    assert_eq!(w.state.reserve(0, 1000).await.unwrap(), 1000, "spent");
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Idle, "first sighting");
    assert_eq!(w.state.budget().await.unwrap().unwrap().total, 1000);
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Idle);
    let b = w.state.budget().await.unwrap().unwrap();
    assert_eq!((b.version, b.total, b.remaining), (0, 2000, 1000));
    assert_eq!(c.metrics().budget_widenings.get(), 1);
    let events = w.ledger.events(run).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::BudgetWidened);
    assert!(events[0].detail.contains("Φ_r"), "{}", events[0].detail);
    // With budget again, the groups complete and a step is cut.
    for p in ["a", "b"] {
        for sample in 0..2 {
            let id = TrajectoryId {
                prompt: pid(p),
                sample,
            };
            let e = w.generate(&id, 50).await;
            w.state.finish(&id, "w", e, sample as f32).await.unwrap();
        }
    }
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    assert_eq!(c.metrics().budget_widenings.get(), 1, "widened once");
}

/// `sync`: the step of a spent version waits for a parked trajectory (a stopping worker's),
/// which workers finish under the same version; `partial` does not wait for it.
#[tokio::test]
async fn sync_waits_for_parked_work_before_cutting() {
    for (mode, waits) in [(RolloutMode::Sync, true), (RolloutMode::Partial, false)] {
        let w = World::memory_in(mode).await;
        let mut c = w.coordinator("c");
        tick_until_settled(&mut c).await;
        w.finish_prompt("a", &[30, 30], &[1.0, 0.0]).await;
        w.park("parked").await;
        let left = w.state.budget().await.unwrap().unwrap().remaining;
        w.state.reserve(0, left).await.unwrap();
        assert_eq!(w.state.budget().await.unwrap().unwrap().remaining, 0);
        let out = c.tick().await.unwrap();
        if waits {
            assert_eq!(
                out,
                TickOutcome::Idle,
                "{mode:?}: the parked trajectory is awaited"
            );
        } else {
            assert_eq!(out, TickOutcome::Committed(0), "{mode:?}");
        }
    }
}

/// `sync`: a step trains what its version generated once all of it has finished, all of it;
/// Φ tokens of complete groups do not cut it while a trajectory of the version still runs
/// (`partial` cuts at Φ).
#[tokio::test]
async fn sync_cuts_only_once_its_version_has_finished() {
    for mode in [RolloutMode::Sync, RolloutMode::Partial] {
        let w = World::memory_in(mode).await;
        let mut c = w.coordinator("c");
        tick_until_settled(&mut c).await;
        // 180 tokens of complete groups (Φ = 100), and one trajectory still running.
        three_groups(&w).await;
        let running = w.accept("running", 1).await;
        let id = TrajectoryId {
            prompt: running.id.clone(),
            sample: 0,
        };
        let epoch = w.generate(&id, 10).await;
        let out = c.tick().await.unwrap();
        if mode == RolloutMode::Partial {
            assert_eq!(out, TickOutcome::Committed(0), "partial cuts at Φ");
            continue;
        }
        assert_eq!(
            out,
            TickOutcome::Idle,
            "sync waits for the running trajectory"
        );
        w.state.finish(&id, "w", epoch, 1.0).await.unwrap();
        assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
        // The step is the version's whole batch, beyond Φ: the three groups' 180 tokens (the
        // one-sample group has no reward variance and is filtered). Nothing is left to be
        // trained a version late.
        let m = manifest(&w, 0).await;
        assert_eq!((m.total_tokens, m.token_budget), (180, 180));
        assert_eq!(m.prompts.len(), 3);
    }
}

/// After a step the finished stream keeps only the entries of prompts still open, so a new
/// leader reads little; it rebuilds the same waiting groups from what is left.
#[tokio::test]
async fn the_finished_stream_is_trimmed_after_each_step() {
    let w = World::memory().await;
    let mut c = w.coordinator("c");
    tick_until_settled(&mut c).await;
    three_groups(&w).await;
    let open = w.accept("open", 2).await;
    let first = open.trajectory_ids().next().unwrap();
    let e = w.generate(&first, 10).await;
    w.state.finish(&first, "w", e, 1.0).await.unwrap();
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));
    let left = w
        .state
        .read_finished(StreamCursor::START, 100)
        .await
        .unwrap();
    let prompts: std::collections::BTreeSet<String> =
        left.iter().map(|e| e.trajectory.prompt.0.clone()).collect();
    // a and b were trained; c waits for step 1; `open` is incomplete.
    assert!(
        !prompts.contains("a") && !prompts.contains("b"),
        "{prompts:?}"
    );
    assert!(
        prompts.contains("c") && prompts.contains("open"),
        "{prompts:?}"
    );
    // A new leader rebuilds c's waiting group from the trimmed stream.
    drop(c);
    w.train_announced().await;
    let mut next = w.coordinator("next");
    let outcomes = tick_until_settled(&mut next).await;
    assert_eq!(outcomes.last(), Some(&TickOutcome::Idle), "{outcomes:?}");
    let snapshot = next.snapshot().read().unwrap().clone();
    assert_eq!((snapshot.groups_waiting, snapshot.waiting_tokens), (1, 60));
}

/// Writes a real segment object of `id` (seq, epoch, `n` tokens, ending with `finish`) and
/// returns its reference.
async fn put_segment(
    w: &World,
    id: &TrajectoryId,
    seq: u32,
    epoch: u64,
    n: u32,
    finish: FinishReason,
) -> SegmentRef {
    let segment = Segment {
        trajectory: id.clone(),
        seq,
        version: 0,
        lease_epoch: epoch,
        tokens: (0..n).collect(),
        logprobs: vec![-0.5; n as usize],
        finish,
    };
    let key = keys::segment(&w.run.storage.run_id, &id.prompt, id.sample, seq, epoch);
    w.blobs
        .put(&key, codec::encode(&segment).unwrap())
        .await
        .unwrap();
    SegmentRef {
        seq,
        key,
        tokens: n,
        version: 0,
    }
}

#[tokio::test]
async fn a_lost_state_store_is_rebuilt_from_the_ledger_and_the_object_store() {
    let w = World::memory().await;
    let run = w.run.storage.run_id.clone();
    let mut c = w.coordinator("c1");
    tick_until_settled(&mut c).await;
    // a#0: two committed segments, the second one final. a#1: seq 0 committed; seq 1 written
    // by a later claim that died before committing it (a valid continuation); a stale seq 2
    // of the first claim, cut back. b: accepted by the ledger, never registered.
    let a = w.accept("a", 2).await;
    let ids: Vec<TrajectoryId> = a.trajectory_ids().collect();
    let (a0, a1) = (ids[0].clone(), ids[1].clone());
    let e = w.state.claim(&a0, "w", LONG).await.unwrap().lease().epoch;
    let mut a0_segments = Vec::new();
    for (seq, finish) in [(0, FinishReason::None), (1, FinishReason::Eos)] {
        let r = put_segment(&w, &a0, seq, e, 4, finish).await;
        w.state.commit_segment(&a0, "w", e, &r, LONG).await.unwrap();
        a0_segments.push(r);
    }
    let e1 = w.state.claim(&a1, "w", LONG).await.unwrap().lease().epoch;
    let first = put_segment(&w, &a1, 0, e1, 3, FinishReason::None).await;
    w.state
        .commit_segment(&a1, "w", e1, &first, LONG)
        .await
        .unwrap();
    put_segment(&w, &a1, 2, e1, 3, FinishReason::None).await;
    let later = put_segment(&w, &a1, 1, e1 + 1, 5, FinishReason::None).await;
    let b = w.accept("b", 1).await;
    // Leaders before this one wrote the ledger with tokens up to 7.
    w.ledger
        .set_controls(&run, &Default::default(), 7)
        .await
        .unwrap();

    let deleted = w.state.delete_run().await.unwrap();
    assert!(deleted > 0);
    tick_until_settled(&mut c).await;

    assert!(c.lease().unwrap().token > 7, "{:?}", c.lease());
    assert!(w.state.initialised().await.unwrap());
    assert_eq!(w.state.current_version().await.unwrap(), Some(0));
    let s0 = w.state.trajectory(&a0).await.unwrap().unwrap();
    assert_eq!(
        (s0.status, s0.segments.clone()),
        (TrajectoryStatus::Parked, a0_segments)
    );
    let s1 = w.state.trajectory(&a1).await.unwrap().unwrap();
    assert_eq!(
        (s1.status, s1.segments.clone()),
        (TrajectoryStatus::Parked, vec![first, later])
    );
    let sb = w
        .state
        .trajectory(&b.trajectory_ids().next().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sb.status, TrajectoryStatus::Pending);
    let claim = w.state.claim(&a1, "w", LONG).await.unwrap();
    assert!(
        claim.lease().epoch > e1 + 1 + (1 << 19),
        "{:?}",
        claim.lease()
    );
    let events = w.ledger.events(&run).await.unwrap();
    let rebuilt: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::StateRebuilt)
        .collect();
    assert_eq!(rebuilt.len(), 1, "{events:?}");
    assert!(
        rebuilt[0].detail.contains("2 pending prompts"),
        "{}",
        rebuilt[0].detail
    );
    assert_eq!(c.metrics().state_rebuilds.get(), 1);
}
