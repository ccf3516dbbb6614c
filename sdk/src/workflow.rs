//! Workflows: a declared graph of steps, each an ordinary job on its own queue, run as a chain
//! of continuations (see `docs/workflows.md`).
//!
//! This module is the pure part: the [`Definition`] a run pins (the JSON shape of a `Workflow`
//! resource's `spec`), its [`validate`] checks (names, graph, CEL), and [`plan`], which decides
//! from the run's input and the outcomes so far which steps start now, which are skipped, and
//! whether the run is over. [`engine`] is the handler that serves a run queue with it.

pub mod engine;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most steps a workflow declares (the CRD says the same).
pub const MAX_STEPS: usize = 64;
/// Most `dependsOn` entries of a step.
pub const MAX_DEPENDENCIES: usize = 32;
/// Most jobs one `forEach` step fans out to; a longer list fails the run.
pub const MAX_FOR_EACH: usize = 1_000;
/// Longest CEL expression (`when`, `forEach`).
pub const MAX_EXPRESSION: usize = 1_024;
/// Deepest nesting of sub-runs (a step with `workflow`): a run at this depth that would start
/// another fails instead.
pub const MAX_DEPTH: u32 = 8;
/// Largest step result kept in the run's state, in bytes of JSON; a larger one is kept by
/// reference (`resultRef`: its results subject) and reads as `null` in CEL.
pub const MAX_INLINE_RESULT: usize = 16 * 1024;

/// A workflow as a run pins it: the `spec` of a `Workflow` resource, in the same JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    /// The steps, in any order that names each one once.
    pub steps: Vec<Step>,
    /// The job run when a step fails for good, told which step failed and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<FailureHandler>,
    /// The step whose result is the run's result; the last of `steps` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// One step: a job (or, with `forEach`, one job per element) on a queue.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Unique among the steps: a DNS label.
    pub name: String,
    /// The queue that runs it: `q` (the workflow's namespace) or `ns/q`. Empty for a sub-run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub queue: String,
    /// Instead of a queue: the step is a run of this workflow (its own name only, in this
    /// version), with the step's input (the `forEach` element, else the run's input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Steps that must have finished (completed or skipped) before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// CEL over `input` and `steps`: the step runs only when it is true, else it is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// CEL over `input` and `steps` yielding a list: one job per element.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// Attempts of the step's job (at most the queue's `maxAttempts` apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Timeout of one attempt (`30s`, `5m`, `1h`), instead of the queue's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `onFailure`: a job run once when a step fails, before the run ends `Failed`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureHandler {
    /// The queue that runs it: `q` or `ns/q`.
    pub queue: String,
    /// Attempts of its job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Timeout of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// What one step came to, as a run's state keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    /// How it ended.
    pub outcome: StepOutcome,
    /// Its result as JSON (a result that is not JSON is a string); for `forEach`, the list of
    /// the elements' results in element order. `null` when skipped, failed or kept by reference.
    #[serde(default)]
    pub result: Value,
    /// Where a result larger than [`MAX_INLINE_RESULT`] is (its results subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<String>,
    /// The error of a failed step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the run spawned it (RFC 3339), if it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// When the run saw it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
}

/// The end of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StepOutcome {
    /// Its job (every job, for `forEach`) completed.
    Completed,
    /// Its `when` was false: it never ran.
    Skipped,
    /// Its job (one of them, for `forEach`) was dead-lettered or cancelled.
    Failed,
}

impl StepOutcome {
    /// The name CEL and `conveyor run show` use.
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Completed => "completed",
            StepOutcome::Skipped => "skipped",
            StepOutcome::Failed => "failed",
        }
    }
}

/// A problem [`validate`] found; its text names the step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Problem(pub String);

/// Checks what the CRD's schema cannot: unique names, known `dependsOn` and `output` steps,
/// no cycle (the message names it), CEL that compiles, step
/// timeouts that parse. Every problem is reported, in step order.
pub fn validate(definition: &Definition) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    if definition.steps.is_empty() {
        problems.push(Problem("a workflow needs at least one step".into()));
    }
    if definition.steps.len() > MAX_STEPS {
        problems.push(Problem(format!(
            "{} steps, at most {MAX_STEPS}",
            definition.steps.len()
        )));
    }
    for step in &definition.steps {
        if !is_dns_label(&step.name) {
            problems.push(Problem(format!(
                "step name {:?} is not a DNS label (lowercase letters, digits and '-', at most 63)",
                step.name
            )));
        }
        if !names.insert(step.name.as_str()) {
            problems.push(Problem(format!("step {:?} is declared twice", step.name)));
        }
    }
    for step in &definition.steps {
        let mut seen = BTreeSet::new();
        for dependency in &step.depends_on {
            if dependency == &step.name {
                problems.push(Problem(format!("step {:?} depends on itself", step.name)));
            } else if !names.contains(dependency.as_str()) {
                problems.push(Problem(format!(
                    "step {:?} depends on unknown step {dependency:?}",
                    step.name
                )));
            }
            if !seen.insert(dependency) {
                problems.push(Problem(format!(
                    "step {:?} names {dependency:?} twice in dependsOn",
                    step.name
                )));
            }
        }
        if step.queue.is_empty() == step.workflow.is_none() {
            problems.push(Problem(format!(
                "step {:?} needs exactly one of queue and workflow",
                step.name
            )));
        }
        for (field, expression) in [("when", &step.when), ("forEach", &step.for_each)] {
            if let Some(expression) = expression
                && let Err(error) = check_expression(expression)
            {
                problems.push(Problem(format!("step {:?}: {field}: {error}", step.name)));
            }
        }
        if let Some(timeout) = &step.timeout
            && crate::protocol::parse_duration(timeout).is_none()
        {
            problems.push(Problem(format!(
                "step {:?}: timeout {timeout:?} is not a duration like 30s, 5m or 1h",
                step.name
            )));
        }
    }
    if let Some(output) = &definition.output
        && !names.contains(output.as_str())
    {
        problems.push(Problem(format!("output names unknown step {output:?}")));
    }
    if let Some(cycle) = find_cycle(&definition.steps) {
        problems.push(Problem(format!(
            "dependsOn has a cycle: {}",
            cycle.join(" → ")
        )));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// A DNS label (RFC 1123): 1 to 63 lowercase letters, digits and `-`, starting and ending
/// with a letter or digit. Step and workflow names are, so that the ids of a run's jobs
/// (`<workflow>.<run>.<step>[.<i>]`) are each one run's.
pub fn is_dns_label(name: &str) -> bool {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|&c| ok(c) || c == b'-')
        && bytes.first().copied().is_some_and(ok)
        && bytes.last().copied().is_some_and(ok)
}

/// The first cycle of the `dependsOn` graph, as step names with the first repeated at the end.
fn find_cycle(steps: &[Step]) -> Option<Vec<String>> {
    let edges: HashMap<&str, &[String]> = steps
        .iter()
        .map(|s| (s.name.as_str(), s.depends_on.as_slice()))
        .collect();
    // 0 unvisited, 1 on the current path, 2 done.
    let mut mark: HashMap<&str, u8> = HashMap::new();
    let mut path: Vec<&str> = Vec::new();
    fn visit<'a>(
        node: &'a str,
        edges: &HashMap<&'a str, &'a [String]>,
        mark: &mut HashMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(node).copied().unwrap_or(0) {
            2 => return None,
            1 => {
                let start = path.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|n| n.to_string()).collect();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(node, 1);
        path.push(node);
        for next in edges.get(node).copied().unwrap_or_default() {
            if edges.contains_key(next.as_str())
                && let Some(cycle) = visit(next, edges, mark, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        mark.insert(node, 2);
        None
    }
    steps
        .iter()
        .find_map(|s| visit(&s.name, &edges, &mut mark, &mut path))
}

/// The CEL environment of `when` and `forEach`: the standard library and the string
/// extensions, as in Kubernetes' CRD rules.
fn env() -> &'static Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = cel::Env::stdlib();
        env.add_extension(cel::extensions::strings)
            .expect("the strings extension registers on the standard library");
        Arc::new(env)
    })
}

/// Compiles `expression`. Which variables it reads is not checked here: the names that
/// macros bind (`xs.map(x, …)`) are among its references too; an unknown one fails the run.
fn check_expression(expression: &str) -> Result<cel::Program, String> {
    if expression.len() > MAX_EXPRESSION {
        return Err(format!(
            "{} characters, at most {MAX_EXPRESSION}",
            expression.len()
        ));
    }
    let program = env()
        .compile(expression)
        .map_err(|e| format!("does not compile: {}", one_line(&e.to_string())))?;
    Ok(program)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// JSON to CEL (integers stay signed where they fit).
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => cel::Value::from(s.clone()),
        Value::Array(a) => cel::Value::from(a.iter().map(to_cel).collect::<Vec<_>>()),
        Value::Object(m) => {
            let map: HashMap<String, cel::Value> =
                m.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// CEL to JSON, for `forEach` elements; what JSON cannot hold is refused.
fn from_cel(value: &cel::Value) -> Result<Value, String> {
    Ok(match value {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Int(i) => Value::from(*i),
        cel::Value::UInt(u) => Value::from(*u),
        cel::Value::Float(f) => Value::from(*f),
        cel::Value::String(s) => Value::String(s.to_string()),
        cel::Value::List(items) => {
            Value::Array(items.iter().map(from_cel).collect::<Result<_, _>>()?)
        }
        cel::Value::Map(map) => {
            let mut object = serde_json::Map::new();
            for (key, value) in map.map.iter() {
                let key = match key {
                    cel::objects::Key::String(s) => s.to_string(),
                    cel::objects::Key::Int(i) => i.to_string(),
                    cel::objects::Key::Uint(u) => u.to_string(),
                    cel::objects::Key::Bool(b) => b.to_string(),
                };
                object.insert(key, from_cel(value)?);
            }
            Value::Object(object)
        }
        other => return Err(format!("a {} cannot be a job's element", other.type_of())),
    })
}

/// `steps` as CEL sees it: each finished step's `outcome` and `result`.
fn steps_value(records: &BTreeMap<String, StepRecord>) -> Value {
    Value::Object(
        records
            .iter()
            .map(|(name, record)| {
                (
                    name.clone(),
                    serde_json::json!({
                        "outcome": record.outcome.as_str(),
                        "result": record.result,
                    }),
                )
            })
            .collect(),
    )
}

fn evaluate(expression: &str, input: &Value, steps: &Value) -> Result<cel::Value, String> {
    let program = check_expression(expression)?;
    let mut context = cel::Context::with_env(Arc::clone(env()));
    context.add_variable_from_value("input", to_cel(input));
    context.add_variable_from_value("steps", to_cel(steps));
    program
        .execute(&context)
        .map_err(|e| one_line(&e.to_string()))
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Steps to start now, in declaration order.
    pub start: Vec<Start>,
    /// Steps whose `when` was false, in the order decided (each is recorded as skipped).
    pub skipped: Vec<String>,
    /// Every step is finished: the run is over.
    pub done: bool,
}

/// A step to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    /// The step's name.
    pub step: String,
    /// Its `forEach` elements, one job each; `None`: one job.
    pub items: Option<Vec<Value>>,
}

/// Why a run cannot go on (the run fails with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {step:?}: {problem}")]
pub struct PlanError {
    /// The step whose expression failed.
    pub step: String,
    /// What went wrong.
    pub problem: String,
}

/// Decides the next wave: every step not yet in `records` whose `dependsOn` are all finished
/// (completed or skipped) is started, unless its `when` is false — then it is skipped at once
/// and counted as finished, so the steps after it are considered in the same call. A `forEach`
/// step starts one job per element; an empty list completes it with `[]`. `done` when every
/// step has a record. Steps already started (`running`) are neither started nor finished.
///
/// Failed steps are the caller's to handle first (the run fails); `plan` treats them as
/// finished only so that it never loops.
pub fn plan(
    definition: &Definition,
    input: &Value,
    records: &mut BTreeMap<String, StepRecord>,
    running: &BTreeSet<String>,
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    loop {
        let mut progressed = false;
        for step in &definition.steps {
            let name = &step.name;
            if records.contains_key(name)
                || running.contains(name)
                || plan.start.iter().any(|s| &s.step == name)
            {
                continue;
            }
            if !step.depends_on.iter().all(|d| records.contains_key(d)) {
                continue;
            }
            let steps = steps_value(records);
            let fail = |problem: String| PlanError {
                step: name.clone(),
                problem,
            };
            if let Some(when) = &step.when {
                match evaluate(when, input, &steps).map_err(|e| fail(format!("when: {e}")))? {
                    cel::Value::Bool(true) => {}
                    cel::Value::Bool(false) => {
                        records.insert(name.clone(), record(StepOutcome::Skipped, Value::Null));
                        plan.skipped.push(name.clone());
                        progressed = true;
                        continue;
                    }
                    other => {
                        return Err(fail(format!(
                            "when: yielded a {}, not a bool",
                            other.type_of()
                        )));
                    }
                }
            }
            let items = match &step.for_each {
                None => None,
                Some(for_each) => {
                    let value = evaluate(for_each, input, &steps)
                        .map_err(|e| fail(format!("forEach: {e}")))?;
                    let cel::Value::List(items) = &value else {
                        return Err(fail(format!(
                            "forEach: yielded a {}, not a list",
                            value.type_of()
                        )));
                    };
                    if items.len() > MAX_FOR_EACH {
                        return Err(fail(format!(
                            "forEach: {} elements, at most {MAX_FOR_EACH}",
                            items.len()
                        )));
                    }
                    let items: Vec<Value> = items
                        .iter()
                        .map(from_cel)
                        .collect::<Result<_, _>>()
                        .map_err(|e| fail(format!("forEach: {e}")))?;
                    if items.is_empty() {
                        records.insert(
                            name.clone(),
                            record(StepOutcome::Completed, Value::Array(Vec::new())),
                        );
                        progressed = true;
                        continue;
                    }
                    Some(items)
                }
            };
            plan.start.push(Start {
                step: name.clone(),
                items,
            });
        }
        if !progressed {
            break;
        }
    }
    plan.start.sort_by_key(|s| {
        definition
            .steps
            .iter()
            .position(|d| d.name == s.step)
            .unwrap_or(usize::MAX)
    });
    plan.done = plan.start.is_empty()
        && running.is_empty()
        && definition
            .steps
            .iter()
            .all(|s| records.contains_key(&s.name));
    Ok(plan)
}

fn record(outcome: StepOutcome, result: Value) -> StepRecord {
    StepRecord {
        outcome,
        result,
        result_ref: None,
        error: None,
        started: None,
        finished: None,
    }
}

/// The step whose result is the run's: `output`, else the last declared.
pub fn output_step(definition: &Definition) -> Option<&str> {
    definition
        .output
        .as_deref()
        .or_else(|| definition.steps.last().map(|s| s.name.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(name: &str, queue: &str, after: &[&str]) -> Step {
        Step {
            name: name.into(),
            queue: queue.into(),
            depends_on: after.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The seeds' workflow: two fetches in parallel (Twitter only when linked), then the
    /// aggregate; notify on failure.
    fn seeds() -> Definition {
        let mut twitter = step("fetch-twitter", "twitter", &[]);
        twitter.when = Some("input.twitter != ''".into());
        Definition {
            steps: vec![
                twitter,
                step("fetch-facebook", "facebook", &[]),
                step(
                    "aggregate",
                    "aggregate",
                    &["fetch-twitter", "fetch-facebook"],
                ),
            ],
            on_failure: Some(FailureHandler {
                queue: "notify".into(),
                ..Default::default()
            }),
            output: None,
        }
    }

    fn problems(definition: &Definition) -> Vec<String> {
        validate(definition)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.0)
            .collect()
    }

    fn done(result: Value) -> StepRecord {
        record(StepOutcome::Completed, result)
    }

    #[test]
    fn the_seeds_workflow_is_valid() {
        assert_eq!(validate(&seeds()), Ok(()));
    }

    #[test]
    fn a_cycle_is_named() {
        let definition = Definition {
            steps: vec![
                step("a", "q", &["c"]),
                step("b", "q", &["a"]),
                step("c", "q", &["b"]),
                step("d", "q", &[]),
            ],
            on_failure: None,
            output: None,
        };
        assert_eq!(
            problems(&definition),
            ["dependsOn has a cycle: a → c → b → a"]
        );
    }

    #[test]
    fn unknown_twice_and_self_dependencies_are_named() {
        let definition = Definition {
            steps: vec![
                step("a", "q", &["nope"]),
                step("b", "q", &["b"]),
                step("c", "q", &["a", "a"]),
                step("a", "q", &[]),
            ],
            on_failure: None,
            output: Some("zzz".into()),
        };
        let found = problems(&definition);
        assert!(
            found.contains(&"step \"a\" depends on unknown step \"nope\"".to_string()),
            "{found:?}"
        );
        assert!(found.contains(&"step \"b\" depends on itself".to_string()));
        assert!(found.contains(&"step \"c\" names \"a\" twice in dependsOn".to_string()));
        assert!(found.contains(&"step \"a\" is declared twice".to_string()));
        assert!(found.contains(&"output names unknown step \"zzz\"".to_string()));
    }

    #[test]
    fn bad_cel_and_bad_timeouts_are_refused() {
        let mut a = step("a", "q", &[]);
        a.when = Some("input.x ==".into());
        let mut b = step("b", "q", &[]);
        b.for_each = Some("input.items.map(i, )".into());
        let mut c = step("c", "q", &[]);
        c.timeout = Some("soon".into());
        let definition = Definition {
            steps: vec![a, b, c],
            on_failure: None,
            output: None,
        };
        let found = problems(&definition);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("step \"a\": when: does not compile"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("step \"b\": forEach: does not compile"),
            "{found:?}"
        );
        assert!(found[2].contains("timeout \"soon\""), "{found:?}");
    }

    #[test]
    fn a_step_has_a_queue_or_a_workflow() {
        let mut both = step("a", "q", &[]);
        both.workflow = Some("tree".into());
        let neither = step("b", "", &[]);
        let definition = Definition {
            steps: vec![both, neither],
            on_failure: None,
            output: None,
        };
        assert_eq!(
            problems(&definition),
            [
                "step \"a\" needs exactly one of queue and workflow",
                "step \"b\" needs exactly one of queue and workflow"
            ]
        );
    }

    #[test]
    fn step_names_are_dns_labels() {
        let definition = Definition {
            steps: vec![step("a.b", "q", &[]), step("ok-1", "q", &[])],
            on_failure: None,
            output: None,
        };
        assert_eq!(
            problems(&definition),
            [
                "step name \"a.b\" is not a DNS label (lowercase letters, digits and '-', at most 63)"
            ]
        );
        assert!(is_dns_label("a") && is_dns_label("0") && is_dns_label("fetch-twitter"));
        assert!(!is_dns_label("") && !is_dns_label("-a") && !is_dns_label("A"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn an_empty_workflow_is_refused() {
        let definition = Definition {
            steps: vec![],
            on_failure: None,
            output: None,
        };
        assert_eq!(
            problems(&definition),
            ["a workflow needs at least one step"]
        );
    }

    #[test]
    fn both_fetches_start_then_the_aggregate() {
        let definition = seeds();
        let input = json!({"twitter": "@ann", "facebook": "ann"});
        let mut records = BTreeMap::new();
        let first = plan(&definition, &input, &mut records, &BTreeSet::new()).unwrap();
        let started: Vec<_> = first.start.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(started, ["fetch-twitter", "fetch-facebook"]);
        assert!(first.skipped.is_empty() && !first.done);

        // One fetch finished, the other still running: nothing new starts.
        records.insert("fetch-facebook".into(), done(json!("posts")));
        let running = BTreeSet::from(["fetch-twitter".to_string()]);
        let waiting = plan(&definition, &input, &mut records, &running).unwrap();
        assert_eq!(waiting, Plan::default());

        records.insert("fetch-twitter".into(), done(json!("tweets")));
        let second = plan(&definition, &input, &mut records, &BTreeSet::new()).unwrap();
        assert_eq!(
            second.start,
            [Start {
                step: "aggregate".into(),
                items: None
            }]
        );
        records.insert("aggregate".into(), done(json!(2)));
        let last = plan(&definition, &input, &mut records, &BTreeSet::new()).unwrap();
        assert!(last.done && last.start.is_empty());
        assert_eq!(output_step(&definition), Some("aggregate"));
    }

    #[test]
    fn an_unlinked_network_is_skipped_and_its_dependents_still_run() {
        let definition = seeds();
        let input = json!({"twitter": "", "facebook": "ann"});
        let mut records = BTreeMap::new();
        let first = plan(&definition, &input, &mut records, &BTreeSet::new()).unwrap();
        assert_eq!(first.skipped, ["fetch-twitter"]);
        let started: Vec<_> = first.start.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(started, ["fetch-facebook"]);
        assert_eq!(records["fetch-twitter"].outcome, StepOutcome::Skipped);
    }

    #[test]
    fn when_reads_earlier_results_and_skips_cascade_in_one_plan() {
        let mut check = step("check", "q", &["fetch"]);
        check.when = Some("steps.fetch.result.count > 10".into());
        let mut report = step("report", "q", &["check"]);
        report.when = Some("steps.check.outcome == 'completed'".into());
        let definition = Definition {
            steps: vec![
                step("fetch", "q", &[]),
                check,
                report,
                step("end", "q", &["report"]),
            ],
            on_failure: None,
            output: None,
        };
        let mut records = BTreeMap::from([("fetch".to_string(), done(json!({"count": 3})))]);
        let next = plan(&definition, &json!({}), &mut records, &BTreeSet::new()).unwrap();
        assert_eq!(next.skipped, ["check", "report"]);
        assert_eq!(
            next.start
                .iter()
                .map(|s| s.step.as_str())
                .collect::<Vec<_>>(),
            ["end"]
        );
    }

    #[test]
    fn for_each_fans_out_over_a_list_and_refuses_anything_else() {
        let mut each = step("each", "q", &[]);
        each.for_each = Some("input.users.map(u, {'user': u})".into());
        let definition = Definition {
            steps: vec![each],
            on_failure: None,
            output: None,
        };
        let mut records = BTreeMap::new();
        let input = json!({"users": ["ann", "bob"]});
        let next = plan(&definition, &input, &mut records, &BTreeSet::new()).unwrap();
        assert_eq!(
            next.start[0].items,
            Some(vec![json!({"user": "ann"}), json!({"user": "bob"})])
        );

        let error = plan(
            &definition,
            &json!({"users": "ann"}),
            &mut BTreeMap::new(),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(error.step, "each");
        assert!(error.problem.starts_with("forEach:"), "{error}");

        let mut not_a_list = definition.clone();
        not_a_list.steps[0].for_each = Some("input.users.size()".into());
        let error = plan(&not_a_list, &input, &mut BTreeMap::new(), &BTreeSet::new()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "step \"each\": forEach: yielded a int, not a list"
        );

        let empty = plan(
            &definition,
            &json!({"users": []}),
            &mut records,
            &BTreeSet::new(),
        )
        .unwrap();
        assert!(empty.done, "an empty fan-out completes the step");
        assert_eq!(records["each"].result, json!([]));
    }

    #[test]
    fn a_when_that_is_not_a_bool_fails_the_run() {
        let mut a = step("a", "q", &[]);
        a.when = Some("input.flag".into());
        let definition = Definition {
            steps: vec![a],
            on_failure: None,
            output: None,
        };
        let error = plan(
            &definition,
            &json!({"flag": "yes"}),
            &mut BTreeMap::new(),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "step \"a\": when: yielded a string, not a bool"
        );
    }

    #[test]
    fn the_definition_reads_the_resource_json() {
        let spec = json!({
            "steps": [
                {"name": "a", "queue": "ns/q", "maxAttempts": 2, "timeout": "30s"},
                {"name": "b", "queue": "q", "dependsOn": ["a"], "forEach": "input.xs"}
            ],
            "onFailure": {"queue": "notify"},
            "output": "a"
        });
        let definition: Definition = serde_json::from_value(spec.clone()).unwrap();
        assert_eq!(definition.steps[1].depends_on, ["a"]);
        assert_eq!(serde_json::to_value(&definition).unwrap(), spec);
    }
}
