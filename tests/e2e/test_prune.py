"""`rewind prune` end to end, each test against file:// and a real S3 server
(moto over HTTP).

One history per backend is built once (module fixture, about a minute): a
volume with four bases, the first two usually in one minute and the others
in later minutes (each base after a kill -9 and restart is a repair base),
writes between them spread over several segments, writes racing the third
base's walk (so its point needs the records the walk overlapped), and the
tree the mount showed at each base's completion and at one instant after
the last base (for the third base, the tree the unpruned store restores
there, since no one can snapshot a mount being written at an instant). Every test prunes its own copy of that
store with a policy of one second of every-instant history and one point a
minute for an hour, so the kept points are: the newest base of each minute
before the last base and every whole minute before it (compacted into
deltas), the last base, and every instant after it. The tree at each whole
minute is what the unpruned store restores there (`minute_refs`).

What each test asserts:
- test_prune_keeps_every_kept_point_exact: the plan (--dry-run, which changes
  nothing) names the expected points (the bases, and whole minutes); after a
  prune with the default grace (which writes deltas) and after a second one
  with --grace 0s every kept point restores exactly the tree the mount showed
  then, and every kept minute the tree the raw segments restored there before
  the prune; verify passes, `ls` shows the window and the minute tier (each
  kept minute inside a listed span), and the store holds fewer segments;
- test_a_time_between_points_is_refused_and_or_earlier_takes_the_earlier:
  a time between two kept points is refused naming both; --or-earlier
  restores the earlier one (as the unpruned store restores it) and says
  which instant it used;
- test_two_concurrent_prunes: while one prune holds the lock a second exits
  non-zero naming the holder's host and pid; the first finishes;
- test_two_prunes_started_together: of two prunes started at once, one
  finishes and the other exits 1 naming it (both back off and retry);
- test_a_base_waits_while_a_prune_holds_the_lock: a base that starts during
  a prune uploads no chunk until the prune is done, then restores exactly;
- test_a_restore_planned_before_the_condemnation_completes: a restore
  planned before a prune (default grace) condemned the segments it reads
  completes exactly; one planned after is refused, unless the instant lies
  in a kept span (a whole minute's state lasts until the next record), when
  it restores the same tree;
- test_prune_racing_a_restore: a restore of the oldest kept point started
  while a prune deletes (grace 0) completes exactly;
- test_prune_racing_a_base_upload: while a base is being uploaded (its
  sidecar stopped mid-walk with SIGSTOP), prunes with --grace 0s delete none
  of its chunks and say why; the base then completes and restores exactly;
- test_kill9_prune_at_random_moments: ten prunes killed at random moments
  (a test-only pause between store changes, deltas included, spreads them
  out); after each, every kept point and every kept minute restores exactly
  and verify passes; the next prune finishes and leaves nothing to do.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import helpers
from conftest import TMP_ROOT
from helpers import NS, fmt_ns, rewind, wait_until
from s3fixtures import S3Volume, s3  # noqa: F401  (module fixture)

MIN = 60 * NS
POLICY = ["--keep-seconds", "1s", "--keep-minutes", "1h", "--keep-hours", "0s", "--keep-days", "0s"]


# --------------------------------------------------------------------------
# Building the history


def write_gen(root: Path, gen: int, rng: random.Random, vol=None, mid=None) -> None:
    """One generation of changes: new files, overwrites, a rename, an
    unlink, a hard link and a symlink, so that replay has work to do.
    Through a mount (`vol` given), the changes are spread over three
    segments: each part waits until the store holds a new segment."""
    d = root / f"g{gen}"
    d.mkdir(exist_ok=True)

    def next_segment():
        if vol is None:
            return
        n = len(vol.ls()["segments"])
        t = time.time_ns()
        (root / "settle").write_text(str(t))
        wait_until(lambda: len(vol.ls()["segments"]) > n, 60, "a new segment", interval=0.05,
                   on_timeout=vol._diag)

    for i in range(6):
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
    next_segment()
    if mid is not None:
        # Nothing is written until the next part: this instant's tree.
        mid.append((time.time_ns(), helpers.snapshot(root)))
    shared = root / "shared"
    with open(shared, "ab") as f:
        f.write(f"generation {gen}\n".encode() * 100)
    os.link(d / "f0", d / "f0.link")
    os.symlink(f"f{gen % 6}", d / "sym")
    next_segment()
    os.rename(d / "f1", d / "f1.moved")
    os.unlink(d / "f2")
    if gen > 1 and (root / f"g{gen - 1}" / "f3").exists():
        with open(root / f"g{gen - 1}" / "f3", "r+b") as f:
            f.seek(1000)
            f.write(rng.randbytes(5000))


class Writer(threading.Thread):
    """Small writes through the mount until stopped: keeps a base walk
    company, so that the base's point needs the records it overlapped."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root = root
        self.stop_flag = threading.Event()
        self.n = 0

    def run(self):
        (self.root / "during").mkdir(exist_ok=True)
        while not self.stop_flag.is_set():
            (self.root / "during" / f"w{self.n % 50}").write_bytes(os.urandom(4096) * (1 + self.n % 3))
            self.n += 1

    def stop(self):
        self.stop_flag.set()
        self.join()


def base_list(vol) -> list[dict]:
    return sorted(vol.ls()["bases"], key=lambda b: b["completed_ns"])


def wait_bases(vol, n: int, timeout: float = 120) -> list[dict]:
    def enough():
        if not vol.alive():
            raise AssertionError(f"`rewind run` exited early\n{vol.log_tail(60)}")
        b = base_list(vol)
        return b if len(b) >= n else None
    return wait_until(enough, timeout, f"{n} bases in the store", interval=0.1, on_timeout=vol._diag)


def settle(vol) -> int:
    """Waits until everything written through the mount so far is in the
    store: one more write, timed after the others, and the window reaching
    it (an idle volume's window ends at its last record)."""
    t = time.time_ns()
    (vol.mount / "settle").write_text(str(t))
    vol.wait_latest(t)
    return t


class History:
    """A store with its kept points: (ns, snapshot) pairs."""

    def __init__(self, backend, vol, points, bases, between, s3server=None):
        self.backend = backend
        self.vol = vol
        self.points = points          # every instant the tests restore: (ns, Snapshot)
        self.bases = bases            # completion instants of the four bases
        self.between = between        # (ns, snapshot) strictly between two coarse points
        self.s3 = s3server

    def copy(self, root: Path):
        """A copy of the store under `root` that a test may prune."""
        root.mkdir(parents=True, exist_ok=True)
        if self.backend == "file":
            v = helpers.Volume(root)
            shutil.rmtree(v.store_dir)
            shutil.copytree(self.vol.store_dir, v.store_dir, symlinks=True)
            return v
        prefix = "c" + re.sub(r"[^a-z0-9]", "", root.name.lower())[-20:] + str(random.randrange(1 << 30))
        v = S3Volume(root, self.s3, self.vol.bucket, prefix=prefix)
        c = self.s3.client()
        for k in self.vol.keys():
            rel = k[len(f"{self.vol.prefix}/"):]
            c.copy_object(Bucket=self.vol.bucket, Key=f"{prefix}/{rel}",
                          CopySource={"Bucket": self.vol.bucket, "Key": k})
        return v


def expected_points(bases: list[int], anchor: int) -> list[int]:
    """The coarse points the policy keeps: the newest base of each minute
    among the bases before the anchor (the seconds tier starts at the anchor)."""
    newest = {}
    for b in bases:
        if b < anchor:
            newest[b // MIN] = max(newest.get(b // MIN, 0), b)
    return sorted(newest.values())


@pytest.fixture(scope="module", params=["file", "s3"])
def history(request, s3):  # noqa: F811
    root = TMP_ROOT / f"prune-history-{request.param}"
    if root.exists():
        helpers.rmtree(root)
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    if request.param == "file":
        vol = helpers.Volume(root)
    else:
        bucket = f"prune-history-{random.randrange(1 << 30)}"
        s3.create_bucket(bucket)
        vol = S3Volume(root, s3, bucket, prefix="hist")
    rng = random.Random(13)
    try:
        snaps = []
        write_gen(vol.source, 1, rng)
        vol.start()
        b = wait_bases(vol, 1)
        snaps.append((b[-1]["completed_ns"], helpers.snapshot(vol.mount)))
        gen_start = {}
        mid = []
        for n, gen in ((2, 2), (3, 3), (4, 4)):
            if n == 3:
                # The third base in a later minute than the second, so the
                # minute tier has at least two points.
                second = snaps[-1][0]
                wait_until(lambda: time.time_ns() // MIN > second // MIN, 70,
                           "the next minute", interval=0.2)
            gen_start[gen] = time.time_ns()
            write_gen(vol.mount, gen, rng, vol, mid if gen == 3 else None)
            settle(vol)
            vol.kill9()
            vol.start()
            if n == 3:
                # Writes while the repair base walks: its point needs the
                # records the walk overlapped. What the mount showed at its
                # completion is what the unpruned store restores there.
                w = Writer(vol.mount)
                w.start()
                b = wait_bases(vol, n)
                w.stop()
                settle(vol)
                ref = root / "ref3"
                vol.restore(b[-1]["completed_ns"], ref)
                snaps.append((b[-1]["completed_ns"], helpers.snapshot(ref)))
                helpers.rmtree(ref)
                continue
            b = wait_bases(vol, n)
            snaps.append((b[-1]["completed_ns"], helpers.snapshot(vol.mount)))
        write_gen(vol.mount, 5, rng, vol)
        settle(vol)
        t5 = time.time_ns()
        snap5 = helpers.snapshot(vol.mount)
        vol.stop()
        # A clean stop stores a last heartbeat: the window reaches t5.
        assert vol.window()["latest_ns"] >= t5, vol.ls()["window"]
        bases = [s[0] for s in snaps]
        assert bases == [b["completed_ns"] for b in base_list(vol)]
        coarse = expected_points(bases, bases[-1])
        assert len(coarse) >= 2, f"bases {bases}"
        points = [s for s in snaps if s[0] in coarse] + [snaps[-1], (t5, snap5)]
        # The last two coarse points are the second and third bases (the
        # minute turned between them); until the third generation's first
        # write the tree was the second base's.
        assert coarse[-2:] == bases[1:3], (coarse, bases)
        between = ((bases[1] + gen_start[3]) // 2, snaps[1][1])
        h = History(request.param, vol, points, bases, between, s3)
        # An instant in the third generation's writes: not kept.
        h.condemned_point = mid[0]
        yield h
    finally:
        vol.cleanup()


# --------------------------------------------------------------------------
# Helpers


def prune(vol, *args, env=None, timeout=300) -> helpers.Cmd:
    return rewind("prune", *vol.store_args(), *POLICY, *args, env=vol.env(env), timeout=timeout)


def prune_json(vol, *args, env=None) -> dict:
    c = prune(vol, "--json", *args, env=env)
    assert c.code == 0, f"prune failed:\n{c}"
    return json.loads(c.out)


def spawn_prune(vol, *args, env=None) -> subprocess.Popen:
    argv = [helpers.REWIND_BIN, "prune", *vol.store_args(), *POLICY, *args]
    return subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=vol.env(env))


def store_objects(vol) -> dict[str, int]:
    """key (relative to the volume) -> size, read straight from the store."""
    if isinstance(vol, S3Volume):
        c = vol.s3.client()
        out, token = {}, None
        pre = f"{vol.prefix}/{vol.name}/"
        while True:
            kw = {"Bucket": vol.bucket, "Prefix": pre}
            if token:
                kw["ContinuationToken"] = token
            r = c.list_objects_v2(**kw)
            for o in r.get("Contents", []):
                out[o["Key"][len(pre):]] = o["Size"]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]
    base = vol.store_dir / vol.name
    out = {}
    for dp, _, fns in os.walk(base):
        for n in fns:
            if not n.startswith(".tmp."):
                p = Path(dp) / n
                out[str(p.relative_to(base))] = p.stat().st_size
    return out


def check_points(vol, points, where: Path, what: str) -> None:
    """Every kept point restores exactly what the mount showed then, from
    the store alone, and verify passes."""
    for i, (ns, snap) in enumerate(points):
        target = where / f"r{i}"
        if target.exists():
            helpers.rmtree(target)
        vol.restore(ns, target)
        helpers.assert_same_tree(snap, helpers.snapshot(target), f"{what}: restore at {fmt_ns(ns)}")
        helpers.rmtree(target)
    c = vol.verify()
    assert c.code == 0, f"{what}: verify failed:\n{c}"


def minute_refs(history, workdir: Path) -> list[tuple[int, object]]:
    """The whole minutes a prune keeps, each with the tree the unpruned
    history store (raw segments) restores there."""
    dry = prune_json(history.copy(workdir / "dry"), "--dry-run")
    bases = set(expected_points(history.bases, history.bases[-1]))
    whole = [p["ns"] for p in dry["points"] if p["tier"] == "minutes" and p["ns"] not in bases]
    assert all(m % MIN == 0 for m in whole), dry["points"]
    out = []
    for m in whole:
        t = workdir / "minute-ref"
        history.vol.restore(m, t)
        out.append((m, helpers.snapshot(t)))
        helpers.rmtree(t)
    return out


def kinds(report: dict, what: str) -> dict[str, int]:
    return {k: v[what]["objects"] for k, v in report["kinds"].items()}


# --------------------------------------------------------------------------
# Tests


def test_prune_keeps_every_kept_point_exact(history, workdir):
    vol = history.copy(workdir / "v")
    before = store_objects(vol)

    dry = prune_json(vol, "--dry-run")
    assert store_objects(vol) == before, "--dry-run changed the store"
    minutes = [p["ns"] for p in dry["points"] if p["tier"] == "minutes"]
    coarse = expected_points(history.bases, history.bases[-1])
    assert set(coarse) <= set(minutes), dry["points"]
    assert all(m % MIN == 0 for m in minutes if m not in coarse), dry["points"]
    seconds = [p for p in dry["points"] if p["tier"] == "seconds"]
    assert len(seconds) == 1 and seconds[0]["ns"] == history.bases[-1], dry["points"]
    text = prune(vol, "--dry-run")
    assert text.code == 0 and "dry run" in text.out and "minutes tier" in text.out, text
    refs = minute_refs(history, workdir)
    assert [m for m, _ in refs] == [m for m in minutes if m not in coarse], (refs, minutes)

    # Default grace: compacted, condemned, nothing deleted yet, every kept
    # point exact, every kept minute as the raw segments restored it.
    first = prune_json(vol)
    # Minutes with records since their base are compacted into deltas (a
    # minute with none restores from its base alone).
    wrote = first["compaction"]["deltas_written"]["objects"]
    assert (wrote > 0) == (dry["compaction"]["jobs"] > 0), (dry["compaction"], first["compaction"])
    assert kinds(first, "deleted")["segments"] == 0 and kinds(first, "deleted")["bases"] == 0, first
    assert kinds(first, "condemned")["segments"] > 0, first
    check_points(vol, history.points + refs, workdir, "after a prune with the default grace")
    ls = vol.ls()
    spans = [(p["ns"], p["until_ns"]) for p in ls["points"]]
    for m in minutes:
        assert any(a <= m <= b for a, b in spans), (fmt_ns(m), ls["points"])
    assert ls["window"]["earliest_ns"] == history.bases[-1], ls["window"]
    assert any(t["tier"] == "minutes" and t["points"] >= len(minutes) - 1 for t in ls["tiers"]), ls["tiers"]
    text_ls = rewind("ls", *vol.store_args(), env=vol.env())
    assert "minutes tier" in text_ls.out and "every instant from" in text_ls.out, text_ls

    # Grace 0: what was condemned goes now.
    second = prune_json(vol, "--grace", "0s")
    assert kinds(second, "deleted")["segments"] == kinds(first, "condemned")["segments"], second
    assert kinds(second, "deleted")["chunks"] > 0 or kinds(first, "condemned")["chunks"] == 0, second
    after = store_objects(vol)
    seg_before = sum(1 for k in before if k.startswith("seg/"))
    seg_after = sum(1 for k in after if k.startswith("seg/"))
    assert seg_after == seg_before - kinds(first, "condemned")["segments"], (seg_before, seg_after)
    assert not any(k.startswith("condemned/") for k in after), sorted(after)
    assert not any(k.startswith("lock/") for k in after), sorted(after)
    check_points(vol, history.points + refs, workdir, "after the deletes")
    print(f"\nFIGURES {history.backend}: compaction {first['compaction']}; before {len(before)} objects, {sum(before.values())} bytes; "
          f"after {len(after)} objects, {sum(after.values())} bytes; "
          f"segments {seg_before} -> {seg_after}; "
          f"chunks {sum(1 for k in before if k.startswith('chunk/'))} -> {sum(1 for k in after if k.startswith('chunk/'))}")
    # Nothing left to do.
    third = prune_json(vol, "--grace", "0s")
    assert sum(kinds(third, "condemned").values()) == 0 and kinds(third, "deleted")["segments"] == 0, third


def test_a_time_between_points_is_refused_and_or_earlier_takes_the_earlier(history, workdir):
    vol = history.copy(workdir / "v")
    prune_json(vol)
    # The widest stretch between two kept spans, and an instant in it.
    pts = sorted(vol.ls()["points"], key=lambda p: p["ns"])
    gaps = [(a, b) for a, b in zip(pts, pts[1:]) if b["ns"] - a["until_ns"] > 2]
    assert gaps, pts
    earlier, later = max(gaps, key=lambda g: g[1]["ns"] - g[0]["until_ns"])
    ns = (earlier["until_ns"] + later["ns"]) // 2
    c = vol.restore(ns, workdir / "t", check=False)
    assert c.code != 0, c
    assert earlier["until"] in c.err and later["at"] in c.err and "--or-earlier" in c.err, c
    assert not (workdir / "t").exists() or not any((workdir / "t").iterdir()), "a refused restore wrote"
    c = vol.restore(ns, workdir / "t2", "--or-earlier")
    assert earlier["until"] in c.out and "--or-earlier" in c.out, c
    # What the unpruned store restores at that instant.
    history.vol.restore(earlier["until_ns"], workdir / "ref")
    helpers.assert_same_tree(helpers.snapshot(workdir / "ref"), helpers.snapshot(workdir / "t2"),
                             "restore --or-earlier")


def test_two_concurrent_prunes(history, workdir):
    vol = history.copy(workdir / "v")
    first = spawn_prune(vol, "--grace", "0s", env={"REWIND_TEST_PRUNE_PAUSE": "100ms"})
    try:
        wait_until(lambda: any(k.startswith("lock/") for k in store_objects(vol)), 30,
                   "the first prune's lock", on_timeout=lambda: first.poll())
        second = prune(vol, "--grace", "0s")
        assert second.code != 0, second
        host = os.uname().nodename
        assert "another prune holds" in second.err and f"pid {first.pid}" in second.err and host in second.err, second
        assert first.poll() is None, "the first prune should still be running"
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, f"first prune: {first.returncode}\n{out}\n{err}"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    check_points(vol, history.points, workdir, "after the concurrent prunes")


def test_two_prunes_started_together(history, workdir):
    vol = history.copy(workdir / "v")
    env = {"REWIND_TEST_PRUNE_PAUSE": "100ms"}
    a, b = spawn_prune(vol, "--grace", "0s", env=env), spawn_prune(vol, "--grace", "0s", env=env)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes == [0, 1], f"exit codes {codes}: {outs}"
    loser = a if a.returncode == 1 else b
    winner = b if loser is a else a
    err = outs[0][1] if loser is a else outs[1][1]
    assert f"pid {winner.pid}" in err, err
    check_points(vol, history.points, workdir, "after two prunes started together")


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_base_waits_while_a_prune_holds_the_lock(backend, workdir, s3):  # noqa: F811
    """The other half of the in-flight protocol: a base that starts while a
    prune holds the volume writes its marker, then waits for the prune to
    finish before it checks or uploads any chunk."""
    if backend == "file":
        vol = helpers.Volume(workdir / "v")
    else:
        bucket = f"base-wait-{random.randrange(1 << 30)}"
        s3.create_bucket(bucket)
        vol = S3Volume(workdir / "v", s3, bucket)
    rng = random.Random(3)
    for i in range(4):
        (vol.source / f"f{i}").write_bytes(rng.randbytes(300_000))
    try:
        p = spawn_prune(vol, "--grace", "0s", env={"REWIND_TEST_PRUNE_PAUSE": "2s"})
        wait_until(lambda: any(k.startswith("lock/") for k in store_objects(vol)), 30, "the prune's lock")
        vol.start()
        wait_until(lambda: "a prune holds the store" in vol.log(), 30, "the base to wait for the prune",
                   on_timeout=vol._diag)
        assert p.poll() is None, "the prune finished too early for this test"
        assert not any(k.startswith("chunk/") for k in store_objects(vol)), "a chunk went up under the lock"
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"{out}\n{err}"
        b = wait_bases(vol, 1)
        snap = helpers.snapshot(vol.mount)
        vol.stop()
        check_points(vol, [(b[-1]["completed_ns"], snap)], workdir, "base that waited for a prune")
    finally:
        vol.cleanup()


def test_a_restore_planned_before_the_condemnation_completes(history, workdir):
    """The grace period: a restore planned before a prune condemned what it
    reads (here stopped with SIGSTOP right after planning, while the prune
    runs) still finds every object and restores exactly; a restore planned
    after the condemnation is refused instead."""
    vol = history.copy(workdir / "v")
    ns, snap = history.condemned_point
    target = workdir / "t"
    argv = [helpers.REWIND_BIN, "restore", *vol.store_args(), "--at", fmt_ns(ns), "--target", target]
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=vol.env())
    try:
        line = p.stderr.readline()
        assert "restoring lineage" in line, line
        os.kill(p.pid, signal.SIGSTOP)
        try:
            rep = prune_json(vol)
            assert kinds(rep, "condemned")["segments"] > 0, rep
            late = vol.restore(ns, workdir / "t2", check=False)
            kept = any(p["ns"] <= ns <= p["until_ns"] for p in vol.ls()["points"])
            if kept:
                # A whole minute's state lasted over this instant.
                assert late.code == 0, late
                helpers.assert_same_tree(snap, helpers.snapshot(workdir / "t2"), "kept span")
            else:
                assert late.code != 0 and "between two kept points" in late.err, late
        finally:
            os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, f"{out}\n{err}"
    helpers.assert_same_tree(snap, helpers.snapshot(target), "restore planned before the condemnation")


def test_prune_racing_a_restore(history, workdir):
    vol = history.copy(workdir / "v")
    oldest_ns, oldest_snap = history.points[0]
    def segments():
        return sum(1 for k in store_objects(vol) if k.startswith("seg/"))
    before = segments()
    # The prune deletes a batch every 50 ms and, once done, holds its lock
    # until `hold` exists: the restore below starts after its first
    # deletion and ends before the prune does, on a slow machine too, so
    # every read of the restore meets a store mid-prune.
    hold = workdir / "prune-may-finish"
    p = spawn_prune(vol, "--grace", "0s",
                    env={"REWIND_TEST_PRUNE_PAUSE": "50ms", "REWIND_TEST_PRUNE_HOLD": str(hold)})
    try:
        wait_until(lambda: segments() < before or p.poll() is not None, 60,
                   "the prune to delete a segment")
        assert p.poll() is None, f"the prune ended before the restore started:\n{p.communicate()}"
        vol.restore(oldest_ns, workdir / "t")
        assert p.poll() is None, f"the prune ended before the restore did, despite the hold:\n{p.communicate()}"
        hold.touch()
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{out}\n{err}"
    finally:
        hold.touch()
        if p.poll() is None:
            p.kill()
            p.wait()
    helpers.assert_same_tree(oldest_snap, helpers.snapshot(workdir / "t"), "restore racing a prune")
    assert segments() < before, "the racing prune deleted nothing"
    check_points(vol, history.points, workdir, "after the race")


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_prune_racing_a_base_upload(backend, workdir, s3):  # noqa: F811
    if backend == "file":
        vol = helpers.Volume(workdir / "v")
    else:
        bucket = f"base-race-{random.randrange(1 << 30)}"
        s3.create_bucket(bucket)
        vol = S3Volume(workdir / "v", s3, bucket)
    rng = random.Random(7)
    for i in range(48):
        (vol.source / f"big{i}").write_bytes(rng.randbytes(2 << 20))
    try:
        vol.start()

        def in_flight():
            keys = store_objects(vol)
            return (any(k.startswith("inflight/") for k in keys)
                    and sum(1 for k in keys if k.startswith("chunk/")) >= 4
                    and not any(k.startswith("base/") for k in keys))
        wait_until(in_flight, 60, "the base to be uploading", interval=0.01)
        os.kill(vol.proc.pid, signal.SIGSTOP)
        try:
            held = store_objects(vol)
            assert not any(k.startswith("base/") for k in held), "the base completed before SIGSTOP"
            chunks = {k for k in held if k.startswith("chunk/")}
            first = prune(vol, "--grace", "0s", "--json")
            second = prune(vol, "--grace", "0s", "--json")
            for c in (first, second):
                assert c.code == 0, c
            rep = json.loads(second.out)
            assert any("being uploaded" in n for n in rep["notes"]), rep["notes"]
            assert kinds(rep, "deleted")["chunks"] == 0, rep
            missing = chunks - set(store_objects(vol))
            assert not missing, f"prune deleted {len(missing)} chunks of the base in flight"
        finally:
            os.kill(vol.proc.pid, signal.SIGCONT)
        b = wait_bases(vol, 1)
        snap = helpers.snapshot(vol.mount)
        vol.stop()
        # The base's marker is done with; the next prune removes it and
        # sweeps nothing the base names.
        prune_json(vol, "--grace", "0s")
        assert not any(k.startswith("inflight/") for k in store_objects(vol))
        check_points(vol, [(b[-1]["completed_ns"], snap)], workdir, "base raced by prunes")
    finally:
        vol.cleanup()


def test_kill9_prune_at_random_moments(history, workdir):
    vol = history.copy(workdir / "v")
    refs = minute_refs(history, workdir)
    rng = random.Random(int(os.environ.get("REWIND_PRUNE_SEED", "99")))
    pause = 0.05
    kills = 0
    for i in range(10):
        dry = prune_json(vol, "--dry-run", "--grace", "0s")
        # Roughly how long a paced prune runs: one pause per change.
        changes = sum(v["condemned"]["objects"] + v["deleted"]["objects"] for v in dry["kinds"].values())
        span = max(0.3, changes * pause)
        p = spawn_prune(vol, "--grace", "0s", env={"REWIND_TEST_PRUNE_PAUSE": f"{int(pause * 1000)}ms"})
        time.sleep(rng.uniform(0.02, span))  # the random moment itself, not a wait for a condition
        if p.poll() is None:
            p.kill()
            kills += 1
        out, err = p.communicate(timeout=300)
        assert p.returncode in (0, -signal.SIGKILL), f"prune {i}: {p.returncode}\n{out}\n{err}"
        check_points(vol, history.points + refs, workdir, f"after prune {i} was killed")
    assert kills >= 5, f"only {kills} of 10 prunes were killed before they finished"
    last = prune_json(vol, "--grace", "0s")
    assert all(v["condemned"]["objects"] == 0 for k, v in last["kinds"].items() if k != "markers"), last
    final = prune_json(vol, "--grace", "0s")
    assert sum(v["deleted"]["objects"] for k, v in final["kinds"].items() if k != "markers") == 0, final
    keys = store_objects(vol)
    assert not any(k.startswith(("lock/", "condemned/")) for k in keys), sorted(keys)
    check_points(vol, history.points + refs, workdir, "after the final prune")
