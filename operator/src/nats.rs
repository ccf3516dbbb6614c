//! NATS connections of the operator: one lazily created, self-reconnecting client per server
//! URL (the default from `--nats-url`, or a `JobQueue`'s `spec.nats.url`). The operator never
//! waits for NATS to start: a client exists at once and connects in the background, and a
//! reconcile that finds it disconnected reports why ([`NatsPool::failure`]: refused
//! credentials, a TLS mismatch, or unreachable) instead of blocking.
//!
//! Every client is built from a [`NatsOptions`] (the SDK's one connect code). The default
//! connection takes its credentials and TLS from the Secret volumes named by
//! `CONVEYOR_NATS_CREDENTIALS_DIR` and `CONVEYOR_NATS_TLS_DIR` (the chart mounts them); a queue's
//! own Secrets are read through the API and written to private files ([`secret_dir`]). When a
//! queue's options change (a rotated Secret), its client is replaced. URLs are logged redacted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream;
use conveyor::connect::{self, FailureKind, NatsOptions, OptionsError};
use conveyor::names::QueueRef;
use tokio_util::sync::CancellationToken;

/// Longest pause between two reconnection attempts, so recovery after a NATS outage is quick.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How long a new client may take for its first connection before callers are told NATS is
/// unavailable (so a healthy start does not flash `NatsUnavailable`).
const FIRST_CONNECT_GRACE: Duration = Duration::from_secs(2);
/// How long one JetStream API request may take before the reconcile gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a probe's answer (why a client is not connected) is reused.
const PROBE_TTL: Duration = Duration::from_secs(5);
/// Longest wait for a probe connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A queue's NATS settings could not be turned into a client (a URL that does not parse,
/// credentials that cannot be used). The message is redacted.
#[derive(Debug, thiserror::Error)]
#[error("cannot use NATS URL {url:?}: {message}")]
pub struct ConnectError {
    /// The URL, redacted.
    pub url: String,
    /// Why, redacted.
    pub message: String,
}

impl ConnectError {
    fn new(url: &str, error: &dyn std::fmt::Display) -> Self {
        Self {
            url: connect::redact(url),
            message: connect::redact_text(&error.to_string()),
        }
    }
}

/// When a probe ran and what it found.
type Probe = (Instant, (FailureKind, String));

#[derive(Debug)]
struct Entry {
    raw_url: String,
    options: NatsOptions,
    client: async_nats::Client,
    /// Which client this is (a replaced one gets a new number), for the dispatcher.
    generation: u64,
    /// Set once the client's connection task is gone for good (async-nats 0.51 panics in it
    /// on a message header with a bare CR): the entry is replaced by a new client on next use.
    gone: Arc<AtomicBool>,
    /// Stops the watch of `gone` when the entry is dropped.
    watch: CancellationToken,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.watch.cancel();
    }
}

/// Numbers the clients the pool makes.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// NATS clients keyed by URL, shared by every controller and the scaler.
#[derive(Debug)]
pub struct NatsPool {
    default_raw: String,
    default: Result<NatsOptions, String>,
    clients: tokio::sync::Mutex<HashMap<String, Entry>>,
    name: String,
    // Last state each URL was seen in, to log transitions once instead of on every reconcile.
    seen: Mutex<HashMap<String, bool>>,
    // Why each URL's client is not connected, as a probe found it, and when.
    probes: Mutex<HashMap<String, Probe>>,
    // The client key each queue is served through, for the dispatchers.
    assigned: Mutex<HashMap<QueueRef, String>>,
}

impl NatsPool {
    /// A pool whose default server is `default_url` (userinfo in it becomes credentials; the
    /// Secret volumes of `CONVEYOR_NATS_CREDENTIALS_DIR`/`CONVEYOR_NATS_TLS_DIR` are read);
    /// `name` identifies the operator to NATS.
    pub fn new(default_url: impl Into<String>, name: impl Into<String>) -> Self {
        let default_raw = default_url.into();
        let name = name.into();
        let default = NatsOptions::new(&default_raw)
            .and_then(NatsOptions::from_env_dirs)
            .map(|o| o.name(name.clone()))
            .map_err(|e| connect::redact_text(&e.to_string()));
        Self {
            default_raw,
            default,
            clients: tokio::sync::Mutex::default(),
            name,
            seen: Mutex::default(),
            probes: Mutex::default(),
            assigned: Mutex::default(),
        }
    }

    /// The URL used for queues without a `spec.nats` override, without userinfo (it is
    /// injected into worker pods and shown in status).
    pub fn default_url(&self) -> &str {
        match &self.default {
            Ok(options) => options.url(),
            Err(_) => "",
        }
    }

    /// `url` (the default when `None`) as it may be shown: without userinfo.
    pub fn shown_url(&self, url: Option<&str>) -> String {
        url.map_or_else(|| self.default_url().to_owned(), connect::redact)
    }

    /// The options for `url` when the caller has none of its own.
    fn plain_options(&self, url: Option<&str>) -> Result<NatsOptions, ConnectError> {
        match url {
            None => self
                .default
                .clone()
                .map_err(|message| ConnectError::new(&self.default_raw, &message)),
            Some(url) => NatsOptions::new(url)
                .map(|o| o.name(self.name.clone()))
                .map_err(|e| ConnectError::new(url, &e)),
        }
    }

    /// The client for `url` (the default when `None`), created on first use. It may still be
    /// connecting; use [`NatsPool::connected`] to get a JetStream context only when it is up.
    pub async fn client(&self, url: Option<&str>) -> Result<async_nats::Client, ConnectError> {
        self.client_with(url, None).await
    }

    /// Like [`NatsPool::client`], with `options` (a queue's Secrets) instead of the plain URL's;
    /// a client made with other options is replaced.
    pub async fn client_with(
        &self,
        url: Option<&str>,
        own: Option<(&str, NatsOptions)>,
    ) -> Result<async_nats::Client, ConnectError> {
        let raw = url.unwrap_or(&self.default_raw).to_owned();
        let key = Self::key(url.unwrap_or(&self.default_raw), own.as_ref().map(|o| o.0));
        let options = own.map(|(_, o)| o.name(self.name.clone()));
        let mut clients = self.clients.lock().await;
        clients.retain(|key, entry| {
            let gone = entry.gone.load(Ordering::Relaxed);
            if gone {
                tracing::warn!(url = %connect::redact(key), "NATS client's connection task is gone; making a new client");
            }
            !gone
        });
        if options.is_none()
            && !clients.contains_key(&key)
            && let Some(entry) = clients.values().find(|e| e.raw_url == raw)
        {
            // Callers without a queue's Secrets (the scaler, the rate limiter) use a client
            // some queue on this URL made with its own Secrets.
            return Ok(entry.client.clone());
        }
        let options = match (options, clients.get(&key)) {
            (None, Some(entry)) => return Ok(entry.client.clone()),
            (Some(options), Some(entry)) if entry.options == options => {
                return Ok(entry.client.clone());
            }
            (Some(options), _) => options,
            (None, None) => self.plain_options(url)?,
        };
        let shown = connect::redact(&key);
        let connect = options
            .connect_options()
            .map_err(|e| ConnectError::new(&key, &e))?
            .retry_on_initial_connect()
            .max_reconnects(None)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .reconnect_delay_callback(|attempts| {
                let millis = 100u64.saturating_mul(1 << attempts.min(5));
                Duration::from_millis(millis).min(MAX_RECONNECT_DELAY)
            });
        let client = options
            .connect_with(connect)
            .await
            .map_err(|e| ConnectError::new(&key, &e.message))?;
        if clients.contains_key(&key) {
            tracing::info!(url = %shown, auth = options.auth.kind(), "NATS settings changed; new client");
        }
        self.forget_probe(&key);
        let gone = Arc::new(AtomicBool::new(false));
        let watch = CancellationToken::new();
        let (watched, flag, stop) = (client.clone(), gone.clone(), watch.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = conveyor::worker::connection_gone(watched) => flag.store(true, Ordering::Relaxed),
                () = stop.cancelled() => {}
            }
        });
        clients.insert(
            key,
            Entry {
                raw_url: raw,
                options,
                client: client.clone(),
                generation: GENERATION.fetch_add(1, Ordering::Relaxed),
                gone,
                watch,
            },
        );
        drop(clients);
        let started = Instant::now();
        while client.connection_state() != State::Connected
            && started.elapsed() < FIRST_CONNECT_GRACE
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(client)
    }

    /// Every live client made so far, with the number that tells a replacement apart, by key: the
    /// dispatcher serves each server the controllers connected to, a queue's own
    /// `spec.nats` server included.
    pub async fn clients(&self) -> Vec<(String, u64, async_nats::Client)> {
        self.clients
            .lock()
            .await
            .iter()
            .filter(|(_, entry)| !entry.gone.load(Ordering::Relaxed))
            .map(|(key, entry)| (key.clone(), entry.generation, entry.client.clone()))
            .collect()
    }

    /// A JetStream context for `url` if its client is connected right now, `Ok(None)` if it is
    /// not (NATS down or still connecting).
    pub async fn connected(
        &self,
        url: Option<&str>,
    ) -> Result<Option<jetstream::Context>, ConnectError> {
        self.connected_with(url, None).await
    }

    /// Like [`NatsPool::connected`], with a queue's own options (see [`NatsPool::client_with`]).
    pub async fn connected_with(
        &self,
        url: Option<&str>,
        own: Option<(&str, NatsOptions)>,
    ) -> Result<Option<jetstream::Context>, ConnectError> {
        let identity = own.as_ref().map(|o| o.0.to_owned());
        let client = self.client_with(url, own).await?;
        let up = client.connection_state() == State::Connected;
        self.note_state(&self.shown_url(url), up);
        if !up {
            return Ok(None);
        }
        self.forget_probe(&Self::key(
            url.unwrap_or(&self.default_raw),
            identity.as_deref(),
        ));
        let mut js = jetstream::new(client);
        js.set_timeout(REQUEST_TIMEOUT);
        Ok(Some(js))
    }

    /// Why the client for `url` is not connected: one connection attempt with its options
    /// (reused for a few seconds), sorted into refused credentials, a TLS failure or an
    /// unreachable server, with the server's own message (redacted).
    pub async fn failure(
        &self,
        url: Option<&str>,
        identity: Option<&str>,
    ) -> (FailureKind, String) {
        let key = Self::key(url.unwrap_or(&self.default_raw), identity);
        if let Some((at, found)) = self.lock_probes().get(&key).cloned()
            && at.elapsed() < PROBE_TTL
        {
            return found;
        }
        let options = match self.clients.lock().await.get(&key) {
            Some(entry) => entry.options.clone(),
            None => match self.plain_options(url) {
                Ok(options) => options,
                Err(e) => return (FailureKind::Unreachable, e.to_string()),
            },
        };
        let shown = connect::redact(&key);
        let found = match tokio::time::timeout(PROBE_TIMEOUT, options.connect()).await {
            Ok(Ok(client)) => {
                drop(client);
                (
                    FailureKind::Unreachable,
                    format!("NATS at {shown} is reconnecting; retrying"),
                )
            }
            Ok(Err(error)) => (error.kind, error.to_string()),
            Err(_) => (
                FailureKind::Unreachable,
                format!("cannot reach NATS at {shown}: timed out; retrying"),
            ),
        };
        if found.0 != FailureKind::Unreachable {
            tracing::warn!(url = %shown, error = %found.1, "NATS refused the connection");
        }
        self.lock_probes()
            .insert(key, (Instant::now(), found.clone()));
        found
    }

    /// Clients are keyed by URL and, for a queue's own Secrets, by an identity naming them
    /// (`namespace/credentials/tls`), so queues on one server with different Secrets do not
    /// replace each other's client.
    fn key(url: &str, identity: Option<&str>) -> String {
        match identity {
            Some(identity) => format!("{url}\n{identity}"),
            None => url.to_owned(),
        }
    }

    /// Records that `queue` is served through the client of `url` (the default when `None`)
    /// made with the Secrets `identity` names, for the dispatcher of that client.
    pub fn assign(&self, queue: &QueueRef, url: Option<&str>, identity: Option<&str>) {
        let key = Self::key(url.unwrap_or(&self.default_raw), identity);
        self.lock_assigned().insert(queue.clone(), key);
    }

    /// Forgets a queue that is being deleted.
    pub fn unassign(&self, queue: &QueueRef) {
        self.lock_assigned().remove(queue);
    }

    /// The queues assigned to the client with this key (as [`NatsPool::clients`] lists it).
    pub fn assigned(&self, key: &str) -> Vec<QueueRef> {
        self.lock_assigned()
            .iter()
            .filter(|(_, k)| k.as_str() == key)
            .map(|(queue, _)| queue.clone())
            .collect()
    }

    fn lock_assigned(&self) -> std::sync::MutexGuard<'_, HashMap<QueueRef, String>> {
        self.assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn forget_probe(&self, key: &str) {
        self.lock_probes().remove(key);
    }

    fn lock_probes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Probe>> {
        self.probes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// The data of a credentials or TLS Secret, written to a private directory of this process
/// (mode 0700, files 0600) named by a hash of the data, so unchanged Secrets give unchanged
/// options (and keep their client) while a rotated one gives new paths.
pub fn secret_dir(data: &BTreeMap<String, Vec<u8>>) -> std::io::Result<PathBuf> {
    use std::hash::{Hash as _, Hasher as _};
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut hasher);
    let root = std::env::temp_dir().join(format!("conveyor-operator-{}", std::process::id()));
    let dir = root.join(format!("{:016x}", hasher.finish()));
    if dir.exists() {
        return Ok(dir);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    for (key, value) in data {
        // Secret keys are [-._a-zA-Z0-9]+; anything else cannot be a file we read.
        if key.is_empty()
            || key.starts_with('.')
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            continue;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(key))?
            .write_all(value)?;
    }
    Ok(dir)
}

/// A queue's options: its URL and, when named, the credentials and TLS Secrets' data.
pub fn queue_options(
    url: &str,
    credentials: Option<&BTreeMap<String, Vec<u8>>>,
    tls: Option<&BTreeMap<String, Vec<u8>>>,
) -> Result<NatsOptions, QueueOptionsError> {
    let mut options = NatsOptions::new(url)?;
    if let Some(data) = credentials {
        options = options.credentials_dir(&secret_dir(data).map_err(QueueOptionsError::Write)?)?;
    }
    if let Some(data) = tls {
        options = options.tls_dir(&secret_dir(data).map_err(QueueOptionsError::Write)?);
    }
    Ok(options)
}

/// A queue's Secrets could not be made into options.
#[derive(Debug, thiserror::Error)]
pub enum QueueOptionsError {
    /// The URL or the Secret's keys are unusable.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The Secret's data could not be written to the operator's private files.
    #[error("writing NATS Secret data to a private file: {0}")]
    Write(#[source] std::io::Error),
}
