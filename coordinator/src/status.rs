//! The run's status report: what `GET /v1/status` answers and `flywheel status` shows.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use flywheel_storage::blob::BlobStore;
use flywheel_storage::keys;
use flywheel_storage::ledger::{Ledger, PromptCounts};
use flywheel_storage::state::{MemberRole, StateCounts, StateStore};
use flywheel_storage::types::{BatchManifest, PolicyVersion, StepId};
use serde::{Deserialize, Serialize};

use crate::batch;
use crate::service::{CoordinatorError, LoopSnapshot};

/// Steps whose manifests feed the staleness histogram of a report.
pub const STALENESS_WINDOW: u64 = 20;

/// The current version's budget and how much of it is used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetFill {
    /// The version.
    pub version: PolicyVersion,
    /// Φ_r the version was opened with.
    pub total: u64,
    /// Tokens not yet reserved.
    pub remaining: u64,
    /// (total − remaining) / total, 0 when total is 0.
    pub fill: f64,
}

/// Where the steps are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStatus {
    /// The last step committed in the ledger.
    pub recorded: Option<StepId>,
    /// The step announced to the trainers.
    pub announced: Option<StepId>,
    /// The newest step the trainers finished.
    pub finished: Option<StepId>,
    /// World size of the announced step.
    pub world_size: Option<u32>,
}

/// The status of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The run id.
    pub run: String,
    /// The leader's candidate id, if a leader is live.
    pub leader: Option<String>,
    /// Whether the answering coordinator is the leader.
    pub answering_is_leader: bool,
    /// Whether the admin paused the loop.
    pub paused: bool,
    /// The current policy version.
    pub version: Option<PolicyVersion>,
    /// Steps.
    pub step: StepStatus,
    /// The current version's budget.
    pub budget: Option<BudgetFill>,
    /// Trajectories by status (parked, generating = active, finished, …).
    pub trajectories: StateCounts,
    /// Prompts by ledger status (pending, trained, dropped).
    pub prompts: PromptCounts,
    /// Φ: tokens per step.
    pub token_budget: u64,
    /// Complete groups waiting for a step (known to the leader; 0 on a standby).
    pub groups_waiting: u64,
    /// Their tokens.
    pub waiting_tokens: u64,
    /// Trained tokens of the last steps by staleness (step − generating version).
    pub staleness_tokens: BTreeMap<u64, u64>,
    /// Live workers.
    pub workers_alive: u64,
    /// Live trainers.
    pub trainers_alive: u64,
}

/// The sources of a report.
#[derive(Clone)]
pub struct StatusSources {
    /// The run id.
    pub run: String,
    /// Run state.
    pub state: Arc<dyn StateStore>,
    /// The ledger.
    pub ledger: Arc<dyn Ledger>,
    /// Manifests.
    pub blobs: BlobStore,
    /// Φ, reported with the waiting tokens.
    pub token_budget: u64,
}

impl StatusSources {
    /// Builds a report; `snapshot` and `paused` come from the answering coordinator.
    pub async fn report(
        &self,
        snapshot: &LoopSnapshot,
        paused: bool,
    ) -> Result<StatusReport, CoordinatorError> {
        let s = &self.state;
        let recorded = self.ledger.last_step(&self.run).await?;
        let announced = s.announced_step().await?;
        let budget = s.budget().await?.map(|b| BudgetFill {
            version: b.version,
            total: b.total,
            remaining: b.remaining,
            fill: if b.total == 0 {
                0.0
            } else {
                (b.total - b.remaining) as f64 / b.total as f64
            },
        });
        let mut staleness = BTreeMap::new();
        if let Some(last) = recorded {
            for step in last.saturating_sub(STALENESS_WINDOW - 1)..=last {
                let key = keys::step_manifest(&self.run, step);
                let Ok(bytes) = self.blobs.get(&key).await else {
                    continue;
                };
                let Ok(m) = serde_json::from_slice::<BatchManifest>(&bytes) else {
                    continue;
                };
                for (v, tokens) in batch::trained_tokens_by_version(&m) {
                    *staleness.entry(step.saturating_sub(v)).or_insert(0) += tokens;
                }
            }
        }
        Ok(StatusReport {
            run: self.run.clone(),
            leader: s.leader().await?.map(|l| l.holder),
            answering_is_leader: snapshot.leader,
            paused,
            version: s.current_version().await?,
            step: StepStatus {
                recorded,
                announced: announced.as_ref().map(|a| a.step),
                finished: s.finished_step().await?,
                world_size: announced.as_ref().map(|a| a.world_size),
            },
            budget,
            trajectories: s.counts().await?,
            prompts: self.ledger.prompt_counts(&self.run).await?,
            token_budget: self.token_budget,
            groups_waiting: snapshot.groups_waiting,
            waiting_tokens: snapshot.waiting_tokens,
            staleness_tokens: staleness,
            workers_alive: s.live_members(MemberRole::Worker).await?.len() as u64,
            trainers_alive: s.live_members(MemberRole::Trainer).await?.len() as u64,
        })
    }
}

/// Errors of `flywheel status`.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The coordinator did not answer.
    #[error(
        "cannot reach the coordinator at {url}: {source} (is `flywheel coordinator` running, and is --url its [coordinator] bind address?)"
    )]
    Unreachable {
        /// The URL asked.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// Printing failed.
    #[error("cannot write the report: {0}")]
    Io(#[from] std::io::Error),
}

/// Fetches `/v1/status` from the coordinator at `base` (e.g. `http://127.0.0.1:9464`).
pub async fn fetch(base: &str) -> Result<StatusReport, StatusError> {
    let url = format!("{}/v1/status", base.trim_end_matches('/'));
    let unreachable = |source| StatusError::Unreachable {
        url: url.clone(),
        source,
    };
    reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)
}

/// `flywheel status`: JSON (one report) when `json` is set or stdout is not a terminal; live
/// progress bars (step, budget fill, groups waiting) otherwise, until interrupted.
pub async fn run_status(base: &str, json: bool) -> Result<(), StatusError> {
    if json || !std::io::stdout().is_terminal() {
        let report = fetch(base).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
        return Ok(());
    }
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style = |t: &str| ProgressStyle::with_template(t).expect("valid template");
    let steps = multi.add(ProgressBar::new(1).with_style(style(
        "steps   {bar:40} finished {pos} / announced {len}  {msg}",
    )));
    let budget = multi
        .add(ProgressBar::new(1).with_style(style("budget  {bar:40} {pos}/{len} tokens  {msg}")));
    let groups = multi.add(ProgressBar::new(1).with_style(style(
        "groups  {bar:40} {pos}/{len} tokens waiting (Φ)  {msg}",
    )));
    loop {
        let r = fetch(base).await?;
        steps.set_length(r.step.announced.map_or(0, |s| s + 1));
        steps.set_position(r.step.finished.map_or(0, |s| s + 1));
        steps.set_message(format!(
            "run {} · version {:?} · leader {} · {} trainers, {} workers{}",
            r.run,
            r.version,
            r.leader.as_deref().unwrap_or("none"),
            r.trainers_alive,
            r.workers_alive,
            if r.paused { " · PAUSED" } else { "" }
        ));
        if let Some(b) = &r.budget {
            budget.set_length(b.total);
            budget.set_position(b.total - b.remaining);
            budget.set_message(format!("version {}", b.version));
        }
        groups.set_length(r.token_budget.max(1));
        groups.set_position(r.waiting_tokens);
        groups.set_message(format!(
            "{} groups · parked {} · generating {} · finished {}",
            r.groups_waiting,
            r.trajectories.parked,
            r.trajectories.generating,
            r.trajectories.finished
        ));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
