//! The object store: where segments, chunks, base manifests and heartbeats
//! live. This module owns the `Store` trait, the parsing of store URLs and
//! the errors every backend reports; each backend lives in its own file
//! (`file.rs` for `file://` and plain paths, `s3.rs` for `s3://`) and is the
//! only code that talks to its storage. A store holds immutable objects
//! addressed by `/`-separated keys; it must never interpret object contents
//! (that is `segment`, `base` and `timeline`) and must never expose a
//! partially written object under its final key.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

/// `Store::delete_many` batches: S3 takes at most this many keys in one
/// DeleteObjects request, and prune checks its lock between batches.
pub const DELETE_BATCH: usize = 1000;

pub mod faulty;
pub mod file;
pub mod s3;
pub mod sealed;

/// Errors a store backend reports. `NotFound` is separate so that callers
/// can tell "absent" from "broken"; `Unreachable` is the transient class
/// that the shipper retries forever and that `run` reports in metrics.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found in {store}")]
    NotFound { store: String, key: String },
    #[error("store {store} is unreachable: {detail} (check the endpoint and network)")]
    Unreachable { store: String, detail: String },
    #[error("store {store} refused access: {detail} (check credentials and permissions)")]
    Denied { store: String, detail: String },
    #[error("store {store} is misconfigured: {detail}")]
    Config { store: String, detail: String },
    #[error("store {store}: I/O error on {key}: {source}")]
    Io {
        store: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid store URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    /// The volume's encryption setup does not match the key given.
    #[error("store {store}: {source}")]
    Key {
        store: String,
        #[source]
        source: sealed::KeyError,
    },
    /// An encrypted volume's object failed to open: it is corrupt or was
    /// tampered with (changed, or moved from another key).
    #[error("store {store}: object {key}: {source}")]
    Sealed {
        store: String,
        key: String,
        #[source]
        source: crate::crypt::CryptError,
    },
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unreachable { .. } | StoreError::Io { .. })
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A key that `Store::delete_many` could not delete, and why.
#[derive(Debug)]
pub struct Undeleted {
    pub key: String,
    pub error: StoreError,
}

/// An object store of immutable, self-contained objects.
///
/// Contract for every backend (the shared test suite in `tests/store.rs`
/// runs against each):
/// - `put` is atomic: readers see the whole object under `key` or nothing.
///   Putting the same key twice with the same bytes is allowed (retries).
/// - `list` returns every key under `prefix`, sorted bytewise ascending.
/// - `get` of an absent key is `StoreError::NotFound`.
/// - `delete` of an absent key succeeds, so that an interrupted prune can
///   simply repeat its deletes; so does `delete_many` for each of its keys.
///   Only `rewind prune` deletes; the sidecar's credentials need not allow it.
pub trait Store: Send + Sync {
    fn put(&self, key: &str, data: Bytes) -> Result<()>;
    fn get(&self, key: &str) -> Result<Bytes>;
    fn exists(&self, key: &str) -> Result<bool>;
    /// Like `list`, with each object's size in bytes (for prune's report).
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>>;
    /// The keys under `prefix`, sorted. Backends list with sizes anyway,
    /// so this is `list_sized` without them unless a wrapper needs its own.
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_sized(prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
    fn delete(&self, key: &str) -> Result<()>;
    /// Deletes every key in `keys`, each as `delete` would. Backends batch
    /// what they can (S3: DeleteObjects, up to 1000 keys a request); this
    /// default deletes one key at a time. `Err` means the store failed as a
    /// whole, having deleted some keys or none (deleting is repeatable);
    /// otherwise the result lists the keys that could not be deleted with
    /// the error of each, and is empty when every key is gone.
    fn delete_many(&self, keys: &[String]) -> Result<Vec<Undeleted>> {
        Ok(keys
            .iter()
            .filter_map(|key| {
                self.delete(key).err().map(|error| Undeleted {
                    key: key.clone(),
                    error,
                })
            })
            .collect())
    }
    /// A human-readable name ("file:///data/store", "s3://bucket/prefix").
    fn describe(&self) -> String;
    /// Aborts multipart uploads that a crashed writer left open under
    /// `prefix` and returns how many there were. `put` aborts its own
    /// failed uploads, but a process killed mid-upload cannot; open uploads
    /// are invisible to readers yet billed. Only a volume's single writer
    /// may call this, at start and before it uploads anything, since it
    /// would also cut short a live writer's upload. Backends without
    /// multipart uploads have nothing to clean.
    fn abort_incomplete_uploads(&self, _prefix: &str) -> Result<usize> {
        Ok(0)
    }
    /// How the volume names its chunks (`crypt::ChunkNaming`): plain blake3
    /// unless the volume is encrypted, which only `sealed::Volume` knows.
    /// Backends answer `Plain`; every wrapper must forward it (there is
    /// deliberately no default, so that a new wrapper cannot forget and
    /// name an encrypted volume's chunks by their plain hash).
    fn chunk_naming(&self) -> Result<crate::crypt::ChunkNaming>;
}

impl fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A parsed `--store` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    File(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl> {
        let bad = |why: &str| StoreError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    "file:// URLs need an absolute path, e.g. file:///var/lib/rewind",
                ));
            }
            return Ok(StoreUrl::File(PathBuf::from(rest)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("s3:// URLs need a bucket, e.g. s3://my-bucket/rewind"));
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if url.contains("://") {
            return Err(bad(
                "unknown scheme; use file:///path, a plain path, or s3://bucket/prefix",
            ));
        }
        if url.is_empty() {
            return Err(bad("empty"));
        }
        let p = PathBuf::from(url);
        let abs = if p.is_absolute() {
            p
        } else {
            std::env::current_dir()
                .map_err(|e| bad(&format!("cannot resolve relative path: {e}")))?
                .join(p)
        };
        Ok(StoreUrl::File(abs))
    }
}

/// Options that only some backends use; the CLI fills them in.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    pub s3_endpoint: Option<String>,
    pub s3_path_style: bool,
    /// Open even if the store cannot be reached right now (`run` starting
    /// during an outage keeps journaling and retries); a missing bucket or
    /// refused credentials still fail. Read-only commands leave it false
    /// so that a wrong endpoint fails at once.
    pub tolerate_unreachable: bool,
    /// Skip the bucket check at open (used when the check already timed out).
    pub skip_check: bool,
    /// Put every object with this S3 Object Lock retention (`s3://` only).
    pub object_lock: Option<ObjectLock>,
}

/// The S3 Object Lock retention mode (what S3 calls ObjectLockMode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Principals with s3:BypassGovernanceRetention may shorten or remove it.
    Governance,
    /// Nobody, the account's root included, can shorten it or delete a
    /// locked version before it ends.
    Compliance,
}

/// A retention every put carries: locked for `days` from the put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub days: u32,
}

/// Opens the store a URL names; `s3://` checks the bucket before returning.
pub fn open(url: &str, opts: &StoreOptions) -> Result<Arc<dyn Store>> {
    match StoreUrl::parse(url)? {
        StoreUrl::File(_) if opts.object_lock.is_some() => Err(StoreError::Config {
            store: url.to_string(),
            detail:
                "Object Lock retention needs an s3:// store whose bucket has Object Lock enabled"
                    .into(),
        }),
        StoreUrl::File(path) => Ok(Arc::new(file::FileStore::open(path)?)),
        StoreUrl::S3 { bucket, prefix } => open_s3(url, &bucket, &prefix, opts),
    }
}

fn open_s3(_url: &str, bucket: &str, prefix: &str, opts: &StoreOptions) -> Result<Arc<dyn Store>> {
    let mut cfg = s3::S3Config::new(bucket, prefix);
    cfg.endpoint = opts.s3_endpoint.clone();
    cfg.path_style = opts.s3_path_style;
    cfg.tolerate_unreachable = opts.tolerate_unreachable;
    cfg.skip_check = opts.skip_check;
    cfg.object_lock = opts.object_lock;
    Ok(Arc::new(s3::S3Store::open(cfg)?))
}

/// Opens volume `volume` of the store at `url`: the store viewed under the
/// volume's prefix, plaintext or sealed as `encryption` and the volume's
/// keys decide (`sealed::Volume`).
pub fn open_volume(
    url: &str,
    volume: &str,
    opts: &StoreOptions,
    encryption: sealed::Encryption,
) -> Result<Arc<sealed::Volume>> {
    let root = open(url, opts)?;
    Ok(Arc::new(sealed::Volume::new(
        Arc::new(Prefixed::new(root, volume)),
        encryption,
    )))
}

/// A store viewed under a key prefix (the volume's namespace), so that the
/// rest of the code names keys relative to the volume.
pub struct Prefixed {
    inner: Arc<dyn Store>,
    prefix: String,
}

impl Prefixed {
    pub fn new(inner: Arc<dyn Store>, prefix: &str) -> Prefixed {
        let mut p = prefix.trim_matches('/').to_string();
        if !p.is_empty() {
            p.push('/');
        }
        Prefixed { inner, prefix: p }
    }
    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
}

impl Store for Prefixed {
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.inner.put(&self.full(key), data)
    }
    fn get(&self, key: &str) -> Result<Bytes> {
        self.inner.get(&self.full(key))
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(&self.full(key))
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let n = self.prefix.len();
        Ok(self
            .inner
            .list(&self.full(prefix))?
            .into_iter()
            .map(|k| k[n..].to_string())
            .collect())
    }
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let n = self.prefix.len();
        Ok(self
            .inner
            .list_sized(&self.full(prefix))?
            .into_iter()
            .map(|(k, size)| (k[n..].to_string(), size))
            .collect())
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(&self.full(key))
    }
    fn delete_many(&self, keys: &[String]) -> Result<Vec<Undeleted>> {
        let full: Vec<String> = keys.iter().map(|k| self.full(k)).collect();
        let n = self.prefix.len();
        Ok(self
            .inner
            .delete_many(&full)?
            .into_iter()
            .map(|u| Undeleted {
                key: u.key[n..].to_string(),
                error: u.error,
            })
            .collect())
    }
    fn describe(&self) -> String {
        format!(
            "{} (volume prefix {})",
            self.inner.describe(),
            self.prefix.trim_end_matches('/')
        )
    }
    fn abort_incomplete_uploads(&self, prefix: &str) -> Result<usize> {
        self.inner.abort_incomplete_uploads(&self.full(prefix))
    }
    fn chunk_naming(&self) -> Result<crate::crypt::ChunkNaming> {
        self.inner.chunk_naming()
    }
}
