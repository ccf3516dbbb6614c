//! Watches that one malformed object cannot stall. A controller watches
//! [`DeserializeGuard<K>`](DeserializeGuard), so a stored object whose JSON does not fit `K`
//! (written before a schema change, or past validation) is an `Err` with its metadata instead
//! of failing the whole list; the same watch feeds a cache of the well-formed objects for the
//! parts of the operator that read `K` ([`controller`]). A malformed object is reported on the
//! object ([`report`]) and otherwise left alone.

use std::fmt::Debug;
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, Predicate, PredicateConfig, WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::conditions::reason::MALFORMED_OBJECT;
use crate::context::Context;

/// A controller over the objects of `api` as stored, and a cache of the well-formed ones, both
/// fed by one watch. A change of an object triggers a reconcile only when `trigger` hashes it
/// differently (the caches see every change).
pub fn controller<K, P>(
    api: Api<DeserializeGuard<K>>,
    trigger: P,
) -> (Controller<DeserializeGuard<K>>, Store<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    P: Predicate<DeserializeGuard<K>> + Send + 'static,
{
    let (stored, stored_writer) = reflector::store::<DeserializeGuard<K>>();
    let (objects, mut objects_writer) = reflector::store::<K>();
    let known = objects.clone();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .map_ok(move |event| {
            if let Some(typed) = well_formed(&event, &known) {
                objects_writer.apply_watcher_event(&typed);
            }
            event
        })
        .reflect(stored_writer)
        .applied_objects()
        .predicate_filter(trigger, PredicateConfig::default());
    (Controller::for_stream(events, stored), objects)
}

/// The reference of `K` to the object `key` names.
pub fn typed<K, L>(key: &ObjectRef<L>) -> ObjectRef<K>
where
    K: Resource<DynamicType = ()>,
    L: Resource<DynamicType = ()>,
{
    let typed = ObjectRef::new(&key.name);
    match &key.namespace {
        Some(ns) => typed.within(ns),
        None => typed,
    }
}

/// The watch event `event` as the cache of well-formed objects sees it: a malformed object is
/// not in it (one that was well-formed until now leaves it, as if deleted).
pub fn well_formed<K>(
    event: &watcher::Event<DeserializeGuard<K>>,
    known: &Store<K>,
) -> Option<watcher::Event<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    use watcher::Event;
    let valid = |stored: &DeserializeGuard<K>| stored.0.as_ref().ok().cloned();
    let cached = |stored: &DeserializeGuard<K>| {
        known
            .get(&typed(&ObjectRef::from_obj(stored)))
            .map(|o| (*o).clone())
    };
    match event {
        Event::Init => Some(Event::Init),
        Event::InitDone => Some(Event::InitDone),
        Event::InitApply(stored) => valid(stored).map(Event::InitApply),
        Event::Apply(stored) => match valid(stored) {
            Some(object) => Some(Event::Apply(object)),
            None => cached(stored).map(Event::Delete),
        },
        Event::Delete(stored) => valid(stored).or_else(|| cached(stored)).map(Event::Delete),
    }
}

/// The well-formed object, or `None` after reporting the malformed one: a Warning Event on it
/// (a repeat of the same note is counted into one Event), a log line, and the error metric of
/// `controller`.
pub async fn report<K>(
    stored: &DeserializeGuard<K>,
    controller: &'static str,
    ctx: &Context,
) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let invalid: &InvalidObject = match &stored.0 {
        Ok(object) => return Some(Arc::new(object.clone())),
        Err(invalid) => invalid,
    };
    let kind = K::kind(&());
    tracing::warn!(
        error = %invalid.error,
        name = stored.name_any(),
        "the stored {kind} does not fit the {kind} type; leaving it alone until it changes"
    );
    ctx.metrics.failed(controller, "malformed");
    let note = format!(
        "the stored object does not fit the {kind} type ({}); the operator leaves it alone until it is fixed",
        invalid.error
    );
    ctx.event(stored, EventType::Warning, MALFORMED_OBJECT, note)
        .await;
    None
}

/// Lets a malformed object that is being deleted go: when `stored` does not fit `K`, has a
/// deletion timestamp and still holds `finalizer`, the finalizer is removed (with a merge patch
/// guarded by the `resourceVersion` read), because the cleanup it guards needs the spec that
/// cannot be read. A Warning Event says what stays behind (`kept`). Without this the object
/// would wait for its finalizer forever. True when the finalizer was removed.
pub async fn let_go<K>(
    stored: &DeserializeGuard<K>,
    finalizer: &str,
    kept: &str,
    ctx: &Context,
) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let Err(invalid) = &stored.0 else {
        return Ok(false);
    };
    let meta = &invalid.metadata;
    let finalizers = meta.finalizers.as_deref().unwrap_or_default();
    if meta.deletion_timestamp.is_none() || !finalizers.iter().any(|f| f == finalizer) {
        return Ok(false);
    }
    let kind = K::kind(&());
    let note = format!(
        "deleted while the stored object does not fit the {kind} type ({}): its cleanup cannot run, so {kept}",
        invalid.error
    );
    tracing::warn!(name = stored.name_any(), "{note}");
    ctx.event(stored, EventType::Warning, MALFORMED_OBJECT, note)
        .await;
    let rest: Vec<&String> = finalizers.iter().filter(|f| *f != finalizer).collect();
    let patch = serde_json::json!({
        "metadata": {"finalizers": rest, "resourceVersion": meta.resource_version}
    });
    let ns = meta.namespace.as_deref().unwrap_or_default();
    let api: Api<DeserializeGuard<K>> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        &stored.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_crds::JobQueue;

    #[test]
    fn a_malformed_object_is_not_in_the_cache_of_well_formed_ones() {
        use watcher::Event;
        let mut good = JobQueue::new("hello", serde_yaml::from_str("{priorities: 1}").unwrap());
        good.metadata.namespace = Some("team".into());
        let broken = DeserializeGuard::<JobQueue>(Err(InvalidObject {
            error: "invalid type: string \"many\", expected u8".into(),
            metadata: good.metadata.clone(),
        }));
        let (known, mut writer) = reflector::store::<JobQueue>();
        let name = |e: Option<Event<JobQueue>>| match e {
            Some(Event::Apply(q)) => format!("apply {}", q.name_any()),
            Some(Event::Delete(q)) => format!("delete {}", q.name_any()),
            Some(Event::InitApply(q)) => format!("init {}", q.name_any()),
            Some(Event::Init) => "init".into(),
            Some(Event::InitDone) => "done".into(),
            None => "nothing".into(),
        };
        assert_eq!(
            name(well_formed(&Event::InitApply(broken.clone()), &known)),
            "nothing"
        );
        assert_eq!(
            name(well_formed(&Event::Apply(broken.clone()), &known)),
            "nothing",
            "never cached: nothing to forget"
        );
        let valid = Event::Apply(DeserializeGuard(Ok(good.clone())));
        let event = well_formed(&valid, &known).unwrap();
        writer.apply_watcher_event(&event);
        assert_eq!(name(Some(event)), "apply hello");
        assert_eq!(
            name(well_formed(&Event::Apply(broken.clone()), &known)),
            "delete hello",
            "an object that turned malformed leaves the cache"
        );
        assert_eq!(
            name(well_formed(&Event::Delete(broken), &known)),
            "delete hello"
        );
        assert_eq!(name(well_formed(&Event::InitDone, &known)), "done");
    }
}
