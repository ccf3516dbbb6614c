//! Per-object state of a controller: one typed value per object (what a reconcile remembers for
//! the next one of the same object) and the object's error count for backoff, keyed by the
//! object, created on its first reconcile and forgotten when the object goes (its cleanup, or a
//! prune against the controller's cache). Each controller owns its [`States`] (handed to its
//! reconciles with the shared context as [`Shared`](crate::context::Shared)); the shared
//! [`Context`](crate::context::Context) holds nothing per object.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

/// First retry delay after a transient error; doubles per consecutive failure up to the cap.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);

/// The delay before the retry after `failures` consecutive failures: exponential, capped at
/// `cap` (never below [`MIN_BACKOFF`]).
pub fn backoff_delay(failures: u32, cap: Duration) -> Duration {
    MIN_BACKOFF
        .saturating_mul(1 << failures.min(10))
        .min(cap.max(MIN_BACKOFF))
}

/// What is kept of one object.
#[derive(Debug, Default)]
struct Entry<V> {
    /// The object's uid when the entry was made: an object deleted and made again under the
    /// same name starts afresh.
    uid: Option<String>,
    /// Consecutive failed reconciles.
    failures: u32,
    /// The controller's own state of the object.
    state: V,
}

/// One `V` per object `K`.
#[derive(Debug)]
pub struct States<K: Resource<DynamicType = ()>, V> {
    entries: Mutex<HashMap<ObjectRef<K>, Entry<V>>>,
}

impl<K: Resource<DynamicType = ()>, V> Default for States<K, V> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<K, V> States<K, V>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    V: Default,
{
    fn lock(&self) -> MutexGuard<'_, HashMap<ObjectRef<K>, Entry<V>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry<'a>(entries: &'a mut HashMap<ObjectRef<K>, Entry<V>>, obj: &K) -> &'a mut Entry<V> {
        let uid = obj.uid();
        let entry = entries.entry(ObjectRef::from_obj(obj)).or_default();
        if entry.uid != uid {
            *entry = Entry {
                uid,
                ..Entry::default()
            };
        }
        entry
    }

    /// Runs `f` on the state of `obj` (a default one on first use). Reconciles of one object
    /// never run at once, so what `f` reads is what the last reconcile left.
    pub fn with<R>(&self, obj: &K, f: impl FnOnce(&mut V) -> R) -> R {
        f(&mut Self::entry(&mut self.lock(), obj).state)
    }

    /// Counts a failed reconcile of `obj` and returns the delay before its retry (exponential
    /// per object, capped at `cap`).
    pub fn backoff(&self, obj: &K, cap: Duration) -> Duration {
        let mut entries = self.lock();
        let entry = Self::entry(&mut entries, obj);
        let delay = backoff_delay(entry.failures, cap);
        entry.failures = entry.failures.saturating_add(1);
        delay
    }

    /// Forgets the failures of `obj` after it reconciled cleanly.
    pub fn succeeded(&self, obj: &K) {
        Self::entry(&mut self.lock(), obj).failures = 0;
    }

    /// Forgets everything about `obj` (it is being deleted).
    pub fn forget(&self, obj: &K) {
        self.lock().remove(&ObjectRef::from_obj(obj));
    }

    /// Forgets the objects `present` says are gone (deleted without a cleanup this process
    /// saw), e.g. against the controller's cache.
    pub fn prune(&self, present: impl Fn(&ObjectRef<K>) -> bool) {
        self.lock().retain(|key, _| present(key));
    }

    /// How many objects have state.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no object has state.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn object(name: &str, uid: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team".into()),
                uid: Some(uid.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap() {
        let states: States<ConfigMap, ()> = States::default();
        let a = object("a", "1");
        let cap = Duration::from_secs(3);
        let delays: Vec<_> = (0..5).map(|_| states.backoff(&a, cap)).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 3000, 3000].map(Duration::from_millis)
        );
        states.succeeded(&a);
        assert_eq!(states.backoff(&a, cap), MIN_BACKOFF);
        assert_eq!(backoff_delay(40, Duration::ZERO), MIN_BACKOFF);
    }

    #[test]
    fn state_is_per_object_and_starts_afresh_for_a_new_uid() {
        let states: States<ConfigMap, u32> = States::default();
        let (a, b) = (object("a", "1"), object("b", "2"));
        states.with(&a, |n| *n += 1);
        states.with(&a, |n| *n += 1);
        states.with(&b, |n| *n += 10);
        assert_eq!(states.with(&a, |n| *n), 2);
        assert_eq!(states.with(&b, |n| *n), 10);
        let a_again = object("a", "3");
        assert_eq!(states.with(&a_again, |n| *n), 0, "a new object, same name");
        states.forget(&b);
        assert_eq!(states.len(), 1);
        states.forget(&a_again);
        assert!(states.is_empty());
    }
}
