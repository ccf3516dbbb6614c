//! NATS connections of the operator: one lazily created, self-reconnecting client per server
//! URL (the default from `--nats-url`, or a `JobQueue`'s `spec.nats.url`). The operator never
//! waits for NATS to start: a client exists at once and connects in the background, and a
//! reconcile that finds it disconnected reports `NatsUnavailable` instead of blocking.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;

/// Longest pause between two reconnection attempts, so recovery after a NATS outage is quick.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How long a new client may take for its first connection before callers are told NATS is
/// unavailable (so a healthy start does not flash `NatsUnavailable`).
const FIRST_CONNECT_GRACE: Duration = Duration::from_secs(2);
/// How long one JetStream API request may take before the reconcile gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A NATS URL could not be turned into a client (it does not parse).
#[derive(Debug, thiserror::Error)]
#[error("cannot use NATS URL {url:?}: {source}")]
pub struct ConnectError {
    /// The URL as given.
    pub url: String,
    /// Why async-nats rejected it.
    pub source: async_nats::ConnectError,
}

/// NATS clients keyed by URL, shared by every controller and the scaler.
#[derive(Debug)]
pub struct NatsPool {
    default_url: String,
    clients: tokio::sync::Mutex<HashMap<String, async_nats::Client>>,
    name: String,
    // Last state each URL was seen in, to log transitions once instead of on every reconcile.
    seen: Mutex<HashMap<String, bool>>,
}

impl NatsPool {
    /// A pool whose default server is `default_url`; `name` identifies the operator to NATS.
    pub fn new(default_url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            default_url: default_url.into(),
            clients: tokio::sync::Mutex::default(),
            name: name.into(),
            seen: Mutex::default(),
        }
    }

    /// The URL used for queues without a `spec.nats` override.
    pub fn default_url(&self) -> &str {
        &self.default_url
    }

    /// The client for `url` (the default when `None`), created on first use. It may still be
    /// connecting; use [`NatsPool::connected`] to get a JetStream context only when it is up.
    pub async fn client(&self, url: Option<&str>) -> Result<async_nats::Client, ConnectError> {
        let url = url.unwrap_or(&self.default_url).to_owned();
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(&url) {
            return Ok(client.clone());
        }
        let client = async_nats::ConnectOptions::new()
            .name(&self.name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .reconnect_delay_callback(|attempts| {
                let millis = 100u64.saturating_mul(1 << attempts.min(5));
                Duration::from_millis(millis).min(MAX_RECONNECT_DELAY)
            })
            .connect(url.as_str())
            .await
            .map_err(|source| ConnectError {
                url: url.clone(),
                source,
            })?;
        clients.insert(url, client.clone());
        drop(clients);
        let started = std::time::Instant::now();
        while client.connection_state() != State::Connected
            && started.elapsed() < FIRST_CONNECT_GRACE
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(client)
    }

    /// A JetStream context for `url` if its client is connected right now, `Ok(None)` if it is
    /// not (NATS down or still connecting).
    pub async fn connected(
        &self,
        url: Option<&str>,
    ) -> Result<Option<jetstream::Context>, ConnectError> {
        let client = self.client(url).await?;
        let up = client.connection_state() == State::Connected;
        self.note_state(url.unwrap_or(&self.default_url), up);
        if !up {
            return Ok(None);
        }
        let mut js = jetstream::new(client);
        js.set_timeout(REQUEST_TIMEOUT);
        Ok(Some(js))
    }

    fn note_state(&self, url: &str, up: bool) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.insert(url.to_owned(), up) != Some(up) {
            if up {
                tracing::info!(url, "NATS connected");
            } else {
                tracing::warn!(url, "NATS not connected");
            }
        }
    }
}
