//! `flywheel audit`: checks a run's accounting from the ledger, the object store, Redis and the
//! prompt topic (DESIGN.md §7), and lists every violation.
//!
//! - Every message the run's consumer group consumed from the prompt topic (the dead-lettered
//!   ones included) is in the ledger — trained, dropped with a reason, or pending (in flight,
//!   then registered in the state store). Messages past the committed offsets are not yet
//!   read, and are counted apart.
//! - Steps are recorded 0..=last without a gap; each step's manifest is there, describes that
//!   step and trains exactly the prompts the ledger says it trained; no prompt is in two
//!   steps; the board's finished step is a recorded one.
//! - Every trained segment still stored decodes and matches its index entry (the codec's
//!   checksum verifies it); an entry whose segments are unusable must be recorded as left out
//!   of its step. Segments may be gone only from steps a checkpoint covers (the trainer
//!   collects those); one gone from a later step is a violation unless its entry is recorded
//!   as left out.
//! - Versions have no gap: the newest published version is the one after the newest finished
//!   step.
//! - Every checkpoint restores: its weights fetch and verify, its optimizer state decodes and
//!   has taken the right number of steps.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use flywheel_storage::RunStores;
use flywheel_storage::blob::BlobError;
use flywheel_storage::codec;
use flywheel_storage::keys;
use flywheel_storage::ledger::{EventKind, PromptStatus};
use flywheel_storage::queue::{self, KafkaConfig};
use flywheel_storage::types::{BatchManifest, PromptId, SegmentRef, StepId, TrajectoryId};
use flywheel_storage::weights;
use flywheel_trainer::{AdamW, AdamWConfig};

/// Segment objects read at once.
const CONCURRENT_READS: usize = 32;

/// What the audit found.
#[derive(Clone, Debug, Default)]
pub struct AuditReport {
    /// Messages consumed from the prompt topic and checked against the ledger.
    pub messages_checked: u64,
    /// Messages not consumed yet.
    pub messages_unconsumed: u64,
    /// Prompts in the ledger: pending, trained, dropped.
    pub prompts: (u64, u64, u64),
    /// Recorded steps.
    pub steps: u64,
    /// Segments decoded and verified.
    pub segments_verified: u64,
    /// Entries left out of their step, as recorded.
    pub entries_left_out: u64,
    /// Steps, covered by a checkpoint, whose segments were collected (wholly or partly).
    pub steps_collected: u64,
    /// Checkpoints restored.
    pub checkpoints_restored: u64,
    /// Everything that contradicts the invariants.
    pub violations: Vec<String>,
}

impl AuditReport {
    /// A summary for a person, the violations last.
    pub fn summary(&self) -> String {
        let (pending, trained, dropped) = self.prompts;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "messages: {} consumed and accounted, {} not consumed yet",
            self.messages_checked, self.messages_unconsumed
        );
        let _ = writeln!(
            s,
            "prompts: {trained} trained, {dropped} dropped, {pending} in flight"
        );
        let _ = writeln!(
            s,
            "steps: {} recorded; {} segments verified, {} entries left out of their step, {} \
             steps' segments collected after a checkpoint",
            self.steps, self.segments_verified, self.entries_left_out, self.steps_collected
        );
        let _ = writeln!(s, "checkpoints: {} restored", self.checkpoints_restored);
        if self.violations.is_empty() {
            let _ = writeln!(s, "no violation");
        } else {
            let _ = writeln!(s, "{} violation(s):", self.violations.len());
            for v in &self.violations {
                let _ = writeln!(s, "  - {v}");
            }
        }
        s
    }
}

/// Audits run `stores.run_id`; `kafka` is its prompt topic (none: the consumed messages are not
/// checked), `optimizer` the trainer's AdamW settings (to decode checkpoints).
pub async fn audit(
    stores: &RunStores,
    kafka: Option<&KafkaConfig>,
    optimizer: &AdamWConfig,
) -> anyhow::Result<AuditReport> {
    let mut report = AuditReport::default();
    let run = &stores.run_id;
    let counts = stores.ledger.prompt_counts(run).await?;
    report.prompts = (counts.pending, counts.trained, counts.dropped);
    if let Some(kafka) = kafka {
        check_messages(stores, kafka, &mut report).await?;
    }
    check_pending(stores, &mut report).await?;
    let manifests = check_steps(stores, &mut report).await?;
    check_segments(stores, &manifests, &mut report).await?;
    check_versions(stores, &mut report).await?;
    check_checkpoints(stores, optimizer, &mut report).await?;
    Ok(report)
}

/// Every consumed message is in the ledger.
async fn check_messages(
    stores: &RunStores,
    kafka: &KafkaConfig,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let log = queue::consumed_messages(kafka).await?;
    report.messages_unconsumed = log.unconsumed;
    let mut seen = BTreeSet::new();
    for m in &log.messages {
        let id = queue::ledger_id(&m.payload, &m.source);
        report.messages_checked += 1;
        if !seen.insert(id.clone()) {
            continue; // the same prompt sent twice: one ledger record
        }
        if stores
            .ledger
            .prompt_status(&stores.run_id, &id)
            .await?
            .is_none()
        {
            report.violations.push(format!(
                "message {} (prompt {id}) was consumed but is not in the ledger",
                m.source
            ));
        }
    }
    Ok(())
}

/// Every prompt in flight is registered in the state store.
async fn check_pending(stores: &RunStores, report: &mut AuditReport) -> anyhow::Result<()> {
    for p in stores.ledger.pending_prompts(&stores.run_id).await? {
        if stores.state.prompt(&p.id).await?.is_none() {
            report.violations.push(format!(
                "prompt {} is pending in the ledger but unknown to the state store",
                p.id
            ));
        }
    }
    Ok(())
}

/// Steps without gaps, manifests matching the ledger, no prompt in two steps. Returns the
/// manifests by step.
async fn check_steps(
    stores: &RunStores,
    report: &mut AuditReport,
) -> anyhow::Result<BTreeMap<StepId, BatchManifest>> {
    let run = &stores.run_id;
    let steps = stores.ledger.steps(run).await?;
    report.steps = steps.len() as u64;
    let mut manifests = BTreeMap::new();
    let mut trained: BTreeMap<PromptId, StepId> = BTreeMap::new();
    for (i, summary) in steps.iter().enumerate() {
        let s = summary.step;
        if s != i as u64 {
            report
                .violations
                .push(format!("steps have a gap: step {s} is the {i}th recorded"));
        }
        let key = keys::step_manifest(run, s);
        let manifest: BatchManifest = match stores.blobs.get(&key).await {
            Ok(body) => match serde_json::from_slice(&body) {
                Ok(m) => m,
                Err(e) => {
                    report
                        .violations
                        .push(format!("step {s}: manifest {key}: {e}"));
                    continue;
                }
            },
            Err(e) => {
                report
                    .violations
                    .push(format!("step {s}: manifest {key}: {e}"));
                continue;
            }
        };
        if manifest.step != s {
            report.violations.push(format!(
                "step {s}: its manifest describes step {}",
                manifest.step
            ));
        }
        let record = stores.ledger.step(run, s).await?;
        let recorded: BTreeSet<&PromptId> = record.iter().flat_map(|r| &r.prompts).collect();
        let planned: BTreeSet<&PromptId> = manifest.prompts.iter().collect();
        if recorded != planned {
            report.violations.push(format!(
                "step {s}: the ledger trained {} prompts, its manifest plans {}",
                recorded.len(),
                planned.len()
            ));
        }
        for p in &manifest.prompts {
            if let Some(other) = trained.insert(p.clone(), s) {
                report
                    .violations
                    .push(format!("prompt {p} is trained in steps {other} and {s}"));
            }
            match stores.ledger.prompt_status(run, p).await? {
                Some(PromptStatus::Trained { step }) if step == s => {}
                status => report.violations.push(format!(
                    "prompt {p} of step {s} is {status:?} in the ledger"
                )),
            }
        }
        manifests.insert(s, manifest);
    }
    let last = steps.last().map(|s| s.step);
    if let Some(finished) = stores.state.finished_step().await?
        && last.is_none_or(|l| finished > l)
    {
        report.violations.push(format!(
            "the board's finished step {finished} is not recorded (last recorded: {last:?})"
        ));
    }
    Ok(manifests)
}

/// Every stored trained segment verifies; unusable entries are recorded as left out.
async fn check_segments(
    stores: &RunStores,
    manifests: &BTreeMap<StepId, BatchManifest>,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let run = &stores.run_id;
    let left_out: BTreeSet<String> = stores
        .ledger
        .events(run)
        .await?
        .into_iter()
        .filter(|e| e.kind == EventKind::EntryDropped)
        .map(|e| e.key)
        .collect();
    let covered = stores.ledger.latest_checkpoint(run).await?.map(|c| c.step);
    for (s, manifest) in manifests {
        let entries: Vec<_> = manifest
            .ranks
            .iter()
            .flatten()
            .flat_map(|mb| &mb.entries)
            .collect();
        let refs: Vec<(&TrajectoryId, &SegmentRef)> = entries
            .iter()
            .flat_map(|e| e.segments.iter().map(move |r| (&e.trajectory, r)))
            .collect();
        let keys = refs.iter().map(|(_, r)| r.key.clone()).collect();
        let reads = stores.blobs.get_all(keys, CONCURRENT_READS).await;
        let mut missing = Vec::new();
        let mut unusable: BTreeMap<TrajectoryId, String> = BTreeMap::new();
        for ((t, r), read) in refs.into_iter().zip(reads) {
            let bad = match read {
                Ok(bytes) => match codec::decode(&bytes) {
                    Ok(seg)
                        if seg.trajectory == *t
                            && seg.seq == r.seq
                            && seg.tokens.len() == r.tokens as usize =>
                    {
                        report.segments_verified += 1;
                        continue;
                    }
                    Ok(_) => format!("{} does not match its entry", r.key),
                    Err(err) => format!("{}: {err}", r.key),
                },
                Err(BlobError::NotFound { .. }) => {
                    missing.push((t.clone(), r.key.clone()));
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            unusable.entry(t.clone()).or_insert(bad);
        }
        let recorded = |t: &TrajectoryId| left_out.contains(&format!("entry-dropped/step-{s}/{t}"));
        for (t, why) in unusable {
            if recorded(&t) {
                report.entries_left_out += 1;
            } else {
                report.violations.push(format!(
                    "step {s}: {t} was trained from an unusable segment: {why}"
                ));
            }
        }
        if !missing.is_empty() && covered.is_some_and(|c| *s <= c) {
            report.steps_collected += 1;
            continue;
        }
        for (t, key) in missing {
            if recorded(&t) {
                report.entries_left_out += 1;
            } else {
                report.violations.push(format!(
                    "step {s}: segment {key} of {t} is missing and the entry is not recorded as \
                     left out"
                ));
            }
        }
    }
    Ok(())
}

/// The newest version follows the newest finished step.
async fn check_versions(stores: &RunStores, report: &mut AuditReport) -> anyhow::Result<()> {
    let run = &stores.run_id;
    let latest = weights::latest_version(&stores.blobs, run).await?;
    let finished = stores.state.finished_step().await?;
    let expected = finished.map_or(0, |f| f + 1);
    if latest != Some(expected) {
        report.violations.push(format!(
            "the newest published version is {latest:?}; the newest finished step ({finished:?}) \
             makes it {expected}"
        ));
    }
    Ok(())
}

/// Every checkpoint restores: weights fetched and verified, optimizer state decoded.
async fn check_checkpoints(
    stores: &RunStores,
    optimizer: &AdamWConfig,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let run = &stores.run_id;
    for c in stores.ledger.checkpoints(run).await? {
        let version = c.step + 1;
        if let Err(e) = weights::fetch(&stores.blobs, run, version, None, &Default::default()).await
        {
            report.violations.push(format!(
                "checkpoint of step {}: weights version {version}: {e}",
                c.step
            ));
            continue;
        }
        let restored = match stores.blobs.get(&c.optimizer_key).await {
            Ok(bytes) => AdamW::from_state_bytes(optimizer.clone(), &bytes)
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    (o.step_count() == version).then_some(()).ok_or(format!(
                        "it has taken {} steps, not {version}",
                        o.step_count()
                    ))
                }),
            Err(e) => Err(e.to_string()),
        };
        match restored {
            Ok(()) => report.checkpoints_restored += 1,
            Err(why) => report.violations.push(format!(
                "checkpoint of step {}: optimizer state {}: {why}",
                c.step, c.optimizer_key
            )),
        }
    }
    Ok(())
}
