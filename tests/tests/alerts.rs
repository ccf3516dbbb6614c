//! The chart's monitoring: rendered with Helm's own engine (`scripts/render-chart.py`), nothing
//! of it exists by default; switched on, it gives the metrics Service, a ServiceMonitor that
//! keeps the series' own `namespace`, a PodMonitor of the worker pods, the Grafana dashboard
//! ConfigMap with the sidecar's label, and a PrometheusRule whose rules `promtool check rules`
//! accepts and whose alerts fire as `charts/conveyor/tests/alerts.test.yaml` expects
//! (`promtool test rules`, synthetic series). Bad monitoring values are refused by the schema.

use std::path::Path;
use std::process::Command;

use conveyor_tests::repo;

/// Everything of `metrics:` switched on.
const ALL_ON: &str = r#"{"metrics": {"service": {"enabled": true}, "serviceMonitor": {"enabled": true},
  "podMonitor": {"enabled": true}, "prometheusRule": {"enabled": true},
  "grafanaDashboard": {"enabled": true}}}"#;

/// Runs `program` with `args` in `dir`; its stdout, or a panic with its stderr.
fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (make deps installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart's manifests for release `conveyor` with `values` (JSON).
fn render(values: &str) -> Vec<serde_yaml::Value> {
    let script = repo("scripts/render-chart.py");
    let text = run(
        &repo(""),
        "python3",
        &[script.to_str().unwrap(), "--set-json", values],
    );
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

fn kind_named<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn monitoring_is_off_by_default_and_complete_when_switched_on() {
    let default = render("{}");
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert!(kind_named(&default, kind).is_empty(), "{kind} by default");
    }
    assert!(
        kind_named(&default, "ConfigMap")
            .iter()
            .all(|c| c["metadata"]["name"] != "conveyor-dashboard"),
        "the dashboard by default"
    );
    assert!(
        kind_named(&default, "Service")
            .iter()
            .all(|s| s["metadata"]["name"] != "conveyor-metrics"),
        "the metrics Service by default"
    );

    let on = render(ALL_ON);
    let service = kind_named(&on, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "conveyor-metrics")
        .expect("the metrics Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/component"],
        "operator"
    );
    let monitor = kind_named(&on, "ServiceMonitor");
    assert_eq!(monitor.len(), 1);
    assert_eq!(monitor[0]["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(monitor[0]["spec"]["endpoints"][0]["port"], "http");
    let pods = kind_named(&on, "PodMonitor");
    assert_eq!(pods.len(), 1);
    assert_eq!(
        pods[0]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "conveyor-worker"
    );
    assert_eq!(
        pods[0]["spec"]["podMetricsEndpoints"][0]["port"],
        "conveyor"
    );
    let dashboards: Vec<_> = kind_named(&on, "ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["name"] == "conveyor-dashboard")
        .collect();
    assert_eq!(dashboards.len(), 1);
    assert_eq!(
        dashboards[0]["metadata"]["labels"]["grafana_dashboard"],
        "1"
    );
    let json: serde_json::Value =
        serde_json::from_str(dashboards[0]["data"]["conveyor.json"].as_str().unwrap())
            .expect("the dashboard is JSON");
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("charts/conveyor/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json, file, "the ConfigMap carries the dashboard file");
    assert_eq!(kind_named(&on, "PrometheusRule").len(), 1);
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let script = repo("scripts/render-chart.py");
    let rules = run(
        &repo(""),
        "python3",
        &[script.to_str().unwrap(), "--set-json", ALL_ON, "--rules"],
    );
    std::fs::write(dir.path().join("rules.yaml"), &rules).unwrap();
    let checked = run(dir.path(), "promtool", &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    std::fs::copy(
        repo("charts/conveyor/tests/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .unwrap();
    let tested = run(
        dir.path(),
        "promtool",
        &["test", "rules", "alerts.test.yaml"],
    );
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_schema_refuses_bad_monitoring_values() {
    let script = repo("scripts/render-chart.py");
    for bad in [
        r#"{"metrics": {"prometheusRule": {"failureRatio": 2}}}"#,
        r#"{"metrics": {"prometheusRule": {"backlogFor": "soon"}}}"#,
        r#"{"metrics": {"serviceMonitor": {"enabled": "yes"}}}"#,
        r#"{"metrics": {"grafanaDashboard": {"label": {"x": "1"}}}}"#,
    ] {
        let out = Command::new("python3")
            .args([script.to_str().unwrap(), "--set-json", bad])
            .current_dir(repo(""))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("metrics"), "{bad}: {stderr}");
    }
}
