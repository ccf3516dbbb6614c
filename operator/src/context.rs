//! State shared by the controllers and the scaler: the Kubernetes client, NATS connections,
//! the Event recorder, metrics and the per-object error backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Resource;
use kube::runtime::events::EventType;

use crate::config::Config;
use crate::events::Recorder;
use crate::jobqueue::{Sample, Tail};
use crate::metrics::Metrics;
use crate::nats::NatsPool;

/// Field manager of every server-side apply the operator does (children and status).
pub const FIELD_MANAGER: &str = "conveyor-operator";

/// First retry delay after a transient error; doubles per consecutive failure up to `--resync`.
const MIN_BACKOFF: Duration = Duration::from_millis(500);

/// Shared by every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// NATS clients per server URL.
    pub nats: NatsPool,
    /// Publishes Events on the resources.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Operator settings.
    pub config: Config,
    failures: Mutex<HashMap<String, u32>>,
    handled: Mutex<HashMap<String, String>>,
    samples: Mutex<HashMap<String, Sample>>,
    tails: Mutex<HashMap<String, Tail>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for the given client and settings.
    pub fn new(client: kube::Client, config: Config, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), FIELD_MANAGER, config.identity.clone()),
            nats: NatsPool::new(config.nats_url.clone(), FIELD_MANAGER),
            client,
            metrics,
            config,
            failures: Mutex::default(),
            handled: Mutex::default(),
            samples: Mutex::default(),
            tails: Mutex::default(),
        }
    }

    /// Publishes an Event on `obj` (the note bounded to what the API server accepts; a repeat
    /// of the same note is counted, a new note is a new Event); failures are logged, never
    /// fatal (Events are best effort).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let regarding = obj.object_ref(&());
        let published = self
            .recorder
            .publish(&regarding, type_, reason, "Reconcile", &note)
            .await;
        if let Err(err) = published {
            tracing::warn!(%err, reason, "cannot publish event");
        }
    }

    /// Delay before retrying an object after a transient error: exponential per object,
    /// capped at the resync period so recovery is never slower than a resync.
    pub fn backoff(&self, key: String) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key).or_insert(0);
        let delay = MIN_BACKOFF.saturating_mul(1 << (*n).min(10));
        *n = n.saturating_add(1);
        delay.min(self.config.resync.max(MIN_BACKOFF))
    }

    /// Forgets the failures of an object after it reconciled cleanly.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Whether the one-off `request` on the object `uid` was already carried out at `version`
    /// (the object's `resourceVersion`). A reconcile can see an object from the cache that
    /// predates the operator's own removal of the request; this keeps such a request from
    /// running twice.
    pub fn handled(&self, uid: &str, request: &str, version: &str) -> bool {
        self.handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&request_key(uid, request))
            .is_some_and(|v| v == version)
    }

    /// Records that `request` on the object `uid` was carried out at `version`.
    pub fn mark_handled(&self, uid: &str, request: &str, version: String) {
        self.handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(request_key(uid, request), version);
    }

    /// Keeps `sample` of a queue's counters as its latest and returns the one it replaces, for
    /// rates. A sample younger than a second is not replaced (too short an interval).
    pub fn previous_sample(&self, key: String, sample: Sample) -> Option<Sample> {
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match samples.get(&key) {
            Some(previous) if sample.at.duration_since(previous.at) < Duration::from_secs(1) => {
                Some(*previous)
            }
            _ => samples.insert(key, sample),
        }
    }

    /// The dead letters last read of a queue (taken: a reconcile gives it back with
    /// [`Context::keep_tail`]; reconciles of one object never run at once).
    pub fn take_tail(&self, key: &str) -> Option<Tail> {
        self.tails
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key)
    }

    /// Keeps the dead letters just read of a queue for its next reconcile.
    pub fn keep_tail(&self, key: String, tail: Tail) {
        self.tails
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, tail);
    }

    /// Drops what is remembered of a queue that is being deleted: its rate samples and dead
    /// letters read (`key`) and its handled one-off requests (keys starting with `<uid>/`).
    pub fn forget_queue(&self, key: &str, uid: &str) {
        self.tails
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        let prefix = request_key(uid, "");
        self.handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|k, _| !k.starts_with(&prefix));
    }
}

/// Key of a one-off request on an object: `<uid>/<request>`.
fn request_key(uid: &str, request: &str) -> String {
    format!("{uid}/{request}")
}
