//! `flywheel bench weights`: what publishing a policy version costs the trainer, and what
//! loading it costs a worker, through the same code they run (`weights::publish` as the trainer
//! calls it, `weights::fetch` as a worker calls it).
//!
//! Each version after the first is the previous one after real training steps (AdamW at its
//! default learning rate), so the deltas are those of training, not of synthetic noise. Every
//! version is published twice, side by side: incrementally against the previous version (the
//! trainer's way), and whole into a run of its own (the baseline: no previous version, nothing
//! in the store). Every version is then loaded twice: from the previous version, as a worker
//! that holds it does, and from scratch, as a new worker does; then turned into a model.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::bail;
use flywheel_model::{Model, Params, WeightDtype};
use flywheel_storage::blob::BlobStore;
use flywheel_storage::weights::{self, WeightsConfig, WeightsManifest};

use super::{Preset, TrainSteps, median_spread, preset};

/// Options of `flywheel bench weights`.
#[derive(clap::Args, Debug)]
pub struct WeightsBench {
    /// The model to build with random weights.
    #[arg(long, value_enum, default_value = "demo")]
    pub preset: Preset,
    /// Versions published after the first (each is measured).
    #[arg(long, default_value_t = 5)]
    pub versions: usize,
    /// Training steps between two versions.
    #[arg(long, default_value_t = 1)]
    pub steps_per_version: usize,
    /// AdamW's learning rate for those steps (the demo's RL schedule starts at 4e-4; a larger
    /// step changes more bits, so deltas grow with it).
    #[arg(long, default_value_t = 4e-4)]
    pub lr: f64,
    /// The dtype versions are published in: f32, or bf16 / f16 (AdamW then steps f32 masters,
    /// as the trainer of a bf16 checkpoint does).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: WeightDtype,
    /// The object store (as `storage.blob_url`, e.g. `s3://bucket/prefix?endpoint=…`);
    /// default a temporary directory. Everything written is deleted at the end.
    #[arg(long)]
    pub blob_url: Option<String>,
}

/// One version's figures.
struct Row {
    /// Bytes uploaded and seconds, incremental.
    incremental: (u64, f64),
    /// Bytes uploaded and seconds, whole.
    whole: (u64, f64),
    /// Bytes downloaded and seconds, from the previous version.
    load_incremental: (u64, f64),
    /// Bytes downloaded and seconds, from scratch.
    load_scratch: (u64, f64),
    /// Seconds to turn the fetched bytes into a model.
    into_model: f64,
    /// Deltas among the objects uploaded incrementally.
    deltas: u64,
}

/// Runs the bench and prints its report.
pub async fn run(b: &WeightsBench) -> anyhow::Result<()> {
    if b.versions == 0 || b.steps_per_version == 0 {
        bail!("--versions and --steps-per-version must be at least 1");
    }
    if !(b.lr > 0.0 && b.lr.is_finite()) {
        bail!("--lr must be a positive number, got {}", b.lr);
    }
    let dir = tempfile::tempdir()?;
    let url = match &b.blob_url {
        Some(u) => u.clone(),
        None => format!("file://{}", dir.path().display()),
    };
    let blobs = BlobStore::open(&url)?;
    let config = WeightsConfig::default();
    let mut model_config = preset(b.preset, 64);
    model_config.dtype = b.dtype;
    let mut params = Params::init(&model_config, 0)?;
    // Version 0 as published: rounded to the dtype.
    for t in params.tensors_mut() {
        t.data.iter_mut().for_each(|v| *v = b.dtype.round(*v));
    }
    let version_bytes = (params.num_elements() * b.dtype.size()) as u64;
    println!(
        "model: {:?} preset, {:.1}M parameters, {} per version ({}); store {}",
        b.preset,
        params.num_elements() as f64 / 1e6,
        mib(version_bytes),
        b.dtype.hf_name(),
        blobs
    );
    println!(
        "{} versions, {} training step(s) between versions (batch 2 x 32 random tokens, AdamW lr {}); chunks of {}, delta chains up to {}",
        b.versions,
        b.steps_per_version,
        b.lr,
        mib(config.chunk_bytes),
        config.max_delta_chain
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let run = format!("bench-weights-{}-{started}", std::process::id());
    let mut runs = vec![run.clone()];
    let mut steps = TrainSteps::new(&params, 2, 32, b.lr)?;
    let first = publish(&blobs, &run, 0, &params, None, &config).await?;
    let mut previous = first.0;
    let mut held = weights::fetch(&blobs, &run, 0, None, &config).await?;
    println!(
        "{:>7} | {:>20} {:>20} | {:>20} {:>20} | {:>9}",
        "version",
        "publish incremental",
        "publish whole",
        "load from v-1",
        "load from scratch",
        "to model"
    );
    let mut rows = Vec::new();
    for v in 1..=b.versions as u64 {
        for _ in 0..b.steps_per_version {
            steps.step(&mut params)?;
        }
        let (manifest, incremental, deltas) =
            publish(&blobs, &run, v, &params, Some(&previous), &config).await?;
        let whole_run = format!("{run}-whole-{v}");
        runs.push(whole_run.clone());
        let (_, whole, _) = publish(&blobs, &whole_run, v, &params, None, &config).await?;

        let start = Instant::now();
        let fetched = weights::fetch(
            &blobs,
            &run,
            v,
            Some((&held.manifest, &held.tensors)),
            &config,
        )
        .await?;
        let load_incremental = (fetched.bytes_fetched, start.elapsed().as_secs_f64());
        let start = Instant::now();
        let scratch = weights::fetch(&blobs, &run, v, None, &config).await?;
        let load_scratch = (scratch.bytes_fetched, start.elapsed().as_secs_f64());
        if scratch.tensors != fetched.tensors {
            bail!("version {v} loaded from scratch differs from version {v} loaded from v-1");
        }
        let start = Instant::now();
        let loaded = Params::from_bytes_map(&model_config, &fetched.tensors)?;
        Model::cpu(&loaded)?;
        let into_model = start.elapsed().as_secs_f64();
        if loaded.tensors() != params.tensors() {
            bail!("version {v} loaded is not the version published");
        }
        let row = Row {
            incremental,
            whole,
            load_incremental,
            load_scratch,
            into_model,
            deltas,
        };
        println!(
            "{v:>7} | {:>20} {:>20} | {:>20} {:>20} | {:>8.3}s",
            cell(row.incremental),
            cell(row.whole),
            cell(row.load_incremental),
            cell(row.load_scratch),
            row.into_model
        );
        rows.push(row);
        previous = manifest;
        held = fetched;
    }
    for r in &runs {
        for object in blobs.list(&format!("{r}/")).await? {
            blobs.delete(&object.key).await?;
        }
    }

    let ratio = |f: &dyn Fn(&Row) -> f64| -> String {
        median_spread(&rows.iter().map(f).collect::<Vec<_>>(), |x| {
            format!("{x:.3}")
        })
    };
    println!(
        "median (min–max) over {} versions; ratios < 1 favour the incremental way:",
        rows.len()
    );
    println!(
        "  publish incremental / whole: bytes {}, time {}; {} deltas per version",
        ratio(&|r| r.incremental.0 as f64 / r.whole.0 as f64),
        ratio(&|r| r.incremental.1 / r.whole.1),
        median_spread(
            &rows.iter().map(|r| r.deltas as f64).collect::<Vec<_>>(),
            |x| format!("{x:.0}")
        ),
    );
    println!(
        "  load from v-1 / from scratch: bytes {}, time {}",
        ratio(&|r| r.load_incremental.0 as f64 / r.load_scratch.0.max(1) as f64),
        ratio(&|r| r.load_incremental.1 / r.load_scratch.1),
    );
    println!(
        "  incremental publish {}, load from v-1 {}, into a model {}",
        median_spread(
            &rows.iter().map(|r| r.incremental.1).collect::<Vec<_>>(),
            seconds
        ),
        median_spread(
            &rows
                .iter()
                .map(|r| r.load_incremental.1)
                .collect::<Vec<_>>(),
            seconds
        ),
        median_spread(
            &rows.iter().map(|r| r.into_model).collect::<Vec<_>>(),
            seconds
        ),
    );
    println!("reproduce: {}", super::reproduce());
    Ok(())
}

fn parse_dtype(name: &str) -> Result<WeightDtype, String> {
    match name {
        "f32" => Ok(WeightDtype::F32),
        "bf16" => Ok(WeightDtype::Bf16),
        "f16" => Ok(WeightDtype::F16),
        other => Err(format!(
            "`{other}` is not a weight dtype: use f32, bf16 or f16"
        )),
    }
}

/// Publishes `params` as `version` of `run` through the trainer's own call; returns the
/// manifest, (bytes uploaded, seconds) and the deltas among the objects uploaded.
async fn publish(
    blobs: &BlobStore,
    run: &str,
    version: u64,
    params: &Params,
    previous: Option<&WeightsManifest>,
    config: &WeightsConfig,
) -> anyhow::Result<(WeightsManifest, (u64, f64), u64)> {
    let start = Instant::now();
    let report = flywheel_trainer::publish_params(
        blobs,
        run,
        version,
        params,
        previous,
        &BTreeMap::new(),
        config,
    )
    .await?;
    Ok((
        report.manifest,
        (report.bytes_written, start.elapsed().as_secs_f64()),
        report.deltas_written,
    ))
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn seconds(s: f64) -> String {
    format!("{s:.3}s")
}

/// "bytes in time" for the table.
fn cell((bytes, secs): (u64, f64)) -> String {
    format!("{} {:.3}s", mib(bytes), secs)
}
