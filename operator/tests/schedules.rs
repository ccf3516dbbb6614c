//! JobSchedules and `JobQueue.spec.deduplicationWindow` against the Kubernetes test double and
//! a real `nats-server` (2.14+), driven with the real `kubectl`. The runs are read straight
//! from the queue's work stream, with the job ids workers would see.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor::names::QueueRef;
use conveyor::protocol::JobEnvelope;
use conveyor::{Client, Job};
use conveyor_crds::JobSchedule;
use conveyor_devcluster::{DevCluster, Options};
use conveyor_operator::Config;
use conveyor_testkit::{NatsServer, wait_for};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;
use tokio_util::sync::CancellationToken;

const KUBECTL: &str = "/usr/bin/kubectl";
const DEADLINE: Duration = Duration::from_secs(30);
const NS: &str = "team";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// What `kubectl` answered.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn kubectl(cluster: &DevCluster, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A cluster with the CRDs and the namespace `team`, a NATS server, and the operator.
struct Env {
    cluster: DevCluster,
    nats: NatsServer,
    stop: CancellationToken,
    operator: Option<tokio::task::JoinHandle<Result<(), conveyor_operator::Error>>>,
}

impl Env {
    async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let cluster = DevCluster::start(Options::api_only()).await.unwrap();
        for crd in ["crds/jobqueues.yaml", "crds/jobschedules.yaml"] {
            let path = repo(crd);
            let out = kubectl(&cluster, &["apply", "-f", path.to_str().unwrap()], None).await;
            assert!(out.ok, "{}", out.stderr);
        }
        assert!(
            kubectl(&cluster, &["create", "namespace", NS], None)
                .await
                .ok
        );
        let nats = NatsServer::start().await.unwrap();
        let mut env = Self {
            cluster,
            nats,
            stop: CancellationToken::new(),
            operator: None,
        };
        env.start_operator();
        env
    }

    fn start_operator(&mut self) {
        let mut config = Config::with_nats_url(self.nats.url());
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.resync = Duration::from_secs(1);
        config.worker_image = "ghcr.io/conveyor-dev/conveyor-worker:test".into();
        self.stop = CancellationToken::new();
        let stop = self.stop.clone();
        self.operator = Some(tokio::spawn(conveyor_operator::run_with_client(
            config,
            self.cluster.client(),
            async move { stop.cancelled().await },
        )));
    }

    async fn stop_operator(&mut self) {
        self.stop.cancel();
        if let Some(operator) = self.operator.take() {
            let result = tokio::time::timeout(DEADLINE, operator)
                .await
                .expect("operator stops");
            result.unwrap().expect("operator exits cleanly");
        }
    }

    async fn apply(&self, yaml: &str) -> Output {
        kubectl(&self.cluster, &["apply", "-n", NS, "-f", "-"], Some(yaml)).await
    }

    async fn apply_ok(&self, yaml: &str) {
        let out = self.apply(yaml).await;
        assert!(out.ok, "kubectl apply failed: {}", out.stderr);
    }

    fn schedules(&self) -> Api<JobSchedule> {
        Api::namespaced(self.cluster.client(), NS)
    }

    /// The schedule's `Ready` condition, if it has one.
    async fn ready(&self, name: &str) -> Option<(String, String, String)> {
        self.schedules()
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.status)
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.status, c.reason, c.message))
    }

    /// Waits until the schedule's `Ready` condition has `status` and `reason`; its message.
    async fn wait_ready(&self, name: &str, status: &str, reason: &str) -> String {
        let what = format!("JobSchedule {name} Ready={status} {reason}");
        wait_for(DEADLINE, &what, || async {
            self.ready(name)
                .await
                .is_some_and(|(s, r, _)| s == status && r == reason)
        })
        .await
        .unwrap();
        self.ready(name)
            .await
            .map(|(_, _, m)| m)
            .unwrap_or_default()
    }

    async fn client(&self) -> Client {
        Client::connect(&self.nats.url()).await.unwrap()
    }

    /// The ids of the jobs in the work stream of `queue`, in order.
    async fn job_ids(&self, queue: &str) -> Vec<String> {
        let nats = self.nats.client().await.unwrap();
        let queue = QueueRef::new(NS, queue);
        let stream = queue.stream();
        let mut ids = Vec::new();
        let mut from = 1;
        while let Ok(Some(job)) =
            conveyor::stored::next(&nats, &stream, &queue.jobs_wildcard(), from).await
        {
            let headers = job.block().header_map();
            let envelope = JobEnvelope::decode(Some(&headers), &stream, job.sequence).unwrap();
            ids.push(envelope.id);
            from = job.sequence + 1;
        }
        ids
    }

    /// Waits until the work stream of `queue` holds at least `n` jobs; their ids.
    async fn wait_jobs(&self, queue: &str, n: usize) -> Vec<String> {
        let what = format!("{n} jobs in queue {queue}");
        wait_for(DEADLINE, &what, || async {
            self.job_ids(queue).await.len() >= n
        })
        .await
        .unwrap();
        self.job_ids(queue).await
    }

    /// The (reason, note) of the Events on the object named `name`.
    async fn events_of(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<Event> = Api::namespaced(self.cluster.client(), NS);
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Waits until the object `name` has an Event with `reason`; its note.
    async fn wait_event(&self, name: &str, reason: &str) -> String {
        let what = format!("an Event {reason} on {name}");
        wait_for(DEADLINE, &what, || async {
            self.events_of(name).await.iter().any(|(r, _)| r == reason)
        })
        .await
        .unwrap();
        let events = self.events_of(name).await;
        let found = events.into_iter().find(|(r, _)| r == reason);
        found.map(|(_, note)| note).unwrap_or_default()
    }

    /// The slot of the newest tick the server wrote for the held schedule `name` of `queue`.
    async fn held_slot(&self, queue: &str, name: &str) -> Option<Timestamp> {
        let js = async_nats::jetstream::new(self.nats.client().await.ok()?);
        let queue = QueueRef::new(NS, queue);
        conveyor::schedule::last_tick(&js, &queue, 0, name, true)
            .await
            .ok()
            .flatten()
            .map(|tick| tick.run.slot)
    }

    /// Applies the queue `queue` (with `queue_spec`) and the schedule `name` on it running
    /// `schedule` (with `extra` spec lines), and waits until it is `Ready=True Scheduled`.
    async fn scheduled(
        &self,
        queue: &str,
        queue_spec: &str,
        name: &str,
        schedule: &str,
        extra: &str,
    ) {
        self.apply_ok(&queue_yaml(queue, queue_spec)).await;
        self.apply_ok(&schedule_yaml(name, queue, schedule, extra))
            .await;
        self.wait_ready(name, "True", "Scheduled").await;
    }

    /// Sets `spec.suspend` of the schedule `name` with `kubectl patch`.
    async fn set_suspend(&self, name: &str, suspend: bool) {
        let patch = format!(r#"{{"spec":{{"suspend":{suspend}}}}}"#);
        let args = [
            "patch",
            "jobschedule",
            name,
            "-n",
            NS,
            "--type=merge",
            "-p",
            &patch,
        ];
        let out = kubectl(&self.cluster, &args, None).await;
        assert!(out.ok, "{}", out.stderr);
    }

    /// Waits until the server holds a slot of the held schedule `name` of `queue` at least
    /// `secs` seconds after `since`.
    async fn wait_held_after(&self, queue: &str, name: &str, since: Timestamp, secs: i64) {
        let what = format!("the server to hold a slot of {name} {secs}s after {since}");
        wait_for(DEADLINE, &what, || async {
            self.held_slot(queue, name)
                .await
                .is_some_and(|slot| slot.as_second() >= since.as_second().saturating_add(secs))
        })
        .await
        .unwrap();
    }

    async fn shutdown(mut self) {
        self.stop_operator().await;
        self.cluster.shutdown().await;
    }
}

fn queue_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobQueue\nmetadata: {{name: {name}}}\nspec: {{{extra}}}\n"
    )
}

fn schedule_yaml(name: &str, queue: &str, schedule: &str, extra: &str) -> String {
    format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobSchedule\nmetadata: {{name: {name}}}\nspec:\n  schedule: '{schedule}'\n  job: {{queue: {queue}, payload: hello}}\n{extra}"
    )
}

/// The slot time of a run id `<name>@<time>`.
fn slot(id: &str) -> k8s_openapi::jiff::Timestamp {
    id.rsplit_once('@')
        .and_then(|(_, t)| t.parse().ok())
        .unwrap_or_else(|| panic!("{id} names no slot"))
}

/// Asserts the ids are distinct runs of `name`, one per second, without a gap.
fn assert_consecutive_seconds(name: &str, ids: &[String]) {
    let distinct: BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a slot ran twice: {ids:?}");
    for pair in ids.windows(2) {
        assert!(pair[0].starts_with(&format!("{name}@")), "{ids:?}");
        let gap = slot(&pair[1]).as_second() - slot(&pair[0]).as_second();
        assert_eq!(gap, 1, "runs one second apart: {ids:?}");
    }
}

#[tokio::test]
async fn every_second_runs_once_per_slot_and_suspend_pauses_without_a_burst() {
    let env = Env::new().await;
    env.apply_ok(&queue_yaml("ticks", "")).await;
    env.apply_ok(&schedule_yaml("tick", "ticks", "@every 1s", ""))
        .await;
    // A second schedule keeps running throughout: its runs show that slots go by (and that the
    // server keeps scheduling) while `tick` is suspended.
    env.apply_ok(&queue_yaml("tocks", "")).await;
    env.apply_ok(&schedule_yaml("tock", "tocks", "@every 1s", ""))
        .await;
    let message = env.wait_ready("tick", "True", "Scheduled").await;
    assert!(
        message.contains("conveyor.team.ticks.schedule."),
        "{message}"
    );

    let ids = env.wait_jobs("ticks", 3).await;
    assert_consecutive_seconds("tick", &ids);
    let api = env.schedules();
    wait_for(DEADLINE, "status.lastRun and nextRun", || async {
        let status = api.get("tick").await.unwrap().status.unwrap_or_default();
        status.last_run.is_some() && status.next_run.is_some()
    })
    .await
    .unwrap();
    let table = kubectl(&env.cluster, &["get", "jobschedules", "-n", NS], None).await;
    for column in ["SCHEDULE", "SUSPEND", "LAST", "NEXT", "@every 1s"] {
        assert!(table.stdout.contains(column), "{}", table.stdout);
    }

    // Suspend: the server holds no schedule, so nothing more is submitted.
    env.set_suspend("tick", true).await;
    env.wait_ready("tick", "True", "Suspended").await;
    let nats = env.nats.client().await.unwrap();
    let queue = QueueRef::new(NS, "ticks");
    let subject = conveyor::schedule::schedule_subject(&queue, "tick");
    let held = conveyor::stored::last(&nats, &queue.delayed_stream(), &subject)
        .await
        .unwrap();
    assert!(
        held.is_none(),
        "a suspended schedule is removed from the server"
    );
    let suspended = env.job_ids("ticks").await;
    // Three runs of the other schedule: at least two slots of `tick` go by while suspended (a
    // run due before the removal may still land).
    let control = env.job_ids("tocks").await.len();
    env.wait_jobs("tocks", control + 3).await;
    let after = env.job_ids("ticks").await;
    assert!(
        after.len() <= suspended.len() + 1,
        "{suspended:?} then {after:?}"
    );

    // Resume: runs start again from now, without catching up on the skipped slots.
    let resumed_at = k8s_openapi::jiff::Timestamp::now();
    env.set_suspend("tick", false).await;
    env.wait_ready("tick", "True", "Scheduled").await;
    let resumed = env.wait_jobs("ticks", after.len() + 3).await;
    let new_runs = &resumed[after.len()..];
    assert_consecutive_seconds("tick", new_runs);
    assert!(
        slot(&new_runs[0]).as_second() >= resumed_at.as_second(),
        "no run for a slot skipped while suspended: {new_runs:?} (resumed at {resumed_at})"
    );
    env.shutdown().await;
}

#[tokio::test]
async fn the_server_keeps_running_a_schedule_while_the_operator_is_down_and_after_a_nats_restart() {
    let mut env = Env::new().await;
    env.scheduled("ticks", "", "tick", "@every 1s", "").await;
    env.wait_jobs("ticks", 1).await;

    env.stop_operator().await;
    let before = env.job_ids("ticks").await.len();
    // Five more runs with no operator running.
    let ids = env.wait_jobs("ticks", before + 5).await;
    assert_consecutive_seconds("tick", &ids);

    // The operator comes back: it leaves the schedule alone (republishing would restart the
    // interval) and no slot runs twice.
    env.start_operator();
    env.wait_ready("tick", "True", "Scheduled").await;
    let ids = env.wait_jobs("ticks", ids.len() + 2).await;
    assert_consecutive_seconds("tick", &ids);

    // NATS restarts: the schedule is stored in the file-backed delayed stream and resumes.
    env.nats.restart().await.unwrap();
    let restarted = env.job_ids("ticks").await.len();
    let ids = env.wait_jobs("ticks", restarted + 2).await;
    let distinct: BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a slot ran twice: {ids:?}");
    env.shutdown().await;
}

#[tokio::test]
async fn bad_schedules_are_refused_or_reported() {
    let env = Env::new().await;
    // The API server refuses what CEL can judge.
    let out = env
        .apply(&schedule_yaml("bad", "q", "every minute", ""))
        .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("schedule must be five cron fields"),
        "{}",
        out.stderr
    );
    let out = env
        .apply(&schedule_yaml(
            "bad",
            "q",
            "@every 1s",
            "  timeZone: Europe/Berlin\n",
        ))
        .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("timeZone applies to cron"),
        "{}",
        out.stderr
    );
    // Header names are case-insensitive: a reserved prefix is refused in any case.
    let headers = "apiVersion: conveyor.dev/v1alpha1\nkind: JobSchedule\nmetadata: {name: bad}\nspec:\n  schedule: '@hourly'\n  job: {queue: q, headers: {nats-msg-id: forged}}\n";
    let out = env.apply(headers).await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("job.headers names must not start with Nats- or Conveyor- (in any case)"),
        "{}",
        out.stderr
    );

    // The rest gets Ready=False with the parser's or the operator's message.
    env.apply_ok(&schedule_yaml("orphan", "nosuch", "@hourly", ""))
        .await;
    let message = env.wait_ready("orphan", "False", "QueueNotFound").await;
    assert!(message.contains("nosuch"), "{message}");

    env.apply_ok(&queue_yaml("small", "stream: {maxJobSize: 200}"))
        .await;
    env.apply_ok(&schedule_yaml(
        "zone",
        "small",
        "0 9 * * *",
        "  timeZone: Mars/Olympus\n",
    ))
    .await;
    let message = env.wait_ready("zone", "False", "InvalidTimeZone").await;
    assert!(message.contains("Mars/Olympus"), "{message}");

    env.apply_ok(&schedule_yaml("minute", "small", "61 * * * *", ""))
        .await;
    let message = env.wait_ready("minute", "False", "InvalidSchedule").await;
    assert!(message.contains("61 * * * *"), "{message}");
    let note = env.wait_event("minute", "InvalidSchedule").await;
    assert!(note.contains("61 * * * *"), "the Event says why: {note}");

    // An interval over a year, and a starting deadline out of range, are refused by CEL.
    let out = env
        .apply(&schedule_yaml("rare", "small", "@every 8761h", ""))
        .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("at most 8760h"), "{}", out.stderr);
    let out = env
        .apply(&schedule_yaml(
            "early",
            "small",
            "@hourly",
            "  startingDeadline: 0s\n",
        ))
        .await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("startingDeadline must be a duration from 1s"),
        "{}",
        out.stderr
    );

    let big = format!(
        "apiVersion: conveyor.dev/v1alpha1\nkind: JobSchedule\nmetadata: {{name: big}}\nspec:\n  schedule: '@hourly'\n  job: {{queue: small, payload: '{}'}}\n",
        "x".repeat(300)
    );
    env.apply_ok(&big).await;
    let message = env.wait_ready("big", "False", "JobTooLarge").await;
    assert!(message.contains("maxJobSize of 200"), "{message}");

    // The queue's stream exists, but none of the refused schedules reached it.
    let nats = env.nats.client().await.unwrap();
    let queue = QueueRef::new(NS, "small");
    for name in ["zone", "minute", "big"] {
        let subject = conveyor::schedule::schedule_subject(&queue, name);
        let held = conveyor::stored::last(&nats, &queue.delayed_stream(), &subject).await;
        assert!(matches!(held, Ok(None)), "{name}: {held:?}");
    }
    env.shutdown().await;
}

#[tokio::test]
async fn deduplication_window_refuses_a_duplicate_within_it_and_forgets_after() {
    let env = Env::new().await;
    env.apply_ok(&queue_yaml("daily", "deduplicationWindow: 1d"))
        .await;
    env.apply_ok(&queue_yaml("brief", "deduplicationWindow: 2s"))
        .await;
    let js = async_nats::jetstream::new(env.nats.client().await.unwrap());
    let window = |name: &'static str| {
        let js = js.clone();
        async move {
            let stream = QueueRef::new(NS, name).stream();
            match js.get_stream(stream).await {
                Ok(mut s) => s.info().await.ok().map(|i| i.config.duplicate_window),
                Err(_) => None,
            }
        }
    };
    wait_for(
        DEADLINE,
        "the daily queue's stream with a 1-day window",
        || async { window("daily").await == Some(Duration::from_secs(86_400)) },
    )
    .await
    .unwrap();
    wait_for(
        DEADLINE,
        "the brief queue's stream with a 2s window",
        || async { window("brief").await == Some(Duration::from_secs(2)) },
    )
    .await
    .unwrap();

    let client = env.client().await;
    let daily = QueueRef::new(NS, "daily");
    let first = client
        .submit(&daily, Job::new("report-1", "a"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = client
        .submit(&daily, Job::new("report-1", "a"))
        .await
        .unwrap();
    assert!(
        again.duplicate,
        "a second submission within the day is a duplicate"
    );
    assert_eq!(again.sequence, first.sequence);

    // The short window: the same id is a new job once the window has passed.
    let brief = QueueRef::new(NS, "brief");
    let first = client.submit(&brief, Job::new("ping", "a")).await.unwrap();
    assert!(
        client
            .submit(&brief, Job::new("ping", "a"))
            .await
            .unwrap()
            .duplicate
    );
    wait_for(
        DEADLINE,
        "the id to be accepted again after the window",
        || async {
            let ack = client.submit(&brief, Job::new("ping", "a")).await.unwrap();
            !ack.duplicate && ack.sequence > first.sequence
        },
    )
    .await
    .unwrap();

    // A window longer than the queue keeps jobs is refused with the reason.
    env.apply_ok(&queue_yaml(
        "odd",
        "deduplicationWindow: 2d, stream: {maxAge: 1d}",
    ))
    .await;
    let queues: Api<conveyor_crds::JobQueue> = Api::namespaced(env.cluster.client(), NS);
    wait_for(DEADLINE, "JobQueue odd Ready=False InvalidSpec", || async {
        queues
            .get_opt("odd")
            .await
            .ok()
            .flatten()
            .and_then(|q| q.status)
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| {
                c.reason == "InvalidSpec" && c.message.contains("longer than stream.maxAge")
            })
    })
    .await
    .unwrap();
    env.shutdown().await;
}

/// The schedule's status, once it has one.
async fn schedule_status(env: &Env, name: &str) -> conveyor_crds::JobScheduleStatus {
    env.schedules()
        .get(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

#[tokio::test]
async fn forbid_skips_runs_while_the_previous_one_is_queued_and_replace_cancels_it() {
    let mut env = Env::new().await;
    let forbid = "  concurrencyPolicy: Forbid\n";
    env.scheduled("single", "", "lonely", "@every 1s", forbid)
        .await;
    // No worker takes the first run, so it stays queued and every later slot is skipped.
    wait_for(DEADLINE, "three skipped runs", || async {
        schedule_status(&env, "lonely").await.missed_runs >= 3
    })
    .await
    .unwrap();
    let ids = env.job_ids("single").await;
    assert_eq!(ids.len(), 1, "no run overlaps the queued one: {ids:?}");
    let status = schedule_status(&env, "lonely").await;
    let last = status.last_run.expect("the first run is recorded");
    assert_eq!(last.job_id, ids[0]);
    assert!(last.sequence.is_some());
    assert_eq!(last.outcome.as_deref(), Some("Pending"), "nobody took it");

    // The run finishes (a worker takes and acknowledges it): the next slot runs.
    let js = async_nats::jetstream::new(env.nats.client().await.unwrap());
    let queue = QueueRef::new(NS, "single");
    let consumer = level_consumer(&js, &queue)
        .await
        .expect("the queue's consumer");
    let job = conveyor_testkit::take(&consumer, 1, Duration::from_secs(30))
        .await
        .expect("the queued run")
        .remove(0);

    // The run is now running (taken, not acknowledged) when the operator is down for five
    // slots: back, it submits nothing over it, and counts the slots.
    let missed_before = schedule_status(&env, "lonely").await.missed_runs;
    env.stop_operator().await;
    // Five slots with no operator.
    env.wait_held_after("single", "lonely", Timestamp::now(), 5)
        .await;
    env.start_operator();
    let restarted = Timestamp::now();
    wait_for(DEADLINE, "a slot after the restart handled", || async {
        schedule_status(&env, "lonely")
            .await
            .last_handled
            .as_deref()
            .is_some_and(|id| slot(id).as_second() > restarted.as_second())
    })
    .await
    .unwrap();
    assert_eq!(
        env.job_ids("single").await,
        ids,
        "no run overlaps the running one"
    );
    let status = schedule_status(&env, "lonely").await;
    assert!(
        status.missed_runs >= missed_before + 5,
        "{missed_before} then {}",
        status.missed_runs
    );
    job.double_ack().await.unwrap();
    let next = wait_for(
        DEADLINE,
        "the next run after the first finished",
        || async {
            env.job_ids("single")
                .await
                .first()
                .is_some_and(|id| *id != ids[0])
        },
    )
    .await;
    next.unwrap();
    let later = env.job_ids("single").await;
    assert_eq!(later.len(), 1, "{later:?}");
    assert!(slot(&later[0]) > slot(&ids[0]), "{ids:?} then {later:?}");

    // Replace: each new run cancels the one still queued.
    env.apply_ok(&schedule_yaml(
        "fresh",
        "single",
        "@every 1s",
        "  concurrencyPolicy: Replace\n",
    ))
    .await;
    env.wait_ready("fresh", "True", "Scheduled").await;
    let nats = env.nats.client().await.unwrap();
    let cancelled = |id: String| {
        let nats = nats.clone();
        let queue = queue.clone();
        async move {
            conveyor::stored::last(&nats, &queue.cancel_stream(), &queue.cancel_subject(&id))
                .await
                .ok()
                .flatten()
                .is_some()
        }
    };
    let replaced = || async {
        let fresh: Vec<String> = env
            .job_ids("single")
            .await
            .into_iter()
            .filter(|id| id.starts_with("fresh@"))
            .collect();
        let mut n = 0;
        for id in &fresh[..fresh.len().saturating_sub(1)] {
            if cancelled(id.clone()).await {
                n += 1;
            }
        }
        n
    };
    wait_for(
        DEADLINE,
        "two runs of fresh replaced by later ones",
        || async { replaced().await >= 2 },
    )
    .await
    .unwrap();
    env.shutdown().await;
}

#[tokio::test]
async fn the_last_runs_outcome_comes_from_the_queues_stored_results() {
    let env = Env::new().await;
    let results = "results: {retention: 1h}";
    env.scheduled("kept", results, "report", "@every 1s", "")
        .await;
    let what = "a last run in the status";
    wait_for(DEADLINE, what, || async {
        schedule_status(&env, "report").await.last_run.is_some()
    })
    .await
    .unwrap();
    // What a worker with stored results writes once a run succeeded, for every run so far.
    let js = async_nats::jetstream::new(env.nats.client().await.unwrap());
    let queue = QueueRef::new(NS, "kept");
    let store = |id: String| {
        let js = js.clone();
        let queue = queue.clone();
        async move {
            let headers = conveyor::protocol::Outcome::Completed.encode(&id);
            js.publish_with_headers(queue.result_subject(&id), headers, "ok".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    wait_for(DEADLINE, "lastRun.outcome Completed", || async {
        for id in env.job_ids("kept").await {
            store(id).await;
        }
        let status = schedule_status(&env, "report").await;
        status
            .last_run
            .is_some_and(|run| run.outcome.as_deref() == Some("Completed"))
    })
    .await
    .unwrap();
    env.shutdown().await;
}

/// The pull consumer of `queue`'s priority level 0, once the operator made it.
async fn level_consumer(
    js: &async_nats::jetstream::Context,
    queue: &QueueRef,
) -> Option<async_nats::jetstream::consumer::PullConsumer> {
    let stream = js.get_stream(queue.stream()).await.ok()?;
    stream.get_consumer(&queue.consumer(0)).await.ok()
}

/// Acknowledges every job of `queue` as it comes, like a worker with instant jobs; the job ids
/// it took, in order.
fn ack_everything(
    env: &Env,
    queue: &str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<Vec<String>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let url = env.nats.url();
    let queue = QueueRef::new(NS, queue);
    let task = tokio::spawn(async move {
        use futures::StreamExt;
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let consumer = level_consumer(&js, &queue)
            .await
            .expect("the queue's consumer");
        let mut messages = consumer.messages().await.unwrap();
        while let Some(Ok(job)) = messages.next().await {
            let id = job
                .headers
                .as_ref()
                .and_then(|h| h.get(conveyor::protocol::MSG_ID))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            job.double_ack().await.unwrap();
            tx.send_modify(|ids| ids.push(id));
        }
    });
    (task, rx)
}

#[tokio::test]
async fn forbid_after_an_operator_restart_skips_over_a_run_still_held_and_runs_no_missed_slot() {
    let mut env = Env::new().await;
    let extra = "  concurrencyPolicy: Forbid\n  startingDeadline: 30s\n";
    env.scheduled("held", "", "beat", "@every 1s", extra).await;
    // No worker yet: the first run stays queued, so Forbid skips every slot after it.
    let first = env.wait_jobs("held", 1).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let first = first[0].clone();

    env.stop_operator().await;
    let stopped = Timestamp::now();
    let at_stop = schedule_status(&env, "beat").await;
    // Three slots or more go by with no operator: the server writes them where only the
    // operator reads them, keeping the newest.
    env.wait_held_after("held", "beat", stopped, 3).await;
    env.start_operator();
    let restarted = Timestamp::now();
    // The restarted operator reads the status afresh: the first run is still queued, so the
    // newest slot is skipped, not submitted over it.
    let skipped = wait_for(
        DEADLINE,
        "a slot after the restart skipped by Forbid",
        || async {
            let status = schedule_status(&env, "beat").await;
            status.last_missed.as_deref().is_some_and(|m| {
                m.contains(&format!(
                    "the previous run {first} was still queued or running"
                )) && status_slot(m).as_second() >= stopped.as_second() + 3
            })
        },
    )
    .await;
    let status = schedule_status(&env, "beat").await;
    assert!(skipped.is_ok(), "{status:?}");
    assert_eq!(
        env.job_ids("held").await,
        std::slice::from_ref(&first),
        "a run was submitted over the one still queued"
    );
    assert!(
        status.missed_runs >= at_stop.missed_runs + 3,
        "the slots gone by and the skipped one are counted: {} then {}",
        at_stop.missed_runs,
        status.missed_runs
    );
    let note = env.wait_event("beat", "MissedRuns").await;
    assert!(note.contains("status.missedRuns"), "{note}");

    // A worker takes the first run: the next slots run, each once, none gone by or skipped.
    wait_for(DEADLINE, "the queue's consumer", || async {
        let js = async_nats::jetstream::new(env.nats.client().await.unwrap());
        level_consumer(&js, &QueueRef::new(NS, "held"))
            .await
            .is_some()
    })
    .await
    .unwrap();
    let (worker, taken) = ack_everything(&env, "held");
    let mut taken = taken.clone();
    let ids = tokio::time::timeout(DEADLINE, taken.wait_for(|ids| ids.len() >= 3))
        .await
        .expect("3 runs taken")
        .unwrap()
        .clone();
    worker.abort();
    assert_eq!(ids[0], first, "{ids:?}");
    let distinct: BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a slot ran twice: {ids:?}");
    for id in &ids[1..] {
        assert!(
            slot(id).as_second() > restarted.as_second(),
            "a slot from before the restart ran: {id} of {ids:?}"
        );
    }
    env.shutdown().await;
}

/// An operator that stopped after writing `lastHandled` and before publishing the run (or whose
/// status write after it failed) left a slot handled with no run on record. Past the queue's
/// deduplication window a second publish would not be a duplicate, so the slot is not run
/// again: it counts as missed.
#[tokio::test]
async fn a_slot_handled_without_its_run_past_the_dedup_window_is_missed_not_run() {
    let mut env = Env::new().await;
    let (window, forbid) = ("deduplicationWindow: 1s", "  concurrencyPolicy: Forbid\n");
    env.scheduled("once", window, "slow", "@every 15s", forbid)
        .await;
    env.stop_operator().await;
    let slot = wait_for_slot(&env, "once", "slow").await;
    let id = conveyor::schedule::job_id("slow", slot);
    // What an operator that died right after its `lastHandled` write leaves behind.
    let patch = serde_json::json!({"status": {"lastHandled": id}});
    env.schedules()
        .patch_status(
            "slow",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    // The slot is older than the queue's 1s deduplication window.
    wait_for(DEADLINE, "the deduplication window to pass", || async {
        Timestamp::now().as_second() >= slot.as_second() + 2
    })
    .await
    .unwrap();
    env.start_operator();
    let counted = wait_for(DEADLINE, "the slot counted as missed", || async {
        let status = schedule_status(&env, "slow").await;
        status
            .last_missed
            .as_deref()
            .is_some_and(|m| m.starts_with(&format!("{id}: ")))
    })
    .await;
    let status = schedule_status(&env, "slow").await;
    assert!(counted.is_ok(), "{status:?}");
    assert_eq!(status.missed_runs, 1, "{status:?}");
    assert_eq!(status.last_handled.as_deref(), Some(id.as_str()));
    let ids = env.job_ids("once").await;
    assert!(!ids.contains(&id), "the handled slot ran: {ids:?}");
    let note = env.wait_event("slow", "MissedRuns").await;
    assert!(note.contains(&id), "{note}");
    env.shutdown().await;
}

/// Waits until the server holds a slot of the held schedule `name`; that slot.
async fn wait_for_slot(env: &Env, queue: &str, name: &str) -> Timestamp {
    wait_for(DEADLINE, "the server to hold a slot", || async {
        env.held_slot(queue, name).await.is_some()
    })
    .await
    .unwrap();
    env.held_slot(queue, name).await.unwrap()
}

/// The slot a `lastMissed` text (`<job id>: <why>`) names.
fn status_slot(missed: &str) -> Timestamp {
    slot(missed.split_once(": ").map_or(missed, |(id, _)| id))
}

#[tokio::test]
async fn a_slot_missed_for_longer_than_the_starting_deadline_is_skipped_and_said_so() {
    let mut env = Env::new().await;
    // Allow with a deadline: the operator submits each run, to judge how late it is.
    let deadline = "  startingDeadline: 2s\n";
    env.scheduled("late", "", "sparse", "@every 8s", deadline)
        .await;
    let first = env.wait_jobs("late", 1).await;
    let submitted = slot(&first[0]);

    env.stop_operator().await;
    // A slot goes by with no operator, and then its deadline.
    let missed = std::cell::Cell::new(None);
    wait_for(
        Duration::from_secs(45),
        "a slot held 3s past with no operator",
        || async {
            let held = env
                .held_slot("late", "sparse")
                .await
                .filter(|slot| *slot > submitted);
            missed.set(held);
            held.is_some_and(|slot| Timestamp::now().as_second() >= slot.as_second() + 3)
        },
    )
    .await
    .unwrap();
    let missed = conveyor::schedule::job_id("sparse", missed.get().unwrap());
    env.start_operator();
    let what = format!("status.lastMissed naming {missed}");
    wait_for(DEADLINE, &what, || async {
        schedule_status(&env, "sparse")
            .await
            .last_missed
            .is_some_and(|m| m.starts_with(&missed))
    })
    .await
    .unwrap();
    let status = schedule_status(&env, "sparse").await;
    assert!(status.missed_runs >= 1);
    env.wait_event("sparse", "MissedRuns").await;
    // Runs go on after it, and the missed slot never runs.
    let what = "a run after the missed slot";
    wait_for(Duration::from_secs(45), what, || async {
        env.job_ids("late")
            .await
            .iter()
            .any(|id| slot(id) > slot(&missed))
    })
    .await
    .unwrap();
    let ids = env.job_ids("late").await;
    assert!(!ids.contains(&missed), "{missed} ran: {ids:?}");
    env.shutdown().await;
}

/// A relay to the real server `upstream` that announces `version` in the server's INFO line
/// instead of its own, and passes everything else through: the server as an older release
/// would present itself. Its `nats://` URL.
async fn announcing(upstream: String, version: &'static str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("nats://").to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (server_read, mut server_write) = server.into_split();
                let (mut client_read, mut client_write) = client.into_split();
                let mut server_read = BufReader::new(server_read);
                let mut info = String::new();
                if server_read.read_line(&mut info).await.is_err() {
                    return;
                }
                let (head, tail) = info.split_once("\"version\":\"").unwrap_or((&info, ""));
                let rest = tail.split_once('"').map_or("", |(_, rest)| rest);
                let info = format!("{head}\"version\":\"{version}\"{rest}");
                if client_write.write_all(info.as_bytes()).await.is_err() {
                    return;
                }
                let up = tokio::io::copy(&mut client_read, &mut server_write);
                let down = tokio::io::copy(&mut server_read, &mut client_write);
                let _ = tokio::join!(up, down);
            });
        }
    });
    url
}

#[tokio::test]
async fn a_server_older_than_2_14_is_refused_with_the_version_it_needs() {
    let env = Env::new().await;
    let old = announcing(env.nats.url(), "2.12.3").await;
    env.apply_ok(&queue_yaml("old", &format!("nats: {{url: '{old}'}}")))
        .await;
    env.apply_ok(&schedule_yaml("nightly", "old", "@daily", ""))
        .await;
    let message = env
        .wait_ready("nightly", "False", "UnsupportedServer")
        .await;
    assert_eq!(
        message,
        "NATS server version \"2.12.3\" cannot run cron or @every schedules; JobSchedules need 2.14 or newer"
    );
    let note = env.wait_event("nightly", "UnsupportedServer").await;
    assert_eq!(note, message);
    // Nothing was put on the server.
    let nats = env.nats.client().await.unwrap();
    let queue = QueueRef::new(NS, "old");
    let subject = conveyor::schedule::schedule_subject(&queue, "nightly");
    let js = async_nats::jetstream::new(nats.clone());
    wait_for(DEADLINE, "the queue's delayed stream", || async {
        js.get_stream(queue.delayed_stream()).await.is_ok()
    })
    .await
    .unwrap();
    let held = conveyor::stored::last(&nats, &queue.delayed_stream(), &subject).await;
    assert!(matches!(held, Ok(None)), "{held:?}");
    env.shutdown().await;
}
