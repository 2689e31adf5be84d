//! RFC 6902 JSON Patch as the webhook answers it: the difference between the
//! pod the API server sent and the pod the webhook wants. Computing the
//! patch as a diff (rather than emitting operations while mutating) makes
//! "nothing to change" an empty patch by construction, which is what the
//! API server's reinvocation needs. Objects are compared key by key; an
//! array that differs is replaced whole, because index-based operations on
//! arrays another webhook may have reordered are fragile. This module knows
//! nothing about pods.

use serde::Serialize;
use serde_json::{Map, Value};

/// One patch operation. Only the three operations a diff needs are emitted.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Add { path: String, value: Value },
    Remove { path: String },
    Replace { path: String, value: Value },
}

/// A JSON Patch document.
pub type Patch = Vec<Op>;

/// The operations that turn `old` into `new`.
pub fn diff(old: &Value, new: &Value) -> Patch {
    let mut ops = Vec::new();
    diff_at(&mut String::new(), old, new, &mut ops);
    ops
}

fn diff_at(path: &mut String, old: &Value, new: &Value, ops: &mut Patch) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => diff_objects(path, a, b, ops),
        _ => ops.push(Op::Replace {
            path: path.clone(),
            value: new.clone(),
        }),
    }
}

fn diff_objects(
    path: &mut String,
    a: &Map<String, Value>,
    b: &Map<String, Value>,
    ops: &mut Patch,
) {
    for (key, old) in a {
        let len = path.len();
        push_token(path, key);
        match b.get(key) {
            Some(new) => diff_at(path, old, new, ops),
            None => ops.push(Op::Remove { path: path.clone() }),
        }
        path.truncate(len);
    }
    for (key, new) in b {
        if !a.contains_key(key) {
            let len = path.len();
            push_token(path, key);
            ops.push(Op::Add {
                path: path.clone(),
                value: new.clone(),
            });
            path.truncate(len);
        }
    }
}

/// Appends one JSON Pointer reference token (RFC 6901): annotation keys such
/// as `rewind.dev/injected` contain '/', which must become "~1".
fn push_token(path: &mut String, key: &str) {
    path.push('/');
    for c in key.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equal_documents_give_an_empty_patch() {
        let v = json!({"a": [1, 2], "b": {"c": null}});
        assert!(diff(&v, &v).is_empty());
    }

    #[test]
    fn keys_are_escaped_and_arrays_replaced_whole() {
        let old = json!({"metadata": {"annotations": {"x": "1"}}, "list": [1, 2]});
        let new =
            json!({"metadata": {"annotations": {"x": "1", "rewind.dev/a~b": "2"}}, "list": [2]});
        assert_eq!(
            serde_json::to_value(diff(&old, &new)).unwrap(),
            json!([
                {"op": "replace", "path": "/list", "value": [2]},
                {"op": "add", "path": "/metadata/annotations/rewind.dev~1a~0b", "value": "2"},
            ])
        );
    }
}
