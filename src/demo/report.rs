//! The demo's report: per-step metrics, the run summary, and the folder they are written to.
//!
//! [`write_report`] turns a finished run ([`DemoSummary`] + one [`StepMetrics`] per RL step)
//! into a self-contained folder a person can open without any tool but a browser:
//!
//! ```text
//! <out>/report.html           summary, the two accuracy numbers, plots, per-step table
//! <out>/metrics.json          {"summary": …, "steps": […]} (see [`MetricsDocument`])
//! <out>/metrics.csv           one row per step
//! <out>/reward_accuracy.png   reward mean and held-out accuracy, warm-start reference line
//! <out>/tokens_per_second.png rollout and training throughput
//! <out>/staleness.png         mean and max staleness of trained tokens
//! <out>/icepop_masked.png     IcePop masked fraction
//! <out>/step_time.png         step time split into rollout wait and training
//! ```
//!
//! The plots are drawn with `plotters` into PNGs; their text uses a font embedded in the
//! binary, so a machine without fontconfig or system fonts renders the same report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// What one RL step did, as the demo measured it. One record per step, in step order.
///
/// Token counts and durations are for this step alone, not cumulative; fractions are in
/// `[0, 1]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step number (the ledger's step index); strictly increasing across a run.
    pub step: u64,
    /// The policy version the trainer published after this step.
    pub policy_version: u64,
    /// Wall-clock seconds from the start of the demo to the end of this step.
    pub elapsed_secs: f64,
    /// Mean reward over the trajectories trained in this step.
    pub reward_mean: f64,
    /// Held-out accuracy in `[0, 1]` measured after this step; `None` on steps that were not
    /// evaluated (evaluation runs only every few steps because it is expensive).
    pub held_out_accuracy: Option<f64>,
    /// Response tokens trained in this step.
    pub tokens_trained: u64,
    /// Response tokens the workers generated while this step was being assembled.
    pub tokens_generated: u64,
    /// Rollout throughput over this step: generated tokens per second of wall time.
    pub rollout_tokens_per_sec: f64,
    /// Trained tokens by staleness: versions behind the trained policy → token count.
    /// Partial rollouts make stale tokens normal; this shows how stale.
    pub staleness_tokens: BTreeMap<u64, u64>,
    /// Fraction of trained tokens IcePop masked out (train/infer ratio outside `[α, β]`).
    pub icepop_masked_fraction: f64,
    /// Mean |log k| over trained tokens, k = π_train(θ_old) / π_infer: the mismatch between
    /// the trainer's and the inference engine's probabilities.
    pub mean_abs_log_k: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean per-token entropy of the policy on the trained tokens.
    pub entropy: f64,
    /// The step's loss.
    pub loss: f64,
    /// Seconds the trainer waited for the coordinator's batch (rollouts not ready yet).
    pub rollout_wait_secs: f64,
    /// Seconds the trainer spent computing and applying the update.
    pub train_secs: f64,
    /// Partial trajectories parked (unfinished, waiting to be resumed) at the end of the step.
    pub parked_trajectories: u64,
    /// Trajectories purged in this step because they outlived the staleness limit.
    pub purged_trajectories: u64,
}

impl StepMetrics {
    /// Token-weighted mean staleness of the trained tokens, `None` when no tokens were counted.
    pub fn mean_staleness(&self) -> Option<f64> {
        let tokens: u64 = self.staleness_tokens.values().sum();
        if tokens == 0 {
            return None;
        }
        let weighted: f64 = self
            .staleness_tokens
            .iter()
            .map(|(behind, n)| *behind as f64 * *n as f64)
            .sum();
        Some(weighted / tokens as f64)
    }

    /// The largest staleness with at least one trained token, `None` when there is none.
    pub fn max_staleness(&self) -> Option<u64> {
        self.staleness_tokens
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(behind, _)| *behind)
            .next_back()
    }

    /// Wall-clock seconds of the whole step: rollout wait plus training.
    pub fn step_secs(&self) -> f64 {
        self.rollout_wait_secs + self.train_secs
    }
}

/// How long one phase of the demo took (warm-start, RL, evaluation, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// The phase's name as shown to the person running the demo.
    pub name: String,
    /// Wall-clock seconds the phase took.
    pub secs: f64,
}

/// The outcome of a demo run: the numbers a person looks at first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DemoSummary {
    /// Held-out accuracy in `[0, 1]` after the supervised warm-start, before RL.
    pub warm_start_accuracy: f64,
    /// Held-out accuracy in `[0, 1]` at the end of RL.
    pub final_accuracy: f64,
    /// Wall-clock seconds of the whole demo.
    pub total_wall_secs: f64,
    /// The settings that shaped the run (model size, steps, batch, mode, …) as
    /// name → value, shown in the report so a result can be reproduced.
    pub config: BTreeMap<String, String>,
    /// The phases in the order they ran, with their durations.
    pub phases: Vec<PhaseTiming>,
}

impl DemoSummary {
    /// Accuracy gained by RL, in percentage points (positive when RL helped).
    pub fn gain_points(&self) -> f64 {
        (self.final_accuracy - self.warm_start_accuracy) * 100.0
    }
}

/// The content of `metrics.json`: the summary and every step, so tools can re-read a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsDocument {
    /// The run's summary.
    pub summary: DemoSummary,
    /// One record per RL step, in step order.
    pub steps: Vec<StepMetrics>,
}

/// The paths [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// The report folder.
    pub dir: PathBuf,
    /// `report.html`, the page to open.
    pub html: PathBuf,
    /// `metrics.json`, a [`MetricsDocument`].
    pub metrics_json: PathBuf,
    /// `metrics.csv`, one row per step.
    pub metrics_csv: PathBuf,
    /// The PNG plots; empty when the run recorded no RL step (nothing to plot).
    pub plots: Vec<PathBuf>,
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The report folder could not be created.
    #[error("cannot create the report folder {path}: {source}; choose another folder with --out")]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A report file could not be written.
    #[error(
        "cannot write {path}: {source}; check the folder is writable or choose another with --out"
    )]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A plot could not be drawn or saved.
    #[error("cannot draw the plot {path}: {message}")]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// What plotters reported.
        message: String,
    },
    /// The page's template failed to render (a broken build, not bad input).
    #[error("the report's HTML template failed: {0}; the binary is damaged, rebuild it")]
    Template(String),
    /// The embedded font could not be loaded (a broken build, not bad input).
    #[error("the report's embedded font could not be loaded; the binary is damaged, rebuild it")]
    Font,
    /// A step's metric is out of its range (NaN, infinite, negative time, fraction above 1).
    #[error("step {step}: {field} = {value} is invalid, expected {expected}")]
    InvalidStep {
        /// The step.
        step: u64,
        /// The metric's field name.
        field: &'static str,
        /// The value given.
        value: f64,
        /// What the value must be.
        expected: &'static str,
    },
    /// The steps are not in strictly increasing order.
    #[error("steps must be strictly increasing, but step {step} follows step {previous}")]
    StepOrder {
        /// The step before.
        previous: u64,
        /// The step that is not after it.
        step: u64,
    },
    /// A summary number is out of its range.
    #[error("summary: {field} = {value} is invalid, expected {expected}")]
    InvalidSummary {
        /// The field name.
        field: &'static str,
        /// The value given.
        value: f64,
        /// What the value must be.
        expected: &'static str,
    },
}

/// Name of the HTML page inside the report folder.
pub const REPORT_HTML: &str = "report.html";
/// Name of the JSON metrics file inside the report folder.
pub const METRICS_JSON: &str = "metrics.json";
/// Name of the CSV metrics file inside the report folder.
pub const METRICS_CSV: &str = "metrics.csv";

/// The plots, in the order the report shows them: (file name, caption).
const PLOTS: [(&str, &str); 5] = [
    (
        "reward_accuracy.png",
        "Reward and held-out accuracy per step, with the warm-start accuracy as reference",
    ),
    ("tokens_per_second.png", "Tokens per second"),
    ("staleness.png", "Staleness of trained tokens"),
    ("icepop_masked.png", "IcePop masked fraction"),
    (
        "step_time.png",
        "Step time split into rollout wait and training",
    ),
];

/// Writes the report folder for a run: creates `out_dir` (and parents), then writes
/// `metrics.json`, `metrics.csv`, the PNG plots and `report.html`, overwriting earlier ones.
///
/// `steps` may be empty (a run stopped before its first RL step): the report then has the
/// summary, an empty CSV (header only) and no plots, and the page says so.
pub fn write_report(
    out_dir: &Path,
    summary: &DemoSummary,
    steps: &[StepMetrics],
) -> Result<ReportFiles, ReportError> {
    // Check everything before touching the disk, so bad input leaves no half report behind.
    validate(summary, steps)?;
    std::fs::create_dir_all(out_dir).map_err(|source| ReportError::CreateDir {
        path: out_dir.to_path_buf(),
        source,
    })?;

    let metrics_json = out_dir.join(METRICS_JSON);
    let document = MetricsDocument {
        summary: summary.clone(),
        steps: steps.to_vec(),
    };
    // Serialising plain numbers, strings and maps with integer keys cannot fail.
    let json = serde_json::to_vec_pretty(&document).unwrap_or_default();
    write_file(&metrics_json, &json)?;

    let metrics_csv = out_dir.join(METRICS_CSV);
    write_file(&metrics_csv, csv(steps).as_bytes())?;

    let mut plots = Vec::new();
    if !steps.is_empty() {
        ensure_font()?;
        for (name, _) in PLOTS {
            let path = out_dir.join(name);
            match name {
                "reward_accuracy.png" => line_chart(
                    &path,
                    step_range(steps),
                    reward_accuracy_chart(summary, steps),
                )?,
                "tokens_per_second.png" => {
                    line_chart(&path, step_range(steps), tokens_per_second_chart(steps))?
                }
                "staleness.png" => line_chart(&path, step_range(steps), staleness_chart(steps))?,
                "icepop_masked.png" => line_chart(&path, step_range(steps), icepop_chart(steps))?,
                _ => plot_step_time(&path, steps)?,
            }
            plots.push(path);
        }
    }

    let html = out_dir.join(REPORT_HTML);
    write_file(&html, html_page(summary, steps)?.as_bytes())?;

    Ok(ReportFiles {
        dir: out_dir.to_path_buf(),
        html,
        metrics_json,
        metrics_csv,
        plots,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    std::fs::write(path, bytes).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Validation

/// The range a number must lie in.
#[derive(Clone, Copy)]
enum Expect {
    Finite,
    NonNegative,
    Fraction,
}

impl Expect {
    fn holds(self, value: f64) -> bool {
        value.is_finite()
            && match self {
                Expect::Finite => true,
                Expect::NonNegative => value >= 0.0,
                Expect::Fraction => (0.0..=1.0).contains(&value),
            }
    }

    fn describe(self) -> &'static str {
        match self {
            Expect::Finite => "a finite number",
            Expect::NonNegative => "a finite number >= 0",
            Expect::Fraction => "a fraction in [0, 1]",
        }
    }
}

fn validate(summary: &DemoSummary, steps: &[StepMetrics]) -> Result<(), ReportError> {
    let summary_fields = [
        (
            "warm_start_accuracy",
            summary.warm_start_accuracy,
            Expect::Fraction,
        ),
        ("final_accuracy", summary.final_accuracy, Expect::Fraction),
        (
            "total_wall_secs",
            summary.total_wall_secs,
            Expect::NonNegative,
        ),
    ];
    let phase_fields = summary
        .phases
        .iter()
        .map(|p| ("phases[].secs", p.secs, Expect::NonNegative));
    for (field, value, expected) in summary_fields.into_iter().chain(phase_fields) {
        if !expected.holds(value) {
            return Err(ReportError::InvalidSummary {
                field,
                value,
                expected: expected.describe(),
            });
        }
    }

    let mut previous: Option<u64> = None;
    for m in steps {
        if let Some(previous) = previous
            && m.step <= previous
        {
            return Err(ReportError::StepOrder {
                previous,
                step: m.step,
            });
        }
        previous = Some(m.step);
        let fields = [
            ("elapsed_secs", m.elapsed_secs, Expect::NonNegative),
            ("reward_mean", m.reward_mean, Expect::Finite),
            (
                "held_out_accuracy",
                m.held_out_accuracy.unwrap_or(0.0),
                Expect::Fraction,
            ),
            (
                "rollout_tokens_per_sec",
                m.rollout_tokens_per_sec,
                Expect::NonNegative,
            ),
            (
                "icepop_masked_fraction",
                m.icepop_masked_fraction,
                Expect::Fraction,
            ),
            ("mean_abs_log_k", m.mean_abs_log_k, Expect::NonNegative),
            ("grad_norm", m.grad_norm, Expect::NonNegative),
            ("entropy", m.entropy, Expect::NonNegative),
            ("loss", m.loss, Expect::Finite),
            (
                "rollout_wait_secs",
                m.rollout_wait_secs,
                Expect::NonNegative,
            ),
            ("train_secs", m.train_secs, Expect::NonNegative),
        ];
        for (field, value, expected) in fields {
            if !expected.holds(value) {
                return Err(ReportError::InvalidStep {
                    step: m.step,
                    field,
                    value,
                    expected: expected.describe(),
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CSV

/// The CSV columns, in order. The staleness histogram is written as `behind:tokens` pairs
/// separated by `;` so one step stays one row.
const CSV_HEADER: [&str; 20] = [
    "step",
    "policy_version",
    "elapsed_secs",
    "reward_mean",
    "held_out_accuracy",
    "tokens_trained",
    "tokens_generated",
    "rollout_tokens_per_sec",
    "staleness_mean",
    "staleness_max",
    "staleness_tokens",
    "icepop_masked_fraction",
    "mean_abs_log_k",
    "grad_norm",
    "entropy",
    "loss",
    "rollout_wait_secs",
    "train_secs",
    "parked_trajectories",
    "purged_trajectories",
];

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn csv(steps: &[StepMetrics]) -> String {
    let mut out = CSV_HEADER.join(",");
    out.push('\n');
    for m in steps {
        let histogram = m
            .staleness_tokens
            .iter()
            .map(|(behind, n)| format!("{behind}:{n}"))
            .collect::<Vec<_>>()
            .join(";");
        let row = [
            m.step.to_string(),
            m.policy_version.to_string(),
            m.elapsed_secs.to_string(),
            m.reward_mean.to_string(),
            opt(m.held_out_accuracy),
            m.tokens_trained.to_string(),
            m.tokens_generated.to_string(),
            m.rollout_tokens_per_sec.to_string(),
            opt(m.mean_staleness()),
            opt(m.max_staleness()),
            histogram,
            m.icepop_masked_fraction.to_string(),
            m.mean_abs_log_k.to_string(),
            m.grad_norm.to_string(),
            m.entropy.to_string(),
            m.loss.to_string(),
            m.rollout_wait_secs.to_string(),
            m.train_secs.to_string(),
            m.parked_trajectories.to_string(),
            m.purged_trajectories.to_string(),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Plots

/// The embedded font: DejaVu Sans (Bitstream Vera license, see `fonts/LICENSE-DejaVu`).
static FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
/// The family name plotters looks the font up by.
const FONT_FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 560);
const TITLE_SIZE: f64 = 26.0;
const LABEL_SIZE: f64 = 16.0;
const AXIS_DESC_SIZE: f64 = 18.0;

const C_BLUE: RGBColor = RGBColor(31, 119, 180);
const C_ORANGE: RGBColor = RGBColor(255, 127, 14);
const C_GREEN: RGBColor = RGBColor(44, 160, 44);
const C_RED: RGBColor = RGBColor(214, 39, 40);
const C_GREY: RGBColor = RGBColor(110, 110, 110);

/// Registers the embedded font with plotters once per process; plotters' `ab_glyph` text
/// backend draws only fonts registered this way.
fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok()
    });
    if ok { Ok(()) } else { Err(ReportError::Font) }
}

fn plot_error(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> ReportError + '_ {
    move |e| ReportError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// One line of a line chart.
struct Line {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    /// Dashed lines mark references, not measurements.
    dashed: bool,
    /// Markers on every point, for sparse series such as held-out accuracy.
    markers: bool,
}

impl Line {
    /// A solid line without markers: a measurement of every step.
    fn solid(label: &str, color: RGBColor, points: Vec<(f64, f64)>) -> Line {
        Line {
            label: label.into(),
            color,
            points,
            dashed: false,
            markers: false,
        }
    }
}

/// How a chart's y axis is bounded and labelled.
struct YAxis {
    desc: &'static str,
    /// Always include 0 (counts, rates, fractions).
    from_zero: bool,
    /// Always include 1 (fractions, accuracy).
    to_one: bool,
    /// Show values as percentages.
    percent: bool,
}

impl YAxis {
    /// An axis from 0 for `desc`: counts, rates, fractions.
    fn from_zero(desc: &'static str) -> YAxis {
        YAxis {
            desc,
            from_zero: true,
            to_one: false,
            percent: false,
        }
    }

    /// The same axis, always reaching 1.
    fn reaching_one(self) -> YAxis {
        YAxis {
            to_one: true,
            ..self
        }
    }

    /// The same axis, labelled in percent.
    fn percent(self) -> YAxis {
        YAxis {
            percent: true,
            ..self
        }
    }
}

/// The x range over the steps, padded so a single step still has a visible axis.
fn step_range(steps: &[StepMetrics]) -> (f64, f64) {
    let first = steps.first().map_or(0, |m| m.step) as f64;
    let last = steps.last().map_or(0, |m| m.step) as f64;
    if last > first {
        (first, last)
    } else {
        (first - 1.0, first + 1.0)
    }
}

/// The y range covering `values`, widened to 0 / 1 as asked and padded at the top; `headroom`
/// leaves the top quarter free for a legend drawn there, so it never hides data.
fn value_range(
    values: impl Iterator<Item = f64>,
    from_zero: bool,
    to_one: bool,
    headroom: bool,
) -> (f64, f64) {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        // No values at all: an empty but well-formed axis.
        (lo, hi) = (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if to_one {
        hi = hi.max(1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    let top = if headroom { (hi - lo) * 0.3 } else { pad };
    (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + top)
}

/// Draws the legend of `chart`'s series at `at`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    at: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FONT_FAMILY, LABEL_SIZE))
        .background_style(WHITE.mix(0.85))
        .border_style(C_GREY)
        .draw()
}

/// The points (step, value) of the steps that have a value.
fn series(steps: &[StepMetrics], value: impl Fn(&StepMetrics) -> Option<f64>) -> Vec<(f64, f64)> {
    steps
        .iter()
        .filter_map(|m| value(m).map(|v| (m.step as f64, v)))
        .collect()
}

/// What a line chart shows.
struct LineChart {
    title: &'static str,
    y: YAxis,
    /// Where the legend goes.
    legend: SeriesLabelPosition,
    lines: Vec<Line>,
}

/// Draws `chart` over the x range `(x0, x1)` into the PNG at `path`.
fn line_chart(path: &Path, (x0, x1): (f64, f64), chart: LineChart) -> Result<(), ReportError> {
    let LineChart {
        title,
        y,
        legend,
        lines,
    } = chart;
    let err = plot_error(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (y0, y1) = value_range(
        lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)),
        y.from_zero,
        y.to_one,
        matches!(
            legend,
            SeriesLabelPosition::UpperLeft
                | SeriesLabelPosition::UpperMiddle
                | SeriesLabelPosition::UpperRight
        ),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_FAMILY, TITLE_SIZE))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    let percent = y.percent;
    let y_fmt = move |v: &f64| {
        if percent {
            format!("{}%", axis_number(v * 100.0, (y1 - y0) * 100.0))
        } else {
            axis_number(*v, y1 - y0)
        }
    };
    chart
        .configure_mesh()
        .x_desc("RL step")
        .y_desc(y.desc)
        .axis_desc_style((FONT_FAMILY, AXIS_DESC_SIZE))
        .label_style((FONT_FAMILY, LABEL_SIZE))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&y_fmt)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;

    for line in lines {
        let color = line.color;
        let style = color.stroke_width(2);
        let anno = if line.dashed {
            chart.draw_series(DashedLineSeries::new(line.points.clone(), 10, 6, style))
        } else {
            chart.draw_series(LineSeries::new(line.points.clone(), style))
        }
        .map_err(|e| err(&e))?;
        anno.label(line.label.as_str()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
        });
        if line.markers {
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|p| Circle::new(*p, 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
    }
    draw_legend(&mut chart, legend).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One run's values of a metric, for [`plot_runs`].
pub struct RunSeries {
    /// The legend's label.
    pub label: String,
    /// Runs of the same arm of an experiment share a colour.
    pub arm: usize,
    /// (RL step, value) points.
    pub points: Vec<(f64, f64)>,
}

/// A line chart of one metric over several runs, written as a PNG at `path`: how the arms of
/// an experiment (`flywheel bench icepop`) compare, seed by seed.
pub fn plot_runs(
    path: &Path,
    title: &'static str,
    y_desc: &'static str,
    percent: bool,
    runs: Vec<RunSeries>,
) -> Result<(), ReportError> {
    ensure_font()?;
    let (x0, x1) = runs
        .iter()
        .flat_map(|r| r.points.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    let x = if x1 > x0 { (x0, x1) } else { (0.0, 1.0) };
    let colors = [C_BLUE, C_RED, C_GREEN, C_ORANGE];
    let lines = runs
        .into_iter()
        .map(|r| Line {
            label: r.label,
            color: colors[r.arm % colors.len()],
            // Sparse series (held-out accuracy) get a marker on every point.
            markers: r.points.len() < 30,
            points: r.points,
            dashed: false,
        })
        .collect();
    let y = YAxis::from_zero(y_desc);
    let chart = LineChart {
        title,
        y: if percent { y.percent() } else { y },
        legend: SeriesLabelPosition::UpperRight,
        lines,
    };
    line_chart(path, x, chart)
}

fn reward_accuracy_chart(summary: &DemoSummary, steps: &[StepMetrics]) -> LineChart {
    let (x0, x1) = step_range(steps);
    LineChart {
        title: "Reward and held-out accuracy",
        y: YAxis::from_zero("reward / accuracy").reaching_one(),
        legend: SeriesLabelPosition::LowerRight,
        lines: vec![
            Line::solid(
                "reward mean",
                C_BLUE,
                series(steps, |m| Some(m.reward_mean)),
            ),
            Line {
                label: "held-out accuracy".into(),
                color: C_RED,
                points: series(steps, |m| m.held_out_accuracy),
                dashed: false,
                markers: true,
            },
            Line {
                label: format!(
                    "warm-start accuracy ({})",
                    percent(summary.warm_start_accuracy)
                ),
                color: C_GREY,
                points: vec![
                    (x0, summary.warm_start_accuracy),
                    (x1, summary.warm_start_accuracy),
                ],
                dashed: true,
                markers: false,
            },
        ],
    }
}

fn tokens_per_second_chart(steps: &[StepMetrics]) -> LineChart {
    LineChart {
        title: "Tokens per second",
        y: YAxis::from_zero("tokens per second"),
        legend: SeriesLabelPosition::UpperRight,
        lines: vec![
            Line::solid(
                "rollout: generated tokens/s",
                C_BLUE,
                series(steps, |m| Some(m.rollout_tokens_per_sec)),
            ),
            Line::solid(
                "training: trained tokens/s of step time",
                C_ORANGE,
                series(steps, |m| {
                    (m.step_secs() > 0.0).then(|| m.tokens_trained as f64 / m.step_secs())
                }),
            ),
        ],
    }
}

fn staleness_chart(steps: &[StepMetrics]) -> LineChart {
    LineChart {
        title: "Staleness of trained tokens",
        y: YAxis::from_zero("policy versions behind").reaching_one(),
        legend: SeriesLabelPosition::UpperRight,
        lines: vec![
            Line::solid(
                "mean (token-weighted)",
                C_BLUE,
                series(steps, |m| m.mean_staleness()),
            ),
            Line::solid(
                "max",
                C_RED,
                series(steps, |m| m.max_staleness().map(|s| s as f64)),
            ),
        ],
    }
}

fn icepop_chart(steps: &[StepMetrics]) -> LineChart {
    LineChart {
        title: "IcePop masked fraction",
        y: YAxis::from_zero("masked tokens").percent(),
        legend: SeriesLabelPosition::UpperRight,
        lines: vec![Line::solid(
            "masked fraction of trained tokens",
            C_GREEN,
            series(steps, |m| Some(m.icepop_masked_fraction)),
        )],
    }
}

/// Stacked bars: rollout wait at the bottom, training on top, one bar per step.
fn plot_step_time(path: &Path, steps: &[StepMetrics]) -> Result<(), ReportError> {
    let err = plot_error(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    // Bars are 80% of the smallest gap between steps, so they never overlap.
    let gap = steps
        .windows(2)
        .map(|w| (w[1].step - w[0].step) as f64)
        .fold(f64::INFINITY, f64::min);
    let half = if gap.is_finite() { gap * 0.4 } else { 0.4 };
    let (x0, x1) = step_range(steps);
    let (_, y1) = value_range(steps.iter().map(StepMetrics::step_secs), true, false, true);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Step time: rollout wait and training",
            (FONT_FAMILY, TITLE_SIZE),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((x0 - half)..(x1 + half), 0.0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("RL step")
        .y_desc("seconds")
        .axis_desc_style((FONT_FAMILY, AXIS_DESC_SIZE))
        .label_style((FONT_FAMILY, LABEL_SIZE))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| axis_number(*v, y1))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    // Each stack part: its label, colour, and (bottom, top) of its bar for a step.
    type Span = fn(&StepMetrics) -> (f64, f64);
    let parts: [(&str, RGBColor, Span); 2] = [
        ("rollout wait", C_BLUE, |m| (0.0, m.rollout_wait_secs)),
        ("training", C_ORANGE, |m| {
            (m.rollout_wait_secs, m.step_secs())
        }),
    ];
    for (label, color, span) in parts {
        chart
            .draw_series(steps.iter().map(|m| {
                let x = m.step as f64;
                let (bottom, top) = span(m);
                Rectangle::new([(x - half, bottom), (x + half, top)], color.filled())
            }))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTML

/// An accuracy in `[0, 1]` as a percentage with one decimal, e.g. `0.312` → `31.2%`.
pub fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

/// Seconds as a short human duration: `42.0s`, `8m 12s`, `1h 02m`.
pub fn duration(secs: f64) -> String {
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m")
    } else {
        format!("{m}m {s:02}s")
    }
}

/// An axis label with as many decimals as the axis span needs to tell ticks apart.
fn axis_number(v: f64, span: f64) -> String {
    let decimals = if span >= 20.0 {
        0
    } else if span >= 2.0 {
        1
    } else if span >= 0.2 {
        2
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// The page's template (minijinja, HTML auto-escaping); the values are formatted here.
const TEMPLATE: &str = include_str!("report.html");

/// The per-step table's columns, one cell each in [`step_row`].
const COLUMNS: [&str; 19] = [
    "step",
    "version",
    "time",
    "reward",
    "held-out acc.",
    "tokens trained",
    "tokens generated",
    "rollout tok/s",
    "staleness mean",
    "staleness max",
    "IcePop masked",
    "mean |log k|",
    "grad norm",
    "entropy",
    "loss",
    "rollout wait",
    "training",
    "parked",
    "purged",
];

/// One row of the per-step table.
fn step_row(m: &StepMetrics) -> [String; COLUMNS.len()] {
    [
        m.step.to_string(),
        m.policy_version.to_string(),
        duration(m.elapsed_secs),
        format!("{:.3}", m.reward_mean),
        m.held_out_accuracy.map(percent).unwrap_or_default(),
        m.tokens_trained.to_string(),
        m.tokens_generated.to_string(),
        format!("{:.0}", m.rollout_tokens_per_sec),
        m.mean_staleness()
            .map(|s| format!("{s:.2}"))
            .unwrap_or_default(),
        opt(m.max_staleness()),
        percent(m.icepop_masked_fraction),
        format!("{:.4}", m.mean_abs_log_k),
        format!("{:.3}", m.grad_norm),
        format!("{:.3}", m.entropy),
        format!("{:.4}", m.loss),
        format!("{:.2}s", m.rollout_wait_secs),
        format!("{:.2}s", m.train_secs),
        m.parked_trajectories.to_string(),
        m.purged_trajectories.to_string(),
    ]
}

fn html_page(summary: &DemoSummary, steps: &[StepMetrics]) -> Result<String, ReportError> {
    let gain = summary.gain_points();
    let plots: Vec<_> = PLOTS
        .iter()
        .map(|(file, caption)| minijinja::context! { file, caption })
        .collect();
    let phases: Vec<_> = summary
        .phases
        .iter()
        .map(|p| minijinja::context! { name => p.name, time => duration(p.secs) })
        .collect();
    let rows: Vec<_> = steps.iter().map(step_row).collect();
    let context = minijinja::context! {
        wall_time => duration(summary.total_wall_secs),
        warm_start_accuracy => percent(summary.warm_start_accuracy),
        final_accuracy => percent(summary.final_accuracy),
        gain => format!("{gain:+.1}"),
        gain_up => gain >= 0.0,
        plots,
        config => summary.config,
        phases,
        metrics_csv => METRICS_CSV,
        metrics_json => METRICS_JSON,
        columns => COLUMNS,
        steps => rows,
    };
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE)
        .and_then(|()| env.get_template("report.html"))
        .and_then(|t| t.render(context))
        .map_err(|e| ReportError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plausible run: reward and accuracy rise, staleness spreads, evaluation every 5 steps.
    fn synthetic(steps: u64) -> (DemoSummary, Vec<StepMetrics>) {
        let metrics: Vec<StepMetrics> = (1..=steps)
            .map(|s| {
                let t = s as f64 / steps as f64;
                let mut staleness = BTreeMap::new();
                staleness.insert(0, 800 - s * 3);
                staleness.insert(1, 150 + s * 2);
                if s % 3 == 0 {
                    staleness.insert(2 + s % 4, 40);
                }
                StepMetrics {
                    step: s,
                    policy_version: s,
                    elapsed_secs: 30.0 + s as f64 * 4.5,
                    reward_mean: 0.25 + 0.5 * t + 0.03 * ((s as f64).sin()),
                    held_out_accuracy: (s % 5 == 0).then_some(0.3 + 0.45 * t),
                    tokens_trained: 1000 + s * 10,
                    tokens_generated: 1200 + s * 7,
                    rollout_tokens_per_sec: 250.0 + 20.0 * (s as f64 * 0.7).cos(),
                    staleness_tokens: staleness,
                    icepop_masked_fraction: 0.02 + 0.01 * (s as f64 * 0.5).sin().abs(),
                    mean_abs_log_k: 0.05,
                    grad_norm: 1.5 - t,
                    entropy: 0.9 - 0.4 * t,
                    loss: -0.01 * s as f64,
                    rollout_wait_secs: 1.0 + (s % 4) as f64 * 0.5,
                    train_secs: 3.0,
                    parked_trajectories: s % 7,
                    purged_trajectories: u64::from(s % 11 == 0),
                }
            })
            .collect();
        let summary = DemoSummary {
            warm_start_accuracy: 0.312,
            final_accuracy: 0.745,
            total_wall_secs: 512.4,
            config: BTreeMap::from([
                ("mode".to_string(), "partial (C3PO++) + IcePop".to_string()),
                ("rl_steps".to_string(), steps.to_string()),
                ("model".to_string(), "d=64 <2 layers> & co".to_string()),
            ]),
            phases: vec![
                PhaseTiming {
                    name: "warm-start".into(),
                    secs: 30.0,
                },
                PhaseTiming {
                    name: "RL".into(),
                    secs: 470.0,
                },
                PhaseTiming {
                    name: "evaluation".into(),
                    secs: 12.4,
                },
            ],
        };
        (summary, metrics)
    }

    fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            path.display()
        );
        // A blank 1000×560 white PNG compresses to well under 10 kB; axes, text and lines
        // make it larger.
        assert!(
            bytes.len() > 10_000,
            "{} is only {} bytes: nothing was drawn",
            path.display(),
            bytes.len()
        );
    }

    #[test]
    fn writes_every_file_with_valid_contents() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("runs").join("demo-test");
        let (summary, steps) = synthetic(40);
        let files = write_report(&out, &summary, &steps).unwrap();

        assert_eq!(files.dir, out);
        assert_eq!(files.plots.len(), PLOTS.len());
        for (plot, (name, _)) in files.plots.iter().zip(PLOTS) {
            assert_eq!(plot, &out.join(name));
            assert_png(plot);
        }

        let csv = std::fs::read_to_string(&files.metrics_csv).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER.join(","));
        assert_eq!(lines.len(), 1 + steps.len(), "header plus one row per step");
        for (line, m) in lines[1..].iter().zip(&steps) {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), CSV_HEADER.len());
            assert_eq!(cells[0], m.step.to_string());
            assert_eq!(cells[4], opt(m.held_out_accuracy));
        }
        assert!(lines[3].contains(",0:791;1:156;5:40,"), "{}", lines[3]);

        let json = std::fs::read(&files.metrics_json).unwrap();
        let doc: MetricsDocument = serde_json::from_slice(&json).unwrap();
        assert_eq!(doc.summary, summary);
        // serde_json's float parsing may differ in the last bit, so floats are compared
        // closely and everything else exactly.
        assert_eq!(doc.steps.len(), steps.len());
        for (read, written) in doc.steps.iter().zip(&steps) {
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            assert!(close(read.reward_mean, written.reward_mean));
            assert!(close(
                read.rollout_tokens_per_sec,
                written.rollout_tokens_per_sec
            ));
            assert!(close(
                read.icepop_masked_fraction,
                written.icepop_masked_fraction
            ));
            let exact = StepMetrics {
                reward_mean: written.reward_mean,
                rollout_tokens_per_sec: written.rollout_tokens_per_sec,
                icepop_masked_fraction: written.icepop_masked_fraction,
                ..read.clone()
            };
            assert_eq!(&exact, written);
        }

        let html = std::fs::read_to_string(&files.html).unwrap();
        assert!(html.contains("31.2%"), "warm-start accuracy missing");
        assert!(html.contains("74.5%"), "final accuracy missing");
        assert!(html.contains("+43.3 points"));
        for (name, _) in PLOTS {
            assert!(html.contains(&format!("<img src=\"{name}\"")), "{name}");
        }
        // Config text is escaped, not injected.
        assert!(html.contains("d=64 &lt;2 layers&gt; &amp; co"));
        assert_eq!(
            html.matches("<tr><td>").count(),
            steps.len(),
            "one table row per step"
        );
    }

    #[test]
    fn single_step_run_still_plots() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, mut steps) = synthetic(5);
        steps.truncate(1);
        steps[0].staleness_tokens.clear();
        steps[0].held_out_accuracy = None;
        let files = write_report(dir.path(), &summary, &steps).unwrap();
        for plot in &files.plots {
            assert_png(plot);
        }
    }

    #[test]
    fn empty_metrics_give_a_valid_report_without_plots() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, _) = synthetic(1);
        let files = write_report(dir.path(), &summary, &[]).unwrap();
        assert!(files.plots.is_empty());
        for (name, _) in PLOTS {
            assert!(!dir.path().join(name).exists());
        }
        let csv = std::fs::read_to_string(&files.metrics_csv).unwrap();
        assert_eq!(csv, format!("{}\n", CSV_HEADER.join(",")));
        let doc: MetricsDocument =
            serde_json::from_slice(&std::fs::read(&files.metrics_json).unwrap()).unwrap();
        assert!(doc.steps.is_empty());
        let html = std::fs::read_to_string(&files.html).unwrap();
        assert!(html.contains("31.2%") && html.contains("74.5%"));
        assert!(html.contains("No RL step was recorded"));
        assert!(!html.contains("<img"));
    }

    #[test]
    fn unwritable_folder_is_a_clear_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the folder should be: no permissions trick needed (tests may
        // run as root, which ignores them).
        let blocker = dir.path().join("not-a-folder");
        std::fs::write(&blocker, b"x").unwrap();
        let out = blocker.join("report");
        let (summary, steps) = synthetic(3);
        let err = write_report(&out, &summary, &steps).unwrap_err();
        assert!(matches!(err, ReportError::CreateDir { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&out.display().to_string()), "{message}");
        assert!(message.contains("--out"), "{message}");
    }

    #[test]
    fn bad_numbers_are_rejected_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r");
        let (summary, steps) = synthetic(6);

        let mut bad = steps.clone();
        bad[2].reward_mean = f64::NAN;
        let err = write_report(&out, &summary, &bad).unwrap_err();
        assert!(
            matches!(
                err,
                ReportError::InvalidStep {
                    step: 3,
                    field: "reward_mean",
                    ..
                }
            ),
            "{err:?}"
        );

        let mut bad = steps.clone();
        bad[4].held_out_accuracy = Some(1.5);
        assert!(matches!(
            write_report(&out, &summary, &bad),
            Err(ReportError::InvalidStep {
                field: "held_out_accuracy",
                ..
            })
        ));

        let mut bad = steps.clone();
        bad[1].train_secs = -1.0;
        assert!(matches!(
            write_report(&out, &summary, &bad),
            Err(ReportError::InvalidStep {
                field: "train_secs",
                ..
            })
        ));

        let mut bad = steps.clone();
        bad.swap(1, 2);
        assert!(matches!(
            write_report(&out, &summary, &bad),
            Err(ReportError::StepOrder {
                previous: 3,
                step: 2
            })
        ));

        let mut bad_summary = summary.clone();
        bad_summary.final_accuracy = f64::INFINITY;
        assert!(matches!(
            write_report(&out, &bad_summary, &steps),
            Err(ReportError::InvalidSummary {
                field: "final_accuracy",
                ..
            })
        ));
        assert!(!out.exists(), "nothing is written for rejected input");
    }

    #[test]
    fn staleness_statistics() {
        let m = StepMetrics {
            staleness_tokens: BTreeMap::from([(0, 300), (2, 100), (7, 0)]),
            ..StepMetrics::default()
        };
        assert_eq!(m.mean_staleness(), Some(0.5));
        assert_eq!(
            m.max_staleness(),
            Some(2),
            "a bucket with no tokens is not the max"
        );
        assert_eq!(StepMetrics::default().mean_staleness(), None);
        assert_eq!(StepMetrics::default().max_staleness(), None);
    }

    #[test]
    fn human_formats() {
        assert_eq!(percent(0.312), "31.2%");
        assert_eq!(axis_number(250.0, 300.0), "250");
        assert_eq!(axis_number(2.5, 3.0), "2.5");
        assert_eq!(axis_number(0.25, 1.05), "0.25");
        assert_eq!(axis_number(0.015, 0.03), "0.015");
        assert_eq!(duration(42.04), "42.0s");
        assert_eq!(duration(492.0), "8m 12s");
        assert_eq!(duration(3720.0), "1h 02m");
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let (mut summary, steps) = synthetic(3);
        summary.config.insert("<script>".into(), "a & \"b\"".into());
        let page = html_page(&summary, &steps).unwrap();
        assert!(page.contains("&lt;script&gt;"), "{page}");
        assert!(!page.contains("<script>"));
        assert!(page.contains("reward_accuracy.png"));
        assert_eq!(page.matches("<tr><td>").count(), 3, "one row per step");
    }
}
