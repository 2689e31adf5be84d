"""Outage during a base (issue 12, defect 1: data loss).

`rewind run` starts on a source that already holds data, so its first base
uploads many chunks; the store goes away while the base is under way, for
long enough that the daemon retries, and comes back. Before the fix a chunk
whose put failed was remembered as stored, the retried walk skipped it, and
the window opened on a base whose chunk was missing: `rewind ls` showed it,
every restore failed with "object .../chunk/<hash> ... missing".

test_s3_outage_while_chunks_upload: s3://, the gate (a relay in front of
moto) closes once the store holds a tenth of the chunks; the metric
rewind_store_outage is 1 during the outage and back to 0 after it.

test_s3_outage_while_the_manifest_uploads: s3://, the gate closes as the
base's manifest PUT goes through it (the relay watches the request line),
so the walk is over and only the manifest is held back.

test_file_store_disk_full_while_chunks_upload: file://, the store is a
small loop-mounted ext4 that the test fills up once the store holds a tenth
of the chunks, and keeps full; then the space is freed.

In each: an application keeps writing through the mount all along (a
model of what the mount showed, stamped with the time before and after
each operation); while the outage lasts `rewind ls` must not show a window
that cannot be restored; after it, the window restores exactly at several
instants (the earliest among them) and `rewind verify` passes; and the log
has one line for the outage's start, one for its end, and no long dumps
of nested debug output.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import threading
import time
import traceback
from pathlib import Path

import pytest

import helpers
from s3fixtures import bucket, gate, make_s3_volume, s3, wait_metric  # noqa: F401  (fixtures)
from s3server import Gate

MIB = 1 << 20
OUTAGE = 25.0      # seconds the store stays away, at least
FILES = 240        # pre-filled files of 1 MiB random bytes (S3)
FILE_FILES = 100   # the same on the small file:// disk
LONG_LINE = 600    # no log line of the daemon is longer (object keys make some long)


# --------------------------------------------------------------------------
# The application: one writer whose every operation is stamped, so the state
# the mount showed at any instant between two operations is known.


class StampedWriter(threading.Thread):
    """Creates, rewrites and deletes small files under MOUNT/live, one
    operation at a time, a few a second. `states` holds (t_before, t_after,
    snapshot of live/ after the operation): between t_after of one and
    t_before of the next, the mount showed that snapshot."""

    def __init__(self, mount: Path, seed: int, pause: float = 0.15):
        super().__init__(daemon=True, name="stamped-writer")
        self.live = Path(mount) / "live"
        self.rng = random.Random(seed)
        self.pause = pause
        self.stop = threading.Event()
        self.error: str | None = None
        t = time.time_ns()
        self.states = [(t, t, helpers.snapshot(self.live))]

    def one(self, k: int):
        name = f"f{self.rng.randrange(12):02d}"
        p = self.live / name
        t0 = time.time_ns()
        if p.exists() and self.rng.random() < 0.2:
            os.unlink(p)
        else:
            with open(p, "wb") as f:
                f.write(self.rng.randbytes(self.rng.randrange(1, 40000)) + f" op {k}".encode())
        t1 = time.time_ns()
        self.states.append((t0, t1, helpers.snapshot(self.live)))

    def run(self):
        try:
            k = 0
            while not self.stop.is_set():
                k += 1
                self.one(k)
                self.stop.wait(self.pause)
        except BaseException:
            self.error = traceback.format_exc()

    def ok(self):
        assert self.error is None, f"the application's writer failed:\n{self.error}"
        return True

    def acceptable(self, t_ns: int) -> list:
        """The live/ snapshots a restore at t_ns may give: the one after the
        last operation finished by then, or, when an operation was in flight
        at t_ns, the one before or after it (whole or not at all)."""
        out = []
        for i, (t0, t1, snap) in enumerate(self.states):
            if t1 <= t_ns:
                out = [snap]
            elif t0 <= t_ns < t1:
                return out + [snap]
            else:
                break
        return out


def check_restore(vol, writer, data_snap, t_ns: int, target: Path, what: str):
    """Restores at t_ns and compares with what the mount showed then: the
    pre-filled data/ exactly, live/ as one of the acceptable states."""
    if target.exists():
        helpers.rmtree(target)
    c = vol.restore(t_ns, target, check=False)
    assert c.code == 0, f"{what}: restore at {helpers.fmt_ns(t_ns)} failed:\n{c}"
    top = sorted(p.name for p in target.iterdir() if p.name != ".rewind")
    assert top == ["data", "live"], f"{what}: restore at {helpers.fmt_ns(t_ns)} holds {top}"
    helpers.assert_same_tree(data_snap, helpers.snapshot(target / "data"),
                             f"{what}: data/ restored at {helpers.fmt_ns(t_ns)}")
    got = helpers.snapshot(target / "live")
    options = writer.acceptable(t_ns)
    assert options, f"{what}: no known state at {helpers.fmt_ns(t_ns)}"
    diffs = [helpers.diff_snapshots(o, got) for o in options]
    assert any(not d for d in diffs), \
        f"{what}: live/ restored at {helpers.fmt_ns(t_ns)} is not what the mount showed:\n  " + \
        "\n  ".join(diffs[-1])
    helpers.rmtree(target)


def prefill(source: Path, n: int, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        helpers.fill_random(source / "data" / f"f{i:03d}", MIB, rng)
    (source / "live").mkdir()


def count_chunks(vol) -> int:
    if hasattr(vol, "keys"):
        return sum(1 for k in vol.keys() if "/chunk/" in k)
    d = vol.store_dir / vol.name / "chunk"
    return sum(1 for p in d.iterdir() if not p.name.startswith(".tmp.")) if d.exists() else 0


class OutageWatch:
    """Samples `rewind ls` while the outage lasts: every window it shows
    must restore (checked after the outage, from the store alone)."""

    def __init__(self, vol):
        self.vol = vol
        self.windows = []

    def sample(self):
        w = self.vol.window()
        if w and (not self.windows or self.windows[-1] != w):
            self.windows.append(w)


def outage_lasts(vol, writer, watch, t_out: float, what: str):
    def long_enough():
        writer.ok()
        assert vol.alive(), f"`rewind run` died during the outage:\n{vol.log_tail()}"
        watch.sample()
        return time.monotonic() - t_out >= OUTAGE
    helpers.wait_until(long_enough, OUTAGE + 60, f"{OUTAGE:.0f} s of {what}", interval=0.5)


def after_recovery(vol, writer, watch, workdir, data_snap, what: str, cause: str):
    """Waits for the base and the catch-up, stops cleanly, and checks
    restores, verify and the log."""
    vol.wait_window(timeout=240)
    t_mark = time.time_ns()
    helpers.wait_until(lambda: writer.ok() and writer.states[-1][0] > t_mark, 30,
                       "an operation after the window opened")
    writer.stop.set()
    writer.join(30)
    writer.ok()
    t_last = writer.states[-1][1]
    vol.wait_latest(t_last, timeout=180)
    w = vol.window()
    vol.stop(expect=0)
    log = vol.log()

    target = workdir / "restored"
    earliest, latest = w["earliest_ns"], w["latest_ns"]
    instants = [earliest, min(earliest + helpers.NS // 2, latest), (earliest + latest) // 2, latest]
    rng = random.Random(7)
    instants += [rng.randrange(earliest, latest + 1) for _ in range(2)]
    # Any window shown during the outage must restore too.
    for ow in watch.windows:
        instants += [ow["earliest_ns"], ow["latest_ns"]]
    for t in sorted(set(instants)):
        check_restore(vol, writer, data_snap, t, target, what)
    c = vol.verify()
    assert c.code == 0, f"{what}: rewind verify failed:\n{c}"
    check_log(log, what, cause)


def check_log(log: str, what: str, cause: str):
    """One outage-start line naming `cause` (a regex), one end line after
    retries, at most three WARN lines in all, no long or debug-dump lines."""
    lines = [l for l in log.splitlines() if " rewind" in l]
    began = [l for l in lines if "store outage began" in l]
    ended = [l for l in lines if "store outage ended" in l]
    long = [l for l in lines if len(l) > LONG_LINE]
    dumps = [l for l in lines if re.search(r"\w+ \{ \w+: |\w+\(\w+ \{|Os \{ code", l)]
    assert len(began) == 1, f"{what}: {len(began)} outage-start lines, expected one:\n" + "\n".join(l[:300] for l in began[:5])
    assert len(ended) == 1, f"{what}: {len(ended)} outage-end lines, expected one:\n" + "\n".join(l[:300] for l in ended[:5])
    assert re.search(cause, began[0]), f"{what}: the outage-start line does not say {cause!r}:\n{began[0]}"
    retried = re.search(r"\((\d+) failed requests\)", ended[0])
    assert retried and int(retried.group(1)) >= 2, f"{what}: no retries during the outage?\n{ended[0]}"
    assert not long, f"{what}: {len(long)} log lines over {LONG_LINE} characters, e.g.:\n{long[0][:1500]}"
    assert not dumps, f"{what}: {len(dumps)} log lines with nested debug output, e.g.:\n{dumps[0][:1500]}"
    warns = [l for l in lines if " WARN rewind" in l]
    assert len(warns) <= 3, f"{what}: {len(warns)} WARN lines for one outage:\n" + "\n".join(l[:300] for l in warns[:8])
    print(f"{what}:\n  {began[0]}\n  {ended[0]}")


# --------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_s3_outage_while_chunks_upload(make_s3_volume, workdir, gate, s3):
    vol = make_s3_volume(run_endpoint=gate.endpoint)
    prefill(vol.source, FILES, 1)
    data_snap = helpers.snapshot(vol.source / "data")
    vol.start("--listen", "127.0.0.1:0")
    writer = StampedWriter(vol.mount, 11)
    writer.start()
    watch = OutageWatch(vol)
    try:
        helpers.wait_until(lambda: count_chunks(vol) >= FILES // 10, 120,
                           f"{FILES // 10} chunks in the store", interval=0.05, on_timeout=vol._diag)
        gate.close()
        t_out = time.monotonic()
        assert count_chunks(vol) < FILES, "the base was over before the outage began"
        outage_lasts(vol, writer, watch, t_out, "outage during the chunk uploads")
        assert vol.metrics()["rewind_store_outage"] == 1, "the metrics do not show the outage"
        gate.open()
        wait_metric(vol, "rewind_store_outage", lambda v: v == 0, 120, "rewind_store_outage back to 0")
    except BaseException:
        writer.stop.set()
        raise
    after_recovery(vol, writer, watch, workdir, data_snap, "S3 outage while the base uploads chunks",
                   rf"unreachable: connection .* at {re.escape(gate.endpoint)} .*check the endpoint")


class BaseTripGate(Gate):
    """A Gate that closes by itself (an outage begins) when a request line
    for a base manifest passes through it: `PUT /<bucket>/.../base/...`.
    The request that trips it is not forwarded."""

    TRIP = re.compile(rb"PUT /[^ ]*/base/[^ ]* HTTP/1\.1")

    def __init__(self, upstream_port):
        super().__init__(upstream_port)
        self.armed = False
        self.tripped = threading.Event()
        self.tripped_at = None

    def admit(self, conn: dict, data: bytes) -> bool:
        if not self.armed:
            return True
        seen = conn.get("tail", b"") + data
        if self.TRIP.search(seen):
            self.armed = False
            self.tripped_at = time.monotonic()
            self.tripped.set()
            self.close()
            return False
        conn["tail"] = seen[-512:]
        return True


@pytest.mark.timeout(600)
def test_s3_outage_while_the_manifest_uploads(make_s3_volume, workdir, s3):
    trip = BaseTripGate(s3.port).open()
    trip.armed = True
    writer = None
    try:
        vol = make_s3_volume(run_endpoint=trip.endpoint)
        prefill(vol.source, FILES // 4, 2)
        data_snap = helpers.snapshot(vol.source / "data")
        vol.start()
        writer = StampedWriter(vol.mount, 12)
        writer.start()
        watch = OutageWatch(vol)
        def tripped():
            writer.ok()
            assert vol.alive(), f"`rewind run` exited:\n{vol.log_tail()}"
            watch.sample()
            return trip.tripped.is_set()
        helpers.wait_until(tripped, 180, "the base manifest's PUT", on_timeout=vol._diag)
        chunks = count_chunks(vol)
        assert chunks >= FILES // 4, f"the manifest went up with {chunks} of {FILES // 4} chunks stored"
        assert not any("/base/" in k for k in vol.keys()), "the manifest reached the store through a closed gate"
        outage_lasts(vol, writer, watch, trip.tripped_at, "outage during the manifest upload")
        assert not watch.windows, f"a window while the manifest was held back: {watch.windows}"
        trip.open()
        after_recovery(vol, writer, watch, workdir, data_snap, "S3 outage while the manifest uploads",
                       rf"unreachable: connection .* PutObject rw/vol/base/\S+ at {re.escape(trip.endpoint)} .*check the endpoint")
    except BaseException:
        if writer is not None:
            writer.stop.set()
        raise
    finally:
        trip.close()


@pytest.fixture
def small_store_disk(make_volume, workdir):
    """A volume whose file:// store is a 192 MiB ext4 filesystem (no
    reserved blocks) on a loop device."""
    vol = make_volume()
    img = workdir / "store.img"
    with open(img, "wb") as f:
        f.truncate(192 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(vol.store_dir)], check=True, capture_output=True)
    try:
        yield vol
    finally:
        if vol.alive():
            vol.proc.kill()
            vol.proc.wait()
        subprocess.run(["fusermount3", "-uz", str(vol.mount)], capture_output=True)
        subprocess.run(["umount", str(vol.store_dir)], check=True, capture_output=True)


class DiskFiller(threading.Thread):
    """Fills a filesystem: `ballast` leaves a given amount free (the store
    then fills it up itself); the thread writes filler files until ENOSPC
    and keeps taking whatever space is freed (a failed upload's temporary
    file) until stopped. `free` deletes everything it wrote."""

    def __init__(self, root: Path):
        super().__init__(daemon=True, name="disk-filler")
        self.dir = Path(root) / "filler"
        self.stop = threading.Event()
        self.full = threading.Event()
        self.error = None
        self.n = 0

    def ballast(self, leave: int):
        self.dir.mkdir(exist_ok=True)
        st = os.statvfs(self.dir)
        size = st.f_bavail * st.f_frsize - leave
        block = b"\0" * MIB
        with open(self.dir / "ballast", "wb", buffering=0) as f:
            while size > 0:
                size -= f.write(block[:min(size, MIB)])

    def _fill(self, size: int):
        block = b"\0" * size
        while True:
            self.n += 1
            try:
                with open(self.dir / f"{self.n:06d}", "wb", buffering=0) as f:
                    while True:
                        f.write(block)
            except OSError as e:
                if e.errno != 28:
                    raise
                if size == 4096:
                    return
                return self._fill(4096)

    def run(self):
        try:
            self.dir.mkdir(exist_ok=True)
            while not self.stop.is_set():
                self._fill(MIB)
                self.full.set()
                self.stop.wait(0.05)
        except BaseException:
            self.error = traceback.format_exc()

    def free(self):
        self.stop.set()
        if self.ident is not None:
            self.join(30)
        if self.dir.exists():
            helpers.rmtree(self.dir)
        os.sync()


@pytest.mark.timeout(600)
def test_file_store_disk_full_while_chunks_upload(small_store_disk, workdir):
    vol = small_store_disk
    prefill(vol.source, FILE_FILES, 3)
    data_snap = helpers.snapshot(vol.source / "data")
    # Room for about a third of the base: the disk fills during the base
    # whatever the speed of the walk, and the filler keeps it full.
    filler = DiskFiller(vol.store_dir)
    filler.ballast(FILE_FILES // 3 * MIB)
    vol.start()
    writer = StampedWriter(vol.mount, 13)
    writer.start()
    watch = OutageWatch(vol)
    try:
        helpers.wait_until(lambda: count_chunks(vol) >= FILE_FILES // 10, 120,
                           f"{FILE_FILES // 10} chunks in the store", interval=0.02, on_timeout=vol._diag)
        filler.start()
        helpers.wait_until(lambda: filler.full.is_set() or filler.error, 60, "the store's disk to fill")
        assert filler.error is None, filler.error
        t_out = time.monotonic()
        assert count_chunks(vol) < FILE_FILES, "the base was over before the disk was full"
        outage_lasts(vol, writer, watch, t_out, "a full store disk")
        assert filler.error is None, filler.error
    except BaseException:
        writer.stop.set()
        raise
    finally:
        filler.free()
    after_recovery(vol, writer, watch, workdir, data_snap, "file:// store disk full while the base uploads chunks",
                   r"No space left on device.*check the free space")
