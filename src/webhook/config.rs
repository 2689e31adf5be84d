//! The webhook's settings: what the operator decides once for the whole
//! cluster (sidecar image, default store, default resources, the shutdown
//! budget, environment for store credentials). Read from a JSON file given
//! by `rewind webhook --config`, validated at start so that a bad setting
//! stops the webhook before it can inject a broken sidecar. This module only
//! describes and validates settings; it must not read pods or talk HTTP.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::annotations::{parse_interval, parse_quantity, parse_store, Quantity};

/// Errors loading or validating the webhook configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read webhook config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook config {path} is not valid JSON for rewind's settings")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("webhook config: {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

/// Injection settings. Field names are camelCase in the JSON file, like
/// Kubernetes objects, because operators write it next to manifests.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// The image that holds the `rewind` binary (sidecar and restore containers).
    pub image: String,
    /// Pull policy of the injected containers; written out explicitly so the
    /// API server's defaulting cannot make a reinvocation differ.
    pub image_pull_policy: String,
    /// Absolute path of the binary inside the image.
    pub binary: String,
    /// Store used when a pod has no `rewind.dev/store` annotation.
    pub default_store: Option<String>,
    /// Prefix of every volume name on the store, so several clusters can
    /// share a bucket: `<clusterId>/<namespace>/<claim>`.
    pub cluster_id: Option<String>,
    /// Default `--segment-interval` (humantime, e.g. "1s").
    pub segment_interval: String,
    /// Default CPU request of the sidecar (no CPU limit: throttling a FUSE
    /// server stalls the application's I/O).
    pub cpu: String,
    /// Default memory request and limit of the sidecar.
    pub memory: String,
    /// The sidecar's `--shutdown-timeout` in seconds; the pod's grace period
    /// is raised by this plus a margin so the final flush fits.
    pub shutdown_timeout_seconds: u32,
    /// First port for the sidecars' /healthz, /readyz and /metrics; the
    /// N-th protected volume gets the N-th free port from here.
    pub metrics_port: u16,
    /// Extra environment for the injected containers (store endpoint,
    /// credentials via secretKeyRef), copied verbatim as Kubernetes EnvVar.
    pub env: Vec<Value>,
    /// EnvFromSource entries copied verbatim (e.g. a Secret with AWS keys).
    pub env_from: Vec<Value>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            image: format!("rewind:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            binary: "/usr/local/bin/rewind".into(),
            default_store: None,
            cluster_id: None,
            segment_interval: "1s".into(),
            cpu: "100m".into(),
            memory: "256Mi".into(),
            shutdown_timeout_seconds: 30,
            metrics_port: 9746,
            env: Vec::new(),
            env_from: Vec::new(),
        }
    }
}

/// The smallest memory limit the sidecar is allowed: below it the daemon
/// and its journal mapping do not fit and the kernel would OOM-kill it
/// under load, which the application sees as a dead mount.
pub const MIN_SIDECAR_MEMORY_BYTES: f64 = 64.0 * 1024.0 * 1024.0;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: Config =
            serde_json::from_slice(&text).map_err(|source| ConfigError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting with the same rules the annotations obey.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, why: String| Err(ConfigError::Invalid { field, why });
        if self.image.trim().is_empty() {
            return invalid("image", "must name the rewind image".into());
        }
        if !matches!(
            self.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return invalid(
                "imagePullPolicy",
                "must be Always, IfNotPresent or Never".into(),
            );
        }
        if !self.binary.starts_with('/') {
            return invalid("binary", "must be an absolute path inside the image".into());
        }
        if let Some(store) = &self.default_store {
            if let Err(why) = parse_store(store) {
                return invalid("defaultStore", why);
            }
        }
        if let Some(id) = &self.cluster_id {
            if id.is_empty() || id.contains('/') || id.contains("..") {
                return invalid("clusterId", "must be a non-empty name without '/'".into());
            }
        }
        if let Err(why) = parse_interval(&self.segment_interval) {
            return invalid("segmentInterval", why);
        }
        if let Err(why) = parse_quantity(&self.cpu, Quantity::Cpu) {
            return invalid("cpu", why);
        }
        if let Err(why) = parse_quantity(&self.memory, Quantity::Memory) {
            return invalid("memory", why);
        }
        if self.shutdown_timeout_seconds == 0 {
            return invalid("shutdownTimeoutSeconds", "must be at least 1".into());
        }
        if self.metrics_port < 1024 {
            return invalid("metricsPort", "must be 1024 or above".into());
        }
        for (field, list) in [("env", &self.env), ("envFrom", &self.env_from)] {
            if list.iter().any(|v| !v.is_object()) {
                return invalid(
                    field,
                    "every entry must be an object (a Kubernetes EnvVar / EnvFromSource)".into(),
                );
            }
        }
        if self
            .env
            .iter()
            .any(|v| v.get("name").and_then(Value::as_str).is_none())
        {
            return invalid("env", "every entry needs a name".into());
        }
        Ok(())
    }

    /// The sidecar's shutdown timeout as passed to `rewind run`.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.shutdown_timeout_seconds))
    }
}
