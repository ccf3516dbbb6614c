//! The pod `log` subresource: serves the files the kubelet writes,
//! `<logs_dir>/<namespace>/<pod>/<container>.log` (`.previous.log` for `previous=true`), with
//! `tailLines`, `limitBytes` and `follow`.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::resource::Request;
use crate::error::ApiError;

/// How often a followed log file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

fn container_names(pod: &Value) -> Vec<String> {
    ["/spec/initContainers", "/spec/containers"]
        .iter()
        .flat_map(|p| {
            pod.pointer(p)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

fn tail(text: &str, lines: Option<usize>) -> String {
    let Some(n) = lines else {
        return text.to_owned();
    };
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    all[all.len().saturating_sub(n)..].concat()
}

/// Serves one container's log.
pub(super) async fn serve(req: &Request<'_>) -> Result<Response, ApiError> {
    let ns = req.ns.clone().unwrap_or_default();
    let name = req.name.clone().unwrap_or_default();
    let pod = req.st.store.get(&req.info.storage, &ns, &name)?;
    let containers = container_names(&pod);
    let main: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let container = match req.query.get("container").filter(|c| !c.is_empty()) {
        Some(c) if containers.contains(c) => c.clone(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None if main.len() == 1 => main[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                main.join(" ")
            )));
        }
    };
    let previous = req.query.get("previous").is_some_and(|v| v == "true");
    let file = req.st.logs_dir.join(&ns).join(&name).join(format!(
        "{container}{}.log",
        if previous { ".previous" } else { "" }
    ));
    let tail_lines = req.query.get("tailLines").and_then(|t| t.parse().ok());
    let limit = req
        .query
        .get("limitBytes")
        .and_then(|t| t.parse::<usize>().ok());
    let text = match tokio::fs::read_to_string(&file).await {
        Ok(t) => t,
        Err(_) if previous => {
            return Err(ApiError::bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{name}\" not found"
            )));
        }
        Err(_) => String::new(),
    };
    let mut out = tail(&text, tail_lines);
    if let Some(l) = limit {
        out.truncate(l);
    }
    let follow = req.query.get("follow").is_some_and(|v| v == "true") && !previous;
    if !follow {
        return Ok(Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(Body::from(out))
            .expect("valid response"));
    }
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(16);
    let st = req.st.clone();
    let uid = pod.pointer("/metadata/uid").cloned();
    let storage = req.info.storage.clone();
    let mut offset = text.len() as u64;
    tokio::spawn(async move {
        if tx.send(Ok(out)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = st.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
            if let Ok(mut f) = tokio::fs::File::open(&file).await
                && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
            {
                let mut buf = Vec::new();
                if f.read_to_end(&mut buf).await.is_ok() && !buf.is_empty() {
                    offset += buf.len() as u64;
                    if tx
                        .send(Ok(String::from_utf8_lossy(&buf).into_owned()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
            }
            // The stream ends when the pod is gone or replaced, like a real kubelet's.
            match st.store.get(&storage, &ns, &name) {
                Ok(p) if p.pointer("/metadata/uid").cloned() == uid => {}
                _ => return,
            }
        }
    });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("valid response"))
}
