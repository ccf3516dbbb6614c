//! OpenAPI v3 documents: the operations of every resource (so that kubectl sees that the server
//! validates fields itself, `fieldValidation`) and the schemas of custom resources (from their
//! CRDs, for `kubectl explain`). Built-in kinds have no schema (kubectl uses its compiled-in
//! types for them); `/openapi/v2` is not served.

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::http::json_response;
use crate::registry::{Registry, ResourceInfo};

/// Serves `/openapi/...`.
pub fn serve(reg: &Registry, rest: &[&str]) -> Result<axum::response::Response, ApiError> {
    match rest {
        ["v3"] => Ok(json_response(200, &index(reg))),
        ["v3", "api", v] => doc(reg, "", v),
        ["v3", "apis", g, v] => doc(reg, g, v),
        _ => Err(ApiError::no_route(&format!("/openapi/{}", rest.join("/")))),
    }
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, vs) in reg.groups() {
        for v in vs {
            let p = gv_path(&g, &v);
            let hash = format!("{:016X}", fingerprint(&doc_value(reg, &g, &v).to_string()));
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn fingerprint(s: &str) -> u64 {
    // FNV-1a: stable across runs, enough to change the URL when a schema changes.
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn doc(reg: &Registry, group: &str, version: &str) -> Result<axum::response::Response, ApiError> {
    if reg.in_group_version(group, version).next().is_none() {
        return Err(ApiError::no_route(&format!(
            "/openapi/v3/{}",
            gv_path(group, version)
        )));
    }
    Ok(json_response(200, &doc_value(reg, group, version)))
}

/// The schema name Kubernetes uses: reversed group, version, kind (`dev.conveyor.v1alpha1.JobQueue`).
fn schema_name(r: &ResourceInfo, version: &str) -> String {
    let group: Vec<&str> = if r.group.is_empty() {
        vec!["io", "k8s", "api", "core"]
    } else {
        r.group.split('.').rev().collect()
    };
    format!("{}.{version}.{}", group.join("."), r.kind)
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn doc_value(reg: &Registry, group: &str, version: &str) -> Value {
    let mut schemas = Map::new();
    let mut paths = Map::new();
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".into(),
        json!({"description": "Standard object's metadata.", "type": "object",
               "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                              "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                              "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}),
    );
    for r in reg.in_group_version(group, version) {
        let name = schema_name(r, version);
        let gvk = json!([{"group": r.group, "version": version, "kind": r.kind}]);
        let base = if r.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}",
                gv_path(group, version),
                r.resource
            )
        } else {
            format!("/{}/{}", gv_path(group, version), r.resource)
        };
        let Some(mut schema) = r.crd.as_ref().and_then(|v| v.get(version)).map(|v| {
            v.schema.clone().unwrap_or_else(
                || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            )
        }) else {
            // Built-in kinds: operations only (no schema), so that kubectl sees server-side field
            // validation and uses its compiled-in types for patches.
            let op = |verb: &str| {
                let params: Vec<Value> = ["dryRun", "fieldManager", "fieldValidation", "force"]
                    .iter()
                    .map(|p| param(p))
                    .collect();
                json!({"operationId": format!("{verb}{}", r.kind), "parameters": params,
                       "x-kubernetes-action": verb, "x-kubernetes-group-version-kind": gvk[0]})
            };
            paths.insert(base.clone(), json!({"post": op("post")}));
            paths.insert(
                format!("{base}/{{name}}"),
                json!({"put": op("put"), "patch": op("patch")}),
            );
            continue;
        };
        if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert(
                "metadata".into(),
                json!({"description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
                       "allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}]}),
            );
            props.entry("apiVersion").or_insert(json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
            props.entry("kind").or_insert(json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
        }
        schema["x-kubernetes-group-version-kind"] = gvk.clone();
        schemas.insert(name.clone(), schema);
        let body = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}});
        let response = json!({"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}}});
        let op = |verb: &str, extra: &[&str]| {
            let mut params: Vec<Value> = ["dryRun", "fieldManager"]
                .iter()
                .map(|p| param(p))
                .collect();
            params.extend(extra.iter().map(|p| param(p)));
            json!({"operationId": format!("{verb}{}", r.kind), "parameters": params, "requestBody": body, "responses": response,
                   "x-kubernetes-action": verb, "x-kubernetes-group-version-kind": gvk[0]})
        };
        paths.insert(
            base.clone(),
            json!({"post": op("post", &["fieldValidation"]), "get": {"responses": response}}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"put": op("put", &["fieldValidation"]), "patch": op("patch", &["fieldValidation", "force"]),
                   "get": {"responses": response}, "delete": {"responses": response}}),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}
