//! Prometheus metrics of the operator, prefixed `conveyor_operator_`. Labels are static strings
//! (controller, error kind, direction) so their number stays bounded whatever the cluster holds.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `jobqueue` or `worker`.
    pub controller: &'static str,
}

/// Labels of the reconcile error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `jobqueue` or `worker`.
    pub controller: &'static str,
    /// Static error kind, e.g. `nats_unavailable`, `kube`.
    pub error: &'static str,
}

/// Labels of the scaling counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    /// `up` or `down`.
    pub direction: &'static str,
}

/// Every metric of the operator and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabels, Histogram>,
    scalings: Family<ScaleLabels, Counter>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("conveyor_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error kind",
            errors.clone(),
        );
        let durations = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            durations.clone(),
        );
        let scalings = Family::<ScaleLabels, Counter>::default();
        registry.register(
            "scalings",
            "Worker pool size changes made by the scaler",
            scalings.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            durations,
            scalings,
            leader,
        }
    }
}

impl Metrics {
    /// Counts one reconciliation of `controller` that took `elapsed`.
    pub fn reconciled(&self, controller: &'static str, elapsed: Duration) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one failed reconciliation.
    pub fn failed(&self, controller: &'static str, error: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { controller, error })
            .inc();
    }

    /// Counts one change of a worker pool's size.
    pub fn scaled(&self, up: bool) {
        let direction = if up { "up" } else { "down" };
        self.scalings
            .get_or_create(&ScaleLabels { direction })
            .inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics_with_static_labels() {
        let metrics = Metrics::default();
        metrics.reconciled("jobqueue", Duration::from_millis(3));
        metrics.failed("jobqueue", "nats_unavailable");
        metrics.set_leader(true);
        let text = metrics.render();
        assert!(
            text.contains(r#"conveyor_operator_reconciles_total{controller="jobqueue"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"conveyor_operator_reconcile_errors_total{controller="jobqueue",error="nats_unavailable"} 1"#),
            "{text}"
        );
        assert!(text.contains("conveyor_operator_leader 1"), "{text}");
    }
}
