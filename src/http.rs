//! Every HTTP endpoint Rewind serves, and the only module that imports
//! hyper, tokio or rustls: the admission webhook over HTTPS (with
//! certificates re-read when the files change, so cert-manager rotations need
//! no restart) and the plain-HTTP status server of `rewind run`
//! (`/healthz`, `/readyz`, `/metrics`). Handlers are thin: the webhook's
//! decisions live in `crate::webhook`, health and metrics state in
//! `crate::metrics`. This module must not decide anything about pods or
//! volumes, and must never panic or hang on what a client sends: bodies are
//! size-limited, handshakes and headers time-limited.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::webhook::{self, review::ReviewError, Config, PodSecurity};

/// Errors starting or running a server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS certificate {cert} / key {key}: {why}")]
    Tls {
        cert: String,
        key: String,
        why: String,
    },
    #[error("cannot start the HTTP runtime")]
    Runtime(#[source] std::io::Error),
}

/// Largest request body accepted. AdmissionReviews carry one pod (the API
/// server caps objects near 1.5 MiB); anything larger is refused with 413.
const MAX_BODY: usize = 4 << 20;
/// How much of an oversized body is read (and dropped) before the 413.
const DRAIN_CAP: usize = 16 << 20;
/// A client gets this long for the TLS handshake and for its headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many connections are served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 512;
/// On SIGTERM, open connections get this long to finish their requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Certificate files are checked for changes at most this often.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A finished response: status, content type, body.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
}

impl Reply {
    fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        let mut body = body.into();
        body.push('\n');
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from(body),
        }
    }
}

/// What a server does with one request, once its body is read.
type Handler = Arc<dyn Fn(&Method, &str, Bytes) -> Reply + Send + Sync>;

// ---------------------------------------------------------------------------
// The admission webhook.

/// Serves the admission webhook on `listen` until SIGTERM or SIGINT, then
/// drains open connections. Blocks the calling thread.
pub fn serve_webhook(
    listen: &str,
    cert: &Path,
    key: &Path,
    config: Config,
) -> Result<(), HttpError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let resolver = Arc::new(ReloadingCert::load(cert, key, provider.clone())?);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            why: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // HTTP/1.1 only: the API server's client falls back to it without ALPN h2.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let config = Arc::new(config);
    let handler: Handler =
        Arc::new(move |method, path, body| webhook_route(&config, method, path, body));
    // One thread is plenty for admission traffic (a few requests per pod
    // created) and keeps the webhook's footprint small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HttpError::Runtime)?;
    runtime.block_on(async move {
        let listener = bind(listen).await?;
        let addr = listener.local_addr().map_err(|source| HttpError::Bind {
            addr: listen.into(),
            source,
        })?;
        tracing::info!("rewind webhook listening on https://{addr}");
        let (stop_tx, stop_rx) = watch::channel(false);
        let signals = async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).map_err(HttpError::Runtime)?;
            let mut int = signal(SignalKind::interrupt()).map_err(HttpError::Runtime)?;
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("signal received: draining connections");
            let _ = stop_tx.send(true);
            Ok::<(), HttpError>(())
        };
        let accept = accept_loop(listener, Some(acceptor), handler, stop_rx);
        let (sig, ()) = tokio::join!(signals, accept);
        sig
    })
}

fn webhook_route(config: &Config, method: &Method, path: &str, body: Bytes) -> Reply {
    let pod_security = match path {
        "/healthz" | "/readyz" if method == Method::GET => {
            return Reply::text(StatusCode::OK, "ok")
        }
        "/mutate" => None,
        "/mutate/pod-security/baseline" => Some(PodSecurity::Baseline),
        "/mutate/pod-security/restricted" => Some(PodSecurity::Restricted),
        "/healthz" | "/readyz" => return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        _ => return Reply::text(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    };
    if method != Method::POST {
        return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview");
    }
    match webhook::review::review(&body, pod_security, config) {
        Ok((response, outcome)) => {
            let webhook::review::Outcome {
                uid,
                namespace,
                pod,
                decision,
            } = outcome;
            tracing::info!(%uid, %namespace, %pod, ?decision, "admission review answered");
            match serde_json::to_vec(&response) {
                Ok(json) => Reply {
                    status: StatusCode::OK,
                    content_type: "application/json",
                    body: Bytes::from(json),
                },
                Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        Err(
            e @ (ReviewError::NotJson(_) | ReviewError::NotReview(_) | ReviewError::Malformed(_)),
        ) => {
            tracing::warn!("bad admission request: {e}");
            Reply::text(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

/// The webhook's certificate, re-read when either file changes. Checking
/// at handshake time (at most once a second) needs no background thread
/// and picks up a rotation before the first connection that could use it.
/// A failed reload (half-written files, a key that does not match) keeps
/// serving the previous pair and is retried.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<CertState>,
}

#[derive(Debug)]
struct CertState {
    current: Arc<CertifiedKey>,
    stamp: Option<(FileStamp, FileStamp)>,
    checked: Instant,
}

/// What identifies a version of a file: Kubernetes updates a Secret volume
/// by swapping a symlink, which changes the inode, and editors change the
/// mtime or size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.modified().ok(),
    })
}

impl ReloadingCert {
    fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCert, HttpError> {
        let stamps = stamp(cert).zip(stamp(key));
        let current = Arc::new(read_pair(cert, key, &provider)?);
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            state: Mutex::new(CertState {
                current,
                stamp: stamps,
                checked: Instant::now(),
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock();
        if state.checked.elapsed() >= CERT_CHECK_INTERVAL {
            state.checked = Instant::now();
            let now = stamp(&self.cert).zip(stamp(&self.key));
            if now.is_some() && now != state.stamp {
                match read_pair(&self.cert, &self.key, &self.provider) {
                    Ok(pair) => {
                        tracing::info!("reloaded TLS certificate {}", self.cert.display());
                        state.current = Arc::new(pair);
                        state.stamp = now;
                    }
                    // Not recording the stamp makes the next check retry.
                    Err(e) => tracing::warn!("keeping the previous certificate: {e}"),
                }
            }
        }
        state.current.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, HttpError> {
    let err = |why: String| HttpError::Tls {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        why,
    };
    let cert_pem =
        std::fs::read(cert).map_err(|e| err(format!("cannot read the certificate: {e}")))?;
    let key_pem = std::fs::read(key).map_err(|e| err(format!("cannot read the key: {e}")))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("bad certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(err("the certificate file holds no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| err(format!("bad private key PEM: {e}")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| err(format!("unusable pair: {e}")))
}

// ---------------------------------------------------------------------------
// The status server of `rewind run`.

/// The running `/healthz`, `/readyz`, `/metrics` server of `rewind run`,
/// on its own thread. Dropping it stops the server.
pub struct StatusServer {
    addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusServer {
    /// Binds `listen` (e.g. "0.0.0.0:9746"; port 0 picks a free port) and
    /// serves: `/healthz` 200 once the mount is live, `/readyz` 200 while
    /// the mount is live and the journal writable (503 otherwise), and
    /// `/metrics` in the Prometheus text format.
    pub fn start(listen: &str, metrics: Arc<Metrics>) -> Result<StatusServer, HttpError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(HttpError::Runtime)?;
        let listener = runtime.block_on(bind(listen))?;
        let addr = listener.local_addr().map_err(|source| HttpError::Bind {
            addr: listen.into(),
            source,
        })?;
        let handler: Handler =
            Arc::new(move |method, path, _body| status_route(&metrics, method, path));
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("rewind-http".into())
            .spawn(move || runtime.block_on(accept_loop(listener, None, handler, stop_rx)))
            .map_err(HttpError::Runtime)?;
        tracing::info!("health and metrics on http://{addr}");
        Ok(StatusServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status_route(metrics: &Metrics, method: &Method, path: &str) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let health = |ok: bool, what: &str| {
        if ok {
            Reply::text(StatusCode::OK, "ok")
        } else {
            Reply::text(StatusCode::SERVICE_UNAVAILABLE, what)
        }
    };
    match path {
        "/healthz" => health(metrics.is_live(), "mount not live"),
        "/readyz" => health(metrics.is_ready(), "mount not live or journal not writable"),
        "/metrics" => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: Bytes::from(metrics.render(SystemTime::now())),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    }
}

// ---------------------------------------------------------------------------
// Shared plumbing.

async fn bind(listen: &str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| HttpError::Bind {
            addr: listen.into(),
            source,
        })
}

/// Accepts connections until `stop` turns true, then asks open connections
/// to finish their current request and waits for them (bounded).
async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Handler,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, handler, stop).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                    }
                }
                None => serve_connection(tcp, handler, stop).await,
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "{} connections still open after {DRAIN_TIMEOUT:?}; closing them",
            conns.len()
        );
        conns.abort_all();
    }
}

async fn serve_connection<S>(stream: S, handler: Handler, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| respond(req, handler.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = wait_true(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// Resolves once the watched flag is true (or its sender is gone).
async fn wait_true(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn respond(
    req: Request<Incoming>,
    handler: Handler,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut buf = Vec::new();
    let mut total = 0usize;
    let mut failed = None;
    // Read up to MAX_BODY; past it keep reading (and dropping) up to
    // DRAIN_CAP, so that a client still sending a moderately oversized
    // body reads our 413 instead of a connection closed under its write.
    while total <= DRAIN_CAP {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    total += data.len();
                    if total <= MAX_BODY {
                        buf.extend_from_slice(&data);
                    }
                }
            }
            Some(Err(e)) => {
                failed = Some(e);
                break;
            }
        }
    }
    let reply = match failed {
        _ if total > MAX_BODY => Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        ),
        Some(e) => Reply::text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        ),
        None => handler(&parts.method, parts.uri.path(), Bytes::from(buf)),
    };
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    Ok(response)
}
