//! The admission webhook's pure core: given a pod as the API server sent it,
//! the namespace of the request and the webhook's settings, decide whether
//! to inject the Rewind sidecar and compute the JSON Patch that does it, or
//! the message that denies the pod. Everything here is a function of its
//! inputs (pod in, operations out), so tests feed captured pods without a
//! server. This module owns the annotation contract (`annotations`), the
//! settings (`config`), the injected objects (`containers`), which fields
//! of the pod are Rewind's (`owned`), the patch (`patch`) and the
//! AdmissionReview envelope (`review`); it must not touch HTTP, files or
//! the clock (`src/http.rs` serves it).
//!
//! # What injection does, per protected volume V (a claim)
//! - the claim V stays in the pod but is mounted only by Rewind's
//!   containers, at `/rewind/source`;
//! - an `emptyDir` named `rewind-V` is added; the sidecar mounts it with
//!   `Bidirectional` propagation and mounts FUSE on its directory `view`,
//!   and every application container that mounted V (init containers
//!   included) now mounts `rewind-V` with `subPath: view` (`view/<theirs>`)
//!   at the same path with `HostToContainer`, so it sees the protected view;
//! - a native sidecar `rewind-V` runs `rewind run`, placed after the restore
//!   init containers and before the user's init containers;
//! - with `rewind.dev/restore-at`, an init container `rewind-restore-V`
//!   restores V once, before the sidecar starts;
//! - with `rewind.dev/encryption-secret: S`, one `secret` volume
//!   `rewind-encryption-key` projects S's entry `key` (mode 0400), which
//!   every sidecar and restore container mounts read-only at
//!   `/rewind/encryption` and names with `--encryption-key-file
//!   /rewind/encryption/key`: the pod spec holds the Secret's name and the
//!   file's path, never the key.
//!
//! # Living in an admission chain
//! Other mutators run before and after Rewind, and the API server calls
//! Rewind again after them (`reinvocationPolicy: IfNeeded`). The patch
//! therefore claims only what Rewind decides: the existence and order of
//! its containers, the fields listed in `owned`, the name, propagation and
//! view subPath of the application's mounts of protected volumes, the
//! shared emptyDir and the key's Secret volume, the grace period and its
//! two annotations. Each is brought to what Rewind
//! wants by an operation at its own path, against a working copy that
//! already holds the earlier operations; everything else, on Rewind's
//! containers too, is left as found. An existing value satisfies Rewind
//! when it contains what Rewind would write (the API server's defaulting
//! only adds fields), so Rewind's own output sent back yields an empty
//! patch, a pod changed by others since gets operations on Rewind's fields
//! only, and containers another webhook added are rewired.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

pub mod annotations;
pub mod config;
pub mod containers;
mod owned;
pub mod patch;
pub mod review;

pub use config::{Config, ConfigError};
pub use patch::{Op, Patch};

use annotations::Protection;
use containers::Plan;
use patch::{EditError, Editor, Pointer};

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

impl From<EditError> for Denial {
    fn from(e: EditError) -> Self {
        Denial::Malformed(e.to_string())
    }
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

    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| malformed("the pod has no spec object"))?;
    check_pod_level(spec)?;
    let volumes = object_list(spec, "volumes")?;
    let init = object_list(spec, "initContainers")?;
    let regular = object_list(spec, "containers")?;
    if regular.is_empty() {
        return Err(malformed("spec.containers is empty"));
    }
    for c in init.iter().chain(&regular) {
        if c.get("name").and_then(Value::as_str).is_none() {
            return Err(malformed("a container has no name"));
        }
        check_mounts(c)?;
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
    // previous invocation (then they are reconciled, not a conflict).
    let mut own_containers = BTreeSet::new();
    let mut own_volumes = BTreeSet::new();
    for v in &prot.volumes {
        own_containers.insert(containers::sidecar_name(v));
        own_containers.insert(containers::restore_name(v));
        own_volumes.insert(containers::sidecar_name(v));
    }
    if prot.encryption_secret.is_some() {
        if let Some(v) = prot
            .volumes
            .iter()
            .find(|v| containers::sidecar_name(v) == containers::KEY_VOLUME)
        {
            return Err(Denial::Refused(format!(
                "volume {v:?} would need the name {:?} for its shared emptyDir, which {} needs \
                 for the Secret volume; rename the pod volume {v:?}",
                containers::KEY_VOLUME,
                annotations::ENCRYPTION_SECRET
            )));
        }
        own_volumes.insert(containers::KEY_VOLUME.to_string());
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

    let used_ports: BTreeSet<i64> = init
        .iter()
        .filter(|c| !own_containers.contains(str_field(c, "name")))
        .chain(&regular)
        .filter_map(|c| c.get("ports").and_then(Value::as_array))
        .flatten()
        .filter_map(|p| p.get("containerPort").and_then(Value::as_i64))
        .collect();
    let wanted = wanted_containers(&prot, &claims, &store, ns.name, &used_ports, config)?;

    // The patch is built against a working copy, one precise operation at a
    // time, so that whatever other mutators put into the pod (also into
    // Rewind's own containers) stays as they left it.
    let mut ed = Editor::new(pod);
    place_own_containers(&mut ed, &wanted, &own_containers, &prot.volumes)?;
    for list in ["initContainers", "containers"] {
        rewire(&mut ed, list, &own_containers, &prot.volumes)?;
    }
    for v in &prot.volumes {
        ensure_volume(&mut ed, containers::shared_volume(v))?;
    }
    if let Some(secret) = &prot.encryption_secret {
        ensure_volume(&mut ed, containers::key_volume(secret))?;
    }

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
    let root = Pointer::root();
    owned::ensure(
        &mut ed,
        &root.key("spec").key("terminationGracePeriodSeconds"),
        &json!(grace),
        false,
    )?;
    let mut own_annotations = Map::new();
    own_annotations.insert(annotations::INJECTED.into(), json!(prot.volumes.join(",")));
    own_annotations.insert(annotations::APP_GRACE.into(), json!(original.to_string()));
    owned::ensure(
        &mut ed,
        &root.key("metadata"),
        &json!({ "annotations": own_annotations }),
        false,
    )?;

    Ok(Mutation {
        patch: ed.finish(),
        warnings: Vec::new(),
    })
}

/// Rewind's init containers as it would build them for this pod, in the
/// order they must run: the restore containers first (the data must be
/// back before the sidecar journals it), then the sidecars. Each sidecar
/// listens on the first port from `metricsPort` on that no other container
/// declares (they share one network namespace).
fn wanted_containers(
    prot: &Protection,
    claims: &[String],
    store: &str,
    namespace: &str,
    used_ports: &BTreeSet<i64>,
    config: &Config,
) -> Result<Vec<Value>, Denial> {
    let mut next_port = i64::from(config.metrics_port);
    let mut wanted_restores = Vec::new();
    let mut wanted_sidecars = Vec::new();
    for (index, (volume, claim)) in prot.volumes.iter().zip(claims).enumerate() {
        while used_ports.contains(&next_port) {
            next_port += 1;
        }
        let port = u16::try_from(next_port)
            .map_err(|_| Denial::Refused("no free port for the sidecar's metrics".into()))?;
        next_port += 1;
        let store_volume = match &config.cluster_id {
            Some(id) => format!("{id}/{namespace}/{claim}"),
            None => format!("{namespace}/{claim}"),
        };
        let plan = Plan {
            volume,
            store_volume,
            store,
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
            encrypted: prot.encryption_secret.is_some(),
        };
        if let Some(time) = plan.restore_at {
            wanted_restores.push(containers::restore(&plan, time, config));
        }
        wanted_sidecars.push(containers::sidecar(&plan, config));
    }

    Ok(wanted_restores.into_iter().chain(wanted_sidecars).collect())
}

/// Puts Rewind's init containers (`wanted`, in the order they must run)
/// into the pod and brings the fields Rewind owns on each to what it
/// wants. Rewind needs only this order: its containers in `wanted`'s order,
/// all of them before any other init container that mounts a protected
/// volume (which needs the mount live). Init containers other mutators put
/// elsewhere stay where they are, so two injectors that each insert
/// their own containers agree whichever runs first. A missing container
/// goes right after the previous one of Rewind's (the first at the front);
/// one out of place is moved there with its foreign fields intact.
fn place_own_containers(
    ed: &mut Editor,
    wanted: &[Value],
    own: &BTreeSet<String>,
    protected: &[String],
) -> Result<(), Denial> {
    let list = Pointer::root().key("spec").key("initContainers");
    // A container of Rewind's the pod no longer asks for (a restore
    // container once restore-at is gone) is removed.
    while let Some(stale) = containers_at(ed, &list).iter().position(|c| {
        let name = str_field(c, "name");
        own.contains(name) && !wanted.iter().any(|w| w["name"] == name)
    }) {
        ed.remove(&list.index(stale))?;
    }
    let mut next = 0;
    for w in wanted {
        let current = containers_at(ed, &list);
        let first_dependent = current.iter().position(|c| {
            !own.contains(str_field(c, "name")) && mounted_protected(c, protected).next().is_some()
        });
        let found = current.iter().position(|c| c.get("name") == w.get("name"));
        let at = match found {
            None if ed.get(&list).is_some_and(Value::is_array) => {
                ed.add(&list.index(next), w.clone())?;
                next
            }
            None => {
                owned::ensure(ed, &list, &json!([w]), false)?;
                0
            }
            Some(i) if i >= next && first_dependent.is_none_or(|d| i < d) => i,
            Some(i) => {
                // Moving forward removes the container first, which shifts
                // the previous one of Rewind's back by one.
                let to = if i < next { next - 1 } else { next };
                ed.move_to(&list.index(i), &list.index(to))?;
                to
            }
        };
        owned::ensure_container(ed, &list.index(at), w)?;
        next = at + 1;
    }
    Ok(())
}

/// Points the application's mounts of protected volumes, in `spec.<list>`,
/// at the view directory of the shared emptyDir (`subPath: view`, or
/// `view/<theirs>` for a mount with its own subPath or subPathExpr), with
/// HostToContainer. The application's mount is then a copy of the FUSE
/// mount itself, which a restarted sidecar mounts over, so the new mount
/// reaches it; a user subPath is a directory inside the FUSE mount, which
/// a mount on the FUSE mount's root does not reach (docs/KUBERNETES.md).
/// Each mount's `name`, `mountPropagation` and the view prefix of its
/// subPath are Rewind's; its path, the rest of its subPath and readOnly
/// stay the application's.
fn rewire(
    ed: &mut Editor,
    list: &str,
    own: &BTreeSet<String>,
    protected: &[String],
) -> Result<(), Denial> {
    let at = Pointer::root().key("spec").key(list);
    for (i, c) in containers_at(ed, &at).iter().enumerate() {
        let cname = str_field(c, "name");
        if own.contains(cname) {
            continue;
        }
        for (j, mount, volume) in mounted_protected(c, protected) {
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
            let key = if mount.contains_key("subPathExpr") {
                "subPathExpr"
            } else {
                "subPath"
            };
            let rewired = str_field(mount, "name") == containers::sidecar_name(volume);
            let theirs = mount.get(key).and_then(Value::as_str);
            let wanted = json!({
                "name": containers::sidecar_name(volume),
                "mountPropagation": "HostToContainer",
                key: containers::view_sub_path(rewired, theirs),
            });
            owned::ensure(
                ed,
                &at.index(i).key("volumeMounts").index(j),
                &wanted,
                false,
            )?;
        }
    }
    Ok(())
}

/// Adds one of the webhook's volumes (the emptyDir a sidecar mounts FUSE
/// over, the Secret with the encryption key), or puts it back if something
/// turned it into another kind of volume or another Secret; fields another
/// mutator added to it (a sizeLimit) stay.
fn ensure_volume(ed: &mut Editor, wanted: Value) -> Result<(), Denial> {
    let list = Pointer::root().key("spec").key("volumes");
    let found = containers_at(ed, &list)
        .iter()
        .position(|x| x.get("name") == wanted.get("name"))
        .map(|i| {
            (
                i,
                ed.get(&list.index(i))
                    .is_some_and(|x| owned::covers(x, &wanted, false)),
            )
        });
    match found {
        Some((_, true)) => {}
        Some((i, false)) => ed.replace(&list.index(i), wanted)?,
        None => ed.add(&list.end(), wanted)?,
    }
    Ok(())
}

/// The mounts of `container` that name a protected volume, by its own name
/// or by the shared emptyDir's: (index, mount, protected volume).
fn mounted_protected<'a>(
    container: &'a Map<String, Value>,
    protected: &'a [String],
) -> impl Iterator<Item = (usize, &'a Map<String, Value>, &'a String)> + 'a {
    container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(move |(j, m)| {
            let mount = m.as_object()?;
            let name = str_field(mount, "name");
            let volume = protected
                .iter()
                .find(|v| **v == name || containers::sidecar_name(v) == name)?;
            Some((j, mount, volume))
        })
}

/// Refuses a container whose volumeMounts are not a list of objects, so
/// that the rest can read them without checking again.
fn check_mounts(container: &Map<String, Value>) -> Result<(), Denial> {
    let cname = str_field(container, "name");
    match container.get("volumeMounts") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(mounts)) if mounts.iter().all(Value::is_object) => Ok(()),
        Some(Value::Array(_)) => Err(Denial::Malformed(format!(
            "a volumeMount of container {cname:?} is not an object"
        ))),
        Some(_) => Err(Denial::Malformed(format!(
            "volumeMounts of container {cname:?} is not a list"
        ))),
    }
}

/// The objects of the list at `at` in the working copy (absent is empty).
fn containers_at(ed: &Editor, at: &Pointer) -> Vec<Map<String, Value>> {
    ed.get(at)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_object().cloned())
        .collect()
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
                "volume {name:?} listed in {} is {} volume, not a persistentVolumeClaim: {hint}; \
                 remove it from the annotation or back it with a PersistentVolumeClaim",
                annotations::VOLUMES,
                with_article(kind)
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

/// `word` after its indefinite article, "a" or "an" by the sound it starts
/// with: volume kinds are field names, read as words ("an emptyDir", "a
/// configMap", "an ephemeral") unless they have no vowel, and then letter by
/// letter ("an nfs", "an rbd", "an fc").
fn with_article(word: &str) -> String {
    let lower = word.to_ascii_lowercase();
    let is_vowel = |c: char| "aeiou".contains(c);
    let an = match lower.chars().next() {
        None => false,
        // Spelt out: the letters whose names start with a vowel sound.
        Some(first) if !lower.chars().any(is_vowel) => "aefhilmnorsx".contains(first),
        // Words that start with a vowel letter but a consonant sound.
        Some(_)
            if ["uni", "use", "usu", "eu", "one"]
                .iter()
                .any(|p| lower.starts_with(p)) =>
        {
            false
        }
        Some(first) => is_vowel(first),
    };
    format!("{} {word}", if an { "an" } else { "a" })
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

#[cfg(test)]
mod tests {
    use super::with_article;

    #[test]
    fn the_article_follows_the_sound() {
        for (kind, want) in [
            ("emptyDir", "an emptyDir"),
            ("ephemeral", "an ephemeral"),
            ("image", "an image"),
            ("iscsi", "an iscsi"),
            ("azureDisk", "an azureDisk"),
            ("unknown", "an unknown"),
            ("configMap", "a configMap"),
            ("hostPath", "a hostPath"),
            ("secret", "a secret"),
            ("csi", "a csi"),
            ("gcePersistentDisk", "a gcePersistentDisk"),
            ("nfs", "an nfs"),
            ("rbd", "an rbd"),
            ("fc", "an fc"),
            ("uniqueThing", "a uniqueThing"),
        ] {
            assert_eq!(with_article(kind), want);
        }
    }
}
