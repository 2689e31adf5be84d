//! The store contract, pinned once and run against every backend: file://
//! on a temporary directory and s3:// against a real S3 server (moto_server
//! in its own process, reached over HTTP on loopback). Then what only S3
//! has: configuration errors at open (missing bucket, refused credentials
//! against a server that checks them, unreachable endpoint), the IAM
//! policies of docs/S3.md, and faults injected by a misbehaving proxy in
//! front of the real server (5xx, throttling, hangs, connections cut mid
//! upload or download): each is retried or reported, and no partial or
//! corrupt object ever becomes visible.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rewind::store::s3::S3Store;
use rewind::store::{file::FileStore, Store, StoreError};
use support::proxy::{Fault, Proxy};
use support::*;

/// The cases every backend must pass. Each takes a fresh, empty store.
mod cases {
    pub use super::cases_delete::*;
    use super::*;

    fn assert_not_found(r: Result<Bytes, StoreError>) {
        match r {
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => panic!("expected NotFound, got error {e}"),
            Ok(b) => panic!("expected NotFound, got {} bytes", b.len()),
        }
    }

    pub fn put_then_get_returns_the_same_bytes(s: &dyn Store) {
        for (i, len) in [0usize, 1, 4096, (1 << 20) + 7].into_iter().enumerate() {
            let key = format!("obj/{i}");
            let data = pattern(len, i as u64 + 1);
            s.put(&key, data.clone()).unwrap();
            assert_eq!(s.get(&key).unwrap(), data, "object of {len} bytes");
        }
    }

    pub fn absent_key_is_not_found(s: &dyn Store) {
        assert_not_found(s.get("seg/never-written"));
        assert!(!s.exists("seg/never-written").unwrap());
        assert_eq!(s.list("seg/").unwrap(), Vec::<String>::new());
    }

    pub fn exists_after_put(s: &dyn Store) {
        s.put("hb/1", Bytes::from_static(b"x")).unwrap();
        assert!(s.exists("hb/1").unwrap());
        assert!(!s.exists("hb/2").unwrap());
    }

    pub fn list_is_sorted_and_filtered_by_prefix(s: &dyn Store) {
        let keys = [
            "seg/0000000010",
            "seg/0000000002",
            "base/a/manifest",
            "seg2/x",
            "seg/0000000001",
            "base/a/chunks/ff",
            "base/a/chunks/0a",
            "hb",
        ];
        for k in keys {
            s.put(k, Bytes::from(k.as_bytes().to_vec())).unwrap();
        }
        let mut all: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        all.sort();
        assert_eq!(s.list("").unwrap(), all);
        assert_eq!(
            s.list("seg/").unwrap(),
            ["seg/0000000001", "seg/0000000002", "seg/0000000010"]
        );
        assert_eq!(
            s.list("seg/000000000").unwrap(),
            ["seg/0000000001", "seg/0000000002"]
        );
        assert_eq!(
            s.list("base/a/chunks/").unwrap(),
            ["base/a/chunks/0a", "base/a/chunks/ff"]
        );
        assert_eq!(s.list("nothing/").unwrap(), Vec::<String>::new());
    }

    pub fn keys_with_punctuation_round_trip(s: &dyn Store) {
        let keys = [
            "t/2026-11-24T12:00:05.123456789Z+00",
            "t/a=b,c_d~e.f-g",
            "t/percent%20not-decoded",
        ];
        for k in keys {
            s.put(k, Bytes::from(k.as_bytes().to_vec())).unwrap();
            assert_eq!(s.get(k).unwrap(), k.as_bytes());
        }
        let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        want.sort();
        assert_eq!(s.list("t/").unwrap(), want);
    }

    pub fn overwrite_with_the_same_bytes_is_allowed(s: &dyn Store) {
        let data = pattern(100_000, 7);
        s.put("seg/1", data.clone()).unwrap();
        s.put("seg/1", data.clone()).unwrap();
        assert_eq!(s.get("seg/1").unwrap(), data);
        assert_eq!(s.list("seg/").unwrap(), ["seg/1"]);
    }

    /// Larger than the S3 part size: multipart upload and ranged reads.
    pub fn large_object_round_trips(s: &dyn Store) {
        let data = pattern((40 << 20) + 123, 42);
        s.put("base/big", data.clone()).unwrap();
        let back = s.get("base/big").unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "large object differs after a round trip");
    }

    pub fn concurrent_puts_and_gets(s: &dyn Store) {
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                sc.spawn(move || {
                    for i in 0..6u64 {
                        let key = format!("c/{t}/{i}");
                        let data = pattern(256 << 10, t * 100 + i + 1);
                        s.put(&key, data.clone()).unwrap();
                        assert_eq!(s.get(&key).unwrap(), data);
                    }
                });
            }
        });
        assert_eq!(s.list("c/").unwrap().len(), 24);
    }

    /// A reader racing a large put sees nothing or everything.
    pub fn readers_never_see_a_partial_object(s: &dyn Store) {
        let data = pattern((20 << 20) + 5, 9);
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                s.put("seg/race", data.clone()).unwrap();
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut reads = 0;
            // Bounded: the writer finishes; the cap only guards a hang.
            while !done.load(std::sync::atomic::Ordering::SeqCst) && reads < 100_000 {
                reads += 1;
                match s.get("seg/race") {
                    Err(StoreError::NotFound { .. }) => {}
                    Ok(b) => assert!(
                        b == data,
                        "a reader saw {} of {} bytes",
                        b.len(),
                        data.len()
                    ),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        assert!(s.get("seg/race").unwrap() == data);
    }
}

mod cases_delete {
    use super::*;

    /// Deleting removes the object from get, exists and list; deleting a
    /// key that is not there is success (an interrupted prune repeats its
    /// deletes).
    pub fn delete_removes_and_absent_is_success(s: &dyn Store) {
        s.put("seg/a", Bytes::from_static(b"aa")).unwrap();
        s.put("seg/b", Bytes::from_static(b"b")).unwrap();
        s.delete("seg/a").unwrap();
        assert!(matches!(s.get("seg/a"), Err(StoreError::NotFound { .. })));
        assert!(!s.exists("seg/a").unwrap());
        assert_eq!(s.list("seg/").unwrap(), ["seg/b"]);
        s.delete("seg/a").unwrap();
        s.delete("never/was").unwrap();
    }

    /// A batch delete removes every key it names, keys that are not there
    /// included (they count as deleted), across more than one S3
    /// DeleteObjects request (1000 keys each).
    pub fn delete_many_removes_every_key_and_missing_ones_are_success(s: &dyn Store) {
        let keys: Vec<String> = (0..1100).map(|i| format!("chunk/{i:05}")).collect();
        std::thread::scope(|t| {
            for part in keys.chunks(140) {
                t.spawn(move || {
                    for k in part {
                        s.put(k, Bytes::from(k.clone())).unwrap();
                    }
                });
            }
        });
        s.put("seg/stays", Bytes::from_static(b"s")).unwrap();
        let mut doomed: Vec<String> = keys.clone();
        doomed.insert(0, "chunk/never-was".into());
        doomed.insert(700, "chunk/gone-too".into());
        doomed.push("nothing/here".into());
        let refused = s.delete_many(&doomed).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert!(s.list("chunk/").unwrap().is_empty());
        assert_eq!(s.list("seg/").unwrap(), ["seg/stays"]);
        // Again, now that every key is gone: still success.
        assert!(s.delete_many(&doomed).unwrap().is_empty());
        assert!(s.delete_many(&[]).unwrap().is_empty());
    }

    pub fn list_sized_gives_each_size(s: &dyn Store) {
        s.put("hb/1", Bytes::new()).unwrap();
        s.put("hb/2", Bytes::from(vec![7u8; 1234])).unwrap();
        s.put("hbx", Bytes::from_static(b"x")).unwrap();
        assert_eq!(
            s.list_sized("hb/").unwrap(),
            [("hb/1".to_string(), 0), ("hb/2".to_string(), 1234)]
        );
    }
}

fn file_store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempdir();
    let s = FileStore::open(dir.path().join("store")).unwrap();
    (dir, Arc::new(s))
}

fn s3_store(test: &str) -> S3Store {
    let srv = shared_s3();
    S3Store::open(srv.config(BUCKET, &format!("suite/{}", unique(test)))).unwrap()
}

macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod file_backend {
            $( #[test] fn $case() { let (_dir, s) = super::file_store(); super::cases::$case(&*s); } )*
        }
        mod s3_backend {
            $( #[test] fn $case() {
                let s = super::s3_store(stringify!($case));
                super::cases::$case(&s);
                // Whatever the case did, it left no multipart upload open.
                assert_eq!(s.open_multipart_uploads("").unwrap(), vec![]);
            } )*
        }
    };
}

store_suite!(
    put_then_get_returns_the_same_bytes,
    absent_key_is_not_found,
    exists_after_put,
    list_is_sorted_and_filtered_by_prefix,
    keys_with_punctuation_round_trip,
    overwrite_with_the_same_bytes_is_allowed,
    large_object_round_trips,
    concurrent_puts_and_gets,
    readers_never_see_a_partial_object,
    delete_removes_and_absent_is_success,
    delete_many_removes_every_key_and_missing_ones_are_success,
    list_sized_gives_each_size,
);

/// Configuration errors: each fails at open, with a message saying what to fix.
mod s3_configuration {
    use super::*;

    fn open_err(cfg: rewind::store::s3::S3Config) -> StoreError {
        match S3Store::open(cfg) {
            Ok(_) => panic!("open succeeded"),
            Err(e) => e,
        }
    }

    #[test]
    fn missing_bucket_fails_at_open() {
        let srv = shared_s3();
        let e = open_err(srv.config("no-such-bucket", "p"));
        assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("bucket no-such-bucket does not exist"),
            "{msg}"
        );
    }

    #[test]
    fn unreachable_endpoint_fails_at_open_unless_tolerated() {
        let srv = shared_s3();
        // A loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = srv.config(BUCKET, "p");
        cfg.endpoint = Some(format!("http://127.0.0.1:{port}"));
        let started = Instant::now();
        let e = open_err(cfg.clone());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            matches!(e, StoreError::Unreachable { .. }) && e.is_transient(),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("check the endpoint"),
            "{msg}"
        );
        // One line an operator can read: the cause, not the SDK's nested
        // debug rendering of its error chain.
        assert!(
            msg.contains("connection refused (dispatch failure) HeadBucket")
                && !msg.contains("DispatchFailure")
                && !msg.contains('\n')
                && msg.len() < 300,
            "{msg}"
        );

        // `run` opens with tolerance: it starts, and uploads report the outage.
        cfg.tolerate_unreachable = true;
        let s = S3Store::open(cfg).unwrap();
        let e = s.put("seg/1", Bytes::from_static(b"x")).unwrap_err();
        assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
    }

    #[test]
    fn bad_part_size_is_refused() {
        let srv = shared_s3();
        let mut cfg = srv.config(BUCKET, "p");
        cfg.part_size = 1 << 20;
        assert!(matches!(open_err(cfg), StoreError::Config { .. }));
    }

    /// Runs the named test of this binary again in a child process with
    /// only `vars` (and PATH) in its environment: the environment is
    /// process-wide, so tests of the AWS chain cannot set it in-process.
    fn run_child(test: &str, vars: &[(&str, &str)]) {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", test]).env_clear();
        cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.env("REWIND_TEST_CHILD", "1");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "child {test} failed:\n{text}"
        );
    }

    fn in_child() -> bool {
        std::env::var_os("REWIND_TEST_CHILD").is_some()
    }

    /// `store::open`, as the commands call it: endpoint, region and keys
    /// from the environment.
    #[test]
    fn open_takes_endpoint_region_and_credentials_from_the_environment() {
        if in_child() {
            let url = std::env::var("REWIND_TEST_URL").unwrap();
            let opts = rewind::store::StoreOptions {
                s3_path_style: true,
                ..Default::default()
            };
            let s = rewind::store::open(&url, &opts).unwrap();
            s.put("env/1", Bytes::from_static(b"env")).unwrap();
            assert_eq!(s.get("env/1").unwrap(), "env");
            assert!(
                s.describe().starts_with("s3://rewind-test/"),
                "{}",
                s.describe()
            );
            return;
        }
        let srv = shared_s3();
        let prefix = unique("env");
        let url = format!("s3://{BUCKET}/{prefix}");
        run_child(
            "s3_configuration::open_takes_endpoint_region_and_credentials_from_the_environment",
            &[
                ("REWIND_TEST_URL", &url),
                ("AWS_ENDPOINT_URL", &srv.endpoint),
                ("AWS_ACCESS_KEY_ID", "from-env"),
                ("AWS_SECRET_ACCESS_KEY", "from-env-secret"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ],
        );
        // And the object is where the URL says.
        let s = S3Store::open(srv.config(BUCKET, &prefix)).unwrap();
        assert_eq!(s.get("env/1").unwrap(), "env");
    }

    /// No key in the environment, no profile, no instance metadata.
    #[test]
    fn missing_credentials_fail_at_open_with_a_hint() {
        if in_child() {
            let opts = rewind::store::StoreOptions {
                s3_path_style: true,
                s3_endpoint: std::env::var("REWIND_TEST_ENDPOINT").ok(),
                ..Default::default()
            };
            let e = rewind::store::open(&format!("s3://{BUCKET}/x"), &opts).unwrap_err();
            assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
            assert!(e.to_string().contains("no AWS credentials found"), "{e}");
            return;
        }
        let srv = shared_s3();
        let home = tempdir();
        run_child(
            "s3_configuration::missing_credentials_fail_at_open_with_a_hint",
            &[
                ("REWIND_TEST_ENDPOINT", &srv.endpoint),
                ("HOME", home.path().to_str().unwrap()),
                ("AWS_EC2_METADATA_DISABLED", "true"),
                ("AWS_REGION", "us-east-1"),
            ],
        );
    }
}

/// Against a server that checks signatures and IAM policies (moto in IAM
/// auth mode): wrong credentials are refused, and the minimal policies of
/// docs/S3.md, applied as written, allow what each role needs and no more.
mod s3_credentials {
    use super::*;

    fn auth_server() -> &'static S3Server {
        static S: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            S3Server::start(&[
                "--bucket",
                BUCKET,
                "--user",
                &format!("sidecar=sidecar:{BUCKET}:vol"),
                "--user",
                &format!("restore=restore:{BUCKET}:vol"),
                "--user",
                &format!("prune=prune:{BUCKET}:vol"),
                "--auth",
            ])
        })
    }

    fn denied(r: Result<impl std::fmt::Debug, StoreError>) -> String {
        match r {
            Err(e @ StoreError::Denied { .. }) => e.to_string(),
            other => panic!("expected Denied, got {other:?}"),
        }
    }

    #[test]
    fn wrong_secret_is_denied_at_open() {
        let srv = auth_server();
        let mut user = srv.users["sidecar"].clone();
        user.secret_key = "not-the-secret".into();
        let msg = denied(S3Store::open(srv.config_as(&user, BUCKET, "vol")).map(|_| ()));
        assert!(msg.contains("check credentials"), "{msg}");
    }

    #[test]
    fn unknown_access_key_is_denied_at_open() {
        let srv = auth_server();
        let user = User {
            access_key: "AKIANOSUCHKEY0000000".into(),
            secret_key: "x".into(),
        };
        let msg = denied(S3Store::open(srv.config_as(&user, BUCKET, "vol")).map(|_| ()));
        assert!(msg.contains("check credentials"), "{msg}");
    }

    #[test]
    fn sidecar_policy_allows_everything_the_sidecar_does() {
        let srv = auth_server();
        let s = S3Store::open(srv.config_as(&srv.users["sidecar"], BUCKET, "vol")).unwrap();
        let small = pattern(1000, 1);
        let big = pattern((17 << 20) + 1, 2);
        s.put("seg/1", small.clone()).unwrap();
        s.put("base/big", big.clone()).unwrap();
        assert_eq!(s.get("seg/1").unwrap(), small);
        assert!(s.get("base/big").unwrap() == big);
        assert!(s.exists("seg/1").unwrap());
        assert!(!s.exists("seg/2").unwrap());
        assert!(matches!(s.get("seg/2"), Err(StoreError::NotFound { .. })));
        assert_eq!(s.list("seg/").unwrap(), ["seg/1"]);
        assert_eq!(s.list("base/").unwrap(), ["base/big"]);
        assert_eq!(s.abort_incomplete_uploads("").unwrap(), 0);
        // Outside its prefix, it may do nothing.
        let other = S3Store::open(srv.config_as(&srv.users["sidecar"], BUCKET, "other")).unwrap();
        denied(other.put("seg/1", small));
        // Only prune deletes: the sidecar cannot.
        let msg = denied(s.delete("seg/1"));
        assert!(msg.contains("docs/S3.md"), "{msg}");
        assert!(s.exists("seg/1").unwrap());
    }

    #[test]
    fn prune_policy_lists_reads_writes_and_deletes() {
        let srv = auth_server();
        let w = S3Store::open(srv.config_as(&srv.users["sidecar"], BUCKET, "vol")).unwrap();
        w.put("prune/old", Bytes::from_static(b"old")).unwrap();
        let p = S3Store::open(srv.config_as(&srv.users["prune"], BUCKET, "vol")).unwrap();
        assert_eq!(
            p.list_sized("prune/").unwrap(),
            [("prune/old".to_string(), 3)]
        );
        assert_eq!(p.get("prune/old").unwrap(), "old");
        p.put("prune/lock", Bytes::new()).unwrap();
        p.delete("prune/old").unwrap();
        p.delete("prune/lock").unwrap();
        assert!(p.list("prune/").unwrap().is_empty());
        let other = S3Store::open(srv.config_as(&srv.users["prune"], BUCKET, "other")).unwrap();
        denied(other.delete("prune/x"));
        // Batches need no more than s3:DeleteObject.
        w.put("prune/a", Bytes::from_static(b"a")).unwrap();
        w.put("prune/b", Bytes::from_static(b"b")).unwrap();
        let keys = ["prune/a".to_string(), "prune/gone".into(), "prune/b".into()];
        let refused = p.delete_many(&keys).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert!(p.list("prune/").unwrap().is_empty());
    }

    /// The sidecar may not delete: a batch delete reports every key refused,
    /// each with a message that points at the IAM policy, and deletes none.
    #[test]
    fn sidecar_batch_delete_reports_each_key_refused() {
        let srv = auth_server();
        let s = S3Store::open(srv.config_as(&srv.users["sidecar"], BUCKET, "vol")).unwrap();
        s.put("refused/a", Bytes::from_static(b"a")).unwrap();
        s.put("refused/b", Bytes::from_static(b"b")).unwrap();
        let keys = ["refused/a".to_string(), "refused/b".into()];
        let refused = s.delete_many(&keys).unwrap();
        let mut named: Vec<&str> = refused.iter().map(|u| u.key.as_str()).collect();
        named.sort();
        assert_eq!(named, ["refused/a", "refused/b"]);
        for u in &refused {
            assert!(
                matches!(u.error, StoreError::Denied { .. }),
                "{:?}",
                u.error
            );
            let msg = u.error.to_string();
            assert!(msg.contains("docs/S3.md") && msg.contains(&u.key), "{msg}");
        }
        assert_eq!(s.list("refused/").unwrap(), keys);
    }

    #[test]
    fn restore_policy_reads_but_cannot_write() {
        let srv = auth_server();
        let w = S3Store::open(srv.config_as(&srv.users["sidecar"], BUCKET, "vol")).unwrap();
        w.put("restore/r", Bytes::from_static(b"r")).unwrap();
        let r = S3Store::open(srv.config_as(&srv.users["restore"], BUCKET, "vol")).unwrap();
        assert_eq!(r.get("restore/r").unwrap(), "r");
        assert_eq!(r.list("restore/").unwrap(), ["restore/r"]);
        let msg = denied(r.put("restore/x", Bytes::from_static(b"x")));
        assert!(msg.contains("docs/S3.md"), "{msg}");
    }
}

/// Faults injected between the client and the real server.
mod s3_faults {
    use super::*;

    /// A store that talks to the shared server through a fresh proxy, with
    /// a short attempt deadline so that hangs are detected quickly.
    fn through_proxy(test: &str) -> (Proxy, S3Store) {
        let srv = shared_s3();
        let proxy = Proxy::start(&srv.endpoint);
        let mut cfg = srv.config(BUCKET, &format!("faults/{}", unique(test)));
        cfg.endpoint = Some(proxy.endpoint.clone());
        cfg.attempt_timeout = Duration::from_secs(2);
        let s = S3Store::open(cfg).unwrap();
        (proxy, s)
    }

    /// One row: a fault on some requests, the operation that meets it, and
    /// how many injected faults it must have gone through.
    struct Case {
        name: &'static str,
        method: &'static str,
        target: &'static str,
        fault: Fault,
        times: usize,
        len: usize,
        /// Inject before the put (else before the get).
        on_put: bool,
    }

    const SMALL: usize = 300_000;
    const LARGE: usize = (33 << 20) + 17;

    fn table() -> Vec<Case> {
        use Fault::*;
        let c = |name, method, target, fault, times, len, on_put| Case {
            name,
            method,
            target,
            fault,
            times,
            len,
            on_put,
        };
        vec![
            c(
                "500 on put",
                "PUT",
                "x-id=PutObject",
                Status(500, "InternalError"),
                2,
                SMALL,
                true,
            ),
            c(
                "503 SlowDown on put",
                "PUT",
                "x-id=PutObject",
                Status(503, "SlowDown"),
                3,
                SMALL,
                true,
            ),
            c("put hangs", "PUT", "x-id=PutObject", Hang, 1, SMALL, true),
            c(
                "connection cut mid upload",
                "PUT",
                "x-id=PutObject",
                CutRequest,
                2,
                SMALL,
                true,
            ),
            c(
                "answer to a put lost",
                "PUT",
                "x-id=PutObject",
                CutResponse,
                1,
                SMALL,
                true,
            ),
            c(
                "500 on a part",
                "PUT",
                "partNumber=2",
                Status(500, "InternalError"),
                2,
                LARGE,
                true,
            ),
            c(
                "part cut mid upload",
                "PUT",
                "partNumber=1",
                CutRequest,
                2,
                LARGE,
                true,
            ),
            c(
                "throttled create",
                "POST",
                "uploads",
                Status(503, "SlowDown"),
                2,
                LARGE,
                true,
            ),
            c(
                "complete answer lost",
                "POST",
                "uploadId=",
                CutResponse,
                1,
                LARGE,
                true,
            ),
            c(
                "500 on get",
                "GET",
                "x-id=GetObject",
                Status(500, "InternalError"),
                2,
                SMALL,
                false,
            ),
            c(
                "download cut mid body",
                "GET",
                "x-id=GetObject",
                CutResponse,
                2,
                SMALL,
                false,
            ),
            c(
                "ranged download cut",
                "GET",
                "x-id=GetObject",
                CutResponse,
                3,
                LARGE,
                false,
            ),
            c("get hangs", "GET", "x-id=GetObject", Hang, 1, SMALL, false),
        ]
    }

    #[test]
    fn transient_faults_are_retried_and_data_stays_whole() {
        let mut failures = Vec::new();
        for case in table() {
            let (proxy, s) = through_proxy("retried");
            let data = pattern(case.len, case.len as u64);
            if case.on_put {
                proxy.inject(case.method, case.target, case.fault, case.times);
            }
            let put = s.put("seg/1", data.clone());
            if !case.on_put {
                proxy.inject(case.method, case.target, case.fault, case.times);
            }
            let got = s.get("seg/1");
            let hit = proxy
                .seen(case.method, case.target)
                .iter()
                .filter(|r| r.fault.is_some())
                .count();
            let ok = put.is_ok() && got.as_ref().is_ok_and(|b| *b == data) && hit == case.times;
            if !ok {
                failures.push(format!(
                    "{}: put {:?}, get {:?}, {} of {} faults met",
                    case.name,
                    put.err(),
                    got.map(|b| b.len()),
                    hit,
                    case.times
                ));
            }
            assert_eq!(
                s.open_multipart_uploads("").unwrap(),
                vec![],
                "{}: upload left open",
                case.name
            );
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn persistent_5xx_is_reported_unreachable_and_nothing_is_visible() {
        let (proxy, s) = through_proxy("persistent");
        proxy.inject(
            "PUT",
            "x-id=PutObject",
            Fault::Status(500, "InternalError"),
            1000,
        );
        let e = s.put("seg/1", pattern(SMALL, 1)).unwrap_err();
        assert!(
            matches!(e, StoreError::Unreachable { .. }) && e.is_transient(),
            "{e:?}"
        );
        assert!(e.to_string().contains("gave up after 5 attempts"), "{e}");
        assert_eq!(proxy.seen("PUT", "x-id=PutObject").len(), 5);
        proxy.clear();
        assert!(matches!(s.get("seg/1"), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn failed_multipart_upload_is_aborted_and_invisible() {
        let (proxy, s) = through_proxy("abort");
        proxy.inject("PUT", "partNumber=2", Fault::CutRequest, 1000);
        let e = s.put("base/big", pattern(LARGE, 3)).unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        assert!(
            !proxy.seen("DELETE", "uploadId=").is_empty(),
            "no AbortMultipartUpload sent"
        );
        assert_eq!(s.open_multipart_uploads("").unwrap(), vec![]);
        assert!(matches!(
            s.get("base/big"),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(s.list("").unwrap(), Vec::<String>::new());
    }

    /// A writer killed mid-upload cannot abort; the next start does.
    #[test]
    fn uploads_left_open_are_aborted_at_the_next_start() {
        let (proxy, s) = through_proxy("leftover");
        proxy.inject("PUT", "partNumber=2", Fault::CutRequest, 1000);
        proxy.inject(
            "DELETE",
            "uploadId=",
            Fault::Status(500, "InternalError"),
            1000,
        );
        assert!(s.put("base/big", pattern(LARGE, 4)).is_err());
        assert_eq!(
            s.open_multipart_uploads("").unwrap().len(),
            1,
            "the failed abort left the upload open"
        );
        assert!(matches!(
            s.get("base/big"),
            Err(StoreError::NotFound { .. })
        ));
        proxy.clear();
        assert_eq!(s.abort_incomplete_uploads("").unwrap(), 1);
        assert_eq!(s.open_multipart_uploads("").unwrap(), vec![]);
    }

    #[test]
    fn access_denied_is_not_retried() {
        let (proxy, s) = through_proxy("denied");
        proxy.inject(
            "PUT",
            "x-id=PutObject",
            Fault::Status(403, "AccessDenied"),
            1000,
        );
        let e = s.put("seg/1", pattern(10, 1)).unwrap_err();
        assert!(matches!(e, StoreError::Denied { .. }), "{e:?}");
        assert_eq!(proxy.seen("PUT", "x-id=PutObject").len(), 1);
    }
}

/// The FaultyStore wrapper that tests of the shipper use behaves as
/// documented (over the file backend).
mod faulty_wrapper {
    use super::*;
    use rewind::store::faulty::{Fault, FaultyStore, Op};

    #[test]
    fn injects_outages_and_lost_answers() {
        let (_dir, inner) = file_store();
        let s = FaultyStore::new(inner.clone());
        s.set_down(true);
        assert!(s
            .put("a", Bytes::from_static(b"1"))
            .unwrap_err()
            .is_transient());
        assert!(s.list("").is_err());
        s.set_down(false);
        assert!(s.wait_for_failures(2, Duration::from_secs(1)));
        s.fail_next(Op::Put, Fault::LandThenFail, 1);
        assert!(s.put("a", Bytes::from_static(b"1")).is_err());
        assert_eq!(inner.get("a").unwrap(), "1", "the lost-answer put landed");
        s.put("a", Bytes::from_static(b"1")).unwrap();
        s.fail_next(Op::Get, Fault::Denied, 1);
        assert!(matches!(s.get("a"), Err(StoreError::Denied { .. })));
        assert_eq!(s.get("a").unwrap(), "1");
        assert_eq!(s.calls(Op::Put), 3);
        assert_eq!(s.failures(), 4);
    }
}
