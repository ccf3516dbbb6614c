//! The Events the operator publishes: bounded to what the API server accepts, and counted as
//! repeats only when they say the same thing.
//!
//! The API server rejects an Event whose note is longer than 1024 bytes (422 `message: … can
//! have at most 1024 characters`), and such an Event is lost, so every note is bounded here and
//! the producers summarise long lists with [`names`]. kube-runtime's `Recorder` counts a repeat
//! (same reason, action and object) into the first Event's `series` and keeps the first note,
//! so `ScaledDown (x3)` still said "from 3 to 2" after the pool went to 0. events.k8s.io/v1
//! does not let an update change a note (only the series), so a count cannot carry the latest
//! note: this recorder adds the note to the series key instead. An occurrence that says
//! something new is an Event of its own; only the same note again is counted.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;

/// Longest Event note the API server accepts, in bytes.
pub const NOTE_LIMIT: usize = 1024;
/// Longest condition message the API server accepts (`metav1.Condition`), in bytes.
pub const CONDITION_MESSAGE_LIMIT: usize = 32 * 1024;
/// How long a published Event is counted into rather than published anew (as kube-runtime and
/// client-go do, a little longer than `kubectl describe` shows events as recent).
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);
/// Marks text that was cut.
const ELLIPSIS: &str = "…";

/// `text` cut to at most `limit` bytes at a character boundary, ending in `…` when cut.
pub fn bound(text: impl Into<String>, limit: usize) -> String {
    let mut text = text.into();
    if text.len() <= limit {
        return text;
    }
    let mut end = limit.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(ELLIPSIS);
    text
}

/// `"a, b, c and 2 more"`: as many of `items` as fit in `budget` bytes with the count of the
/// rest, so a list stays useful however long it is. Names at least one item (cut if it alone
/// does not fit).
pub fn names<S: AsRef<str>>(items: &[S], budget: usize) -> String {
    let rest = |named: usize| match items.len() - named {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let Some((first, others)) = items.split_first() else {
        return String::new();
    };
    let mut listed = first.as_ref().to_owned();
    if listed.len() + rest(1).len() > budget {
        let tail = rest(1);
        return bound(listed, budget.saturating_sub(tail.len())) + &tail;
    }
    for (i, item) in others.iter().enumerate() {
        let named = i + 2;
        if listed.len() + 2 + item.as_ref().len() + rest(named).len() > budget {
            return listed + &rest(named - 1);
        }
        listed.push_str(", ");
        listed.push_str(item.as_ref());
    }
    listed
}

/// What identifies a series of equal Events.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    regarding: (String, String, String, String, String),
    type_: &'static str,
    reason: String,
    action: String,
    note: String,
}

/// The Event a series is counted into.
#[derive(Debug, Clone)]
struct Series {
    name: String,
    namespace: String,
    count: i32,
    last: Timestamp,
}

/// Publishes events.k8s.io/v1 Events as `reporting_controller`/`reporting_instance`.
pub struct Recorder {
    client: kube::Client,
    controller: String,
    instance: String,
    series: Mutex<HashMap<Key, Series>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

fn type_name(type_: EventType) -> &'static str {
    match type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

impl Recorder {
    /// A recorder reporting as `controller`, instance `instance` (the controller's name when
    /// `None`).
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            series: Mutex::default(),
        }
    }

    fn series(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Series>> {
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes an Event on `regarding` with `note` bounded to [`NOTE_LIMIT`]: counts it into
    /// the Event that said the same within the last minutes, else creates a new one.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let note = bound(note, NOTE_LIMIT);
        let now = Timestamp::now();
        let key = Key {
            regarding: (
                regarding.api_version.clone().unwrap_or_default(),
                regarding.kind.clone().unwrap_or_default(),
                regarding.namespace.clone().unwrap_or_default(),
                regarding.name.clone().unwrap_or_default(),
                regarding.uid.clone().unwrap_or_default(),
            ),
            type_: type_name(type_),
            reason: reason.to_owned(),
            action: action.to_owned(),
            note,
        };
        let previous = {
            let mut series = self.series();
            series.retain(|_, s| s.last + SERIES_TTL > now);
            series.get(&key).cloned()
        };
        if let Some(mut s) = previous {
            s.count += 1;
            s.last = now;
            let api: Api<Event> = Api::namespaced(self.client.clone(), &s.namespace);
            let patch = serde_json::json!({
                "series": {"count": s.count, "lastObservedTime": MicroTime(now)},
            });
            match api
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.series().insert(key, s);
                    return Ok(());
                }
                // The Event expired or was deleted: start a new series.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(err) => return Err(err),
            }
        }
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            action: Some(key.action.clone()),
            reason: Some(key.reason.clone()),
            note: Some(key.note.clone()),
            type_: Some(key.type_.to_owned()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &event).await?;
        self.series().insert(
            key,
            Series {
                name,
                namespace,
                count: 1,
                last: now,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_ends_in_an_ellipsis_within_the_limit() {
        assert_eq!(bound("short", 10), "short");
        let cut = bound("é".repeat(600), NOTE_LIMIT);
        assert!(cut.len() <= NOTE_LIMIT, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(bound("abcdef", 4), "a…");
    }

    #[test]
    fn long_lists_name_what_fits_and_count_the_rest() {
        let pods = ["pod-a", "pod-b", "pod-c", "pod-d"];
        assert_eq!(names(&pods, 30), "pod-a, pod-b, pod-c, pod-d");
        assert_eq!(names(&pods, 25), "pod-a, pod-b and 2 more");
        assert_eq!(names(&pods, 20), "pod-a and 3 more");
        assert_eq!(names(&["x".repeat(50)], 10).len(), 10);
        assert_eq!(
            names(&["x".repeat(50), "y".into()], 20),
            "xxxxxx… and 1 more"
        );
        assert_eq!(names::<&str>(&[], 10), "");
        let long: Vec<String> = (0..100).map(|i| format!("pod-{i:03}")).collect();
        let listed = names(&long, 100);
        assert!(listed.len() <= 100, "{listed}");
        assert!(listed.starts_with("pod-000, pod-001"), "{listed}");
        assert!(listed.ends_with(" more"), "{listed}");
    }
}
