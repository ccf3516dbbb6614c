//! `conveyor bench` end to end on a small run: the raw baseline is the fastest shape of a sweep
//! that includes Conveyor's own shape, and `--json` records every shape tried. Figures are not
//! checked (tests check behaviour, never speed), only that they are there and consistent.
#![cfg(feature = "dev")]

use std::process::Stdio;
use std::time::Duration;

use conveyor_testkit::NatsServer;
use tokio::process::Command;

#[tokio::test]
async fn the_raw_baseline_is_the_fastest_shape_of_its_sweep() {
    let nats = NatsServer::start().await.expect("nats-server");
    let run = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args([
            "bench",
            "--nats-url",
            &nats.url(),
            "--jobs",
            "300",
            "--rounds",
            "1",
            "--latency-seconds",
            "1",
            "--rate",
            "100",
            "--concurrency",
            "32",
            "--json",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the bench finishes")
        .expect("conveyor runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let sweep = report["raw_sweep"]
        .as_array()
        .expect("the sweep is recorded");
    let shape = |v: &serde_json::Value| {
        (
            v["window"].as_u64().unwrap(),
            v["consumers"].as_u64().unwrap(),
            v["batch"].as_u64().unwrap(),
        )
    };
    let shapes: Vec<_> = sweep.iter().map(|s| shape(&s["shape"])).collect();
    assert!(
        shapes.contains(&(256, 1, 32)),
        "Conveyor's own shape is among those tried: {shapes:?}"
    );
    let mut unique = shapes.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), shapes.len(), "each shape tried once");
    let rates: Vec<f64> = sweep
        .iter()
        .map(|s| s["throughput"]["jobs_per_second"].as_f64().unwrap())
        .collect();
    assert!(
        rates.windows(2).all(|w| w[0] >= w[1]) && rates.iter().all(|r| *r > 0.0),
        "fastest first: {rates:?}"
    );
    assert_eq!(
        shape(&report["raw_shape"]),
        shapes[0],
        "the baseline is the fastest"
    );
    for figure in ["raw_throughput", "conveyor_throughput", "throughput_ratio"] {
        let value = report[figure].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value > 0.0, "{figure}: {value}");
    }
}
