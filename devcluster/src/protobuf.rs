//! Just enough of the Kubernetes protobuf encoding to read the request bodies kubectl's typed
//! generator commands send (`kubectl create namespace|configmap|secret`): the `k8s\0` envelope,
//! `runtime.Unknown`, `ObjectMeta`, and the Namespace, ConfigMap and Secret messages. Anything
//! else is left to the caller to reject with 415.

use serde_json::{Map, Value, json};

/// The magic prefix of Kubernetes protobuf bodies.
const MAGIC: &[u8] = b"k8s\0";

/// One decoded protobuf field value.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}

/// The fields of one message, in order.
fn fields(buf: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let value = match key & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let slice = buf.get(pos..pos.checked_add(len)?)?;
                pos += len;
                Wire::Bytes(slice)
            }
            1 => {
                pos += 8;
                continue;
            }
            5 => {
                pos += 4;
                continue;
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

fn text(w: &Wire<'_>) -> Option<String> {
    match w {
        Wire::Bytes(b) => String::from_utf8(b.to_vec()).ok(),
        Wire::Varint(_) => None,
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `map<string, string>` (or `map<string, bytes>` when `binary`) entry.
fn map_entry(w: &Wire<'_>, binary: bool) -> Option<(String, Value)> {
    let Wire::Bytes(b) = w else { return None };
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (f, v) in fields(b)? {
        match (f, &v) {
            (1, _) => key = text(&v)?,
            (2, Wire::Bytes(raw)) if binary => value = json!(base64(raw)),
            (2, _) => value = json!(text(&v)?),
            _ => {}
        }
    }
    Some((key, value))
}

fn insert_map(obj: &mut Map<String, Value>, field: &str, entry: (String, Value)) {
    obj.entry(field).or_insert_with(|| json!({}))[&entry.0] = entry.1;
}

fn object_meta(buf: &[u8]) -> Option<Value> {
    let mut meta = Map::new();
    for (f, v) in fields(buf)? {
        let key = match f {
            1 => "name",
            2 => "generateName",
            3 => "namespace",
            6 => "resourceVersion",
            _ => "",
        };
        if !key.is_empty() {
            // Empty optional strings are encoded too; they mean "unset".
            let s = text(&v)?;
            if !s.is_empty() {
                meta.insert(key.into(), json!(s));
            }
            continue;
        }
        match f {
            11 => insert_map(&mut meta, "labels", map_entry(&v, false)?),
            12 => insert_map(&mut meta, "annotations", map_entry(&v, false)?),
            14 => meta
                .entry("finalizers")
                .or_insert_with(|| json!([]))
                .as_array_mut()?
                .push(json!(text(&v)?)),
            _ => {}
        }
    }
    Some(Value::Object(meta))
}

fn object(kind: &str, raw: &[u8]) -> Option<Value> {
    let mut obj = Map::new();
    for (f, v) in fields(raw)? {
        match (kind, f, &v) {
            (_, 1, Wire::Bytes(b)) => _ = obj.insert("metadata".into(), object_meta(b)?),
            ("ConfigMap", 2, _) => insert_map(&mut obj, "data", map_entry(&v, false)?),
            ("ConfigMap", 3, _) => insert_map(&mut obj, "binaryData", map_entry(&v, true)?),
            ("ConfigMap", 4, Wire::Varint(b)) | ("Secret", 5, Wire::Varint(b)) => {
                _ = obj.insert("immutable".into(), json!(*b != 0));
            }
            ("Secret", 2, _) => insert_map(&mut obj, "data", map_entry(&v, true)?),
            ("Secret", 3, _) => _ = obj.insert("type".into(), json!(text(&v)?)),
            ("Secret", 4, _) => insert_map(&mut obj, "stringData", map_entry(&v, false)?),
            ("Namespace", 2, Wire::Bytes(spec)) => {
                let finalizers: Option<Vec<Value>> = fields(spec)?
                    .iter()
                    .filter(|(f, _)| *f == 1)
                    .map(|(_, v)| text(v).map(Value::String))
                    .collect();
                obj.insert("spec".into(), json!({"finalizers": finalizers?}));
            }
            _ => {}
        }
    }
    Some(Value::Object(obj))
}

/// Decodes a protobuf request body of a supported kind to its JSON form.
pub fn decode(body: &[u8]) -> Option<Value> {
    let unknown = body.strip_prefix(MAGIC)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (f, v) in fields(unknown)? {
        match (f, v) {
            (1, Wire::Bytes(tm)) => {
                for (tf, tv) in fields(tm)? {
                    match tf {
                        1 => api_version = text(&tv)?,
                        2 => kind = text(&tv)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(r)) => raw = r,
            _ => {}
        }
    }
    if api_version != "v1" || !matches!(kind.as_str(), "ConfigMap" | "Secret" | "Namespace") {
        return None;
    }
    let mut obj = object(&kind, raw)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![
            u8::try_from(n << 3 | 2).unwrap(),
            u8::try_from(payload.len()).unwrap(),
        ];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_configmap() {
        let meta = field(1, b"settings");
        let entry = [field(1, b"a"), field(2, b"1")].concat();
        let cm = [field(1, &meta), field(2, &entry)].concat();
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &cm)].concat();
        let obj = decode(&body).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"a": "1"}})
        );
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi!"), "aGkh");
    }
}
