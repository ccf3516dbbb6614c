//! The object store of the API server: JSON objects keyed by group/resource, namespace and name,
//! with one global resourceVersion counter, optimistic concurrency, generation tracking,
//! finalizers, graceful pod deletion, owner-reference garbage collection, namespace deletion and
//! a bounded history of watch events so that a watch can resume from a resourceVersion.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;

/// Storage key of a resource: API group and plural resource name (all versions share storage).
pub type Gr = (String, String);

/// How many watch events are kept for resuming watches; older resourceVersions get 410 Gone.
const HISTORY: usize = 5_000;

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created (or entered the watched set).
    Added,
    /// The object changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED`, `MODIFIED`, `DELETED`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change of one object.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Which resource.
    pub gr: Gr,
    /// Namespace (`""` for cluster-scoped).
    pub namespace: String,
    /// Added, modified or deleted.
    pub kind: EventType,
    /// The object after the change (for deletions: the last state).
    pub object: Value,
    /// The object before a modification, so that filtered watches can synthesize ADDED/DELETED.
    pub old: Option<Value>,
}

/// Per-resource behaviour the store needs to know.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// The resource lives in namespaces.
    pub namespaced: bool,
    /// Status is a subresource: main writes keep the stored status, `/status` writes change only status.
    pub status: bool,
    /// `metadata.generation` is maintained (bumped when anything but metadata and status changes).
    pub generation: bool,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// The main resource.
    Main,
    /// The `/status` subresource.
    Status,
}

/// How an update is applied.
#[derive(Debug, Clone, Copy)]
pub struct WriteOpts {
    /// Main resource or `/status`.
    pub sub: Sub,
    /// The resource's rules.
    pub rules: Rules,
    /// `dryRun=All`: validate and compute, store nothing.
    pub dry_run: bool,
}

/// A started watch: what to send first, and the receiver of all later events (the caller
/// filters by resource, namespace and selectors).
#[derive(Debug)]
pub struct WatchStart {
    /// Events to send before the live ones.
    pub initial: Vec<Arc<WatchEvent>>,
    /// The resourceVersion the initial events bring the watcher to.
    pub rv: u64,
    /// Live events newer than `rv` (and possibly some older ones, to skip).
    pub rx: broadcast::Receiver<Arc<WatchEvent>>,
}

/// Cascading deletion policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Dependents are deleted after the owner is gone.
    Background,
    /// The owner stays (with the `foregroundDeletion` finalizer) until its dependents are gone.
    Foreground,
    /// Dependents lose their owner reference and stay.
    Orphan,
}

/// Options of a delete.
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    /// `propagationPolicy`; `None` means background.
    pub propagation: Option<Propagation>,
    /// `gracePeriodSeconds`; only pods bound to a node use it.
    pub grace: Option<i64>,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub rv: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
}

/// Result of a list.
#[derive(Debug, Clone)]
pub struct ListResult {
    /// The matching objects of this page.
    pub items: Vec<Value>,
    /// resourceVersion of the list.
    pub rv: u64,
    /// Continue token when more items follow.
    pub continue_token: Option<String>,
    /// How many matching items follow this page.
    pub remaining: Option<usize>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
pub enum WatchFrom {
    /// Send every current object as ADDED first.
    Now,
    /// Replay history newer than this resourceVersion.
    Rv(u64),
}

/// The in-memory object store. Cheap to share behind an `Arc`.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<WatchEvent>>,
}

type Key = (String, String);

#[derive(Default)]
struct Inner {
    history_cap: usize,
    rv: u64,
    objects: BTreeMap<Gr, BTreeMap<Key, Value>>,
    uids: HashMap<String, (Gr, Key)>,
    /// Objects with a deletionTimestamp, so that `settle` does not scan the whole store.
    deleting: std::collections::BTreeSet<(Gr, Key)>,
    history: VecDeque<Arc<WatchEvent>>,
    pending: Vec<Arc<WatchEvent>>,
}

/// The current time in the RFC 3339 form Kubernetes uses (`2006-01-02T15:04:05Z`).
pub fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What `generation` tracks: everything but metadata, and but status when status is a
/// subresource (without one, a custom resource's status changes bump the generation too).
fn spec_part(obj: &Value, status_is_subresource: bool) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        if status_is_subresource {
            m.remove("status");
        }
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// Kubernetes' name rules: RFC 1123 labels for namespaces and services, subdomains otherwise.
fn invalid_name(gr: &Gr, name: &str) -> Option<crate::error::Cause> {
    let label = gr.0.is_empty() && matches!(gr.1.as_str(), "namespaces" | "services");
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    let (ok, message) = if label {
        (
            name.len() <= 63 && part_ok(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        )
    } else {
        (
            name.len() <= 253 && name.split('.').all(part_ok),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        )
    };
    (!ok).then(|| crate::error::Cause {
        reason: "FieldValueInvalid".into(),
        field: "metadata.name".into(),
        message: format!("Invalid value: {name:?}: {message}"),
    })
}

/// Most bytes of `metadata.annotations` (keys plus values) the API server stores on any object.
pub const ANNOTATIONS_LIMIT: usize = 256 * 1024;

/// Kubernetes' total annotation size check (`ValidateAnnotationsSize`), on every create and
/// update of every kind. `kubectl apply` (client side) trips it with a large object, because it
/// keeps the whole applied object in `kubectl.kubernetes.io/last-applied-configuration`.
fn annotations_too_long(obj: &Value) -> Option<crate::error::Cause> {
    let total: usize = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)?
        .iter()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    (total > ANNOTATIONS_LIMIT).then(|| crate::error::Cause {
        reason: "FieldValueTooLong".into(),
        field: "metadata.annotations".into(),
        message: format!("Too long: may not be more than {ANNOTATIONS_LIMIT} bytes"),
    })
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

const NS: (&str, &str) = ("", "namespaces");

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_history(HISTORY)
    }

    /// An empty store that keeps the last `events` watch events for resuming watches.
    pub fn with_history(events: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            inner: Mutex::new(Inner {
                history_cap: events,
                ..Inner::default()
            }),
            tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the events a write produced; called with the lock held so order is global.
    fn flush(&self, inner: &mut Inner) {
        for ev in inner.pending.drain(..) {
            let _ = self.tx.send(ev);
        }
    }

    /// The newest resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, gr: &Gr, ns: &str, name: &str) -> Result<Value, ApiError> {
        let inner = self.lock();
        inner
            .objects
            .get(gr)
            .and_then(|m| m.get(&(ns.to_owned(), name.to_owned())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&gr.0, &gr.1, name))
    }

    /// Objects of a resource, in one namespace or all, filtered, paginated by `limit`/`continue`.
    pub fn list(
        &self,
        gr: &Gr,
        ns: Option<&str>,
        filter: &dyn Fn(&Value) -> bool,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListResult, ApiError> {
        let inner = self.lock();
        let start = match continue_token {
            Some(t) if !t.is_empty() => Some(decode_continue(t)?),
            _ => None,
        };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining = 0usize;
        if let Some(objs) = inner.objects.get(gr) {
            for (key, obj) in objs {
                if ns.is_some_and(|n| n != key.0) {
                    continue;
                }
                if start.as_ref().is_some_and(|s| key <= s) {
                    continue;
                }
                if !filter(obj) {
                    continue;
                }
                if limit.is_some_and(|l| items.len() >= l) {
                    remaining += 1;
                    continue;
                }
                last_key = Some(key.clone());
                items.push(obj.clone());
            }
        }
        let continue_token = (remaining > 0)
            .then(|| encode_continue(last_key.as_ref().expect("a page before more")));
        Ok(ListResult {
            items,
            rv: inner.rv,
            continue_token,
            remaining: (remaining > 0).then_some(remaining),
        })
    }

    /// Creates an object. Fills name (from `generateName`), uid, creationTimestamp,
    /// resourceVersion and generation. The caller drops a status the client may not set.
    pub fn create(
        &self,
        gr: &Gr,
        ns: &str,
        mut obj: Value,
        rules: Rules,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        if rules.namespaced {
            match inner
                .objects
                .get(&(NS.0.to_owned(), NS.1.to_owned()))
                .and_then(|m| m.get(&(String::new(), ns.to_owned())))
            {
                None => return Err(ApiError::not_found("", "namespaces", ns)),
                Some(n) if meta_str(n, "deletionTimestamp").is_some() => {
                    return Err(ApiError::forbidden(format!(
                        "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        gr.1,
                        meta_str(&obj, "name").unwrap_or_default()
                    )));
                }
                Some(_) => {}
            }
        }
        let name = match meta_str(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => match meta_str(&obj, "generateName") {
                Some(prefix) => format!("{prefix}{}", random_suffix()),
                None => {
                    return Err(ApiError::invalid(
                        &gr.0,
                        &gr.1,
                        "",
                        vec![crate::error::Cause {
                            reason: "FieldValueRequired".into(),
                            field: "metadata.name".into(),
                            message: "Required value: name or generateName is required".into(),
                        }],
                    ));
                }
            },
        };
        if let Some(cause) = invalid_name(gr, &name) {
            return Err(ApiError::invalid(&gr.0, &gr.1, &name, vec![cause]));
        }
        if let Some(cause) = annotations_too_long(&obj) {
            return Err(ApiError::invalid(&gr.0, &gr.1, &name, vec![cause]));
        }
        let key = (ns.to_owned(), name.clone());
        if inner.objects.get(gr).is_some_and(|m| m.contains_key(&key)) {
            return Err(ApiError::already_exists(&gr.0, &gr.1, &name));
        }
        let rv = inner.rv + 1;
        let uid = uuid::Uuid::new_v4().to_string();
        let meta = meta_mut(&mut obj);
        meta.insert("name".into(), json!(name));
        if rules.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        if rules.generation {
            meta.insert("generation".into(), json!(1));
        } else {
            meta.remove("generation");
        }
        if dry_run {
            return Ok(obj);
        }
        inner.rv = rv;
        inner.insert(gr, key, obj.clone(), None);
        self.flush(&mut inner);
        Ok(obj)
    }

    /// Read-modify-write of one object: `f` maps the stored object to the desired one. Checks
    /// the resourceVersion precondition of the desired object (409 when stale), applies the
    /// status-subresource rules, bumps `generation`, and finishes a deletion when the last
    /// finalizer goes. A write that changes nothing keeps the resourceVersion.
    pub fn update(
        &self,
        gr: &Gr,
        ns: &str,
        name: &str,
        opts: WriteOpts,
        f: &mut dyn FnMut(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let WriteOpts {
            sub,
            rules,
            dry_run,
        } = opts;
        let mut inner = self.lock();
        let key = (ns.to_owned(), name.to_owned());
        let cur = inner
            .objects
            .get(gr)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&gr.0, &gr.1, name))?;
        let desired = f(&cur)?;
        if let Some(want) = meta_str(&desired, "resourceVersion").filter(|v| !v.is_empty())
            && Some(want) != meta_str(&cur, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &gr.0,
                &gr.1,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        if let Some(want) = meta_str(&desired, "uid").filter(|v| !v.is_empty())
            && Some(want) != meta_str(&cur, "uid")
        {
            return Err(ApiError::conflict(
                &gr.0,
                &gr.1,
                name,
                "Precondition failed: UID in precondition does not match",
            ));
        }
        let mut new = match sub {
            Sub::Status => {
                let mut n = cur.clone();
                match desired.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        n.as_object_mut().map(|m| m.remove("status"));
                    }
                }
                if let Some(mf) = desired.pointer("/metadata/managedFields") {
                    meta_mut(&mut n).insert("managedFields".into(), mf.clone());
                }
                n
            }
            Sub::Main => {
                let mut n = desired;
                if rules.status {
                    match cur.get("status") {
                        Some(s) => n["status"] = s.clone(),
                        None => {
                            n.as_object_mut().map(|m| m.remove("status"));
                        }
                    }
                }
                n
            }
        };
        // Immutable and server-owned metadata.
        let cur_meta = cur.get("metadata").cloned().unwrap_or_default();
        let deleting = cur_meta.get("deletionTimestamp").is_some();
        {
            let meta = meta_mut(&mut new);
            for f in [
                "name",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match cur_meta.get(f) {
                    Some(v) => meta.insert(f.into(), v.clone()),
                    None => meta.remove(f),
                };
            }
            match cur_meta.get("namespace") {
                Some(v) => meta.insert("namespace".into(), v.clone()),
                None => meta.remove("namespace"),
            };
            if !meta.contains_key("managedFields")
                && let Some(mf) = cur_meta.get("managedFields")
            {
                meta.insert("managedFields".into(), mf.clone());
            }
            if meta
                .get("finalizers")
                .is_some_and(|f| f.as_array().is_some_and(Vec::is_empty))
            {
                meta.remove("finalizers");
            }
            meta.insert(
                "resourceVersion".into(),
                cur_meta.get("resourceVersion").cloned().unwrap_or_default(),
            );
        }
        if deleting {
            // Once deleting, finalizers may only be removed.
            let old: HashSet<String> = finalizers(&cur).into_iter().collect();
            let kept: Vec<String> = finalizers(&new)
                .into_iter()
                .filter(|f| old.contains(f))
                .collect();
            let meta = meta_mut(&mut new);
            if kept.is_empty() {
                meta.remove("finalizers");
            } else {
                meta.insert("finalizers".into(), json!(kept));
            }
        }
        if rules.generation && spec_part(&cur, rules.status) != spec_part(&new, rules.status) {
            let g = cur_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            meta_mut(&mut new).insert("generation".into(), json!(g));
        }
        if new == cur {
            return Ok(cur);
        }
        if let Some(cause) = annotations_too_long(&new) {
            return Err(ApiError::invalid(&gr.0, &gr.1, name, vec![cause]));
        }
        let rv = inner.rv + 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        if dry_run {
            return Ok(new);
        }
        inner.rv = rv;
        inner.insert(gr, key.clone(), new.clone(), Some(cur));
        let grace = new
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        // Namespaces go when they are empty (see `settle`), not when their finalizers are gone.
        let is_namespace = gr.0 == NS.0 && gr.1 == NS.1;
        if deleting && finalizers(&new).is_empty() && grace == 0 && !is_namespace {
            inner.remove(gr, &key);
        }
        inner.settle();
        self.flush(&mut inner);
        Ok(new)
    }

    /// Deletes an object. Returns the object and whether it is gone (`false`: it was only marked
    /// with a deletionTimestamp, because of finalizers or graceful pod termination).
    pub fn delete(
        &self,
        gr: &Gr,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<(Value, bool), ApiError> {
        let mut inner = self.lock();
        let key = (ns.to_owned(), name.to_owned());
        let cur = inner
            .objects
            .get(gr)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&gr.0, &gr.1, name))?;
        if let Some(uid) = &opts.uid
            && Some(uid.as_str()) != meta_str(&cur, "uid")
        {
            return Err(ApiError::conflict(
                &gr.0,
                &gr.1,
                name,
                "Precondition failed: UID in precondition does not match",
            ));
        }
        if let Some(rv) = &opts.rv
            && Some(rv.as_str()) != meta_str(&cur, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &gr.0,
                &gr.1,
                name,
                "the ResourceVersion in the precondition does not match the ResourceVersion in record. The object might have been modified",
            ));
        }
        if opts.dry_run {
            return Ok((cur, false));
        }
        let result = inner.delete(gr, &key, opts);
        inner.settle();
        self.flush(&mut inner);
        Ok(result)
    }

    /// Starts a watch of one resource (in one namespace or all).
    pub fn watch(
        &self,
        gr: &Gr,
        ns: Option<&str>,
        from: WatchFrom,
    ) -> Result<WatchStart, ApiError> {
        let inner = self.lock();
        let rx = self.tx.subscribe();
        let matches = |e: &WatchEvent| &e.gr == gr && ns.is_none_or(|n| n == e.namespace);
        let initial = match from {
            WatchFrom::Now => inner
                .objects
                .get(gr)
                .into_iter()
                .flatten()
                .filter(|(k, _)| ns.is_none_or(|n| n == k.0))
                .map(|(k, v)| {
                    Arc::new(WatchEvent {
                        rv: inner.rv,
                        gr: gr.clone(),
                        namespace: k.0.clone(),
                        kind: EventType::Added,
                        object: v.clone(),
                        old: None,
                    })
                })
                .collect(),
            WatchFrom::Rv(rv) => {
                let oldest = inner.history.front().map(|e| e.rv).unwrap_or(inner.rv + 1);
                if rv + 1 < oldest && rv < inner.rv {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {rv} ({})",
                        oldest - 1
                    )));
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && matches(e))
                    .cloned()
                    .collect()
            }
        };
        Ok(WatchStart {
            initial,
            rv: inner.rv,
            rx,
        })
    }
}

fn encode_continue(key: &Key) -> String {
    let raw = format!("{}/{}", key.0, key.1);
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<Key, ApiError> {
    let bad = || ApiError::bad_request("continue key is not valid");
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect();
    let raw = String::from_utf8(bytes.map_err(|_| bad())?).map_err(|_| bad())?;
    let (ns, name) = raw.split_once('/').ok_or_else(bad)?;
    Ok((ns.to_owned(), name.to_owned()))
}

impl Inner {
    fn emit(&mut self, gr: &Gr, ns: &str, kind: EventType, object: Value, old: Option<Value>) {
        let ev = Arc::new(WatchEvent {
            rv: self.rv,
            gr: gr.clone(),
            namespace: ns.to_owned(),
            kind,
            object,
            old,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_cap {
            self.history.pop_front();
        }
        self.pending.push(ev);
    }

    /// Stores an object (resourceVersion already set) and records ADDED or MODIFIED.
    fn insert(&mut self, gr: &Gr, key: Key, obj: Value, old: Option<Value>) {
        if let Some(uid) = meta_str(&obj, "uid") {
            self.uids.insert(uid.to_owned(), (gr.clone(), key.clone()));
        }
        if meta_str(&obj, "deletionTimestamp").is_some() {
            self.deleting.insert((gr.clone(), key.clone()));
        } else {
            self.deleting.remove(&(gr.clone(), key.clone()));
        }
        self.objects
            .entry(gr.clone())
            .or_default()
            .insert(key.clone(), obj.clone());
        let kind = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(gr, &key.0, kind, obj, old);
    }

    /// Writes a new state of an existing object with a fresh resourceVersion.
    fn put(&mut self, gr: &Gr, key: &Key, mut obj: Value) {
        let old = self.objects.get(gr).and_then(|m| m.get(key)).cloned();
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.insert(gr, key.clone(), obj, old);
    }

    /// Removes an object for good, records DELETED and collects its orphaned dependents.
    fn remove(&mut self, gr: &Gr, key: &Key) {
        let Some(mut obj) = self.objects.get_mut(gr).and_then(|m| m.remove(key)) else {
            return;
        };
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_owned();
        self.uids.remove(&uid);
        self.deleting.remove(&(gr.clone(), key.clone()));
        self.emit(gr, &key.0, EventType::Deleted, obj, None);
        self.collect_dependents(&uid);
    }

    /// Objects that have an owner reference to `uid`.
    fn dependents(&self, uid: &str) -> Vec<(Gr, Key)> {
        let mut out = Vec::new();
        for (gr, objs) in &self.objects {
            for (key, obj) in objs {
                if owner_uids(obj).iter().any(|u| u == uid) {
                    out.push((gr.clone(), key.clone()));
                }
            }
        }
        out
    }

    /// Background garbage collection: a dependent whose owners are all gone is deleted; one that
    /// still has a live owner loses the dangling reference.
    fn collect_dependents(&mut self, uid: &str) {
        for (gr, key) in self.dependents(uid) {
            let Some(obj) = self.objects.get(&gr).and_then(|m| m.get(&key)).cloned() else {
                continue;
            };
            let live = owner_uids(&obj).iter().any(|u| self.uids.contains_key(u));
            if live {
                let mut obj = obj;
                if let Some(refs) = obj
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
                }
                self.put(&gr, &key, obj);
            } else {
                self.delete(&gr, &key, &DeleteOpts::default());
            }
        }
    }

    fn delete(&mut self, gr: &Gr, key: &Key, opts: &DeleteOpts) -> (Value, bool) {
        let Some(cur) = self.objects.get(gr).and_then(|m| m.get(key)).cloned() else {
            return (Value::Null, true);
        };
        let uid = meta_str(&cur, "uid").unwrap_or_default().to_owned();
        let propagation = opts.propagation.unwrap_or(Propagation::Background);
        let mut obj = cur.clone();
        let already = meta_str(&cur, "deletionTimestamp").is_some();

        // Graceful termination of pods that a kubelet runs.
        let bound = gr.0.is_empty()
            && gr.1 == "pods"
            && cur
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
        let terminal = matches!(
            cur.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        let grace = if bound && !terminal {
            opts.grace
                .or_else(|| {
                    cur.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
                .max(0)
        } else {
            0
        };
        let old_grace = cur
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64);

        if propagation == Propagation::Orphan {
            for (dgr, dkey) in self.dependents(&uid) {
                if let Some(mut d) = self.objects.get(&dgr).and_then(|m| m.get(&dkey)).cloned() {
                    if let Some(refs) = d
                        .pointer_mut("/metadata/ownerReferences")
                        .and_then(Value::as_array_mut)
                    {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                    }
                    self.put(&dgr, &dkey, d);
                }
            }
        }
        let mut fins = finalizers(&cur);
        let is_namespace = gr.0 == NS.0 && gr.1 == NS.1;
        if propagation == Propagation::Foreground
            && !self.dependents(&uid).is_empty()
            && !fins.iter().any(|f| f == "foregroundDeletion")
        {
            fins.push("foregroundDeletion".into());
        }
        if is_namespace {
            obj["status"] = json!({"phase": "Terminating"});
        }
        let must_wait = !fins.is_empty() || grace > 0 || is_namespace;
        if must_wait {
            let changed_grace = old_grace.is_none_or(|g| grace < g);
            if !already || changed_grace || finalizers(&cur) != fins {
                let meta = meta_mut(&mut obj);
                if !already || changed_grace {
                    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                    meta.insert(
                        "deletionTimestamp".into(),
                        json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                    );
                    meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
                }
                if !fins.is_empty() {
                    meta.insert("finalizers".into(), json!(fins));
                }
                if let Some(g) = meta
                    .get("generation")
                    .and_then(Value::as_i64)
                    .filter(|_| !already)
                {
                    meta.insert("generation".into(), json!(g + 1));
                }
                self.put(gr, key, obj);
            }
            if fins.iter().any(|f| f == "foregroundDeletion") {
                for (dgr, dkey) in self.dependents(&uid) {
                    self.delete(&dgr, &dkey, &DeleteOpts::default());
                }
            }
            if is_namespace {
                let ns = key.1.clone();
                let targets: Vec<(Gr, Key)> = self
                    .objects
                    .iter()
                    .flat_map(|(g, m)| {
                        m.keys()
                            .filter(|k| k.0 == ns)
                            .map(|k| (g.clone(), k.clone()))
                    })
                    .collect();
                for (g, k) in targets {
                    self.delete(&g, &k, &DeleteOpts::default());
                }
            }
            let now = self
                .objects
                .get(gr)
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or(Value::Null);
            return (now, false);
        }
        self.remove(gr, key);
        let mut gone = cur;
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(self.rv.to_string()));
        (gone, true)
    }

    /// Finishes deletions that were waiting: owners in foreground deletion whose dependents are
    /// gone, namespaces that are empty.
    fn settle(&mut self) {
        loop {
            let mut work: Vec<(Gr, Key, bool)> = Vec::new();
            for (gr, key) in &self.deleting {
                let Some(obj) = self.objects.get(gr).and_then(|m| m.get(key)) else {
                    continue;
                };
                let is_ns = gr.0 == NS.0 && gr.1 == NS.1;
                if is_ns {
                    let empty = self
                        .objects
                        .values()
                        .all(|m| m.keys().all(|k| k.0 != key.1));
                    if empty && finalizers(obj).is_empty() {
                        work.push((gr.clone(), key.clone(), true));
                    }
                } else if finalizers(obj).iter().any(|f| f == "foregroundDeletion") {
                    let uid = meta_str(obj, "uid").unwrap_or_default();
                    if self.dependents(uid).is_empty() {
                        work.push((gr.clone(), key.clone(), false));
                    }
                }
            }
            if work.is_empty() {
                return;
            }
            for (gr, key, is_ns) in work {
                let Some(mut obj) = self.objects.get(&gr).and_then(|m| m.get(&key)).cloned() else {
                    continue;
                };
                if is_ns {
                    self.remove(&gr, &key);
                    continue;
                }
                let rest: Vec<String> = finalizers(&obj)
                    .into_iter()
                    .filter(|f| f != "foregroundDeletion")
                    .collect();
                if rest.is_empty() {
                    self.remove(&gr, &key);
                } else {
                    meta_mut(&mut obj).insert("finalizers".into(), json!(rest));
                    self.put(&gr, &key, obj);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm_gr() -> Gr {
        (String::new(), "configmaps".into())
    }

    fn store_with_ns(history: usize) -> Store {
        let st = Store::with_history(history);
        let ns = json!({"metadata": {"name": "default"}});
        st.create(
            &(String::new(), "namespaces".into()),
            "",
            ns,
            Rules::default(),
            false,
        )
        .unwrap();
        st
    }

    const RULES: Rules = Rules {
        namespaced: true,
        status: false,
        generation: false,
    };

    #[test]
    fn too_old_watch_gets_410_gone() {
        let st = store_with_ns(3);
        for i in 0..10 {
            let obj = json!({"metadata": {"name": format!("c{i}")}});
            st.create(&cm_gr(), "default", obj, RULES, false).unwrap();
        }
        let err = st.watch(&cm_gr(), None, WatchFrom::Rv(2)).unwrap_err();
        assert_eq!(err.code, 410);
        let ok = st.watch(&cm_gr(), None, WatchFrom::Rv(9)).unwrap();
        assert_eq!(ok.initial.len(), 2, "events 10 and 11 are replayed");
    }

    #[test]
    fn terminating_namespace_waits_for_its_contents() {
        let st = store_with_ns(100);
        let obj = json!({"metadata": {"name": "held", "finalizers": ["x/y"]}});
        st.create(&cm_gr(), "default", obj.clone(), RULES, false)
            .unwrap();
        let ns_gr: Gr = (String::new(), "namespaces".into());
        let (_, gone) = st
            .delete(&ns_gr, "", "default", &DeleteOpts::default())
            .unwrap();
        assert!(!gone);
        let opts = WriteOpts {
            sub: Sub::Main,
            rules: Rules::default(),
            dry_run: false,
        };
        let touched = st.update(&ns_gr, "", "default", opts, &mut |c| {
            let mut c = c.clone();
            c["metadata"]["labels"] = json!({"touched": "yes"});
            Ok(c)
        });
        assert!(touched.is_ok());
        assert!(st.get(&ns_gr, "", "default").is_ok(), "still has content");
        let opts = WriteOpts {
            rules: RULES,
            ..opts
        };
        st.update(&cm_gr(), "default", "held", opts, &mut |c| {
            let mut c = c.clone();
            c["metadata"]["finalizers"] = json!([]);
            Ok(c)
        })
        .unwrap();
        assert!(st.get(&cm_gr(), "default", "held").is_err());
        assert!(
            st.get(&ns_gr, "", "default").is_err(),
            "empty namespace is removed"
        );
    }

    #[test]
    fn annotations_are_limited_to_256_kib_in_total() {
        let store = store_with_ns(100);
        let gr = cm_gr();
        let cm = |a: &str, b: &str| json!({"metadata": {"name": "big", "annotations": {"a": a, "b": b}}});
        // 1 + 1 key bytes: values of 131071 bytes each make exactly the limit.
        let half = "x".repeat(ANNOTATIONS_LIMIT / 2 - 1);
        store
            .create(&gr, "default", cm(&half, &half), RULES, false)
            .expect("exactly the limit is fine");
        let opts = WriteOpts {
            sub: Sub::Main,
            rules: RULES,
            dry_run: false,
        };
        let err = store
            .update(&gr, "default", "big", opts, &mut |_| {
                Ok(cm(&half, &format!("{half}y")))
            })
            .unwrap_err();
        assert_eq!(err.code, 422);
        assert!(
            err.message
                .ends_with("metadata.annotations: Too long: may not be more than 262144 bytes"),
            "{}",
            err.message
        );
        let err = store
            .create(
                &gr,
                "default",
                json!({"metadata": {"name": "bigger", "annotations": {"a": "x".repeat(ANNOTATIONS_LIMIT)}}}),
                RULES,
                false,
            )
            .unwrap_err();
        assert_eq!(err.causes[0].field, "metadata.annotations");
    }

    #[test]
    fn names_follow_kubernetes_rules() {
        let st = store_with_ns(10);
        for bad in ["Upper", "-dash", "under_score", ""] {
            let obj = json!({"metadata": {"name": bad}});
            let res = st.create(&cm_gr(), "default", obj, RULES, false);
            if !bad.is_empty() {
                assert_eq!(res.unwrap_err().code, 422, "{bad}");
            }
        }
        let dotted = json!({"metadata": {"name": "a.b-c"}});
        assert!(st.create(&cm_gr(), "default", dotted, RULES, false).is_ok());
        let ns = json!({"metadata": {"name": "a.b"}});
        let ns_gr: Gr = (String::new(), "namespaces".into());
        assert_eq!(
            st.create(&ns_gr, "", ns, Rules::default(), false)
                .unwrap_err()
                .code,
            422
        );
    }

    #[test]
    fn generate_name_and_no_op_updates() {
        let st = store_with_ns(100);
        let obj = json!({"metadata": {"generateName": "web-"}, "data": {"a": "1"}});
        let created = st.create(&cm_gr(), "default", obj, RULES, false).unwrap();
        let name = created["metadata"]["name"].as_str().unwrap().to_owned();
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        let opts = WriteOpts {
            sub: Sub::Main,
            rules: RULES,
            dry_run: false,
        };
        let same = st
            .update(&cm_gr(), "default", &name, opts, &mut |c| Ok(c.clone()))
            .unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
    }
}
