"""A real S3-compatible server for the tests: moto_server from the repo's
.venv, in its own process, on a free 127.0.0.1 port.

Used three ways:
  * by the end-to-end tests: ``with S3Server() as s3: s3.create_bucket("b")``
    then run ``rewind`` with ``env=s3.env()``;
  * by the Rust tests (tests/support/s3server.rs) and scripts/s3-server
    through the command line: ``s3server.py serve --bucket b [--auth]``
    prints one JSON line (endpoint, keys, users) and keeps the server up
    until its standard input closes, so a killed test leaves no server;
  * by hand: ``scripts/s3-server --bucket b`` and paste the exports.

moto keeps its state in memory, so an outage is simulated without killing
it: ``Gate`` is a loopback TCP relay whose listener can be closed
(connections refused and cut, as if the server were down) and reopened on
the same port, and whose `admit` hook lets a subclass close it at a chosen
request; ``S3Server.freeze()`` stops the process (SIGSTOP: requests
hang until timeouts fire) and ``thaw()`` resumes it.

moto accepts any credentials until ``enable_auth()``; after it, every
request must be signed by an IAM user created here, and IAM policies are
enforced (moto's IAM auth mode, reset-auth API).
"""

import argparse
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
REGION = "us-east-1"
# moto's own "root" keys: any key works while auth is off.
ROOT_KEY, ROOT_SECRET = "rewind-test-root", "rewind-test-root-secret"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout, what, interval=0.05):
    """Polls cond() until it is true or the deadline passes (then raises)."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def doc_policy(name, bucket, prefix="*"):
    """The IAM policy docs/S3.md documents under <!-- policy: NAME -->, with
    BUCKET and PREFIX filled in, adapted to moto: moto checks HeadBucket
    against an action of its own name where AWS checks s3:ListBucket."""
    text = (REPO / "docs" / "S3.md").read_text()
    m = re.search(r"<!-- policy: %s -->\s*```json\n(.*?)```" % re.escape(name), text, re.S)
    if not m:
        raise KeyError(f"docs/S3.md has no policy named {name}")
    policy = json.loads(m.group(1).replace("BUCKET", bucket).replace("PREFIX", prefix))
    for st in policy["Statement"]:
        if "s3:ListBucket" in st["Action"]:
            st["Action"].append("s3:HeadBucket")
    return policy


class S3Server:
    def __init__(self, port=None):
        self.port = port
        self.proc = None
        self.frozen = False
        self.auth = False

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout=60):
        exe = VENV / "bin" / "moto_server"
        if not exe.exists():
            raise RuntimeError(f"{exe} is missing: run scripts/setup to install the test tools")
        for _ in range(3):
            port = self.port or free_port()
            self.proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
                start_new_session=True,
            )
            self.port = port
            try:
                wait_until(lambda: self._ready() or self.proc.poll() is not None, timeout, "moto_server to answer")
            except TimeoutError:
                self.stop()
                raise
            if self.proc.poll() is None:
                return self
            # The port was taken between probe and bind: try another.
            self.port = None
        raise RuntimeError("moto_server did not start (three ports tried)")

    def _ready(self):
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            if self.frozen:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def freeze(self):
        """Stops the server process: requests hang (timeouts, not refusals)."""
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self):
        self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- addresses and clients --------------------------------------------

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def env(self, key=ROOT_KEY, secret=ROOT_SECRET, endpoint=None, **extra):
        """Environment for a rewind process talking to this server."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AWS_")
        }
        env.update(
            AWS_ENDPOINT_URL=endpoint or self.endpoint,
            AWS_ACCESS_KEY_ID=key,
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_REGION=REGION,
            AWS_EC2_METADATA_DISABLED="true",
            REWIND_S3_PATH_STYLE="1",
        )
        env.update(extra)
        return env

    def client(self, service="s3", key=ROOT_KEY, secret=ROOT_SECRET):
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    # -- administration (before enable_auth) -------------------------------

    def create_bucket(self, name):
        self.client().create_bucket(Bucket=name)

    def create_user(self, name, policy):
        """An IAM user with `policy` (a dict) attached; returns (key, secret)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=name)["AccessKey"]
        return k["AccessKeyId"], k["SecretAccessKey"]

    def enable_auth(self):
        """From now on every request must be signed by a known user and is
        checked against that user's policy."""
        # Not form-encoded: moto reads the raw body, which Flask empties for forms.
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10):
            pass
        self.auth = True

    def open_multipart_uploads(self, bucket, prefix="", key=ROOT_KEY, secret=ROOT_SECRET):
        out = self.client(key=key, secret=secret).list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return [(u["Key"], u["UploadId"]) for u in out.get("Uploads", [])]


class Gate:
    """A loopback TCP relay in front of `upstream_port`. close() stops
    listening and cuts every relayed connection (clients see refusals and
    resets, as when a server is down); open() listens again on the same
    port. Point the client at gate.endpoint."""

    def __init__(self, upstream_port, port=None):
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.lock = threading.Lock()
        self.listener = None
        self.conns = set()
        self.stopping = False

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def open(self):
        with self.lock:
            if self.listener:
                return self
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port))
            ls.listen(64)
            self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def close(self):
        with self.lock:
            ls, self.listener = self.listener, None
            conns, self.conns = self.conns, set()
        if ls:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, ls):
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not ls:
                    client.close()
                    upstream.close()
                    return
                self.conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def admit(self, conn: dict, data: bytes) -> bool:
        """Sees every piece of bytes a client sends (`conn`: a dict kept per
        connection) before it is relayed; False cuts the connection instead.
        Subclasses use it to begin an outage at a given request."""
        return True

    def _pump(self, a, b):
        socks = [a, b]
        conn = {}
        try:
            while True:
                ready, _, _ = select.select(socks, [], [], 60)
                if not ready:
                    break  # idle for a minute: drop it (bounded)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is a and not self.admit(conn, data):
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            # Cut by close_all() (the simulated outage) from another thread:
            # a closed socket reads as fd -1, which select() refuses.
            pass
        finally:
            with self.lock:
                self.conns.discard(a)
                self.conns.discard(b)
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


def serve(args):
    """Starts a server, prepares buckets and users, prints one JSON line,
    and stops the server when standard input closes."""
    server = S3Server(port=args.port).start()
    try:
        for b in args.bucket:
            server.create_bucket(b)
        users = {}
        for spec in args.user:
            # NAME=POLICY[:BUCKET[:PREFIX]], POLICY from docs/S3.md
            name, _, rest = spec.partition("=")
            pol, _, where = rest.partition(":")
            bucket, _, prefix = where.partition(":")
            policy = doc_policy(pol, bucket or args.bucket[0], prefix or "*")
            key, secret = server.create_user(name, policy)
            users[name] = {"access_key": key, "secret_key": secret}
        if args.auth:
            server.enable_auth()
        info = {
            "endpoint": server.endpoint,
            "region": REGION,
            "access_key": ROOT_KEY,
            "secret_key": ROOT_SECRET,
            "pid": server.proc.pid,
            "auth": args.auth,
            "users": users,
        }
        print(json.dumps(info), flush=True)
        if args.exports:
            for k, v in server.env().items():
                if k.startswith("AWS_") or k.startswith("REWIND_"):
                    print(f"export {k}={v}", file=sys.stderr)
        # Block until the parent closes our stdin (or dies).
        while sys.stdin.buffer.read(65536):
            pass
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a server until stdin closes")
    s.add_argument("--port", type=int, help="default: a free port")
    s.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    s.add_argument("--user", action="append", default=[], help="NAME=POLICY[:BUCKET[:PREFIX]]: an IAM user with a docs/S3.md policy")
    s.add_argument("--auth", action="store_true", help="check signatures and policies (moto IAM auth mode)")
    s.add_argument("--exports", action="store_true", help="print shell exports on stderr")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args)


if __name__ == "__main__":
    main()
