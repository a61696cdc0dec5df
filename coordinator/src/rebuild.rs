//! Rebuilding a lost state store (DESIGN.md §5, §7): Redis is an index, and what the run
//! needs of it comes back from the ledger and the object store.
//!
//! - The step board's finished step: the newest published version − 1.
//! - Every prompt the ledger holds pending is registered again. Each of its trajectories gets
//!   back the segments found intact in the object store: for seq 0, 1, 2, … the object with
//!   the highest lease epoch (an object of a lower epoch than the one before it belongs to a
//!   generation that was cut back, so the chain ends there), up to the first one missing,
//!   corrupt or ending the trajectory; objects of a generation a regeneration replaced are
//!   ignored. Its epoch jumps [`EPOCH_MARGIN`] past every epoch in its objects' keys: a worker
//!   that claimed it on the lost state may not have written its object yet, and no new claim
//!   may share that worker's epoch (and so its object keys).
//! - What does not come back, by design: rewards (a trajectory whose last segment ended it is
//!   parked and scored again by the worker that resumes it), failure counts, retention
//!   (starts over), leases (a worker holding one is fenced at its next write and drops the
//!   segment in hand), the finished stream (refilled as trajectories finish again) and the
//!   budget (the leader opens the due version afresh).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use flywheel_storage::blob::{BlobError, BlobStore};
use flywheel_storage::ledger::{EventKind, Ledger};
use flywheel_storage::state::{RestoredTrajectory, StateStore};
use flywheel_storage::types::{Prompt, PromptId, SegmentRef, TrajectoryId};
use flywheel_storage::{codec, keys, weights};
use futures::StreamExt;

use crate::service::CoordinatorError;

/// How far a restored trajectory's epoch jumps past the highest one in its objects' keys:
/// more than the claims a trajectory could have taken on the lost state without writing an
/// object. (2^53, the largest epoch the store holds, leaves room for 2^33 rebuilds.)
pub const EPOCH_MARGIN: u64 = 1 << 20;

/// Segment objects of one trajectory read at once.
const CONCURRENT_READS: usize = 16;
/// Prompts rebuilt at once (and between two renewals of the leader lock at most).
const PROMPTS_AT_ONCE: usize = 16;

/// What a rebuild restored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Pending prompts registered again.
    pub prompts: u64,
    /// Of their trajectories, those that got segments back.
    pub trajectories: u64,
    /// Segments restored.
    pub segments: u64,
    /// The board's finished step, if a step had finished.
    pub finished_step: Option<u64>,
}

/// One segment object of a trajectory: its seq and epoch (from the key) and the key.
type Objects = BTreeMap<u32, Vec<(u64, String)>>;

/// The leader lock the rebuild runs under: it is renewed as the rebuild goes, since a large
/// run takes longer than the lock lasts.
#[derive(Clone, Copy, Debug)]
pub struct Lead<'a> {
    /// The leader's candidate id.
    pub candidate: &'a str,
    /// Its fencing token.
    pub token: u64,
    /// How long a renewal holds the lock.
    pub ttl: Duration,
}

/// Restores the state of run `run` into `state` under `lead`; the caller marks it
/// initialised afterwards. Prompts an interrupted rebuild already restored are skipped, so a
/// rebuild that loses the lead midway is finished by the next one.
pub async fn rebuild(
    state: &dyn StateStore,
    ledger: &dyn Ledger,
    blobs: &BlobStore,
    run: &str,
    lead: Lead<'_>,
) -> Result<Rebuilt, CoordinatorError> {
    let mut rebuilt = Rebuilt::default();
    if let Some(v) = weights::latest_version(blobs, run).await?
        && v > 0
    {
        state.restore_finished_step(v - 1, lead.token).await?;
        rebuilt.finished_step = Some(v - 1);
    }
    let pending = ledger.pending_prompts(run).await?;
    if pending.is_empty() {
        return Ok(rebuilt);
    }
    let regenerated = regenerated_epochs(ledger, run).await?;
    let mut objects = segment_objects(blobs, run).await?;
    let mut renewed = Instant::now();
    for batch in pending.chunks(PROMPTS_AT_ONCE) {
        if renewed.elapsed() >= lead.ttl / 3 {
            state
                .renew_leader(lead.candidate, lead.token, lead.ttl)
                .await?;
            renewed = Instant::now();
        }
        let mut reads = Vec::new();
        for prompt in batch {
            if state.prompt(&prompt.id).await?.is_some() {
                continue; // restored by an interrupted rebuild
            }
            let found: Vec<(TrajectoryId, Objects, u64)> = prompt
                .trajectory_ids()
                .map(|id| {
                    let floor = regenerated.get(&id.to_string()).copied().unwrap_or(0);
                    let found = objects.remove(&id).unwrap_or_default();
                    (id, found, floor)
                })
                .collect();
            reads.push(restored_trajectories(blobs.clone(), prompt.clone(), found));
        }
        let reads: Vec<_> = futures::stream::iter(reads)
            .buffered(PROMPTS_AT_ONCE)
            .collect()
            .await;
        for read in reads {
            let (prompt, restored) = read?;
            for t in restored.iter().filter(|t| !t.segments.is_empty()) {
                rebuilt.trajectories += 1;
                rebuilt.segments += t.segments.len() as u64;
            }
            state.restore_prompt(&prompt, &restored, lead.token).await?;
            rebuilt.prompts += 1;
        }
    }
    Ok(rebuilt)
}

/// The trajectories of `prompt` as its objects (`found`: each trajectory's objects and the
/// epoch of the generation a regeneration replaced) rebuild them. Owns what it reads from,
/// so that many run at once inside the coordinator's spawned future.
async fn restored_trajectories(
    blobs: BlobStore,
    prompt: Prompt,
    found: Vec<(TrajectoryId, Objects, u64)>,
) -> Result<(Prompt, Vec<RestoredTrajectory>), BlobError> {
    let mut restored = Vec::new();
    for (id, objects, floor) in found {
        let seen = objects
            .values()
            .flatten()
            .map(|(e, _)| *e)
            .max()
            .unwrap_or(0);
        restored.push(RestoredTrajectory {
            sample: id.sample,
            segments: chain(&blobs, &id, &objects, floor).await?,
            epoch: seen.max(floor) + EPOCH_MARGIN,
        });
    }
    Ok((prompt, restored))
}

/// Every segment object of the run, by trajectory (one listing).
async fn segment_objects(
    blobs: &BlobStore,
    run: &str,
) -> Result<HashMap<TrajectoryId, Objects>, BlobError> {
    let prefix = keys::segments_prefix(run);
    let mut out: HashMap<TrajectoryId, Objects> = HashMap::new();
    for meta in blobs.list(&prefix).await? {
        let Some((id, seq, epoch)) = parse_segment_key(&prefix, &meta.key) else {
            continue; // not written by keys::segment
        };
        out.entry(id)
            .or_default()
            .entry(seq)
            .or_default()
            .push((epoch, meta.key));
    }
    Ok(out)
}

/// `(trajectory, seq, epoch)` of a key `{prefix}{prompt}/{sample}/{seq:08}-e{epoch}` (prompt
/// ids may hold slashes: the key is split from the right).
fn parse_segment_key(prefix: &str, key: &str) -> Option<(TrajectoryId, u32, u64)> {
    let mut parts = key.strip_prefix(prefix)?.rsplitn(3, '/');
    let (seq, epoch) = parts.next()?.split_once("-e")?;
    let sample = parts.next()?.parse().ok()?;
    let prompt = PromptId(parts.next()?.to_owned());
    let id = TrajectoryId { prompt, sample };
    Some((id, seq.parse().ok()?, epoch.parse().ok()?))
}

/// The epoch of the last generation each regenerated trajectory replaced, by trajectory (from
/// the ledger's `regenerated/{trajectory}/epoch-{epoch}` notes).
async fn regenerated_epochs(
    ledger: &dyn Ledger,
    run: &str,
) -> Result<HashMap<String, u64>, CoordinatorError> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for event in ledger.events(run).await? {
        if event.kind != EventKind::Regenerated {
            continue;
        }
        let parsed = event
            .key
            .strip_prefix("regenerated/")
            .and_then(|rest| rest.rsplit_once("/epoch-"))
            .and_then(|(id, e)| Some((id.to_owned(), e.parse::<u64>().ok()?)));
        if let Some((id, epoch)) = parsed {
            let e = out.entry(id).or_default();
            *e = (*e).max(epoch);
        }
    }
    Ok(out)
}

/// The committed chain of trajectory `id` from its objects: seq 0, 1, … each at its highest
/// epoch above `floor`, while epochs do not go back and the objects verify, up to the segment
/// that ends the trajectory.
async fn chain(
    blobs: &BlobStore,
    id: &TrajectoryId,
    objects: &Objects,
    floor: u64,
) -> Result<Vec<SegmentRef>, BlobError> {
    let mut picks = Vec::new();
    let mut last_epoch = 0;
    for seq in 0u32.. {
        let Some((epoch, key)) = objects
            .get(&seq)
            .and_then(|v| v.iter().filter(|(e, _)| *e > floor).max())
        else {
            break;
        };
        if *epoch < last_epoch {
            break;
        }
        last_epoch = *epoch;
        picks.push((seq, *epoch, key.clone()));
    }
    let keys = picks.iter().map(|(_, _, key)| key.clone()).collect();
    let reads = blobs.get_all(keys, CONCURRENT_READS).await;
    let mut segments = Vec::new();
    for ((seq, epoch, key), read) in picks.into_iter().zip(reads) {
        let bytes = match read {
            Ok(b) => b,
            Err(BlobError::NotFound { .. }) => break,
            Err(e) => return Err(e),
        };
        let Ok(segment) = codec::decode(&bytes) else {
            break;
        };
        if segment.trajectory != *id || segment.seq != seq || segment.lease_epoch != epoch {
            break;
        }
        segments.push(SegmentRef {
            seq,
            key,
            tokens: segment.tokens.len() as u32,
            version: segment.version,
        });
        if segment.finish.ends_trajectory() {
            break;
        }
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_keys_parse_from_the_right() {
        let prefix = &keys::segments_prefix("r");
        let key = keys::segment("r", &PromptId::from("a/b:c"), 3, 12, 7);
        let (id, seq, epoch) = parse_segment_key(prefix, &key).unwrap();
        assert_eq!(
            (id.prompt.0.as_str(), id.sample, seq, epoch),
            ("a/b:c", 3, 12, 7)
        );
        assert_eq!(parse_segment_key(prefix, "r/segments/p/0/junk"), None);
        assert_eq!(parse_segment_key(prefix, "r/steps/0/manifest.json"), None);
    }
}
