//! Behaviour specific to built-in kinds: the defaults the real API server fills in, the
//! scheduler's node binding, CRD status, the conversion between `core/v1` and
//! `events.k8s.io/v1` Events (one store, as in a real cluster) and the validation of Events.

use serde_json::{Map, Value, json};

use crate::error::Cause;
use crate::kubelet::NODE_NAME;

fn set_default(obj: &mut Value, pointer: &str, value: Value) {
    if obj.pointer(pointer).is_some() {
        return;
    }
    let mut cur = obj;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let m = cur.as_object_mut().expect("object");
        if i + 1 == parts.len() {
            m.insert((*p).to_owned(), value);
            return;
        }
        cur = m
            .entry((*p).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

fn pod_spec_defaults(spec: &mut Value) {
    set_default(spec, "/restartPolicy", json!("Always"));
    set_default(spec, "/terminationGracePeriodSeconds", json!(30));
    set_default(spec, "/dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "/schedulerName", json!("default-scheduler"));
    set_default(spec, "/securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                let latest = c
                    .get("image")
                    .and_then(Value::as_str)
                    .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
                set_default(
                    c,
                    "/imagePullPolicy",
                    json!(if latest { "Always" } else { "IfNotPresent" }),
                );
                set_default(c, "/terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "/terminationMessagePolicy", json!("File"));
                set_default(c, "/resources", json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        set_default(p, "/protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

/// Fills the defaults of a built-in object on create and update; `schedule` binds new pods to
/// the devcluster node (the API server plays the scheduler when the kubelet runs).
pub fn apply_defaults(
    group: &str,
    resource: &str,
    obj: &mut Value,
    creating: bool,
    schedule: bool,
) {
    match (group, resource) {
        ("", "pods") => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec_defaults(spec);
            }
            if creating {
                let qos = qos_class(obj.get("spec").unwrap_or(&Value::Null));
                obj["status"] = json!({"phase": "Pending", "qosClass": qos});
                let unfit = obj.get("spec").and_then(does_not_fit);
                if let (true, Some(message)) = (schedule, &unfit) {
                    obj["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "False",
                        "reason": "Unschedulable", "message": message,
                        "lastProbeTime": null, "lastTransitionTime": crate::store::now()}]);
                } else if schedule {
                    set_default(obj, "/spec/nodeName", json!(NODE_NAME));
                }
                if obj
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty())
                {
                    obj["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True",
                        "lastProbeTime": null, "lastTransitionTime": crate::store::now()}]);
                }
            }
        }
        ("apps", "deployments") => {
            set_default(obj, "/spec/replicas", json!(1));
            set_default(obj, "/spec/revisionHistoryLimit", json!(10));
            set_default(obj, "/spec/progressDeadlineSeconds", json!(600));
            set_default(
                obj,
                "/spec/strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
            );
            if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
                pod_spec_defaults(spec);
            }
        }
        ("apps", "replicasets") => {
            set_default(obj, "/spec/replicas", json!(1));
            if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
                pod_spec_defaults(spec);
            }
        }
        ("", "services") => {
            set_default(obj, "/spec/type", json!("ClusterIP"));
            set_default(obj, "/spec/sessionAffinity", json!("None"));
            if let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
                for p in ports {
                    set_default(p, "/protocol", json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        set_default(p, "/targetPort", port);
                    }
                }
            }
        }
        ("", "namespaces") => {
            let name = obj.pointer("/metadata/name").cloned().unwrap_or_default();
            set_default(obj, "/metadata/labels/kubernetes.io~1metadata.name", name);
            set_default(obj, "/spec/finalizers", json!(["kubernetes"]));
            if creating {
                obj["status"] = json!({"phase": "Active"});
            }
        }
        ("", "secrets") => {
            set_default(obj, "/type", json!("Opaque"));
            // `stringData` is write-only: merged into `data` (base64), winning over it.
            if let Some(Value::Object(plain)) =
                obj.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                use base64::Engine as _;
                let data = obj
                    .as_object_mut()
                    .map(|o| o.entry("data").or_insert_with(|| json!({})));
                if let Some(Value::Object(data)) = data {
                    for (key, value) in plain {
                        let text = value.as_str().unwrap_or_default();
                        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
                        data.insert(key, json!(encoded));
                    }
                }
            }
        }
        _ => {}
    }
}

/// What the devcluster node offers pods (`status.allocatable`).
pub const NODE_ALLOCATABLE: [(&str, &str); 3] = [("cpu", "2"), ("memory", "4Gi"), ("pods", "250")];

/// Why a pod with `spec` fits on no node, in the scheduler's words; `None` when it fits the
/// empty devcluster node. The pod's request of a resource is the larger of its containers' sum
/// and its largest init container (a request defaults to the limit), plus the overhead; CPU,
/// memory and extended resources (`vendor/name`, of which the node has none) are checked. The
/// requests of the pods already on the node are not counted (docs/testing.md).
pub fn does_not_fit(spec: &Value) -> Option<String> {
    let list = |name: &str| -> Vec<&Value> {
        spec.get(name)
            .and_then(Value::as_array)
            .map(|l| l.iter().collect())
            .unwrap_or_default()
    };
    let request = |c: &Value, r: &str| -> f64 {
        ["requests", "limits"]
            .iter()
            .find_map(|kind| c.pointer(&format!("/resources/{kind}"))?.get(r)?.as_str())
            .and_then(crate::kubelet::parse_quantity)
            .unwrap_or(0.0)
    };
    let mut names: Vec<String> = Vec::new();
    for c in list("containers").into_iter().chain(list("initContainers")) {
        for kind in ["requests", "limits"] {
            let Some(res) = c
                .pointer(&format!("/resources/{kind}"))
                .and_then(Value::as_object)
            else {
                continue;
            };
            names.extend(
                res.keys()
                    .filter(|r| *r == "cpu" || *r == "memory" || r.contains('/'))
                    .cloned(),
            );
        }
    }
    names.sort();
    names.dedup();
    let mut insufficient = Vec::new();
    for name in &names {
        let sum: f64 = list("containers").iter().map(|c| request(c, name)).sum();
        let init = list("initContainers")
            .iter()
            .map(|c| request(c, name))
            .fold(0.0, f64::max);
        let overhead = spec
            .pointer("/overhead")
            .and_then(|o| o.get(name))
            .and_then(Value::as_str)
            .and_then(crate::kubelet::parse_quantity)
            .unwrap_or(0.0);
        let wanted = sum.max(init) + overhead;
        let offered = NODE_ALLOCATABLE
            .iter()
            .find(|(r, _)| r == name)
            .and_then(|(_, q)| crate::kubelet::parse_quantity(q))
            .unwrap_or(0.0);
        if wanted > offered {
            insufficient.push(format!("1 Insufficient {name}"));
        }
    }
    (!insufficient.is_empty()).then(|| {
        format!(
            "0/1 nodes are available: {}. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
            insufficient.join(", ")
        )
    })
}

/// The pod's QoS class, computed as the API server does at creation: Guaranteed when every
/// container limits and requests (equal) CPU and memory, BestEffort when none sets any, else
/// Burstable.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|l| spec.get(*l).and_then(Value::as_array))
        .flatten()
        .collect();
    let res =
        |c: &Value, kind: &str, r: &str| c.pointer(&format!("/resources/{kind}/{r}")).cloned();
    let any = containers.iter().any(|c| {
        ["cpu", "memory"]
            .iter()
            .any(|r| res(c, "requests", r).is_some() || res(c, "limits", r).is_some())
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = res(c, "limits", r);
            limit.is_some() && res(c, "requests", r).is_none_or(|req| Some(req) == limit)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Structural checks of a CustomResourceDefinition the real API server makes before serving
/// it: the name is `<plural>.<group>`, names and versions are present, exactly one version is
/// the storage version, and every `x-kubernetes-validations` rule compiles.
pub fn validate_crd(crd: &Value) -> Vec<crate::error::Cause> {
    let mut causes = Vec::new();
    let mut cause = |field: &str, message: String| {
        causes.push(crate::error::Cause {
            reason: "FieldValueInvalid".into(),
            field: field.into(),
            message,
        })
    };
    let s = |p: &str| crd.pointer(p).and_then(Value::as_str).unwrap_or_default();
    let (group, plural, kind) = (
        s("/spec/group"),
        s("/spec/names/plural"),
        s("/spec/names/kind"),
    );
    if group.is_empty() {
        cause("spec.group", "Required value".into());
    }
    if plural.is_empty() {
        cause("spec.names.plural", "Required value".into());
    }
    if kind.is_empty() {
        cause("spec.names.kind", "Required value".into());
    }
    let name = s("/metadata/name");
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        cause(
            "metadata.name",
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        );
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        cause(
            "spec.versions",
            "Invalid value: []: must have exactly one version marked as storage version".into(),
        );
    }
    let storage = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if !versions.is_empty() && storage != 1 {
        cause(
            "spec.versions",
            format!(
                "Invalid value: {storage}: must have exactly one version marked as storage version"
            ),
        );
    }
    for (i, v) in versions.iter().enumerate() {
        if let Some(schema) = v.pointer("/schema/openAPIV3Schema") {
            let path = format!("spec.versions[{i}].schema.openAPIV3Schema");
            check_rules(schema, &path, &mut cause);
        }
    }
    causes
}

fn check_rules(schema: &Value, path: &str, cause: &mut dyn FnMut(&str, String)) {
    for (i, rule) in schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let expr = rule.get("rule").and_then(Value::as_str).unwrap_or_default();
        if let Err(e) = cel::Program::compile(expr) {
            cause(
                &format!("{path}.x-kubernetes-validations[{i}].rule"),
                format!("Invalid value: {expr:?}: compilation failed: {e}"),
            );
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, p) in props {
            check_rules(p, &format!("{path}.properties[{k}]"), cause);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = schema.get(key).filter(|v| v.is_object()) {
            check_rules(sub, &format!("{path}.{key}"), cause);
        }
    }
}

/// The status the API server gives a CRD: names accepted and established at once.
pub fn crd_status(crd: &Value) -> Value {
    let now = crate::store::now();
    let names = crd.pointer("/spec/names").cloned().unwrap_or_default();
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .filter_map(|v| v.get("name").cloned())
        .collect();
    json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ]
    })
}

fn mv(from: &Value, from_key: &str, to: &mut Map<String, Value>, to_key: &str) {
    if let Some(v) = from.get(from_key).filter(|v| !v.is_null()) {
        to.insert(to_key.to_owned(), v.clone());
    }
}

/// `events.k8s.io/v1` → `core/v1` (storage form).
pub fn event_v1_to_core(ev: &Value) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!("v1"));
    out.insert("kind".into(), json!("Event"));
    for (from, to) in [
        ("metadata", "metadata"),
        ("regarding", "involvedObject"),
        ("related", "related"),
        ("note", "message"),
        ("reason", "reason"),
        ("type", "type"),
        ("action", "action"),
        ("eventTime", "eventTime"),
        ("reportingController", "reportingComponent"),
        ("reportingInstance", "reportingInstance"),
        ("deprecatedCount", "count"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedSource", "source"),
    ] {
        mv(ev, from, &mut out, to);
    }
    if let Some(series) = ev.get("series").filter(|s| s.is_object()) {
        out.insert("series".into(), json!({"count": series.get("count"), "lastObservedTime": series.get("lastObservedTime")}));
        out.entry("count")
            .or_insert_with(|| series.get("count").cloned().unwrap_or(json!(1)));
        if let Some(t) = series.get("lastObservedTime") {
            out.insert("lastTimestamp".into(), t.clone());
        }
    }
    if !out.contains_key("source")
        && let Some(c) = ev.get("reportingController")
    {
        let mut src = json!({"component": c});
        if let Some(i) = ev.get("reportingInstance") {
            src["host"] = i.clone();
        }
        out.insert("source".into(), src);
    }
    if !out.contains_key("firstTimestamp")
        && let Some(t) = ev.get("eventTime").filter(|t| t.is_string())
    {
        // `kubectl describe` shows the age from first/lastTimestamp (seconds precision).
        let t = t.as_str().unwrap_or_default();
        let secs = t
            .split('.')
            .next()
            .unwrap_or(t)
            .trim_end_matches('Z')
            .to_owned()
            + "Z";
        out.insert("firstTimestamp".into(), json!(secs));
        out.entry("lastTimestamp").or_insert(json!(secs));
    }
    out.entry("count").or_insert(json!(1));
    Value::Object(out)
}

/// Longest `note` (core/v1 `message`) of an Event, in bytes (`NoteLengthLimit`).
pub const EVENT_NOTE_LIMIT: usize = 1024;
/// Longest `reason`, `action` and `reportingInstance` of an Event, in bytes.
const EVENT_FIELD_LIMIT: usize = 128;
/// Fields of a stored Event that an update through `events.k8s.io/v1` may not change: only
/// `series` (and metadata) may, which is how repeated Events are counted.
const EVENT_IMMUTABLE: [&str; 7] = [
    "involvedObject",
    "reason",
    "message",
    "type",
    "action",
    "reportingComponent",
    "reportingInstance",
];

/// The real API server's checks of an Event (in storage form) that clients run into
/// (`pkg/apis/core/validation/events.go`): a new-style Event (one with `eventTime`, as
/// events.k8s.io/v1 and kube-rs' `Recorder` write them, through either group) has at most
/// 1024 bytes of note and 128 of reason, action and reporting instance, and names its
/// reporting controller, action and reason; an update through events.k8s.io/v1 (`events_v1`)
/// may change only the series. Old-style core/v1 Events (no `eventTime`) are not limited, as
/// on a real server. Lengths are bytes, as Go's `len`.
pub fn validate_event(ev: &Value, old: Option<&Value>, events_v1: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    let text = |key: &str| ev.get(key).and_then(Value::as_str).unwrap_or_default();
    if ev.get("eventTime").is_some_and(Value::is_string) {
        let controller = if events_v1 {
            "reportingController"
        } else {
            "reportingComponent"
        };
        for (field, value) in [
            (controller, text("reportingComponent")),
            ("reportingInstance", text("reportingInstance")),
            ("action", text("action")),
            ("reason", text("reason")),
        ] {
            if value.is_empty() {
                causes.push(Cause {
                    reason: "FieldValueRequired".into(),
                    field: field.into(),
                    message: "Required value".into(),
                });
            }
        }
        for (field, limit) in [
            ("reportingInstance", EVENT_FIELD_LIMIT),
            ("action", EVENT_FIELD_LIMIT),
            ("reason", EVENT_FIELD_LIMIT),
            ("message", EVENT_NOTE_LIMIT),
        ] {
            if text(field).len() > limit {
                causes.push(Cause {
                    reason: "FieldValueInvalid".into(),
                    field: field.into(),
                    message: format!("Invalid value: \"\": can have at most {limit} characters"),
                });
            }
        }
    }
    if events_v1 && let Some(old) = old {
        for field in EVENT_IMMUTABLE {
            let new_value = ev.get(field).unwrap_or(&Value::Null);
            if new_value != old.get(field).unwrap_or(&Value::Null) {
                causes.push(Cause {
                    reason: "FieldValueInvalid".into(),
                    field: field.into(),
                    message: format!("Invalid value: {new_value}: field is immutable"),
                });
            }
        }
    }
    causes
}

/// `core/v1` (storage form) → `events.k8s.io/v1`.
pub fn event_core_to_v1(ev: &Value) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!("events.k8s.io/v1"));
    out.insert("kind".into(), json!("Event"));
    for (from, to) in [
        ("metadata", "metadata"),
        ("involvedObject", "regarding"),
        ("related", "related"),
        ("message", "note"),
        ("reason", "reason"),
        ("type", "type"),
        ("action", "action"),
        ("eventTime", "eventTime"),
        ("reportingComponent", "reportingController"),
        ("reportingInstance", "reportingInstance"),
        ("count", "deprecatedCount"),
        ("firstTimestamp", "deprecatedFirstTimestamp"),
        ("lastTimestamp", "deprecatedLastTimestamp"),
        ("source", "deprecatedSource"),
    ] {
        mv(ev, from, &mut out, to);
    }
    if let Some(series) = ev.get("series").filter(|s| s.is_object()) {
        out.insert("series".into(), series.clone());
    }
    if !out.contains_key("eventTime") {
        out.insert("eventTime".into(), Value::Null);
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Pod", "name": "p"}, "note": "hello", "reason": "Started", "type": "Normal",
            "action": "Start", "eventTime": "2026-01-01T00:00:00.123456Z", "reportingController": "c",
            "reportingInstance": "i"});
        let core = event_v1_to_core(&v1);
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["firstTimestamp"], "2026-01-01T00:00:00Z");
        let back = event_core_to_v1(&core);
        assert_eq!(back["note"], "hello");
        assert_eq!(back["regarding"]["kind"], "Pod");
    }

    fn new_style_event(note: &str) -> Value {
        event_v1_to_core(
            &json!({"metadata": {"name": "e"}, "regarding": {"kind": "Pod", "name": "p"},
            "note": note, "reason": "Started", "type": "Normal", "action": "Start",
            "eventTime": "2026-01-01T00:00:00.123456Z", "reportingController": "c",
            "reportingInstance": "i"}),
        )
    }

    #[test]
    fn event_notes_are_limited_to_1024_bytes() {
        assert!(validate_event(&new_style_event(&"x".repeat(1024)), None, true).is_empty());
        let causes = validate_event(&new_style_event(&"é".repeat(513)), None, true);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "message");
        assert_eq!(
            causes[0].message,
            "Invalid value: \"\": can have at most 1024 characters"
        );
        // Through core/v1 too, once the Event is new-style; old-style Events are not limited.
        assert_eq!(
            validate_event(&new_style_event(&"x".repeat(1025)), None, false).len(),
            1
        );
        let old_style = json!({"metadata": {"name": "e"}, "message": "x".repeat(5000)});
        assert!(validate_event(&old_style, None, false).is_empty());
    }

    #[test]
    fn an_events_v1_update_may_change_the_series_only() {
        let old = new_style_event("from 3 to 2");
        let mut counted = old.clone();
        counted["series"] = json!({"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"});
        counted["count"] = json!(2);
        assert!(validate_event(&counted, Some(&old), true).is_empty());
        let renoted = new_style_event("from 2 to 1");
        let causes = validate_event(&renoted, Some(&old), true);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "message");
        assert!(causes[0].message.ends_with("field is immutable"));
        assert!(validate_event(&renoted, Some(&old), false).is_empty());
    }

    #[test]
    fn crds_are_checked_before_they_are_served() {
        let crd = json!({"metadata": {"name": "things.x.dev"}, "spec": {"group": "x.dev",
            "names": {"plural": "things", "kind": "Thing"},
            "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                "type": "object", "properties": {"spec": {"type": "object",
                    "x-kubernetes-validations": [{"rule": "self.a <"}]}}}}}]}});
        let causes = validate_crd(&crd);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert!(
            causes[0]
                .field
                .ends_with("properties[spec].x-kubernetes-validations[0].rule")
        );
        let mut misnamed = crd.clone();
        misnamed["metadata"]["name"] = json!("other.x.dev");
        misnamed["spec"]["versions"][0]["schema"] = json!({"openAPIV3Schema": {"type": "object"}});
        assert_eq!(validate_crd(&misnamed)[0].field, "metadata.name");
    }

    #[test]
    fn secret_string_data_is_merged_into_data() {
        let mut secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "data": {"a": "b2xk", "keep": "eA=="}, "stringData": {"a": "new", "b": "two"}});
        apply_defaults("", "secrets", &mut secret, true, false);
        assert!(secret.get("stringData").is_none());
        assert_eq!(
            secret["data"],
            json!({"a": "bmV3", "b": "dHdv", "keep": "eA=="})
        );
        assert_eq!(secret["type"], "Opaque");
    }

    #[test]
    fn a_pod_larger_than_the_node_is_unschedulable() {
        let pod = |resources: Value| {
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "image": "i", "resources": resources}]}});
            apply_defaults("", "pods", &mut pod, true, true);
            pod
        };
        let big = pod(
            json!({"requests": {"cpu": "3", "memory": "64Mi"}, "limits": {"memory": "8Gi", "example.com/gpu": "1"}}),
        );
        assert!(big.pointer("/spec/nodeName").is_none());
        assert_eq!(big["status"]["phase"], "Pending");
        let cond = &big["status"]["conditions"][0];
        assert_eq!(
            (&cond["type"], &cond["status"], &cond["reason"]),
            (
                &json!("PodScheduled"),
                &json!("False"),
                &json!("Unschedulable")
            )
        );
        assert_eq!(
            cond["message"],
            "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient example.com/gpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        );
        // Limits stand in for missing requests; a pod that fits is bound.
        let memory = pod(json!({"limits": {"memory": "5Gi"}}));
        assert!(
            memory["status"]["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .contains("1 Insufficient memory.")
        );
        let fits = pod(json!({"requests": {"cpu": "1500m", "memory": "4Gi"}}));
        assert_eq!(fits["spec"]["nodeName"], NODE_NAME);
    }

    #[test]
    fn pods_are_scheduled_and_defaulted() {
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}});
        apply_defaults("", "pods", &mut pod, true, true);
        assert_eq!(pod["spec"]["nodeName"], NODE_NAME);
        assert_eq!(
            pod["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(pod["status"]["phase"], "Pending");
        assert_eq!(pod["status"]["qosClass"], "BestEffort");
        let limited =
            json!({"containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi"}}}]});
        assert_eq!(qos_class(&limited), "Burstable");
        let exact = json!({"containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi", "cpu": "1"}}}]});
        assert_eq!(qos_class(&exact), "Guaranteed");
    }
}
