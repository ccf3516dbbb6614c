//! The verbs on one resource: get, list, watch, create, update, patch, delete, deletecollection,
//! and the status, scale and log subresources.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use serde_json::{Value, json};

use super::{ApiState, json_response};
use crate::builtin;
use crate::error::ApiError;
use crate::registry::{Conversion, ResourceInfo, ScalePaths};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{DeleteOpts, Propagation, Sub, WriteOpts};

/// One request addressed to a resource.
pub(super) struct Request<'a> {
    pub st: Arc<ApiState>,
    pub info: ResourceInfo,
    pub version: String,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    pub query: &'a HashMap<String, String>,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

/// JSON path like `.spec.replicas` to a JSON pointer.
pub(crate) fn path_to_pointer(path: &str) -> String {
    path.trim_start_matches('.')
        .split('.')
        .fold(String::new(), |acc, p| format!("{acc}/{p}"))
}

/// Parses a request body as JSON, or YAML (which kubectl uses for server-side apply).
pub(crate) fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).or_else(|_| {
        serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    })
}

impl Request<'_> {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.param(key), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.param("dryRun") == Some("All")
    }

    fn ns(&self) -> &str {
        self.ns.as_deref().unwrap_or("")
    }

    fn gr(&self) -> crate::store::Gr {
        self.info.storage.clone()
    }

    fn wants_table(&self) -> bool {
        output(self.headers) == Output::Table
    }

    fn wants_metadata(&self) -> bool {
        output(self.headers) == Output::Metadata
    }

    fn field_manager(&self) -> String {
        if let Some(m) = self.param("fieldManager") {
            return m.to_owned();
        }
        let ua = self
            .headers
            .get("user-agent")
            .and_then(|a| a.to_str().ok())
            .unwrap_or("unknown");
        ua.split('/').next().unwrap_or("unknown").to_owned()
    }

    /// The object as the client sees it at the requested version.
    fn present(&self, obj: &Value) -> Value {
        present(&self.info, &self.version, obj)
    }

    /// A client's object converted to storage form.
    fn ingest(&self, obj: Value) -> Value {
        match self.info.conversion {
            Conversion::EventsV1 => builtin::event_v1_to_core(&obj),
            Conversion::None => {
                let mut obj = obj;
                if obj.is_object() {
                    obj["apiVersion"] = json!(self.info.api_version(&self.version));
                    obj["kind"] = json!(self.info.kind);
                }
                obj
            }
        }
    }

    fn check_kind(&self, obj: &Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON or YAML object",
            ));
        }
        if let Some(kind) = obj.get("kind").and_then(Value::as_str)
            && kind != self.info.kind
        {
            return Err(ApiError::bad_request(format!(
                "the body of the request has kind {kind}, but the URL addresses {}",
                self.info.kind
            )));
        }
        if let (Some(ns), Some(body_ns)) = (
            &self.ns,
            obj.pointer("/metadata/namespace").and_then(Value::as_str),
        ) && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok(())
    }

    /// Defaults, validation and the API server's own fields, before a write is stored.
    fn prepare(&self, mut obj: Value, old: Option<&Value>) -> Result<Value, ApiError> {
        let creating = old.is_none();
        builtin::apply_defaults(
            &self.info.group,
            &self.info.resource,
            &mut obj,
            creating,
            self.st.schedule,
        );
        if self.info.group == "apiextensions.k8s.io" {
            let causes = builtin::validate_crd(&obj);
            if !causes.is_empty() {
                let name = obj
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                return Err(ApiError::invalid(
                    &self.info.group,
                    &self.info.kind,
                    name,
                    causes,
                ));
            }
        }
        if self.info.storage.0.is_empty() && self.info.storage.1 == "events" {
            let v1 = self.info.conversion == Conversion::EventsV1;
            let causes = builtin::validate_event(&obj, old, v1);
            if !causes.is_empty() {
                let name = obj.pointer("/metadata/name").and_then(Value::as_str);
                let name = name.unwrap_or_default();
                let group = &self.info.group;
                return Err(ApiError::invalid(group, "Event", name, causes));
            }
        }
        if self.info.is_custom() {
            let strict = self.param("fieldValidation") == Some("Strict");
            obj = crate::validation::admit(&self.info, &self.version, obj, old, strict)?;
        }
        Ok(obj)
    }

    pub(super) async fn serve(self, method: &Method) -> Result<Response, ApiError> {
        let sub = self.sub.clone();
        match (method.as_str(), self.name.is_some(), sub.as_deref()) {
            ("GET", false, None) if self.flag("watch") => super::watch::serve(&self),
            ("GET", false, None) => self.list(),
            ("GET", true, None | Some("status")) => {
                let obj = self.st.store.get(
                    &self.gr(),
                    self.ns(),
                    self.name.as_deref().unwrap_or_default(),
                )?;
                if self.wants_table() {
                    return Ok(json_response(
                        200,
                        &crate::table::render(&self.info, &self.version, &[obj], true),
                    ));
                }
                if self.wants_metadata() {
                    return Ok(json_response(200, &partial_metadata(&obj)));
                }
                Ok(json_response(200, &self.present(&obj)))
            }
            ("GET", true, Some("scale")) if self.info.scale.is_some() => {
                let obj = self.st.store.get(
                    &self.gr(),
                    self.ns(),
                    self.name.as_deref().unwrap_or_default(),
                )?;
                Ok(json_response(200, &self.scale_of(&obj)?))
            }
            ("GET", true, Some("log"))
                if self.info.group.is_empty() && self.info.resource == "pods" =>
            {
                super::logs::serve(&self).await
            }
            ("POST", false, None) => self.create(),
            ("PUT", true, None | Some("status")) => self.update(),
            ("PUT" | "PATCH", true, Some("scale")) if self.info.scale.is_some() => {
                self.write_scale(method)
            }
            ("PATCH", true, None | Some("status")) => self.patch(),
            ("DELETE", true, None) => self.delete(),
            ("POST", true, Some("eviction"))
                if self.info.group.is_empty() && self.info.resource == "pods" =>
            {
                self.evict()
            }
            ("DELETE", false, None) => self.delete_collection(),
            _ => Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on {}{}",
                self.info.resource,
                sub.map(|s| format!("/{s}")).unwrap_or_default()
            ))),
        }
    }

    fn selectors(&self) -> Result<(LabelSelector, FieldSelector), ApiError> {
        Ok((
            LabelSelector::parse(self.param("labelSelector").unwrap_or_default())?,
            FieldSelector::parse(self.param("fieldSelector").unwrap_or_default())?,
        ))
    }

    fn list(&self) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors()?;
        let info = self.info.clone();
        let version = self.version.clone();
        let filter = move |o: &Value| selected(&info, &version, &labels, &fields, o);
        let limit = self
            .param("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0);
        let res = self.st.store.list(
            &self.gr(),
            self.ns.as_deref(),
            &filter,
            limit,
            self.param("continue"),
        )?;
        if self.wants_table() {
            let mut table = crate::table::render(&self.info, &self.version, &res.items, true);
            table["metadata"] = list_meta(res.rv, res.continue_token.as_deref(), res.remaining);
            return Ok(json_response(200, &table));
        }
        if self.wants_metadata() {
            let items: Vec<Value> = res.items.iter().map(partial_metadata).collect();
            return Ok(json_response(
                200,
                &json!({
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadataList",
                    "metadata": list_meta(res.rv, res.continue_token.as_deref(), res.remaining),
                    "items": items,
                }),
            ));
        }
        let items: Vec<Value> = res.items.iter().map(|o| self.present(o)).collect();
        Ok(json_response(
            200,
            &json!({
                "apiVersion": self.info.api_version(&self.version),
                "kind": format!("{}List", self.info.kind),
                "metadata": list_meta(res.rv, res.continue_token.as_deref(), res.remaining),
                "items": items,
            }),
        ))
    }

    fn create(&self) -> Result<Response, ApiError> {
        let obj = parse_body(&self.body)?;
        self.check_kind(&obj)?;
        let mut obj = self.ingest(obj);
        if self.info.status
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        let obj = self.prepare(obj, None)?;
        let mut obj = obj;
        crate::ssa::record_update(
            None,
            &mut obj,
            &self.field_manager(),
            "Update",
            &self.info.api_version(&self.version),
            false,
        );
        let created = self.st.store.create(
            &self.gr(),
            self.ns(),
            obj,
            self.info.rules(),
            self.dry_run(),
        )?;
        let created = self.after_write(created)?;
        Ok(json_response(201, &self.present(&created)))
    }

    /// Follow-ups of a write: CRDs get their status and (un)register their kind.
    fn after_write(&self, obj: Value) -> Result<Value, ApiError> {
        if self.info.group == "apiextensions.k8s.io" && !self.dry_run() {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let status = builtin::crd_status(&obj);
            let obj = if obj.get("status").and_then(|s| s.get("acceptedNames"))
                != Some(&status["acceptedNames"])
            {
                self.st.store.update(
                    &self.gr(),
                    "",
                    &name,
                    WriteOpts {
                        sub: Sub::Status,
                        rules: self.info.rules(),
                        dry_run: false,
                    },
                    &mut |cur| {
                        let mut n = cur.clone();
                        n["status"] = status.clone();
                        Ok(n)
                    },
                )?
            } else {
                obj
            };
            self.st.refresh_registry();
            return Ok(obj);
        }
        Ok(obj)
    }

    fn subresource(&self) -> Sub {
        if self.sub.as_deref() == Some("status") {
            Sub::Status
        } else {
            Sub::Main
        }
    }

    /// The object the store will keep for a desired object, so that validation sees it whole.
    fn merged(&self, cur: &Value, desired: Value) -> Value {
        match self.subresource() {
            Sub::Status => {
                let mut n = cur.clone();
                match desired.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        n.as_object_mut().map(|m| m.remove("status"));
                    }
                }
                if let Some(rv) = desired.pointer("/metadata/resourceVersion") {
                    n["metadata"]["resourceVersion"] = rv.clone();
                }
                // A status apply records its manager's ownership (operation Apply), so that a
                // field it stops applying is removed as on a real API server; without this it
                // was recorded as an Update and such fields stayed forever.
                if let Some(fields) = desired.pointer("/metadata/managedFields")
                    && Some(fields) != cur.pointer("/metadata/managedFields")
                {
                    n["metadata"]["managedFields"] = fields.clone();
                }
                n
            }
            Sub::Main => {
                let mut n = desired;
                if self.info.status {
                    match cur.get("status") {
                        Some(s) => n["status"] = s.clone(),
                        None => {
                            n.as_object_mut().map(|m| m.remove("status"));
                        }
                    }
                }
                n
            }
        }
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let name = self.name.clone().unwrap_or_default();
        let manager = self.field_manager();
        let api_version = self.info.api_version(&self.version);
        let sub = self.subresource();
        let status_sub = sub == Sub::Status;
        let out = self.st.store.update(
            &self.gr(),
            self.ns(),
            &name,
            WriteOpts {
                sub,
                rules: self.info.rules(),
                dry_run: self.dry_run(),
            },
            &mut |cur| {
                let desired = f(cur)?;
                let merged = self.merged(cur, desired);
                let mut new = self.prepare(merged, Some(cur))?;
                if new.pointer("/metadata/managedFields").is_none()
                    || new.pointer("/metadata/managedFields")
                        == cur.pointer("/metadata/managedFields")
                {
                    crate::ssa::record_update(
                        Some(cur),
                        &mut new,
                        &manager,
                        "Update",
                        &api_version,
                        status_sub,
                    );
                }
                Ok(new)
            },
        )?;
        self.after_write(out)
    }

    fn update(&self) -> Result<Response, ApiError> {
        let obj = parse_body(&self.body)?;
        self.check_kind(&obj)?;
        let name = self.name.clone().unwrap_or_default();
        if let Some(body_name) = obj.pointer("/metadata/name").and_then(Value::as_str)
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let obj = self.ingest(obj);
        let out = self.write(&mut |_cur| Ok(obj.clone()))?;
        Ok(json_response(200, &self.present(&out)))
    }

    fn content_type(&self) -> String {
        self.headers
            .get("content-type")
            .and_then(|c| c.to_str().ok())
            .unwrap_or("application/json")
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    fn patch(&self) -> Result<Response, ApiError> {
        let ct = self.content_type();
        if ct == "application/apply-patch+yaml" {
            return self.apply();
        }
        let strategic = ct == "application/strategic-merge-patch+json";
        if strategic && !self.info.strategic() {
            return Err(ApiError::unsupported_media_type(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            ));
        }
        let body = self.body.clone();
        let patch_value = if ct == "application/json-patch+json" {
            Value::Null
        } else {
            parse_body(&body)?
        };
        let out = self.write(&mut |cur| {
            let base = self.present(cur);
            let patched = match ct.as_str() {
                "application/json-patch+json" => crate::patch::json_patch(&base, &body)?,
                "application/merge-patch+json" => crate::patch::merge_patch(&base, &patch_value),
                "application/strategic-merge-patch+json" => {
                    crate::patch::strategic_merge(&base, &patch_value)
                }
                other => {
                    return Err(ApiError::unsupported_media_type(format!(
                        "the body of the request was in an unknown format - {other}"
                    )));
                }
            };
            self.check_kind(&patched)?;
            Ok(self.ingest(patched))
        })?;
        Ok(json_response(200, &self.present(&out)))
    }

    /// Server-side apply: merge the applied configuration under the field manager's ownership.
    fn apply(&self) -> Result<Response, ApiError> {
        let applied = parse_body(&self.body)?;
        self.check_kind(&applied)?;
        let Some(manager) = self.param("fieldManager").map(str::to_owned) else {
            return Err(ApiError::bad_request(
                "PATCH, application/apply-patch+yaml: fieldManager is required",
            ));
        };
        let force = self.flag("force");
        let api_version = self.info.api_version(&self.version);
        let status_sub = self.subresource() == Sub::Status;
        let name = self.name.clone().unwrap_or_default();
        let res = self.write(&mut |cur| {
            let base = self.present(cur);
            let out = crate::ssa::apply(
                Some(&base),
                &applied,
                &manager,
                force,
                &api_version,
                status_sub,
            )?;
            Ok(self.ingest(out))
        });
        match res {
            Ok(out) => Ok(json_response(200, &self.present(&out))),
            Err(e) if e.code == 404 && !status_sub => {
                // An apply that creates is authorized as a create too.
                self.st.access.record(
                    &crate::audit::identity(self.headers),
                    crate::audit::Access::new(&self.info.group, &self.info.resource, "create"),
                );
                let mut obj =
                    crate::ssa::apply(None, &applied, &manager, force, &api_version, false)?;
                obj["metadata"]["name"] = json!(name);
                let mut obj = self.ingest(obj);
                if self.info.status
                    && let Some(m) = obj.as_object_mut()
                {
                    m.remove("status");
                }
                let obj = self.prepare(obj, None)?;
                let created = self.st.store.create(
                    &self.gr(),
                    self.ns(),
                    obj,
                    self.info.rules(),
                    self.dry_run(),
                )?;
                let created = self.after_write(created)?;
                Ok(json_response(201, &self.present(&created)))
            }
            Err(e) => Err(e),
        }
    }

    fn scale_paths(&self) -> Result<ScalePaths, ApiError> {
        self.info
            .scale
            .clone()
            .ok_or_else(|| ApiError::no_route(&format!("{}/scale", self.info.resource)))
    }

    fn scale_of(&self, obj: &Value) -> Result<Value, ApiError> {
        let paths = self.scale_paths()?;
        let spec = obj
            .pointer(&path_to_pointer(&paths.spec_replicas))
            .cloned()
            .unwrap_or(json!(0));
        let status = obj
            .pointer(&path_to_pointer(&paths.status_replicas))
            .cloned()
            .unwrap_or(json!(0));
        let selector = paths
            .label_selector
            .as_deref()
            .and_then(|p| obj.pointer(&path_to_pointer(p)))
            .map(|s| match s {
                Value::Object(_) => json!(LabelSelector::from_object(s).to_string_form()),
                other => other.clone(),
            });
        let meta = &obj["metadata"];
        let mut scale = json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {"name": meta["name"], "uid": meta["uid"], "resourceVersion": meta["resourceVersion"],
                         "creationTimestamp": meta["creationTimestamp"]},
            "spec": {"replicas": spec},
            "status": {"replicas": status},
        });
        if let Some(ns) = meta.get("namespace") {
            scale["metadata"]["namespace"] = ns.clone();
        }
        if let Some(sel) = selector {
            scale["status"]["selector"] = sel;
        }
        Ok(scale)
    }

    fn write_scale(&self, method: &Method) -> Result<Response, ApiError> {
        let paths = self.scale_paths()?;
        let manager = self.field_manager();
        let ct = self.content_type();
        let body = self.body.clone();
        let name = self.name.clone().unwrap_or_default();
        let is_put = method == Method::PUT;
        let out = self.st.store.update(
            &self.gr(),
            self.ns(),
            &name,
            WriteOpts {
                sub: Sub::Main,
                rules: self.info.rules(),
                dry_run: self.dry_run(),
            },
            &mut |cur| {
                let scale = self.scale_of(cur)?;
                let new_scale = if is_put {
                    parse_body(&body)?
                } else {
                    match ct.as_str() {
                        "application/json-patch+json" => crate::patch::json_patch(&scale, &body)?,
                        "application/strategic-merge-patch+json" => {
                            crate::patch::strategic_merge(&scale, &parse_body(&body)?)
                        }
                        _ => crate::patch::merge_patch(&scale, &parse_body(&body)?),
                    }
                };
                let replicas = new_scale
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .ok_or_else(|| ApiError::bad_request("the Scale object needs spec.replicas"))?;
                if replicas < 0 {
                    return Err(ApiError::invalid(
                        "autoscaling",
                        "Scale",
                        &name,
                        vec![crate::error::Cause {
                            reason: "FieldValueInvalid".into(),
                            field: "spec.replicas".into(),
                            message: format!(
                                "Invalid value: {replicas}: must be greater than or equal to 0"
                            ),
                        }],
                    ));
                }
                let mut new = cur.clone();
                let ptr = path_to_pointer(&paths.spec_replicas);
                match new.pointer_mut(&ptr) {
                    Some(slot) => *slot = json!(replicas),
                    None => {
                        let (parent, leaf) = ptr.rsplit_once('/').unwrap_or(("", "replicas"));
                        if let Some(p) = new.pointer_mut(parent).and_then(Value::as_object_mut) {
                            p.insert(leaf.to_owned(), json!(replicas));
                        }
                    }
                }
                if let Some(rv) = new_scale.pointer("/metadata/resourceVersion") {
                    new["metadata"]["resourceVersion"] = rv.clone();
                }
                // The writer of the scale subresource owns the replicas it set.
                let api_version = self.info.api_version(&self.version);
                crate::ssa::record_update(
                    Some(cur),
                    &mut new,
                    &manager,
                    "Update",
                    &api_version,
                    false,
                );
                if self.info.is_custom() {
                    return crate::validation::admit(
                        &self.info,
                        &self.version,
                        new,
                        Some(cur),
                        false,
                    );
                }
                Ok(new)
            },
        )?;
        Ok(json_response(200, &self.scale_of(&out)?))
    }

    /// The eviction subresource: with no PodDisruptionBudgets, an eviction is a graceful delete
    /// with the Eviction's `deleteOptions`.
    fn evict(&self) -> Result<Response, ApiError> {
        let eviction = parse_body(&self.body)?;
        let options = eviction
            .get("deleteOptions")
            .cloned()
            .unwrap_or(Value::Null);
        let opts = self.delete_options_from(&options)?;
        let name = self.name.clone().unwrap_or_default();
        self.delete_one(&name, &opts)?;
        Ok(json_response(
            201,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ))
    }

    fn delete_opts(&self) -> Result<DeleteOpts, ApiError> {
        let body = parse_body(&self.body)?;
        self.delete_options_from(&body)
    }

    fn delete_options_from(&self, body: &Value) -> Result<DeleteOpts, ApiError> {
        let propagation = body
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .or(self.param("propagationPolicy"))
            .map(|p| match p {
                "Foreground" => Ok(Propagation::Foreground),
                "Background" => Ok(Propagation::Background),
                "Orphan" => Ok(Propagation::Orphan),
                other => Err(ApiError::bad_request(format!(
                    "invalid propagationPolicy {other:?}"
                ))),
            })
            .transpose()?;
        let propagation = propagation.or(
            match body.get("orphanDependents").and_then(Value::as_bool) {
                Some(true) => Some(Propagation::Orphan),
                _ => None,
            },
        );
        let grace = body
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| {
                self.param("gracePeriodSeconds")
                    .and_then(|g| g.parse().ok())
            });
        let dry_run = self.dry_run()
            || body
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v == "All"));
        Ok(DeleteOpts {
            propagation,
            grace,
            uid: body
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(str::to_owned),
            rv: body
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_owned),
            dry_run,
        })
    }

    fn delete_one(&self, name: &str, opts: &DeleteOpts) -> Result<Value, ApiError> {
        let is_crd = self.info.group == "apiextensions.k8s.io";
        if is_crd && !opts.dry_run {
            // The CRD's custom resources go first (a real server does this behind a finalizer).
            let crd = self.st.store.get(&self.gr(), "", name)?;
            if let Some(r) = crate::registry::from_crd(&crd) {
                let items = self
                    .st
                    .store
                    .list(&r.storage, None, &|_| true, None, None)?
                    .items;
                for item in items {
                    let ns = item
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let n = item
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let _ = self
                        .st
                        .store
                        .delete(&r.storage, ns, n, &DeleteOpts::default());
                }
            }
        }
        let (obj, _gone) = self.st.store.delete(&self.gr(), self.ns(), name, opts)?;
        if is_crd {
            self.st.refresh_registry();
        }
        Ok(obj)
    }

    fn delete(&self) -> Result<Response, ApiError> {
        let opts = self.delete_opts()?;
        let obj = self.delete_one(self.name.as_deref().unwrap_or_default(), &opts)?;
        Ok(json_response(200, &self.present(&obj)))
    }

    fn delete_collection(&self) -> Result<Response, ApiError> {
        let opts = self.delete_opts()?;
        let (labels, fields) = self.selectors()?;
        let info = self.info.clone();
        let version = self.version.clone();
        let filter = move |o: &Value| selected(&info, &version, &labels, &fields, o);
        let res = self
            .st
            .store
            .list(&self.gr(), self.ns.as_deref(), &filter, None, None)?;
        let mut items = Vec::new();
        for item in res.items {
            let name = item
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let ns = item
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match self.st.store.delete(&self.gr(), ns, name, &opts) {
                Ok((obj, _)) => items.push(self.present(&obj)),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(json_response(
            200,
            &json!({
                "apiVersion": self.info.api_version(&self.version),
                "kind": format!("{}List", self.info.kind),
                "metadata": {"resourceVersion": self.st.store.current_rv().to_string()},
                "items": items,
            }),
        ))
    }
}

fn list_meta(rv: u64, cont: Option<&str>, remaining: Option<usize>) -> Value {
    let mut m = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        m["continue"] = json!(c);
    }
    if let Some(r) = remaining {
        m["remainingItemCount"] = json!(r);
    }
    m
}

/// The representation a client asked for with the first media type of its `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// The object itself.
    Object,
    /// A `meta.k8s.io/v1` Table.
    Table,
    /// `PartialObjectMetadata` (kube-rs metadata watches).
    Metadata,
}

pub(crate) fn output(headers: &HeaderMap) -> Output {
    let first = headers
        .get("accept")
        .and_then(|a| a.to_str().ok())
        .and_then(|a| a.split(',').next())
        .unwrap_or_default();
    if first.contains("as=Table") {
        Output::Table
    } else if first.contains("as=PartialObjectMetadata") {
        Output::Metadata
    } else {
        Output::Object
    }
}

/// An object reduced to its metadata.
pub(crate) fn partial_metadata(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
}

/// Whether an object passes the selectors (field selectors see the object as the client does).
pub(crate) fn selected(
    info: &ResourceInfo,
    version: &str,
    labels: &LabelSelector,
    fields: &FieldSelector,
    obj: &Value,
) -> bool {
    labels.matches(obj) && (fields.is_empty() || fields.matches(&present(info, version, obj)))
}

/// A stored object as the client sees it at `version`.
pub(crate) fn present(info: &ResourceInfo, version: &str, obj: &Value) -> Value {
    match info.conversion {
        Conversion::EventsV1 => builtin::event_core_to_v1(obj),
        Conversion::None => {
            let mut obj = obj.clone();
            if obj.is_object() {
                obj["apiVersion"] = json!(info.api_version(version));
                obj["kind"] = json!(info.kind);
            }
            obj
        }
    }
}
