//! The admission webhook's pure core: given a pod as the API server sent it,
//! the namespace of the request and the webhook's settings, decide whether
//! to inject the Rewind sidecar and compute the JSON Patch that does it, or
//! the message that denies the pod. Everything here is a function of its
//! inputs, so tests feed captured pods without a server. This module owns
//! the annotation contract (`annotations`), the settings (`config`), the
//! injected objects (`containers`), the patch (`patch`) and the
//! AdmissionReview envelope (`review`); it must not touch HTTP, files or
//! the clock (`src/http.rs` serves it).
//!
//! # What injection does, per protected volume V (a claim)
//! - the claim V stays in the pod but is mounted only by Rewind's
//!   containers, at `/rewind/source`;
//! - an `emptyDir` named `rewind-V` is added; the sidecar mounts FUSE over it
//!   with `Bidirectional` propagation, and every application container that
//!   mounted V (init containers included) now mounts `rewind-V` at the same
//!   path with `HostToContainer`, so it sees the protected view;
//! - a native sidecar `rewind-V` runs `rewind run`, placed after the restore
//!   init containers and before the user's init containers;
//! - with `rewind.dev/restore-at`, an init container `rewind-restore-V`
//!   restores V once, before the sidecar starts.
//!
//! # Idempotency
//! The patch is the diff between the pod received and the pod wanted, and
//! the pod wanted is computed from the pod received, keeping any of the
//! webhook's own objects that already say what it would write (the API
//! server's defaulting only adds fields). So the webhook's own output sent
//! back yields an empty patch, and containers another webhook added since
//! are rewired.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

pub mod annotations;
pub mod config;
pub mod containers;
pub mod patch;
pub mod review;

pub use config::{Config, ConfigError};
pub use patch::{Op, Patch};

use annotations::{parse_quantity, Protection, Quantity};
use containers::Plan;

/// The namespace's Pod Security enforcement level, when it forbids
/// privileged pods. The webhook cannot read Namespace objects (it has no
/// API access at all); the MutatingWebhookConfiguration routes requests
/// from such namespaces to a path that carries the level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodSecurity {
    Baseline,
    Restricted,
}

impl PodSecurity {
    pub fn as_str(self) -> &'static str {
        match self {
            PodSecurity::Baseline => "baseline",
            PodSecurity::Restricted => "restricted",
        }
    }
}

/// What the request says about the pod's namespace.
#[derive(Debug, Clone, Copy)]
pub struct Namespace<'a> {
    /// From the AdmissionReview request, never from the pod: pods made with
    /// generateName may not carry one yet.
    pub name: &'a str,
    pub pod_security: Option<PodSecurity>,
}

/// Why a pod is not admitted as sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The pod asked for protection in a way that cannot work; the message
    /// says what to fix and is shown to the user by kubectl.
    #[error("rewind: {0}")]
    Refused(String),
    /// The object is not a pod at all; the HTTP layer answers 400.
    #[error("malformed pod: {0}")]
    Malformed(String),
}

/// The webhook's answer for an admitted pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mutation {
    /// Empty when nothing needs to change.
    pub patch: Patch,
    /// Shown by kubectl; they never block the pod.
    pub warnings: Vec<String>,
}

/// Seconds added to the pod's grace period beyond the sidecar's shutdown
/// timeout: the kubelet's own overhead between stopping the app and
/// signalling the sidecar.
const GRACE_MARGIN_SECONDS: i64 = 5;
/// The grace period Kubernetes uses when a pod does not set one.
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// Decides the patch for `pod` (the AdmissionReview's `request.object`).
pub fn mutate(pod: &Value, ns: Namespace, config: &Config) -> Result<Mutation, Denial> {
    let malformed = |why: &str| Denial::Malformed(why.to_string());
    if !pod.is_object() {
        return Err(malformed("the object is not a JSON object"));
    }
    let annotations = string_map(pod, "annotations")?;
    let labels = string_map(pod, "labels")?;
    let Some(prot) = annotations::parse(&annotations).map_err(Denial::Refused)? else {
        let mut warnings = Vec::new();
        if labels.get(annotations::INJECT_LABEL).map(String::as_str) == Some("true") {
            warnings.push(format!(
                "label {}=true is set but annotation {} is missing: this pod is not protected by rewind",
                annotations::INJECT_LABEL,
                annotations::VOLUMES
            ));
        }
        return Ok(Mutation {
            patch: Vec::new(),
            warnings,
        });
    };
    if let Some(level) = ns.pod_security {
        return Err(Denial::Refused(format!(
            "namespace {} enforces Pod Security level {:?}, which forbids privileged containers; \
             rewind's sidecar must be privileged because Kubernetes allows Bidirectional mount \
             propagation (how the FUSE mount reaches the application) only in privileged containers. \
             Label the namespace pod-security.kubernetes.io/enforce=privileged, or remove the {} annotation",
            ns.name,
            level.as_str(),
            annotations::VOLUMES
        )));
    }
    if ns.name.is_empty() {
        return Err(malformed("the request names no namespace"));
    }

    let mut new = pod.clone();
    let spec = new
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| malformed("the pod has no spec object"))?;
    check_pod_level(spec)?;
    let mut volumes = object_list(spec, "volumes")?;
    let mut init = object_list(spec, "initContainers")?;
    let mut regular = object_list(spec, "containers")?;
    if regular.is_empty() {
        return Err(malformed("spec.containers is empty"));
    }
    for c in init.iter().chain(&regular) {
        if c.get("name").and_then(Value::as_str).is_none() {
            return Err(malformed("a container has no name"));
        }
    }

    let previously = previously_injected(&annotations, &prot)?;
    let store = prot.store.clone().or_else(|| config.default_store.clone()).ok_or_else(|| {
        Denial::Refused(format!(
            "no store: add the annotation {}: s3://<bucket>/<prefix>, or set defaultStore in the webhook config",
            annotations::STORE
        ))
    })?;
    let claims = claims_of(&prot, &volumes)?;

    // Names the webhook owns for this pod, and which of them exist from a
    // previous invocation (then they are replaced, not a conflict).
    let mut own_containers = BTreeSet::new();
    let mut own_volumes = BTreeSet::new();
    for v in &prot.volumes {
        own_containers.insert(containers::sidecar_name(v));
        own_containers.insert(containers::restore_name(v));
        own_volumes.insert(containers::sidecar_name(v));
    }
    for c in init.iter().chain(&regular) {
        let name = str_field(c, "name");
        if own_containers.contains(name) && !previously {
            return Err(conflict("container", name));
        }
    }
    for v in &volumes {
        let name = str_field(v, "name");
        if own_volumes.contains(name) && !previously {
            return Err(conflict("volume", name));
        }
    }
    // The webhook only ever adds init containers, so one of its names among
    // the regular containers is a user's container whatever the marker says.
    if let Some(c) = regular
        .iter()
        .find(|c| own_containers.contains(str_field(c, "name")))
    {
        return Err(conflict("container", str_field(c, "name")));
    }

    let (existing_own, mut user_init): (Vec<_>, Vec<_>) = init
        .drain(..)
        .partition(|c| own_containers.contains(str_field(c, "name")));

    // Ports the sidecars listen on must not collide with ports the pod's
    // other containers declare (they share one network namespace).
    let used_ports: BTreeSet<i64> = user_init
        .iter()
        .chain(&regular)
        .filter_map(|c| c.get("ports").and_then(Value::as_array))
        .flatten()
        .filter_map(|p| p.get("containerPort").and_then(Value::as_i64))
        .collect();
    let mut next_port = i64::from(config.metrics_port);

    let mut wanted_restores = Vec::new();
    let mut wanted_sidecars = Vec::new();
    for (index, (volume, claim)) in prot.volumes.iter().zip(&claims).enumerate() {
        while used_ports.contains(&next_port) {
            next_port += 1;
        }
        let port = u16::try_from(next_port)
            .map_err(|_| Denial::Refused("no free port for the sidecar's metrics".into()))?;
        next_port += 1;
        let store_volume = match &config.cluster_id {
            Some(id) => format!("{id}/{}/{claim}", ns.name),
            None => format!("{}/{claim}", ns.name),
        };
        let plan = Plan {
            volume,
            store_volume,
            store: &store,
            segment_interval: prot
                .segment_interval
                .as_deref()
                .unwrap_or(&config.segment_interval),
            cpu: prot.cpu.as_deref().unwrap_or(&config.cpu),
            memory: prot.memory.as_deref().unwrap_or(&config.memory),
            port,
            index,
            restore_at: prot.restore_at.as_deref(),
            restore_overwrite: prot.restore_overwrite,
        };
        if let Some(time) = plan.restore_at {
            wanted_restores.push(containers::restore(&plan, time, config));
        }
        wanted_sidecars.push(containers::sidecar(&plan, config));
    }

    // Restore containers first (the data must be back before the sidecar
    // journals it), then the sidecars, then the user's init containers,
    // which may read the volume and so need the mount live.
    let mut new_init: Vec<Map<String, Value>> = Vec::new();
    for wanted in wanted_restores.into_iter().chain(wanted_sidecars) {
        let name = wanted["name"].as_str().unwrap_or_default().to_string();
        let keep = existing_own
            .iter()
            .find(|c| str_field(c, "name") == name)
            .filter(|c| covers(&Value::Object((*c).clone()), &wanted, false));
        new_init.push(match keep {
            Some(existing) => existing.clone(),
            None => into_map(wanted),
        });
    }
    for c in user_init.iter_mut().chain(regular.iter_mut()) {
        rewire(c, &prot.volumes)?;
    }
    new_init.extend(user_init);

    for v in &prot.volumes {
        let wanted = containers::shared_volume(v);
        let name = containers::sidecar_name(v);
        match volumes.iter_mut().find(|x| str_field(x, "name") == name) {
            Some(existing) => {
                if !covers(&Value::Object(existing.clone()), &wanted, false) {
                    *existing = into_map(wanted);
                }
            }
            None => volumes.push(into_map(wanted)),
        }
    }

    set_list(spec, "initContainers", new_init);
    set_list(spec, "containers", regular);
    set_list(spec, "volumes", volumes);

    // Raise the grace period so the sidecar's final flush fits after the
    // app's own shutdown (the kubelet signals sidecars only once the app's
    // containers have exited). The original is kept in an annotation so a
    // second call computes the same value instead of adding again.
    let current = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_i64);
    let original = match annotations.get(annotations::APP_GRACE) {
        Some(s) => s.parse::<i64>().map_err(|_| {
            Denial::Refused(format!(
                "annotation {} is not a number of seconds",
                annotations::APP_GRACE
            ))
        })?,
        None => current.unwrap_or(DEFAULT_GRACE_SECONDS),
    };
    let needed = original + i64::from(config.shutdown_timeout_seconds) + GRACE_MARGIN_SECONDS;
    let grace = needed.max(current.unwrap_or(DEFAULT_GRACE_SECONDS));
    spec.insert("terminationGracePeriodSeconds".into(), json!(grace));

    let meta = new
        .as_object_mut()
        .expect("checked above")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let meta = meta
        .as_object_mut()
        .ok_or_else(|| malformed("metadata is not an object"))?;
    let ann = meta.entry("annotations").or_insert_with(|| json!({}));
    let ann = ann
        .as_object_mut()
        .ok_or_else(|| malformed("metadata.annotations is not an object"))?;
    ann.insert(annotations::INJECTED.into(), json!(prot.volumes.join(",")));
    ann.insert(annotations::APP_GRACE.into(), json!(original.to_string()));

    Ok(Mutation {
        patch: patch::diff(pod, &new),
        warnings: Vec::new(),
    })
}

/// Whether the webhook's own objects are already in the pod. A stale
/// marker for other volumes (a pod copied and edited by hand) is refused
/// rather than guessed at.
fn previously_injected(
    annotations: &BTreeMap<String, String>,
    prot: &Protection,
) -> Result<bool, Denial> {
    match annotations.get(annotations::INJECTED) {
        None => Ok(false),
        Some(list) if *list == prot.volumes.join(",") => Ok(true),
        Some(list) => Err(Denial::Refused(format!(
            "annotation {} says volumes {list:?} were injected, but {} asks for {:?}; remove {} \
             and the rewind-* containers and volumes from the pod spec, then create it again",
            annotations::INJECTED,
            annotations::VOLUMES,
            prot.volumes.join(","),
            annotations::INJECTED
        ))),
    }
}

/// The claim name of every protected volume, or the denial for one that
/// is missing or not a claim.
fn claims_of(prot: &Protection, volumes: &[Map<String, Value>]) -> Result<Vec<String>, Denial> {
    let mut claims = Vec::new();
    for name in &prot.volumes {
        let Some(volume) = volumes.iter().find(|v| str_field(v, "name") == name) else {
            let known: Vec<&str> = volumes
                .iter()
                .map(|v| str_field(v, "name"))
                .filter(|n| !n.starts_with("kube-api-access-"))
                .collect();
            return Err(Denial::Refused(format!(
                "{} names volume {name:?}, but the pod has no such volume (its volumes: {}); \
                 list the names under spec.volumes (for a StatefulSet, the volumeClaimTemplates' names)",
                annotations::VOLUMES,
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )));
        };
        let Some(pvc) = volume.get("persistentVolumeClaim") else {
            let kind = volume
                .keys()
                .find(|k| *k != "name")
                .map(String::as_str)
                .unwrap_or("unknown");
            let hint = if kind == "ephemeral" {
                "a generic ephemeral volume is deleted with its pod, so its history could never be restored into a new pod"
            } else {
                "rewind protects PersistentVolumeClaims only, because the name on the store (<namespace>/<claim>) must survive pod recreation"
            };
            return Err(Denial::Refused(format!(
                "volume {name:?} listed in {} is a {kind} volume, not a persistentVolumeClaim: {hint}; \
                 remove it from the annotation or back it with a PersistentVolumeClaim",
                annotations::VOLUMES
            )));
        };
        let claim = pvc
            .get("claimName")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| Denial::Malformed(format!("volume {name:?} has no claimName")))?;
        claims.push(claim.to_string());
    }
    Ok(claims)
}

/// Refuses pod-level settings under which the privileged sidecar cannot run.
fn check_pod_level(spec: &Map<String, Value>) -> Result<(), Denial> {
    if spec.get("hostUsers") == Some(&json!(false)) {
        return Err(Denial::Refused(
            "spec.hostUsers is false (a user namespace), which forbids the privileged container \
             rewind needs for Bidirectional mount propagation; remove hostUsers or the annotation"
                .into(),
        ));
    }
    if spec
        .get("os")
        .and_then(|os| os.get("name"))
        .and_then(Value::as_str)
        == Some("windows")
    {
        return Err(Denial::Refused(
            "rewind's sidecar runs on Linux nodes only (spec.os.name is windows)".into(),
        ));
    }
    Ok(())
}

/// Points an application container's mounts of protected volumes at the
/// shared emptyDir, with HostToContainer so that a new FUSE mount made by a
/// restarted sidecar reaches it.
fn rewire(container: &mut Map<String, Value>, protected: &[String]) -> Result<(), Denial> {
    let cname = str_field(container, "name").to_string();
    let Some(mounts) = container.get_mut("volumeMounts") else {
        return Ok(());
    };
    let mounts = mounts.as_array_mut().ok_or_else(|| {
        Denial::Malformed(format!("volumeMounts of container {cname:?} is not a list"))
    })?;
    for mount in mounts {
        let mount = mount.as_object_mut().ok_or_else(|| {
            Denial::Malformed(format!(
                "a volumeMount of container {cname:?} is not an object"
            ))
        })?;
        let name = str_field(mount, "name").to_string();
        let Some(volume) = protected
            .iter()
            .find(|v| **v == name || containers::sidecar_name(v) == name)
        else {
            continue;
        };
        if mount
            .get("recursiveReadOnly")
            .and_then(Value::as_str)
            .is_some_and(|r| r != "Disabled")
        {
            return Err(Denial::Refused(format!(
                "container {cname:?} mounts protected volume {volume:?} with recursiveReadOnly, which \
                 Kubernetes allows only without mount propagation, and the protected view needs \
                 HostToContainer propagation; use readOnly without recursiveReadOnly"
            )));
        }
        mount.insert("name".into(), json!(containers::sidecar_name(volume)));
        mount.insert("mountPropagation".into(), json!("HostToContainer"));
    }
    Ok(())
}

/// Whether `existing` already says everything `wanted` says. Extra fields
/// are allowed (the API server defaults some), and under `resources`
/// quantities compare by value, since the API server rewrites them in
/// canonical form ("0.5" becomes "500m").
fn covers(existing: &Value, wanted: &Value, in_resources: bool) -> bool {
    match (existing, wanted) {
        (Value::Object(e), Value::Object(w)) => w.iter().all(|(k, wv)| {
            e.get(k)
                .is_some_and(|ev| covers(ev, wv, in_resources || k == "resources"))
        }),
        (Value::Array(e), Value::Array(w)) => {
            e.len() == w.len() && e.iter().zip(w).all(|(ev, wv)| covers(ev, wv, in_resources))
        }
        (Value::String(e), Value::String(w)) if in_resources && e != w => {
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

fn conflict(kind: &str, name: &str) -> Denial {
    Denial::Refused(format!(
        "the pod already has a {kind} named {name:?}; names starting with \"rewind-\" are reserved \
         for the injected sidecar, so rename it"
    ))
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> &'a str {
    obj.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn into_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Reads `metadata.<key>` as a map of strings (absent is empty).
fn string_map(pod: &Value, key: &str) -> Result<BTreeMap<String, String>, Denial> {
    let Some(v) = pod.get("metadata").and_then(|m| m.get(key)) else {
        return Ok(BTreeMap::new());
    };
    if v.is_null() {
        return Ok(BTreeMap::new());
    }
    let obj = v
        .as_object()
        .ok_or_else(|| Denial::Malformed(format!("metadata.{key} is not an object")))?;
    obj.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_string())),
            None => Err(Denial::Malformed(format!(
                "metadata.{key}.{k} is not a string"
            ))),
        })
        .collect()
}

/// Reads `spec.<key>` as a list of objects (absent is empty).
fn object_list(spec: &Map<String, Value>, key: &str) -> Result<Vec<Map<String, Value>>, Denial> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_object().cloned().ok_or_else(|| {
                    Denial::Malformed(format!("an entry of spec.{key} is not an object"))
                })
            })
            .collect(),
        Some(_) => Err(Denial::Malformed(format!("spec.{key} is not a list"))),
    }
}

/// Writes `spec.<key>` back, leaving it absent when it was absent and stays empty.
fn set_list(spec: &mut Map<String, Value>, key: &str, items: Vec<Map<String, Value>>) {
    if items.is_empty() && !spec.contains_key(key) {
        return;
    }
    spec.insert(
        key.into(),
        Value::Array(items.into_iter().map(Value::Object).collect()),
    );
}
