//! The trainer service over real stores (memory state, memory object store, in-memory SQLite
//! ledger): bit-identical resume from a checkpoint, checkpoint retention, and the step-board
//! loop with two trainers matching a single trainer bit for bit.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use flywheel_model::{ModelConfig, Tokenizer};
use flywheel_storage::RunStores;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::ledger::{self, StepRecord};
use flywheel_storage::state::{self, StepAnnouncement};
use flywheel_storage::testkit::redis_url;
use flywheel_storage::{
    BatchEntry, BatchManifest, FinishReason, MicroBatch, Prompt, PromptId, PromptInput, Segment,
    SegmentRef, TrajectoryId, VerifierSpec, codec, keys, weights,
};
use flywheel_trainer::{
    AdamWConfig, ExchangeKind, Exchanged, ServiceConfig, StepObserver, StepOutcome, Trainer,
    TrainerConfig, run_observed, run_until,
};

fn config() -> TrainerConfig {
    let tok = Tokenizer::arithmetic();
    // The vocabulary padded past the tokenizer's, as Qwen checkpoints pad theirs: the
    // embedding rows of ids no sequence holds never change, so publishing reuses their chunks.
    let mut model = ModelConfig::tiny(64);
    assert!(tok.vocab_size() < 64);
    model.d_model = 16;
    model.n_layers = 1;
    model.n_heads = 2;
    model.d_ff = 32;
    model.max_seq_len = 32;
    let mut c = TrainerConfig {
        seed: 11,
        model,
        optimizer: AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        poll_ms: 5,
        metrics_addr: "127.0.0.1:0".into(),
        ..TrainerConfig::default()
    };
    c.weights.chunk_bytes = 256;
    c
}

/// The trainer service's config around `trainer`.
fn service(trainer: TrainerConfig) -> ServiceConfig {
    ServiceConfig {
        trainer,
        ..ServiceConfig::default()
    }
}

async fn services(run: &str, blob: &BlobStore) -> RunStores {
    services_on("memory://", run, blob).await
}

async fn services_on(state_url: &str, run: &str, blob: &BlobStore) -> RunStores {
    let state = match state::open(state_url, run).await {
        Ok(s) => s,
        Err(e) => panic!(
            "cannot open the state store at {state_url}: {e}; start Redis with \
             scripts/services.sh or set FLYWHEEL_TEST_REDIS_URL"
        ),
    };
    // The test registers prompts itself, as the run's first leader lets workers do.
    state.mark_initialised().await.unwrap();
    let ledger = ledger::open("sqlite::memory:").await.unwrap();
    ledger
        .create_run(run, &serde_json::json!({"test": true}))
        .await
        .unwrap();
    RunStores {
        run_id: run.to_owned(),
        state,
        blobs: blob.clone(),
        ledger,
        queue: None,
    }
}

/// Registers the prompts of `steps` steps (2 prompts × 2 samples each), writes their segments
/// and batch manifests (world size `world`), and records the steps in the ledger.
async fn fixture(s: &RunStores, steps: u64, world: u32) -> Vec<BatchManifest> {
    fixture_worlds(s, &vec![world; steps as usize]).await
}

/// [`fixture`] with step s of world size `worlds[s]`.
async fn fixture_worlds(s: &RunStores, worlds: &[u32]) -> Vec<BatchManifest> {
    let mut manifests = Vec::new();
    for (step, &world) in (0u64..).zip(worlds) {
        let mut entries = Vec::new();
        let mut prompts = Vec::new();
        for p in 0..2u64 {
            let id = PromptId(format!("s{step}-p{p}"));
            let prompt = Prompt {
                id: id.clone(),
                input: PromptInput::Text(format!("{}+{}=", step + 1, p + 2)),
                verifier: VerifierSpec::ExactMatch {
                    answer: format!("{}", step + p + 3),
                },
                group_size: 2,
                metadata: BTreeMap::new(),
            };
            s.state.register_prompt(&prompt).await.unwrap();
            s.ledger.accept_prompt(&s.run_id, &prompt).await.unwrap();
            prompts.push(id.clone());
            for k in 0..2u32 {
                let t = TrajectoryId {
                    prompt: id.clone(),
                    sample: k,
                };
                let n = 5 + ((step + p + u64::from(k)) % 3) as usize;
                let tokens: Vec<u32> = (0..n)
                    .map(|j| {
                        3 + ((step as usize * 5 + p as usize * 3 + k as usize + j * 7) % 12) as u32
                    })
                    .collect();
                // Near the untrained model's log-probs (≈ −ln 64 ≈ −4.2): most tokens inside
                // [α, β], the last one far off and masked.
                let mut lps = vec![-4.0f32; n];
                lps[n - 1] = -0.05;
                let mut refs = Vec::new();
                for (seq, (tk, lp)) in tokens.chunks(3).zip(lps.chunks(3)).enumerate() {
                    let seg = Segment {
                        trajectory: t.clone(),
                        seq: seq as u32,
                        version: step,
                        lease_epoch: 1,
                        tokens: tk.to_vec(),
                        logprobs: lp.to_vec(),
                        finish: if (seq + 1) * 3 >= n {
                            FinishReason::Eos
                        } else {
                            FinishReason::None
                        },
                    };
                    let key = keys::segment(&s.run_id, &id, k, seq as u32, 1);
                    s.blobs
                        .put(&key, codec::encode(&seg).unwrap())
                        .await
                        .unwrap();
                    refs.push(SegmentRef {
                        seq: seq as u32,
                        key,
                        tokens: tk.len() as u32,
                        version: step,
                    });
                }
                entries.push(BatchEntry {
                    trajectory: t,
                    segments: refs,
                    train_start: 0,
                    // The last trajectory of each step is cut: its tail is not trained.
                    train_end: if p == 1 && k == 1 {
                        n as u32 - 2
                    } else {
                        n as u32
                    },
                    advantage: if k == 0 { 1.0 } else { -1.0 },
                });
            }
        }
        let total_tokens = entries.iter().map(BatchEntry::trained_tokens).sum();
        let mut ranks: Vec<Vec<MicroBatch>> = vec![Vec::new(); world as usize];
        for (i, e) in entries.into_iter().enumerate() {
            let r = &mut ranks[i % world as usize];
            if r.last().is_none_or(|mb: &MicroBatch| mb.entries.len() >= 2) {
                r.push(MicroBatch::default());
            }
            r.last_mut().unwrap().entries.push(e);
        }
        let manifest = BatchManifest {
            step,
            token_budget: 40,
            world_size: world,
            ranks,
            total_tokens,
            prompts,
            min_version: step,
            max_version: step,
        };
        let key = keys::step_manifest(&s.run_id, step);
        s.blobs
            .put_if_absent(&key, Bytes::from(serde_json::to_vec(&manifest).unwrap()))
            .await
            .unwrap();
        s.ledger
            // No leader runs here: the ledger's initial token, 0, is the one the test holds.
            .record_step(&s.run_id, &StepRecord::from_manifest(&manifest, key), 0)
            .await
            .unwrap();
        manifests.push(manifest);
    }
    manifests
}

/// Plays the coordinator leader: takes the leader lock and returns its token.
async fn lead(s: &RunStores) -> u64 {
    s.state
        .acquire_leader("test-leader", Duration::from_secs(600))
        .await
        .unwrap()
        .expect("the leader lock is free")
        .token
}

/// Announces `m`'s step on the board as the leader of `token`.
async fn announce(s: &RunStores, token: u64, m: &BatchManifest) {
    let announcement = StepAnnouncement {
        step: m.step,
        manifest_key: keys::step_manifest(&s.run_id, m.step),
        world_size: m.world_size,
    };
    s.state.announce_step(&announcement, token).await.unwrap();
}

/// Waits until `step` is finished; bounded, so a broken loop fails instead of hanging (not a
/// timing assertion).
async fn wait_finished(s: &RunStores, step: u64) {
    let mut waited = 0;
    while s.state.finished_step().await.unwrap() != Some(step) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(waited < 15_000, "step {step} never finished");
    }
}

/// Trains one step with a single trainer doing every rank.
async fn train_step(trainer: &mut Trainer, m: &BatchManifest) -> flywheel_trainer::StepOutcome {
    for rank in 0..m.world_size {
        let g = trainer.train_rank(m, rank).await.unwrap();
        trainer.put_rank(&g).await.unwrap();
    }
    trainer.finish(m).await.unwrap()
}

fn weight_bits(trainer: &Trainer) -> BTreeMap<String, Vec<u8>> {
    trainer.params().to_bytes_map()
}

#[tokio::test]
async fn restoring_a_checkpoint_continues_bit_identically() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("resume", &blob).await;
    let (k, m) = (3u64, 2u64);
    let manifests = fixture(&s, k + m, 2).await;
    let cfg = TrainerConfig {
        checkpoint_every: k,
        keep_versions: 2,
        ..config()
    };

    // Uninterrupted: k steps (checkpoint after the k-th), then m more.
    let mut a = Trainer::start(s.clone(), cfg.clone()).await.unwrap();
    assert_eq!(a.version(), 0);
    let mut outcomes = Vec::new();
    for man in &manifests {
        outcomes.push(train_step(&mut a, man).await);
    }
    assert_eq!(a.version(), k + m);
    let checkpointed: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.checkpointed)
        .map(|o| o.step)
        .collect();
    assert_eq!(checkpointed, [k - 1]);
    for o in &outcomes {
        let mt = &o.metrics;
        assert!(mt.tokens_trained > 0 && mt.grad_norm > 0.0 && mt.entropy > 0.0);
        assert!(
            mt.masked_fraction > 0.0 && mt.masked_fraction < 1.0,
            "{mt:?}"
        );
        assert!(mt.mean_abs_log_k > 0.0);
        eprintln!(
            "step {}: loss {:.5} |g| {:.4} H {:.3} masked {:.3} |log k| {:.3} tokens {} \
             publish {}/{} bytes ({} chunks written, {} reused)",
            o.step,
            mt.loss,
            mt.grad_norm,
            mt.entropy,
            mt.masked_fraction,
            mt.mean_abs_log_k,
            mt.tokens_trained,
            o.publish.bytes_written,
            o.publish.bytes_total,
            o.publish.chunks_written,
            o.publish.chunks_reused
        );
        // Embedding rows of ids never seen do not change (no weight decay), so their chunks
        // are reused.
        assert!(o.publish.bytes_written < o.publish.bytes_total);
        assert!(o.publish.chunks_reused > 0);
    }
    let uninterrupted = weight_bits(&a);
    drop(a);

    // Restore the checkpoint (weights v=k, optimizer after step k−1) and train the m steps.
    let (mut b, ckpt) = Trainer::restore(s.clone(), cfg.clone()).await.unwrap();
    assert_eq!(ckpt.step, k - 1);
    assert_eq!(b.version(), k);
    assert_eq!(b.optimizer().unwrap().step_count(), k);
    for man in &manifests[k as usize..] {
        // Re-publishing an existing version with different bits would fail here.
        train_step(&mut b, man).await;
    }
    assert_eq!(weight_bits(&b), uninterrupted, "resumed weights differ");

    // Retention: only the kept versions and the checkpoint's remain.
    let versions = weights::list_versions(&blob, "resume").await.unwrap();
    assert_eq!(versions, vec![k, k + m - 1, k + m]);
}

#[tokio::test]
async fn old_checkpoints_are_collected_beyond_the_number_kept() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("retention", &blob).await;
    let manifests = fixture(&s, 5, 1).await;
    let cfg = TrainerConfig {
        checkpoint_every: 1,
        keep_checkpoints: 2,
        keep_versions: 1,
        ..config()
    };
    let mut t = Trainer::start(s.clone(), cfg).await.unwrap();
    for man in &manifests {
        train_step(&mut t, man).await;
    }
    let kept: Vec<u64> = s
        .ledger
        .checkpoints("retention")
        .await
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(kept, vec![4, 3]);
    let objects: Vec<u64> = blob
        .list(&keys::checkpoints_prefix("retention"))
        .await
        .unwrap()
        .iter()
        .filter_map(|m| keys::parse_checkpoint_step("retention", &m.key))
        .collect();
    assert_eq!(objects, vec![3, 4]);
    assert_eq!(
        weights::list_versions(&blob, "retention").await.unwrap(),
        vec![4, 5]
    );
    // Every chunk left is referenced by a kept version and fetchable.
    for v in [4, 5] {
        weights::fetch(&blob, "retention", v, None, &Default::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn resume_without_a_checkpoint_is_a_clear_error() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("nockpt", &blob).await;
    let err = Trainer::restore(s, config()).await.err().unwrap();
    assert!(err.to_string().contains("no checkpoint"), "{err}");
}

/// A finisher that dies after publishing step 1's weights, writing its optimizer state and
/// collecting, but before the board marks the step finished, leaves a state from which a
/// fresh trainer redoes step 1 to the same bits (the optimizer state before the step is kept
/// until then).
#[tokio::test]
async fn a_step_whose_finisher_died_mid_finish_is_redone_to_the_same_bits() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("redo", &blob).await;
    let manifests = fixture(&s, 2, 1).await;
    let mut first = Trainer::start(s.clone(), config()).await.unwrap();
    train_step(&mut first, &manifests[0]).await;
    let done = train_step(&mut first, &manifests[1]).await;
    let want = weight_bits(&first);
    drop(first);
    let mut again = Trainer::start(s.clone(), config()).await.unwrap();
    let redone = train_step(&mut again, &manifests[1]).await;
    assert_eq!(redone.version, done.version);
    assert_eq!(weight_bits(&again), want);
}

/// At each checkpoint the segments of the trained steps it covers, beyond the last
/// `keep_segment_steps`, are deleted; the kept steps' segments stay.
#[tokio::test]
async fn trained_segments_beyond_the_audit_window_are_deleted_at_a_checkpoint() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("segments-gc", &blob).await;
    let manifests = fixture(&s, 3, 1).await;
    let config = TrainerConfig {
        checkpoint_every: 1,
        keep_segment_steps: 1,
        ..config()
    };
    let mut t = Trainer::start(s.clone(), config).await.unwrap();
    let segments_of = |step: usize| -> Vec<String> {
        let entries = manifests[step]
            .ranks
            .iter()
            .flatten()
            .flat_map(|mb| &mb.entries);
        entries
            .flat_map(|e| &e.segments)
            .map(|r| r.key.clone())
            .collect()
    };
    for m in &manifests {
        assert!(train_step(&mut t, m).await.checkpointed);
    }
    for (step, kept) in [(0, false), (1, false), (2, true)] {
        for key in segments_of(step) {
            assert_eq!(blob.exists(&key).await.unwrap(), kept, "step {step}: {key}");
        }
    }
}

/// A corrupt segment named by a committed step is never trained: its entry is left out with
/// the reason recorded, and the rest of the step trains.
#[tokio::test]
async fn a_corrupt_segment_drops_its_entry_and_the_step_trains_the_rest() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("corrupt", &blob).await;
    let manifests = fixture(&s, 1, 1).await;
    let m = &manifests[0];
    let entries: Vec<_> = m.ranks[0].iter().flat_map(|mb| &mb.entries).collect();
    let victim = entries[0];
    let total: u64 = entries.iter().map(|e| e.trained_tokens()).sum();
    blob.put(
        &victim.segments[0].key,
        Bytes::from_static(b"not a segment"),
    )
    .await
    .unwrap();
    let mut t = Trainer::start(s.clone(), config()).await.unwrap();
    let g = t
        .train_rank(m, 0)
        .await
        .expect("the rank trains without it");
    assert_eq!(
        g.stats.loss.tokens_trained,
        total - victim.trained_tokens(),
        "everything but the corrupt entry is trained"
    );
    let record = blob
        .get(&keys::step_dropped("corrupt", 0, 0))
        .await
        .unwrap();
    let dropped: Vec<flywheel_trainer::step::DroppedEntry> =
        serde_json::from_slice(&record).unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].trajectory, victim.trajectory);
    assert!(dropped[0].reason.contains("corrupt segment"), "{dropped:?}");
    // The ledger notes it too, once, even when the rank is computed again.
    t.train_rank(m, 0).await.unwrap();
    let events = s.ledger.events("corrupt").await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, ledger::EventKind::EntryDropped);
    assert!(
        events[0].detail.contains(&victim.trajectory.to_string()),
        "{events:?}"
    );
}

/// `--resume` before the first checkpoint joins the run instead of refusing to start.
#[tokio::test]
async fn resume_before_the_first_checkpoint_joins_the_run() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("resume-early", &blob).await;
    let config = ServiceConfig {
        resume: true,
        ..service(config())
    };
    let ran = run_until(s.clone(), config, async {}).await;
    ran.unwrap();
    assert!(weights::exists(&blob, "resume-early", 0).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_on_the_step_board_match_a_single_trainer_bit_for_bit() {
    two_trainers_on_the_board("memory://", "board").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_on_the_redis_step_board_match_a_single_trainer_bit_for_bit() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    two_trainers_on_the_board(&redis_url(), &format!("board-{nanos}")).await;
}

async fn two_trainers_on_the_board(state_url: &str, run: &str) {
    let blob = BlobStore::open("memory://").unwrap();
    let steps = 3u64;

    // Reference: one trainer doing every rank through the library, in its own run.
    let reference = {
        let s = services("solo", &blob).await;
        let manifests = fixture(&s, steps, 2).await;
        let mut t = Trainer::start(s, config()).await.unwrap();
        for m in &manifests {
            train_step(&mut t, m).await;
        }
        weight_bits(&t)
    };

    let s = services_on(state_url, run, &blob).await;
    let manifests = fixture(&s, steps, 2).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    for id in ["trainer-a", "trainer-b"] {
        let (s, mut rx) = (s.clone(), stop_rx.clone());
        let cfg = TrainerConfig {
            id: id.into(),
            ..config()
        };
        handles.push(tokio::spawn(async move {
            run_until(s, service(cfg), async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
        }));
    }

    // The test plays the coordinator leader.
    let lease = lead(&s).await;
    for m in &manifests {
        announce(&s, lease, m).await;
        wait_finished(&s, m.step).await;
        // The gradient objects of a finished step are deleted (by the finisher, right after
        // it marks the step finished: poll, bounded, rather than race it).
        let mut waited = 0;
        while !blob
            .list(&keys::step_grads_prefix(run, m.step))
            .await
            .unwrap()
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 1;
            assert!(
                waited < 15_000,
                "step {}'s gradients were never deleted",
                m.step
            );
        }
    }
    stop_tx.send(true).unwrap();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let fetched = weights::fetch(&blob, run, steps, None, &config().weights)
        .await
        .unwrap();
    assert_eq!(fetched.tensors, reference, "board weights differ from solo");
    assert!(
        s.state
            .live_members(flywheel_storage::state::MemberRole::Trainer)
            .await
            .unwrap()
            .is_empty(),
        "trainers leave on shutdown"
    );
}

#[tokio::test]
async fn published_weights_carry_the_model_config() {
    let blob = BlobStore::open("memory://").unwrap();
    let s = services("meta", &blob).await;
    Trainer::start(s, config()).await.unwrap();
    let m = weights::load_manifest(&blob, "meta", 0).await.unwrap();
    let model: ModelConfig =
        serde_json::from_str(&m.metadata[flywheel_storage::weights::MODEL_CONFIG_KEY]).unwrap();
    assert_eq!(model, config().model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_finisher_died_is_finished_by_another_trainer() {
    let blob = BlobStore::open("memory://").unwrap();
    let reference = {
        let s = services("solo-ghost", &blob).await;
        let manifests = fixture(&s, 1, 2).await;
        let mut t = Trainer::start(s, config()).await.unwrap();
        train_step(&mut t, &manifests[0]).await;
        weight_bits(&t)
    };

    let s = services("ghost", &blob).await;
    let manifests = fixture(&s, 1, 2).await;
    let lease = lead(&s).await;
    announce(&s, lease, &manifests[0]).await;
    // A trainer computes and completes both ranks, is told it finishes the step, and dies.
    let mut ghost = Trainer::start(s.clone(), config()).await.unwrap();
    let mut last = None;
    for _ in 0..2 {
        let claim = s
            .state
            .claim_rank(0, "ghost", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let g = ghost.train_rank(&manifests[0], claim.rank).await.unwrap();
        ghost.put_rank(&g).await.unwrap();
        last = Some(s.state.complete_rank(&claim, "ghost").await.unwrap());
    }
    assert!(last.unwrap().all_done);
    drop(ghost);

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let cfg = TrainerConfig {
        id: "rescuer".into(),
        rank_claim_ms: 50,
        ..config()
    };
    let rescuer = tokio::spawn(run_until(s.clone(), service(cfg), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    wait_finished(&s, 0).await;
    stop_tx.send(true).unwrap();
    rescuer.await.unwrap().unwrap();
    let fetched = weights::fetch(&blob, "ghost", 1, None, &config().weights)
        .await
        .unwrap();
    assert_eq!(fetched.tensors, reference);
}

#[tokio::test]
async fn a_warm_started_model_becomes_version_zero() {
    use flywheel_model::{Model, Params};
    use flywheel_trainer::AdamW;
    use flywheel_trainer::step::{SupervisedExample, supervised_step};

    let blob = BlobStore::open("memory://").unwrap();
    let s = services("warm", &blob).await;
    let cfg = config();
    let tok = Tokenizer::arithmetic();
    let mut params = Params::init(&cfg.model, cfg.seed).unwrap();
    let mut model = Model::cpu(&params).unwrap();
    let mut opt = AdamW::new(cfg.optimizer.clone()).unwrap();
    let mut tokens = tok.encode_prompt("1+2=").unwrap();
    let response_start = tokens.len();
    tokens.extend(tok.encode("3").unwrap());
    tokens.push(Tokenizer::EOS);
    let examples = [SupervisedExample {
        tokens,
        response_start,
    }];
    for _ in 0..3 {
        supervised_step(&mut model, &mut params, &mut opt, &examples, 64).unwrap();
    }
    let t = Trainer::start_with(s.clone(), cfg.clone(), Some(params.clone()))
        .await
        .unwrap();
    assert_eq!(t.version(), 0);
    assert_eq!(t.params(), &params);
    // Another trainer joining later gets the same version 0; different weights conflict.
    let joined = Trainer::start(s.clone(), cfg.clone()).await.unwrap();
    assert_eq!(joined.params(), &params);
    let other = Params::init(&cfg.model, 99).unwrap();
    assert!(Trainer::start_with(s, cfg, Some(other)).await.is_err());
}

/// A fault (a crash, or a store error) at each point of finishing a step leaves a state from
/// which any trainer finishes that step to the same bits: the same trainer trying again, or
/// a fresh one (a restarted process) that rebuilds the optimizer state by replay. The
/// optimizer state is written only at checkpoints; the bytes each step writes are reported.
#[tokio::test]
async fn a_fault_at_any_point_of_finishing_leaves_a_step_any_trainer_finishes() {
    use flywheel_trainer::FinishPoint::*;
    let cfg = TrainerConfig {
        checkpoint_every: 3,
        keep_checkpoints: 1,
        keep_versions: 1,
        keep_segment_steps: 1,
        ..config()
    };
    let reference = {
        let blob = BlobStore::open("memory://").unwrap();
        let s = services("faults-ref", &blob).await;
        let manifests = fixture(&s, 5, 2).await;
        let mut t = Trainer::start(s.clone(), cfg.clone()).await.unwrap();
        for m in &manifests {
            let o = train_step(&mut t, m).await;
            eprintln!(
                "step {}: wrote {} bytes (gradients {}, weights {} of {}, optimizer {})",
                o.step,
                o.bytes.total(),
                o.bytes.gradients,
                o.bytes.weights,
                o.publish.bytes_total,
                o.bytes.optimizer
            );
            assert_eq!(o.checkpointed, o.step == 2, "step {}", o.step);
            assert_eq!(o.bytes.optimizer > 0, o.checkpointed, "step {}", o.step);
            assert_eq!(o.replayed, 0, "the finisher of every step holds the state");
        }
        weight_bits(&t)
    };
    for point in [
        AfterPublish,
        AfterOptimizerState,
        AfterCheckpoint,
        AfterCollect,
    ] {
        for retry_with_the_same_trainer in [true, false] {
            let run = format!("faults-{point:?}-{retry_with_the_same_trainer}");
            let blob = BlobStore::open("memory://").unwrap();
            let s = services(&run, &blob).await;
            let manifests = fixture(&s, 5, 2).await;
            let mut t = Trainer::start(s.clone(), cfg.clone()).await.unwrap();
            train_step(&mut t, &manifests[0]).await;
            train_step(&mut t, &manifests[1]).await;
            for rank in 0..2 {
                let g = t.train_rank(&manifests[2], rank).await.unwrap();
                t.put_rank(&g).await.unwrap();
            }
            t.fail_at(Some(point));
            let err = t.finish(&manifests[2]).await.unwrap_err();
            assert!(err.to_string().contains("injected"), "{err}");
            if !retry_with_the_same_trainer {
                drop(t);
                t = Trainer::start(s.clone(), cfg.clone()).await.unwrap();
            }
            let redone = t.finish(&manifests[2]).await.unwrap();
            assert_eq!(redone.version, 3);
            assert_eq!(
                redone.replayed, 2,
                "{point:?}: the optimizer state before step 2 is rebuilt from the start"
            );
            for m in &manifests[3..] {
                train_step(&mut t, m).await;
            }
            assert_eq!(
                weight_bits(&t),
                reference,
                "{point:?}, same trainer: {retry_with_the_same_trainer}"
            );
            let checkpoints = s.ledger.checkpoints(&run).await.unwrap();
            assert_eq!(checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(), [2]);
        }
    }
}

/// A bf16 checkpoint's run publishes every version in bf16 while AdamW steps f32 masters
/// kept in its state: a step redone after a fault (the optimizer rebuilt by replay from a
/// checkpoint) and a run restored from a checkpoint reach the same bits as an uninterrupted one.
#[tokio::test]
async fn a_bf16_checkpoint_publishes_bf16_and_resumes_from_its_f32_masters() {
    use flywheel_model::WeightDtype;
    use flywheel_trainer::FinishPoint;
    use flywheel_trainer::loss::{LossConfig, LossMode};
    let cfg = TrainerConfig {
        hf_model: concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../model/tests/fixtures/hf/qwen2-bf16"
        )
        .into(),
        checkpoint_every: 2,
        optimizer: AdamWConfig {
            lr: 1e-3,
            ..config().optimizer
        },
        // The fixture's behaviour log-probs are far from this model's: IcePop would mask
        // every token, and nothing would train.
        loss: LossConfig {
            mode: LossMode::Grpo,
            ..LossConfig::default()
        },
        ..config()
    };
    let blob = BlobStore::open("memory://").unwrap();

    // A fault after publishing step 3: the redo replays step 2 from the checkpoint of step 1.
    let s = services("bf16-redo", &blob).await;
    let manifests = fixture(&s, 4, 2).await;
    let mut a = Trainer::start(s.clone(), cfg.clone()).await.unwrap();
    let initial = weight_bits(&a);
    for m in &manifests {
        if m.step == 3 {
            for rank in 0..m.world_size {
                let g = a.train_rank(m, rank).await.unwrap();
                a.put_rank(&g).await.unwrap();
            }
            a.fail_at(Some(FinishPoint::AfterPublish));
            assert!(a.finish(m).await.is_err());
            assert_eq!(a.finish(m).await.unwrap().replayed, 1);
        } else {
            train_step(&mut a, m).await;
        }
    }
    assert_eq!(a.optimizer().unwrap().weight_dtype(), WeightDtype::Bf16);
    let trained = weight_bits(&a);
    assert!(trained != initial, "no weight moved");
    let kept = weights::list_versions(&blob, "bf16-redo").await.unwrap();
    assert!(kept.contains(&4), "{kept:?}");
    for version in kept {
        let m = weights::load_manifest(&blob, "bf16-redo", version)
            .await
            .unwrap();
        let values: u64 = m
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>())
            .sum();
        assert_eq!(
            m.total_bytes,
            values * 2,
            "version {version} is not 2 bytes a value"
        );
        assert!(m.tensors.iter().all(|t| t.dtype == weights::Dtype::Bf16));
    }

    // Two steps, a restore from their checkpoint, two more.
    let s = services("bf16-resume", &blob).await;
    let manifests = fixture(&s, 4, 2).await;
    let mut b = Trainer::start(s.clone(), cfg.clone()).await.unwrap();
    for m in &manifests[..2] {
        train_step(&mut b, m).await;
    }
    drop(b);
    let (mut b, checkpoint) = Trainer::restore(s.clone(), cfg.clone()).await.unwrap();
    assert_eq!(checkpoint.step, 1);
    for m in &manifests[2..] {
        train_step(&mut b, m).await;
    }
    assert!(weight_bits(&b) == trained, "resumed weights differ");
}

/// A trainer on the in-process collective (the protocol NCCL runs between GPUs).
fn exchanging(id: &str) -> TrainerConfig {
    TrainerConfig {
        id: id.into(),
        exchange: ExchangeKind::InProcess,
        // Generous: the deadline only decides how long a failure takes to fall back.
        exchange_timeout_ms: 60_000,
        ..config()
    }
}

/// Waits (bounded) until `n` trainers heartbeat.
async fn wait_for_trainers(s: &RunStores, n: usize) {
    let mut waited = 0;
    while s
        .state
        .live_members(flywheel_storage::state::MemberRole::Trainer)
        .await
        .unwrap()
        .len()
        < n
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(waited < 15_000, "the trainers never joined");
    }
}

/// Records how each finished step's gradients came together.
struct Exchanges(std::sync::Arc<std::sync::Mutex<Vec<(u64, Exchanged, u64)>>>);

#[async_trait::async_trait]
impl StepObserver for Exchanges {
    async fn step_finished(&mut self, o: &StepOutcome, _: &BatchManifest, _: &Trainer) {
        let mut seen = self.0.lock().unwrap();
        seen.push((o.step, o.exchange, o.bytes.gradients));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainers_summing_their_gradients_match_the_object_store_and_re_form_when_the_world_changes()
 {
    let blob = BlobStore::open("memory://").unwrap();
    // The world shrinks to one rank at step 2 and grows back at step 3.
    let worlds = [2, 2, 1, 2];
    let reference = {
        let s = services("solo-exchange", &blob).await;
        let manifests = fixture_worlds(&s, &worlds).await;
        let mut t = Trainer::start(s, config()).await.unwrap();
        for m in &manifests {
            train_step(&mut t, m).await;
        }
        weight_bits(&t)
    };

    let run = "exchange";
    let s = services(run, &blob).await;
    let manifests = fixture_worlds(&s, &worlds).await;
    // A communicator id left by an earlier attempt at step 0: never to be taken.
    let stale = serde_json::json!({"attempt": "an-earlier-attempt", "id": [0]});
    blob.put(
        &keys::step_exchange_id(run, 0),
        Bytes::from(stale.to_string()),
    )
    .await
    .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    for id in ["trainer-a", "trainer-b"] {
        let (s, mut rx, seen) = (s.clone(), stop_rx.clone(), seen.clone());
        handles.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            run_observed(s, service(exchanging(id)), stop, &mut Exchanges(seen)).await
        }));
    }
    wait_for_trainers(&s, 2).await;
    let lease = lead(&s).await;
    for m in &manifests {
        announce(&s, lease, m).await;
        wait_finished(&s, m.step).await;
    }
    stop_tx.send(true).unwrap();
    for h in handles {
        h.await.unwrap().unwrap();
    }

    let fetched = weights::fetch(&blob, run, worlds.len() as u64, None, &config().weights)
        .await
        .unwrap();
    assert_eq!(
        fetched.tensors, reference,
        "exchanged weights differ from solo"
    );
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|(step, _, _)| *step);
    let how: Vec<(u64, Exchanged)> = seen.iter().map(|&(step, e, _)| (step, e)).collect();
    let formed = Exchanged::Summed { formed: true };
    let kept = Exchanged::Summed { formed: false };
    assert_eq!(how, vec![(0, formed), (1, kept), (2, formed), (3, formed)]);
    // Only the ranks' small objects without tensors went through the store.
    for (step, _, bytes) in seen {
        assert!(
            bytes < 100 * 2,
            "step {step} read {bytes} bytes of gradients"
        );
    }
    // The rendezvous objects are collected with the step.
    for step in 0..worlds.len() as u64 {
        let left = blob
            .list(&keys::step_exchange_prefix(run, step))
            .await
            .unwrap();
        assert!(
            left.is_empty(),
            "step {step}'s rendezvous is left: {left:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_exchanged_by_trainers_that_died_is_recomputed_to_the_same_bits() {
    let blob = BlobStore::open("memory://").unwrap();
    let reference = {
        let s = services("solo-exchange-ghosts", &blob).await;
        let manifests = fixture(&s, 1, 2).await;
        let mut t = Trainer::start(s, config()).await.unwrap();
        train_step(&mut t, &manifests[0]).await;
        weight_bits(&t)
    };

    let run = "exchange-ghosts";
    let s = services(run, &blob).await;
    let manifests = fixture(&s, 1, 2).await;
    let lease = lead(&s).await;
    announce(&s, lease, &manifests[0]).await;
    // Two trainers claim a rank each, sum their gradients, write their rank objects without
    // tensors, complete their ranks, and die before finishing.
    let mut ghosts = Vec::new();
    for id in ["ghost-a", "ghost-b"] {
        s.state
            .heartbeat(
                flywheel_storage::state::MemberRole::Trainer,
                id,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let claim = s
            .state
            .claim_rank(0, id, Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let trainer = Trainer::start(s.clone(), exchanging(id)).await.unwrap();
        ghosts.push((id, claim, trainer));
    }
    let m = &manifests[0];
    let exchanged = futures::future::join_all(ghosts.iter_mut().map(|(_, claim, t)| async move {
        let g = t.train_rank(m, claim.rank).await.unwrap();
        let how = t.exchange(m, &g).await;
        t.put_rank(&g.exchanged()).await.unwrap();
        how
    }))
    .await;
    assert_eq!(exchanged, vec![Exchanged::Summed { formed: true }; 2]);
    let mut all_done = false;
    for (id, claim, _) in &ghosts {
        all_done |= s.state.complete_rank(claim, id).await.unwrap().all_done;
    }
    assert!(all_done);
    drop(ghosts);

    // A trainer that took no part finds every rank written without tensors, takes the
    // orphaned step over and recomputes both ranks.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let cfg = TrainerConfig {
        rank_claim_ms: 50,
        ..exchanging("rescuer")
    };
    let rescuer = tokio::spawn(run_until(s.clone(), service(cfg), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    wait_finished(&s, 0).await;
    stop_tx.send(true).unwrap();
    rescuer.await.unwrap().unwrap();
    let fetched = weights::fetch(&blob, run, 1, None, &config().weights)
        .await
        .unwrap();
    assert_eq!(fetched.tensors, reference);
}
