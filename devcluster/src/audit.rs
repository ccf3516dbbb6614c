//! Which permissions the served requests needed, per identity: the (API group, resource,
//! verb) triples an RBAC authorizer would have checked, so a test can compare what a client
//! really uses with the role it is given.
//!
//! The identity is the `Impersonate-User` header (what `kubectl --as` and kube-rs'
//! `AuthInfo::impersonate` send), since the double authenticates nobody; requests without it
//! are recorded under the empty identity. The verb is derived as kube-apiserver's
//! `RequestInfoFactory` does: `get`/`list`/`watch` for reads (`watch=true` makes a watch),
//! `create` for POST, `update` for PUT, `patch` for PATCH (server-side apply included),
//! `delete`/`deletecollection` for DELETE; a subresource is named `resource/subresource`. A
//! server-side apply that creates the object needs `create` as well as `patch`, as on a real
//! server.
//! As the `OwnerReferencesPermissionEnforcement` admission plugin does, a write that sets an
//! owner reference with `blockOwnerDeletion: true` also needs `update` on the owner's
//! `finalizers` subresource, which is recorded too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use axum::http::{HeaderMap, Method};
use serde_json::Value;

use crate::registry::Registry;

/// One permission a request needed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    /// The API group (`""` for the core group).
    pub group: String,
    /// The resource, `resource/subresource` for a subresource.
    pub resource: String,
    /// The RBAC verb.
    pub verb: String,
}

impl Access {
    /// The permission `verb` on `resource` in `group`.
    pub fn new(group: &str, resource: &str, verb: &str) -> Self {
        Self {
            group: group.to_owned(),
            resource: resource.to_owned(),
            verb: verb.to_owned(),
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)
    }
}

/// The permissions used so far, by identity.
#[derive(Debug, Default)]
pub struct AccessLog(Mutex<BTreeMap<String, BTreeSet<Access>>>);

/// The identity a request acts as: its `Impersonate-User`, empty when it has none.
pub fn identity(headers: &HeaderMap) -> String {
    headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The RBAC verb of a request on a resource (`name` when it addresses one object).
pub fn verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match (method.as_str(), named) {
        ("GET" | "HEAD", _) if watch => "watch",
        ("GET" | "HEAD", true) => "get",
        ("GET" | "HEAD", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

impl AccessLog {
    /// Records that `identity` used `access`.
    pub fn record(&self, identity: &str, access: Access) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(identity.to_owned())
            .or_default()
            .insert(access);
    }

    /// Records the `finalizers` permission of each owner that `body` (a write) references with
    /// `blockOwnerDeletion: true`.
    pub fn record_owner_blocks(&self, identity: &str, reg: &Registry, body: &[u8]) {
        let Ok(obj) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let Some(owners) = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
        else {
            return;
        };
        for owner in owners {
            if owner.get("blockOwnerDeletion") != Some(&Value::Bool(true)) {
                continue;
            }
            let api_version = owner
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = owner
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(info) = reg.by_kind(api_version, kind) {
                let resource = format!("{}/finalizers", info.resource);
                self.record(identity, Access::new(&info.group, &resource, "update"));
            }
        }
    }

    /// What `identity` used so far.
    pub fn of(&self, identity: &str) -> BTreeSet<Access> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(identity)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_follow_the_api_server() {
        assert_eq!(verb(&Method::GET, false, true), "watch");
        assert_eq!(verb(&Method::GET, true, false), "get");
        assert_eq!(verb(&Method::GET, false, false), "list");
        assert_eq!(verb(&Method::POST, true, false), "create");
        assert_eq!(verb(&Method::PUT, true, false), "update");
        assert_eq!(verb(&Method::PATCH, true, false), "patch");
        assert_eq!(verb(&Method::DELETE, true, false), "delete");
        assert_eq!(verb(&Method::DELETE, false, false), "deletecollection");
    }
}
