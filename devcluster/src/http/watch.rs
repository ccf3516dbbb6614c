//! Watches: a stream of JSON lines (`{"type": ..., "object": ...}`) with resourceVersion
//! semantics, selectors, bookmarks, `sendInitialEvents` and Table rendering for `kubectl get -w`.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::resource::{Output, Request, partial_metadata, present};
use crate::error::ApiError;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{EventType, WatchEvent, WatchFrom, WatchStart};

/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// Starts a watch and returns the streaming response.
pub(super) fn serve(req: &Request<'_>) -> Result<Response, ApiError> {
    let labels = LabelSelector::parse(
        req.query
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    let fields = FieldSelector::parse(
        req.query
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )?;
    let initial_events = req
        .query
        .get("sendInitialEvents")
        .is_some_and(|v| v == "true");
    let rv = req
        .query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let from =
        match rv {
            "" | "0" => WatchFrom::Now,
            _ if initial_events => WatchFrom::Now,
            other => WatchFrom::Rv(other.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {other:?}"))
            })?),
        };
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let start = req
        .st
        .store
        .watch(&req.info.storage, req.ns.as_deref(), from)?;
    let output = super::resource::output(req.headers);
    let w = Watcher {
        info: req.info.clone(),
        version: req.version.clone(),
        ns: req.ns.clone(),
        labels,
        fields,
        output,
        table_header_sent: false,
    };
    let (tx, body_rx) = mpsc::channel::<Result<String, std::io::Error>>(64);
    let shutdown = req.st.shutdown.clone();
    tokio::spawn(async move {
        let _ = w
            .run(
                tx,
                start,
                Opts {
                    bookmarks,
                    initial_events,
                    timeout,
                },
                shutdown,
            )
            .await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(body_rx);
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

struct Opts {
    bookmarks: bool,
    initial_events: bool,
    timeout: Option<Duration>,
}

struct Watcher {
    info: crate::registry::ResourceInfo,
    version: String,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    output: Output,
    table_header_sent: bool,
}

type Tx = mpsc::Sender<Result<String, std::io::Error>>;

impl Watcher {
    fn matches(&self, obj: &Value) -> bool {
        super::resource::selected(&self.info, &self.version, &self.labels, &self.fields, obj)
    }

    /// The event to send for a store event, if any (selectors may turn MODIFIED into ADDED/DELETED).
    fn translate(&self, ev: &WatchEvent) -> Option<(&'static str, Value)> {
        if ev.gr != self.info.storage || self.ns.as_ref().is_some_and(|n| *n != ev.namespace) {
            return None;
        }
        let now = self.matches(&ev.object);
        let kind = match ev.kind {
            EventType::Modified => {
                let before = ev.old.as_ref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => EventType::Modified,
                    (false, true) => EventType::Added,
                    (true, false) => EventType::Deleted,
                    (false, false) => return None,
                }
            }
            k if now => k,
            _ => return None,
        };
        Some((kind.as_str(), ev.object.clone()))
    }

    fn render(&mut self, obj: &Value) -> Value {
        if self.output == Output::Metadata {
            return partial_metadata(obj);
        }
        if self.output == Output::Table {
            let with_defs = !self.table_header_sent;
            self.table_header_sent = true;
            crate::table::render(
                &self.info,
                &self.version,
                std::slice::from_ref(obj),
                with_defs,
            )
        } else {
            present(&self.info, &self.version, obj)
        }
    }

    async fn send(&mut self, tx: &Tx, kind: &str, obj: &Value) -> Result<(), ()> {
        let object = self.render(obj);
        let line = json!({"type": kind, "object": object}).to_string() + "\n";
        tx.send(Ok(line)).await.map_err(|_| ())
    }

    async fn bookmark(&self, tx: &Tx, rv: u64, initial_end: bool) -> Result<(), ()> {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": self.info.kind, "apiVersion": self.info.api_version(&self.version), "metadata": meta});
        let line = json!({"type": "BOOKMARK", "object": object}).to_string() + "\n";
        tx.send(Ok(line)).await.map_err(|_| ())
    }

    async fn run(
        mut self,
        tx: Tx,
        start: WatchStart,
        opts: Opts,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), ()> {
        let WatchStart {
            initial,
            rv: snapshot_rv,
            mut rx,
        } = start;
        let mut last_rv = snapshot_rv;
        for ev in &initial {
            if let Some((kind, obj)) = self.translate(ev) {
                self.send(&tx, kind, &obj).await?;
            }
        }
        if opts.initial_events {
            self.bookmark(&tx, snapshot_rv, true).await?;
        }
        let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(BOOKMARK_EVERY);
        ticker.tick().await;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tx.closed() => return Ok(()),
                _ = until_deadline => return Ok(()),
                _ = ticker.tick(), if opts.bookmarks => self.bookmark(&tx, last_rv, false).await?,
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= snapshot_rv {
                            continue;
                        }
                        last_rv = ev.rv;
                        if let Some((kind, obj)) = self.translate(&ev) {
                            self.send(&tx, kind, &obj).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let status = ApiError::gone("the watch fell behind; start a new one").to_status();
                        let line = json!({"type": "ERROR", "object": status}).to_string() + "\n";
                        let _ = tx.send(Ok(line)).await;
                        return Ok(());
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}
