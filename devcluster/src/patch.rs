//! PATCH bodies: JSON patch, JSON merge patch and strategic merge patch (for the built-in kinds,
//! honouring the merge keys of the lists those kinds use).

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Applies an RFC 6902 JSON patch, all or nothing, with `test` as kube-apiserver's JSON patch
/// library (evanphx/json-patch v4) has it: see [`test`].
pub fn json_patch(cur: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let invalid =
        |e: &dyn std::fmt::Display| ApiError::bad_request(format!("invalid JSON patch: {e}"));
    let ops: Vec<Value> = serde_json::from_slice(body).map_err(|e| invalid(&e))?;
    let mut doc = cur.clone();
    for op in ops {
        if op.get("op").and_then(Value::as_str) == Some("test") {
            test(&doc, &op)?;
            continue;
        }
        let one: json_patch::Patch =
            serde_json::from_value(Value::Array(vec![op])).map_err(|e| invalid(&e))?;
        json_patch::patch(&mut doc, &one.0).map_err(|e| ApiError::invalid_patch(e.to_string()))?;
    }
    Ok(doc)
}

/// A `test` operation: a member that is absent tests equal to `null` (so `{"op": "test",
/// "path": "/metadata/x", "value": null}` asserts that `x` is not set, and a missing `value` is
/// `null`), while a missing parent fails, with the library's messages.
fn test(doc: &Value, op: &Value) -> Result<(), ApiError> {
    let path = op.get("path").and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request("invalid JSON patch: test operation failed to decode path")
    })?;
    let expected = op.get("value").unwrap_or(&Value::Null);
    let failed = || ApiError::invalid_patch(format!("testing value {path} failed: test failed"));
    let missing = || {
        ApiError::invalid_patch(format!(
            "test operation does not apply: is missing path: {path}: missing value"
        ))
    };
    if path.is_empty() {
        return if doc == expected {
            Ok(())
        } else {
            Err(failed())
        };
    }
    let (parent, key) = path.rsplit_once('/').ok_or_else(missing)?;
    let key = key.replace("~1", "/").replace("~0", "~");
    let actual = match doc.pointer(parent).ok_or_else(missing)? {
        Value::Object(members) => members.get(&key),
        Value::Array(items) => Some(
            key.parse::<usize>()
                .ok()
                .and_then(|i| items.get(i))
                .ok_or_else(|| {
                    ApiError::invalid_patch(format!(
                        "error in test for path: '{path}': invalid index referenced"
                    ))
                })?,
        ),
        _ => return Err(missing()),
    };
    match actual {
        None if expected.is_null() => Ok(()),
        Some(value) if value == expected => Ok(()),
        _ => Err(failed()),
    }
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(cur: &Value, patch: &Value) -> Value {
    let mut doc = cur.clone();
    json_patch::merge(&mut doc, patch);
    doc
}

/// The merge key of a list field in the built-in kinds, or `None` for atomic lists.
/// `Some("")` marks a list of primitives merged as a set (finalizers).
pub fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => "name",
        "volumeMounts" | "volumeDevices" => "mountPath",
        "ports" => "containerPort",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "containerStatuses" | "initContainerStatuses" => "name",
        "hostAliases" => "ip",
        "finalizers" => "",
        _ => return None,
    })
}

/// Applies a strategic merge patch: like a merge patch, but lists with a merge key are merged
/// item by item (`$patch: delete` removes an item, `$patch: replace` replaces the list) and
/// `$setElementOrder`/`$retainKeys` directives are accepted and ignored.
pub fn strategic_merge(cur: &Value, patch: &Value) -> Value {
    let mut doc = cur.clone();
    smp_value(&mut doc, patch, "");
    doc
}

fn smp_value(doc: &mut Value, patch: &Value, field: &str) {
    match patch {
        Value::Object(p) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut clean = p.clone();
                clean.remove("$patch");
                *doc = Value::Object(clean);
                return;
            }
            if !doc.is_object() {
                *doc = Value::Object(Map::new());
            }
            let d = doc.as_object_mut().expect("object");
            for (k, v) in p {
                if let Some(list_field) = k.strip_prefix("$deleteFromPrimitiveList/") {
                    if let (Some(Value::Array(items)), Some(del)) =
                        (d.get_mut(list_field), v.as_array())
                    {
                        items.retain(|i| !del.contains(i));
                    }
                    continue;
                }
                if k.starts_with('$') {
                    continue;
                }
                if v.is_null() {
                    d.remove(k);
                    continue;
                }
                let slot = d.entry(k.clone()).or_insert(Value::Null);
                match v {
                    Value::Array(items) => smp_list(slot, items, k),
                    Value::Object(_) => smp_value(slot, v, k),
                    _ => *slot = v.clone(),
                }
            }
        }
        Value::Array(items) => smp_list(doc, items, field),
        _ => *doc = patch.clone(),
    }
}

fn smp_list(doc: &mut Value, items: &[Value], field: &str) {
    let Some(key) = merge_key(field) else {
        *doc = Value::Array(items.iter().map(strip_directives).collect());
        return;
    };
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *doc = Value::Array(
            items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .map(strip_directives)
                .collect(),
        );
        return;
    }
    if !doc.is_array() {
        *doc = Value::Array(Vec::new());
    }
    let list = doc.as_array_mut().expect("array");
    for item in items {
        if key.is_empty() {
            if !list.contains(item) {
                list.push(item.clone());
            }
            continue;
        }
        let id = item.get(key).cloned();
        let pos = id
            .as_ref()
            .and_then(|id| list.iter().position(|x| x.get(key) == Some(id)));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(p) = pos {
                list.remove(p);
            }
            continue;
        }
        match pos {
            Some(p) => smp_value(&mut list[p], item, ""),
            None => list.push(strip_directives(item)),
        }
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        _ => v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name() {
        let cur = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let patch = json!({"spec": {"$setElementOrder/containers": [{"name": "a"}], "containers": [
            {"name": "a", "image": "z"}, {"name": "b", "$patch": "delete"}, {"name": "c", "image": "w"}
        ]}});
        let out = strategic_merge(&cur, &patch);
        assert_eq!(
            out,
            json!({"spec": {"containers": [{"name": "a", "image": "z"}, {"name": "c", "image": "w"}]}})
        );
    }

    #[test]
    fn strategic_replaces_atomic_lists_and_deletes_nulls() {
        let cur = json!({"spec": {"args": ["a"], "x": 1}, "metadata": {"finalizers": ["f1"]}});
        let patch = json!({"spec": {"args": ["b"], "x": null}, "metadata": {"finalizers": ["f2"]}});
        let out = strategic_merge(&cur, &patch);
        assert_eq!(
            out,
            json!({"spec": {"args": ["b"]}, "metadata": {"finalizers": ["f1", "f2"]}})
        );
    }

    #[test]
    fn json_patch_applies() {
        let out = json_patch(
            &json!({"a": 1}),
            br#"[{"op":"replace","path":"/a","value":2}]"#,
        )
        .unwrap();
        assert_eq!(out, json!({"a": 2}));
    }

    #[test]
    fn json_patch_test_treats_an_absent_member_as_null() {
        let cur = json!({"metadata": {"labels": {"a": "1"}}, "list": [1]});
        let patch = |ops: Value| json_patch(&cur, ops.to_string().as_bytes());
        // Absent and expected null (or no value): passes, and the next op applies.
        let out = patch(json!([
            {"op": "test", "path": "/metadata/annotations", "value": null},
            {"op": "test", "path": "/metadata/labels/b"},
            {"op": "add", "path": "/metadata/labels/b", "value": "2"}
        ]))
        .unwrap();
        assert_eq!(out["metadata"]["labels"]["b"], "2");
        // Present and equal, escaped keys included.
        let cur2 = json!({"m": {"a/b": 1}});
        json_patch(&cur2, br#"[{"op":"test","path":"/m/a~1b","value":1}]"#).unwrap();
        // Absent but a value expected; present but different; a missing parent; a bad index.
        for (ops, says) in [
            (
                json!([{"op": "test", "path": "/metadata/x", "value": "v"}]),
                "testing value /metadata/x failed",
            ),
            (
                json!([{"op": "test", "path": "/metadata/labels/a", "value": null}]),
                "testing value /metadata/labels/a failed",
            ),
            (
                json!([{"op": "test", "path": "/spec/x", "value": null}]),
                "test operation does not apply: is missing path: /spec/x",
            ),
            (
                json!([{"op": "test", "path": "/list/3", "value": null}]),
                "error in test for path: '/list/3'",
            ),
        ] {
            let err = patch(ops).unwrap_err();
            assert_eq!(err.code, 422);
            assert!(err.message.contains(says), "{}", err.message);
        }
        // A failed test leaves everything unapplied.
        assert!(
            patch(json!([
                {"op": "add", "path": "/metadata/labels/c", "value": "3"},
                {"op": "test", "path": "/metadata/x", "value": "v"}
            ]))
            .is_err()
        );
    }
}
