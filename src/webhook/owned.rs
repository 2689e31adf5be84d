//! Which fields of a pod Rewind owns, and the operations that bring them to
//! what Rewind wants without disturbing anything else. The API server calls
//! Rewind again after other mutators ran (`reinvocationPolicy: IfNeeded`),
//! and those may have added to Rewind's own containers: the ServiceAccount
//! plugin's token mount, a policy engine's seccomp profile, an injector's
//! environment variables. Rewind claims only the fields whose value it
//! decides and leaves every other field, and every entry of a list it does
//! not own, as it finds it.
//!
//! "Wanted" values say what Rewind needs, and existing values satisfy them
//! when they contain at least that (the API server's defaulting only adds
//! fields, and rewrites quantities in canonical form). This module decides
//! no values (`containers.rs` builds them) and places no containers
//! (`mod.rs` does); it only reconciles one wanted value with what is there.

use serde_json::Value;

use super::annotations::{parse_quantity, Quantity};
use super::patch::{EditError, Editor, Pointer};

/// Fields of Rewind's containers whose value Rewind decides, claimed as
/// far as Rewind's value of them reaches (inside an object, only the keys
/// Rewind writes): what runs (`image`, `command`, `args`), that the sidecar
/// is a native sidecar (`restartPolicy`), the privilege Bidirectional
/// propagation needs and the root identity that keeps files' owners
/// (`securityContext`: `privileged`, `runAsUser`, `runAsGroup`,
/// `runAsNonRoot` only), the probes that gate the application on the mount,
/// and the CPU request and memory request and limit (`resources`).
pub(crate) const OWNED_FIELDS: [&str; 8] = [
    "image",
    "command",
    "args",
    "restartPolicy",
    "securityContext",
    "startupProbe",
    "readinessProbe",
    "resources",
];

/// Lists of Rewind's containers in which Rewind owns its own entries only,
/// each found by the key that identifies it (`None`: by its whole value):
/// the mounts Rewind needs (found by path, so that another
/// mutator's mount at another path is never touched), the metrics port
/// the probes use, and the store's endpoint and credentials from the
/// webhook's settings.
const OWNED_ENTRIES: [(&str, Option<&str>); 4] = [
    ("volumeMounts", Some("mountPath")),
    ("ports", Some("name")),
    ("env", Some("name")),
    ("envFrom", None),
];

/// Brings the container at `at` to what `wanted` (a whole container as
/// `containers.rs` builds it) says about the fields Rewind owns.
pub(crate) fn ensure_container(
    ed: &mut Editor,
    at: &Pointer,
    wanted: &Value,
) -> Result<(), EditError> {
    for field in OWNED_FIELDS {
        if let Some(w) = wanted.get(field) {
            ensure(ed, &at.key(field), w, field == "resources")?;
        }
    }
    for (field, key) in OWNED_ENTRIES {
        if let Some(Value::Array(entries)) = wanted.get(field) {
            ensure_entries(ed, &at.key(field), entries, key)?;
        }
    }
    Ok(())
}

/// Makes the value at `at` contain `wanted`: a missing value is added, two
/// objects are reconciled key by key (keys only the existing one has are
/// kept), anything else that does not already cover `wanted` is replaced.
/// `quantities` compares strings as Kubernetes quantities (under
/// `resources`).
pub(crate) fn ensure(
    ed: &mut Editor,
    at: &Pointer,
    wanted: &Value,
    quantities: bool,
) -> Result<(), EditError> {
    let (both_objects, covered) = match ed.get(at) {
        None => return ed.add(at, wanted.clone()),
        Some(existing) => (
            existing.is_object() && wanted.is_object(),
            covers(existing, wanted, quantities),
        ),
    };
    if covered {
        return Ok(());
    }
    match wanted {
        Value::Object(w) if both_objects => {
            for (key, value) in w {
                ensure(ed, &at.key(key), value, quantities || key == "resources")?;
            }
            Ok(())
        }
        _ => ed.replace(at, wanted.clone()),
    }
}

/// Makes the list at `at` hold each of `wanted`'s entries, each found by
/// `key` (or by value): a found entry is reconciled with `ensure`, a
/// missing one appended; entries Rewind did not ask for stay where they are.
fn ensure_entries(
    ed: &mut Editor,
    at: &Pointer,
    wanted: &[Value],
    key: Option<&str>,
) -> Result<(), EditError> {
    match ed.get(at) {
        Some(Value::Array(_)) => {}
        None => return ed.add(at, Value::Array(wanted.to_vec())),
        // The API server only sends lists here; anything else has no entries to keep.
        Some(_) => return ed.replace(at, Value::Array(wanted.to_vec())),
    }
    for w in wanted {
        let found = match ed.get(at) {
            Some(Value::Array(entries)) => entries.iter().position(|e| match key {
                Some(k) => e.get(k).is_some() && e.get(k) == w.get(k),
                None => covers(e, w, false),
            }),
            _ => None,
        };
        match found {
            Some(i) => ensure(ed, &at.index(i), w, false)?,
            None => ed.add(&at.end(), w.clone())?,
        }
    }
    Ok(())
}

/// Whether `existing` already says everything `wanted` says. Extra keys
/// are allowed (the API server defaults some), lists must match entry for
/// entry, and with `quantities` strings compare by value, since the API
/// server rewrites quantities in canonical form ("0.5" becomes "500m").
pub(crate) fn covers(existing: &Value, wanted: &Value, quantities: bool) -> bool {
    match (existing, wanted) {
        (Value::Object(e), Value::Object(w)) => w.iter().all(|(k, wv)| {
            e.get(k)
                .is_some_and(|ev| covers(ev, wv, quantities || k == "resources"))
        }),
        (Value::Array(e), Value::Array(w)) => {
            e.len() == w.len() && e.iter().zip(w).all(|(ev, wv)| covers(ev, wv, quantities))
        }
        (Value::String(e), Value::String(w)) if quantities && e != w => {
            match (
                parse_quantity(e, Quantity::Cpu),
                parse_quantity(w, Quantity::Cpu),
            ) {
                (Ok(a), Ok(b)) => (a - b).abs() <= f64::EPSILON * a.abs().max(b.abs()),
                _ => false,
            }
        }
        _ => existing == wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One reconciliation: the document, what Rewind wants at `/c`, and the
    /// operations expected.
    struct Row {
        what: &'static str,
        doc: Value,
        wanted: Value,
        ops: Value,
    }

    #[test]
    fn ensure_container_claims_only_what_it_owns() {
        let wanted = json!({
            "name": "rewind-data", "image": "rewind:1", "imagePullPolicy": "IfNotPresent",
            "args": ["run"],
            "securityContext": {"privileged": true, "runAsNonRoot": false},
            "resources": {"requests": {"cpu": "500m"}},
            "volumeMounts": [{"name": "data", "mountPath": "/rewind/source"}],
            "env": [{"name": "AWS_REGION", "value": "eu-1"}],
        });
        let rows = [
            Row {
                what: "its own output is a fixed point",
                doc: json!({"c": wanted.clone()}),
                wanted: wanted.clone(),
                ops: json!([]),
            },
            Row {
                what: "foreign keys, entries and a canonical quantity survive",
                doc: json!({"c": {
                    "name": "rewind-data", "image": "rewind:1", "imagePullPolicy": "Always",
                    "args": ["run"],
                    "securityContext": {"privileged": true, "runAsNonRoot": false,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "resources": {"requests": {"cpu": "0.5"}, "limits": {"cpu": "2"}},
                    "volumeMounts": [{"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true},
                                     {"name": "data", "mountPath": "/rewind/source"}],
                    "env": [{"name": "TZ", "value": "UTC"}, {"name": "AWS_REGION", "value": "eu-1"}],
                }}),
                wanted: wanted.clone(),
                ops: json!([]),
            },
            Row {
                what: "an owned value changed by another mutator is set back at its own path",
                doc: json!({"c": {
                    "name": "rewind-data", "image": "mirror.example/rewind:1",
                    "args": ["run", "--debug"],
                    "securityContext": {"privileged": false, "runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "resources": {"requests": {"cpu": "100m", "memory": "1Gi"}},
                    "volumeMounts": [{"name": "other", "mountPath": "/rewind/source"}],
                    "env": [{"name": "AWS_REGION", "value": "us-1"}, {"name": "TZ", "value": "UTC"}],
                }}),
                wanted: wanted.clone(),
                ops: json!([
                    {"op": "replace", "path": "/c/image", "value": "rewind:1"},
                    {"op": "replace", "path": "/c/args", "value": ["run"]},
                    {"op": "replace", "path": "/c/securityContext/privileged", "value": true},
                    {"op": "replace", "path": "/c/securityContext/runAsNonRoot", "value": false},
                    {"op": "replace", "path": "/c/resources/requests/cpu", "value": "500m"},
                    {"op": "replace", "path": "/c/volumeMounts/0/name", "value": "data"},
                    {"op": "replace", "path": "/c/env/0/value", "value": "eu-1"},
                ]),
            },
            Row {
                what: "missing owned fields and entries are added, never whole lists",
                doc: json!({"c": {"name": "rewind-data", "args": ["run"],
                                  "volumeMounts": [{"name": "t", "mountPath": "/t"}],
                                  "env": [{"name": "TZ", "value": "UTC"}]}}),
                wanted: wanted.clone(),
                ops: json!([
                    {"op": "add", "path": "/c/image", "value": "rewind:1"},
                    {"op": "add", "path": "/c/securityContext", "value": {"privileged": true, "runAsNonRoot": false}},
                    {"op": "add", "path": "/c/resources", "value": {"requests": {"cpu": "500m"}}},
                    {"op": "add", "path": "/c/volumeMounts/-", "value": {"name": "data", "mountPath": "/rewind/source"}},
                    {"op": "add", "path": "/c/env/-", "value": {"name": "AWS_REGION", "value": "eu-1"}},
                ]),
            },
        ];
        for row in rows {
            let mut ed = Editor::new(&row.doc);
            ensure_container(&mut ed, &Pointer::root().key("c"), &row.wanted).unwrap();
            let after = ed.get(&Pointer::root()).cloned().unwrap();
            assert_eq!(
                serde_json::to_value(ed.finish()).unwrap(),
                row.ops,
                "{}",
                row.what
            );
            let mut again = Editor::new(&after);
            ensure_container(&mut again, &Pointer::root().key("c"), &row.wanted).unwrap();
            assert!(again.finish().is_empty(), "{}: not a fixed point", row.what);
        }
    }

    #[test]
    fn quantities_compare_by_value_only_under_resources() {
        assert!(covers(
            &json!({"resources": {"cpu": "0.5"}}),
            &json!({"resources": {"cpu": "500m"}}),
            false
        ));
        assert!(!covers(
            &json!({"cpu": "0.5"}),
            &json!({"cpu": "500m"}),
            false
        ));
        assert!(!covers(&json!([1, 2]), &json!([1]), false));
    }
}
