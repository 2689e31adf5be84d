//! A misbehaving HTTP proxy on loopback, between the S3 client and the real
//! S3 server, for fault injection: it answers chosen requests with 5xx or
//! throttling errors, holds them without answering (timeouts), cuts the
//! connection in the middle of a request body (an upload dying half-way) or
//! of a response body (a download dying half-way), and forwards the rest.
//!
//! Each client connection carries one request: the proxy reads it whole,
//! applies the first matching rule, and closes the connection after the
//! answer (`Connection: close`), so that rules apply per request.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and S3 error code, without forwarding.
    Status(u16, &'static str),
    /// Read the request, then never answer (until the client gives up).
    Hang,
    /// Read half of the request body, then cut the connection.
    CutRequest,
    /// Forward the request (the server acts on it), then cut the
    /// connection half-way through the response body.
    CutResponse,
}

struct Rule {
    method: &'static str,
    target_contains: String,
    fault: Fault,
    times: usize,
}

/// One request the proxy saw, and what it did with it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub fault: Option<Fault>,
}

struct Shared {
    upstream: SocketAddr,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Seen>>,
    stop: AtomicBool,
}

pub struct Proxy {
    pub endpoint: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy on a free 127.0.0.1 port in front of `upstream`
    /// (an `http://127.0.0.1:PORT` endpoint).
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let sh = Arc::clone(&shared);
        thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    let sh = Arc::clone(&sh);
                    thread::spawn(move || {
                        let _ = handle(&sh, conn);
                    });
                }
            }
        });
        Proxy {
            endpoint: format!("http://{addr}"),
            addr,
            shared,
        }
    }

    /// Applies `fault` to the next `times` requests whose method is
    /// `method` and whose target (path and query) contains `contains`.
    pub fn inject(&self, method: &'static str, contains: &str, fault: Fault, times: usize) {
        self.shared.rules.lock().unwrap().push(Rule {
            method,
            target_contains: contains.to_string(),
            fault,
            times,
        });
    }

    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// The requests seen so far that match `method` and `contains`.
    pub fn seen(&self, method: &str, contains: &str) -> Vec<Seen> {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && s.target.contains(contains))
            .cloned()
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

struct Request {
    method: String,
    target: String,
    head: Vec<(String, String)>,
    /// Body bytes as received (chunked framing included, if any).
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the blank line that ends an HTTP head; returns (head, rest).
fn read_head(s: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 1 << 20 {
            return Err(io::Error::other("head too large"));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a [(String, String)], name: &str) -> Option<&'a str> {
    head.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn parse_head(text: &str) -> (String, Vec<(String, String)>) {
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("").to_string();
    let head = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    (first, head)
}

/// Reads the request body: by Content-Length, or chunked to its end.
/// With `limit`, stops after that many bytes (to cut an upload).
fn read_body(
    s: &mut TcpStream,
    head: &[(String, String)],
    mut body: Vec<u8>,
    limit: Option<usize>,
) -> io::Result<Vec<u8>> {
    let mut chunk = [0u8; 65536];
    let chunked =
        header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let len: Option<usize> = header(head, "content-length").and_then(|v| v.parse().ok());
    loop {
        if let Some(l) = limit {
            if body.len() >= l {
                return Ok(body);
            }
        }
        let done = if chunked {
            find(&body, b"\r\n0\r\n").is_some() && body.ends_with(b"\r\n\r\n")
                || body.starts_with(b"0\r\n\r\n")
        } else {
            body.len() >= len.unwrap_or(0)
        };
        if done {
            return Ok(body);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed mid-body",
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

fn body_len(head: &[(String, String)]) -> usize {
    header(head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn handle(sh: &Shared, mut client: TcpStream) -> io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let (text, rest) = read_head(&mut client)?;
    let (first, head) = parse_head(&text);
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();

    let fault = {
        let mut rules = sh.rules.lock().unwrap();
        let hit = rules
            .iter_mut()
            .find(|r| r.times > 0 && r.method == method && target.contains(&r.target_contains));
        hit.map(|r| {
            r.times -= 1;
            r.fault
        })
    };
    sh.log.lock().unwrap().push(Seen {
        method: method.clone(),
        target: target.clone(),
        fault,
    });

    if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let limit = match fault {
        Some(Fault::CutRequest) => Some((body_len(&head) / 2).max(1)),
        _ => None,
    };
    let body = read_body(&mut client, &head, rest, limit)?;
    let req = Request {
        method,
        target,
        head,
        body,
    };

    match fault {
        Some(Fault::Status(status, code)) => {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
            );
            let body = if req.method == "HEAD" {
                String::new()
            } else {
                xml
            };
            write!(
                client,
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            client.flush()?;
        }
        Some(Fault::Hang) => {
            // Hold the request unanswered until the client gives up (its
            // attempt deadline), the proxy stops, or a bounded minute.
            client.set_read_timeout(Some(Duration::from_millis(100)))?;
            let until = Instant::now() + Duration::from_secs(60);
            let mut b = [0u8; 4096];
            while Instant::now() < until && !sh.stop.load(Ordering::SeqCst) {
                match client.read(&mut b) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        }
        Some(Fault::CutRequest) => {}
        Some(Fault::CutResponse) | None => {
            let response = forward(sh.upstream, &req)?;
            let (text, body) = match find(&response, b"\r\n\r\n") {
                Some(i) => (
                    String::from_utf8_lossy(&response[..i]).into_owned(),
                    &response[i + 4..],
                ),
                None => return Err(io::Error::other("upstream sent no head")),
            };
            let (first, head) = parse_head(&text);
            let mut out = format!("{first}\r\n");
            for (k, v) in head
                .iter()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("connection"))
            {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("Connection: close\r\n\r\n");
            client.write_all(out.as_bytes())?;
            let n = if fault == Some(Fault::CutResponse) {
                body.len() / 2
            } else {
                body.len()
            };
            client.write_all(&body[..n])?;
            client.flush()?;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}

/// Sends the request to the real server on a fresh connection and reads
/// its whole answer (the server closes after it: `Connection: close`).
fn forward(upstream: SocketAddr, req: &Request) -> io::Result<Vec<u8>> {
    let mut up = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for (k, v) in &req.head {
        if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("expect") {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    up.write_all(out.as_bytes())?;
    up.write_all(&req.body)?;
    up.flush()?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    Ok(response)
}
