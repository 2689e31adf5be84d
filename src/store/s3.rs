//! The `s3://bucket/prefix` backend, on aws-sdk-s3.
//!
//! This is the only module that imports aws-sdk-s3 or aws-config. It owns:
//! building a client from the standard AWS chain (region, credentials,
//! endpoint), the retry policy (exponential backoff with full jitter on
//! transient failures), multipart uploads for large objects (aborted on
//! failure so that none is left open), ranged parallel downloads, and the
//! mapping of S3 failures to [`StoreError`] with messages that say what to
//! fix. It must never interpret object contents, and never make a partially
//! uploaded object visible: a single PUT is atomic in S3, and a multipart
//! object appears only when `CompleteMultipartUpload` succeeds.
//!
//! # Runtime
//!
//! The `Store` trait is synchronous, so the backend runs its own small tokio
//! runtime and blocks the calling thread on it. Callers must therefore not
//! call it from inside an async context. Many threads may call it at once;
//! a semaphore bounds the number of requests in flight for the whole store.
//!
//! # Retries
//!
//! The SDK's own retries are disabled so that one policy, visible and
//! testable here, decides: every request attempt has a deadline (a base
//! plus an allowance per byte), and transient failures (5xx, throttling,
//! timeouts, connection errors, truncated bodies) are retried with backoff
//! and jitter up to `RetryPolicy::max_attempts`. What is still failing after
//! that is reported as `StoreError::Unreachable`, which the shipper retries
//! forever without losing data (the journal holds it).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::primitives::DateTime;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
    ObjectLockMode,
};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use tokio::sync::Semaphore;

use super::{Result, Store, StoreError, Undeleted};

/// Part size and threshold above which puts use multipart upload. 16 MiB
/// keeps a one-second segment of a busy volume in a handful of parts.
pub const DEFAULT_PART_SIZE: usize = 16 << 20;
/// S3 rejects parts smaller than 5 MiB (except the last one).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// How failed attempts are retried: `max_attempts` tries in all, sleeping a
/// uniformly random time in `[0, min(max_delay, base_delay * 2^n))` before
/// try `n + 1` ("full jitter", so that many sidecars recovering from the
/// same outage do not retry in lockstep).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The sleep before attempt `failed + 1`, given that `failed` attempts
    /// (at least one) have failed. `unit` is a random number in [0, 1).
    pub fn delay(&self, failed: u32, unit: f64) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << failed.saturating_sub(1).min(20));
        exp.min(self.max_delay).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// Everything the S3 backend needs. `None` fields come from the standard
/// AWS chain (environment, profile, SSO, web identity, instance metadata).
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`.
    pub prefix: String,
    /// Endpoint URL; `None` uses `AWS_ENDPOINT_URL(_S3)` or AWS itself.
    pub endpoint: Option<String>,
    pub path_style: bool,
    /// Region; `None` uses the AWS chain and then `us-east-1`.
    pub region: Option<String>,
    /// Static access key and secret; `None` uses the AWS credential chain.
    pub credentials: Option<(String, String)>,
    /// Objects larger than this use multipart upload and ranged downloads.
    pub part_size: usize,
    /// Requests in flight for the whole store (parts and ranges included).
    pub max_concurrency: usize,
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// Deadline of one request attempt carrying no body to speak of.
    pub attempt_timeout: Duration,
    /// Bytes per second a body must at least move at; the attempt deadline
    /// grows by `len / min_throughput` so that big parts are not cut short.
    pub min_throughput: u64,
    /// Let `open` succeed when the endpoint cannot be reached (a daemon that
    /// starts during an outage keeps journaling); bad buckets and refused
    /// credentials still fail.
    pub tolerate_unreachable: bool,
    /// Do not run HeadBucket at open.
    pub skip_check: bool,
    /// Object Lock retention every put carries (the bucket must have
    /// Object Lock enabled, or S3 refuses the put).
    pub object_lock: Option<super::ObjectLock>,
}

impl S3Config {
    pub fn new(bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            path_style: false,
            region: None,
            credentials: None,
            part_size: DEFAULT_PART_SIZE,
            max_concurrency: 8,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(30),
            min_throughput: 1 << 20,
            tolerate_unreachable: false,
            skip_check: false,
            object_lock: None,
        }
    }
}

/// What kind of failure one attempt ran into; decides retry and the
/// `StoreError` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Worth retrying: 5xx, throttling, timeouts, connection trouble.
    Transient,
    NotFound,
    /// The bucket does not exist.
    NoBucket,
    Denied,
    /// The bucket lives in another region than the client signs for.
    WrongRegion,
    /// Credentials could not be loaded at all.
    NoCredentials,
    /// An object changed between two ranged reads of one get.
    Changed,
    /// The multipart upload vanished (aborted by someone else).
    NoUpload,
    /// Anything else the server refused (a 4xx we do not expect).
    Rejected,
}

/// Classifies an S3 answer by HTTP status and error code. Pure, so that the
/// table is pinned by unit tests.
pub fn classify(status: Option<u16>, code: Option<&str>) -> Class {
    match code {
        Some("NoSuchKey") => return Class::NotFound,
        Some("NoSuchBucket") => return Class::NoBucket,
        Some("NoSuchUpload") => return Class::NoUpload,
        Some("PreconditionFailed") => return Class::Changed,
        Some(
            "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "InvalidToken"
            | "TokenRefreshRequired"
            | "AccountProblem"
            | "AllAccessDisabled"
            | "InvalidSecurity"
            | "UnauthorizedAccess",
        ) => return Class::Denied,
        Some(
            "PermanentRedirect"
            | "AuthorizationHeaderMalformed"
            | "IllegalLocationConstraintException",
        ) => return Class::WrongRegion,
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequests"
            | "RequestTimeout"
            | "InternalError"
            | "ServiceUnavailable"
            | "RequestTimeTooSkewed"
            | "OperationAborted",
        ) => return Class::Transient,
        _ => {}
    }
    match status {
        Some(404) => Class::NotFound,
        Some(403 | 401) => Class::Denied,
        Some(301 | 307) => Class::WrongRegion,
        Some(412) => Class::Changed,
        Some(408 | 429) => Class::Transient,
        Some(s) if s >= 500 => Class::Transient,
        None => Class::Transient,
        Some(_) => Class::Rejected,
    }
}

/// One failed attempt (or the last of several): its class, the request
/// (`op`, an S3 operation name) and a one-line cause.
#[derive(Debug, Clone)]
struct Failure {
    class: Class,
    status: Option<u16>,
    op: String,
    /// One line, e.g. "connection refused (dispatch failure)" or
    /// "HTTP 503 SlowDown: Please reduce your request rate".
    cause: String,
    /// Set by `retry` when it stops retrying a transient failure.
    attempts: Option<u32>,
}

impl Failure {
    fn new(class: Class, op: &str, cause: impl Into<String>) -> Failure {
        Failure {
            class,
            status: None,
            op: op.to_string(),
            cause: cause.into(),
            attempts: None,
        }
    }

    /// "Op: cause", for the messages that quote the server's answer.
    fn detail(&self) -> String {
        format!("{}: {}", self.op, self.cause)
    }

    fn from_sdk<E>(op: &str, err: SdkError<E>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let text = DisplayErrorContext(&err).to_string();
        let class = match &err {
            SdkError::TimeoutError(_) => Class::Transient,
            SdkError::DispatchFailure(d) => {
                if d.is_io() || d.is_timeout() {
                    Class::Transient
                } else if text.to_ascii_lowercase().contains("credentials") {
                    Class::NoCredentials
                } else if d.is_user() {
                    Class::Rejected
                } else {
                    Class::Transient
                }
            }
            SdkError::ConstructionFailure(_) => {
                if text.to_ascii_lowercase().contains("credentials") {
                    Class::NoCredentials
                } else {
                    Class::Rejected
                }
            }
            // A response came but could not be read or parsed: most often
            // a connection cut mid-body, or a proxy's error page.
            SdkError::ResponseError(_) => match err.raw_response().map(|r| r.status().as_u16()) {
                Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
                    classify(Some(s), None)
                }
                _ => Class::Transient,
            },
            SdkError::ServiceError(_) => {
                classify(err.raw_response().map(|r| r.status().as_u16()), err.code())
            }
            _ => Class::Transient,
        };
        let status = err.raw_response().map(|r| r.status().as_u16());
        let cause = match (status, err.code()) {
            (Some(s), Some(c)) => format!("HTTP {s} {c}: {}", err.message().unwrap_or("")),
            (Some(s), None) => format!("HTTP {s}"),
            _ => one_line_cause(&err),
        };
        Failure {
            class,
            status,
            op: op.to_string(),
            cause,
            attempts: None,
        }
    }
}

/// Longest cause quoted in a message; the SDK's own rendering of an error
/// chain runs to several hundred characters of nested debug output.
const MAX_CAUSE: usize = 160;

/// Renders an SDK failure that carries no HTTP answer as one short line:
/// the innermost cause (for an I/O error, its kind: "connection refused",
/// "connection reset") and the SDK's category, e.g. "connection refused
/// (dispatch failure)".
fn one_line_cause<E>(err: &SdkError<E>) -> String
where
    E: std::error::Error + 'static,
{
    let category = match err {
        SdkError::DispatchFailure(d) if d.is_timeout() => "timeout",
        SdkError::DispatchFailure(_) => "dispatch failure",
        SdkError::TimeoutError(_) => "timeout",
        SdkError::ResponseError(_) => "unreadable response",
        SdkError::ConstructionFailure(_) => "request not built",
        _ => "error",
    };
    let mut cause: Option<String> = None;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // The kind reads best ("connection refused"), unless it is the
            // catch-all one, whose message says more.
            cause = Some(match io.kind() {
                std::io::ErrorKind::Other => io.to_string(),
                k => k.to_string(),
            });
            break;
        }
        let text = e.to_string();
        if !text.is_empty() {
            cause = Some(text);
        }
        next = e.source();
    }
    let cause = cause.unwrap_or_else(|| category.to_string());
    let mut line = cause.lines().next().unwrap_or("").trim().to_string();
    if line.len() > MAX_CAUSE {
        let mut cut = MAX_CAUSE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    if line == category {
        line
    } else {
        format!("{line} ({category})")
    }
}

struct Inner {
    client: Client,
    cfg: S3Config,
    /// Bounds the requests in flight, across all callers and parts.
    slots: Semaphore,
    endpoint_name: String,
}

/// The S3 store. Cheap to share behind an `Arc<dyn Store>`.
pub struct S3Store {
    rt: tokio::runtime::Runtime,
    inner: Arc<Inner>,
}

impl S3Store {
    /// Builds the client and checks the bucket (HeadBucket) so that a
    /// missing bucket, refused credentials or (unless tolerated) an
    /// unreachable endpoint fail here, at start, with a message saying
    /// what to fix.
    pub fn open(cfg: S3Config) -> Result<S3Store> {
        if cfg.part_size < MIN_PART_SIZE {
            return Err(StoreError::Config {
                store: describe(&cfg),
                detail: format!("part size {} is below S3's minimum of 5 MiB", cfg.part_size),
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rewind-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config {
                store: describe(&cfg),
                detail: format!("cannot start the S3 client runtime: {e}"),
            })?;
        let (client, endpoint) = rt.block_on(build_client(&cfg));
        let endpoint_name = endpoint.unwrap_or_else(|| "AWS S3".to_string());
        let inner = Arc::new(Inner {
            client,
            slots: Semaphore::new(cfg.max_concurrency.max(1)),
            cfg,
            endpoint_name,
        });
        let store = S3Store { rt, inner };
        if store.inner.cfg.skip_check {
            return Ok(store);
        }
        match store.rt.block_on(store.inner.check()) {
            Ok(()) => Ok(store),
            Err(f) if f.class == Class::Transient && store.inner.cfg.tolerate_unreachable => {
                // Debug only: the caller that tolerates it (`rewind run`)
                // reports the outage when its own first request fails.
                tracing::debug!(
                    store = %store.describe(),
                    "store unreachable at start ({}); continuing, uploads will retry",
                    store.inner.one_line(&f, "")
                );
                Ok(store)
            }
            Err(f) => Err(store.inner.error(f, "", true)),
        }
    }

    /// Multipart uploads still open under `prefix` (relative to the store
    /// prefix), as (key, upload id). Tests use it to show that none is left.
    pub fn open_multipart_uploads(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.rt
            .block_on(self.inner.list_uploads(prefix))
            .map_err(|f| self.inner.error(f, prefix, false))
    }
}

fn describe(cfg: &S3Config) -> String {
    if cfg.prefix.is_empty() {
        format!("s3://{}", cfg.bucket)
    } else {
        format!("s3://{}/{}", cfg.bucket, cfg.prefix)
    }
}

/// The client and the endpoint it talks to (`None`: AWS's own).
async fn build_client(cfg: &S3Config) -> (Client, Option<String>) {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    loader = match &cfg.region {
        Some(r) => loader.region(Region::new(r.clone())),
        None => loader.region(
            aws_config::meta::region::RegionProviderChain::default_provider()
                .or_else(Region::from_static("us-east-1")),
        ),
    };
    if let Some((key, secret)) = &cfg.credentials {
        loader =
            loader.credentials_provider(Credentials::new(key, secret, None, None, "rewind-static"));
    }
    if let Some(ep) = &cfg.endpoint {
        loader = loader.endpoint_url(ep);
    }
    let shared = loader.load().await;
    let conf = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(cfg.path_style)
        // One retry policy, ours (see the module docs).
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(cfg.connect_timeout)
                .build(),
        )
        .build();
    (
        Client::from_conf(conf),
        shared.endpoint_url().map(str::to_string),
    )
}

/// Parses the total size out of a `Content-Range: bytes a-b/total` header.
fn total_from_content_range(v: &str) -> Option<u64> {
    v.rsplit_once('/')?.1.trim().parse().ok()
}

impl Inner {
    fn full_key(&self, key: &str) -> String {
        if self.cfg.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.cfg.prefix, key)
        }
    }

    fn describe(&self) -> String {
        describe(&self.cfg)
    }

    /// The deadline of one attempt moving `len` bytes.
    fn attempt_timeout(&self, len: usize) -> Duration {
        self.cfg.attempt_timeout + Duration::from_secs(len as u64 / self.cfg.min_throughput.max(1))
    }

    /// A failure in one line: cause, request, object and endpoint, e.g.
    /// "connection refused (dispatch failure) PutObject p/vol/chunk/ab12 at
    /// http://10.0.0.5:9000 (gave up after 6 attempts)".
    fn one_line(&self, f: &Failure, key: &str) -> String {
        let mut s = format!("{} {}", f.cause, f.op);
        if !key.is_empty() {
            s.push(' ');
            s.push_str(&self.full_key(key));
        }
        s.push_str(" at ");
        s.push_str(&self.endpoint_name);
        if let Some(n) = f.attempts {
            s.push_str(&format!(" (gave up after {n} attempts)"));
        }
        s
    }

    /// Turns a final failure into the error callers see, with the fix.
    fn error(&self, f: Failure, key: &str, at_open: bool) -> StoreError {
        let store = self.describe();
        let bucket = &self.cfg.bucket;
        match f.class {
            Class::NotFound if key.is_empty() || at_open => StoreError::Config {
                store,
                detail: format!(
                    "bucket {bucket} does not exist at {} (create it, or fix the bucket in --store) [{}]",
                    self.endpoint_name, f.detail()
                ),
            },
            Class::NotFound => StoreError::NotFound { store, key: key.to_string() },
            Class::NoBucket => StoreError::Config {
                store,
                detail: format!(
                    "bucket {bucket} does not exist at {} (create it, or fix the bucket in --store) [{}]",
                    self.endpoint_name, f.detail()
                ),
            },
            Class::Denied => StoreError::Denied {
                store,
                detail: format!(
                    "{} (check credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or \
                     the pod's web identity; and that the IAM policy grants what docs/S3.md lists on \
                     bucket {bucket})",
                    self.one_line(&f, key)
                ),
            },
            Class::WrongRegion => StoreError::Config {
                store,
                detail: format!(
                    "bucket {bucket} is in another region than the client uses (set AWS_REGION to \
                     the bucket's region) [{}]",
                    f.detail()
                ),
            },
            Class::NoCredentials if at_open => StoreError::Config {
                store,
                detail: format!(
                    "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                     AWS_PROFILE, or AWS_ROLE_ARN with AWS_WEB_IDENTITY_TOKEN_FILE) [{}]",
                    f.detail()
                ),
            },
            Class::Rejected => StoreError::Config {
                store,
                detail: format!(
                    "the server rejected the request: {} (is {} an S3-compatible endpoint? does it \
                     need --s3-path-style?)",
                    f.detail(), self.endpoint_name
                ),
            },
            Class::Transient | Class::NoCredentials | Class::Changed | Class::NoUpload => {
                StoreError::Unreachable {
                    store,
                    detail: self.one_line(&f, key),
                }
            }
        }
    }

    /// Runs `op` until it succeeds, fails for good, or the attempts run
    /// out. Each attempt holds one in-flight slot and has a deadline.
    async fn retry<T, F, Fut>(
        &self,
        what: &str,
        len: usize,
        mut op: F,
    ) -> std::result::Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Failure>>,
    {
        let deadline = self.attempt_timeout(len);
        let mut failed = 0u32;
        loop {
            let res = {
                let _slot = self.slots.acquire().await.expect("semaphore never closed");
                match tokio::time::timeout(deadline, op()).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::new(
                        Class::Transient,
                        what,
                        format!("no answer within {deadline:?}"),
                    )),
                }
            };
            match res {
                Ok(v) => return Ok(v),
                Err(f) if f.class == Class::Transient => {
                    failed += 1;
                    if failed >= self.cfg.retry.max_attempts {
                        return Err(Failure {
                            attempts: Some(failed),
                            ..f
                        });
                    }
                    let pause = self.cfg.retry.delay(failed, rand::random::<f64>());
                    // The caller reports what still fails after the last
                    // attempt (the daemon: once per outage); each attempt
                    // is only worth a debug line.
                    tracing::debug!(store = %self.describe(), "{}: {}; retrying in {pause:?}", f.op, f.cause);
                    tokio::time::sleep(pause).await;
                }
                Err(f) => return Err(f),
            }
        }
    }

    async fn check(&self) -> std::result::Result<(), Failure> {
        self.retry("HeadBucket", 0, || async {
            self.client
                .head_bucket()
                .bucket(&self.cfg.bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| Failure::from_sdk("HeadBucket", e))
        })
        .await
    }

    async fn put(self: &Arc<Self>, key: &str, data: Bytes) -> std::result::Result<(), Failure> {
        if data.len() <= self.cfg.part_size {
            return self.put_single(key, data).await;
        }
        self.put_multipart(key, data).await
    }

    fn lock_mode(&self) -> Option<ObjectLockMode> {
        self.cfg.object_lock.map(|l| match l.mode {
            super::LockMode::Governance => ObjectLockMode::Governance,
            super::LockMode::Compliance => ObjectLockMode::Compliance,
        })
    }

    /// The retention's end, counted from each attempt, so that a retried
    /// put is locked for the full span too.
    fn lock_until(&self) -> Option<DateTime> {
        self.cfg.object_lock.map(|l| {
            DateTime::from(
                std::time::SystemTime::now() + Duration::from_secs(u64::from(l.days) * 86_400),
            )
        })
    }

    async fn put_single(&self, key: &str, data: Bytes) -> std::result::Result<(), Failure> {
        let full = self.full_key(key);
        self.retry("PutObject", data.len(), || async {
            self.client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(&full)
                .content_length(data.len() as i64)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .set_object_lock_mode(self.lock_mode())
                .set_object_lock_retain_until_date(self.lock_until())
                .body(ByteStream::from(data.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| Failure::from_sdk("PutObject", e))
        })
        .await
    }

    /// Uploads `data` in parts, at most `max_concurrency` at once; on any
    /// failure waits for the parts in flight, then aborts the upload so
    /// that no parts are left behind (and billed).
    async fn put_multipart(
        self: &Arc<Self>,
        key: &str,
        data: Bytes,
    ) -> std::result::Result<(), Failure> {
        let full = self.full_key(key);
        let created = self
            .retry("CreateMultipartUpload", 0, || async {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.cfg.bucket)
                    .key(&full)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .set_object_lock_mode(self.lock_mode())
                    .set_object_lock_retain_until_date(self.lock_until())
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk("CreateMultipartUpload", e))
            })
            .await?;
        let Some(upload_id) = created.upload_id().map(str::to_string) else {
            return Err(Failure::new(
                Class::Rejected,
                "CreateMultipartUpload",
                "no upload id in the answer",
            ));
        };

        let mut tasks = tokio::task::JoinSet::new();
        let part_size = self.cfg.part_size;
        for (i, start) in (0..data.len()).step_by(part_size).enumerate() {
            let part = data.slice(start..(start + part_size).min(data.len()));
            let me = Arc::clone(self);
            let (full, upload_id) = (full.clone(), upload_id.clone());
            tasks.spawn(async move { me.upload_part(&full, &upload_id, i as i32 + 1, part).await });
        }
        let mut parts = Vec::new();
        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(p)) => parts.push(p),
                Ok(Err(f)) => {
                    failure.get_or_insert(f);
                    tasks.abort_all();
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => {
                    failure.get_or_insert(Failure::new(
                        Class::Transient,
                        "UploadPart",
                        format!("task failed: {e}"),
                    ));
                    tasks.abort_all();
                }
            }
        }
        if let Some(f) = failure {
            self.abort_upload(&full, &upload_id).await;
            return Err(f);
        }
        parts.sort_by_key(|p| p.part_number());

        let total = data.len() as i64;
        let mut attempt = 0;
        let done = self
            .retry("CompleteMultipartUpload", 0, || {
                attempt += 1;
                let parts = parts.clone();
                let (full, upload_id) = (&full, &upload_id);
                async move {
                    let res = self
                        .client
                        .complete_multipart_upload()
                        .bucket(&self.cfg.bucket)
                        .key(full)
                        .upload_id(upload_id)
                        .multipart_upload(
                            CompletedMultipartUpload::builder()
                                .set_parts(Some(parts))
                                .build(),
                        )
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| Failure::from_sdk("CompleteMultipartUpload", e));
                    match res {
                        // A retry after an answer that got lost: the first
                        // completion went through if the object is there
                        // with our size (same key means same bytes here).
                        Err(f) if f.class == Class::NoUpload && attempt > 1 => {
                            match self.head_len(full).await {
                                Ok(Some(n)) if n == total => Ok(()),
                                _ => Err(f),
                            }
                        }
                        r => r,
                    }
                }
            })
            .await;
        if done.is_err() {
            self.abort_upload(&full, &upload_id).await;
        }
        done
    }

    async fn upload_part(
        &self,
        full: &str,
        upload_id: &str,
        number: i32,
        part: Bytes,
    ) -> std::result::Result<CompletedPart, Failure> {
        let out = self
            .retry("UploadPart", part.len(), || async {
                self.client
                    .upload_part()
                    .bucket(&self.cfg.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(part.len() as i64)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .body(ByteStream::from(part.clone()))
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk("UploadPart", e))
            })
            .await?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
            .build())
    }

    /// Best effort: a failure here leaves an upload open, which the next
    /// `abort_incomplete_uploads` (run at daemon start) or a bucket
    /// lifecycle rule cleans up; it never makes a partial object visible.
    async fn abort_upload(&self, full: &str, upload_id: &str) {
        let res = self
            .retry("AbortMultipartUpload", 0, || async {
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.cfg.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .send()
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) => match Failure::from_sdk("AbortMultipartUpload", e) {
                        f if matches!(f.class, Class::NoUpload | Class::NotFound) => Ok(()),
                        f => Err(f),
                    },
                }
            })
            .await;
        if let Err(f) = res {
            // Warned, not an error: nothing is lost, and the daemon aborts
            // such uploads again at start and after a clean stop.
            tracing::warn!(
                "could not abort multipart upload {upload_id} of {full}: {}; it stays open until \
                 the next start or a bucket lifecycle rule removes it",
                f.cause
            );
        }
    }

    async fn head_len(&self, full: &str) -> std::result::Result<Option<i64>, Failure> {
        self.retry("HeadObject", 0, || async {
            match self
                .client
                .head_object()
                .bucket(&self.cfg.bucket)
                .key(full)
                .send()
                .await
            {
                Ok(out) => Ok(Some(out.content_length().unwrap_or(0))),
                Err(e) => match Failure::from_sdk("HeadObject", e) {
                    f if f.class == Class::NotFound => Ok(None),
                    f => Err(f),
                },
            }
        })
        .await
    }

    /// One GET, with an optional range and ETag condition; returns the body
    /// (checked against Content-Length), the total size and the ETag.
    async fn get_range(
        &self,
        full: &str,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
    ) -> std::result::Result<(Bytes, Option<u64>, Option<String>), Failure> {
        let len = range
            .map(|(a, b)| (b - a + 1) as usize)
            .unwrap_or(self.cfg.part_size);
        self.retry("GetObject", len, || async {
            let mut req = self.client.get_object().bucket(&self.cfg.bucket).key(full);
            if let Some((a, b)) = range {
                req = req.range(format!("bytes={a}-{b}"));
            }
            if let Some(tag) = if_match {
                req = req.if_match(tag);
            }
            let out = req
                .send()
                .await
                .map_err(|e| Failure::from_sdk("GetObject", e))?;
            let total = out.content_range().and_then(total_from_content_range);
            let expect = out.content_length();
            let etag = out.e_tag().map(str::to_string);
            let body = out
                .body
                .collect()
                .await
                .map_err(|e| {
                    Failure::new(
                        Class::Transient,
                        "GetObject",
                        format!("body cut short: {e}"),
                    )
                })?
                .into_bytes();
            if let Some(n) = expect {
                if body.len() as i64 != n {
                    return Err(Failure::new(
                        Class::Transient,
                        "GetObject",
                        format!("body: got {} of {n} bytes", body.len()),
                    ));
                }
            }
            Ok((body, total, etag))
        })
        .await
    }

    /// Reads an object: the first part-sized range tells the total size;
    /// the rest is fetched in parallel ranges pinned to the same ETag.
    async fn get(self: &Arc<Self>, key: &str) -> std::result::Result<Bytes, Failure> {
        let full = self.full_key(key);
        let part = self.cfg.part_size as u64;
        // An object replaced between ranges (same key means same bytes, but
        // a new ETag) makes us start over, a bounded number of times.
        let mut tries = 0;
        loop {
            tries += 1;
            let (first, total, etag) = match self.get_range(&full, Some((0, part - 1)), None).await
            {
                Ok(v) => v,
                // S3 answers 416 to any range of an empty object.
                Err(f) if f.status == Some(416) => {
                    return self.get_range(&full, None, None).await.map(|v| v.0)
                }
                Err(f) => return Err(f),
            };
            let Some(total) = total else { return Ok(first) };
            if total <= first.len() as u64 {
                return Ok(first);
            }
            let mut tasks = tokio::task::JoinSet::new();
            let mut start = first.len() as u64;
            while start < total {
                let end = (start + part).min(total) - 1;
                let me = Arc::clone(self);
                let (full, etag) = (full.clone(), etag.clone());
                tasks.spawn(async move {
                    let r = me
                        .get_range(&full, Some((start, end)), etag.as_deref())
                        .await;
                    (start, end, r)
                });
                start = end + 1;
            }
            let mut pieces = Vec::new();
            let mut failure = None;
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((a, b, Ok((bytes, _, _)))) if bytes.len() as u64 == b - a + 1 => {
                        pieces.push((a, bytes))
                    }
                    Ok((a, _, Ok((bytes, _, _)))) => {
                        failure.get_or_insert(Failure::new(
                            Class::Transient,
                            "GetObject",
                            format!("range at {a}: short body of {} bytes", bytes.len()),
                        ));
                        tasks.abort_all();
                    }
                    Ok((_, _, Err(f))) => {
                        failure.get_or_insert(f);
                        tasks.abort_all();
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => {
                        failure.get_or_insert(Failure::new(
                            Class::Transient,
                            "GetObject",
                            format!("task failed: {e}"),
                        ));
                        tasks.abort_all();
                    }
                }
            }
            match failure {
                Some(f) if f.class == Class::Changed && tries < 3 => continue,
                Some(f) => return Err(f),
                None => {}
            }
            pieces.sort_by_key(|p| p.0);
            let mut out = BytesMut::with_capacity(total as usize);
            out.extend_from_slice(&first);
            for (_, p) in pieces {
                out.extend_from_slice(&p);
            }
            return Ok(out.freeze());
        }
    }

    async fn list(&self, prefix: &str) -> std::result::Result<Vec<(String, u64)>, Failure> {
        let full_prefix = self.full_key(prefix);
        let strip = if self.cfg.prefix.is_empty() {
            0
        } else {
            self.cfg.prefix.len() + 1
        };
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .retry("ListObjectsV2", 0, || async {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.cfg.bucket)
                        .prefix(&full_prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| Failure::from_sdk("ListObjectsV2", e))
                })
                .await?;
            for obj in out.contents() {
                if let Some(k) = obj.key() {
                    if k.len() >= strip && k.starts_with(&full_prefix) {
                        let size = obj.size().unwrap_or(0).max(0) as u64;
                        keys.push((k[strip..].to_string(), size));
                    }
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        // S3 lists in UTF-8 binary order already; other servers may not.
        keys.sort();
        keys.dedup_by(|a, b| a.0 == b.0);
        Ok(keys)
    }

    /// DeleteObject; S3 answers success for a key that is not there, and a
    /// server that answers NotFound instead means the same.
    async fn delete(&self, key: &str) -> std::result::Result<(), Failure> {
        let full = self.full_key(key);
        self.retry("DeleteObject", 0, || async {
            match self
                .client
                .delete_object()
                .bucket(&self.cfg.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => match Failure::from_sdk("DeleteObject", e) {
                    f if f.class == Class::NotFound => Ok(()),
                    f => Err(f),
                },
            }
        })
        .await
    }

    /// DeleteObjects, `DELETE_BATCH` keys a request. Returns the keys the
    /// server refused, with why. A key reported missing is deleted; keys
    /// that fail transiently (InternalError, SlowDown) are sent again with
    /// the same backoff as whole requests, and reported once the attempts
    /// run out.
    ///
    /// AWS authorizes each key of a DeleteObjects against s3:DeleteObject
    /// on that key, but some servers (moto) check the bucket instead and
    /// refuse every key under a policy that grants deletes on the prefix
    /// only (docs/S3.md). When every key of a batch is refused access, the
    /// batch is therefore tried again one DeleteObject at a time, and what
    /// those refuse is what is reported.
    async fn delete_many(
        &self,
        keys: &[String],
    ) -> std::result::Result<Vec<(String, Failure)>, Failure> {
        let mut refused = Vec::new();
        for batch in keys.chunks(super::DELETE_BATCH) {
            let mut pending = batch.to_vec();
            let mut rounds = 0u32;
            loop {
                let (transient, other): (Vec<_>, Vec<_>) = self
                    .delete_batch(&pending)
                    .await?
                    .into_iter()
                    .partition(|(_, f)| f.class == Class::Transient);
                if rounds == 0
                    && other.len() == pending.len()
                    && other.iter().all(|(_, f)| f.class == Class::Denied)
                {
                    tracing::debug!(store = %self.describe(), "DeleteObjects refused every key; deleting them one at a time");
                    for key in pending {
                        if let Err(f) = self.delete(&key).await {
                            refused.push((key, f));
                        }
                    }
                    break;
                }
                refused.extend(other);
                if transient.is_empty() {
                    break;
                }
                rounds += 1;
                if rounds >= self.cfg.retry.max_attempts {
                    refused.extend(transient.into_iter().map(|(k, f)| {
                        (
                            k,
                            Failure {
                                attempts: Some(rounds),
                                ..f
                            },
                        )
                    }));
                    break;
                }
                tokio::time::sleep(self.cfg.retry.delay(rounds, rand::random::<f64>())).await;
                pending = transient.into_iter().map(|(k, _)| k).collect();
            }
        }
        Ok(refused)
    }

    /// One DeleteObjects request in quiet mode (only failures are listed),
    /// retried as a whole on transient failures; the per-key failures other
    /// than "not found", by key relative to the store prefix.
    async fn delete_batch(
        &self,
        keys: &[String],
    ) -> std::result::Result<Vec<(String, Failure)>, Failure> {
        let unbuildable = |e: aws_sdk_s3::error::BuildError| {
            Failure::new(Class::Rejected, "DeleteObjects", e.to_string())
        };
        let relative: std::collections::HashMap<String, &String> =
            keys.iter().map(|k| (self.full_key(k), k)).collect();
        let objects = relative
            .keys()
            .map(|full| ObjectIdentifier::builder().key(full).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(unbuildable)?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(unbuildable)?;
        let out = self
            .retry("DeleteObjects", 0, || async {
                self.client
                    .delete_objects()
                    .bucket(&self.cfg.bucket)
                    .delete(delete.clone())
                    .send()
                    .await
                    .map_err(|e| Failure::from_sdk("DeleteObjects", e))
            })
            .await?;
        let mut refused = Vec::new();
        for e in out.errors() {
            // A per-key error carries a code but no HTTP status: an unknown
            // code is a refusal (400), not a transient failure to retry.
            let class = classify(Some(400), e.code());
            if class == Class::NotFound {
                continue;
            }
            let full = e.key().unwrap_or_default();
            let key = relative
                .get(full)
                .map_or_else(|| full.to_string(), |k| k.to_string());
            let cause = format!(
                "{}: {}",
                e.code().unwrap_or("error"),
                e.message().unwrap_or_default()
            );
            refused.push((key, Failure::new(class, "DeleteObjects", cause)));
        }
        Ok(refused)
    }

    async fn list_uploads(
        &self,
        prefix: &str,
    ) -> std::result::Result<Vec<(String, String)>, Failure> {
        let full_prefix = self.full_key(prefix);
        let mut found = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        // Bounded: a listing that never ends is a server bug, not our loop.
        for _ in 0..10_000 {
            let out = self
                .retry("ListMultipartUploads", 0, || async {
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.cfg.bucket)
                        .prefix(&full_prefix)
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send()
                        .await
                        .map_err(|e| Failure::from_sdk("ListMultipartUploads", e))
                })
                .await?;
            for u in out.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    found.push((k.to_string(), id.to_string()));
                }
            }
            if out.is_truncated() != Some(true) {
                break;
            }
            key_marker = out.next_key_marker().map(str::to_string);
            id_marker = out.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(found)
    }
}

impl Store for S3Store {
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.rt
            .block_on(self.inner.put(key, data))
            .map_err(|f| self.inner.error(f, key, false))
    }

    fn get(&self, key: &str) -> Result<Bytes> {
        self.rt
            .block_on(self.inner.get(key))
            .map_err(|f| self.inner.error(f, key, false))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let full = self.inner.full_key(key);
        self.rt
            .block_on(self.inner.head_len(&full))
            .map(|n| n.is_some())
            .map_err(|f| self.inner.error(f, key, false))
    }

    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.rt
            .block_on(self.inner.list(prefix))
            .map_err(|f| self.inner.error(f, prefix, false))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.rt
            .block_on(self.inner.delete(key))
            .map_err(|f| self.inner.error(f, key, false))
    }

    fn delete_many(&self, keys: &[String]) -> Result<Vec<Undeleted>> {
        let refused = self
            .rt
            .block_on(self.inner.delete_many(keys))
            .map_err(|f| self.inner.error(f, "", false))?;
        Ok(refused
            .into_iter()
            .map(|(key, f)| Undeleted {
                error: self.inner.error(f, &key, false),
                key,
            })
            .collect())
    }

    fn abort_incomplete_uploads(&self, prefix: &str) -> Result<usize> {
        let uploads = self.open_multipart_uploads(prefix)?;
        for (full, id) in &uploads {
            tracing::info!(store = %self.describe(), key = %full, "aborting multipart upload {id} left open by an earlier run");
            self.rt.block_on(self.inner.abort_upload(full, id));
        }
        Ok(uploads.len())
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn chunk_naming(&self) -> Result<crate::crypt::ChunkNaming> {
        Ok(crate::crypt::ChunkNaming::Plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let cases: &[(Option<u16>, Option<&str>, Class)] = &[
            (Some(404), Some("NoSuchKey"), Class::NotFound),
            (Some(404), None, Class::NotFound),
            (Some(404), Some("NoSuchBucket"), Class::NoBucket),
            (Some(403), Some("AccessDenied"), Class::Denied),
            (Some(403), Some("InvalidAccessKeyId"), Class::Denied),
            (Some(403), Some("SignatureDoesNotMatch"), Class::Denied),
            (Some(403), None, Class::Denied),
            (Some(400), Some("ExpiredToken"), Class::Denied),
            (Some(301), Some("PermanentRedirect"), Class::WrongRegion),
            (
                Some(400),
                Some("AuthorizationHeaderMalformed"),
                Class::WrongRegion,
            ),
            (Some(503), Some("SlowDown"), Class::Transient),
            (Some(500), Some("InternalError"), Class::Transient),
            (Some(502), None, Class::Transient),
            (Some(400), Some("RequestTimeout"), Class::Transient),
            (Some(429), None, Class::Transient),
            (Some(412), Some("PreconditionFailed"), Class::Changed),
            (Some(404), Some("NoSuchUpload"), Class::NoUpload),
            (Some(400), Some("InvalidArgument"), Class::Rejected),
            (None, None, Class::Transient),
        ];
        for (status, code, want) in cases {
            assert_eq!(
                classify(*status, *code),
                *want,
                "status {status:?} code {code:?}"
            );
        }
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1, 0.999_999).as_millis(), 99);
        assert_eq!(p.delay(2, 0.999_999).as_millis(), 199);
        assert_eq!(p.delay(3, 0.5).as_millis(), 200);
        assert_eq!(p.delay(9, 0.999_999).as_millis(), 999);
        assert_eq!(p.delay(40, 0.999_999).as_millis(), 999);
        assert_eq!(p.delay(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn content_range_total() {
        assert_eq!(total_from_content_range("bytes 0-99/1000"), Some(1000));
        assert_eq!(total_from_content_range("bytes */1000"), Some(1000));
        assert_eq!(total_from_content_range("bytes 0-99/*"), None);
    }
}
