//! The Events of the Deployment and ReplicaSet controllers, written as kube-controller-manager's
//! recorder (client-go's `record` package) writes them: core/v1 Events with `source.component`,
//! one per distinct message; the same message again on the same object within
//! [`DEDUP_WINDOW`] increments that Event's `count` and `lastTimestamp` instead. kube-runtime's
//! `Recorder`, used before, counted every Event with the same reason into the first one and kept
//! its note, so `kubectl describe deployment` said `Scaled up replica set … from 0 to 1 (x3)`
//! after three different scalings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// How long a repeat is counted into its first Event (client-go: 10 minutes).
pub const DEDUP_WINDOW: SignedDuration = SignedDuration::from_mins(10);

/// What makes two Events the same: object, reason and message.
type Key = (String, String, String, String, String);

/// The Event a repeat is counted into.
#[derive(Debug, Clone)]
struct Written {
    name: String,
    count: i32,
    last: Timestamp,
}

/// Writes the Normal Events of one controller (`component`).
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    component: String,
    written: Arc<Mutex<HashMap<Key, Written>>>,
}

impl Recorder {
    /// A recorder for `component` (`deployment-controller`, `replicaset-controller`).
    pub fn new(client: Client, component: &str) -> Self {
        Self {
            client,
            component: component.to_owned(),
            written: Arc::default(),
        }
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Written>> {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes a Normal Event `reason` with `message` about `object`, or counts a repeat.
    pub async fn record(
        &self,
        object: &ObjectReference,
        reason: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let key = (
            object.kind.clone().unwrap_or_default(),
            namespace.clone(),
            object.uid.clone().unwrap_or_default(),
            reason.to_owned(),
            message.to_owned(),
        );
        let now = Timestamp::now();
        let previous = {
            let mut written = self.written();
            written.retain(|_, w| w.last + DEDUP_WINDOW > now);
            written.get(&key).cloned()
        };
        if let Some(mut w) = previous {
            w.count += 1;
            w.last = now;
            let patch = serde_json::json!({"count": w.count, "lastTimestamp": Time(now)});
            match api
                .patch(&w.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.written().insert(key, w);
                    return Ok(());
                }
                // Deleted meanwhile: write a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(err) => return Err(err),
            }
        }
        let name = format!(
            "{}.{:x}",
            object.name.as_deref().unwrap_or(&self.component),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace),
                ..ObjectMeta::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some("Normal".into()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: None,
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(String::new()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            ..Event::default()
        };
        api.create(&PostParams::default(), &event).await?;
        self.written().insert(
            key,
            Written {
                name,
                count: 1,
                last: now,
            },
        );
        Ok(())
    }
}
