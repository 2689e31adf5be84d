//! The objects the webhook adds to a pod: the sidecar (a native sidecar
//! running `rewind run`), the one-shot restore init container, the
//! `emptyDir` that carries the mount to the application, and the Secret
//! volume that carries the encryption key to Rewind's containers. Every field the
//! API server would default is written out, so that a reinvocation finds
//! what it would build again. These are whole containers, as Rewind adds
//! them the first time; which of their fields Rewind keeps claiming after
//! other mutators ran is `owned.rs`'s decision. This module builds JSON
//! values only; deciding where they go in the pod is `mod.rs`'s job.

use serde_json::{json, Map, Value};

use super::annotations::restore_marker_name;
use super::config::Config;

/// Where the sidecar and restore containers mount the claim itself.
pub const SOURCE_PATH: &str = "/rewind/source";
/// Where the sidecar mounts the shared emptyDir.
pub const MOUNT_PATH: &str = "/rewind/mnt";
/// The directory of the emptyDir the sidecar mounts FUSE on, and the
/// subPath every application mount of the protected volume gets. FUSE is
/// not mounted on the emptyDir's root because the container runtime binds
/// that root into a restarted sidecar: a dead mount on it would fail the
/// runtime's stat of its bind source, and no new sidecar could start.
pub const VIEW_DIR: &str = "view";

/// The pod volume that holds the encryption Secret. It cannot be the
/// shared emptyDir of a protected volume: `mod.rs` refuses a pod that
/// protects a volume named `encryption-key`.
pub const KEY_VOLUME: &str = "rewind-encryption-key";
/// Where Rewind's containers mount the Secret, read-only.
pub const KEY_DIR: &str = "/rewind/encryption";
/// The Secret's entry that holds the key-encryption key, projected under
/// the same file name.
pub const KEY_ITEM: &str = "key";

/// `--encryption-key-file` of Rewind's containers: a path, never the key.
pub fn key_file_path() -> String {
    format!("{KEY_DIR}/{KEY_ITEM}")
}

/// `--mount` of the sidecar: the view directory inside the emptyDir.
pub fn view_path() -> String {
    format!("{MOUNT_PATH}/{VIEW_DIR}")
}

/// The subPath (or subPathExpr) an application mount of the protected
/// volume gets in place of its own `theirs`: the view directory, or the
/// user's path inside it. A mount already pointed at the shared emptyDir
/// (`rewired`: a reinvocation) whose path is inside the view keeps it, so
/// Rewind's own output sent back yields no change.
pub fn view_sub_path(rewired: bool, theirs: Option<&str>) -> String {
    let theirs = theirs.unwrap_or("");
    let inside = theirs == VIEW_DIR || theirs.starts_with(&format!("{VIEW_DIR}/"));
    if rewired && inside {
        theirs.to_string()
    } else if theirs.is_empty() {
        VIEW_DIR.to_string()
    } else {
        format!("{VIEW_DIR}/{theirs}")
    }
}

/// Everything needed to build one protected volume's containers.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// The pod volume (a claim) being protected.
    pub volume: &'a str,
    /// The name on the store: `[cluster/]namespace/claim`.
    pub store_volume: String,
    pub store: &'a str,
    pub segment_interval: &'a str,
    pub cpu: &'a str,
    pub memory: &'a str,
    pub port: u16,
    /// Index among the protected volumes; names the metrics port.
    pub index: usize,
    pub restore_at: Option<&'a str>,
    pub restore_overwrite: bool,
    /// Whether the volume is encrypted with the key in `KEY_VOLUME`.
    pub encrypted: bool,
}

/// Name of the sidecar container and of the shared emptyDir for `volume`.
pub fn sidecar_name(volume: &str) -> String {
    derived_name("rewind-", volume)
}

/// Name of the restore init container for `volume`.
pub fn restore_name(volume: &str) -> String {
    derived_name("rewind-restore-", volume)
}

/// `prefix + volume`, kept within the 63 characters of a DNS label: a long
/// volume name is cut and suffixed with a hash of the whole name, so two
/// long names that share a prefix still get different names.
fn derived_name(prefix: &str, volume: &str) -> String {
    const MAX: usize = 63;
    if prefix.len() + volume.len() <= MAX {
        return format!("{prefix}{volume}");
    }
    let hash = blake3::hash(volume.as_bytes()).to_hex();
    let keep = MAX - prefix.len() - 9;
    // Volume names are DNS labels (ASCII), so byte slicing is on a char boundary.
    format!("{prefix}{}-{}", &volume[..keep], &hash[..8])
}

fn resources(plan: &Plan) -> Value {
    // CPU has a request but no limit: CFS throttling of a FUSE server stalls
    // every I/O of the application. Memory has request = limit so the
    // source's page cache, which is charged to the sidecar, is bounded and
    // predictable instead of being reclaimed from other pods.
    json!({
        "requests": {"cpu": plan.cpu, "memory": plan.memory},
        "limits": {"memory": plan.memory},
    })
}

fn common(name: String, config: &Config, args: Vec<String>, plan: &Plan) -> Map<String, Value> {
    let mut c = Map::new();
    c.insert("name".into(), json!(name));
    c.insert("image".into(), json!(config.image));
    c.insert("imagePullPolicy".into(), json!(config.image_pull_policy));
    c.insert("command".into(), json!([config.binary]));
    c.insert("args".into(), json!(args));
    if !config.env.is_empty() {
        c.insert("env".into(), Value::Array(config.env.clone()));
    }
    if !config.env_from.is_empty() {
        c.insert("envFrom".into(), Value::Array(config.env_from.clone()));
    }
    c.insert("resources".into(), resources(plan));
    c.insert(
        "terminationMessagePath".into(),
        json!("/dev/termination-log"),
    );
    c.insert(
        "terminationMessagePolicy".into(),
        json!("FallbackToLogsOnError"),
    );
    c
}

fn probe(path: &str, port: u16, period: u32, timeout: u32, failures: u32) -> Value {
    json!({
        "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "successThreshold": 1,
        "failureThreshold": failures,
    })
}

/// The native sidecar for one protected volume.
pub fn sidecar(plan: &Plan, config: &Config) -> Value {
    let name = sidecar_name(plan.volume);
    let mut args = vec![
        "run".to_string(),
        "--source".into(),
        SOURCE_PATH.into(),
        "--mount".into(),
        view_path(),
        "--store".into(),
        plan.store.into(),
        "--volume".into(),
        plan.store_volume.clone(),
        "--segment-interval".into(),
        plan.segment_interval.into(),
        "--listen".into(),
        format!("0.0.0.0:{}", plan.port),
        "--shutdown-timeout".into(),
        format!("{}s", config.shutdown_timeout_seconds),
    ];
    let mut mounts = vec![
        json!({"name": plan.volume, "mountPath": SOURCE_PATH}),
        json!({"name": name, "mountPath": MOUNT_PATH, "mountPropagation": "Bidirectional"}),
    ];
    with_key(plan, &mut args, &mut mounts);
    let mut c = common(name.clone(), config, args, plan);
    c.insert(
        "ports".into(),
        json!([{"name": format!("rewind-{}", plan.index), "containerPort": plan.port, "protocol": "TCP"}]),
    );
    // restartPolicy Always on an init container makes it a native sidecar
    // (Kubernetes >= 1.29): it starts before the app, stays up beside it,
    // and is stopped only after the app's containers have exited.
    c.insert("restartPolicy".into(), json!("Always"));
    // Privileged because Kubernetes allows Bidirectional propagation only
    // there, and the FUSE mount must propagate to the app. Root because the
    // passthrough creates files owned by the caller's uid and gid.
    c.insert(
        "securityContext".into(),
        json!({"privileged": true, "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false}),
    );
    // The startup probe holds every later container until the mount is
    // live; ten minutes covers redoing a large journal after a crash.
    c.insert(
        "startupProbe".into(),
        probe("/healthz", plan.port, 1, 1, 600),
    );
    // Readiness is mount live and journal writable; a store outage only
    // shows in metrics, so it never pulls the app out of its Service. There
    // is deliberately no liveness probe: restarting the sidecar over an
    // outage would break the app's mount and fix nothing.
    c.insert(
        "readinessProbe".into(),
        probe("/readyz", plan.port, 5, 2, 3),
    );
    c.insert("volumeMounts".into(), Value::Array(mounts));
    Value::Object(c)
}

/// The one-shot restore init container, when `rewind.dev/restore-at` is set.
pub fn restore(plan: &Plan, time: &str, config: &Config) -> Value {
    let marker = format!("{SOURCE_PATH}/.rewind/{}", restore_marker_name(time));
    let mut args = vec![
        "restore".to_string(),
        "--store".into(),
        plan.store.into(),
        "--volume".into(),
        plan.store_volume.clone(),
        "--at".into(),
        time.into(),
        "--target".into(),
        SOURCE_PATH.into(),
        "--once-marker".into(),
        marker,
    ];
    if plan.restore_overwrite {
        args.push("--force".into());
    }
    let mut mounts = vec![json!({"name": plan.volume, "mountPath": SOURCE_PATH})];
    with_key(plan, &mut args, &mut mounts);
    let mut c = common(restore_name(plan.volume), config, args, plan);
    // Root (not privileged) so that restored files get their recorded owners.
    c.insert(
        "securityContext".into(),
        json!({"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false}),
    );
    c.insert("volumeMounts".into(), Value::Array(mounts));
    Value::Object(c)
}

/// For an encrypted volume, the key file's path on the command line and
/// the read-only mount of the Secret that holds it. The path is all the
/// pod spec shows: the key stays in the Secret, out of `args` and `env`.
fn with_key(plan: &Plan, args: &mut Vec<String>, mounts: &mut Vec<Value>) {
    if plan.encrypted {
        args.push("--encryption-key-file".into());
        args.push(key_file_path());
        mounts.push(json!({"name": KEY_VOLUME, "mountPath": KEY_DIR, "readOnly": true}));
    }
}

/// The Secret volume for `secret`: only its entry `KEY_ITEM` is projected,
/// readable by its owner only (0400; Rewind's containers run as root).
pub fn key_volume(secret: &str) -> Value {
    json!({
        "name": KEY_VOLUME,
        "secret": {
            "secretName": secret,
            "items": [{"key": KEY_ITEM, "path": KEY_ITEM}],
            "defaultMode": 0o400,
        },
    })
}

/// The emptyDir the sidecar mounts FUSE in (on `VIEW_DIR`) and the app
/// mounts (its `VIEW_DIR`) to see it.
pub fn shared_volume(volume: &str) -> Value {
    json!({"name": sidecar_name(volume), "emptyDir": {}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_sub_path_table() {
        // (the mount already names the shared emptyDir, its subPath, want)
        let cases = [
            (false, None, "view"),
            (false, Some(""), "view"),
            (false, Some("pg_wal"), "view/pg_wal"),
            (false, Some("a/b"), "view/a/b"),
            // The user's own directory called view in their claim.
            (false, Some("view"), "view/view"),
            (false, Some("view/x"), "view/view/x"),
            // A reinvocation finds what Rewind wrote and keeps it.
            (true, Some("view"), "view"),
            (true, Some("view/pg_wal"), "view/pg_wal"),
            // Pointed at the emptyDir by someone else, outside the view.
            (true, None, "view"),
            (true, Some("viewer"), "view/viewer"),
            (true, Some("$(POD_NAME)"), "view/$(POD_NAME)"),
        ];
        for (rewired, theirs, want) in cases {
            assert_eq!(view_sub_path(rewired, theirs), want, "{rewired} {theirs:?}");
        }
        assert_eq!(view_path(), "/rewind/mnt/view");
    }
}
