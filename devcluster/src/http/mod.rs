//! The HTTP front of the API server: routes Kubernetes API paths to discovery, OpenAPI and the
//! resource verbs. Plain HTTP on a loopback address.

mod logs;
pub(crate) mod resource;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::discovery;
use crate::error::ApiError;
use crate::registry::Registry;
use crate::store::{Gr, Rules, Store};

/// Largest request body, as kube-apiserver's limit (3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Shared state of one API server.
pub struct ApiState {
    /// The objects.
    pub store: Store,
    registry: RwLock<Arc<Registry>>,
    /// Where the kubelet writes container logs (`<ns>/<pod>/<container>.log`).
    pub logs_dir: PathBuf,
    /// Bind new pods to the devcluster node (the kubelet runs).
    pub schedule: bool,
    /// Ends watches and log streams when the server stops.
    pub shutdown: CancellationToken,
    /// `host:port` the server listens on, for `/api` discovery.
    pub address: String,
    /// Requests served, by HTTP method (a watch counts once), for tests that measure the load
    /// a client puts on the API server.
    pub requests: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// The permissions the served resource requests needed, by identity.
    pub access: crate::audit::AccessLog,
}

impl ApiState {
    /// A server state with the default namespaces and the devcluster Node.
    pub fn new(
        logs_dir: PathBuf,
        schedule: bool,
        shutdown: CancellationToken,
        address: String,
    ) -> Self {
        let st = Self {
            store: Store::new(),
            registry: RwLock::new(Arc::new(Registry::default())),
            logs_dir,
            schedule,
            shutdown,
            address,
            requests: std::sync::Mutex::default(),
            access: crate::audit::AccessLog::default(),
        };
        let ns_rules = Rules {
            namespaced: false,
            status: true,
            generation: false,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let mut obj =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            crate::builtin::apply_defaults("", "namespaces", &mut obj, true, false);
            st.store
                .create(
                    &(String::new(), "namespaces".into()),
                    "",
                    obj,
                    ns_rules,
                    false,
                )
                .expect("fresh store accepts the default namespaces");
        }
        st.store
            .create(
                &(String::new(), "nodes".into()),
                "",
                node(),
                Rules {
                    namespaced: false,
                    status: true,
                    generation: false,
                },
                false,
            )
            .expect("fresh store accepts the node");
        st
    }

    /// The current set of served resources.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the CRDs after one changed.
    fn refresh_registry(&self) {
        let gr: Gr = (
            "apiextensions.k8s.io".into(),
            "customresourcedefinitions".into(),
        );
        let crds = self
            .store
            .list(&gr, None, &|_| true, None, None)
            .map(|l| l.items)
            .unwrap_or_default();
        let reg = Registry::with_crds(
            crds.iter()
                .filter(|c| c.pointer("/metadata/deletionTimestamp").is_none()),
        );
        *self.registry.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(reg);
    }
}

fn node() -> Value {
    let allocatable: serde_json::Map<String, Value> = crate::builtin::NODE_ALLOCATABLE
        .iter()
        .map(|(r, q)| ((*r).to_owned(), json!(q)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": crate::kubelet::NODE_NAME, "labels": {
            "kubernetes.io/hostname": crate::kubelet::NODE_NAME, "kubernetes.io/os": "linux",
            "node-role.kubernetes.io/control-plane": ""}},
        "spec": {},
        "status": {
            "capacity": allocatable,
            "allocatable": allocatable,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "devcluster"}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "process kubelet is posting ready status",
                            "lastHeartbeatTime": crate::store::now(), "lastTransitionTime": crate::store::now()}],
            "nodeInfo": {"kubeletVersion": "v1.33.0-devcluster", "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "process://devcluster", "osImage": "devcluster",
                         "kernelVersion": "", "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""}
        }
    })
}

/// A JSON response.
pub(crate) fn json_response(code: u16, body: &Value) -> Response {
    let code = axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::OK);
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Builds the router of one API server.
pub fn router(state: Arc<ApiState>) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn handle(
    State(st): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let path = uri.path().trim_end_matches('/').to_owned();
    tracing::debug!(%method, %uri, "request");
    *st.requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(method.to_string())
        .or_default() += 1;
    match dispatch(&st, &method, &path, &query, &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, %uri, error = %e, "request failed");
            e.into_response()
        }
    }
}

async fn dispatch(
    st: &Arc<ApiState>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .unwrap_or_default();
    let body = if content_type.contains("protobuf") || content_type.contains("cbor") {
        // kubectl's typed generator commands send protobuf; a few simple kinds are understood.
        match crate::protobuf::decode(&body) {
            Some(obj) => Bytes::from(obj.to_string()),
            None => {
                return Err(ApiError::unsupported_media_type(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type})"
                )));
            }
        }
    } else {
        body
    };
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let reg = st.registry();
    let get = method == Method::GET;
    match segs.as_slice() {
        ["version"] if get => return Ok(json_response(200, &discovery::version())),
        ["healthz" | "livez" | "readyz"] if get => return Ok("ok".into_response()),
        ["api"] if get => return Ok(json_response(200, &discovery::core_versions(&st.address))),
        ["apis"] if get => return Ok(json_response(200, &discovery::group_list(&reg))),
        ["openapi", rest @ ..] if get => return crate::openapi::serve(&reg, rest),
        ["api", v] if get => {
            return discovery::resource_list(&reg, "", v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["apis", g] if get => {
            return discovery::group(&reg, g)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["apis", g, v] if get => {
            return discovery::resource_list(&reg, g, v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::no_route(path)),
    };
    let namespace_sub =
        group.is_empty() && rest.len() == 3 && matches!(rest[2], "status" | "finalize");
    let (ns, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() && !namespace_sub => {
            (Some((*ns).to_owned()), tail)
        }
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [r] => (*r, None, None),
        [r, n] => (*r, Some((*n).to_owned()), None),
        [r, n, s] => (*r, Some((*n).to_owned()), Some((*s).to_owned())),
        _ => return Err(ApiError::no_route(path)),
    };
    let identity = crate::audit::identity(headers);
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let rbac_resource = match &sub {
        Some(s) => format!("{resource}/{s}"),
        None => resource.to_owned(),
    };
    st.access.record(
        &identity,
        crate::audit::Access::new(
            group,
            &rbac_resource,
            crate::audit::verb(method, name.is_some(), watch),
        ),
    );
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        st.access.record_owner_blocks(&identity, &reg, &body);
    }
    let info = reg
        .find(group, version, resource)
        .cloned()
        .ok_or_else(|| ApiError::no_route(path))?;
    if ns.is_some() && !info.namespaced {
        return Err(ApiError::no_route(path));
    }
    let req = resource::Request {
        st: st.clone(),
        info,
        version: version.to_owned(),
        ns,
        name,
        sub,
        query,
        headers,
        body,
    };
    req.serve(method).await
}
