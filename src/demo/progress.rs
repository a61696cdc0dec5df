//! Live progress for `flywheel demo`: a phase line and a step bar on a terminal, one log
//! line per event otherwise.
//!
//! ```text
//! ⠹ RL  3m 02s
//! [██████████░░░░░░░░░░░░░░░░░░░░]  42/120 reward 0.512 | acc 48.0% | 1830 tok/s | parked 3 | 03:02 < 05:40
//! ```
//!
//! When stderr is not a terminal (CI, `| tee`, a log file) bars would be noise or invisible,
//! so [`DemoProgress`] writes plain lines instead, one per phase and per step.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::{DemoSummary, StepMetrics, duration, percent};

/// The phase line: spinner, phase name, time in the phase.
const PHASE_TEMPLATE: &str = "{spinner:.green} {prefix:.bold} {msg} {elapsed}";
/// The step bar: progress, step counter, the step's numbers, elapsed and remaining time.
const STEP_TEMPLATE: &str =
    "[{bar:30.cyan/blue}] {pos:>4}/{len} {msg} | {elapsed_precise} < {eta_precise}";

/// How progress reaches the person running the demo.
enum Output {
    /// Live bars on a terminal.
    Bars {
        /// Owns the drawing of both bars, so log lines printed through it do not tear them.
        multi: MultiProgress,
        /// The current phase (warm-start, RL, evaluation).
        phase: ProgressBar,
        /// RL steps done out of the total.
        steps: ProgressBar,
    },
    /// One plain line per event, for logs.
    Lines(Mutex<Box<dyn Write + Send>>),
}

/// Progress display for a demo run. Every method takes `&self`, so it can be shared (in an
/// `Arc`) by the tasks that report phases and steps.
pub struct DemoProgress {
    output: Output,
    total_steps: u64,
    /// The last held-out accuracy seen, shown on every step until the next evaluation.
    last_accuracy: Mutex<Option<f64>>,
}

impl DemoProgress {
    /// Progress for a run of `total_steps` RL steps: bars on stderr when it is a terminal,
    /// otherwise one line per phase and step on stderr.
    pub fn new(total_steps: u64) -> Self {
        if std::io::stderr().is_terminal() {
            Self::with_bars(total_steps, ProgressDrawTarget::stderr())
        } else {
            Self::lines(total_steps, std::io::stderr())
        }
    }

    /// Progress written as plain lines to `out`, whatever it is.
    pub fn lines(total_steps: u64, out: impl Write + Send + 'static) -> Self {
        Self {
            output: Output::Lines(Mutex::new(Box::new(out))),
            total_steps,
            last_accuracy: Mutex::new(None),
        }
    }

    fn with_bars(total_steps: u64, target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        // The templates are constants checked by a test; the fallback only keeps a broken
        // template from taking the demo down.
        let phase_style = ProgressStyle::with_template(PHASE_TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let step_style = ProgressStyle::with_template(STEP_TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("█▉▊▋▌▍▎▏░");
        let phase = multi.add(ProgressBar::new_spinner().with_style(phase_style));
        phase.enable_steady_tick(Duration::from_millis(120));
        let steps = multi.add(ProgressBar::new(total_steps).with_style(step_style));
        Self {
            output: Output::Bars {
                multi,
                phase,
                steps,
            },
            total_steps,
            last_accuracy: Mutex::new(None),
        }
    }

    /// Whether progress is drawn as live bars (stderr is a terminal).
    pub fn is_live(&self) -> bool {
        matches!(self.output, Output::Bars { .. })
    }

    /// Enters a phase (e.g. `"warm-start"`, `"RL"`, `"evaluation"`).
    pub fn phase(&self, name: &str) {
        match &self.output {
            Output::Bars { phase, .. } => {
                phase.set_prefix(name.to_string());
                phase.reset_elapsed();
            }
            Output::Lines(_) => self.line(&format!("phase: {name}")),
        }
    }

    /// Shows a line of text above the bars (or as a log line) without disturbing them.
    pub fn message(&self, text: &str) {
        self.line(text);
    }

    /// Records a finished RL step: advances the bar and shows its numbers.
    pub fn step(&self, m: &StepMetrics) {
        let accuracy = {
            let mut last = self
                .last_accuracy
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if m.held_out_accuracy.is_some() {
                *last = m.held_out_accuracy;
            }
            *last
        };
        let numbers = step_numbers(m, accuracy);
        match &self.output {
            Output::Bars { steps, .. } => {
                steps.set_position(m.step.min(self.total_steps));
                steps.set_message(numbers);
            }
            Output::Lines(_) => {
                self.line(&format!("step {}/{}: {numbers}", m.step, self.total_steps))
            }
        }
    }

    /// Ends the display and writes the outcome: both accuracies and the wall time.
    pub fn finish(&self, summary: &DemoSummary) {
        if let Output::Bars { phase, steps, .. } = &self.output {
            phase.finish_and_clear();
            steps.finish();
        }
        self.line(&summary_line(summary));
    }

    fn line(&self, text: &str) {
        match &self.output {
            // Printing through the MultiProgress keeps the bars below the text; a failed
            // write to the terminal is not worth stopping the demo for.
            Output::Bars { multi, .. } => {
                let _ = multi.println(text);
            }
            Output::Lines(out) => {
                let mut out = out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }
}

/// The numbers shown for a step: reward, latest held-out accuracy, throughput, parked.
fn step_numbers(m: &StepMetrics, accuracy: Option<f64>) -> String {
    let accuracy = accuracy.map_or_else(|| "-".to_string(), percent);
    format!(
        "reward {:.3} | acc {accuracy} | {:.0} tok/s | parked {}",
        m.reward_mean, m.rollout_tokens_per_sec, m.parked_trajectories
    )
}

/// The closing line: the two accuracies a person runs the demo to see.
fn summary_line(s: &DemoSummary) -> String {
    format!(
        "held-out accuracy: warm-start {} -> after RL {} ({:+.1} points) in {}",
        percent(s.warm_start_accuracy),
        percent(s.final_accuracy),
        s.gain_points(),
        duration(s.total_wall_secs)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn step(step: u64, accuracy: Option<f64>) -> StepMetrics {
        StepMetrics {
            step,
            reward_mean: 0.25 * step as f64,
            held_out_accuracy: accuracy,
            rollout_tokens_per_sec: 1234.4,
            parked_trajectories: step + 1,
            ..StepMetrics::default()
        }
    }

    fn summary() -> DemoSummary {
        DemoSummary {
            warm_start_accuracy: 0.25,
            final_accuracy: 0.5,
            total_wall_secs: 125.0,
            ..DemoSummary::default()
        }
    }

    #[test]
    fn lines_mode_logs_one_line_per_event() {
        let out = Shared::default();
        let progress = DemoProgress::lines(3, out.clone());
        assert!(!progress.is_live());
        progress.phase("warm-start");
        progress.phase("RL");
        progress.step(&step(1, None));
        progress.step(&step(2, Some(0.4)));
        progress.step(&step(3, None));
        progress.finish(&summary());

        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "phase: warm-start",
                "phase: RL",
                "step 1/3: reward 0.250 | acc - | 1234 tok/s | parked 2",
                "step 2/3: reward 0.500 | acc 40.0% | 1234 tok/s | parked 3",
                // The last evaluation is carried until the next one.
                "step 3/3: reward 0.750 | acc 40.0% | 1234 tok/s | parked 4",
                "held-out accuracy: warm-start 25.0% -> after RL 50.0% (+25.0 points) in 2m 05s",
            ]
        );
    }

    #[test]
    fn bars_track_steps_and_templates_parse() {
        assert!(ProgressStyle::with_template(PHASE_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(STEP_TEMPLATE).is_ok());

        let progress = DemoProgress::with_bars(10, ProgressDrawTarget::hidden());
        assert!(progress.is_live());
        progress.phase("RL");
        progress.step(&step(4, Some(0.6)));
        let Output::Bars { phase, steps, .. } = &progress.output else {
            unreachable!("built with bars")
        };
        assert_eq!(phase.prefix(), "RL");
        assert_eq!(steps.position(), 4);
        assert_eq!(steps.length(), Some(10));
        assert!(steps.message().contains("acc 60.0%"), "{}", steps.message());
        // A step past the announced total does not overflow the bar.
        progress.step(&step(12, None));
        assert_eq!(steps.position(), 10);
        progress.finish(&summary());
        assert!(steps.is_finished());
    }
}
