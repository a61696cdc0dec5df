//! `flywheel bench dataplane`: the platform's own ceiling, with an engine that costs nothing.
//!
//! - **Segments**: workers (the `sim` engine with no decode delay) write segments to the object
//!   store and commit them to the state store, the coordinator reads what finishes; measured
//!   for 1, 2, 4 … workers: segments and tokens committed per second, and the commit latency
//!   (object write + index commit) from the workers' histogram. Beside it, each store alone on
//!   the same machine, at the same concurrency: the state store's per-segment operations
//!   (reserve + commit under a lease) and the object store's segment writes, so the platform's
//!   overhead is a ratio to the slower store's own limit.
//! - **Step cut**: the coordinator's time to cut, plan and commit one step of Φ tokens from
//!   `prompts × K` finished trajectories; beside it, the state-store reads that cut needs
//!   (the finished stream and every trajectory's record), done alone.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flywheel_coordinator::{Coordinator, CoordinatorConfig, TickOutcome};
use flywheel_storage::config::{RolloutMode, RunConfig};
use flywheel_storage::queue::PromptProducer;
use flywheel_storage::state::StreamCursor;
use flywheel_storage::types::{FinishReason, Segment, SegmentRef, TrajectoryId};
use flywheel_storage::{codec, keys};
use flywheel_worker::engine::sim::{LengthDistribution, SimConfig};
use futures::StreamExt;
use prometheus::Histogram;
use prometheus::core::Metric;
use tokio_util::sync::CancellationToken;

use super::services::{
    VOCAB, fresh_run, open_run, prompt, services_run, start_coordinator, start_sim_workers,
};

/// Options of `flywheel bench dataplane`.
#[derive(clap::Args, Debug)]
pub struct DataplaneBench {
    /// A run config naming the services (as for `bench modes`).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Worker counts to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Engine slots per worker.
    #[arg(long, default_value_t = 16)]
    pub slots: usize,
    /// Tokens per segment (S).
    #[arg(long, default_value_t = 64)]
    pub segment_tokens: u32,
    /// Seconds measured per worker count (after a warm-up of a quarter of it).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Step cut: prompts of finished trajectories.
    #[arg(long, default_value_t = 512)]
    pub cut_prompts: u32,
    /// Step cut: samples per prompt (K).
    #[arg(long, default_value_t = 16)]
    pub cut_group_size: u32,
    /// Step cut: tokens per trajectory (Φ is all of them: 512 × 16 × 50 = 409,600).
    #[arg(long, default_value_t = 50)]
    pub cut_tokens: u32,
}

/// Response lengths of the segment measurement: 1 to 8 segments, uniform.
fn lengths(segment_tokens: u32) -> LengthDistribution {
    LengthDistribution::Uniform {
        lo: 1,
        hi: 8 * segment_tokens,
    }
}

/// Runs the bench and prints its report.
pub async fn run(b: &DataplaneBench) -> anyhow::Result<()> {
    if b.workers.is_empty() || b.workers.contains(&0) || b.slots == 0 || b.seconds <= 0.0 {
        bail!("--workers must list counts of at least 1, --slots and --seconds must be positive");
    }
    if b.cut_prompts == 0 || b.cut_group_size < 2 || b.cut_tokens == 0 {
        bail!("--cut-prompts and --cut-tokens must be at least 1, --cut-group-size at least 2");
    }
    let blob_dir = tempfile::tempdir()?;
    let base = services_run(b.config.as_deref(), blob_dir.path())?;
    println!(
        "services: state {}, objects {}, ledger {}, kafka {}",
        flywheel_service::redact_url(&base.storage.state_url),
        flywheel_service::redact_url(&base.storage.blob_url),
        flywheel_service::redact_url(&base.storage.ledger_url),
        base.kafka.brokers
    );
    println!(
        "segments: sim engine with no decode delay, {} slots per worker, S = {} tokens, responses of 1 to {} tokens; {} s measured per worker count",
        b.slots,
        b.segment_tokens,
        8 * b.segment_tokens,
        b.seconds
    );
    let mut first = None;
    let mut rates = Vec::new();
    for &n in &b.workers {
        let m = segments(b, &base, n)
            .await
            .with_context(|| format!("{n} workers"))?;
        let per_s = m.segments as f64 / m.secs;
        let scaling = first.map_or(1.0, |f: f64| per_s / f);
        first.get_or_insert(per_s);
        rates.push((n, per_s));
        println!(
            "{n} workers: {per_s:.0} segments/s, {:.0} tokens/s, commit latency p50 {} p99 {} ({:.2}x the segments/s of 1 worker)",
            m.tokens as f64 / m.secs,
            ms(m.p50),
            ms(m.p99),
            scaling
        );
    }
    let concurrency = b.workers.iter().max().copied().unwrap_or(1) * b.slots;
    let alone = stores_alone(b, &base, concurrency).await?;
    println!(
        "alone at concurrency {concurrency}: state store {:.0} segment commits/s (reserve + commit), object store {:.0} segment writes/s",
        alone.0, alone.1
    );
    let limit = alone.0.min(alone.1);
    for (n, per_s) in &rates {
        println!(
            "  {n} workers reach {:.2}x of the slower store's limit ({limit:.0}/s)",
            per_s / limit
        );
    }
    let cut = step_cut(b, &base).await?;
    println!(
        "step cut: {} prompts x {} samples x {} tokens = Φ {} tokens: the coordinator cut and committed it in {:.3}s; the state-store reads it needs, alone: {:.3}s ({:.2}x)",
        b.cut_prompts,
        b.cut_group_size,
        b.cut_tokens,
        u64::from(b.cut_prompts) * u64::from(b.cut_group_size) * u64::from(b.cut_tokens),
        cut.0,
        cut.1,
        cut.0 / cut.1
    );
    println!("reproduce: {}", super::reproduce());
    Ok(())
}

fn ms(secs: f64) -> String {
    format!("{:.1} ms", secs * 1000.0)
}

/// What one worker count measured.
struct Segments {
    segments: u64,
    tokens: u64,
    secs: f64,
    p50: f64,
    p99: f64,
}

/// `n` workers on a fresh run with an unbounded version budget (no trainer is needed: version
/// 0 never runs out), measured after a warm-up.
async fn segments(b: &DataplaneBench, base: &RunConfig, n: usize) -> anyhow::Result<Segments> {
    let mut run = fresh_run(base, &format!("dataplane-{n}"));
    run.rollout.mode = RolloutMode::Partial;
    run.rollout.version_budget_tokens = 1 << 50;
    run.rollout.segment_tokens = b.segment_tokens;
    run.rollout.max_response_tokens = 8 * b.segment_tokens;
    run.batch.filter_zero_variance = false;
    let (stores, _) = open_run(&run, 8 * b.segment_tokens, 0).await?;
    let stop = CancellationToken::new();
    let coordinator = start_coordinator(&stores, &run, &stop);
    let sim = SimConfig {
        slots: b.slots,
        decode_tokens_per_s: 0.0,
        lengths: lengths(b.segment_tokens),
        vocab_size: VOCAB,
        eos_token_id: 0,
        ..SimConfig::default()
    };
    let (workers, _) = start_sim_workers(&stores, &run, n, &sim).await?;
    let producer = PromptProducer::new(&run.kafka)?;
    let group_size = 4u32;
    // Unfinished trajectories kept in flight: twice the slots (nothing is trained here, so
    // the ledger's pending prompts only grow; the state store's counts tell what is left).
    let backlog = (2 * n * b.slots) as u64;
    let mut sent = 0u64;
    let committed = || -> u64 {
        workers
            .iter()
            .map(|w| w.metrics.segments_committed.get())
            .sum()
    };
    let tokens = || -> u64 {
        workers
            .iter()
            .map(|w| w.metrics.tokens_generated.get())
            .sum()
    };
    let histograms: Vec<&Histogram> = workers
        .iter()
        .map(|w| &w.metrics.segment_commit_latency)
        .collect();
    let warm_up = Duration::from_secs_f64(b.seconds / 4.0);
    let measured = Duration::from_secs_f64(b.seconds);
    let began = Instant::now();
    // The warm-up runs from the first committed segment (the services start first).
    let mut started: Option<Instant> = None;
    let mut start: Option<(Instant, u64, u64, Vec<u64>)> = None;
    loop {
        let c = stores.state.counts().await?;
        let mut in_flight = sent.saturating_sub(c.prompts) * u64::from(group_size)
            + c.pending
            + c.generating
            + c.parked;
        while in_flight < backlog {
            producer.send(&prompt(sent, group_size)).await?;
            sent += 1;
            in_flight += u64::from(group_size);
        }
        if started.is_none() && committed() > 0 {
            started = Some(Instant::now());
        } else if started.is_none() && began.elapsed() > Duration::from_secs(120) {
            bail!("no segment was committed in 2 minutes; see the log above");
        }
        if start.is_none() && started.is_some_and(|s| s.elapsed() >= warm_up) {
            start = Some((Instant::now(), committed(), tokens(), buckets(&histograms)));
        }
        // At least `--seconds`, and on until a segment is committed: a consumer-group
        // rebalance can idle a worker for seconds once its backlog is done.
        if let Some((at, from, ..)) = &start {
            if at.elapsed() >= measured && committed() > *from {
                break;
            }
            if at.elapsed() > Duration::from_secs(120) {
                bail!("no segment was committed in 2 minutes; see the log above");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (at, segments0, tokens0, buckets0) = start.context("never started measuring")?;
    let secs = at.elapsed().as_secs_f64();
    let (segments1, tokens1, buckets1) = (committed(), tokens(), buckets(&histograms));
    let bounds: Vec<f64> = histograms[0]
        .metric()
        .get_histogram()
        .get_bucket()
        .iter()
        .map(|b| b.upper_bound())
        .collect();
    let diff: Vec<u64> = buckets1.iter().zip(&buckets0).map(|(a, b)| a - b).collect();
    stop.cancel();
    for w in workers {
        w.shutdown().await;
    }
    coordinator.await??;
    let _ = stores.state.delete_run().await;
    Ok(Segments {
        segments: segments1 - segments0,
        tokens: tokens1 - tokens0,
        secs,
        p50: quantile(&bounds, &diff, 0.5),
        p99: quantile(&bounds, &diff, 0.99),
    })
}

/// Cumulative bucket counts of `histograms`, summed.
fn buckets(histograms: &[&Histogram]) -> Vec<u64> {
    let mut sum: Vec<u64> = Vec::new();
    for h in histograms {
        let metric = h.metric();
        let counts = metric.get_histogram().get_bucket();
        sum.resize(counts.len(), 0);
        for (s, c) in sum.iter_mut().zip(counts) {
            *s += c.cumulative_count();
        }
    }
    sum
}

/// The `q` quantile of a histogram given its bucket bounds and cumulative counts, linear
/// within the bucket (as Prometheus' `histogram_quantile`).
fn quantile(bounds: &[f64], cumulative: &[u64], q: f64) -> f64 {
    let Some(&total) = cumulative.last() else {
        return f64::NAN;
    };
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for (&bound, &count) in bounds.iter().zip(cumulative) {
        if count as f64 >= rank {
            let within = (rank - lower.1 as f64) / (count - lower.1).max(1) as f64;
            return lower.0 + (bound - lower.0) * within;
        }
        lower = (bound, count);
    }
    lower.0
}

/// Each store alone, `concurrency` writers for a quarter of `--seconds` each: the state
/// store's reserve + commit of a segment under a lease, the object store's write of an
/// encoded segment. Returns (commits/s, writes/s).
async fn stores_alone(
    b: &DataplaneBench,
    base: &RunConfig,
    concurrency: usize,
) -> anyhow::Result<(f64, f64)> {
    let run = fresh_run(base, "dataplane-alone");
    let (stores, _) = open_run(&run, 8 * b.segment_tokens, 0).await?;
    let state = stores.state.clone();
    // This bench plays the leader: the store is fresh, so there is nothing to rebuild.
    state.mark_initialised().await?;
    let lead = state
        .acquire_leader("bench", Duration::from_secs(60))
        .await?
        .context("the fresh run's leader lock is taken")?;
    state.open_version(0, 1 << 50, 2, lead.token).await?;
    let ttl = Duration::from_secs(60);
    let p = prompt(0, concurrency as u32);
    stores.ledger.accept_prompt(&run.storage.run_id, &p).await?;
    state.register_prompt(&p).await?;
    let period = Duration::from_secs_f64(b.seconds / 4.0);
    let s = u64::from(b.segment_tokens);

    let commits = futures::future::try_join_all(p.trajectory_ids().map(|id| {
        let state = state.clone();
        async move {
            let epoch = state.claim(&id, "bench", ttl).await?.lease().epoch;
            let started = Instant::now();
            let mut seq = 0u32;
            while started.elapsed() < period {
                state.reserve(0, s).await?;
                let r = SegmentRef {
                    seq,
                    key: format!("alone/{seq}"),
                    tokens: s as u32,
                    version: 0,
                };
                state.commit_segment(&id, "bench", epoch, &r, ttl).await?;
                seq += 1;
            }
            anyhow::Ok(u64::from(seq))
        }
    }))
    .await?;
    let commits_per_s = commits.iter().sum::<u64>() as f64 / period.as_secs_f64();

    let segment = Segment {
        trajectory: TrajectoryId {
            prompt: p.id.clone(),
            sample: 0,
        },
        seq: 0,
        version: 0,
        lease_epoch: 1,
        tokens: vec![7; s as usize],
        logprobs: vec![-1.0; s as usize],
        finish: FinishReason::None,
    };
    let encoded = codec::encode(&segment)?;
    let blobs = &stores.blobs;
    let run_id = &run.storage.run_id;
    let prompt_id = &p.id;
    let writes = futures::future::try_join_all((0..concurrency as u32).map(|sample| {
        let encoded = encoded.clone();
        async move {
            let started = Instant::now();
            let mut seq = 0u32;
            while started.elapsed() < period {
                let key = keys::segment(run_id, prompt_id, sample, seq, 1);
                blobs.put(&key, encoded.clone()).await?;
                seq += 1;
            }
            anyhow::Ok(u64::from(seq))
        }
    }))
    .await?;
    let writes_per_s = writes.iter().sum::<u64>() as f64 / period.as_secs_f64();
    for object in blobs.list(&format!("{run_id}/")).await? {
        blobs.delete(&object.key).await?;
    }
    let _ = state.delete_run().await;
    Ok((commits_per_s, writes_per_s))
}

/// The coordinator's cut of one step from `cut_prompts × cut_group_size` finished
/// trajectories of `cut_tokens` tokens each, and the same state-store reads alone. Returns
/// (seconds to commit the step, seconds of the reads alone).
async fn step_cut(b: &DataplaneBench, base: &RunConfig) -> anyhow::Result<(f64, f64)> {
    let mut run = fresh_run(base, "dataplane-cut");
    let k = b.cut_group_size;
    let phi = u64::from(b.cut_prompts) * u64::from(k) * u64::from(b.cut_tokens);
    run.batch.token_budget = phi;
    run.batch.filter_zero_variance = false;
    run.rollout.version_budget_tokens = phi;
    run.rollout.max_response_tokens = b.cut_tokens.max(run.rollout.segment_tokens);
    let (stores, _) = open_run(&run, run.rollout.max_response_tokens, 0).await?;
    let mut coordinator = Coordinator::new(
        stores.clone(),
        flywheel_coordinator::ServiceConfig {
            run: run.clone(),
            coordinator: CoordinatorConfig {
                candidate_id: format!("{}-coordinator", run.storage.run_id),
                ..CoordinatorConfig::default()
            },
        },
    );
    // Opens version 0.
    coordinator.tick().await?;
    let state = stores.state.clone();
    let ttl = Duration::from_secs(600);
    let run_id = run.storage.run_id.clone();
    let filled = futures::stream::iter(0..u64::from(b.cut_prompts))
        .map(|n| {
            let (state, ledger, run_id) = (state.clone(), stores.ledger.clone(), &run_id);
            let tokens = b.cut_tokens;
            async move {
                let p = prompt(n, k);
                ledger.accept_prompt(run_id, &p).await?;
                state.register_prompt(&p).await?;
                for id in p.trajectory_ids() {
                    let epoch = state.claim(&id, "bench", ttl).await?.lease().epoch;
                    let r = SegmentRef {
                        seq: 0,
                        key: keys::segment(run_id, &id.prompt, id.sample, 0, epoch),
                        tokens,
                        version: 0,
                    };
                    state.commit_segment(&id, "bench", epoch, &r, ttl).await?;
                    state.finish(&id, "bench", epoch, id.sample as f32).await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    filled.into_iter().collect::<anyhow::Result<Vec<()>>>()?;

    // The reads alone first: the cut consumes the finished stream.
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut cursor = StreamCursor::START;
    loop {
        let entries = state.read_finished(cursor, 1000).await?;
        let Some(last) = entries.last() else { break };
        cursor = last.cursor;
        ids.extend(entries.into_iter().map(|e| e.trajectory));
    }
    let read: Vec<_> = futures::stream::iter(&ids)
        .map(|id| state.trajectory(id))
        .buffer_unordered(32)
        .collect()
        .await;
    read.into_iter().collect::<Result<Vec<_>, _>>()?;
    let alone = started.elapsed().as_secs_f64();
    let started = Instant::now();
    loop {
        match coordinator.tick().await? {
            TickOutcome::Committed(_) => break,
            _ if started.elapsed() > Duration::from_secs(300) => {
                bail!("the coordinator cut no step in 5 minutes")
            }
            _ => {}
        }
    }
    let cut = started.elapsed().as_secs_f64();

    coordinator.resign().await;
    let _ = state.delete_run().await;
    Ok((cut, alone))
}
