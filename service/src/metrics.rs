//! Registering a service's Prometheus metrics (named `flywheel_<component>_<what>_<unit>`).
//!
//! Each service keeps its metrics in a [`Registry`] of its own (tests start several services
//! in one process) and registers them through these helpers. A name that is invalid or
//! registered twice is a bug in the service, so the helpers panic with the name.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

fn register<T: Collector + Clone + 'static>(registry: &Registry, name: &str, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn valid<T>(name: &str, made: prometheus::Result<T>) -> T {
    made.unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// A monotonic integer counter.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, name, valid(name, IntCounter::new(name, help)))
}

/// Integer counters by `labels`.
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let made = IntCounterVec::new(Opts::new(name, help), labels);
    register(registry, name, valid(name, made))
}

/// An integer gauge.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, name, valid(name, IntGauge::new(name, help)))
}

/// Integer gauges by `labels`.
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let made = IntGaugeVec::new(Opts::new(name, help), labels);
    register(registry, name, valid(name, made))
}

/// A floating-point gauge.
pub fn float_gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(registry, name, valid(name, Gauge::new(name, help)))
}

/// A histogram with these bucket upper bounds.
pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let made = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets));
    register(registry, name, valid(name, made))
}

/// Histograms by `labels`, with these bucket upper bounds.
pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let made = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels);
    register(registry, name, valid(name, made))
}

/// `count` buckets from `start`, each `factor` times the previous.
pub fn exponential_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    valid(
        "buckets",
        prometheus::exponential_buckets(start, factor, count),
    )
}

/// The text exposition of every metric in `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding well-formed metrics into a Vec cannot fail for the text format.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_metrics_render() {
        let r = Registry::new();
        counter(&r, "flywheel_test_things_total", "Things.").inc_by(3);
        gauge_vec(&r, "flywheel_test_items", "Items.", &["kind"])
            .with_label_values(&["a"])
            .set(2);
        histogram(
            &r,
            "flywheel_test_seconds",
            "Time.",
            exponential_buckets(0.1, 2.0, 3),
        )
        .observe(0.15);
        let text = render(&r);
        for line in [
            "flywheel_test_things_total 3",
            "flywheel_test_items{kind=\"a\"} 2",
            "flywheel_test_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    #[should_panic(expected = "flywheel_test_twice_total")]
    fn a_name_registered_twice_is_a_bug() {
        let r = Registry::new();
        counter(&r, "flywheel_test_twice_total", "Once.");
        counter(&r, "flywheel_test_twice_total", "Twice.");
    }
}
