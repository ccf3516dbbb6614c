//! Runs of a workflow as continuations (`docs/workflows.md`, "How a run runs").
//!
//! A run is one job in a run queue: its payload is the [`RunState`] (the pinned definition,
//! the input, what each step came to). Its handler, [`Engine::handle`], spawns the steps that
//! can start as children (ids `<run>.<step>`, `<run>.<step>.<i>` for `forEach`: the same on a
//! retry, so deduplication absorbs a retried wave) and returns [`Outcome::Continue`] with the
//! next state; the continuation reads the children's records, and so on. The run's outcome is
//! its output step's result, or a permanent failure naming the failed step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Definition, MAX_DEPTH, MAX_INLINE_RESULT, StepOutcome, StepRecord, output_step, plan, validate,
};
use crate::client::{Client, Job, SubmitAck, SubmitError};
use crate::flow::ChildResult;
use crate::names::QueueRef;
use crate::protocol::Outcome as Recorded;
use crate::worker::{Outcome, ReceivedJob};

/// The JobQueue of a namespace whose jobs are its workflows' runs (declare it with
/// `priorities: 2`, so a run's later waves go a level up). The operator's leader serves it.
pub const RUN_QUEUE: &str = "workflow-runs";

/// The id part of the `onFailure` job (`<run>.onFailure`; a step name is a DNS label, so it
/// never clashes with one).
const ON_FAILURE: &str = "onFailure";
/// Records read per page of a wave's children.
const PAGE: usize = 500;

/// A run as its jobs carry it (the payload of the run job and of each continuation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    /// The `Workflow` it runs.
    pub workflow: String,
    /// Its namespace: step queues without a namespace are there.
    pub namespace: String,
    /// The run job's id in the run queue (`<workflow>.<run id>`).
    pub run: String,
    /// The definition as it was when the run started.
    pub definition: Definition,
    /// The run's input.
    pub input: Value,
    /// Waves done so far (0 for the run job itself).
    pub wave: u32,
    /// What each finished step came to.
    #[serde(default)]
    pub steps: BTreeMap<String, StepRecord>,
    /// Steps spawned by the last wave: name → jobs spawned (1, or the `forEach` elements), and
    /// when.
    #[serde(default)]
    pub running: BTreeMap<String, Running>,
    /// The step that failed and why; once set, the run ends failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failure>,
    /// The `onFailure` job has been spawned.
    #[serde(default)]
    pub notified: bool,
    /// When the run started (RFC 3339).
    pub started: String,
    /// 0 for a run started from outside; a sub-run (a step with `workflow`) is one deeper than
    /// the run that started it, at most [`MAX_DEPTH`].
    #[serde(default)]
    pub depth: u32,
}

/// A step of the last wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    /// Jobs spawned for it.
    pub jobs: usize,
    /// `forEach`: its results are a list.
    pub each: bool,
    /// When they were spawned (RFC 3339).
    pub started: String,
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The step.
    pub step: String,
    /// Its error.
    pub error: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {} failed: {}", self.step, self.error)
    }
}

impl RunState {
    /// A new run of `workflow` (in `namespace`) with id `run_id` and `input`.
    pub fn new(
        namespace: &str,
        workflow: &str,
        run_id: &str,
        definition: Definition,
        input: Value,
    ) -> Self {
        Self {
            workflow: workflow.into(),
            namespace: namespace.into(),
            run: run_job_id(workflow, run_id),
            definition,
            input,
            wave: 0,
            steps: BTreeMap::new(),
            running: BTreeMap::new(),
            failed: None,
            notified: false,
            started: now(),
            depth: 0,
        }
    }
}

/// The run job's id for run `run_id` of `workflow`.
pub fn run_job_id(workflow: &str, run_id: &str) -> String {
    format!("{workflow}.{run_id}")
}

/// Longest run id.
pub const MAX_RUN_ID: usize = 64;

/// A run id is 1 to [`MAX_RUN_ID`] ASCII letters, digits, `-` and `_`: no `.` (which
/// separates the parts of the ids a run's jobs get) and no `:` (continuations), so that
/// `<workflow>.<run>` and every id under it belongs to one run only.
pub fn check_run_id(run_id: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if run_id.is_empty() || run_id.len() > MAX_RUN_ID || !run_id.chars().all(allowed) {
        return Err(format!(
            "run id {run_id:?} must be 1 to {MAX_RUN_ID} letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// A workflow's name is a DNS label (lowercase letters, digits and `-`, at most 63, starting
/// and ending with a letter or digit): Kubernetes also allows `.` in a `Workflow`'s name, but
/// a run of `a.b` could then have the job ids of a run of `a`.
pub fn check_workflow_name(name: &str) -> Result<(), String> {
    if super::is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "workflow name {name:?} must be a DNS label (lowercase letters, digits and '-', at most 63) to be run"
        ))
    }
}

/// What follows `<workflow>.` in the state's run, once the workflow's name is checked.
fn after_workflow(state: &RunState) -> Result<&str, String> {
    check_workflow_name(&state.workflow)?;
    state
        .run
        .strip_prefix(&format!("{}.", state.workflow))
        .ok_or_else(|| format!("run {:?} is not of workflow {}", state.run, state.workflow))
}

/// Checks the id of a run job as the engine gets it: `<workflow>.<run id>` for a run started
/// from outside (`depth` 0), that followed by `.<step>[.<i>]` per level for a sub-run.
fn check_run_job(state: &RunState, job_id: &str) -> Result<(), String> {
    if job_id != state.run {
        return Err(format!(
            "the run job's id {job_id:?} is not its state's run {:?}",
            state.run
        ));
    }
    let mut parts = after_workflow(state)?.split('.');
    check_run_id(parts.next().unwrap_or_default())?;
    let below: Vec<&str> = parts.collect();
    let well_formed = below.iter().all(|p| super::is_dns_label(p));
    if state.depth == 0 && !below.is_empty() || !well_formed {
        return Err(format!(
            "run {:?} is not <workflow>.<run id> (or a sub-run's id under one)",
            state.run
        ));
    }
    Ok(())
}

/// The id of wave `wave` (1 and on) of run job `run`: `<run>:w<wave>` (`:` is in no step
/// name, so no step's or sub-run's id is ever one).
pub fn continuation_id(run: &str, wave: u32) -> String {
    format!("{run}:w{wave}")
}

/// The queue a step names: `q` in `namespace`, or `ns/q`.
pub fn step_queue(namespace: &str, queue: &str) -> QueueRef {
    match queue.split_once('/') {
        Some((ns, q)) => QueueRef::new(ns, q),
        None => QueueRef::new(namespace, queue),
    }
}

/// Starts run `state` in `run_queue`: one submission, idempotent by the run job's id (a second
/// start inside the queue's deduplication window is a duplicate; after it, a run whose outcome
/// is still stored is not started again and reported as a duplicate).
pub async fn start(
    client: &Client,
    run_queue: &QueueRef,
    state: &RunState,
) -> Result<SubmitAck, SubmitError> {
    let refuse = |problem: String| SubmitError::BadDependencies {
        id: state.run.clone(),
        problem,
    };
    after_workflow(state)
        .and_then(check_run_id)
        .map_err(refuse)?;
    if let Ok(Some(_)) = client.result(run_queue, &state.run).await {
        return Ok(SubmitAck {
            id: state.run.clone(),
            sequence: 0,
            duplicate: true,
        });
    }
    let payload = serde_json::to_vec(state).map_err(|e| SubmitError::BadDependencies {
        id: state.run.clone(),
        problem: format!("run state is not JSON: {e}"),
    })?;
    client
        .submit(run_queue, Job::new(state.run.clone(), payload))
        .await
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Serves a run queue: give [`Engine::handle`] to a [`crate::Worker`] of that queue.
#[derive(Debug)]
pub struct Engine {
    jetstream: jetstream::Context,
    /// Priority levels of the queues steps went to (read once per queue).
    levels: Mutex<HashMap<QueueRef, u8>>,
}

/// A step whose queue cannot take it.
enum Refused {
    /// For good: the run fails.
    Fail(Failure),
    /// For now: the wave is tried again.
    Retry(String),
}

impl Engine {
    /// An engine that spawns steps on `jetstream`'s server.
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self {
            jetstream,
            levels: Mutex::new(HashMap::new()),
        }
    }

    /// Runs one wave of a run: reads the last wave's children, then spawns the next one and
    /// continues, or ends the run.
    pub async fn handle(&self, job: ReceivedJob) -> Outcome {
        let mut state: RunState = match serde_json::from_slice(&job.payload) {
            Ok(state) => state,
            Err(error) => return Outcome::Permanent(format!("not a workflow run: {error}")),
        };
        // A run is started by anyone who can submit to the run queue, and a definition pinned
        // between an edit and its validation may be broken: check it before the first wave.
        if state.wave == 0
            && let Err(problem) = check_run_job(&state, &job.id)
        {
            return Outcome::Permanent(problem);
        }
        if state.wave == 0
            && let Err(problems) = validate(&state.definition)
        {
            let problems: Vec<&str> = problems.iter().map(|p| p.0.as_str()).collect();
            return Outcome::Permanent(format!(
                "the run's workflow is not valid: {}",
                problems.join("; ")
            ));
        }
        if job.flow.children_expected().is_some()
            && let Err(error) = collect(&job, &mut state).await
        {
            return Outcome::Failed(format!("reading the steps' records: {error}"));
        }
        if state.failed.is_none() {
            let mut records = state.steps.clone();
            match plan(
                &state.definition,
                &state.input,
                &mut records,
                &BTreeSet::new(),
            ) {
                Err(error) => {
                    state.steps = records;
                    state.failed = Some(Failure {
                        step: error.step,
                        error: error.problem,
                    });
                }
                Ok(next) if next.done => {
                    state.steps = records;
                    return Outcome::Done(output(&state));
                }
                Ok(next) if next.start.is_empty() && state.running.is_empty() => {
                    // Nothing runs and nothing can start, yet the run is not done: another
                    // wave would find the same (a step waiting for one that never runs).
                    return Outcome::Permanent(
                        "the run cannot go on: no step is running and none can start".into(),
                    );
                }
                Ok(next) => {
                    state.steps = records;
                    for start in next.start {
                        match self.spawn_step(&job, &state, &start).await {
                            Ok(running) => {
                                state.running.insert(start.step.clone(), running);
                            }
                            Err(Refused::Retry(error)) => return Outcome::Failed(error),
                            Err(Refused::Fail(failure)) => {
                                state.failed = Some(failure);
                                break;
                            }
                        }
                    }
                }
            }
        }
        if let Some(failure) = state.failed.clone() {
            let Some(handler) = state
                .definition
                .on_failure
                .clone()
                .filter(|_| !state.notified)
            else {
                // Anything spawned before the failure is waited for: its records are read
                // by a continuation, which ends the run then.
                if state.running.is_empty() {
                    return Outcome::Permanent(failure.to_string());
                }
                return self.continue_with(&job, &state).await;
            };
            let queue = step_queue(&state.namespace, &handler.queue);
            let payload = json!({
                "workflow": state.workflow,
                "run": state.run,
                "step": ON_FAILURE,
                "input": state.input,
                "failed": failure,
            });
            let mut notify = Job::new(format!("{}.{ON_FAILURE}", state.run), payload.to_string());
            notify.priority = self.level(&queue, state.wave + 1).await.unwrap_or(0);
            if let Some(attempts) = handler.max_attempts {
                notify = notify.max_attempts(attempts);
            }
            if let Some(timeout) = handler
                .timeout
                .as_deref()
                .and_then(crate::protocol::parse_duration)
            {
                notify = notify.timeout(timeout);
            }
            match job.flow.spawn(&queue, notify).await {
                Ok(_) => state.notified = true,
                Err(error) if error.is_retryable() => return Outcome::Failed(error.to_string()),
                // No onFailure job can ever run: the run fails with its own failure, and says so.
                Err(error) => {
                    return Outcome::Permanent(format!("{failure} (onFailure not run: {error})"));
                }
            }
        }
        self.continue_with(&job, &state).await
    }

    /// The next wave's job: the same state one wave on, a level up when the run queue has one.
    async fn continue_with(&self, job: &ReceivedJob, state: &RunState) -> Outcome {
        let mut next = state.clone();
        next.wave += 1;
        let payload = match serde_json::to_vec(&next) {
            Ok(payload) => payload,
            Err(error) => return Outcome::Permanent(format!("run state is not JSON: {error}")),
        };
        let level = self
            .level(&job.flow.me().queue_ref(), next.wave)
            .await
            .unwrap_or(0);
        let continuation = Job::new(continuation_id(&state.run, next.wave), payload);
        Outcome::Continue(Box::new(continuation.priority(level)))
    }

    /// Spawns one step's job(s) as children of this wave.
    async fn spawn_step(
        &self,
        job: &ReceivedJob,
        state: &RunState,
        start: &super::Start,
    ) -> Result<Running, Refused> {
        let step = state
            .definition
            .steps
            .iter()
            .find(|s| s.name == start.step)
            .ok_or_else(|| {
                Refused::Fail(Failure {
                    step: start.step.clone(),
                    error: "not in the definition".into(),
                })
            })?;
        let fail = |error: String| {
            Refused::Fail(Failure {
                step: step.name.clone(),
                error,
            })
        };
        if let Some(workflow) = &step.workflow {
            return self.spawn_sub_runs(job, state, start, workflow).await;
        }
        let queue = step_queue(&state.namespace, &step.queue);
        let priority = match self.level(&queue, state.wave).await {
            Ok(level) => level,
            Err(LevelError::NoQueue) => {
                return Err(fail(format!(
                    "queue {}/{} does not exist",
                    queue.namespace, queue.name
                )));
            }
            Err(LevelError::Other(error)) => return Err(Refused::Retry(error)),
        };
        let dependencies: serde_json::Map<String, Value> = step
            .depends_on
            .iter()
            .filter_map(|d| state.steps.get(d).map(|r| (d, r)))
            .map(|(name, record)| {
                (
                    name.clone(),
                    json!({"outcome": record.outcome.as_str(), "result": record.result}),
                )
            })
            .collect();
        let payload = |item: Option<(usize, &Value)>| {
            let mut payload = json!({
                "workflow": state.workflow,
                "run": state.run,
                "step": step.name,
                "input": state.input,
                "steps": dependencies,
            });
            if let Some((index, item)) = item {
                payload["item"] = item.clone();
                payload["index"] = json!(index);
            }
            payload.to_string()
        };
        let build = |id: String, payload: String| {
            let mut child = Job::new(id, payload).priority(priority);
            if let Some(attempts) = step.max_attempts {
                child = child.max_attempts(attempts);
            }
            if let Some(timeout) = step
                .timeout
                .as_deref()
                .and_then(crate::protocol::parse_duration)
            {
                child = child.timeout(timeout);
            }
            child
        };
        let jobs: Vec<Job> = match &start.items {
            None => vec![build(format!("{}.{}", state.run, step.name), payload(None))],
            Some(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    build(
                        format!("{}.{}.{i}", state.run, step.name),
                        payload(Some((i, item))),
                    )
                })
                .collect(),
        };
        let count = jobs.len();
        for result in job.flow.spawn_batch(&queue, jobs).await {
            match result {
                Ok(_) => {}
                Err(error) if error.is_retryable() => {
                    return Err(Refused::Retry(format!("step {}: {error}", step.name)));
                }
                Err(error) => return Err(fail(error.to_string())),
            }
        }
        Ok(Running {
            jobs: count,
            each: start.items.is_some(),
            started: now(),
        })
    }

    /// Spawns a sub-run step: one run of `workflow` (this run's own, pinned definition) per
    /// element, or one with this run's input, as children in this run queue; each one's
    /// outcome (its output step's result, or its failure) is the step's job's outcome.
    async fn spawn_sub_runs(
        &self,
        job: &ReceivedJob,
        state: &RunState,
        start: &super::Start,
        workflow: &str,
    ) -> Result<Running, Refused> {
        let fail = |error: String| {
            Refused::Fail(Failure {
                step: start.step.clone(),
                error,
            })
        };
        if workflow != state.workflow {
            return Err(fail(format!(
                "a sub-run of another workflow ({workflow}) is not supported yet"
            )));
        }
        if state.depth >= MAX_DEPTH {
            return Err(fail(format!("sub-runs nest at most {MAX_DEPTH} deep")));
        }
        let runs = job.flow.me().queue_ref();
        let priority = match self.level(&runs, state.wave).await {
            Ok(level) => level,
            Err(LevelError::NoQueue) => return Err(fail("the run queue is gone".into())),
            Err(LevelError::Other(error)) => return Err(Refused::Retry(error)),
        };
        let sub = |id: String, input: Value| {
            let mut child = RunState::new(
                &state.namespace,
                workflow,
                "",
                state.definition.clone(),
                input,
            );
            child.run = id;
            child.depth = state.depth + 1;
            serde_json::to_vec(&child)
                .map(|payload| Job::new(child.run, payload).priority(priority))
        };
        let made: Result<Vec<Job>, _> = match &start.items {
            None => vec![sub(
                format!("{}.{}", state.run, start.step),
                state.input.clone(),
            )]
            .into_iter()
            .collect(),
            Some(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| sub(format!("{}.{}.{i}", state.run, start.step), item.clone()))
                .collect(),
        };
        let jobs = made.map_err(|e| fail(format!("sub-run state is not JSON: {e}")))?;
        let count = jobs.len();
        for result in job.flow.spawn_batch(&runs, jobs).await {
            match result {
                Ok(_) => {}
                Err(error) if error.is_retryable() => {
                    return Err(Refused::Retry(format!("step {}: {error}", start.step)));
                }
                Err(error) => return Err(fail(error.to_string())),
            }
        }
        Ok(Running {
            jobs: count,
            each: start.items.is_some(),
            started: now(),
        })
    }

    /// The level a step of wave `wave` goes to on `queue`: the wave, at most the queue's top
    /// level (the fairness rule: work of runs already started goes ahead of new runs' first
    /// steps, and deeper work ahead of shallower).
    async fn level(&self, queue: &QueueRef, wave: u32) -> Result<u8, LevelError> {
        let known = self
            .levels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(queue)
            .copied();
        let levels = match known {
            Some(levels) => levels,
            None => {
                let levels = self.read_levels(queue).await?;
                self.levels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(queue.clone(), levels);
                levels
            }
        };
        Ok(u8::try_from(wave)
            .unwrap_or(u8::MAX)
            .min(levels.saturating_sub(1)))
    }

    async fn read_levels(&self, queue: &QueueRef) -> Result<u8, LevelError> {
        match self.jetstream.get_stream(queue.stream()).await {
            Ok(stream) => {
                let prefix = format!("{}.jobs.", queue.subject_prefix());
                let levels = stream
                    .cached_info()
                    .config
                    .subjects
                    .iter()
                    .filter(|s| s.starts_with(&prefix))
                    .count();
                Ok(u8::try_from(levels).unwrap_or(u8::MAX).max(1))
            }
            Err(error)
                if matches!(error.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                Err(LevelError::NoQueue)
            }
            Err(error) => Err(LevelError::Other(format!(
                "queue {}/{}: {error}",
                queue.namespace, queue.name
            ))),
        }
    }
}

enum LevelError {
    NoQueue,
    Other(String),
}

/// The run's result: its output step's result as JSON.
fn output(state: &RunState) -> Bytes {
    let result = output_step(&state.definition)
        .and_then(|name| state.steps.get(name))
        .map_or(Value::Null, |r| r.result.clone());
    Bytes::from(result.to_string())
}

/// A result's bytes as JSON: JSON when they are, else a string.
fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Reads every record of the last wave's children into `state`: each step of `running`
/// becomes completed (with its result, or its elements' results) or failed.
async fn collect(job: &ReceivedJob, state: &mut RunState) -> Result<(), crate::flow::FlowError> {
    let mut records: Vec<ChildResult> = Vec::new();
    let mut after = 0;
    loop {
        let page = job.flow.children_page(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.sequence;
        records.extend(page);
    }
    let prefix = format!("{}.", state.run);
    // step → index → record
    let mut by_step: BTreeMap<String, BTreeMap<usize, ChildResult>> = BTreeMap::new();
    for record in records {
        let Some(rest) = record.job.id.strip_prefix(&prefix) else {
            continue;
        };
        let (step, index) = match rest.split_once('.') {
            Some((step, i)) => (step.to_owned(), i.parse().unwrap_or(usize::MAX)),
            None => (rest.to_owned(), 0),
        };
        by_step.entry(step).or_default().insert(index, record);
    }
    let finished = now();
    for (name, running) in std::mem::take(&mut state.running) {
        let children = by_step.remove(&name).unwrap_or_default();
        let mut results = Vec::with_capacity(running.jobs);
        let mut failure = None;
        let mut by_reference = None;
        for i in 0..running.jobs {
            match children.get(&i) {
                None => failure = Some(format!("no record of its job {i}")),
                Some(child) => match &child.outcome {
                    Recorded::Completed => {
                        if child.result_ref.is_some() || child.result.len() > MAX_INLINE_RESULT {
                            by_reference = Some(child.result_ref.clone().unwrap_or_else(|| {
                                child.job.queue_ref().result_subject(&child.job.id)
                            }));
                            results.push(Value::Null);
                        } else {
                            results.push(as_json(&child.result));
                        }
                    }
                    Recorded::DeadLettered { reason, error, .. } => {
                        failure.get_or_insert_with(|| format!("{reason}: {error}"));
                    }
                    Recorded::Cancelled => {
                        failure.get_or_insert_with(|| "cancelled".into());
                    }
                    Recorded::Progress => {}
                },
            }
        }
        let mut record = StepRecord {
            outcome: StepOutcome::Completed,
            result: if running.each {
                Value::Array(results)
            } else {
                results.pop().unwrap_or(Value::Null)
            },
            result_ref: by_reference,
            error: None,
            started: Some(running.started),
            finished: Some(finished.clone()),
        };
        if let Some(error) = failure {
            record.outcome = StepOutcome::Failed;
            record.result = Value::Null;
            record.error = Some(error.clone());
            state.failed.get_or_insert(Failure {
                step: name.clone(),
                error,
            });
        }
        state.steps.insert(name, record);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_queue_is_in_the_run_namespace_unless_it_names_one() {
        assert_eq!(step_queue("shop", "mail"), QueueRef::new("shop", "mail"));
        assert_eq!(step_queue("shop", "ops/mail"), QueueRef::new("ops", "mail"));
    }

    #[test]
    fn run_state_round_trips_as_json() {
        let definition: Definition =
            serde_json::from_value(json!({"steps": [{"name": "a", "queue": "q"}]})).unwrap();
        let state = RunState::new("ns", "wf", "r1", definition, json!({"x": 1}));
        assert_eq!(state.run, "wf.r1");
        let text = serde_json::to_vec(&state).unwrap();
        let back: RunState = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn run_ids_and_workflow_names_keep_job_ids_apart() {
        // Workflow `a.b` run `c` and workflow `a` run `b.c` would both be job `a.b.c`.
        assert!(check_workflow_name("a.b").is_err());
        assert!(check_run_id("b.c").is_err());
        for bad in ["", "x:w1", "a b", "é", &"x".repeat(MAX_RUN_ID + 1)] {
            assert!(check_run_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_run_id("0195f2d4-7a3c-7b1e-9a55-1c2d3e4f5a6b").is_ok());
        assert!(check_run_id("Nightly_2026").is_ok());
        assert_eq!(
            check_run_id("b.c").unwrap_err(),
            "run id \"b.c\" must be 1 to 64 letters, digits, '-' or '_'"
        );

        let definition: Definition =
            serde_json::from_value(json!({"steps": [{"name": "a", "queue": "q"}]})).unwrap();
        let top = RunState::new("ns", "wf", "r1", definition.clone(), json!({}));
        assert_eq!(check_run_job(&top, "wf.r1"), Ok(()));
        assert!(
            check_run_job(&top, "wf.r2").is_err(),
            "the job is not its state's run"
        );
        let mut sub = top.clone();
        sub.run = "wf.r1.children.3".into();
        sub.depth = 1;
        assert_eq!(check_run_job(&sub, "wf.r1.children.3"), Ok(()));
        sub.depth = 0;
        assert!(check_run_job(&sub, "wf.r1.children.3").is_err());
        let dotted = RunState::new("ns", "wf", "b.c", definition, json!({}));
        assert!(check_run_job(&dotted, "wf.b.c").is_err());
    }

    #[test]
    fn results_that_are_not_json_are_strings() {
        assert_eq!(as_json(b"{\"n\": 2}"), json!({"n": 2}));
        assert_eq!(as_json(b"plain text"), json!("plain text"));
    }
}
