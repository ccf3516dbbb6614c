//! Headers of jobs that wait for jobs: dependencies (`Conveyor-After`), children
//! (`Conveyor-Parent`) and continuations (`Conveyor-Children`, `Conveyor-Continues`). Every
//! value is decoded totally here, with typed errors; `docs/protocol.md`, "Dependencies and
//! children", is the prose version.

use std::time::Duration;

use async_nats::HeaderMap;

use super::{HeaderError, InvalidId, validate_id};

/// The jobs a job waits for: `ref[;if-failed=run|fail][;optional], ...` (see [`Dependency`]).
pub const AFTER: &str = "Conveyor-After";
/// A child job's parent: `<namespace>/<queue>/<id>`. When the child finishes for good its
/// worker records it in the parent queue's flow stream.
pub const PARENT: &str = "Conveyor-Parent";
/// A continuation's children: `<namespace>/<queue>/<id>;<n>`, the job that spawned them (the
/// one that returned the continuation) and how many it spawned.
pub const CHILDREN: &str = "Conveyor-Children";
/// The job a continuation finishes for: `<namespace>/<queue>/<id>`. Its outcome is stored as
/// that job's outcome too (for dependents, a grandparent and awaiting producers).
pub const CONTINUES: &str = "Conveyor-Continues";
/// How long a waiting job may wait at most, shorter than the queue's `waitTimeout` (e.g. `1h`).
pub const WAIT_TIMEOUT: &str = "Conveyor-Wait-Timeout";
/// Set by the releaser on a released job whose `if-failed=run` dependencies failed: their
/// references, comma-separated.
pub const FAILED_DEPENDENCIES: &str = "Conveyor-Failed-Dependencies";
/// Set by the releaser on a released job whose optional dependencies were skipped.
pub const SKIPPED_DEPENDENCIES: &str = "Conveyor-Skipped-Dependencies";
/// On a child record: the child's full reference.
pub const CHILD: &str = "Conveyor-Child";
/// Stored by the releaser on a waiting job's own subject (a copy of it, compare-and-set on its
/// sequence) before it carries out what it decided: `release`, or the dead-letter reason
/// (`dependency_failed`, `dependency_timeout`). One decision per waiting job wins; whoever
/// reads a decided copy carries that decision out.
pub const DECIDED: &str = "Conveyor-Decided";
/// With [`DECIDED`] naming a dead-letter reason: the error.
pub const DECIDED_ERROR: &str = "Conveyor-Decided-Error";
/// On a cancellation (`cancel.<hex id>`), value `true`: the job's children are cancelled too,
/// and theirs. A worker skips a job one of whose ancestors (its `Conveyor-Parent`, that job's
/// parent as its waiting continuation names it, and so on) has such a cancellation; the walk
/// stops at an ancestor without a waiting continuation (docs/protocol.md, "Cancel").
pub const CANCEL_CHILDREN: &str = "Conveyor-Cancel-Children";
/// On a child record whose result was too large to copy: the results subject that keeps it.
pub const RESULT_REF: &str = "Conveyor-Result-Ref";

/// Most dependencies one job may have.
pub const MAX_DEPENDENCIES: usize = 64;
/// Largest result copied into a child record or handed to a dependent inline; a larger one is
/// passed by reference to the results stream.
pub const MAX_INLINE_RESULT: usize = 64 * 1024;

/// Whether a cancellation's headers cancel the job's children too: [`CANCEL_CHILDREN`] is
/// exactly `true` (any other value, or none, cancels the job alone).
pub fn cancels_children(headers: &HeaderMap) -> bool {
    headers
        .get(CANCEL_CHILDREN)
        .is_some_and(|value| value.as_str() == "true")
}

/// A job anywhere on the server: namespace, queue and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobRef {
    /// Namespace of the queue.
    pub namespace: String,
    /// Name of the queue.
    pub queue: String,
    /// Job id.
    pub id: String,
}

impl JobRef {
    /// A reference from its parts.
    pub fn new(
        namespace: impl Into<String>,
        queue: impl Into<String>,
        id: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            queue: queue.into(),
            id: id.into(),
        }
    }

    /// The queue it belongs to.
    pub fn queue_ref(&self) -> crate::names::QueueRef {
        crate::names::QueueRef::new(&self.namespace, &self.queue)
    }

    /// Reads `id`, `queue/id` or `namespace/queue/id`, the missing parts taken from `home`
    /// (the namespace and queue of the job that names it). An id with `/` in it must be
    /// written in full (`namespace/queue/id`: the third part takes the rest).
    pub fn parse(text: &str, home: (&str, &str)) -> Result<Self, BadRef> {
        let text = text.trim();
        let parts: Vec<&str> = text.splitn(3, '/').collect();
        let (namespace, queue, id) = match parts.as_slice() {
            [id] => (home.0, home.1, *id),
            [queue, id] => (home.0, *queue, *id),
            [namespace, queue, id] => (*namespace, *queue, *id),
            _ => return Err(BadRef::Empty),
        };
        if namespace.is_empty() || queue.is_empty() {
            return Err(BadRef::EmptyQueue(text.to_owned()));
        }
        // Kubernetes names: lowercase letters, digits, `-` and `.`.
        let k8s = |s: &str| {
            s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        if !k8s(namespace) || !k8s(queue) {
            return Err(BadRef::BadQueue(super::envelope::shown(text)));
        }
        validate_id(id).map_err(BadRef::Id)?;
        if id.contains([',', ';']) {
            return Err(BadRef::Separator(id.to_owned()));
        }
        Ok(Self::new(namespace, queue, id))
    }
}

/// The `Conveyor-Children` value of a continuation of `spawner`, which spawned `count` children.
pub fn encode_children(spawner: &JobRef, count: u64) -> String {
    format!("{spawner};{count}")
}

impl std::fmt::Display for JobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.queue, self.id)
    }
}

/// A job reference that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRef {
    /// Nothing was given.
    #[error("a job reference is empty")]
    Empty,
    /// `/id` or `ns//id`.
    #[error("job reference {0:?} names an empty namespace or queue")]
    EmptyQueue(String),
    /// The namespace or queue is no Kubernetes name.
    #[error("job reference {0:?} names a namespace or queue that is not a Kubernetes name")]
    BadQueue(String),
    /// The id is not a valid job id.
    #[error("job reference: {0}")]
    Id(InvalidId),
    /// The id contains `,` or `;`, which separate dependencies.
    #[error("job id {0:?} contains ',' or ';', so it cannot be named as a dependency")]
    Separator(String),
}

/// What a dependency's failure means for the job that waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IfFailed {
    /// The dependent fails too: it is dead-lettered with reason `dependency_failed`.
    #[default]
    Fail,
    /// The dependent runs anyway and is told which dependencies failed.
    Run,
}

/// One job a job waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// The job waited for.
    pub job: JobRef,
    /// What its failure (dead-lettered, or cancelled when not optional) means.
    pub if_failed: IfFailed,
    /// A skipped (cancelled) optional dependency counts as done.
    pub optional: bool,
}

impl Dependency {
    /// A dependency on `job` that fails the dependent when it fails.
    pub fn on(job: JobRef) -> Self {
        Self {
            job,
            if_failed: IfFailed::Fail,
            optional: false,
        }
    }

    /// The dependent runs even when this dependency fails.
    pub fn run_if_failed(mut self) -> Self {
        self.if_failed = IfFailed::Run;
        self
    }

    /// The dependency may be skipped ([`crate::Client::skip`]).
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    fn encode(&self) -> String {
        let mut text = self.job.to_string();
        if self.if_failed == IfFailed::Run {
            text.push_str(";if-failed=run");
        }
        if self.optional {
            text.push_str(";optional");
        }
        text
    }
}

/// A `Conveyor-After` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAfter {
    /// A reference in it is bad.
    #[error(transparent)]
    Ref(#[from] BadRef),
    /// An option other than `if-failed=run`, `if-failed=fail` or `optional`.
    #[error("unknown dependency option {0:?}; known: if-failed=run, if-failed=fail, optional")]
    Option(String),
    /// More than [`MAX_DEPENDENCIES`].
    #[error("{0} dependencies; a job may have at most {MAX_DEPENDENCIES}")]
    TooMany(usize),
    /// The list is empty.
    #[error("the dependency list is empty")]
    Empty,
    /// The same job named twice.
    #[error("dependency {0} is named twice")]
    Twice(String),
    /// A job that waits for itself would never run.
    #[error("job {0} cannot depend on itself")]
    OnItself(String),
}

/// The `Conveyor-After` value of `dependencies` (checked: see [`check_after`]).
pub fn encode_after(dependencies: &[Dependency]) -> String {
    dependencies
        .iter()
        .map(Dependency::encode)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a dependency list of job `me`: 1 to [`MAX_DEPENDENCIES`], none twice, not on itself.
pub fn check_after(me: &JobRef, dependencies: &[Dependency]) -> Result<(), BadAfter> {
    if dependencies.is_empty() {
        return Err(BadAfter::Empty);
    }
    if dependencies.len() > MAX_DEPENDENCIES {
        return Err(BadAfter::TooMany(dependencies.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for dependency in dependencies {
        if dependency.job == *me {
            return Err(BadAfter::OnItself(me.to_string()));
        }
        if !seen.insert(&dependency.job) {
            return Err(BadAfter::Twice(dependency.job.to_string()));
        }
    }
    Ok(())
}

/// Reads a `Conveyor-After` value of a job of queue `home` (namespace, queue).
pub fn parse_after(value: &str, home: (&str, &str)) -> Result<Vec<Dependency>, BadAfter> {
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.len() > MAX_DEPENDENCIES {
        return Err(BadAfter::TooMany(items.len()));
    }
    let mut dependencies = Vec::with_capacity(items.len());
    for item in items {
        let mut parts = item.split(';').map(str::trim);
        let job = JobRef::parse(parts.next().unwrap_or_default(), home)?;
        let mut dependency = Dependency::on(job);
        for option in parts {
            match option {
                "if-failed=run" => dependency.if_failed = IfFailed::Run,
                "if-failed=fail" => dependency.if_failed = IfFailed::Fail,
                "optional" => dependency.optional = true,
                other => return Err(BadAfter::Option(super::envelope::shown(other))),
            }
        }
        dependencies.push(dependency);
    }
    if dependencies.is_empty() {
        return Err(BadAfter::Empty);
    }
    Ok(dependencies)
}

/// The flow headers of a stored job, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowHeaders {
    /// `Conveyor-After`.
    pub after: Vec<Dependency>,
    /// `Conveyor-Parent`.
    pub parent: Option<JobRef>,
    /// `Conveyor-Children`: the job that spawned the children and how many (a continuation).
    pub children: Option<(JobRef, u64)>,
    /// `Conveyor-Continues`.
    pub continues: Option<JobRef>,
    /// `Conveyor-Wait-Timeout`.
    pub wait_timeout: Option<Duration>,
}

impl FlowHeaders {
    /// Decodes the flow headers of a job of queue `home`; any malformed value is an error
    /// naming its header.
    pub fn parse(headers: &HeaderMap, home: (&str, &str)) -> Result<Self, HeaderError> {
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        let reference = |name: &'static str| -> Result<Option<JobRef>, HeaderError> {
            match get(name) {
                None => Ok(None),
                Some(value) => JobRef::parse(&value, home).map(Some).map_err(|_| {
                    HeaderError::new(name, &value, "is not a job reference namespace/queue/id")
                }),
            }
        };
        let after = match get(AFTER) {
            None => Vec::new(),
            Some(value) => parse_after(&value, home).map_err(|_| {
                HeaderError::new(
                    AFTER,
                    &value,
                    "is not a list of 1 to 64 job references with options if-failed=run|fail, optional",
                )
            })?,
        };
        let children = match get(CHILDREN) {
            None => None,
            Some(value) => {
                let bad = || {
                    HeaderError::new(CHILDREN, &value, "is not <namespace>/<queue>/<id>;<count>")
                };
                let (spawner, count) = value.rsplit_once(';').ok_or_else(bad)?;
                let spawner = JobRef::parse(spawner, home).map_err(|_| bad())?;
                let count = count.trim().parse::<u64>().map_err(|_| bad())?;
                Some((spawner, count))
            }
        };
        let wait_timeout = match get(WAIT_TIMEOUT) {
            None => None,
            Some(value) => Some(super::parse_duration(&value).ok_or_else(|| {
                HeaderError::new(
                    WAIT_TIMEOUT,
                    &value,
                    "is not a duration like 30s, 5m or 24h",
                )
            })?),
        };
        Ok(Self {
            after,
            parent: reference(PARENT)?,
            children,
            continues: reference(CONTINUES)?,
            wait_timeout,
        })
    }

    /// The id a producer awaiting job `id` is answered in the name of: the job this
    /// continuation continues (`Conveyor-Continues`), else `id` itself.
    pub fn answered_id<'a>(&'a self, id: &'a str) -> &'a str {
        self.continues.as_ref().map_or(id, |c| c.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_true_cancels_children() {
        let with = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(CANCEL_CHILDREN, value);
            }
            cancels_children(&headers)
        };
        assert!(with(Some("true")));
        for value in [
            None,
            Some(""),
            Some("True"),
            Some("yes"),
            Some("1"),
            Some("true "),
        ] {
            assert!(!with(value), "{value:?} is a plain cancellation");
        }
        assert!(cancels_children(&crate::protocol::cancellation("p", true)));
        assert!(!cancels_children(&crate::protocol::cancellation(
            "p", false
        )));
    }

    const HOME: (&str, &str) = ("ns", "q");

    #[test]
    fn references_take_what_is_missing_from_home() {
        assert_eq!(
            JobRef::parse("a", HOME).unwrap(),
            JobRef::new("ns", "q", "a")
        );
        assert_eq!(
            JobRef::parse("q2/a", HOME).unwrap(),
            JobRef::new("ns", "q2", "a")
        );
        assert_eq!(
            JobRef::parse("n2/q2/a/b", HOME).unwrap(),
            JobRef::new("n2", "q2", "a/b"),
            "the third part takes the rest"
        );
        assert_eq!(JobRef::parse("", HOME), Err(BadRef::Id(InvalidId::Empty)));
        assert!(matches!(
            JobRef::parse("/a", HOME),
            Err(BadRef::EmptyQueue(_))
        ));
        assert!(matches!(
            JobRef::parse("Q/a", HOME),
            Err(BadRef::BadQueue(_))
        ));
        assert!(matches!(
            JobRef::parse("a;b", HOME),
            Err(BadRef::Separator(_))
        ));
        assert!(matches!(JobRef::parse("a b", HOME), Err(BadRef::Id(_))));
    }

    #[test]
    fn dependency_lists_round_trip() {
        let deps = vec![
            Dependency::on(JobRef::new("ns", "q", "a")).run_if_failed(),
            Dependency::on(JobRef::new("ns", "q2", "b")),
            Dependency::on(JobRef::new("n3", "q3", "c")).optional(),
        ];
        let text = encode_after(&deps);
        assert_eq!(text, "ns/q/a;if-failed=run, ns/q2/b, n3/q3/c;optional");
        assert_eq!(parse_after(&text, HOME).unwrap(), deps);
        assert_eq!(
            parse_after("a; if-failed=fail ,q2/b;optional", HOME).unwrap(),
            vec![
                Dependency::on(JobRef::new("ns", "q", "a")),
                Dependency::on(JobRef::new("ns", "q2", "b")).optional()
            ]
        );
    }

    #[test]
    fn bad_dependency_lists_are_refused() {
        assert!(matches!(
            parse_after("a;later", HOME),
            Err(BadAfter::Option(_))
        ));
        assert!(matches!(parse_after("", HOME), Err(BadAfter::Ref(_))));
        assert!(matches!(parse_after("a,,b", HOME), Err(BadAfter::Ref(_))));
        let many = (0..65)
            .map(|i| format!("j{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_after(&many, HOME), Err(BadAfter::TooMany(65)));
        let me = JobRef::new("ns", "q", "me");
        assert_eq!(
            check_after(&me, &[Dependency::on(me.clone())]),
            Err(BadAfter::OnItself("ns/q/me".into()))
        );
        let a = Dependency::on(JobRef::new("ns", "q", "a"));
        assert!(matches!(
            check_after(&me, &[a.clone(), a]),
            Err(BadAfter::Twice(_))
        ));
        assert_eq!(check_after(&me, &[]), Err(BadAfter::Empty));
    }

    #[test]
    fn a_continuation_answers_in_the_name_of_the_job_it_continues() {
        let mut flow = FlowHeaders::default();
        assert_eq!(flow.answered_id("k"), "k");
        flow.continues = Some(JobRef::new("ns", "q", "root"));
        assert_eq!(flow.answered_id("k"), "root");
    }

    #[test]
    fn flow_headers_decode_totally() {
        let mut headers = HeaderMap::new();
        headers.insert(AFTER, "a, q2/b;optional");
        headers.insert(PARENT, "ns/p/root");
        headers.insert(CHILDREN, "ns/p/root;100");
        headers.insert(WAIT_TIMEOUT, "1h");
        let flow = FlowHeaders::parse(&headers, HOME).unwrap();
        assert_eq!(flow.after.len(), 2);
        assert_eq!(flow.parent, Some(JobRef::new("ns", "p", "root")));
        assert_eq!(flow.children, Some((JobRef::new("ns", "p", "root"), 100)));
        assert_eq!(flow.wait_timeout, Some(Duration::from_secs(3600)));
        for (name, value) in [
            (AFTER, "a;soon"),
            (PARENT, "ns//x"),
            (CHILDREN, "ns/p/root;-1"),
            (CHILDREN, "100"),
            (WAIT_TIMEOUT, "forever"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, value);
            let err = FlowHeaders::parse(&headers, HOME).unwrap_err();
            assert_eq!(err.header, name);
        }
        assert_eq!(
            FlowHeaders::parse(&HeaderMap::new(), HOME).unwrap(),
            FlowHeaders::default()
        );
    }
}
