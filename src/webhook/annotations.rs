//! The annotation contract users write on their pod templates, and the
//! validation of every value in it. Each check returns a message that says
//! what to fix, because the user reads it as the reason their pod was
//! refused. This module parses strings only; it must not build containers
//! or look at anything but annotations.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::store::StoreUrl;

/// Comma-separated pod volume names to protect; the switch that turns injection on.
pub const VOLUMES: &str = "rewind.dev/volumes";
/// Store URL (`s3://bucket/prefix`); the webhook config may give a default.
pub const STORE: &str = "rewind.dev/store";
/// The sidecar's `--segment-interval`.
pub const SEGMENT_INTERVAL: &str = "rewind.dev/segment-interval";
/// CPU request of each sidecar.
pub const CPU: &str = "rewind.dev/cpu";
/// Memory request and limit of each sidecar.
pub const MEMORY: &str = "rewind.dev/memory";
/// Restore every protected volume to this TIME once, before the app starts.
pub const RESTORE_AT: &str = "rewind.dev/restore-at";
/// "true" lets the one-shot restore replace a non-empty volume.
pub const RESTORE_OVERWRITE: &str = "rewind.dev/restore-overwrite";
/// Name of a Secret in the pod's namespace whose entry `key` holds the
/// key-encryption key; the webhook mounts it into Rewind's containers as a
/// file, so the key never appears in the pod spec.
pub const ENCRYPTION_SECRET: &str = "rewind.dev/encryption-secret";
/// Written by the webhook: the volumes it injected for. It tells the
/// webhook's own containers and volumes apart from user objects that happen
/// to carry the same names, which makes reinvocation idempotent.
pub const INJECTED: &str = "rewind.dev/injected";
/// Written by the webhook: the grace period the pod had before injection,
/// so that raising it is a fixed point when the webhook is called again.
pub const APP_GRACE: &str = "rewind.dev/app-grace-period-seconds";
/// The pod label the MutatingWebhookConfiguration selects on.
pub const INJECT_LABEL: &str = "rewind.dev/inject";

const USER_KEYS: [&str; 8] = [
    VOLUMES,
    STORE,
    SEGMENT_INTERVAL,
    CPU,
    MEMORY,
    RESTORE_AT,
    RESTORE_OVERWRITE,
    ENCRYPTION_SECRET,
];
const OWN_KEYS: [&str; 2] = [INJECTED, APP_GRACE];

/// What the annotations ask for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protection {
    /// Pod volume names in annotation order, without duplicates.
    pub volumes: Vec<String>,
    pub store: Option<String>,
    pub segment_interval: Option<String>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub restore_at: Option<String>,
    pub restore_overwrite: bool,
    /// The Secret holding the key-encryption key; `None` stores plaintext.
    pub encryption_secret: Option<String>,
}

/// Reads the `rewind.dev/*` annotations. `Ok(None)` means the pod did not
/// ask for protection; `Err` carries the message for the denial.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Option<Protection>, String> {
    // A misspelt key (rewind.dev/volume, rewind.dev/restoreAt) would silently
    // leave data unprotected or not restored, so unknown keys are refused.
    for key in annotations.keys() {
        if key == INJECT_LABEL {
            return Err(format!(
                "{INJECT_LABEL} is a label, not an annotation; move it under metadata.labels"
            ));
        }
        if key.starts_with("rewind.dev/")
            && !USER_KEYS.contains(&key.as_str())
            && !OWN_KEYS.contains(&key.as_str())
        {
            return Err(format!(
                "unknown annotation {key}; rewind understands {}",
                USER_KEYS.join(", ")
            ));
        }
    }
    let Some(list) = annotations.get(VOLUMES) else {
        if let Some(other) = USER_KEYS.iter().find(|k| annotations.contains_key(**k)) {
            return Err(format!(
                "annotation {other} needs {VOLUMES} to say which volumes to protect"
            ));
        }
        return Ok(None);
    };
    let mut volumes = Vec::new();
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(format!("{VOLUMES}: {list:?} has an empty volume name; write pod volume names separated by commas, e.g. \"data,logs\""));
        }
        if volumes.iter().any(|v| v == name) {
            return Err(format!("{VOLUMES}: volume {name:?} is listed twice"));
        }
        volumes.push(name.to_string());
    }
    let store = annotations.get(STORE).cloned();
    if let Some(s) = &store {
        parse_store(s).map_err(|why| format!("{STORE}: {why}"))?;
    }
    let segment_interval = annotations.get(SEGMENT_INTERVAL).cloned();
    if let Some(s) = &segment_interval {
        parse_interval(s).map_err(|why| format!("{SEGMENT_INTERVAL}: {why}"))?;
    }
    let cpu = annotations.get(CPU).cloned();
    if let Some(s) = &cpu {
        parse_quantity(s, Quantity::Cpu).map_err(|why| format!("{CPU}: {why}"))?;
    }
    let memory = annotations.get(MEMORY).cloned();
    if let Some(s) = &memory {
        parse_quantity(s, Quantity::Memory).map_err(|why| format!("{MEMORY}: {why}"))?;
    }
    let restore_at = annotations.get(RESTORE_AT).cloned();
    if let Some(s) = &restore_at {
        parse_time(s).map_err(|why| format!("{RESTORE_AT}: {why}"))?;
    }
    let restore_overwrite = match annotations.get(RESTORE_OVERWRITE).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(format!(
                "{RESTORE_OVERWRITE}: {other:?} is neither \"true\" nor \"false\""
            ))
        }
    };
    if restore_overwrite && restore_at.is_none() {
        return Err(format!(
            "{RESTORE_OVERWRITE} only applies together with {RESTORE_AT}"
        ));
    }
    let encryption_secret = annotations.get(ENCRYPTION_SECRET).cloned();
    if let Some(s) = &encryption_secret {
        parse_secret_name(s).map_err(|why| format!("{ENCRYPTION_SECRET}: {why}"))?;
    }
    Ok(Some(Protection {
        volumes,
        store,
        segment_interval,
        cpu,
        memory,
        restore_at,
        restore_overwrite,
        encryption_secret,
    }))
}

/// Accepts only `s3://` stores: a `file://` store would live inside the
/// sidecar's own filesystem and vanish with it.
pub fn parse_store(url: &str) -> Result<(), String> {
    if !url.starts_with("s3://") {
        return Err(format!(
            "{url:?} is not an s3:// URL; in a cluster the store must be object storage, e.g. s3://my-bucket/rewind (a file:// store would live inside the sidecar container)"
        ));
    }
    match StoreUrl::parse(url) {
        Ok(StoreUrl::S3 { bucket, .. }) => {
            let ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if ok {
                Ok(())
            } else {
                Err(format!("{url:?}: bucket {bucket:?} is not a valid bucket name (3-63 lowercase letters, digits, '-' or '.')"))
            }
        }
        Ok(StoreUrl::File(_)) => Err(format!("{url:?} is not an s3:// URL")),
        Err(e) => Err(e.to_string()),
    }
}

/// Accepts a Secret name as the API server does (a DNS-1123 subdomain:
/// at most 253 characters, dot-separated labels of lowercase letters,
/// digits and '-' that start and end with a letter or digit), so that an
/// accepted annotation never yields a pod the API server refuses with a
/// message that does not name the annotation. The value is a name only:
/// key material pasted here would end up in the pod spec.
pub fn parse_secret_name(s: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
        return Err(format!(
            "{:?} is not a Secret name; name a Secret in the pod's namespace (lowercase letters, \
             digits, '-' and '.', starting and ending with a letter or digit, at most 253 \
             characters) whose entry \"key\" holds the key-encryption key, e.g. \"rewind-kek\"",
            shorten(s)
        ));
    }
    // The CLI reads a key file of 64 hex digits, which is also a valid
    // Secret name: refused, because a key pasted here is already exposed
    // in the pod spec and the user should know to replace it.
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(
            "the value is 64 hex digits, which looks like the key itself; put the key in a Secret \
             under the entry \"key\", write the Secret's name here, and replace this key, since \
             it is now visible to anyone who can read the pod"
                .to_string(),
        );
    }
    Ok(())
}

/// `s` cut to a length fit for an error message: a mistaken value may be
/// long (a pasted key), and the message should not repeat all of it.
fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// The segment interval with the same parser `rewind run` uses, bounded to
/// what makes sense for continuous protection.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"1s\", \"500ms\" or \"2m\"")
    })?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err(format!("{s:?} is out of range; use between 100ms and 1h"));
    }
    Ok(d)
}

/// Validates a restore TIME with the parser `rewind restore --at` uses
/// (RFC 3339, `@<unix seconds>` or `latest`), so an accepted annotation can
/// never make the restore container fail on its own command line.
pub fn parse_time(s: &str) -> Result<(), String> {
    crate::clock::parse_at(s)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Which resource a quantity is for; memory has a floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Cpu,
    Memory,
}

/// Parses a Kubernetes resource quantity ("250m", "1.5", "512Mi", "1e3")
/// into its value, and refuses zero, negatives and a memory size the
/// sidecar cannot run in. The API server would refuse a malformed quantity
/// too, but with a message that does not name the annotation.
pub fn parse_quantity(s: &str, kind: Quantity) -> Result<f64, String> {
    let bad = || {
        format!("{s:?} is not a Kubernetes quantity; write e.g. \"250m\" for CPU or \"512Mi\" for memory")
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (whole, frac) = number
        .split_once('.')
        .map_or((number, None), |(w, f)| (w, Some(f)));
    let has_digits = !whole.is_empty() || frac.is_some_and(|f| !f.is_empty());
    let one_point = !frac.is_some_and(|f| f.contains('.'));
    if !(has_digits && one_point) {
        return Err(bad());
    }
    let mantissa: f64 = number.parse().map_err(|_| bad())?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e = &exp[1..];
            let e_digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if e_digits.is_empty() || !e_digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let e: i32 = e.parse().map_err(|_| bad())?;
            10f64.powi(e)
        }
        _ => return Err(bad()),
    };
    let value = mantissa * factor;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("{s:?} must be greater than zero and finite"));
    }
    if kind == Quantity::Memory && value < super::config::MIN_SIDECAR_MEMORY_BYTES {
        return Err(format!("{s:?} is below the sidecar's minimum of 64Mi"));
    }
    Ok(value)
}

/// The marker file name that makes a restore to `time` one-shot. Characters
/// outside a conservative set become '_' so any TIME maps to a plain file
/// name; a different TIME gives a different marker, so changing the
/// annotation restores again.
pub fn restore_marker_name(time: &str) -> String {
    let safe: String = time
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("restored-at-{safe}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for (s, v) in [
            ("250m", 0.25),
            ("1", 1.0),
            ("1.5", 1.5),
            (".5", 0.5),
            ("2.", 2.0),
            ("1e3", 1000.0),
            ("1E-1", 0.1),
            ("2k", 2000.0),
        ] {
            assert_eq!(parse_quantity(s, Quantity::Cpu), Ok(v), "{s}");
        }
        assert_eq!(
            parse_quantity("512Mi", Quantity::Memory),
            Ok(512.0 * 1024.0 * 1024.0)
        );
        for bad in [
            "", ".", "1..2", "1.2.3", "m", "-1", "+1", "0", "0m", "1 Gi", "1gi", "1e", "1e+",
            "lots", "1e999",
        ] {
            assert!(
                parse_quantity(bad, Quantity::Cpu).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(parse_quantity("63Mi", Quantity::Memory).is_err());
    }

    #[test]
    fn secret_names_are_dns_subdomains() {
        let long_ok = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        for good in [
            "rewind-kek",
            "a",
            "kek.prod",
            "0",
            "a-b.c-d.e",
            long_ok.as_str(),
        ] {
            assert_eq!(parse_secret_name(good), Ok(()), "{good:?} refused");
        }
        let too_long = "a".repeat(254);
        for bad in [
            "",
            "Rewind-Kek",
            "-kek",
            "kek-",
            "kek.",
            ".kek",
            "a..b",
            "kek.-x",
            "kek_1",
            "kek key",
            "kek/key",
            too_long.as_str(),
        ] {
            let err = parse_secret_name(bad).expect_err(bad);
            assert!(err.contains("is not a Secret name"), "{bad:?}: {err}");
        }
        // A pasted key is refused, and not echoed in full into the refusal.
        let pasted = "0123456789abcdef".repeat(4);
        let err = parse_secret_name(&pasted).unwrap_err();
        assert!(err.contains("looks like the key itself"), "{err}");
        let err = parse_secret_name(&format!("{pasted}=")).unwrap_err();
        assert!(!err.contains(&pasted), "{err}");
    }

    #[test]
    fn marker_names_are_plain_file_names() {
        assert_eq!(
            restore_marker_name("2026-11-24T12:00:05.5+01:00"),
            "restored-at-2026-11-24T12_00_05.5_01_00"
        );
        assert_eq!(
            restore_marker_name("@1764000000"),
            "restored-at-_1764000000"
        );
        assert_eq!(restore_marker_name("../x"), "restored-at-.._x");
    }
}
