"""`rewind mount --at T`: the read-only view of one instant (issue 14).

test_view_matches_restore[seed] (REWIND_SEEDS, as test_differential.py;
scripts/many-seeds does not run this file): the differential workload (workload.py, the
prefill of test_differential.py) runs on a live volume while the test
takes random instants, some in pairs less than a millisecond apart; then
everything local is deleted and, for every instant, the view mounted from
the store alone is walked and compared with `rewind restore --at T` of the
same instant (contents, kinds, modes, owners, sizes, file mtimes,
symlinks, hard links by inode number, user xattrs) and with the mount as
it was then. Every change through the view is refused with EROFS, and
SIGTERM unmounts it.

test_view_on_s3_cold_small_cache_and_outage: on a real S3 server (moto),
a view with a cold cache smaller than the files read gives the right
bytes; with the store cut off (a Gate in front of moto) a read that needs
an uncached chunk fails with EIO and a log line, and the same read gives
the right bytes once the store is back.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import time

import pytest

import helpers
import workload
from helpers import NS, fmt_ns
from s3fixtures import bucket, gate, make_s3_volume, s3  # noqa: F401  (fixtures)
from test_differential import SEEDS, WRITERS, prefill

MIB = 1 << 20


class View:
    """One `rewind mount` process and its mountpoint."""

    def __init__(self, vol, at, mnt, *extra, env=None):
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.log_path = vol.logs / f"view-{mnt.name}.log"
        at_s = fmt_ns(at) if isinstance(at, int) else str(at)
        args = [helpers.REWIND_BIN, "mount", *vol.store_args(), "--at", at_s, *extra, mnt]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, env=vol.env(env))

        def live():
            if self.proc.poll() is not None:
                raise AssertionError(f"rewind mount exited {self.proc.returncode}:\n{self.log()}")
            return helpers.is_fuse_mounted(mnt)
        helpers.wait_until(live, 120, f"the view at {mnt} to be mounted", on_timeout=self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"rewind mount did not exit within 60s of SIGTERM:\n{self.log()}")
        assert code == 0, f"rewind mount exited {code} after SIGTERM:\n{self.log()}"
        assert not helpers.is_fuse_mounted(self.mnt), f"{self.mnt} is still mounted after SIGTERM"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        helpers.lazy_unmount(self.mnt)


def assert_read_only(root):
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert files, "the view holds no regular file"
    f = files[0]
    attempts = {
        "open for writing": lambda: os.close(os.open(f, os.O_WRONLY)),
        "truncate": lambda: os.truncate(f, 0),
        "create": lambda: os.close(os.open(root / "new-file", os.O_CREAT | os.O_WRONLY, 0o644)),
        "mkdir": lambda: os.mkdir(root / "new-dir"),
        "unlink": lambda: os.unlink(f),
        "rename": lambda: os.rename(f, root / "renamed"),
        "chmod": lambda: os.chmod(f, 0o600),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
    }
    for what, op in attempts.items():
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EROFS, f"{what} through the view: {e.value!r}, expected EROFS"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", SEEDS)
def test_view_matches_restore(make_volume, workdir, seed):
    rng = random.Random(seed)
    vol = make_volume("v")
    shadow = workdir / "shadow"
    shadow.mkdir()
    prefill(vol.source, rng)
    for i in range(WRITERS):
        assert os.system(f"cp -a {vol.source}/w{i} {shadow}/w{i}") == 0
    gate = workload.Gate()
    writers = [workload.Writer(i, seed, str(vol.mount), str(shadow), gate) for i in range(WRITERS)]
    for w in writers:
        w.start()
    instants = []
    ticker_fd = None
    try:
        vol.start()
        for w in writers:
            w.go.set()
        vol.wait_window(timeout=180)
        ticker_fd = os.open(vol.mount / "coord" / "ticker", os.O_WRONLY)
        for k, kind in enumerate(["single", "pair", "single", "single", "pair", "single"]):
            time.sleep(rng.uniform(0.2, 0.8))  # the workload runs (not a wait)
            gate.pause()
            for w in writers:
                assert w.crash is None, f"writer crashed:\n{w.crash}"
            snap = helpers.snapshot(vol.mount)
            if kind == "single":
                instants.append(("single", time.time_ns(), snap))
            else:
                for _attempt in range(20):
                    os.setxattr(vol.mount / "coord", "user.pair", b"p")
                    t1 = time.time_ns()
                    os.pwrite(ticker_fd, b"%08d" % k, (k % 8) * 8)
                    t2 = time.time_ns()
                    os.setxattr(vol.mount / "coord", "user.pair", b"p")
                    if t2 - t1 < 1_000_000:
                        break
                    snap = helpers.snapshot(vol.mount)
                assert t2 - t1 < 1_000_000, "could not make two instants under 1 ms apart"
                instants.append(("pair-1", t1, snap))
                instants.append(("pair-2", t2, helpers.snapshot(vol.mount)))
            gate.resume()
        gate.pause()
        for w in writers:
            w.stop_flag.set()
        gate.resume()
        for w in writers:
            w.join(60)
        for w in writers:
            w.close_held()
        t_end = time.time_ns()
        (vol.mount / "after").write_bytes(b"x")
        vol.wait_latest(t_end, timeout=90)
        vol.stop()
    finally:
        for w in writers:
            w.stop_flag.set()
        gate.resume()
        if ticker_fd is not None:
            os.close(ticker_fd)

    segs = vol.ls()["segments"]
    pairs = [(instants[i][1], instants[i + 1][1]) for i in range(len(instants) - 1)
             if instants[i][0] == "pair-1"]
    assert any(s["first_ns"] <= t1 and t2 <= s["last_ns"] for (t1, t2) in pairs for s in segs), \
        f"no pair of sub-millisecond instants fell inside one segment: {pairs}"

    vol.delete_local()
    for n, (label, t, snap) in enumerate(instants):
        target = workdir / f"restore{n}"
        vol.restore(t, target)
        restored = helpers.snapshot(target)
        view = View(vol, t, workdir / f"view{n}")
        try:
            seen = helpers.snapshot(view.mnt)
            what = f"instant {n} ({label}, {fmt_ns(t)})"
            helpers.assert_same_tree(restored, seen, f"view vs restore at {what}")
            helpers.assert_same_tree(snap, seen, f"view vs the live mount at {what}")
            if n == 0:
                assert_read_only(view.mnt)
                # Its stderr is a log, not a terminal: building the tree is
                # reported in plain lines, one closing line per phase.
                log = view.log()
                assert re.search(r"base: done, [1-9]\d* objects", log), f"no closing line for the base:\n{log}"
                assert re.search(r"records: done, [1-9]\d* objects", log), f"no closing line for the records:\n{log}"
        except BaseException:
            view.kill()
            raise
        view.stop()
        helpers.rmtree(target)

    # Same window rules and messages as restore.
    w = vol.ls()["window"]
    c = helpers.rewind("mount", *vol.store_args(), "--at", fmt_ns(w["latest_ns"] + 3600 * NS),
                       workdir / "view-after", env=vol.env(), timeout=60)
    r = vol.restore(w["latest_ns"] + 3600 * NS, workdir / "restore-after", check=False)
    assert c.code != 0 and r.code != 0, f"mount/restore after the window succeeded:\n{c}\n{r}"
    assert r.err.strip().splitlines()[-1].split("error: ", 1)[-1] in c.err, \
        f"mount and restore word the window error differently:\n{c}\n{r}"
    assert not helpers.is_fuse_mounted(workdir / "view-after")


def digest_of(path, chunk=256 << 10):
    import hashlib
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


@pytest.mark.timeout(600)
def test_view_on_s3_cold_small_cache_and_outage(make_s3_volume, workdir, gate):
    vol = make_s3_volume("v")
    rng = random.Random(5)
    contents = {}
    # Files in the source before the start are in the base (chunks in the
    # store); "late" is written afterwards and comes from a segment.
    for name, size in (("big0", 6 * MIB + 123), ("big1", 5 * MIB), ("cut", 8 * MIB), ("small", 3000)):
        contents[name] = rng.randbytes(size)
        (vol.source / name).write_bytes(contents[name])
    vol.start()
    vol.wait_window()
    contents["late"] = rng.randbytes(3 * MIB)
    (vol.mount / "late").write_bytes(contents["late"])
    t = time.time_ns()
    (vol.mount / "after").write_bytes(b"x")
    vol.wait_latest(t, timeout=120)
    vol.stop()
    vol.delete_local()

    # The view reaches S3 through the gate; a 2 MiB cache is smaller than every big file.
    view = View(vol, t, workdir / "view", "--cache-size", str(2 * MIB),
                env={"AWS_ENDPOINT_URL": gate.endpoint})
    try:
        import hashlib
        for name in ("big0", "big1", "small", "late"):
            got = (view.mnt / name).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(contents[name]).digest(), \
                f"{name} read through the view (cold cache smaller than the file) differs"

        fd = os.open(view.mnt / "cut", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == contents["cut"][:4096]
            gate.close()
            off = 6 * MIB + 5
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, off)
            assert e.value.errno == errno.EIO, f"read during the outage: {e.value!r}, expected EIO"
            log = view.log()
            assert "cannot fetch a chunk from the store" in log and "EIO" in log, \
                f"no log line says why the read failed:\n{log[-3000:]}"
            gate.open()
            assert os.pread(fd, 4096, off) == contents["cut"][off:off + 4096], \
                "the read after the store came back gave other bytes"
        finally:
            os.close(fd)
        assert (view.mnt / "cut").read_bytes() == contents["cut"]
    except BaseException:
        view.kill()
        raise
    view.stop()
