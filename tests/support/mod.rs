//! Helpers for the integration tests: temporary directories, the real S3
//! server (moto_server from the repo's .venv, in its own process, started
//! through tests/e2e/s3server.py), the fault-injecting proxy, deterministic
//! bytes, and small stores built with the library's encoders (`stores`).
//! Each test binary includes it with `mod support;` and uses what it needs.

#![allow(dead_code)]

pub mod proxy;
pub mod stores;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use rewind::store::s3::{RetryPolicy, S3Config};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool from the repo's .venv; panics (the test fails) if it is missing.
pub fn venv_tool(name: &str) -> PathBuf {
    let p = repo().join(".venv/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup to install the test tools (the S3 tests need a real S3 server)",
        p.display()
    );
    p
}

pub fn tempdir() -> tempfile::TempDir {
    let base = repo().join(".test-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

#[derive(Debug, Clone)]
pub struct User {
    pub access_key: String,
    pub secret_key: String,
}

/// A running S3 server. It stops when this is dropped, and also when the
/// test process dies: the helper watches its standard input.
pub struct S3Server {
    pub endpoint: String,
    pub root: User,
    pub users: std::collections::HashMap<String, User>,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl S3Server {
    /// `args` go to `s3server.py serve` (buckets, users, --auth).
    pub fn start(args: &[&str]) -> S3Server {
        venv_tool("moto_server");
        let python = venv_tool("python");
        let mut child = Command::new(python)
            .arg(repo().join("tests/e2e/s3server.py"))
            .arg("serve")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tests/e2e/s3server.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) if !l.trim().is_empty() => l,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the S3 server did not start (got {other:?}); run scripts/setup, then try tests/e2e/s3server.py serve by hand");
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).expect("server info is JSON");
        let user = |u: &serde_json::Value| User {
            access_key: u["access_key"].as_str().unwrap().to_string(),
            secret_key: u["secret_key"].as_str().unwrap().to_string(),
        };
        let users = v["users"]
            .as_object()
            .map(|m| m.iter().map(|(k, u)| (k.clone(), user(u))).collect())
            .unwrap_or_default();
        S3Server {
            endpoint: v["endpoint"].as_str().unwrap().to_string(),
            root: user(&v),
            users,
            stdin: child.stdin.take(),
            child,
        }
    }

    /// A config for this server with the root user, tuned for tests:
    /// quick retries, so that fault tests finish fast.
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        self.config_as(&self.root, bucket, prefix)
    }

    pub fn config_as(&self, user: &User, bucket: &str, prefix: &str) -> S3Config {
        let mut c = S3Config::new(bucket, prefix);
        c.endpoint = Some(self.endpoint.clone());
        c.path_style = true;
        c.region = Some("us-east-1".into());
        c.credentials = Some((user.access_key.clone(), user.secret_key.clone()));
        c.retry = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(300),
        };
        c
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        drop(self.stdin.take());
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const BUCKET: &str = "rewind-test";

/// One plain server (any credentials accepted) shared by the tests of this
/// binary, with bucket `rewind-test`; each test works under its own prefix.
pub fn shared_s3() -> &'static S3Server {
    static S: OnceLock<S3Server> = OnceLock::new();
    S.get_or_init(|| S3Server::start(&["--bucket", BUCKET]))
}

/// A unique prefix per test run and test, so that reruns never collide.
pub fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

/// Deterministic pseudo-random bytes (xorshift), cheap for 40 MiB.
pub fn pattern(len: usize, seed: u64) -> bytes::Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    bytes::Bytes::from(v)
}
