//! State shared by the controllers and the scaler: the Kubernetes client, NATS connections,
//! the Event recorder and metrics. What a controller keeps per object lives in its own
//! [`States`](crate::states::States), not here.

use std::sync::Arc;

use kube::Resource;
use kube::runtime::events::EventType;

use crate::config::Config;
use crate::events::Recorder;
use crate::metrics::Metrics;
use crate::nats::NatsPool;
use crate::states::States;

/// Field manager of every server-side apply the operator does (children and status).
pub const FIELD_MANAGER: &str = "conveyor-operator";

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
}

/// What a controller's reconciles share: the operator's [`Context`] and the controller's own
/// per-object [`States`].
#[derive(Debug)]
pub struct Shared<K: Resource<DynamicType = ()>, V> {
    /// The operator's shared context.
    pub ctx: Arc<Context>,
    /// The controller's state per object.
    pub states: States<K, V>,
}

impl<K: Resource<DynamicType = ()>, V> Shared<K, V> {
    /// Empty states over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            states: States::default(),
        }
    }
}
