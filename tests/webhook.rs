//! The admission webhook's pure core, driven by the cases in
//! tests/fixtures/webhook/cases.json. The same cases go over real HTTPS in
//! tests/e2e/test_webhook.py; here each one runs through
//! `rewind::webhook::mutate` directly, the returned patch is applied with an
//! independent RFC 6902 implementation, the injected command lines are
//! parsed by the real CLI, and the result is sent back (as is, after the
//! API server's defaulting, and with another webhook's container added) to
//! pin idempotency. The admission chain is replayed too: AdmissionReview
//! bodies shaped like the API server's (tests/fixtures/webhook/chain/),
//! Rewind's patch, then other mutators' patches, then Rewind again, to pin
//! that Rewind keeps what the others added and touches only what it owns.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use rewind::cli::{Cli, Command, RestoreArgs, RunArgs};
use rewind::webhook::{self, Config, Denial, Mutation, Namespace, PodSecurity};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhook")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One case of cases.json, with its edits applied to its pod.
struct Case {
    name: String,
    pod: Value,
    namespace: String,
    pod_security: Option<PodSecurity>,
    config: Config,
    expect: Value,
}

fn apply(doc: &Value, patch: &Value) -> Value {
    let patch: json_patch::Patch =
        serde_json::from_value(patch.clone()).expect("patch is RFC 6902");
    let mut doc = doc.clone();
    json_patch::patch(&mut doc, &patch).expect("patch applies to the pod it was computed for");
    doc
}

/// The test config (config.json) with a case's overrides; `null` removes a key.
fn config_with(overrides: Option<&Value>) -> Config {
    let mut base = read_json(&fixtures().join("config.json"));
    if let Some(Value::Object(o)) = overrides {
        for (k, v) in o {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
    }
    let config: Config = serde_json::from_value(base).expect("test config parses");
    config.validate().expect("test config is valid");
    config
}

fn cases() -> Vec<Case> {
    let all = read_json(&fixtures().join("cases.json"));
    all.as_array()
        .expect("cases.json is a list")
        .iter()
        .map(|c| {
            let pod = read_json(&fixtures().join("pods").join(c["pod"].as_str().unwrap()));
            let pod = match c.get("edit") {
                Some(edit) => apply(&pod, edit),
                None => pod,
            };
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                pod,
                namespace: c["namespace"].as_str().unwrap().to_string(),
                pod_security: match c.get("podSecurity").and_then(Value::as_str) {
                    None => None,
                    Some("baseline") => Some(PodSecurity::Baseline),
                    Some("restricted") => Some(PodSecurity::Restricted),
                    Some(other) => panic!("unknown podSecurity {other}"),
                },
                config: config_with(c.get("config")),
                expect: c["expect"].clone(),
            }
        })
        .collect()
}

/// The first case of the table: a Deployment's pod protecting one claim.
fn deployment_case() -> Case {
    cases()
        .into_iter()
        .find(|c| c.name.starts_with("deployment pod"))
        .expect("cases.json has the deployment pod")
}

fn run(case: &Case, pod: &Value) -> Result<Mutation, Denial> {
    webhook::mutate(
        pod,
        Namespace {
            name: &case.namespace,
            pod_security: case.pod_security,
        },
        &case.config,
    )
}

fn patch_json(m: &Mutation) -> Value {
    serde_json::to_value(&m.patch).unwrap()
}

fn init_containers(pod: &Value) -> Vec<Value> {
    pod["spec"]["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn container<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no init container {name}"))
}

/// Parses a container's command line with the real CLI.
fn parse_command(c: &Value) -> Command {
    let argv: Vec<String> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["args"].as_array().unwrap())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("injected command line {argv:?} does not parse: {e}"))
        .command
}

/// An application mount of the shared emptyDir sees the FUSE view: its
/// subPath (or subPathExpr) is the view directory or a path inside it.
fn in_view(cname: &str, mount: &Value) -> Result<(), String> {
    let sub = mount
        .get("subPath")
        .or_else(|| mount.get("subPathExpr"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if sub == "view" || sub.starts_with("view/") {
        Ok(())
    } else {
        Err(format!(
            "{cname} mounts the emptyDir outside the view: {mount}"
        ))
    }
}

fn check_run(c: &Value, want: &Value) -> RunArgs {
    let Command::Run(args) = parse_command(c) else {
        panic!("sidecar does not run `rewind run`")
    };
    assert_eq!(args.store.store, want["store"].as_str().unwrap());
    assert_eq!(args.store.volume, want["volume"].as_str().unwrap());
    assert_eq!(
        args.listen.as_deref(),
        Some(format!("0.0.0.0:{}", want["port"]).as_str())
    );
    assert_eq!(
        args.segment_interval,
        humantime::parse_duration(want["segmentInterval"].as_str().unwrap()).unwrap()
    );
    assert_eq!(args.source, Path::new("/rewind/source"));
    assert_eq!(args.mount, Path::new("/rewind/mnt/view"));
    assert_eq!(args.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(c["startupProbe"]["httpGet"]["port"], want["port"]);
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        c.get("livenessProbe").is_none(),
        "a store outage must not restart the sidecar"
    );
    args
}

fn check_restore(c: &Value, want: &Value) -> RestoreArgs {
    let Command::Restore(args) = parse_command(c) else {
        panic!("restore container does not run `rewind restore`")
    };
    assert_eq!(args.at, want["at"].as_str().unwrap());
    assert_eq!(args.store.volume, want["volume"].as_str().unwrap());
    assert_eq!(args.force, want["force"].as_bool().unwrap());
    assert_eq!(args.target, Path::new("/rewind/source"));
    let marker = args.once_marker.clone().expect("restore-at is one-shot");
    assert!(
        marker.starts_with("/rewind/source/.rewind/"),
        "marker {marker:?} lives in the volume"
    );
    assert!(
        c.get("restartPolicy").is_none(),
        "the restore runs to completion"
    );
    args
}

/// What the API server adds when it decodes the patched pod again before
/// reinvoking webhooks: defaults (fieldRef.apiVersion) and quantities in
/// canonical form ("0.5" becomes "500m").
fn default_like_api_server(pod: &Value) -> Value {
    fn walk(v: &mut Value, key: &str) {
        match v {
            Value::Object(m) => {
                if key == "fieldRef" && !m.contains_key("apiVersion") {
                    m.insert("apiVersion".into(), json!("v1"));
                }
                for (k, child) in m.iter_mut() {
                    walk(child, k);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, key)),
            Value::String(s) if key == "cpu" => {
                if let Some(frac) = s.strip_prefix("0.") {
                    let millis: u32 = format!("{frac:0<3}")[..3].parse().unwrap();
                    *s = format!("{millis}m");
                }
            }
            _ => {}
        }
    }
    let mut pod = pod.clone();
    walk(&mut pod, "");
    pod
}

const KEY_VOLUME: &str = "rewind-encryption-key";

/// With `rewind.dev/encryption-secret`, one of Rewind's containers mounts
/// the Secret read-only and names the key file on its command line, and
/// nothing in the pod spec carries the key: no environment variable of any
/// container reads the Secret. Without it, no key is mounted or named.
fn check_key(
    pod: &Value,
    c: &Value,
    store: &rewind::cli::StoreArgs,
    secret: Option<&str>,
) -> Result<(), String> {
    let name = c["name"].as_str().unwrap();
    let mounts: Vec<&Value> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"] == KEY_VOLUME)
        .collect();
    match secret {
        Some(_) => {
            let want =
                json!({"name": KEY_VOLUME, "mountPath": "/rewind/encryption", "readOnly": true});
            if mounts != [&want] {
                return Err(format!("{name} mounts the key as {mounts:?}, not {want}"));
            }
            if store.encryption_key_file.as_deref() != Some(Path::new("/rewind/encryption/key")) {
                return Err(format!(
                    "{name} names key file {:?}",
                    store.encryption_key_file
                ));
            }
        }
        None => {
            if !mounts.is_empty() || store.encryption_key_file.is_some() {
                return Err(format!("{name} gets a key without the annotation"));
            }
        }
    }
    for (_, _, other) in all_containers(pod) {
        for e in other["env"].as_array().into_iter().flatten() {
            if e.pointer("/valueFrom/secretKeyRef").is_some() {
                return Err(format!("an env var reads a Secret: {e}"));
            }
        }
    }
    Ok(())
}

/// The pod's key volume: the Secret's entry `key` only, owner-readable,
/// mounted by Rewind's containers only; absent without the annotation.
fn check_key_volume(pod: &Value, secret: Option<&str>) -> Result<(), String> {
    let found: Vec<&Value> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == KEY_VOLUME)
        .collect();
    let want: Vec<Value> = secret
        .map(|s| {
            json!({"name": KEY_VOLUME, "secret": {"secretName": s,
                   "items": [{"key": "key", "path": "key"}], "defaultMode": 0o400}})
        })
        .into_iter()
        .collect();
    if found.into_iter().cloned().collect::<Vec<_>>() != want {
        return Err(format!("key volume is not {want:?}"));
    }
    for (_, _, c) in all_containers(pod) {
        let name = c["name"].as_str().unwrap();
        let mounts_key = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == KEY_VOLUME);
        if mounts_key && !name.starts_with("rewind-") {
            return Err(format!("application container {name} mounts the key"));
        }
    }
    Ok(())
}

fn check_patched(case: &Case) -> Result<(), String> {
    let m = run(case, &case.pod).map_err(|d| format!("denied: {d}"))?;
    if m.patch.is_empty() {
        return Err("expected a patch, got none".into());
    }
    let pod = apply(&case.pod, &patch_json(&m));
    let init = init_containers(&pod);
    let expect = &case.expect;

    let restores = expect
        .get("restores")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let sidecars = expect
        .get("sidecars")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let secret = expect.get("encryptionSecret").and_then(Value::as_str);
    for (name, want) in &restores {
        let args = check_restore(container(&init, name), want);
        check_key(&pod, container(&init, name), &args.store, secret)?;
    }
    for (name, want) in &sidecars {
        let args = check_run(container(&init, name), want);
        check_key(&pod, container(&init, name), &args.store, secret)?;
    }
    check_key_volume(&pod, secret)?;
    // Order: restores, then sidecars, then the user's init containers.
    let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    let n_restore = names
        .iter()
        .filter(|n| n.starts_with("rewind-restore-"))
        .count();
    let n_own = names.iter().filter(|n| n.starts_with("rewind-")).count();
    let in_order = names[..n_restore]
        .iter()
        .all(|n| n.starts_with("rewind-restore-"))
        && names[n_restore..n_own]
            .iter()
            .all(|n| n.starts_with("rewind-") && !n.starts_with("rewind-restore-"))
        && !names[n_own..].iter().any(|n| n.starts_with("rewind-"));
    if !in_order || n_restore != restores.len() {
        return Err(format!(
            "init containers out of order (restores, sidecars, user's): {names:?}"
        ));
    }
    if let Some(grace) = expect.get("grace") {
        if pod["spec"]["terminationGracePeriodSeconds"] != *grace {
            return Err(format!(
                "grace period {} != {grace}",
                pod["spec"]["terminationGracePeriodSeconds"]
            ));
        }
    }
    // The app no longer mounts the claim; it mounts the shared emptyDir with
    // HostToContainer, and only rewind's containers mount the claim.
    let protected: Vec<String> = case.pod["metadata"]["annotations"]["rewind.dev/volumes"]
        .as_str()
        .unwrap()
        .split(',')
        .map(|v| v.trim().to_string())
        .collect();
    if protected.len() != n_own - n_restore {
        return Err(format!(
            "{} sidecars for volumes {protected:?}",
            n_own - n_restore
        ));
    }
    for c in init
        .iter()
        .chain(pod["spec"]["containers"].as_array().unwrap())
    {
        let cname = c["name"].as_str().unwrap();
        for mount in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = mount["name"].as_str().unwrap();
            if protected.iter().any(|p| p == vname) && !cname.starts_with("rewind-") {
                return Err(format!(
                    "app container {cname} still mounts the claim {vname}"
                ));
            }
            if vname.starts_with("rewind-")
                && !cname.starts_with("rewind-")
                && mount["mountPropagation"] != "HostToContainer"
            {
                return Err(format!(
                    "app container {cname} mounts {vname} without HostToContainer"
                ));
            }
            if vname.starts_with("rewind-") && !cname.starts_with("rewind-") {
                in_view(cname, mount)?;
            }
        }
    }

    // Idempotency: the webhook's own output yields an empty patch, also
    // after the API server's defaulting.
    for (what, again) in [
        ("own output", pod.clone()),
        ("defaulted output", default_like_api_server(&pod)),
    ] {
        let m2 = run(case, &again).map_err(|d| format!("{what} sent back was denied: {d}"))?;
        if !m2.patch.is_empty() {
            return Err(format!(
                "{what} sent back gave a patch: {}",
                patch_json(&m2)
            ));
        }
    }

    // Another webhook adds a container that mounts the claim by its
    // original name: the reinvocation rewires it and changes nothing else.
    let first = protected
        .first()
        .expect("a patched case protects a volume")
        .clone();
    let mut other = pod.clone();
    other["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "mesh-proxy", "image": "proxy:1",
            "volumeMounts": [{"name": first, "mountPath": "/snapshot"}],
        }));
    let m3 = run(case, &other).map_err(|d| format!("other webhook's container denied: {d}"))?;
    let rewired = apply(&other, &patch_json(&m3));
    let proxy = rewired["spec"]["containers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let want_mount = json!({"name": format!("rewind-{first}"), "mountPath": "/snapshot", "mountPropagation": "HostToContainer", "subPath": "view"});
    if proxy["volumeMounts"][0] != want_mount {
        return Err(format!(
            "other webhook's container not rewired: {}",
            proxy["volumeMounts"]
        ));
    }
    let mut expected = pod.clone();
    expected["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(proxy);
    if rewired != expected {
        return Err("rewiring the other webhook's container changed something else".into());
    }
    let m4 = run(case, &rewired).map_err(|d| format!("{d}"))?;
    if !m4.patch.is_empty() {
        return Err(format!(
            "after rewiring, a second call still patches: {}",
            patch_json(&m4)
        ));
    }
    Ok(())
}

fn check(case: &Case) -> Result<(), String> {
    let expect = &case.expect;
    let contains_all = |msg: &str| -> Result<(), String> {
        for want in expect["message"].as_array().unwrap() {
            let want = want.as_str().unwrap();
            if !msg.contains(want) {
                return Err(format!("message {msg:?} lacks {want:?}"));
            }
        }
        Ok(())
    };
    match expect["result"].as_str().unwrap() {
        "patched" => check_patched(case),
        "untouched" => match run(case, &case.pod) {
            Ok(m) if m.patch.is_empty() => match expect.get("warning").and_then(Value::as_str) {
                Some(w) if !m.warnings.iter().any(|x| x.contains(w)) => {
                    Err(format!("no warning with {w:?}: {:?}", m.warnings))
                }
                None if !m.warnings.is_empty() => {
                    Err(format!("unexpected warnings {:?}", m.warnings))
                }
                _ => Ok(()),
            },
            other => Err(format!("expected untouched, got {other:?}")),
        },
        "denied" => match run(case, &case.pod) {
            Err(Denial::Refused(_)) => contains_all(&run(case, &case.pod).unwrap_err().to_string()),
            other => Err(format!("expected a denial, got {other:?}")),
        },
        "malformed" => match run(case, &case.pod) {
            Err(Denial::Malformed(msg)) => contains_all(&msg),
            other => Err(format!("expected malformed, got {other:?}")),
        },
        other => Err(format!("unknown expected result {other}")),
    }
}

#[test]
fn every_case_in_cases_json_behaves_as_expected() {
    let cases = cases();
    assert!(cases.len() >= 20, "the case table lost entries");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| check(c).err().map(|e| format!("{}: {e}", c.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn long_volume_names_give_distinct_valid_names() {
    let mut case = deployment_case();
    let long_a = format!("{}a", "v".repeat(60));
    let long_b = format!("{}b", "v".repeat(60));
    let vols = &mut case.pod["spec"]["volumes"];
    vols[0]["name"] = json!(long_a);
    vols.as_array_mut()
        .unwrap()
        .push(json!({"name": long_b, "persistentVolumeClaim": {"claimName": "other"}}));
    case.pod["spec"]["containers"][0]["volumeMounts"][0]["name"] = json!(long_a);
    case.pod["metadata"]["annotations"]["rewind.dev/volumes"] = json!(format!("{long_a},{long_b}"));
    let m = run(&case, &case.pod).expect("long names are accepted");
    let pod = apply(&case.pod, &patch_json(&m));
    let names: Vec<String> = init_containers(&pod)
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2);
    assert_ne!(names[0], names[1]);
    for n in &names {
        assert!(n.len() <= 63 && n.starts_with("rewind-"), "{n}");
    }
    assert!(run(&case, &pod).unwrap().patch.is_empty());
}

/// The key's Secret volume and mounts after other mutators touched them:
/// additions to them are kept, and anything that would change which key
/// Rewind reads, or from where, is set back at its own path.
#[test]
fn the_key_volume_and_mounts_are_reconciled_on_reinvocation() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "encryption secret on a deployment pod")
        .expect("cases.json has the encrypted deployment pod");
    let pod = apply(&case.pod, &patch_json(&run(&case, &case.pod).unwrap()));
    let key_at = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .position(|v| v["name"] == KEY_VOLUME)
        .expect("the key volume was added");
    let sidecar_at = init_containers(&pod)
        .iter()
        .position(|c| c["name"] == "rewind-data")
        .unwrap();
    let mount_at = init_containers(&pod)[sidecar_at]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m["name"] == KEY_VOLUME)
        .unwrap();
    let vol = format!("/spec/volumes/{key_at}");
    let mount = format!("/spec/initContainers/{sidecar_at}/volumeMounts/{mount_at}");
    // (what another mutator did, the patch Rewind answers with)
    let rows = [
        (
            json!([{"op": "add", "path": format!("{vol}/secret/optional"), "value": false},
                   {"op": "add", "path": format!("{mount}/recursiveReadOnly"), "value": "Disabled"}]),
            json!([]),
        ),
        (
            json!([{"op": "replace", "path": format!("{vol}/secret/secretName"), "value": "other"}]),
            json!([{"op": "replace", "path": vol, "value": {"name": KEY_VOLUME, "secret": {
                "secretName": "kek.shop", "items": [{"key": "key", "path": "key"}], "defaultMode": 256}}}]),
        ),
        (
            json!([{"op": "replace", "path": format!("{mount}/readOnly"), "value": false}]),
            json!([{"op": "replace", "path": format!("{mount}/readOnly"), "value": true}]),
        ),
        (
            json!([{"op": "remove", "path": mount}]),
            json!([{"op": "add", "path": format!("/spec/initContainers/{sidecar_at}/volumeMounts/-"),
                    "value": {"name": KEY_VOLUME, "mountPath": "/rewind/encryption", "readOnly": true}}]),
        ),
    ];
    for (other, want) in rows {
        let changed = apply(&pod, &other);
        let m = run(&case, &changed).unwrap_or_else(|d| panic!("{other}: {d}"));
        assert_eq!(patch_json(&m), want, "after {other}");
        let fixed = apply(&changed, &patch_json(&m));
        assert!(
            run(&case, &fixed).unwrap().patch.is_empty(),
            "after {other}: not a fixed point"
        );
    }
}

#[test]
fn a_stale_injection_marker_is_refused_not_guessed_at() {
    let case = deployment_case();
    let mut pod = case.pod.clone();
    pod["metadata"]["annotations"]["rewind.dev/injected"] = json!("logs");
    let err = run(&case, &pod).unwrap_err().to_string();
    assert!(err.contains("rewind.dev/injected"), "{err}");
}

#[test]
fn grace_period_is_raised_never_lowered() {
    let case = deployment_case();
    for (before, after) in [(Some(0), 35), (None, 65), (Some(30), 65), (Some(600), 635)] {
        let mut pod = case.pod.clone();
        match before {
            Some(g) => pod["spec"]["terminationGracePeriodSeconds"] = json!(g),
            None => {
                pod["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("terminationGracePeriodSeconds");
            }
        }
        let patched = apply(&pod, &patch_json(&run(&case, &pod).unwrap()));
        assert_eq!(
            patched["spec"]["terminationGracePeriodSeconds"],
            json!(after),
            "from {before:?}"
        );
    }
}

#[test]
fn config_files_are_validated_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    for (text, want) in [
        (r#"{"defaultStore": "file:///x"}"#, "defaultStore"),
        (r#"{"segmentInterval": "soon"}"#, "segmentInterval"),
        (r#"{"memory": "1Mi"}"#, "memory"),
        (r#"{"imagePullPolicy": "Sometimes"}"#, "imagePullPolicy"),
        (r#"{"imagee": "typo"}"#, "unknown field"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = Config::load(&path).unwrap_err();
        // The message as `rewind` prints it: the error and its sources.
        let mut msg = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        assert!(msg.contains(want), "{text}: {msg}");
    }
    std::fs::write(&path, "{}").unwrap();
    Config::load(&path).expect("an empty config takes the defaults");
}

#[test]
fn the_manifests_config_map_holds_a_valid_config() {
    // manifests/base/config.yaml embeds config.json as a literal block; the
    // webhook Deployment loads it, so it must pass the same validation.
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/base/config.yaml"),
    )
    .unwrap();
    let start = yaml
        .find("config.json: |")
        .expect("config.yaml has config.json")
        + "config.json: |".len();
    let json: String = yaml[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let config: Config = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}:\n{json}"));
    config.validate().unwrap();
}

// The status server of `rewind run` lives beside the webhook in src/http.rs;
// these pin its contract without a mount: health follows what the daemon
// reports, and /metrics renders the shared Metrics.

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn status_server_reports_health_and_metrics() {
    use std::sync::Arc;
    let metrics = Arc::new(rewind::metrics::Metrics::new("shop/web-data"));
    let server = rewind::http::StatusServer::start("127.0.0.1:0", metrics.clone()).unwrap();
    let addr = server.local_addr();
    assert_eq!(
        http_get(addr, "/healthz").0,
        503,
        "not live before the mount is"
    );
    assert_eq!(http_get(addr, "/readyz").0, 503);
    metrics.set_mount_live(true);
    assert_eq!(http_get(addr, "/healthz").0, 200);
    assert_eq!(
        http_get(addr, "/readyz").0,
        503,
        "ready needs a writable journal too"
    );
    metrics.set_journal_writable(true);
    assert_eq!(http_get(addr, "/readyz").0, 200);
    metrics.add_journal_written(12345);
    metrics.add_upload_error();
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("\nrewind_journal_written_bytes_total 12345\n"),
        "{body}"
    );
    assert!(body.contains("\nrewind_upload_errors_total 1\n"), "{body}");
    assert!(body.contains("volume=\"shop/web-data\""), "{body}");
    assert_eq!(http_get(addr, "/nope").0, 404);
    drop(server);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "dropping the server closes the port"
    );
}

// The API server's admission chain, replayed. Rewind is one mutator among
// several: built-in plugins (ServiceAccount) and other webhooks run before
// and after it, and with `reinvocationPolicy: IfNeeded` the API server
// calls Rewind again once others changed the pod it patched. Each other
// mutator here answers a JSON Patch computed from the pod it is given, as
// a webhook does, and the patches are applied with the independent
// json-patch crate. The requests are AdmissionReview bodies shaped like
// the API server's (tests/fixtures/webhook/chain/).

const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn chain_fixture(name: &str) -> Value {
    read_json(&fixtures().join("chain").join(name))
}

/// Runs `rewind::webhook::review` on an AdmissionReview body and returns
/// the decoded patch (empty when the response carries none).
fn review_patch(review: &Value, config: &Config) -> Value {
    use base64::Engine;
    let body = serde_json::to_vec(review).unwrap();
    let (answer, _) = webhook::review::review(&body, None, config).expect("a valid review");
    let response = &answer["response"];
    assert_eq!(
        response["uid"], review["request"]["uid"],
        "the uid is echoed"
    );
    assert_eq!(response["allowed"], true, "{response}");
    match response.get("patch").and_then(Value::as_str) {
        None => json!([]),
        Some(b64) => {
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        }
    }
}

/// The same AdmissionReview with another object (and request uid), as the
/// API server sends when it reinvokes a webhook.
fn reinvocation(first: &Value, pod: &Value, uid: &str) -> Value {
    let mut review = first.clone();
    review["request"]["object"] = pod.clone();
    review["request"]["uid"] = json!(uid);
    review
}

fn all_containers(pod: &Value) -> Vec<(&'static str, usize, Value)> {
    let mut out = Vec::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            out.push((list, i, c.clone()));
        }
    }
    out
}

/// A mutator other than Rewind: the patch it answers for a pod, and a
/// check that what it added is still in a later pod.
struct Other {
    name: &'static str,
    patch: fn(&Value) -> Value,
    survived: fn(&Value) -> Result<(), String>,
}

impl Other {
    const fn new(
        name: &'static str,
        patch: fn(&Value) -> Value,
        survived: fn(&Value) -> Result<(), String>,
    ) -> Self {
        Other {
            name,
            patch,
            survived,
        }
    }
}

/// The ServiceAccount admission plugin: a projected token volume (reused
/// if the pod has one) mounted read-only at the token path in every
/// container that lacks a mount there, init containers included.
fn service_account_plugin(pod: &Value) -> Value {
    let mut ops = Vec::new();
    let existing = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .find(|n| n.starts_with("kube-api-access-"))
        .map(str::to_string);
    let volume = existing
        .clone()
        .unwrap_or_else(|| "kube-api-access-7f2xk".into());
    if existing.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": {
            "name": volume, "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}}));
    }
    let mount = json!({"name": volume, "readOnly": true, "mountPath": TOKEN_PATH});
    for (list, i, c) in all_containers(pod) {
        match c["volumeMounts"].as_array() {
            None => ops.push(json!({"op": "add", "path": format!("/spec/{list}/{i}/volumeMounts"), "value": [mount]})),
            Some(ms) if ms.iter().any(|m| m["mountPath"] == TOKEN_PATH) => {}
            Some(_) => ops.push(json!({"op": "add", "path": format!("/spec/{list}/{i}/volumeMounts/-"), "value": mount})),
        }
    }
    Value::Array(ops)
}

fn service_account_survived(pod: &Value) -> Result<(), String> {
    let projected = pod["spec"]["volumes"].as_array().unwrap().iter().any(|v| {
        v["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("kube-api-access-"))
            && v["projected"]["sources"][0]["serviceAccountToken"]["path"] == "token"
    });
    if !projected {
        return Err("the projected token volume is gone".into());
    }
    for (_, _, c) in all_containers(pod) {
        let has = c["volumeMounts"].as_array().into_iter().flatten().any(|m| {
            m["mountPath"] == TOKEN_PATH
                && m["readOnly"] == true
                && m["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("kube-api-access-"))
        });
        if !has {
            return Err(format!(
                "{} lost the service account token mount",
                c["name"]
            ));
        }
    }
    Ok(())
}

/// Not a mutator: takes the ServiceAccount plugin's token volume and
/// mounts out of the pod, so that the plugin's run after Rewind is its
/// first and adds the projected volume as well.
fn without_token(pod: &Value) -> Value {
    let mut ops = Vec::new();
    for (list, i, c) in all_containers(pod) {
        let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
        for (j, m) in mounts.iter().enumerate().rev() {
            if m["mountPath"] == TOKEN_PATH {
                ops.push(
                    json!({"op": "remove", "path": format!("/spec/{list}/{i}/volumeMounts/{j}")}),
                );
            }
        }
    }
    for (i, v) in pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .rev()
    {
        if v["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("kube-api-access-"))
        {
            ops.push(json!({"op": "remove", "path": format!("/spec/volumes/{i}")}));
        }
    }
    Value::Array(ops)
}

/// A policy engine or secrets injector that touches every container: an
/// environment variable, a CA bundle volume mounted read-only, and a
/// seccomp profile in its securityContext.
fn policy_webhook(pod: &Value) -> Value {
    // Idempotent, as a webhook with reinvocationPolicy IfNeeded must be:
    // it adds only what is missing.
    let mut ops = Vec::new();
    if !pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "vault-ca")
    {
        ops.push(json!({"op": "add", "path": "/spec/volumes/-",
            "value": {"name": "vault-ca", "configMap": {"name": "vault-ca", "defaultMode": 420}}}));
    }
    let env = json!({"name": "VAULT_ADDR", "value": "https://vault.vault.svc:8200"});
    let mount = json!({"name": "vault-ca", "mountPath": "/vault/ca", "readOnly": true});
    for (list, i, c) in all_containers(pod) {
        if c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "VAULT_ADDR")
        {
            continue;
        }
        let at = format!("/spec/{list}/{i}");
        for (key, value) in [("env", &env), ("volumeMounts", &mount)] {
            if c.get(key).is_some_and(Value::is_array) {
                ops.push(json!({"op": "add", "path": format!("{at}/{key}/-"), "value": value}));
            } else {
                ops.push(json!({"op": "add", "path": format!("{at}/{key}"), "value": [value]}));
            }
        }
        let profile = json!({"type": "RuntimeDefault"});
        if c.get("securityContext").is_some_and(Value::is_object) {
            ops.push(json!({"op": "add", "path": format!("{at}/securityContext/seccompProfile"), "value": profile}));
        } else {
            ops.push(json!({"op": "add", "path": format!("{at}/securityContext"), "value": {"seccompProfile": profile}}));
        }
    }
    Value::Array(ops)
}

fn policy_survived(pod: &Value) -> Result<(), String> {
    if !pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "vault-ca")
    {
        return Err("the vault-ca volume is gone".into());
    }
    for (_, _, c) in all_containers(pod) {
        let name = &c["name"];
        if !c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "VAULT_ADDR")
        {
            return Err(format!("{name} lost VAULT_ADDR"));
        }
        if !c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| *m == json!({"name": "vault-ca", "mountPath": "/vault/ca", "readOnly": true}))
        {
            return Err(format!("{name} lost the vault-ca mount"));
        }
        if c["securityContext"]["seccompProfile"] != json!({"type": "RuntimeDefault"}) {
            return Err(format!("{name} lost its seccompProfile"));
        }
    }
    Ok(())
}

/// A webhook that adds an application container reading the protected
/// volume under its original name (a log shipper, a backup agent).
fn app_container_webhook(_pod: &Value) -> Value {
    json!([{"op": "add", "path": "/spec/containers/-", "value": {
        "name": "log-shipper", "image": "fluent-bit:3", "imagePullPolicy": "IfNotPresent",
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data", "readOnly": true}]}}])
}

fn app_container_survived(pod: &Value) -> Result<(), String> {
    let c = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "log-shipper")
        .ok_or("the log-shipper container is gone")?;
    if c["image"] != "fluent-bit:3" {
        return Err(format!("log-shipper changed: {c}"));
    }
    Ok(())
}

/// An injector that puts its own init container first, reading nothing
/// Rewind protects (a secrets agent's init, a mesh's iptables setup).
fn init_injector(pod: &Value) -> Value {
    let value = json!({"name": "vault-agent-init", "image": "vault:1.18", "args": ["agent", "-exit-after-auth"]});
    if pod["spec"]["initContainers"].is_array() {
        json!([{"op": "add", "path": "/spec/initContainers/0", "value": value}])
    } else {
        json!([{"op": "add", "path": "/spec/initContainers", "value": [value]}])
    }
}

fn init_injector_survived(pod: &Value) -> Result<(), String> {
    match init_containers(pod)
        .iter()
        .find(|c| c["name"] == "vault-agent-init")
    {
        Some(c) if c["args"] == json!(["agent", "-exit-after-auth"]) => Ok(()),
        other => Err(format!("vault-agent-init is gone or changed: {other:?}")),
    }
}

/// An injector that puts an init container first which reads the protected
/// volume: Rewind's containers must run before it, so they move ahead.
fn seeding_injector(_pod: &Value) -> Value {
    let value = json!({"name": "seed", "image": "busybox:1.36", "command": ["true"],
        "volumeMounts": [{"name": "data", "mountPath": "/seed", "subPath": "seed"}]});
    json!([{"op": "add", "path": "/spec/initContainers/0", "value": value}])
}

fn seeding_injector_survived(pod: &Value) -> Result<(), String> {
    let init = init_containers(pod);
    let seed = init
        .iter()
        .position(|c| c["name"] == "seed")
        .ok_or("the seed init container is gone")?;
    let last_own = init
        .iter()
        .rposition(|c| c["name"].as_str().unwrap().starts_with("rewind-"))
        .unwrap();
    if seed < last_own {
        return Err(format!("seed runs before the sidecar is up: {init:?}"));
    }
    // Rewind's view directory, then the injector's own path inside it.
    if init[seed]["volumeMounts"][0]["subPath"] != "view/seed" {
        return Err(format!(
            "seed's subPath was lost: {}",
            init[seed]["volumeMounts"][0]
        ));
    }
    Ok(())
}

/// A webhook that adds a container declaring the port Rewind's first
/// sidecar took (a metrics agent on 9746): the sidecar moves to a free
/// port, its arguments, probes and declared port with it.
fn port_taker(_pod: &Value) -> Value {
    json!([{"op": "add", "path": "/spec/containers/-", "value": {
        "name": "metrics-agent", "image": "agent:2",
        "ports": [{"name": "metrics", "containerPort": 9746, "protocol": "TCP"}]}}])
}

fn port_taker_survived(pod: &Value) -> Result<(), String> {
    match pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "metrics-agent")
    {
        Some(c) if c["ports"][0]["containerPort"] == 9746 => Ok(()),
        other => Err(format!("metrics-agent is gone or changed: {other:?}")),
    }
}

const WITHOUT_TOKEN: Other = Other::new("a pod without its token yet", without_token, |_| Ok(()));
const SERVICE_ACCOUNT: Other = Other::new(
    "ServiceAccount plugin",
    service_account_plugin,
    service_account_survived,
);
const POLICY: Other = Other::new("policy webhook", policy_webhook, policy_survived);
const APP_CONTAINER: Other = Other::new(
    "app container webhook",
    app_container_webhook,
    app_container_survived,
);
const INIT_FIRST: Other = Other::new("init injector", init_injector, init_injector_survived);
const PORT_TAKER: Other = Other::new("port taker", port_taker, port_taker_survived);
const SEEDER: Other = Other::new(
    "seeding injector",
    seeding_injector,
    seeding_injector_survived,
);

/// Whether one operation of Rewind's reinvocation patch touches only what
/// Rewind owns, judged against the pod as the earlier operations left it:
/// its own init containers (whole, or their image, command, args,
/// restartPolicy, the four securityContext keys, probes, resources, and
/// their own entries of volumeMounts, ports, env and envFrom), the name and
/// propagation of an application's mount of a protected volume, the
/// shared emptyDirs, the grace period and its own annotations.
fn touches_only_owned(pod: &Value, op: &Value, config: &Config) -> Result<(), String> {
    let path = op["path"].as_str().unwrap();
    let tokens: Vec<String> = path
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let t: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let own = |name: &Value| name.as_str().is_some_and(|n| n.starts_with("rewind-"));
    let ok = match t.as_slice() {
        ["metadata", "annotations", key] => key.starts_with("rewind.dev/"),
        ["spec", "terminationGracePeriodSeconds"] => true,
        ["spec", "volumes", _] => own(&op["value"]["name"]),
        ["spec", "initContainers", i] => match op["op"].as_str().unwrap() {
            "add" => own(&op["value"]["name"]),
            "move" => {
                let from = op["from"].as_str().unwrap();
                own(&pod.pointer(from).unwrap()["name"])
            }
            _ => own(&pod["spec"]["initContainers"][i.parse::<usize>().unwrap()]["name"]),
        },
        ["spec", list @ ("initContainers" | "containers"), i, rest @ ..] => {
            let c = &pod["spec"][*list][i.parse::<usize>().unwrap()];
            let entry = |key: &str| {
                rest.get(1)
                    .map(|j| &c[rest[0]][j.parse::<usize>().unwrap_or(usize::MAX)])
                    .map(|e| e[key].clone())
            };
            if own(&c["name"]) {
                match rest {
                    [f, ..]
                        if [
                            "image",
                            "command",
                            "args",
                            "restartPolicy",
                            "startupProbe",
                            "readinessProbe",
                            "resources",
                        ]
                        .contains(f) =>
                    {
                        true
                    }
                    ["securityContext", k] => {
                        ["privileged", "runAsUser", "runAsGroup", "runAsNonRoot"].contains(k)
                    }
                    ["volumeMounts", "-"] => op["value"]["mountPath"]
                        .as_str()
                        .unwrap()
                        .starts_with("/rewind/"),
                    ["volumeMounts", _, ..] => entry("mountPath")
                        .unwrap()
                        .as_str()
                        .unwrap_or("")
                        .starts_with("/rewind/"),
                    ["ports", "-"] => own(&op["value"]["name"]),
                    ["ports", _, ..] => own(&entry("name").unwrap()),
                    ["env", "-"] => config.env.iter().any(|e| e["name"] == op["value"]["name"]),
                    ["env", _, ..] => config
                        .env
                        .iter()
                        .any(|e| e["name"] == entry("name").unwrap()),
                    _ => false,
                }
            } else {
                matches!(
                    rest,
                    [
                        "volumeMounts",
                        _,
                        "name" | "mountPropagation" | "subPath" | "subPathExpr"
                    ]
                )
            }
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{op} touches what Rewind does not own"))
    }
}

/// Applies Rewind's patch one operation at a time, checking each against
/// the pod as the earlier ones left it.
fn apply_checking_ownership(pod: &Value, patch: &Value, config: &Config) -> Result<Value, String> {
    let mut pod = pod.clone();
    for op in patch.as_array().unwrap() {
        touches_only_owned(&pod, op, config)?;
        pod = apply(&pod, &json!([op]));
    }
    Ok(pod)
}

/// Rewind's contract on a pod it admitted: its containers in order before
/// any init container reading a protected volume, running what they
/// should, the sidecars privileged with Bidirectional propagation, and
/// every application container seeing the protected view.
fn check_wired(pod: &Value, protected: &[&str]) -> Result<(), String> {
    let init = init_containers(pod);
    let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    let own: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("rewind-"))
        .collect();
    let mut want: Vec<String> = protected
        .iter()
        .map(|v| format!("rewind-restore-{v}"))
        .collect();
    want.extend(protected.iter().map(|v| format!("rewind-{v}")));
    if own != want {
        return Err(format!("Rewind's containers {own:?}, wanted {want:?}"));
    }
    let last_own = names
        .iter()
        .rposition(|n| n.starts_with("rewind-"))
        .unwrap();
    for (list, _, c) in all_containers(pod) {
        let cname = c["name"].as_str().unwrap();
        let is_own = cname.starts_with("rewind-");
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap();
            let is_protected = protected
                .iter()
                .any(|p| *p == vname || format!("rewind-{p}") == vname);
            if !is_protected || is_own {
                continue;
            }
            if protected.contains(&vname) {
                return Err(format!("{cname} still mounts the claim {vname}"));
            }
            if m["mountPropagation"] != "HostToContainer" {
                return Err(format!("{cname} mounts {vname} without HostToContainer"));
            }
            in_view(cname, m)?;
            if list == "initContainers"
                && names.iter().position(|n| *n == cname).unwrap() < last_own
            {
                return Err(format!(
                    "init container {cname} reads {vname} before the sidecar is up"
                ));
            }
        }
    }
    for v in protected {
        let sidecar = container(&init, &format!("rewind-{v}"));
        let Command::Run(args) = parse_command(sidecar) else {
            return Err(format!("rewind-{v} does not run `rewind run`"));
        };
        if args.source != Path::new("/rewind/source") || sidecar["restartPolicy"] != "Always" {
            return Err(format!("rewind-{v} is not the sidecar: {sidecar}"));
        }
        if sidecar["securityContext"]["privileged"] != true
            || sidecar["securityContext"]["runAsUser"] != 0
        {
            return Err(format!("rewind-{v} is not privileged root"));
        }
        let mounts = sidecar["volumeMounts"].as_array().unwrap();
        if !mounts.contains(&json!({"name": format!("rewind-{v}"), "mountPath": "/rewind/mnt", "mountPropagation": "Bidirectional"}))
            || !mounts.contains(&json!({"name": v, "mountPath": "/rewind/source"}))
        {
            return Err(format!("rewind-{v} lost a mount it needs: {mounts:?}"));
        }
        if sidecar["startupProbe"]["httpGet"]["path"] != "/healthz"
            || sidecar["resources"]["limits"]["memory"].is_null()
        {
            return Err(format!("rewind-{v} lost its probe or limits"));
        }
        // The port it listens on is the one its probes ask and it declares,
        // and no other container of the pod declares it.
        let port: u64 = args
            .listen
            .as_deref()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let declared: Vec<u64> = all_containers(pod)
            .iter()
            .flat_map(|(_, _, c)| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["containerPort"].as_u64())
            .collect();
        if sidecar["startupProbe"]["httpGet"]["port"] != port
            || sidecar["readinessProbe"]["httpGet"]["port"] != port
            || declared.iter().filter(|p| **p == port).count() != 1
        {
            return Err(format!("rewind-{v} listens on {port}, probes or declares another, or shares it: {declared:?}"));
        }
    }
    Ok(())
}

/// One replay: `before` run ahead of Rewind's first call, `between` after
/// it and before the API server calls Rewind again.
struct Replay {
    name: &'static str,
    before: &'static [Other],
    between: &'static [Other],
    /// Whether Rewind must move its containers (ahead of an init container
    /// that reads a protected volume); otherwise nothing is moved.
    moves: bool,
}

fn replay(r: &Replay, config: &Config) -> Result<(), String> {
    let first = chain_fixture("create-db-0.json");
    let run_others = |pod: &Value, others: &[Other]| -> Value {
        others.iter().fold(pod.clone(), |pod, o| {
            let p = (o.patch)(&pod);
            apply(&pod, &p)
        })
    };
    let pod0 = run_others(&first["request"]["object"], r.before);
    let review1 = reinvocation(&first, &pod0, "3b8f8f2e-5c1a-4e0f-9d2b-7a61c0e4d901");
    let pod1 = apply(&pod0, &review_patch(&review1, config));
    // The API server re-runs the built-in plugins and the later webhooks on
    // the patched pod, then calls Rewind again.
    let pod2 = run_others(&pod1, r.between);
    let patch2 = review_patch(
        &reinvocation(&first, &pod2, "9c4e7d21-0b6a-4f3e-8a5d-2e1f0c9b7a63"),
        config,
    );
    let pod3 = apply(&pod2, &patch2);
    for o in r.before.iter().chain(r.between) {
        (o.survived)(&pod3).map_err(|e| format!("{}: {e}", o.name))?;
    }
    check_wired(&pod3, &["data", "wal"])?;
    let whole: Vec<&Value> = patch2
        .as_array()
        .unwrap()
        .iter()
        .map(|op| &op["path"])
        .filter(|p| {
            ["/spec/initContainers", "/spec/containers", "/spec/volumes"]
                .contains(&p.as_str().unwrap())
        })
        .collect();
    if !whole.is_empty() {
        return Err(format!("the reinvocation replaces whole lists: {whole:?}"));
    }
    apply_checking_ownership(&pod2, &patch2, config)?;
    let moved = patch2
        .as_array()
        .unwrap()
        .iter()
        .any(|op| op["op"] == "move");
    if moved != r.moves {
        return Err(format!("moves {moved}, expected {}: {patch2}", r.moves));
    }
    let foreign_init = |pod: &Value| -> Vec<Value> {
        init_containers(pod)
            .into_iter()
            .filter(|c| !c["name"].as_str().unwrap().starts_with("rewind-"))
            .map(|c| c["name"].clone())
            .collect()
    };
    if foreign_init(&pod3) != foreign_init(&pod2) {
        return Err(format!(
            "the other init containers were reordered: {:?}",
            foreign_init(&pod3)
        ));
    }
    let shipper = pod3["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "log-shipper");
    if let Some(c) = shipper {
        let want = json!({"name": "rewind-data", "mountPath": "/var/lib/postgresql/data", "readOnly": true, "mountPropagation": "HostToContainer", "subPath": "view"});
        if c["volumeMounts"][0] != want {
            return Err(format!("log-shipper not wired: {}", c["volumeMounts"]));
        }
    }
    // A third call changes nothing, also once the API server has defaulted
    // the pod again.
    for (what, pod) in [
        ("third call", pod3.clone()),
        (
            "third call after defaulting",
            default_like_api_server(&pod3),
        ),
    ] {
        let patch3 = review_patch(
            &reinvocation(&first, &pod, "e1d2c3b4-a596-4788-99aa-bbccddeeff00"),
            config,
        );
        if patch3 != json!([]) {
            return Err(format!("{what} still patches: {patch3}"));
        }
    }
    Ok(())
}

#[test]
fn reinvocation_keeps_what_other_mutators_added() {
    let config = config_with(None);
    let replays = [
        Replay {
            name: "the ServiceAccount plugin re-runs after Rewind",
            before: &[],
            between: &[SERVICE_ACCOUNT],
            moves: false,
        },
        Replay {
            name: "the ServiceAccount plugin's first run comes after Rewind",
            before: &[WITHOUT_TOKEN],
            between: &[SERVICE_ACCOUNT],
            moves: false,
        },
        Replay {
            name: "a policy webhook after Rewind",
            before: &[],
            between: &[POLICY],
            moves: false,
        },
        Replay {
            name: "a webhook adds an application container after Rewind",
            before: &[],
            between: &[APP_CONTAINER],
            moves: false,
        },
        Replay {
            name: "all of them after Rewind",
            before: &[],
            between: &[APP_CONTAINER, POLICY, SERVICE_ACCOUNT],
            moves: false,
        },
        Replay {
            name: "the others first, Rewind last, then the others reinvoked",
            before: &[POLICY, APP_CONTAINER, INIT_FIRST],
            between: &[SERVICE_ACCOUNT, POLICY],
            moves: false,
        },
        Replay {
            name: "an injector prepends an init container after Rewind",
            before: &[],
            between: &[INIT_FIRST, SERVICE_ACCOUNT],
            moves: false,
        },
        Replay {
            name: "an injector prepends an init container that reads the volume",
            before: &[],
            between: &[SEEDER, POLICY],
            moves: true,
        },
        Replay {
            name: "a webhook adds a container declaring the sidecar's port",
            before: &[],
            between: &[PORT_TAKER, POLICY, SERVICE_ACCOUNT],
            moves: false,
        },
    ];
    let failures: Vec<String> = replays
        .iter()
        .filter_map(|r| replay(r, &config).err().map(|e| format!("{}: {e}", r.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} replays failed:\n{}",
        failures.len(),
        replays.len(),
        failures.join("\n")
    );
}

/// The exact operations of a reinvocation, for one change another mutator
/// made to Rewind's own output: each at the path of the one field it
/// concerns, with the array indices the pod has at that point of the patch
/// and '/' in annotation keys escaped as "~1".
#[test]
fn reinvocation_patches_are_exact() {
    let case = deployment_case();
    let injected = apply(&case.pod, &patch_json(&run(&case, &case.pod).unwrap()));
    let token = json!({"name": "kube-api-access-7xk2p", "readOnly": true, "mountPath": TOKEN_PATH});
    let rows = [
        (
            "the token mount on the sidecar",
            json!([{"op": "add", "path": "/spec/initContainers/0/volumeMounts/-", "value": token}]),
            json!([]),
        ),
        (
            "a mirror's image on the sidecar",
            json!([{"op": "replace", "path": "/spec/initContainers/0/image", "value": "mirror.example/rewind:test"}]),
            json!([{"op": "replace", "path": "/spec/initContainers/0/image", "value": "rewind:test"}]),
        ),
        (
            "a policy's securityContext and CPU request on the sidecar",
            json!([{"op": "replace", "path": "/spec/initContainers/0/securityContext/privileged", "value": false},
                {"op": "add", "path": "/spec/initContainers/0/securityContext/seccompProfile", "value": {"type": "RuntimeDefault"}},
                {"op": "replace", "path": "/spec/initContainers/0/resources/requests/cpu", "value": "10m"}]),
            json!([{"op": "replace", "path": "/spec/initContainers/0/securityContext/privileged", "value": true},
                {"op": "replace", "path": "/spec/initContainers/0/resources/requests/cpu", "value": "100m"}]),
        ),
        (
            "an init container put first that does not read the volume",
            json!([{"op": "add", "path": "/spec/initContainers/0", "value": {"name": "vault-agent-init", "image": "vault:1.18"}}]),
            json!([]),
        ),
        (
            "an init container put first that reads the volume",
            json!([{"op": "add", "path": "/spec/initContainers/0", "value": {"name": "seed", "image": "busybox:1.36",
                 "volumeMounts": [{"name": "data", "mountPath": "/seed"}]}}]),
            json!([{"op": "move", "from": "/spec/initContainers/1", "path": "/spec/initContainers/0"},
                {"op": "add", "path": "/spec/initContainers/1/volumeMounts/0/mountPropagation", "value": "HostToContainer"},
                {"op": "replace", "path": "/spec/initContainers/1/volumeMounts/0/name", "value": "rewind-data"},
                {"op": "add", "path": "/spec/initContainers/1/volumeMounts/0/subPath", "value": "view"}]),
        ),
        (
            "an application container mounting the claim",
            json!([{"op": "add", "path": "/spec/containers/-", "value": {"name": "shipper", "image": "fluent-bit:3",
                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "data", "mountPath": "/logs", "readOnly": true}]}}]),
            json!([{"op": "add", "path": "/spec/containers/1/volumeMounts/1/mountPropagation", "value": "HostToContainer"},
                {"op": "replace", "path": "/spec/containers/1/volumeMounts/1/name", "value": "rewind-data"},
                {"op": "add", "path": "/spec/containers/1/volumeMounts/1/subPath", "value": "view"}]),
        ),
        (
            "the grace period lowered",
            json!([{"op": "replace", "path": "/spec/terminationGracePeriodSeconds", "value": 30}]),
            json!([{"op": "replace", "path": "/spec/terminationGracePeriodSeconds", "value": 65}]),
        ),
        // Without its record of the original, Rewind can only take the
        // current grace period as the application's and raise it again.
        (
            "the record of the original grace period removed",
            json!([{"op": "remove", "path": "/metadata/annotations/rewind.dev~1app-grace-period-seconds"}]),
            json!([{"op": "replace", "path": "/spec/terminationGracePeriodSeconds", "value": 100},
                {"op": "add", "path": "/metadata/annotations/rewind.dev~1app-grace-period-seconds", "value": "65"}]),
        ),
    ];
    let failures: Vec<String> = rows
        .into_iter()
        .filter_map(|(what, edit, want)| {
            let pod = apply(&injected, &edit);
            let got = patch_json(&run(&case, &pod).unwrap());
            if got != want {
                let ops: Vec<String> = got
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|op| {
                        format!(
                            "{} {}",
                            op["op"].as_str().unwrap_or_default(),
                            op["path"].as_str().unwrap_or_default()
                        )
                    })
                    .collect();
                return Some(format!("{what}: got {ops:?}, full: {got}"));
            }
            let again = apply(&pod, &got);
            if run(&case, &again).unwrap().patch.is_empty() {
                None
            } else {
                Some(format!("{what}: not a fixed point"))
            }
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
