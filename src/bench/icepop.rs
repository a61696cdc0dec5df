//! `flywheel bench icepop`: IcePop against vanilla GRPO under a controlled training/inference
//! mismatch, on the demo's task.
//!
//! Every run is the embedded demo (warm start, RL in `partial` mode, held-out evaluation) whose
//! workers sample from the published weights plus Gaussian noise (`--noise` × each tensor's
//! RMS, the same on every worker): the engine's probabilities differ from the trainer's as a
//! reduced-precision inference engine's do, by an amount under control. The two arms differ
//! only in the loss: IcePop weighs each token by k = π_train(θ_old) / π_infer and masks those
//! with k outside [α, β] = [0.5, 5]; vanilla GRPO weighs every token 1 (PPO's clip applies to
//! both). Each seed runs both arms from the same warm start.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Parser;

use crate::demo::args::{DemoArgs, report_folder};
use crate::demo::report::{RunSeries, StepMetrics, percent, plot_runs};
use crate::demo::run::DemoOutcome;

/// Options of `flywheel bench icepop`.
#[derive(clap::Args, Debug)]
pub struct IcepopBench {
    /// Seeds per arm (0, 1, …); each seed runs both arms.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// RL steps per run (also the length of the learning-rate decay).
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Noise on the engine's weights, relative to each tensor's RMS.
    #[arg(long, default_value_t = 0.1)]
    pub noise: f32,
    /// Held-out evaluation every this many steps.
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Tiny runs of a few steps (the demo's `--quick`): shows that the bench works, measures
    /// nothing.
    #[arg(long)]
    pub quick: bool,
    /// Folder for each run's report, `runs.csv` and the plots; default
    /// `runs/bench-icepop-<unix time>/`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The two arms of the experiment.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Arm {
    /// Every token weighed 1, whatever k.
    Grpo,
    /// Tokens with k outside [α, β] masked.
    Icepop,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Grpo => "grpo",
            Arm::Icepop => "icepop",
        }
    }
}

/// Twice the standard error of an accuracy near 10 % measured on the demo's 400 held-out
/// problems, in points: a smaller drop is the evaluation's noise, not a collapse.
const COLLAPSE_POINTS: f64 = 3.0;

/// One finished run.
struct Run {
    arm: Arm,
    seed: u64,
    outcome: DemoOutcome,
}

impl Run {
    fn steps(&self) -> &[StepMetrics] {
        &self.outcome.steps
    }

    fn gain(&self) -> f64 {
        let s = &self.outcome.summary;
        s.final_accuracy - s.warm_start_accuracy
    }

    /// Mean reward over quarter `quarter` (0 to 3) of the run's steps (at least one step).
    fn reward_quarter(&self, quarter: usize) -> f64 {
        let n = self.steps().len();
        let (from, to) = (n * quarter / 4, n * (quarter + 1) / 4);
        let part = &self.steps()[from..to.max(from + 1).min(n)];
        part.iter().map(|m| m.reward_mean).sum::<f64>() / part.len().max(1) as f64
    }

    /// Held-out accuracy after RL more than [`COLLAPSE_POINTS`] below the warm start's:
    /// training made the policy worse by more than the evaluation's noise.
    fn collapsed(&self) -> bool {
        100.0 * self.gain() < -COLLAPSE_POINTS
    }

    fn max_grad_norm(&self) -> f64 {
        self.steps().iter().map(|m| m.grad_norm).fold(0.0, f64::max)
    }

    fn mean(&self, value: impl Fn(&StepMetrics) -> f64) -> f64 {
        self.steps().iter().map(value).sum::<f64>() / self.steps().len().max(1) as f64
    }
}

/// The demo's options for one run.
#[derive(Parser)]
struct DemoCli {
    #[command(flatten)]
    demo: DemoArgs,
}

fn demo_args(b: &IcepopBench, seed: u64, arm: Arm, out: &Path) -> DemoArgs {
    let mut argv = vec![
        "demo".to_owned(),
        format!("--steps={}", b.steps),
        format!("--seed={seed}"),
        format!("--eval-every={}", b.eval_every),
        format!("--engine-weight-noise={}", b.noise),
        format!("--out={}", out.display()),
    ];
    if arm == Arm::Grpo {
        argv.push("--vanilla-grpo".into());
    }
    if b.quick {
        argv.push("--quick".into());
    }
    DemoCli::parse_from(argv).demo
}

/// Runs the bench and prints its report.
pub async fn run(b: &IcepopBench) -> anyhow::Result<()> {
    if b.seeds == 0 || b.steps == 0 || b.eval_every == 0 {
        bail!("--seeds, --steps and --eval-every must be at least 1");
    }
    if !(b.noise.is_finite() && b.noise >= 0.0) {
        bail!("--noise = {} must be a finite number ≥ 0", b.noise);
    }
    let out = report_folder(b.out.as_deref(), "bench-icepop")?;
    println!(
        "workload: the demo's task and model, {} RL steps a run, engine weight noise {} × each \
         tensor's RMS, held-out evaluation every {} steps; arms: vanilla GRPO and IcePop \
         (k in [0.5, 5]); seeds 0..{}",
        b.steps, b.noise, b.eval_every, b.seeds
    );
    let mut runs = Vec::new();
    for seed in 0..b.seeds {
        for arm in [Arm::Grpo, Arm::Icepop] {
            let dir = out.join(format!("{}-seed{seed}", arm.name()));
            let outcome = crate::demo::run::run(demo_args(b, seed, arm, &dir))
                .await
                .with_context(|| format!("the {} run of seed {seed}", arm.name()))?;
            let run = Run { arm, seed, outcome };
            let s = &run.outcome.summary;
            println!(
                "{:<6} seed {seed}: held-out {} -> {} ({:+.1} points); reward first/last quarter \
                 {:.3} / {:.3}; mean |log k| {:.4}; masked {}; grad norm mean {:.3}, max {:.3}; \
                 {} steps in {:.0} s{}",
                arm.name(),
                percent(s.warm_start_accuracy),
                percent(s.final_accuracy),
                100.0 * run.gain(),
                run.reward_quarter(0),
                run.reward_quarter(3),
                run.mean(|m| m.mean_abs_log_k),
                percent(run.mean(|m| m.icepop_masked_fraction)),
                run.mean(|m| m.grad_norm),
                run.max_grad_norm(),
                run.steps().len(),
                s.total_wall_secs,
                if run.collapsed() { "; COLLAPSED" } else { "" },
            );
            runs.push(run);
        }
    }
    // Prints an arm's medians; returns its median held-out gain (points) and collapsed runs.
    let summarize = |arm: Arm| {
        let of_arm: Vec<&Run> = runs.iter().filter(|r| r.arm == arm).collect();
        let gains: Vec<f64> = of_arm.iter().map(|r| 100.0 * r.gain()).collect();
        let last: Vec<f64> = of_arm.iter().map(|r| r.reward_quarter(3)).collect();
        let grad: Vec<f64> = of_arm.iter().map(|r| r.max_grad_norm()).collect();
        let collapsed = of_arm.iter().filter(|r| r.collapsed()).count();
        println!(
            "{:<6} median (min–max) over {} seeds: held-out gain {} points; last-quarter reward \
             {}; max grad norm {}; collapsed {collapsed}/{}",
            arm.name(),
            of_arm.len(),
            super::median_spread(&gains, |v| format!("{v:+.1}")),
            super::median_spread(&last, |v| format!("{v:.3}")),
            super::median_spread(&grad, |v| format!("{v:.2}")),
            of_arm.len(),
        );
        (super::median(&gains), collapsed)
    };
    let (grpo_gain, grpo_collapsed) = summarize(Arm::Grpo);
    let (icepop_gain, icepop_collapsed) = summarize(Arm::Icepop);
    let holds = grpo_collapsed > icepop_collapsed && icepop_gain > grpo_gain;
    println!(
        "by held-out accuracy, the paper's finding (GRPO degrades under the mismatch, IcePop \
         stays stable) {} here: IcePop/GRPO median held-out gain {icepop_gain:+.1} / \
         {grpo_gain:+.1} points, collapsed runs {icepop_collapsed} / {grpo_collapsed} (the \
         gradient norms are above)",
        if holds { "holds" } else { "does not hold" },
    );
    write_csv(&out.join("runs.csv"), &runs)?;
    plot(&out, &runs)?;
    println!(
        "wrote {}: runs.csv, reward.png, held_out_accuracy.png, mean_abs_log_k.png, \
         masked_fraction.png, grad_norm.png, a report folder per run",
        out.display()
    );
    println!("reproduce: {}", super::reproduce());
    Ok(())
}

/// One row per run and step.
fn write_csv(path: &Path, runs: &[Run]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "arm,seed,step,reward_mean,held_out_accuracy,icepop_masked_fraction,mean_abs_log_k,\
         grad_norm\n",
    );
    for r in runs {
        for m in r.steps() {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                r.arm.name(),
                r.seed,
                m.step,
                m.reward_mean,
                m.held_out_accuracy.map_or(String::new(), |a| a.to_string()),
                m.icepop_masked_fraction,
                m.mean_abs_log_k,
                m.grad_norm
            ));
        }
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

/// One PNG per metric, a line per run (GRPO blue, IcePop red).
fn plot(out: &Path, runs: &[Run]) -> anyhow::Result<()> {
    type Metric = fn(&StepMetrics) -> Option<f64>;
    let charts: [(&str, &'static str, &'static str, bool, Metric); 5] = [
        ("reward.png", "Mean reward per step", "reward", false, |m| {
            Some(m.reward_mean)
        }),
        (
            "held_out_accuracy.png",
            "Held-out accuracy",
            "accuracy",
            true,
            |m| m.held_out_accuracy,
        ),
        (
            "mean_abs_log_k.png",
            "Training/inference mismatch: mean |log k|",
            "mean |log k|",
            false,
            |m| Some(m.mean_abs_log_k),
        ),
        (
            "masked_fraction.png",
            "IcePop masked fraction",
            "masked tokens",
            true,
            |m| Some(m.icepop_masked_fraction),
        ),
        (
            "grad_norm.png",
            "Gradient norm (before clipping)",
            "L2 norm",
            false,
            |m| Some(m.grad_norm),
        ),
    ];
    for (file, title, y, percent, value) in charts {
        let series = runs
            .iter()
            .map(|r| RunSeries {
                label: format!("{} seed {}", r.arm.name(), r.seed),
                arm: r.arm as usize,
                points: r
                    .steps()
                    .iter()
                    .filter_map(|m| value(m).map(|v| (m.step as f64, v)))
                    .collect(),
            })
            .collect();
        plot_runs(&out.join(file), title, y, percent, series)?;
    }
    Ok(())
}
