//! The trainer service (`flywheel trainer`): the step-board loop, the finisher's update,
//! weight publication and checkpoints (DESIGN.md §6.4, §6.5).
//!
//! # Loop
//!
//! Each trainer heartbeats as a [`MemberRole::Trainer`] and polls the step board. When the
//! announced step s is not finished, it brings its weights to version s (fetching only the
//! chunks that changed), claims a rank, computes that rank's gradient sum
//! ([`Trainer::train_rank`]; the claim is renewed meanwhile), writes it to
//! [`keys::step_grads`] and completes the rank. The trainer that completes the last rank is the
//! *finisher* ([`Trainer::finish`]): it reads the W gradient objects, sums them in rank order
//! (deterministic, so a redone step gives the same bits), applies AdamW, publishes version
//! s+1 incrementally, saves the optimizer state, records a checkpoint every
//! `checkpoint_every` steps, collects what is no longer kept, then marks the step finished on
//! the board and deletes the step's gradient objects.
//!
//! # Collective exchange
//!
//! With `[trainer] exchange = "nccl"` (or `in-process`), a step whose ranks are each held by a
//! different live trainer has its ranks sum their gradients among themselves (module
//! [`exchange`]: a rendezvous in the object store, a communicator kept while its members stay
//! the same, an all-gather summed in rank order, so the bits are the object store's). Each
//! rank then writes only a small object without tensors ([`RankGradient::exchanged`]); the
//! ranks other than 0 complete first, and rank 0's trainer, after a barrier, completes last
//! and finishes the step with the sum it holds. Whatever fails (a trainer missing at the
//! rendezvous, a deadline, an NCCL error) falls back to the object store for that rank; a
//! finisher that does not hold the sum recomputes the ranks written without tensors, so
//! every mix of the two paths finishes to the same bits.
//!
//! # Optimizer state
//!
//! Any trainer may finish the next step. At every `checkpoint_every`-th step the finisher
//! writes the optimizer state after step s to `checkpoints/step-{s}/optimizer`; a *checkpoint*
//! is the ledger record naming that state and the weights manifest of version s+1. A trainer
//! that finished step s−1 itself reuses its in-memory state; any other finisher rebuilds it by
//! replaying the steps since the newest checkpoint (deterministic, so it reaches the same
//! bits). The state's step count is checked against the step (after step s it is s+1), so a
//! stale state is never applied.
//!
//! # Weight dtype
//!
//! Versions are published in the model's dtype (a bf16 checkpoint's run publishes bf16), which
//! is what every rank computes with and what exports write. For a narrower dtype than `f32`
//! the optimizer state holds the `f32` master weights (`optim` module docs), so they are
//! checkpointed and replayed with it.
//!
//! # Resume
//!
//! `--resume` ([`Trainer::restore`]) loads the ledger's latest checkpoint: weights version
//! c+1 and the optimizer state after step c; training continues at step c+1 and gives the
//! same bits as if it had never stopped. Without `--resume` a trainer joins at the newest
//! published version (publishing version 0 from the seed if there is none; the manifest's
//! create-if-absent decides a race between trainers).
//!
//! # Failures
//!
//! Finishing a step is idempotent at every point: a crash or a store error after the
//! publication, the optimizer state, the checkpoint record or the collection leaves a state
//! from which any trainer finishes the step to the same bits ([`FinishPoint`] injects the
//! faults in tests). A rank that fails (a corrupt segment, an unreachable store) is logged with its cause and
//! not completed; its claim expires and it is tried again (by any trainer). A fenced rank
//! write (the claim expired and was taken over) is logged and dropped: the new holder
//! computes the same gradient. A finisher that dies after completing the last rank is
//! replaced: once every rank's gradient is written and the step stays unfinished for longer
//! than a rank claim, any trainer finishes it (deterministic and idempotent, so a race with a
//! slow finisher is harmless).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use flywheel_model::{
    DeviceBackend, Gradients, Model, ModelConfig, ModelError, Params, TextCodec, WeightDtype,
};
use flywheel_service::admin::AdminError;
use flywheel_service::{AdminServer, ConfigError, Readiness, member_id};
use flywheel_storage::RunStores;
use flywheel_storage::blob::{BlobError, BlobStore};
use flywheel_storage::keys;
use flywheel_storage::ledger::{Checkpoint, EventKind, LedgerError, RunEvent};
use flywheel_storage::state::{MemberRole, RankClaim, StateError, StateStore, StepAnnouncement};
use flywheel_storage::weights::{
    self, Dtype, HF_SOURCE_KEY, MODEL_CONFIG_KEY, TensorBytes, WeightsConfig, WeightsError,
    WeightsManifest,
};
use flywheel_storage::{BatchManifest, PolicyVersion, PromptId, StepId};
use futures::{StreamExt, TryStreamExt};
use thiserror::Error;

use crate::config::{ServiceConfig, TrainerConfig};
use crate::exchange::{
    self, Arrival, CHUNK_VALUES, Collective, Communicator, ExchangeError, Held, NewCommunicator,
    Plan,
};
use crate::grads::{GradError, RankGradient};
use crate::loss::{LossConfig, PolicyLoss};
use crate::metrics::TrainerMetrics;
use crate::optim::{AdamW, DeviceAdamW, OptimError, StepReport};
use crate::step::{
    DroppedEntry, StepError, StepMetrics, Stitched, TrainStats, accumulate_policy, apply_update,
    load_rank, prompt_tokens,
};

/// The model on the trainer's device (`[trainer] device`).
type DeviceModel = Model<DeviceBackend>;

/// Errors of the trainer service.
#[derive(Debug, Error)]
pub enum TrainerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Weight publication or loading failed.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The object store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The state store (step board, heartbeats, prompts) failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A rank's training failed.
    #[error(transparent)]
    Step(#[from] StepError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The optimizer failed, or its saved state is unusable.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// A rank's gradient object is unusable.
    #[error("gradient object `{key}`: {source}")]
    Grad {
        /// Its key.
        key: String,
        /// What is wrong.
        #[source]
        source: GradError,
    },
    /// A batch manifest is unreadable or does not match its announcement.
    #[error("batch manifest `{key}`: {reason}")]
    Manifest {
        /// Its key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// `--resume` found no checkpoint.
    #[error(
        "run `{run}` has no checkpoint to resume from: start without --resume, or check \
         storage.ledger_url"
    )]
    NoCheckpoint {
        /// The run.
        run: String,
    },
    /// The admin server could not start.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// Stored state contradicts itself (e.g. an optimizer state of the wrong step).
    #[error("inconsistent trainer state: {0}")]
    Inconsistent(String),
    /// A test-injected failure.
    #[error("injected failure at {0:?}")]
    Injected(FinishPoint),
}

/// What publishing a version cost, against its full size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Bytes uploaded.
    pub bytes_written: u64,
    /// Size of the version.
    pub bytes_total: u64,
    /// Chunks uploaded.
    pub chunks_written: u64,
    /// Chunk references reused.
    pub chunks_reused: u64,
}

/// Bytes a step wrote to the object store, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepBytes {
    /// The ranks' gradient objects.
    pub gradients: u64,
    /// The new version's weights (only the chunks that changed).
    pub weights: u64,
    /// The optimizer state (only at a checkpoint).
    pub optimizer: u64,
}

impl StepBytes {
    /// Everything the step wrote.
    pub fn total(&self) -> u64 {
        self.gradients + self.weights + self.optimizer
    }
}

/// Where a test makes [`Trainer::finish`] fail (as a crash or a store error would) after
/// doing that much of the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishPoint {
    /// After publishing the new version.
    AfterPublish,
    /// After writing the optimizer state (a checkpoint step).
    AfterOptimizerState,
    /// After recording the checkpoint in the ledger.
    AfterCheckpoint,
    /// After collecting what is no longer kept (just before the board marks the step
    /// finished).
    AfterCollect,
}

/// What [`Trainer::finish`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// The step trained.
    pub step: StepId,
    /// The version published (= step + 1).
    pub version: PolicyVersion,
    /// Loss, gradient norm, entropy, masked fraction, mean |log k|, tokens, time.
    pub metrics: StepMetrics,
    /// What the publication of `version` wrote.
    pub publish: PublishStats,
    /// What the step wrote, by kind.
    pub bytes: StepBytes,
    /// Whether a checkpoint was recorded after this step.
    pub checkpointed: bool,
    /// Steps replayed to rebuild the optimizer state before this one (0 when this trainer
    /// held it).
    pub replayed: u64,
    /// How the finisher's time went, by phase: `gradients` (reading and summing the ranks'),
    /// `optimizer` (replay and AdamW), `publish`, `checkpoint`, `collect`.
    pub phases: Vec<(&'static str, Duration)>,
    /// How the finisher's own rank of the step went ([`Exchanged::Store`] if it computed
    /// none): an exchanged step is finished by its rank 0's trainer, with the sum it holds.
    pub exchange: Exchanged,
}

/// The key of the optimizer state after step `step`.
fn optimizer_key(run: &str, step: StepId) -> String {
    keys::checkpoint_object(run, step, "optimizer")
}

/// A trainer's optimizer: on the host, or stepping where the model holds its weights.
enum Optimizer {
    Host(AdamW),
    Device(DeviceAdamW<DeviceBackend>),
}

impl Optimizer {
    fn host(&self) -> &AdamW {
        match self {
            Optimizer::Host(host) => host,
            Optimizer::Device(device) => device.host(),
        }
    }

    fn step_count(&self) -> u64 {
        self.host().step_count()
    }

    /// The saved state (downloaded from the device first).
    fn state_bytes(&mut self, model: &DeviceModel) -> Result<Vec<u8>, OptimError> {
        Ok(match self {
            Optimizer::Host(host) => host.state_bytes(),
            Optimizer::Device(device) => device.to_host(model)?.state_bytes(),
        })
    }
}

/// One trainer process's model, weights and optimizer.
pub struct Trainer {
    stores: RunStores,
    config: TrainerConfig,
    tokenizer: TextCodec,
    /// The host copy of the weights of `version`.
    params: Params,
    /// The model holding `params`; `None` while a rank is computed on a blocking thread (or
    /// after such a computation was cancelled: it is then rebuilt from `params`).
    model: Option<DeviceModel>,
    /// Where the model runs (every model of this trainer shares it).
    backend: DeviceBackend,
    /// The manifest of `version`.
    manifest: WeightsManifest,
    /// `version`'s tensors as published bytes (what incremental fetches reuse).
    bytes: BTreeMap<String, Vec<u8>>,
    /// The optimizer after the last step this trainer finished or restored (its step count is
    /// the version it produced); `None` when it must be loaded.
    optimizer: Option<Optimizer>,
    /// Gradient buffers on the model's device, allocated once: a rank's accumulators, then
    /// the step's sum for the optimizer there. `None` while a computation holds them.
    device_grads: Option<Gradients<DeviceBackend>>,
    /// Prompt tokens already resolved.
    prompts: BTreeMap<PromptId, Vec<u32>>,
    /// When this trainer started working on a step (for the step time).
    step_started: Option<(StepId, Instant)>,
    /// Sums a step's ranks among trainers (`[trainer] exchange`); `None`: the object store
    /// alone.
    collective: Option<Arc<dyn Collective>>,
    /// The communicator kept from the last exchange, reused while its members stay.
    communicator: Option<(Held, Box<dyn Communicator>)>,
    /// A step's gradient summed by an exchange, kept to finish the step without reading it.
    summed: Option<(StepId, Params)>,
    /// How the last rank this trainer computed went, and its step.
    last_exchange: Option<(StepId, Exchanged)>,
    /// Tests: fail the next finish at this point.
    fail_at: Option<FinishPoint>,
}

/// How one rank's gradient went ([`Trainer::exchange`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exchanged {
    /// Through the object store (no collective, or the step is not eligible).
    Store,
    /// Through the object store after a failed attempt (logged).
    FellBack,
    /// Summed among the step's trainers; `formed` when the communicator is new.
    Summed {
        /// Whether a new communicator was formed for it.
        formed: bool,
    },
}

impl Trainer {
    /// Joins the run at its newest published version, publishing version 0 from
    /// `config.seed` if no version exists yet.
    pub async fn start(stores: RunStores, config: TrainerConfig) -> Result<Self, TrainerError> {
        Self::start_with(stores, config, None).await
    }

    /// Like [`Trainer::start`], with `initial` as version 0 instead of the seeded
    /// initialisation (e.g. weights warm-started with [`crate::step::supervised_step`]).
    /// `initial` must have the shape of `config.model`. If version 0 already exists with other
    /// weights, this is a [`WeightsError::VersionConflict`].
    pub async fn start_with(
        stores: RunStores,
        mut config: TrainerConfig,
        initial: Option<Params>,
    ) -> Result<Self, TrainerError> {
        config.resolve_hf_model()?;
        config.validate()?;
        let run = stores.run_id.clone();
        if let Some(p) = &initial {
            Params::zeros(&config.model)?.check_same_layout(p)?;
        }
        let fresh = !weights::exists(&stores.blobs, &run, 0).await?
            && weights::latest_version(&stores.blobs, &run)
                .await?
                .is_none();
        if initial.is_some() || fresh {
            let params = match initial {
                Some(p) => p,
                None => config.initial_params()?,
            };
            let metadata = weights_metadata(&config);
            let report = publish_params(
                &stores.blobs,
                &run,
                0,
                &params,
                None,
                &metadata,
                &config.weights,
            )
            .await?;
            tracing::info!(
                run = %run,
                bytes = report.bytes_total,
                created = report.manifest_created,
                "published initial weights (version 0)"
            );
        }
        let version = weights::latest_version(&stores.blobs, &run)
            .await?
            .unwrap_or(0);
        Self::at_version(stores, config, version, None).await
    }

    /// Restores the ledger's latest checkpoint (`--resume`): weights and optimizer state.
    /// Returns the trainer and the checkpoint.
    pub async fn restore(
        stores: RunStores,
        mut config: TrainerConfig,
    ) -> Result<(Self, Checkpoint), TrainerError> {
        config.resolve_hf_model()?;
        config.validate()?;
        let run = stores.run_id.clone();
        let checkpoint = stores
            .ledger
            .latest_checkpoint(&run)
            .await?
            .ok_or_else(|| TrainerError::NoCheckpoint { run: run.clone() })?;
        let version =
            keys::parse_weights_manifest(&run, &checkpoint.weights_key).ok_or_else(|| {
                TrainerError::Inconsistent(format!(
                    "checkpoint of step {} names weights `{}`, not a weights manifest of run \
                     `{run}`",
                    checkpoint.step, checkpoint.weights_key
                ))
            })?;
        if version != checkpoint.step + 1 {
            return Err(TrainerError::Inconsistent(format!(
                "checkpoint of step {} names weights version {version}",
                checkpoint.step
            )));
        }
        let optimizer = load_optimizer(&stores.blobs, &config, &checkpoint).await?;
        let trainer = Self::at_version(stores, config, version, Some(optimizer)).await?;
        tracing::info!(run = %run, step = checkpoint.step, version, "restored checkpoint");
        Ok((trainer, checkpoint))
    }

    async fn at_version(
        stores: RunStores,
        config: TrainerConfig,
        version: PolicyVersion,
        optimizer: Option<AdamW>,
    ) -> Result<Self, TrainerError> {
        let fetched = weights::fetch(
            &stores.blobs,
            &stores.run_id,
            version,
            None,
            &config.weights,
        )
        .await?;
        let params = Params::from_bytes_map(&config.model, &fetched.tensors)?;
        let (backend, device) = DeviceBackend::open(config.device, config.products)?;
        tracing::info!(%device, "trainer device");
        let model = Model::new(backend.clone(), &params)?;
        let collective = exchange::open(config.exchange, backend.cuda_ordinal())
            .map_err(|e| ConfigError::new("trainer.exchange", e.0))?;
        Ok(Trainer {
            collective,
            communicator: None,
            summed: None,
            last_exchange: None,
            backend,
            tokenizer: config.text_codec()?,
            stores,
            config,
            params,
            model: Some(model),
            manifest: fetched.manifest,
            bytes: fetched.tensors,
            optimizer: optimizer.map(Optimizer::Host),
            device_grads: None,
            prompts: BTreeMap::new(),
            step_started: None,
            fail_at: None,
        })
    }

    /// Makes the next [`Trainer::finish`] fail at `point` (tests).
    pub fn fail_at(&mut self, point: Option<FinishPoint>) {
        self.fail_at = point;
    }

    fn check_fault(&mut self, point: FinishPoint) -> Result<(), TrainerError> {
        if self.fail_at == Some(point) {
            self.fail_at = None;
            return Err(TrainerError::Injected(point));
        }
        Ok(())
    }

    /// The version of the weights this trainer holds.
    pub fn version(&self) -> PolicyVersion {
        self.manifest.version
    }

    /// The weights this trainer holds.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The optimizer's state, if this trainer holds it (its moments as of the last checkpoint
    /// when it steps on the device).
    pub fn optimizer(&self) -> Option<&AdamW> {
        self.optimizer.as_ref().map(Optimizer::host)
    }

    /// Brings the weights to `version`, fetching only the chunks that changed.
    pub async fn sync_to(&mut self, version: PolicyVersion) -> Result<(), TrainerError> {
        if self.version() == version {
            return Ok(());
        }
        let fetched = weights::fetch(
            &self.stores.blobs,
            &self.stores.run_id,
            version,
            Some((&self.manifest, &self.bytes)),
            &self.config.weights,
        )
        .await?;
        let params = Params::from_bytes_map(&self.config.model, &fetched.tensors)?;
        self.model_mut()?.load_params(&params)?;
        tracing::debug!(
            version,
            bytes_fetched = fetched.bytes_fetched,
            bytes_total = fetched.manifest.total_bytes,
            "weights updated"
        );
        self.params = params;
        self.manifest = fetched.manifest;
        self.bytes = fetched.tensors;
        Ok(())
    }

    /// The model; rebuilt from the host weights if a cancelled rank computation took it.
    fn model_mut(&mut self) -> Result<&mut DeviceModel, ModelError> {
        if self.model.is_none() {
            self.model = Some(Model::new(self.backend.clone(), &self.params)?);
        }
        Ok(self.model.as_mut().expect("just set"))
    }

    /// Resolves the token ids of every prompt of rank `rank`'s entries.
    async fn resolve_prompts(
        &mut self,
        manifest: &BatchManifest,
        rank: u32,
    ) -> Result<(), TrainerError> {
        let ids: Vec<PromptId> = manifest
            .ranks
            .get(rank as usize)
            .into_iter()
            .flatten()
            .flat_map(|mb| &mb.entries)
            .map(|e| e.trajectory.prompt.clone())
            .filter(|p| !self.prompts.contains_key(p))
            .collect();
        for id in ids {
            if self.prompts.contains_key(&id) {
                continue;
            }
            // The state store forgets a trained prompt when it is lost and rebuilt; the
            // ledger keeps every prompt.
            let prompt = match self.stores.state.prompt(&id).await? {
                Some(p) => p,
                None => self
                    .stores
                    .ledger
                    .prompt(&self.stores.run_id, &id)
                    .await?
                    .ok_or_else(|| StepError::Prompt {
                        prompt: id.clone(),
                        reason: "neither the state store nor the ledger has it".into(),
                    })?,
            };
            let tokens = prompt_tokens(&prompt, &self.tokenizer)?;
            self.prompts.insert(id, tokens);
        }
        Ok(())
    }

    /// Computes rank `rank`'s gradient sum for `manifest` under θ_old = version `step`.
    pub async fn train_rank(
        &mut self,
        manifest: &BatchManifest,
        rank: u32,
    ) -> Result<RankGradient, TrainerError> {
        let started = Instant::now();
        if self.step_started.is_none_or(|(s, _)| s != manifest.step) {
            self.step_started = Some((manifest.step, started));
        }
        self.sync_to(manifest.step).await?;
        self.resolve_prompts(manifest, rank).await?;
        let loaded = load_rank(
            &self.stores.blobs,
            manifest,
            rank,
            &self.prompts,
            self.config.fetch_concurrency,
        )
        .await?;
        if !loaded.dropped.is_empty() {
            self.record_dropped(manifest.step, rank, &loaded.dropped)
                .await?;
        }
        self.model_mut()?;
        let model = self.model.take().expect("model_mut just ensured it");
        let (grads, stats, model) =
            match self.compute_on(model, manifest, loaded.micro_batches).await {
                Ok(done) => done,
                Err(e) => {
                    // The model went with a failed computation: rebuild it from the host weights.
                    self.model = Some(Model::new(self.backend.clone(), &self.params)?);
                    return Err(e);
                }
            };
        self.model = Some(model);
        tracing::debug!(
            step = manifest.step,
            rank,
            tokens = stats.loss.tokens_trained,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rank computed"
        );
        Ok(RankGradient {
            step: manifest.step,
            rank,
            stats,
            grads: Some(grads),
        })
    }

    /// Loads rank `rank` of `manifest` (its prompts resolved) and computes its gradient sum on
    /// `model` (replay: a model at the step's θ_old that is not this trainer's).
    async fn compute_rank_on(
        &mut self,
        model: DeviceModel,
        manifest: &BatchManifest,
        rank: u32,
    ) -> Result<(Params, TrainStats, DeviceModel), TrainerError> {
        self.resolve_prompts(manifest, rank).await?;
        let loaded = load_rank(
            &self.stores.blobs,
            manifest,
            rank,
            &self.prompts,
            self.config.fetch_concurrency,
        )
        .await?;
        self.compute_on(model, manifest, loaded.micro_batches).await
    }

    /// The forward/loss/backward of a rank's micro-batches on a blocking thread; the model
    /// comes back with the result.
    async fn compute_on(
        &mut self,
        model: DeviceModel,
        manifest: &BatchManifest,
        batch: Vec<Vec<Stitched>>,
    ) -> Result<(Params, TrainStats, DeviceModel), TrainerError> {
        let loss = PolicyLoss::new(LossConfig {
            token_budget: manifest.token_budget,
            ..self.config.loss.clone()
        })
        .map_err(StepError::from)?;
        let buffers = self.device_grads.take();
        let joined = tokio::task::spawn_blocking(move || {
            let result = (|| {
                let mut buffers = match buffers {
                    Some(b) => b,
                    None => model.new_gradients()?,
                };
                let computed = compute_rank(&model, &loss, &batch, &mut buffers)?;
                Ok::<_, StepError>((computed, buffers))
            })();
            (model, result)
        })
        .await;
        let (model, result) = joined
            .map_err(|e| TrainerError::Inconsistent(format!("rank computation failed: {e}")))?;
        let ((grads, stats), buffers) = result?;
        self.device_grads = Some(buffers);
        Ok((grads, stats, model))
    }

    /// Records the entries of a rank left out of its step (their data is unusable) in the
    /// ledger's notes and at [`keys::step_dropped`]: keyed by step and trajectory, so a redone
    /// rank records nothing twice.
    async fn record_dropped(
        &self,
        step: StepId,
        rank: u32,
        dropped: &[DroppedEntry],
    ) -> Result<(), TrainerError> {
        let run = &self.stores.run_id;
        for d in dropped {
            tracing::warn!(step, rank, trajectory = %d.trajectory, reason = %d.reason, "entry dropped from its step: its data is unusable");
            let event = RunEvent {
                key: format!("entry-dropped/step-{step}/{}", d.trajectory),
                kind: EventKind::EntryDropped,
                detail: format!(
                    "step {step} rank {rank}: {} left out: {}",
                    d.trajectory, d.reason
                ),
            };
            self.stores.ledger.record_event(run, &event).await?;
        }
        let key = keys::step_dropped(run, step, rank);
        let body = serde_json::to_vec(dropped).map_err(|e| {
            TrainerError::Inconsistent(format!("cannot encode the dropped entries: {e}"))
        })?;
        self.stores.blobs.put(&key, Bytes::from(body)).await?;
        Ok(())
    }

    /// Sums `gradient` with the other ranks of its step through the collective exchange
    /// (module [`exchange`]) when the step is eligible. On [`Exchanged::Summed`] this trainer
    /// holds the step's sum and the rank's object needs no tensors
    /// ([`RankGradient::exchanged`]); otherwise the object store carries the gradient, and a
    /// failed attempt is logged with its cause.
    pub async fn exchange(
        &mut self,
        manifest: &BatchManifest,
        gradient: &RankGradient,
    ) -> Exchanged {
        let exchanged = self.exchange_rank(manifest, gradient).await;
        self.last_exchange = Some((manifest.step, exchanged));
        exchanged
    }

    async fn exchange_rank(
        &mut self,
        manifest: &BatchManifest,
        gradient: &RankGradient,
    ) -> Exchanged {
        let (Some(collective), Some(grads)) = (self.collective.clone(), &gradient.grads) else {
            return Exchanged::Store;
        };
        let deadline = Instant::now() + Duration::from_millis(self.config.exchange_timeout_ms);
        let (step, rank) = (manifest.step, gradient.rank);
        match self.eligible(manifest).await {
            Ok(None) => {}
            Ok(Some(reason)) => {
                tracing::debug!(step, rank, reason, "step not exchanged");
                return Exchanged::Store;
            }
            Err(e) => {
                tracing::warn!(step, rank, error = %e, "gradient exchange skipped");
                return Exchanged::FellBack;
            }
        }
        match self
            .exchange_with(collective, manifest, rank, grads.clone(), deadline)
            .await
        {
            Ok(formed) => {
                tracing::debug!(step, rank, formed, "gradients summed by the exchange");
                Exchanged::Summed { formed }
            }
            Err(e) => {
                // A communicator that failed once is not trusted again.
                self.communicator = None;
                tracing::warn!(step, rank, error = %e, "gradient exchange failed; the rank goes through the object store");
                Exchanged::FellBack
            }
        }
    }

    /// Why `manifest`'s step cannot be exchanged collectively, or `None` if it can be tried.
    async fn eligible(&self, manifest: &BatchManifest) -> Result<Option<String>, TrainerError> {
        let (run, blobs) = (&self.stores.run_id, &self.stores.blobs);
        let written = blobs
            .list(&keys::step_grads_prefix(run, manifest.step))
            .await?;
        if !written.is_empty() {
            return Ok(Some(format!(
                "{} rank(s) already went through the object store",
                written.len()
            )));
        }
        let live = self
            .stores
            .state
            .live_members(MemberRole::Trainer)
            .await?
            .len();
        if live < manifest.world_size as usize {
            return Ok(Some(format!(
                "{live} trainer(s) alive for {} ranks",
                manifest.world_size
            )));
        }
        Ok(None)
    }

    /// The exchange itself: arrival, plan, communicator, sum. Returns whether a new
    /// communicator was formed.
    async fn exchange_with(
        &mut self,
        collective: Arc<dyn Collective>,
        manifest: &BatchManifest,
        rank: u32,
        grads: Params,
        deadline: Instant,
    ) -> Result<bool, ExchangeError> {
        let arrivals = self.rendezvous(manifest, rank, deadline).await?;
        let plan = exchange::plan(&arrivals)?;
        let world = arrivals.len();
        let order = plan.order(world);
        let ((held, mut comm), formed) = match (plan, self.communicator.take()) {
            (Plan::Reuse { .. }, Some(kept)) => (kept, false),
            (Plan::Reuse { .. }, None) => {
                return Err(ExchangeError("told to keep a communicator it lacks".into()));
            }
            (Plan::Form, _) => {
                let id = self
                    .new_communicator(&*collective, manifest, &arrivals[0], rank, deadline)
                    .await?;
                let rank = rank as usize;
                let connect_to = id.clone();
                let comm = blocking(move || collective.connect(&connect_to, world, rank, deadline))
                    .await?;
                let held = Held {
                    id,
                    size: world,
                    rank,
                };
                ((held, comm), true)
            }
        };
        let (sum, comm) = blocking(move || {
            let sum =
                exchange::all_gather_sum(comm.as_mut(), &grads, &order, CHUNK_VALUES, deadline);
            sum.map(|s| (s, comm))
        })
        .await?;
        self.communicator = Some((held, comm));
        self.summed = Some((manifest.step, sum));
        Ok(formed)
    }

    /// Writes this rank's [`Arrival`] and reads every rank's, polling until all
    /// `world_size` are there or `deadline` passes.
    async fn rendezvous(
        &self,
        manifest: &BatchManifest,
        rank: u32,
        deadline: Instant,
    ) -> Result<Vec<Arrival>, ExchangeError> {
        let (run, blobs, step) = (&self.stores.run_id, &self.stores.blobs, manifest.step);
        let store = |e: BlobError| ExchangeError(format!("rendezvous: {e}"));
        let arrival = Arrival {
            rank,
            member: self.config.id.clone(),
            held: self.communicator.as_ref().map(|(held, _)| held.clone()),
            attempt: (rank == 0).then(new_attempt),
        };
        let body = serde_json::to_vec(&arrival).expect("an arrival serialises");
        blobs
            .put(&keys::step_exchange(run, step, rank), Bytes::from(body))
            .await
            .map_err(store)?;
        let world = manifest.world_size as usize;
        let prefix = keys::step_exchange_prefix(run, step);
        let poll = Duration::from_millis(self.config.poll_ms.min(50));
        loop {
            let listed = blobs.list(&prefix).await.map_err(store)?;
            let arrived = listed.iter().filter(|m| m.key.contains("/rank-")).count();
            if arrived >= world {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ExchangeError(format!(
                    "{arrived} of {world} ranks' trainers arrived before the deadline"
                )));
            }
            tokio::time::sleep(poll).await;
        }
        let mut arrivals = Vec::with_capacity(world);
        for r in 0..world as u32 {
            let body = blobs
                .get(&keys::step_exchange(run, step, r))
                .await
                .map_err(store)?;
            let arrival: Arrival = serde_json::from_slice(&body)
                .map_err(|e| ExchangeError(format!("rank {r}'s arrival is unreadable: {e}")))?;
            arrivals.push(arrival);
        }
        Ok(arrivals)
    }

    /// The id of the communicator the step's members form: made and written by rank
    /// 0's holder, read by the others once it carries the attempt of rank 0's `first` arrival.
    async fn new_communicator(
        &self,
        collective: &dyn Collective,
        manifest: &BatchManifest,
        first: &Arrival,
        rank: u32,
        deadline: Instant,
    ) -> Result<Vec<u8>, ExchangeError> {
        let (run, blobs) = (&self.stores.run_id, &self.stores.blobs);
        let key = keys::step_exchange_id(run, manifest.step);
        let store = |e: BlobError| ExchangeError(format!("communicator id: {e}"));
        let attempt = first.attempt.clone().unwrap_or_default();
        if rank == 0 {
            let new = NewCommunicator {
                attempt,
                id: collective.new_id()?,
            };
            let body = serde_json::to_vec(&new).expect("an id serialises");
            blobs.put(&key, Bytes::from(body)).await.map_err(store)?;
            return Ok(new.id);
        }
        let poll = Duration::from_millis(self.config.poll_ms.min(50));
        loop {
            match blobs.get(&key).await {
                Ok(body) => {
                    let new: NewCommunicator = serde_json::from_slice(&body)
                        .map_err(|e| ExchangeError(format!("communicator id unreadable: {e}")))?;
                    if new.attempt == attempt {
                        return Ok(new.id);
                    }
                }
                Err(BlobError::NotFound { .. }) => {}
                Err(e) => return Err(store(e)),
            }
            if Instant::now() >= deadline {
                return Err(ExchangeError(
                    "rank 0's trainer wrote no communicator id before the deadline".into(),
                ));
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Waits until every member of the last exchange reached this call (or the exchange
    /// deadline passed). The ranks of an exchanged step call it around completing their
    /// rank so that rank 0's trainer, which holds the sum, completes last and finishes the
    /// step. A barrier that fails drops the communicator; the board decides the rest.
    pub async fn exchange_barrier(&mut self) {
        let Some((held, mut comm)) = self.communicator.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_millis(self.config.exchange_timeout_ms);
        match blocking(move || exchange::barrier(comm.as_mut(), deadline).map(|()| comm)).await {
            Ok(comm) => self.communicator = Some((held, comm)),
            Err(e) => {
                tracing::warn!(error = %e, "exchange barrier failed; the communicator is dropped")
            }
        }
    }

    /// Writes a rank's gradient object (deterministic content: a redone rank writes the same).
    pub async fn put_rank(&self, gradient: &RankGradient) -> Result<(), TrainerError> {
        let key = keys::step_grads(&self.stores.run_id, gradient.step, gradient.rank);
        self.stores
            .blobs
            .put(&key, Bytes::from(gradient.to_bytes()))
            .await?;
        Ok(())
    }

    /// The finisher's work for `manifest`'s step s: sum the ranks' gradients in rank order,
    /// AdamW, publish version s+1, save the optimizer state, checkpoint and collect. Does not
    /// touch the step board (the service loop does).
    pub async fn finish(&mut self, manifest: &BatchManifest) -> Result<StepOutcome, TrainerError> {
        let result = self.finish_inner(manifest).await;
        if result.is_err() {
            // The in-memory optimizer may have moved: reload it from storage next time.
            self.optimizer = None;
            let params = self.params.clone();
            self.model_mut()?.load_params(&params)?;
        }
        result
    }

    /// `host` as this trainer steps it: on the model's device when the weights' dtype allows
    /// ([`DeviceAdamW::supports`]; the CPU backend included, with the same bits), else on the
    /// host.
    fn optimizer_for(&mut self, host: AdamW) -> Result<Optimizer, TrainerError> {
        if !DeviceAdamW::<DeviceBackend>::supports(host.weight_dtype()) {
            return Ok(Optimizer::Host(host));
        }
        let model = self.model_mut()?;
        Ok(Optimizer::Device(DeviceAdamW::new(host, model)?))
    }

    /// One optimizer step with the step's summed gradient; returns its report and the new
    /// weights (the model holds them too).
    fn apply(
        &mut self,
        optimizer: &mut Optimizer,
        grads: &Params,
    ) -> Result<(StepReport, Params), TrainerError> {
        match optimizer {
            Optimizer::Host(host) => {
                let mut params = self.params.clone();
                let report = apply_update(self.model_mut()?, &mut params, host, grads)?;
                Ok((report, params))
            }
            Optimizer::Device(device) => {
                let mut device_grads = match self.device_grads.take() {
                    Some(g) => g,
                    None => self.model_mut()?.new_gradients()?,
                };
                let model = self.model_mut()?;
                model.upload_gradients(grads, &mut device_grads)?;
                let report = device.step(model, &device_grads)?;
                let params = model.to_params()?;
                self.device_grads = Some(device_grads);
                Ok((report, params))
            }
        }
    }

    async fn finish_inner(
        &mut self,
        manifest: &BatchManifest,
    ) -> Result<StepOutcome, TrainerError> {
        let step = manifest.step;
        let started = match self.step_started {
            Some((s, t)) if s == step => t,
            _ => Instant::now(),
        };
        self.sync_to(step).await?;
        let mut phases = Phases::default();
        let (grads, stats, gradient_bytes) = self.sum_ranks(manifest).await?;
        phases.end("gradients");
        let (optimizer, replayed) = match self.optimizer.take() {
            Some(o) if o.step_count() == step => (o, 0),
            _ => {
                let (host, replayed) = self.replay_to(step).await?;
                (Optimizer::Host(host), replayed)
            }
        };
        // A replayed or restored state moves to the device before its first step there.
        let mut optimizer = match optimizer {
            Optimizer::Host(host) => self.optimizer_for(host)?,
            on_device => on_device,
        };
        let (report, params) = self.apply(&mut optimizer, &grads)?;
        phases.end("optimizer");
        let version = step + 1;
        let run = self.stores.run_id.clone();
        let published = publish_params(
            &self.stores.blobs,
            &run,
            version,
            &params,
            Some(&self.manifest),
            &self.manifest.metadata,
            &self.config.weights,
        )
        .await?;
        phases.end("publish");
        self.check_fault(FinishPoint::AfterPublish)?;
        let checkpointed = version.is_multiple_of(self.config.checkpoint_every);
        let mut optimizer_bytes = 0;
        if checkpointed {
            let state = optimizer.state_bytes(self.model.as_ref().expect("the model is held"))?;
            optimizer_bytes = state.len() as u64;
            self.stores
                .blobs
                .put(&optimizer_key(&run, step), Bytes::from(state))
                .await?;
            self.check_fault(FinishPoint::AfterOptimizerState)?;
            self.stores
                .ledger
                .record_checkpoint(
                    &run,
                    &Checkpoint {
                        step,
                        weights_key: keys::weights_manifest(&run, version),
                        optimizer_key: optimizer_key(&run, step),
                    },
                )
                .await?;
            self.check_fault(FinishPoint::AfterCheckpoint)?;
            phases.end("checkpoint");
        }
        self.collect(step).await?;
        if checkpointed {
            self.collect_segments(step).await?;
        }
        phases.end("collect");
        self.check_fault(FinishPoint::AfterCollect)?;

        let metrics = StepMetrics::new(&stats, &report, started.elapsed());
        let publish = PublishStats {
            bytes_written: published.bytes_written,
            bytes_total: published.bytes_total,
            chunks_written: published.chunks_written,
            chunks_reused: published.chunks_reused,
        };
        let bytes = StepBytes {
            gradients: gradient_bytes,
            weights: published.bytes_written,
            optimizer: optimizer_bytes,
        };
        self.bytes = params.to_bytes_map();
        self.params = params;
        self.manifest = published.manifest;
        self.optimizer = Some(optimizer);
        self.step_started = None;
        Ok(StepOutcome {
            step,
            version,
            metrics,
            publish,
            bytes,
            checkpointed,
            replayed,
            phases: phases.done,
            exchange: match self.last_exchange {
                Some((s, exchanged)) if s == step => exchanged,
                _ => Exchanged::Store,
            },
        })
    }

    /// The optimizer state before step `step` (its step count is `step`), rebuilt by replay
    /// (module docs): from the newest checkpoint before `step` (or from the start), each later
    /// step's gradient is recomputed from its manifest and segments and applied. The weights
    /// reached must be the ones this trainer holds (version `step`, as published). Returns
    /// the state and the number of steps replayed.
    async fn replay_to(&mut self, step: StepId) -> Result<(AdamW, u64), TrainerError> {
        let run = self.stores.run_id.clone();
        let checkpoint = self
            .stores
            .ledger
            .checkpoints(&run)
            .await?
            .into_iter()
            .find(|c| c.step < step);
        let (mut optimizer, from) = match &checkpoint {
            Some(c) => (
                load_optimizer(&self.stores.blobs, &self.config, c).await?,
                c.step + 1,
            ),
            None => (
                AdamW::with_weight_dtype(self.config.optimizer.clone(), self.config.model.dtype)?,
                0,
            ),
        };
        if from == step {
            return Ok((optimizer, 0));
        }
        let fetched =
            weights::fetch(&self.stores.blobs, &run, from, None, &self.config.weights).await?;
        let mut params = Params::from_bytes_map(&self.config.model, &fetched.tensors)?;
        let mut model = Model::new(self.backend.clone(), &params)?;
        for t in from..step {
            let key = keys::step_manifest(&run, t);
            let manifest = load_batch_manifest(&self.stores.blobs, &key, t, None).await?;
            let mut ranks = Vec::with_capacity(manifest.world_size as usize);
            for rank in 0..manifest.world_size {
                let (grads, _, returned) = self.compute_rank_on(model, &manifest, rank).await?;
                model = returned;
                ranks.push(grads);
            }
            let grads = sum_gradients(&self.config.model, &ranks)?;
            apply_update(&mut model, &mut params, &mut optimizer, &grads)?;
        }
        if params.to_bytes_map() != self.params.to_bytes_map() {
            return Err(TrainerError::Inconsistent(format!(
                "replaying steps {from}..{step} from {} did not give the published weights of \
                 version {step}: a manifest or segment of those steps changed after it was \
                 trained",
                checkpoint.map_or("version 0".into(), |c| format!(
                    "the checkpoint of step {}",
                    c.step
                )),
            )));
        }
        tracing::info!(
            step,
            from,
            replayed = step - from,
            "optimizer state rebuilt by replay"
        );
        Ok((optimizer, step - from))
    }

    /// Reads the W gradient objects and sums them in rank order; also returns their size.
    /// A rank summed by the step's exchange has no tensors: the sum this trainer holds from
    /// that exchange is used, or, if it holds none, such ranks are recomputed here
    /// (deterministic: the same bits).
    async fn sum_ranks(
        &mut self,
        manifest: &BatchManifest,
    ) -> Result<(Params, TrainStats, u64), TrainerError> {
        let model_cfg = &self.config.model;
        let step = manifest.step;
        // `buffered` keeps rank order while fetching concurrently; the futures own what they
        // use so they are `Send` for any caller (rust-lang/rust#102211).
        let ranks: Vec<(RankGradient, u64)> = futures::stream::iter(0..manifest.world_size)
            .map(|rank| {
                let blob = self.stores.blobs.clone();
                let key = keys::step_grads(&self.stores.run_id, step, rank);
                let model_cfg = model_cfg.clone();
                async move {
                    let bytes = blob.get(&key).await?;
                    let g = RankGradient::from_bytes(&model_cfg, &bytes).map_err(|source| {
                        TrainerError::Grad {
                            key: key.clone(),
                            source,
                        }
                    })?;
                    if g.step != step || g.rank != rank {
                        return Err(TrainerError::Grad {
                            key,
                            source: GradError(format!(
                                "holds step {} rank {} instead",
                                g.step, g.rank
                            )),
                        });
                    }
                    Ok((g, bytes.len() as u64))
                }
            })
            .buffered(self.config.weights.concurrency)
            .try_collect()
            .await?;
        let mut stats = TrainStats::default();
        for (g, _) in &ranks {
            stats.merge(&g.stats);
        }
        let size = ranks.iter().map(|(_, n)| n).sum();
        if let Some((_, sum)) = self.summed.take_if(|(s, _)| *s == step) {
            return Ok((sum, stats, size));
        }
        let mut grads = Vec::with_capacity(ranks.len());
        for (g, _) in ranks {
            grads.push(match g.grads {
                Some(grads) => grads,
                None => self.recompute_rank(manifest, g.rank).await?,
            });
        }
        Ok((sum_gradients(&self.config.model, &grads)?, stats, size))
    }

    /// Rank `rank`'s gradient for `manifest`, computed here: the rank was summed by an
    /// exchange whose sum this trainer does not hold.
    async fn recompute_rank(
        &mut self,
        manifest: &BatchManifest,
        rank: u32,
    ) -> Result<Params, TrainerError> {
        tracing::info!(
            step = manifest.step,
            rank,
            "recomputing a rank summed by an exchange this trainer did not take part in"
        );
        self.model_mut()?;
        let model = self.model.take().expect("model_mut just ensured it");
        match self.compute_rank_on(model, manifest, rank).await {
            Ok((grads, _, model)) => {
                self.model = Some(model);
                Ok(grads)
            }
            Err(e) => {
                self.model = Some(Model::new(self.backend.clone(), &self.params)?);
                Err(e)
            }
        }
    }

    /// Keeps the last `keep_checkpoints` checkpoints and, until step `step` is marked
    /// finished, the newest one before it (a redo of `step` replays from there); deletes the
    /// others' ledger rows and objects. Keeps the last `keep_versions` weight versions, the
    /// checkpointed ones, version `step` (the step's θ_old) and version 0 while no checkpoint
    /// before `step` exists; collects the rest.
    async fn collect(&self, step: StepId) -> Result<(), TrainerError> {
        let run = &self.stores.run_id;
        let blob = &self.stores.blobs;
        let ledger = &self.stores.ledger;
        let checkpoints = ledger.checkpoints(run).await?; // newest first
        let before = checkpoints.iter().find(|c| c.step < step).map(|c| c.step);
        let kept: Vec<&Checkpoint> = checkpoints
            .iter()
            .enumerate()
            .filter(|(i, c)| *i < self.config.keep_checkpoints || Some(c.step) == before)
            .map(|(_, c)| c)
            .collect();
        for c in &checkpoints {
            if !kept.iter().any(|k| k.step == c.step) {
                ledger.delete_checkpoint(run, c.step).await?;
            }
        }
        for meta in blob.list(&keys::checkpoints_prefix(run)).await? {
            match keys::parse_checkpoint_step(run, &meta.key) {
                Some(s) if !kept.iter().any(|k| k.step == s) => blob.delete(&meta.key).await?,
                _ => {}
            }
        }
        let newest = step + 1;
        let mut keep_versions: Vec<PolicyVersion> =
            (newest.saturating_sub(self.config.keep_versions - 1)..=newest).collect();
        keep_versions.extend(kept.iter().map(|c| c.step + 1));
        // The step's θ_old, until the step is marked finished.
        keep_versions.push(step);
        if before.is_none() {
            keep_versions.push(0);
        }
        let gc = weights::collect_garbage(blob, run, &keep_versions).await?;
        if gc.manifests_deleted + gc.chunks_deleted > 0 {
            tracing::debug!(
                manifests = gc.manifests_deleted,
                chunks = gc.chunks_deleted,
                bytes = gc.bytes_deleted,
                "collected old weights"
            );
        }
        Ok(())
    }
}

impl Trainer {
    /// Deletes, at the checkpoint after `step`, the segments of the trained steps the previous
    /// checkpoint covers, beyond the last `keep_segment_steps` (the window of
    /// `checkpoint_every` steps ending there). The steps since the previous checkpoint keep
    /// theirs until the next one: a redo of `step` replays them. Returns the segments deleted.
    async fn collect_segments(&self, step: StepId) -> Result<u64, TrainerError> {
        let (run, blobs) = (&self.stores.run_id, &self.stores.blobs);
        let previous = self
            .stores
            .ledger
            .checkpoints(run)
            .await?
            .into_iter()
            .find(|c| c.step < step);
        let Some(previous) = previous else {
            return Ok(0);
        };
        let Some(last) = step
            .checked_sub(self.config.keep_segment_steps)
            .map(|s| s.min(previous.step))
        else {
            return Ok(0);
        };
        let first = last.saturating_sub(self.config.checkpoint_every - 1);
        let mut keys = Vec::new();
        for s in first..=last {
            let key = keys::step_manifest(run, s);
            let body = match blobs.get(&key).await {
                Ok(body) => body,
                Err(BlobError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let manifest: BatchManifest =
                serde_json::from_slice(&body).map_err(|e| TrainerError::Manifest {
                    key: key.clone(),
                    reason: format!("not a batch manifest: {e}"),
                })?;
            let entries = manifest.ranks.iter().flatten().flat_map(|mb| &mb.entries);
            keys.extend(entries.flat_map(|e| &e.segments).map(|s| s.key.clone()));
        }
        // Concurrent: on an object store each delete is a round trip.
        let deleted = keys.len() as u64;
        futures::stream::iter(keys)
            .map(|key| async move { blobs.delete(&key).await })
            .buffer_unordered(self.config.fetch_concurrency.max(1))
            .try_collect::<()>()
            .await?;
        tracing::debug!(steps = ?(first..=last), deleted, "collected trained segments");
        Ok(deleted)
    }
}

/// The phases of finishing a step, in order ([`StepOutcome::phases`]).
pub const STEP_PHASES: [&str; 5] = ["gradients", "optimizer", "publish", "checkpoint", "collect"];

/// The durations of consecutive phases.
struct Phases {
    since: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            since: Instant::now(),
            done: Vec::new(),
        }
    }
}

impl Phases {
    /// Ends phase `name` now; the next one starts.
    fn end(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.since));
        self.since = now;
    }
}

/// A name for one arrival of rank 0 at a rendezvous, unique enough that an id written for an
/// earlier attempt is never taken for this one's.
fn new_attempt() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// Runs a blocking collective call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ExchangeError> + Send + 'static,
) -> Result<T, ExchangeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExchangeError(format!("the exchange's thread failed: {e}")))?
}

/// Sums rank gradients in rank order (the order fixes the bits: a redone or replayed step
/// sums the same way).
fn sum_gradients(model: &ModelConfig, ranks: &[Params]) -> Result<Params, TrainerError> {
    let mut total = Params::zeros(model)?;
    for g in ranks {
        for (t, s) in total.tensors_mut().iter_mut().zip(g.tensors()) {
            t.data.iter_mut().zip(&s.data).for_each(|(a, b)| *a += b);
        }
    }
    Ok(total)
}

/// The forward/loss/backward of every micro-batch of a rank, accumulated in `grads` (zeroed
/// first); returns the summed gradient.
fn compute_rank(
    model: &DeviceModel,
    loss: &PolicyLoss,
    batch: &[Vec<Stitched>],
    grads: &mut Gradients<DeviceBackend>,
) -> Result<(Params, TrainStats), StepError> {
    model.zero_gradients(grads)?;
    let mut stats = TrainStats::default();
    for micro in batch {
        stats.merge(&accumulate_policy(model, loss, micro, grads)?);
    }
    Ok((model.gradients_to_params(grads)?, stats))
}

/// What travels with every version: the model's shape (a worker builds the model from it)
/// and, for a Hugging Face checkpoint, the directory it came from (its tokenizer and EOS, for
/// exports).
fn weights_metadata(config: &TrainerConfig) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::from([(
        MODEL_CONFIG_KEY.to_owned(),
        serde_json::to_string(&config.model).unwrap_or_default(),
    )]);
    if !config.hf_model.is_empty() {
        metadata.insert(HF_SOURCE_KEY.to_owned(), config.hf_model.clone());
    }
    metadata
}

/// The optimizer state a checkpoint names, checked against its step and the model's dtype.
async fn load_optimizer(
    blob: &BlobStore,
    config: &TrainerConfig,
    checkpoint: &Checkpoint,
) -> Result<AdamW, TrainerError> {
    let key = &checkpoint.optimizer_key;
    let bytes = blob.get(key).await?;
    let optimizer = AdamW::from_state_bytes(config.optimizer.clone(), &bytes)?;
    let want = checkpoint.step + 1;
    if optimizer.step_count() != want {
        return Err(TrainerError::Inconsistent(format!(
            "optimizer state `{key}` has taken {} steps; the checkpoint of step {} needs {want}",
            optimizer.step_count(),
            checkpoint.step
        )));
    }
    if optimizer.weight_dtype() != config.model.dtype {
        return Err(TrainerError::Inconsistent(format!(
            "optimizer state `{key}` steps {} weights but the model's are {}: the checkpoint \
             belongs to another model",
            optimizer.weight_dtype().hf_name(),
            config.model.dtype.hf_name()
        )));
    }
    Ok(optimizer)
}

/// Publishes `params` as `version` in their config's dtype, with `metadata` (see
/// [`weights_metadata`]; later versions carry their predecessor's forward); changed chunks
/// become deltas against `previous`.
#[allow(clippy::too_many_arguments)]
pub async fn publish_params(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
    params: &Params,
    previous: Option<&WeightsManifest>,
    metadata: &BTreeMap<String, String>,
    config: &WeightsConfig,
) -> Result<weights::PublishReport, WeightsError> {
    let dtype = params.config().dtype;
    let bytes: Vec<Vec<u8>> = params.tensors().iter().map(|t| t.encode(dtype)).collect();
    let views: Vec<TensorBytes<'_>> = params
        .tensors()
        .iter()
        .zip(&bytes)
        .map(|(t, b)| TensorBytes {
            name: &t.name,
            shape: &t.shape,
            dtype: match dtype {
                WeightDtype::F32 => Dtype::F32,
                WeightDtype::Bf16 => Dtype::Bf16,
                WeightDtype::F16 => Dtype::F16,
            },
            bytes: b,
        })
        .collect();
    weights::publish_with_metadata(blob, run, version, &views, previous, metadata, config).await
}

/// Reads a batch manifest and checks it against its announcement (its world size, when
/// known).
async fn load_batch_manifest(
    blob: &BlobStore,
    key: &str,
    step: StepId,
    world_size: Option<u32>,
) -> Result<BatchManifest, TrainerError> {
    let bad = |reason: String| TrainerError::Manifest {
        key: key.to_owned(),
        reason,
    };
    let body = blob.get(key).await?;
    let manifest: BatchManifest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("not a batch manifest: {e}")))?;
    let world_size = world_size.unwrap_or(manifest.world_size);
    if manifest.step != step || manifest.world_size != world_size {
        return Err(bad(format!(
            "describes step {} with {} ranks; step {step} was announced with {world_size}",
            manifest.step, manifest.world_size
        )));
    }
    if manifest.ranks.len() != world_size as usize {
        return Err(bad(format!(
            "lists {} ranks for a world size of {world_size}",
            manifest.ranks.len()
        )));
    }
    Ok(manifest)
}

/// Told of every step this trainer finishes, before the loop goes on (it waits for the
/// observer). The embedded demo builds its report this way.
#[async_trait]
pub trait StepObserver: Send {
    /// Step `outcome.step` of `manifest` is finished; `trainer` holds the weights it published.
    async fn step_finished(
        &mut self,
        outcome: &StepOutcome,
        manifest: &BatchManifest,
        trainer: &Trainer,
    );
}

/// Observes nothing.
struct NoObserver;

#[async_trait]
impl StepObserver for NoObserver {
    async fn step_finished(&mut self, _: &StepOutcome, _: &BatchManifest, _: &Trainer) {}
}

/// The trainer service: trains and finishes the steps the coordinator announces until
/// `shutdown` resolves.
pub async fn run_until(
    stores: RunStores,
    config: ServiceConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TrainerError> {
    run_observed(stores, config, shutdown, &mut NoObserver).await
}

/// [`run_until`], telling `observer` of every step this trainer finishes.
pub async fn run_observed(
    stores: RunStores,
    config: ServiceConfig,
    shutdown: impl Future<Output = ()>,
    observer: &mut dyn StepObserver,
) -> Result<(), TrainerError> {
    config.validate()?;
    let ServiceConfig {
        trainer: mut config,
        resume,
        ..
    } = config;
    config.id = member_id("trainer", &config.id);
    let id = config.id.clone();
    let poll = Duration::from_millis(config.poll_ms);
    let heartbeat_ttl = Duration::from_millis(config.heartbeat_ms);
    let claim_ttl = Duration::from_millis(config.rank_claim_ms);
    let state = stores.state.clone();
    let metrics = TrainerMetrics::new();
    let readiness = Readiness::new();
    stores.add_readiness_checks(&readiness);
    let admin = AdminServer::start_unless_empty(
        &config.metrics_addr,
        metrics.registry.clone(),
        readiness.clone(),
    )
    .await?;
    let checkpoint = stores.ledger.latest_checkpoint(&stores.run_id).await?;
    let trainer = if resume && checkpoint.is_some() {
        Trainer::restore(stores, config).await?.0
    } else {
        if resume {
            tracing::info!("no checkpoint yet: joining the run at its newest version");
        }
        Trainer::start(stores, config).await?
    };
    metrics.version.set(trainer.version() as i64);
    tracing::info!(trainer = %id, version = trainer.version(), "trainer started");
    state
        .heartbeat(MemberRole::Trainer, &id, heartbeat_ttl)
        .await?;
    // Heartbeats run beside the loop, so a long rank computation does not lapse membership.
    let heartbeats = {
        let (state, id) = (state.clone(), id.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(heartbeat_ttl / 3).await;
                if let Err(e) = state
                    .heartbeat(MemberRole::Trainer, &id, heartbeat_ttl)
                    .await
                {
                    tracing::warn!(trainer = %id, error = %e, "heartbeat failed");
                }
            }
        })
    };
    readiness.set_serving(true);
    let mut board = Board {
        trainer,
        state: state.clone(),
        id: id.clone(),
        claim_ttl,
        stall: None,
        metrics,
        observer,
    };
    tokio::pin!(shutdown);
    loop {
        let did_work = match board.work_once().await {
            Ok(did) => did,
            Err(e) => {
                board.metrics.errors.inc();
                tracing::error!(trainer = %id, error = %e, "step work failed; will retry");
                false
            }
        };
        board.metrics.version.set(board.trainer.version() as i64);
        // Busy: look for more work at once; idle: poll. Shutdown is checked first either way.
        let pause = if did_work { Duration::ZERO } else { poll };
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    heartbeats.abort();
    readiness.set_serving(false);
    state.leave(MemberRole::Trainer, &id).await?;
    if let Some(admin) = admin {
        admin.stop().await;
    }
    tracing::info!(trainer = %id, "trainer stopped");
    Ok(())
}

/// One trainer's work on the step board.
struct Board<'a> {
    trainer: Trainer,
    state: Arc<dyn StateStore>,
    id: String,
    claim_ttl: Duration,
    /// The step whose ranks are all written but which stays unfinished, and since when.
    stall: Option<(StepId, Instant)>,
    metrics: TrainerMetrics,
    observer: &'a mut dyn StepObserver,
}

impl Board<'_> {
    /// One pass over the step board: claims and computes a rank if one is free, and finishes
    /// the step if it completed the last rank (or if the finisher is gone, see
    /// [`Board::take_over`]). Returns whether it did any work.
    async fn work_once(&mut self) -> Result<bool, TrainerError> {
        let Some(ann) = self.state.announced_step().await? else {
            return Ok(false);
        };
        let run = self.trainer.stores.run_id.clone();
        let blobs = self.trainer.stores.blobs.clone();
        if self
            .state
            .finished_step()
            .await?
            .is_some_and(|f| f >= ann.step)
        {
            // Nothing to train: prefetch the newest weights while idle.
            if self.trainer.version() < ann.step + 1
                && weights::exists(&blobs, &run, ann.step + 1).await?
            {
                self.trainer.sync_to(ann.step + 1).await?;
            }
            return Ok(false);
        }
        if !weights::exists(&blobs, &run, ann.step).await? {
            return Ok(false); // θ_old not published yet
        }
        let Some(claim) = self
            .state
            .claim_rank(ann.step, &self.id, self.claim_ttl)
            .await?
        else {
            return self.take_over(&ann).await;
        };
        let manifest =
            load_batch_manifest(&blobs, &ann.manifest_key, ann.step, Some(ann.world_size)).await?;
        let renewal = spawn_renewal(self.state.clone(), claim, self.id.clone(), self.claim_ttl);
        let rank_started = Instant::now();
        let computed = self.trainer.train_rank(&manifest, claim.rank).await;
        self.metrics
            .rank_seconds
            .observe(rank_started.elapsed().as_secs_f64());
        // The claim stays renewed while the rank waits for the others at the exchange.
        let exchanged = match &computed {
            Ok(gradient) => self.trainer.exchange(&manifest, gradient).await,
            Err(_) => Exchanged::Store,
        };
        self.metrics.observe_exchange(exchanged);
        let gradient = computed?;
        let summed = matches!(exchanged, Exchanged::Summed { .. });
        if summed {
            self.trainer.put_rank(&gradient.exchanged()).await?;
        } else {
            self.trainer.put_rank(&gradient).await?;
        }
        self.metrics.ranks_computed.inc();
        // In an exchanged step rank 0's trainer completes last (after the others, through the
        // barrier), so the completion of the last rank goes to the trainer holding the sum.
        if summed && claim.rank == 0 {
            self.trainer.exchange_barrier().await;
        }
        let completed = self.state.complete_rank(&claim, &self.id).await;
        drop(renewal);
        if summed && claim.rank != 0 {
            self.trainer.exchange_barrier().await;
        }
        let done = match completed {
            Ok(done) => done,
            Err(e @ StateError::RankFenced { .. }) => {
                tracing::warn!(step = ann.step, rank = claim.rank, error = %e, "rank taken over; dropping it");
                return Ok(true);
            }
            Err(e) => return Err(e.into()),
        };
        if done.all_done {
            self.finish_step(&manifest).await?;
        }
        Ok(true)
    }

    /// The finisher's part: [`Trainer::finish`], then the board's `finish_step`, then the
    /// step's gradient objects are deleted and the observer is told.
    async fn finish_step(&mut self, manifest: &BatchManifest) -> Result<(), TrainerError> {
        let outcome = self.trainer.finish(manifest).await?;
        self.state
            .finish_step(outcome.step, outcome.version)
            .await?;
        let stores = &self.trainer.stores;
        for rank in 0..manifest.world_size {
            stores
                .blobs
                .delete(&keys::step_grads(&stores.run_id, outcome.step, rank))
                .await?;
        }
        let mut prefixes = vec![keys::step_exchange_prefix(&stores.run_id, outcome.step)];
        // What a finisher that died between marking its step finished and this deletion left.
        if let Some(previous) = outcome.step.checked_sub(1) {
            prefixes.push(keys::step_grads_prefix(&stores.run_id, previous));
            prefixes.push(keys::step_exchange_prefix(&stores.run_id, previous));
        }
        for prefix in prefixes {
            for meta in stores.blobs.list(&prefix).await? {
                stores.blobs.delete(&meta.key).await?;
            }
        }
        self.metrics.observe_step(&outcome);
        let m = &outcome.metrics;
        tracing::info!(
            step = outcome.step,
            version = outcome.version,
            loss = m.loss,
            grad_norm = m.grad_norm,
            entropy = m.entropy,
            masked_fraction = m.masked_fraction,
            mean_abs_log_k = m.mean_abs_log_k,
            tokens_trained = m.tokens_trained,
            step_ms = m.step_time.as_millis() as u64,
            bytes_written = outcome.bytes.total(),
            weights_bytes_written = outcome.publish.bytes_written,
            optimizer_bytes_written = outcome.bytes.optimizer,
            weights_bytes_total = outcome.publish.bytes_total,
            checkpointed = outcome.checkpointed,
            replayed = outcome.replayed,
            exchange = ?outcome.exchange,
            "step finished"
        );
        self.observer
            .step_finished(&outcome, manifest, &self.trainer)
            .await;
        Ok(())
    }

    /// No rank is free. If every rank's gradient is written and the step stays unfinished
    /// for longer than a rank claim lasts, the finisher died after completing the last rank
    /// (the board gives `all_done` to it alone): finish the step here. Finishing is
    /// deterministic and idempotent (same sums, same published bytes, idempotent
    /// `finish_step`), so a slow but living finisher racing this one does no harm. If a rank
    /// is in fact not completed, `finish_step` refuses and the rank is redone first.
    async fn take_over(&mut self, ann: &StepAnnouncement) -> Result<bool, TrainerError> {
        let stores = &self.trainer.stores;
        let written = stores
            .blobs
            .list(&keys::step_grads_prefix(&stores.run_id, ann.step))
            .await?
            .len();
        if written < ann.world_size as usize {
            self.stall = None;
            return Ok(false);
        }
        match self.stall {
            Some((step, since)) if step == ann.step && since.elapsed() >= self.claim_ttl => {
                self.stall = None;
                tracing::warn!(
                    step = ann.step,
                    "the step's finisher is gone; finishing it here"
                );
                let manifest = load_batch_manifest(
                    &stores.blobs,
                    &ann.manifest_key,
                    ann.step,
                    Some(ann.world_size),
                )
                .await?;
                self.finish_step(&manifest).await?;
                Ok(true)
            }
            Some((step, _)) if step == ann.step => Ok(false),
            _ => {
                self.stall = Some((ann.step, Instant::now()));
                Ok(false)
            }
        }
    }
}

/// Renews `claim` every third of its lease until dropped (any return of the caller, error or
/// not, stops it).
fn spawn_renewal(
    state: Arc<dyn StateStore>,
    claim: RankClaim,
    trainer: String,
    ttl: Duration,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(ttl / 3).await;
            if let Err(e) = state.renew_rank(&claim, &trainer, ttl).await {
                tracing::warn!(step = claim.step, rank = claim.rank, error = %e, "rank renew failed");
                return;
            }
        }
    }))
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
