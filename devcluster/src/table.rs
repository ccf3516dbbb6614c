//! Server-side Table rendering (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`): a
//! CRD's `additionalPrinterColumns` for custom resources and kubectl's familiar columns for the
//! built-in kinds.

use serde_json::{Value, json};

use crate::http::resource::present;
use crate::registry::ResourceInfo;

/// Renders objects as a `meta.k8s.io/v1` Table; `with_defs` includes the column definitions.
pub fn render(info: &ResourceInfo, version: &str, objs: &[Value], with_defs: bool) -> Value {
    let columns = columns(info, version);
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let shown = present(info, version, o);
            let cells: Vec<Value> = columns.iter().map(|c| cell(c, &shown)).collect();
            json!({"cells": cells, "object": shown})
        })
        .collect();
    let defs: Vec<Value> = if with_defs {
        columns
            .iter()
            .map(|c| {
                json!({"name": c.name, "type": c.kind, "format": c.format, "description": c.description,
                       "priority": c.priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": defs, "rows": rows})
}

struct Column {
    name: String,
    kind: String,
    format: String,
    description: String,
    priority: i64,
    /// A JSONPath for printer columns, or a built-in column id (`@name`).
    source: String,
}

fn col(name: &str, kind: &str, source: &str, priority: i64) -> Column {
    Column {
        name: name.into(),
        kind: kind.into(),
        format: if source == "@name" {
            "name".into()
        } else {
            String::new()
        },
        description: String::new(),
        priority,
        source: source.into(),
    }
}

fn columns(info: &ResourceInfo, version: &str) -> Vec<Column> {
    let name = col("Name", "string", "@name", 0);
    let age = col("Age", "string", "@age", 0);
    if let Some(versions) = &info.crd {
        let printer = versions
            .get(version)
            .map(|v| v.printer_columns.clone())
            .unwrap_or_default();
        if printer.is_empty() {
            return vec![name, age];
        }
        let mut cols = vec![name];
        for p in printer {
            let s = |k: &str| {
                p.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            cols.push(Column {
                name: s("name"),
                kind: s("type"),
                format: s("format"),
                description: s("description"),
                priority: p.get("priority").and_then(Value::as_i64).unwrap_or(0),
                source: s("jsonPath"),
            });
        }
        return cols;
    }
    match (info.group.as_str(), info.resource.as_str()) {
        ("", "pods") => vec![
            name,
            col("Ready", "string", "@pod-ready", 0),
            col("Status", "string", "@pod-status", 0),
            col("Restarts", "string", "@pod-restarts", 0),
            age,
            col("IP", "string", ".status.podIP", 1),
            col("Node", "string", ".spec.nodeName", 1),
        ],
        ("apps", "deployments") => vec![
            name,
            col("Ready", "string", "@deploy-ready", 0),
            col("Up-to-date", "integer", "@updated", 0),
            col("Available", "integer", "@available", 0),
            age,
        ],
        ("apps", "replicasets") => vec![
            name,
            col("Desired", "integer", ".spec.replicas", 0),
            col("Current", "integer", "@current", 0),
            col("Ready", "integer", "@ready", 0),
            age,
        ],
        ("", "namespaces") => vec![name, col("Status", "string", ".status.phase", 0), age],
        ("", "nodes") => vec![
            name,
            col("Status", "string", "@node-status", 0),
            col("Roles", "string", "@node-roles", 0),
            age,
            col("Version", "string", ".status.nodeInfo.kubeletVersion", 0),
        ],
        ("", "services") => vec![
            name,
            col("Type", "string", ".spec.type", 0),
            col("Cluster-IP", "string", "@cluster-ip", 0),
            col("External-IP", "string", "@none", 0),
            col("Port(s)", "string", "@ports", 0),
            age,
        ],
        ("", "secrets") => vec![
            name,
            col("Type", "string", ".type", 0),
            col("Data", "integer", "@data", 0),
            age,
        ],
        ("", "configmaps") => vec![name, col("Data", "integer", "@data", 0), age],
        ("coordination.k8s.io", "leases") => vec![
            name,
            col("Holder", "string", ".spec.holderIdentity", 0),
            age,
        ],
        ("apiextensions.k8s.io", _) => vec![name, col("Created At", "date", "@created", 0)],
        (_, "events") => vec![
            col("Last Seen", "string", "@event-last-seen", 0),
            col("Type", "string", ".type", 0),
            col("Reason", "string", ".reason", 0),
            col("Object", "string", "@event-object", 0),
            col("Message", "string", "@event-message", 0),
        ],
        _ => vec![name, age],
    }
}

fn int(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn age_of(ts: Option<&str>) -> Value {
    match ts.and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        Some(t) => json!(human_duration((jiff::Timestamp::now() - t).get_seconds())),
        None => json!("<unknown>"),
    }
}

fn cell(c: &Column, obj: &Value) -> Value {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match c.source.as_str() {
        "@name" => json!(s("/metadata/name")),
        "@age" => age_of(
            obj.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str),
        ),
        "@created" => json!(s("/metadata/creationTimestamp")),
        "@none" => json!("<none>"),
        "@pod-ready" => {
            let total = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |a| {
                    a.iter()
                        .filter(|c| c.get("ready") == Some(&json!(true)))
                        .count()
                });
            json!(format!("{ready}/{total}"))
        }
        "@pod-status" => json!(pod_status(obj)),
        "@pod-restarts" => {
            let n: i64 = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |a| {
                    a.iter()
                        .map(|c| c.get("restartCount").and_then(Value::as_i64).unwrap_or(0))
                        .sum()
                });
            // Like kubectl: "3 (42s ago)", from the latest finish of a previous container.
            let last = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    c.pointer("/lastState/terminated/finishedAt")
                        .and_then(Value::as_str)
                })
                .max();
            match last {
                Some(t) if n > 0 => json!(format!(
                    "{n} ({} ago)",
                    age_of(Some(t)).as_str().unwrap_or("?")
                )),
                _ => json!(n.to_string()),
            }
        }
        "@deploy-ready" => json!(format!(
            "{}/{}",
            int(obj, "/status/readyReplicas"),
            int(obj, "/spec/replicas")
        )),
        "@updated" => json!(int(obj, "/status/updatedReplicas")),
        "@available" => json!(int(obj, "/status/availableReplicas")),
        "@current" => json!(int(obj, "/status/replicas")),
        "@ready" => json!(int(obj, "/status/readyReplicas")),
        "@data" => json!(
            obj.get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
        ),
        "@cluster-ip" => json!(
            obj.pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .unwrap_or("None")
        ),
        "@ports" => {
            let ports: Vec<String> = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p.get("port").unwrap_or(&json!(0)),
                        p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                    )
                })
                .collect();
            json!(if ports.is_empty() {
                "<none>".to_owned()
            } else {
                ports.join(",")
            })
        }
        "@node-status" => {
            let ready = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| {
                    c.get("type") == Some(&json!("Ready"))
                        && c.get("status") == Some(&json!("True"))
                });
            json!(if ready { "Ready" } else { "NotReady" })
        }
        "@node-roles" => {
            let roles: Vec<String> = obj
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| {
                    k.strip_prefix("node-role.kubernetes.io/")
                        .map(str::to_owned)
                })
                .collect();
            json!(if roles.is_empty() {
                "<none>".to_owned()
            } else {
                roles.join(",")
            })
        }
        "@event-last-seen" => {
            let t = obj
                .get("lastTimestamp")
                .or_else(|| obj.get("deprecatedLastTimestamp"))
                .or_else(|| obj.get("eventTime"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            age_of(t.as_deref())
        }
        "@event-object" => {
            let o = obj
                .get("involvedObject")
                .or_else(|| obj.get("regarding"))
                .cloned()
                .unwrap_or_default();
            let kind = o
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_lowercase();
            json!(format!(
                "{kind}/{}",
                o.get("name").and_then(Value::as_str).unwrap_or_default()
            ))
        }
        "@event-message" => json!(
            obj.get("message")
                .or_else(|| obj.get("note"))
                .cloned()
                .unwrap_or(json!(""))
        ),
        path => {
            let v = jsonpath(obj, path);
            match (c.kind.as_str(), v) {
                (_, None) => Value::Null,
                ("date", Some(Value::String(t))) => age_of(Some(&t)),
                (_, Some(v @ (Value::Number(_) | Value::Bool(_) | Value::String(_)))) => v,
                (_, Some(other)) => json!(other.to_string()),
            }
        }
    }
}

fn pod_status(pod: &Value) -> String {
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut status = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
        .to_owned();
    if let Some(r) = pod.pointer("/status/reason").and_then(Value::as_str) {
        status = r.to_owned();
    }
    for (i, cs) in pod
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(t) = cs.pointer("/state/terminated")
            && t.get("exitCode").and_then(Value::as_i64) == Some(0)
        {
            continue;
        }
        if let Some(r) = cs
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
            .filter(|r| *r != "PodInitializing")
        {
            return format!("Init:{r}");
        }
        let total = pod
            .pointer("/spec/initContainers")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        return format!("Init:{i}/{total}");
    }
    for cs in pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(r) = cs
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
        {
            status = r.to_owned();
        } else if let Some(t) = cs.pointer("/state/terminated") {
            status = t
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    format!(
                        "ExitCode:{}",
                        t.get("exitCode").and_then(Value::as_i64).unwrap_or(0)
                    )
                });
        }
    }
    status
}

/// Kubernetes' `duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    let y = d / 365;
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        if secs % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", secs % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if y < 2 {
        format!("{d}d")
    } else if y < 8 {
        if d % 365 == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{}d", d % 365)
        }
    } else {
        format!("{y}y")
    }
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0].b`, `.a[*].b` and
/// `.a[?(@.type=="Ready")].status`. Several matches are joined with commas.
pub fn jsonpath(obj: &Value, path: &str) -> Option<Value> {
    let path = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    let mut cur = vec![obj.clone()];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            rest = &r[end..];
            if field.is_empty() {
                continue;
            }
            cur = cur.iter().filter_map(|v| v.get(field).cloned()).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let sel = &r[..end];
            rest = &r[end + 1..];
            cur = if sel == "*" {
                cur.iter()
                    .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                    .collect()
            } else if let Ok(i) = sel.parse::<i64>() {
                cur.iter()
                    .filter_map(|v| {
                        let a = v.as_array()?;
                        let idx = if i < 0 { a.len() as i64 + i } else { i };
                        a.get(usize::try_from(idx).ok()?).cloned()
                    })
                    .collect()
            } else if let Some(f) = sel.strip_prefix("?(").and_then(|s| s.strip_suffix(')')) {
                let (lhs, rhs) = f.split_once("==")?;
                let field = lhs.trim().strip_prefix("@.")?;
                let want = rhs.trim().trim_matches('"').trim_matches('\'');
                cur.iter()
                    .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                    .filter(|item| {
                        let got = jsonpath(item, &format!(".{field}"));
                        match got {
                            Some(Value::String(s)) => s == want,
                            Some(other) => other == want,
                            None => false,
                        }
                    })
                    .collect()
            } else {
                let key = sel.trim_matches('\'').trim_matches('"');
                cur.iter().filter_map(|v| v.get(key).cloned()).collect()
            };
        } else {
            return None;
        }
    }
    match cur.len() {
        0 => None,
        1 => cur.pop(),
        _ => Some(json!(
            cur.iter()
                .map(|v| v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string()))
                .collect::<Vec<_>>()
                .join(",")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "False"}],
                       "n": 3}, "spec": {"list": [{"b": 1}, {"b": 2}]}});
        assert_eq!(jsonpath(&o, ".status.n"), Some(json!(3)));
        assert_eq!(jsonpath(&o, ".spec.list[1].b"), Some(json!(2)));
        assert_eq!(
            jsonpath(&o, r#".status.conditions[?(@.type=="Ready")].status"#),
            Some(json!("True"))
        );
        assert_eq!(jsonpath(&o, ".status.missing"), None);
        assert_eq!(jsonpath(&o, ".spec.list[*].b"), Some(json!("1,2")));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(86400 * 3), "3d");
    }
}
