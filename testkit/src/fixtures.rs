//! JobQueue and Worker objects for tests, built in sentences:
//!
//! ```
//! use conveyor_crds::{JobQueue, Worker};
//! use conveyor_testkit::fixtures::Test as _;
//!
//! let queue = JobQueue::test("thumbs").max_attempts(1).alert_when_pending_over(10);
//! let worker = Worker::test("thumbs").jsonl(&["/bin/handler"]).scaled(0..=10).recycle_after("30m");
//! let both = format!("{}---\n{}", queue.yaml(), worker.yaml());
//! assert!(both.contains("maxReplicas: 10"));
//! assert_eq!(worker.build().spec.recycle.unwrap().max_age.as_deref(), Some("30m"));
//! ```
//!
//! A fixture holds only the fields a test set, like the YAML a user writes: the API server (or
//! [`Fixture::build`], through the types' serde defaults) fills in the rest. Nothing is
//! checked on the way, so a test can build an invalid object on purpose and see it refused.

use std::marker::PhantomData;
use std::ops::RangeInclusive;

use conveyor_crds::{JobQueue, Worker};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// `JobQueue::test(name)`, `Worker::test(name)`: the start of a fixture.
pub trait Test: Sized {
    /// A fixture named `name`, with the fewest fields its kind needs.
    fn test(name: &str) -> Fixture<Self>;
}

impl Test for JobQueue {
    fn test(name: &str) -> JobQueueFixture {
        Fixture::new("JobQueue", name, json!({}))
    }
}

impl Test for Worker {
    fn test(name: &str) -> WorkerFixture {
        Fixture::new(
            "Worker",
            name,
            json!({
                "queue": name,
                "handler": {"mode": "exec", "command": ["/bin/cat"]},
                "template": {"spec": {"containers": [{"name": "handler", "image": "busybox"}]}},
            }),
        )
    }
}

/// An object of kind `K` (one of Conveyor's), held as the JSON a user would write; see
/// [`Test::test`]. The setters of each kind are on [`JobQueueFixture`] and [`WorkerFixture`].
#[derive(Debug, Clone)]
pub struct Fixture<K> {
    object: Value,
    kind: PhantomData<K>,
}

/// A JobQueue fixture; see [`Test::test`].
pub type JobQueueFixture = Fixture<JobQueue>;

/// A Worker fixture; see [`Test::test`]. By default it runs the jobs of the queue of its own
/// name with `/bin/cat` (exec mode) in a `busybox` container, one pod, no scaling.
pub type WorkerFixture = Fixture<Worker>;

impl<K: DeserializeOwned> Fixture<K> {
    fn new(kind: &str, name: &str, spec: Value) -> Self {
        Fixture {
            object: json!({
                "apiVersion": "conveyor.dev/v1alpha1",
                "kind": kind,
                "metadata": {"name": name},
                "spec": spec,
            }),
            kind: PhantomData,
        }
    }

    /// Sets the field at `path` under `spec` (field names, or the index of an item of a list
    /// that has it), making the maps on the way.
    fn set(&mut self, path: &[&str], value: Value) {
        let mut at = &mut self.object["spec"];
        for name in path {
            let index = match (&*at, name.parse::<usize>()) {
                (Value::Array(items), Ok(i)) if i < items.len() => Some(i),
                _ => None,
            };
            at = match index {
                Some(i) => &mut at[i],
                None => {
                    if !at.is_object() {
                        *at = Value::Object(Map::new());
                    }
                    &mut at[*name]
                }
            };
        }
        *at = value;
    }

    /// In namespace `namespace` (else the one `kubectl -n` names).
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.object["metadata"]["namespace"] = json!(namespace);
        self
    }

    /// Any other field of the spec, at `path` (field names as in YAML).
    pub fn with(mut self, path: &[&str], value: Value) -> Self {
        self.set(path, value);
        self
    }

    /// The object as YAML, for `kubectl apply -f -`.
    pub fn yaml(&self) -> String {
        serde_yaml::to_string(&self.object).expect("a JSON value prints as YAML")
    }

    /// The object as JSON.
    pub fn json(&self) -> Value {
        self.object.clone()
    }

    /// The typed object, its unset fields at their defaults; panics if the fixture does not
    /// deserialize.
    pub fn build(&self) -> K {
        match serde_json::from_value(self.object.clone()) {
            Ok(object) => object,
            Err(e) => panic!("the fixture {} is not a valid object: {e}", self.object),
        }
    }
}

impl JobQueueFixture {
    /// `deletionPolicy`: `Delete` or `Retain` (any string, to test refusals).
    pub fn deletion_policy(mut self, policy: &str) -> Self {
        self.set(&["deletionPolicy"], json!(policy));
        self
    }

    /// `nats.url`: the queue's own NATS server.
    pub fn nats_url(mut self, url: &str) -> Self {
        self.set(&["nats", "url"], json!(url));
        self
    }

    /// `retry.maxAttempts`.
    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.set(&["retry", "maxAttempts"], json!(attempts));
        self
    }

    /// `timeout` of one attempt (`1s`, `5m`).
    pub fn timeout(mut self, timeout: &str) -> Self {
        self.set(&["timeout"], json!(timeout));
        self
    }

    /// `rateLimit`, jobs per second.
    pub fn rate_limit(mut self, per_second: i32) -> Self {
        self.set(&["rateLimit"], json!(per_second));
        self
    }

    /// `priorities`: levels of the queue.
    pub fn priorities(mut self, levels: u8) -> Self {
        self.set(&["priorities"], json!(levels));
        self
    }

    /// `results.retention`: how long outcomes and results are kept (`1h`).
    pub fn result_retention(mut self, retention: &str) -> Self {
        self.set(&["results", "retention"], json!(retention));
        self
    }

    /// `alerts.maxPending`: `Backlogged` above this many pending jobs.
    pub fn alert_when_pending_over(mut self, jobs: i64) -> Self {
        self.set(&["alerts", "maxPending"], json!(jobs));
        self
    }

    /// `alerts.maxFailures` within `alerts.failureWindow`: `JobsFailing` above it.
    pub fn alert_on_failures(mut self, failures: i64, window: &str) -> Self {
        self.set(&["alerts", "maxFailures"], json!(failures));
        self.set(&["alerts", "failureWindow"], json!(window));
        self
    }
}

impl WorkerFixture {
    /// Runs the jobs of the JobQueue `queue`.
    pub fn queue(mut self, queue: &str) -> Self {
        self.set(&["queue"], json!(queue));
        self
    }

    /// `concurrency`: jobs one pod runs at once.
    pub fn concurrency(mut self, jobs: i32) -> Self {
        self.set(&["concurrency"], json!(jobs));
        self
    }

    /// `replicas`: the pool's size without scaling.
    pub fn replicas(mut self, pods: i32) -> Self {
        self.set(&["replicas"], json!(pods));
        self
    }

    /// One process per job: `command`.
    pub fn exec(self, command: &[&str]) -> Self {
        self.handler("exec", command)
    }

    /// One long-lived JSON-lines process: `command`.
    pub fn jsonl(self, command: &[&str]) -> Self {
        self.handler("jsonl", command)
    }

    /// `handler` in mode `mode` (any string, to test refusals) with `command`.
    pub fn handler(mut self, mode: &str, command: &[&str]) -> Self {
        self.set(&["handler"], json!({"mode": mode, "command": command}));
        self
    }

    /// `handler` in mode `http`: each job is POSTed to `url`.
    pub fn http(mut self, url: &str) -> Self {
        self.set(&["handler"], json!({"mode": "http", "url": url}));
        self
    }

    /// The handler container's own command (a server the `http` handler talks to, say).
    pub fn container_command(mut self, command: &[&str]) -> Self {
        self.set(
            &["template", "spec", "containers", "0", "command"],
            json!(command),
        );
        self
    }

    /// The handler container's memory limit (`64Mi`).
    pub fn memory_limit(mut self, limit: &str) -> Self {
        self.set(
            &[
                "template",
                "spec",
                "containers",
                "0",
                "resources",
                "limits",
                "memory",
            ],
            json!(limit),
        );
        self
    }

    /// The pod's `terminationGracePeriodSeconds`: how long a stopping pod may drain.
    pub fn grace_period(mut self, seconds: i64) -> Self {
        self.set(
            &["template", "spec", "terminationGracePeriodSeconds"],
            json!(seconds),
        );
        self
    }

    /// A liveness probe on the runtime's `/healthz` at `port`, every second, failing after
    /// `failures` missed answers of 1 s each.
    pub fn liveness_on(mut self, port: u16, failures: i32) -> Self {
        self.set(
            &["template", "spec", "containers", "0", "livenessProbe"],
            json!({
                "httpGet": {"path": "/healthz", "port": port},
                "periodSeconds": 1,
                "timeoutSeconds": 1,
                "failureThreshold": failures,
            }),
        );
        self
    }

    /// The handler container's name.
    pub fn container_name(mut self, name: &str) -> Self {
        self.set(
            &["template", "spec", "containers", "0", "name"],
            json!(name),
        );
        self
    }

    /// The handler container's image.
    pub fn image(mut self, image: &str) -> Self {
        self.set(
            &["template", "spec", "containers", "0", "image"],
            json!(image),
        );
        self
    }

    /// Autoscaled from `min` to `max` pods (both included, `minReplicas..=maxReplicas`).
    pub fn scaled(mut self, pods: RangeInclusive<i32>) -> Self {
        self.set(&["scaling", "minReplicas"], json!(pods.start()));
        self.set(&["scaling", "maxReplicas"], json!(pods.end()));
        self
    }

    /// `scaling.targetBacklogPerReplica`: jobs one pod is expected to handle.
    pub fn backlog_per_pod(mut self, jobs: i32) -> Self {
        self.set(&["scaling", "targetBacklogPerReplica"], json!(jobs));
        self
    }

    /// `scaling.scaleDownDelay`: how long the backlog stays low before the pool shrinks.
    pub fn scale_down_after(mut self, delay: &str) -> Self {
        self.set(&["scaling", "scaleDownDelay"], json!(delay));
        self
    }

    /// `recycle.maxAge`: pods older than this are replaced (`30m`, `12h`).
    pub fn recycle_after(mut self, age: &str) -> Self {
        self.set(&["recycle", "maxAge"], json!(age));
        self
    }

    /// `recycle.maxUnavailable`: how many pods may be recycled at once.
    pub fn recycle_at_most(mut self, pods: i32) -> Self {
        self.set(&["recycle", "maxUnavailable"], json!(pods));
        self
    }

    /// `recycle.maxJobs`: the runtime starts over after this many jobs.
    pub fn recycle_after_jobs(mut self, jobs: i64) -> Self {
        self.set(&["recycle", "maxJobs"], json!(jobs));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_reads_as_its_spec() {
        let worker = Worker::test("w")
            .queue("q")
            .scaled(0..=10)
            .recycle_after("30m")
            .build();
        assert_eq!(worker.metadata.name.as_deref(), Some("w"));
        assert_eq!(worker.spec.queue, "q");
        let scaling = worker.spec.scaling.expect("scaling");
        assert_eq!((scaling.min_replicas, scaling.max_replicas), (0, 10));
        assert_eq!(
            worker.spec.recycle.expect("recycle").max_age.as_deref(),
            Some("30m")
        );
        assert_eq!(
            worker.spec.template.spec.expect("pod").containers[0]
                .image
                .as_deref(),
            Some("busybox")
        );
    }

    #[test]
    fn only_the_fields_set_are_written() {
        let yaml = JobQueue::test("thumbs")
            .max_attempts(1)
            .timeout("1s")
            .yaml();
        assert_eq!(
            yaml,
            "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata:\n  name: thumbs\nspec:\n  retry:\n    maxAttempts: 1\n  timeout: 1s\n"
        );
        assert_eq!(JobQueue::test("q").build().spec.retry.max_attempts, 5);
    }

    #[test]
    fn the_image_goes_into_the_first_container() {
        let worker = Worker::test("w").image("hello:1").json();
        assert_eq!(
            worker["spec"]["template"]["spec"]["containers"],
            json!([{"name": "handler", "image": "hello:1"}])
        );
    }

    #[test]
    fn the_pod_setters_land_in_the_pod_template() {
        let worker = Worker::test("w")
            .http("http://127.0.0.1:1/jobs")
            .container_command(&["python3", "server.py"])
            .memory_limit("64Mi")
            .grace_period(7)
            .liveness_on(9090, 2)
            .recycle_at_most(1)
            .build();
        assert_eq!(
            worker.spec.handler.url.as_deref(),
            Some("http://127.0.0.1:1/jobs")
        );
        assert_eq!(worker.spec.recycle.expect("recycle").max_unavailable, 1);
        let pod = worker.spec.template.spec.expect("pod");
        assert_eq!(pod.termination_grace_period_seconds, Some(7));
        let container = &pod.containers[0];
        assert_eq!(
            container.command.as_deref(),
            Some(&["python3".to_string(), "server.py".to_string()][..])
        );
        let limits = container.resources.as_ref().and_then(|r| r.limits.as_ref());
        assert_eq!(limits.map(|l| l["memory"].0.as_str()), Some("64Mi"));
        let probe = container.liveness_probe.as_ref().expect("a probe");
        assert_eq!(probe.failure_threshold, Some(2));
    }
}
