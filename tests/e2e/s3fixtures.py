"""Shared pieces of the run-level S3 suites (test_s3_outage.py,
test_s3_restore.py): a moto server per test module, a `Gate` per test in
front of it (the daemon talks through the gate, so closing it is an outage;
the CLI and the test's own checks talk to moto directly), a `helpers.Volume`
whose store is `s3://BUCKET/PREFIX`, /metrics scraping, and a bulk writer
of incompressible files that records what each write acknowledged.

Nothing here edits the shared e2e harness (helpers.py, conftest.py,
workload.py): the S3 volume is a subclass whose environment carries the S3
endpoint and keys, so every helper that runs `rewind` (start, ls, restore,
verify) reaches the S3 store.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import helpers
from s3server import Gate, S3Server

_buckets = itertools.count(1)


@pytest.fixture(scope="module")
def s3():
    """One moto_server per test module (its own process, over HTTP)."""
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"t{next(_buckets)}-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    s3.create_bucket(name)
    return name


@pytest.fixture
def gate(s3):
    g = Gate(s3.port).open()
    yield g
    g.close()


class S3Volume(helpers.Volume):
    """A `helpers.Volume` storing to s3://BUCKET/PREFIX. `rewind run` reaches
    the server through `run_endpoint` (a Gate, so the test can cut it); every
    other command (ls, verify, restore) and the test's own checks reach it
    directly, so they work during an outage."""

    def __init__(self, root: Path, s3: S3Server, bucket: str, prefix: str = "rw",
                 run_endpoint: str | None = None, **kw):
        super().__init__(root, **kw)
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.store_url = f"s3://{bucket}/{prefix}"
        self.run_endpoint = run_endpoint or s3.endpoint

    def env(self, extra: dict | None = None) -> dict:
        e = super().env()
        for k in [k for k in e if k.startswith("AWS_")]:
            del e[k]
        e.update({k: v for k, v in self.s3.env().items() if k.startswith(("AWS_", "REWIND_S3"))})
        if extra:
            e.update(extra)
        return e

    def start(self, *extra, env: dict | None = None, **kw):
        return super().start(*extra, env={"AWS_ENDPOINT_URL": self.run_endpoint, **(env or {})}, **kw)

    # -- what the store holds, read directly --------------------------------
    def keys(self) -> list[str]:
        c = self.s3.client()
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": f"{self.prefix}/{self.name}/"}
            if token:
                kw["ContinuationToken"] = token
            r = c.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]

    def open_uploads(self) -> list:
        return self.s3.open_multipart_uploads(self.bucket, f"{self.prefix}/")

    # -- /metrics -------------------------------------------------------------
    def listen_addr(self, timeout: float = 30) -> str:
        m = helpers.wait_until(
            lambda: re.search(r"health and metrics on http://([0-9.]+:[0-9]+)", self.log()),
            timeout, "the daemon to log its --listen address", on_timeout=self._diag)
        return m.group(1)

    def metrics(self) -> dict[str, float]:
        return scrape(self.listen_addr())

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.listen_addr()}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None


def scrape(addr: str) -> dict[str, float]:
    """The unlabelled samples of /metrics (labelled ones under their full name)."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class BulkWriter(threading.Thread):
    """Writes incompressible files of `size` bytes under MOUNT/bulk, one
    write() of `chunk` bytes at a time, at most `rate` bytes a second
    (settable while it runs; 0 pauses it). A file counts as acknowledged
    when close() returned. Every acknowledged chunk is stamped with
    time.monotonic() in `progress` (bytes so far), so a test can see the
    writer stall. A mount that dies (ENOTCONN, ECONNABORTED, EIO) parks the
    writer until `new_generation()`."""

    def __init__(self, mount, seed: int, size: int = 4 << 20, chunk: int = 1 << 20,
                 rate: float = 8 << 20, subdir: str = "bulk"):
        super().__init__(daemon=True, name="bulk-writer")
        self.mount = Path(mount)
        self.subdir = subdir
        self.size, self.chunk = size, chunk
        self.rate = rate
        self.seed = seed
        self.acked: dict[str, str] = {}     # relpath -> digest, close() returned
        self.tried: dict[str, int] = {}     # relpath -> size, in flight at a kill
        self.written = 0                    # bytes acknowledged (write() returned)
        self.last_ack = time.monotonic()
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.generation = 0
        self.waiting = False
        self.error: str | None = None
        self.n = 0

    def new_generation(self):
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def _throttle(self, t0: float, sent: int):
        while not self.stop.is_set():
            rate = self.rate
            if rate > 0:
                due = t0 + sent / rate
                now = time.monotonic()
                if now >= due:
                    return
                time.sleep(min(due - now, 0.05))
            else:
                time.sleep(0.05)

    def _one(self, t0_sent):
        self.n += 1
        rel = f"{self.subdir}/{self.seed}-{self.n:06d}"
        data = os.urandom(self.size)
        self.tried[rel] = len(data)
        fd = os.open(self.mount / rel, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            off = 0
            while off < len(data):
                self._throttle(*t0_sent)
                n = os.write(fd, data[off:off + self.chunk])
                off += n
                self.written += n
                t0_sent[1] += n
                self.last_ack = time.monotonic()
        finally:
            os.close(fd)
        self.acked[rel] = digest(data)
        del self.tried[rel]

    def run(self):
        try:
            (self.mount / self.subdir).mkdir(exist_ok=True)
            while not self.stop.is_set():
                with self.cond:
                    gen = self.generation
                try:
                    # The rate is measured per file, so a long pause (rate 0)
                    # does not turn into a burst afterwards.
                    self._one([time.monotonic(), 0])
                except OSError as e:
                    if e.errno not in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
                        raise
                    with self.cond:
                        self.waiting = True
                        self.cond.wait_for(lambda: self.generation != gen or self.stop.is_set())
                        self.waiting = False
        except BaseException:
            self.error = traceback.format_exc()

    def check(self, root, what: str):
        """Every acknowledged file is in `root` whole; files in flight at a
        kill are absent or a prefix-sized file (never a foreign content)."""
        root = Path(root)
        errs = []
        for rel, dg in self.acked.items():
            p = root / rel
            if not p.exists():
                errs.append(f"acknowledged {rel} missing")
            elif digest(p.read_bytes()) != dg:
                errs.append(f"acknowledged {rel} has other contents ({p.stat().st_size} bytes)")
        assert not errs, f"{what}: {len(errs)} of {len(self.acked)} acknowledged bulk files wrong:\n  " + \
            "\n  ".join(errs[:20])


def wait_metric(vol: S3Volume, name: str, pred, timeout: float, what: str) -> dict:
    """Polls /metrics until pred(value of `name`) holds; returns the sample set."""
    last = {}

    def ok():
        nonlocal last
        if not vol.alive():
            raise AssertionError(f"`rewind run` exited {vol.proc.returncode} while waiting for {what}\n{vol.log_tail(60)}")
        try:
            last = vol.metrics()
        except OSError:
            return None
        return last if name in last and pred(last[name]) else None

    return helpers.wait_until(ok, timeout, what, interval=0.1,
                              on_timeout=lambda: f"{name} = {last.get(name)}; metrics {last}\n{vol.log_tail()}")


@pytest.fixture
def make_s3_volume(workdir, s3, bucket):
    """Like conftest's make_volume, for S3Volume: killed and unmounted at teardown."""
    made = []

    def make(sub: str = "v", *, name: str = "vol", prefix: str = "rw", run_endpoint: str | None = None,
             **kw) -> S3Volume:
        v = S3Volume(workdir / sub, s3, bucket, prefix, run_endpoint=run_endpoint, name=name, **kw)
        made.append(v)
        return v

    yield make
    if s3.frozen:
        s3.thaw()
    for v in made:
        v.cleanup()


def paced_crash_writer(mount, seed: int, pause: float = 0.004):
    """test_crash.CrashWriter (its model of acknowledged changes, its
    parking on a dead mount) at a bounded pace. Unpaced it creates a file
    every few hundred microseconds: tens of thousands during an outage,
    which made restores slow and, before e5c2055, ran the daemon out of
    descriptors (EMFILE: one O_PATH handle per inode the kernel holds)
    instead of testing the outage."""
    import test_crash

    class Paced(test_crash.CrashWriter):
        def one(self):
            super().one()
            time.sleep(pause)

    return Paced(mount, seed)
