//! Server-side apply and `managedFields`, with a simplified field-ownership model:
//!
//! - every write records which leaf fields its manager set (`operation: Update`), and an apply
//!   records the fields of the applied configuration (`operation: Apply`), in the real
//!   `FieldsV1` format (`f:<field>`, `k:{<merge keys>}` for keyed list items, `v:<value>` for
//!   set items; other lists are atomic leaves);
//! - an apply that changes a field owned by another manager fails with 409 Conflict unless
//!   `force=true`, which takes the field over;
//! - fields the applier owned before and no longer applies are removed unless another manager
//!   owns them.
//!
//! Lists are keyed by the merge keys of [`crate::patch::merge_key`] for built-in kinds and custom
//! resources alike (schema `x-kubernetes-list-map-keys` are not consulted).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::error::{ApiError, Cause};
use crate::patch::merge_key;

/// A path of `FieldsV1` tokens (`f:spec`, `k:{"name":"x"}`, `v:"a"`).
type Path = Vec<String>;

/// Metadata fields that ownership tracks; the rest of metadata belongs to the server.
const TRACKED_META: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

fn collect(v: &Value, field: &str, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(format!("f:{k}"));
                collect(child, k, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) if !items.is_empty() && merge_key(field).is_some() => {
            let key = merge_key(field).unwrap_or_default();
            for item in items {
                let token = if key.is_empty() || !item.is_object() {
                    format!("v:{item}")
                } else {
                    let mut k = Map::new();
                    k.insert(
                        key.to_owned(),
                        item.get(key).cloned().unwrap_or(Value::Null),
                    );
                    format!("k:{}", Value::Object(k))
                };
                prefix.push(token);
                if key.is_empty() || !item.is_object() {
                    out.insert(prefix.clone());
                } else {
                    let mut dot = prefix.clone();
                    dot.push(".".into());
                    out.insert(dot);
                    collect(item, "", prefix, out);
                }
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// The leaf paths an object (or applied configuration) sets.
fn fields_of(obj: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    let Some(m) = obj.as_object() else { return out };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for f in TRACKED_META {
                    if let Some(child) = v.get(f) {
                        let mut p = vec!["f:metadata".to_owned(), format!("f:{f}")];
                        collect(child, f, &mut p, &mut out);
                    }
                }
            }
            _ => {
                let mut p = vec![format!("f:{k}")];
                collect(v, k, &mut p, &mut out);
            }
        }
    }
    out
}

/// `FieldsV1` JSON for a set of paths.
fn to_fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for tok in p {
            cur = cur
                .entry(tok.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("fieldsV1 nodes are objects");
        }
    }
    Value::Object(root)
}

fn from_fields_v1(v: &Value, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                from_fields_v1(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// The value at a path, if present.
fn get_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for tok in path {
        if tok == "." {
            return Some(cur);
        }
        cur = step(cur, tok)?;
    }
    Some(cur)
}

fn item_matches(item: &Value, tok: &str) -> bool {
    if let Some(k) = tok.strip_prefix("k:") {
        let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(k) else {
            return false;
        };
        return keys.iter().all(|(kk, kv)| item.get(kk) == Some(kv));
    }
    if let Some(v) = tok.strip_prefix("v:") {
        return serde_json::from_str::<Value>(v).is_ok_and(|v| &v == item);
    }
    false
}

fn step<'a>(cur: &'a Value, tok: &str) -> Option<&'a Value> {
    if let Some(f) = tok.strip_prefix("f:") {
        return cur.get(f);
    }
    cur.as_array()?.iter().find(|i| item_matches(i, tok))
}

/// Removes the value at a path (a field, or a whole list item).
fn remove_at(obj: &mut Value, path: &[String]) {
    let path: Vec<&String> = path.iter().filter(|t| *t != ".").collect();
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for tok in parents {
        let next = if let Some(f) = tok.strip_prefix("f:") {
            cur.get_mut(f)
        } else {
            cur.as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| item_matches(i, tok)))
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(a) = cur.as_array_mut() {
        a.retain(|i| !item_matches(i, last));
    }
}

fn display(path: &[String]) -> String {
    let mut s = String::new();
    for tok in path {
        if let Some(f) = tok.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = tok.strip_prefix("k:") {
            let keys: Value = serde_json::from_str(k).unwrap_or_default();
            let inner: Vec<String> = keys
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            s.push_str(&format!("[{}]", inner.join(",")));
        } else if let Some(v) = tok.strip_prefix("v:") {
            s.push_str(&format!("[{v}]"));
        }
    }
    s
}

/// One `managedFields` entry, decoded.
struct Entry {
    manager: String,
    operation: String,
    subresource: String,
    raw: Value,
    fields: BTreeSet<Path>,
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                from_fields_v1(f, &mut Vec::new(), &mut fields);
            }
            Entry {
                manager: e
                    .get("manager")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                operation: e
                    .get("operation")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                subresource: e
                    .get("subresource")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                raw: e.clone(),
                fields,
            }
        })
        .collect()
}

fn store_entries(obj: &mut Value, list: Vec<Entry>) {
    let arr: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|mut e| {
            e.raw["fieldsV1"] = to_fields_v1(&e.fields);
            e.raw
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if arr.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(arr));
        }
    }
}

fn new_entry(
    manager: &str,
    operation: &str,
    api_version: &str,
    status: bool,
    fields: BTreeSet<Path>,
) -> Entry {
    let mut raw = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": crate::store::now(),
        "fieldsType": "FieldsV1",
    });
    if status {
        raw["subresource"] = json!("status");
    }
    Entry {
        manager: manager.into(),
        operation: operation.into(),
        subresource: if status {
            "status".into()
        } else {
            String::new()
        },
        raw,
        fields,
    }
}

/// Records the fields a non-apply write changed as owned by `manager` (operation `Update`).
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    operation: &str,
    api_version: &str,
    status: bool,
) {
    let changed: BTreeSet<Path> = fields_of(new)
        .into_iter()
        .filter(|p| old.is_none_or(|o| get_at(o, p) != get_at(new, p)))
        .collect();
    let mut list = entries(old.unwrap_or(new));
    if changed.is_empty() {
        store_entries(new, list);
        return;
    }
    for e in &mut list {
        e.fields.retain(|p| !changed.contains(p));
    }
    let sub = if status { "status" } else { "" };
    match list
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == operation && e.subresource == sub)
    {
        Some(e) => {
            e.fields.extend(changed);
            e.raw["time"] = json!(crate::store::now());
        }
        None => list.push(new_entry(manager, operation, api_version, status, changed)),
    }
    store_entries(new, list);
}

/// Applies a configuration for `manager` on top of the current object (`None`: the object does
/// not exist yet), returning the new object with updated `managedFields`.
pub fn apply(
    cur: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    status: bool,
) -> Result<Value, ApiError> {
    let base = cur.cloned().unwrap_or_else(|| json!({"metadata": {}}));
    let mine = fields_of(applied);
    let mut list = entries(&base);
    let sub = if status { "status" } else { "" };

    // Conflicts: fields that the apply changes and another manager owns.
    let mut conflicts: Vec<(String, Path)> = Vec::new();
    for e in &list {
        if e.manager == manager && e.operation == "Apply" {
            continue;
        }
        for p in e.fields.intersection(&mine) {
            if get_at(&base, p).is_some() && get_at(&base, p) != get_at(applied, p) {
                conflicts.push((e.manager.clone(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let causes: Vec<Cause> = conflicts
            .iter()
            .map(|(m, p)| Cause {
                reason: "FieldManagerConflict".into(),
                field: display(p),
                message: format!("conflict with \"{m}\" using {api_version}"),
            })
            .collect();
        let detail: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.message, c.field))
            .collect();
        let message = if causes.len() == 1 {
            format!("Apply failed with 1 conflict: {}", detail[0])
        } else {
            format!(
                "Apply failed with {} conflicts: {}",
                causes.len(),
                detail.join("\n")
            )
        };
        return Err(ApiError::apply_conflict(message, causes));
    }
    // Forced: the conflicting fields change hands; equal values stay shared.
    for (m, p) in &conflicts {
        for e in list.iter_mut().filter(|e| &e.manager == m) {
            e.fields.remove(p);
        }
    }

    // Merge the configuration (maps recursively, keyed lists by key, other lists atomically).
    let mut out = base.clone();
    let mut patch = applied.clone();
    if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
        m.retain(|k, _| {
            TRACKED_META.contains(&k.as_str())
                || k == "name"
                || k == "namespace"
                || k == "generateName"
        });
    }
    merge_into(&mut out, &patch, "");

    // Fields this manager applied before, applies no longer, and nobody else owns.
    let previous = list
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub)
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: BTreeSet<Path> = list
        .iter()
        .filter(|e| !(e.manager == manager && e.operation == "Apply" && e.subresource == sub))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for p in previous.difference(&mine) {
        if others.contains(p) {
            continue;
        }
        // A keyed list item goes entirely when its identity marker was ours alone.
        let is_item = p.last().is_some_and(|t| t == ".");
        let shared = is_item && others.iter().any(|o| o.starts_with(&p[..p.len() - 1]));
        if !shared {
            remove_at(&mut out, p);
        }
    }

    // An apply that changes nothing leaves the object (and its managedFields times) alone, so
    // that controllers re-applying their desired state do not cause watch events.
    let had_entry = list
        .iter()
        .any(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub);
    if let Some(cur) = cur
        && had_entry
        && previous == mine
        && conflicts.is_empty()
        && without_managed_fields(&out) == without_managed_fields(cur)
    {
        return Ok(cur.clone());
    }
    list.retain(|e| !(e.manager == manager && e.operation == "Apply" && e.subresource == sub));
    list.push(new_entry(manager, "Apply", api_version, status, mine));
    store_entries(&mut out, list);
    Ok(out)
}

fn without_managed_fields(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    v
}

fn merge_into(dst: &mut Value, src: &Value, field: &str) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                match d.get_mut(k) {
                    Some(slot) if !v.is_null() => merge_into(slot, v, k),
                    _ => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(d), Value::Array(s)) if merge_key(field).is_some() => {
            let key = merge_key(field).unwrap_or_default();
            for item in s {
                if key.is_empty() || !item.is_object() {
                    if !d.contains(item) {
                        d.push(item.clone());
                    }
                    continue;
                }
                match d.iter_mut().find(|x| x.get(key) == item.get(key)) {
                    Some(x) => merge_into(x, item, ""),
                    None => d.push(item.clone()),
                }
            }
        }
        (d, s) => *d = s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_then_conflict_then_force() {
        let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
        let obj = apply(None, &cfg, "alice", false, "v1", false).unwrap();
        assert_eq!(obj["data"]["a"], "1");
        assert_eq!(
            obj["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:data": {"f:a": {}}})
        );
        let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "2"}});
        let err = apply(Some(&obj), &other, "bob", false, "v1", false).unwrap_err();
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("conflict with \"alice\""),
            "{}",
            err.message
        );
        assert!(err.message.contains(".data.a"), "{}", err.message);
        let forced = apply(Some(&obj), &other, "bob", true, "v1", false).unwrap();
        assert_eq!(forced["data"]["a"], "2");
        // Same value: shared ownership, no conflict.
        let same = apply(Some(&forced), &other, "carol", false, "v1", false).unwrap();
        assert_eq!(same["data"]["a"], "2");
    }

    #[test]
    fn repeated_apply_is_a_no_op() {
        let cfg = json!({"metadata": {"name": "c"}, "spec": {"replicas": 1}});
        let obj = apply(None, &cfg, "m", false, "v1", false).unwrap();
        let again = apply(Some(&obj), &cfg, "m", false, "v1", false).unwrap();
        assert_eq!(again, obj);
    }

    #[test]
    fn dropped_fields_are_removed() {
        let cfg = json!({"metadata": {"name": "c", "labels": {"x": "1", "y": "2"}},
                         "spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "j"}]}});
        let obj = apply(None, &cfg, "m", false, "v1", false).unwrap();
        let less = json!({"metadata": {"name": "c", "labels": {"x": "1"}},
                          "spec": {"containers": [{"name": "a", "image": "i"}]}});
        let out = apply(Some(&obj), &less, "m", false, "v1", false).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"x": "1"}));
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "a", "image": "i"}])
        );
    }

    #[test]
    fn updates_take_ownership() {
        let cfg = json!({"metadata": {"name": "c"}, "spec": {"replicas": 1}});
        let obj = apply(None, &cfg, "m", false, "v1", false).unwrap();
        let mut new = obj.clone();
        new["spec"]["replicas"] = json!(3);
        record_update(Some(&obj), &mut new, "scaler", "Update", "v1", false);
        let err = apply(Some(&new), &cfg, "m", false, "v1", false).unwrap_err();
        assert!(err.message.contains("scaler"), "{}", err.message);
    }
}
