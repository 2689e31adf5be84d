//! The admission webhook's pure core, driven by the cases in
//! tests/fixtures/webhook/cases.json. The same cases go over real HTTPS in
//! tests/e2e/test_webhook.py; here each one runs through
//! `rewind::webhook::mutate` directly, the returned patch is applied with an
//! independent RFC 6902 implementation, the injected command lines are
//! parsed by the real CLI, and the result is sent back (as is, after the
//! API server's defaulting, and with another webhook's container added) to
//! pin idempotency.

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
    assert_eq!(args.mount, Path::new("/rewind/mnt"));
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
    for (name, want) in &restores {
        check_restore(container(&init, name), want);
    }
    for (name, want) in &sidecars {
        check_run(container(&init, name), want);
    }
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
    let want_mount = json!({"name": format!("rewind-{first}"), "mountPath": "/snapshot", "mountPropagation": "HostToContainer"});
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
    let mut case = cases()
        .into_iter()
        .find(|c| c.name.starts_with("deployment pod"))
        .unwrap();
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

#[test]
fn a_stale_injection_marker_is_refused_not_guessed_at() {
    let case = cases()
        .into_iter()
        .find(|c| c.name.starts_with("deployment pod"))
        .unwrap();
    let mut pod = case.pod.clone();
    pod["metadata"]["annotations"]["rewind.dev/injected"] = json!("logs");
    let err = run(&case, &pod).unwrap_err().to_string();
    assert!(err.contains("rewind.dev/injected"), "{err}");
}

#[test]
fn grace_period_is_raised_never_lowered() {
    let case = cases()
        .into_iter()
        .find(|c| c.name.starts_with("deployment pod"))
        .unwrap();
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
