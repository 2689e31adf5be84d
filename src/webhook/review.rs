//! The AdmissionReview envelope (`admission.k8s.io/v1`): reads the request
//! the API server sends, hands the pod to `mutate`, and writes the response
//! with its base64 JSON Patch or its denial. A body that is not a v1
//! AdmissionReview about a well-formed object is a `ReviewError`, which the
//! HTTP layer answers with 400; nothing here panics on input. This module
//! works on bytes and JSON values only; it must not touch sockets.

use base64::Engine;
use serde_json::{json, Value};

use super::{mutate, Config, Denial, Namespace, PodSecurity};

/// Why a request body cannot be answered with an AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("not an admission.k8s.io/v1 AdmissionReview: {0}")]
    NotReview(String),
    #[error("{0}")]
    Malformed(String),
}

/// What the webhook did, for the server's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub uid: String,
    pub namespace: String,
    /// The pod's name, or its generateName prefix followed by '*'.
    pub pod: String,
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; the number of patch operations (0: untouched).
    Admitted {
        operations: usize,
    },
    Denied {
        message: String,
    },
}

/// Answers one AdmissionReview body. `pod_security` comes from the path the
/// webhook configuration routed the request to.
pub fn review(
    body: &[u8],
    pod_security: Option<PodSecurity>,
    config: &Config,
) -> Result<(Value, Outcome), ReviewError> {
    let doc: Value = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    if api_version != "admission.k8s.io/v1" || kind != "AdmissionReview" {
        return Err(ReviewError::NotReview(format!(
            "apiVersion {api_version:?} kind {kind:?}; configure admissionReviewVersions: [v1]"
        )));
    }
    let request = doc
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| ReviewError::NotReview("no request object".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ReviewError::NotReview("request has no uid".into()))?;

    let is_pod = request.get("kind").is_some_and(|k| {
        k.get("group").and_then(Value::as_str) == Some("")
            && k.get("version").and_then(Value::as_str) == Some("v1")
            && k.get("kind").and_then(Value::as_str) == Some("Pod")
    });
    let operation = request
        .get("operation")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let sub_resource = request
        .get("subResource")
        .and_then(Value::as_str)
        .unwrap_or_default();
    // Only pod creation is ours; anything else a misconfigured webhook
    // configuration sends is let through untouched rather than blocked.
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let meta = |key| {
        request
            .pointer(&format!("/object/metadata/{key}"))
            .and_then(Value::as_str)
    };
    let outcome = |decision| Outcome {
        uid: uid.to_string(),
        namespace: namespace.to_string(),
        pod: meta("name")
            .map(str::to_string)
            .or_else(|| meta("generateName").map(|g| format!("{g}*")))
            .unwrap_or_default(),
        decision,
    };
    if !is_pod || operation != "CREATE" || !sub_resource.is_empty() {
        return Ok((
            allowed(uid, None, Vec::new()),
            outcome(Decision::Admitted { operations: 0 }),
        ));
    }
    let object = request
        .get("object")
        .filter(|o| o.is_object())
        .ok_or_else(|| ReviewError::Malformed("request.object is missing".into()))?;
    let ns = Namespace {
        name: namespace,
        pod_security,
    };
    match mutate(object, ns, config) {
        Ok(m) => {
            let operations = m.patch.len();
            let patch = if m.patch.is_empty() {
                None
            } else {
                let bytes = serde_json::to_vec(&m.patch)
                    .map_err(|e| ReviewError::Malformed(e.to_string()))?;
                Some(base64::engine::general_purpose::STANDARD.encode(bytes))
            };
            Ok((
                allowed(uid, patch, m.warnings),
                outcome(Decision::Admitted { operations }),
            ))
        }
        Err(denial @ Denial::Refused(_)) => {
            let message = denial.to_string();
            let response = json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": uid,
                    "allowed": false,
                    "status": {"code": 403, "reason": "Forbidden", "message": message},
                },
            });
            Ok((response, outcome(Decision::Denied { message })))
        }
        Err(Denial::Malformed(why)) => {
            Err(ReviewError::Malformed(format!("request.object: {why}")))
        }
    }
}

fn allowed(uid: &str, patch: Option<String>, warnings: Vec<String>) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(p) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(p);
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}
