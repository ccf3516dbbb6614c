//! Schema transforms that make the generated CRDs fit a real API server.

use schemars::Schema;
use serde_json::Value;

/// Integer formats Kubernetes knows: schemars writes `uint8`, `uint32`, `uint64` … for unsigned
/// Rust types, which the API server warns about on every apply. The unsigned types keep their
/// `minimum: 0`; the format only tells clients how wide the number is.
pub fn kubernetes_formats(schema: &mut Schema) {
    fn node(m: &mut serde_json::Map<String, Value>) {
        if let Some(Value::String(f)) = m.get_mut("format") {
            match f.as_str() {
                "uint8" | "uint16" | "int8" | "int16" => *f = "int32".into(),
                "uint32" | "uint64" | "uint" => *f = "int64".into(),
                _ => {}
            }
        }
        m.values_mut().for_each(value);
    }
    fn value(v: &mut Value) {
        match v {
            Value::Object(m) => node(m),
            Value::Array(a) => a.iter_mut().for_each(value),
            _ => {}
        }
    }
    if let Some(m) = schema.as_object_mut() {
        node(m);
    }
}

/// Drops the descriptions below a schema's root, keeping its structure (types, required,
/// formats, list and map markers). Used for the embedded PodTemplateSpec: its upstream
/// descriptions are ~270 KB, which pushed the Worker CRD past the 256 KiB that
/// `kubectl apply` (client side) may store in its last-applied annotation. Users read them
/// with `kubectl explain pod.spec`.
pub fn without_nested_descriptions(schema: &mut Schema) {
    /// Walks a schema node; `properties` maps hold schemas under field names (a field may be
    /// called `description`), and values such as `default` or `enum` are data, not schemas.
    fn schema_node(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("description");
                children(m);
            }
            Value::Array(a) => a.iter_mut().for_each(schema_node),
            _ => {}
        }
    }
    fn children(m: &mut serde_json::Map<String, Value>) {
        for (key, child) in m.iter_mut() {
            match key.as_str() {
                "properties" | "patternProperties" | "definitions" => {
                    if let Value::Object(fields) = child {
                        fields.values_mut().for_each(schema_node);
                    }
                }
                "default" | "enum" | "example" | "x-kubernetes-validations" => {}
                _ => schema_node(child),
            }
        }
    }
    if let Some(m) = schema.as_object_mut() {
        children(m);
    }
}
