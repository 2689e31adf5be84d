"""Model-based differential test through a real FUSE mount (issue 2).

Writer threads apply random operations to the mount and, identically, to a
shadow tree on the native filesystem (workload.py): every result and errno
must agree, and at every instant the mount's tree must equal the shadow's.
The coordinator pauses all writers at a barrier, snapshots the mount (the
reference), records T = time.time_ns() and lets them go on; some instants
come in pairs less than a millisecond apart around one small write. The
workload starts as soon as the mount is live, on a pre-filled source, so it
races the base snapshot. Then the daemon is stopped, the source (with the
journal) and HOME (any local catalog) are deleted, and every instant is
restored from the store alone and compared byte for byte and attribute by
attribute, mtimes of regular files included.

Seeds: REWIND_SEEDS="1,2,3" (default "1,2"); scripts/many-seeds runs many.
"""

from __future__ import annotations

import os
import random
import time

import pytest

import helpers
import workload
from helpers import NS, fmt_ns

SEEDS = [int(s) for s in os.environ.get("REWIND_SEEDS", "1,2").replace(" ", "").split(",") if s]
WRITERS = 3
SINGLE_INSTANTS = 6
PAIRS = 4


def subset(snap: helpers.Snapshot, prefixes) -> helpers.Snapshot:
    keep = {p: e for p, e in snap.entries.items() if p.split("/")[0] in prefixes}
    links = frozenset(g for g in snap.links if all(p.split("/")[0] in prefixes for p in g))
    return helpers.Snapshot(keep, links)


def prefill(source, rng):
    for i in range(WRITERS):
        workload.prefill_writer_dir(source, i, rng)
    # Enough files that the base walk takes a while, so writers race it.
    for d in range(12):
        for k in range(100):
            helpers.fill_random(source / "bulk" / f"d{d}" / f"f{k}", rng.randrange(0, 6000), rng)
    for k in range(4):
        helpers.fill_random(source / "bulk" / f"big{k}", 3 << 20, rng)
    (source / "coord").mkdir()
    (source / "coord" / "ticker").write_bytes(b"." * 64)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", SEEDS)
def test_differential_restore_matches_mount(make_volume, workdir, seed):
    rng = random.Random(seed)
    vol = make_volume("v")
    shadow = workdir / "shadow"
    shadow.mkdir()
    prefill(vol.source, rng)
    for i in range(WRITERS):
        assert os.system(f"cp -a {vol.source}/w{i} {shadow}/w{i}") == 0
    wnames = {f"w{i}" for i in range(WRITERS)}
    assert_model = lambda msg: helpers.assert_same_tree(
        subset(helpers.snapshot(shadow), wnames), subset(helpers.snapshot(vol.mount), wnames), msg, mtime=False)

    gate = workload.Gate()
    writers = [workload.Writer(i, seed, str(vol.mount), str(shadow), gate) for i in range(WRITERS)]
    for w in writers:
        w.start()

    cache = helpers.SnapshotCache()
    instants: list[tuple[str, int, helpers.Snapshot]] = []
    pairs: list[tuple[int, int]] = []
    ticker_fd = None

    def check_writers():
        for w in writers:
            assert w.crash is None, f"writer {w.name} crashed:\n{w.crash}\n{vol.log_tail()}"

    def counts():
        return {k: sum(w.counts[k] for w in writers) for k in workload.WEIGHTS}

    def pause_and_snapshot():
        gate.pause()
        check_writers()
        snap = helpers.snapshot(vol.mount, cache)
        assert ".rewind" not in snap.entries, "the journal directory is visible through the mount"
        return snap

    try:
        vol.start()
        for w in writers:
            w.go.set()  # the workload races the base snapshot from here on
        t_live = time.time_ns()
        window = vol.wait_window(timeout=180)
        ops_before_window = sum(w.attempts for w in writers)
        assert window["earliest_ns"] >= t_live - 5 * NS, f"window opened before the daemon started? {window}"

        ticker_fd = os.open(vol.mount / "coord" / "ticker", os.O_WRONLY)
        tick = [0]

        def small_op():
            tick[0] += 1
            os.pwrite(ticker_fd, b"%08d" % tick[0], (tick[0] % 8) * 8)

        plan = ["single"] * SINGLE_INSTANTS + ["pair"] * PAIRS
        rng.shuffle(plan)
        deadline = time.monotonic() + 240
        k = 0
        while k < len(plan) or min(counts().values()) < workload.MIN_COUNT:
            assert time.monotonic() < deadline, f"workload did not reach the minimum counts: {counts()}"
            kind = plan[k] if k < len(plan) else "single"
            k += 1
            # Let the writers work for a random while (this is the workload, not a wait).
            time.sleep(rng.uniform(0.1, 0.6))
            check_writers()
            if kind == "single":
                snap = pause_and_snapshot()
                t = time.time_ns()
                assert_model(f"mount vs native model at instant {len(instants)}")
                instants.append(("single", t, snap))
                gate.resume()
            else:
                gate.pause()
                check_writers()
                small_op()  # A: so that one segment is likely to span the pair
                s1 = helpers.snapshot(vol.mount, cache)
                for _attempt in range(20):
                    t1 = time.time_ns()
                    small_op()
                    t2 = time.time_ns()
                    if t2 - t1 < 1_000_000:
                        break
                    s1 = helpers.snapshot(vol.mount, cache)  # retry: the op took >= 1 ms
                assert t2 - t1 < 1_000_000, f"could not make a pair of instants under 1 ms apart ({t2 - t1} ns)"
                s2 = helpers.snapshot(vol.mount, cache)
                small_op()  # C
                instants.append(("pair-1", t1, s1))
                instants.append(("pair-2", t2, s2))
                pairs.append((t1, t2))
                gate.resume()

        # Final instant with everything quiet, then one trailing op so that
        # a segment timed after it exists, and wait for the store to hold it.
        gate.pause()
        for w in writers:
            w.stop_flag.set()
        gate.resume()
        for w in writers:
            w.join(60)
            assert not w.is_alive(), f"{w.name} did not stop"
        check_writers()
        for w in writers:
            w.close_held()
        final = helpers.snapshot(vol.mount, cache)
        t_final = time.time_ns()
        instants.append(("final", t_final, final))
        assert_model("mount vs native model at the end")
        small_op()
        os.close(ticker_fd)
        ticker_fd = None
        after = helpers.snapshot(vol.mount)
        vol.wait_latest(t_final, timeout=90)
        vol.stop()
    finally:
        for w in writers:
            w.stop_flag.set()
        gate.resume()
        if ticker_fd is not None:
            os.close(ticker_fd)

    mismatches = [m for w in writers for m in w.mismatches]
    assert not mismatches, f"{len(mismatches)} operations behaved differently on the mount:\n" + "\n".join(mismatches[:30])
    c = counts()
    low = {k: v for k, v in c.items() if v < workload.MIN_COUNT}
    assert not low, f"operation kinds below the minimum of {workload.MIN_COUNT}: {low} (all: {c})"
    assert ops_before_window >= 1, "no operation raced the base snapshot"

    info = vol.ls()
    w = info["window"]
    assert w is not None
    for label, t, _ in instants:
        assert w["earliest_ns"] <= t <= w["latest_ns"], f"instant {label} {fmt_ns(t)} outside the window {w}"
    segs = info["segments"]
    inside = [(t1, t2) for (t1, t2) in pairs if any(s["first_ns"] <= t1 and t2 <= s["last_ns"] for s in segs)]
    assert inside, f"no pair of sub-millisecond instants fell inside one segment: pairs {pairs}"

    # The store alone must suffice.
    vol.delete_local()

    for n, (label, t, snap) in enumerate(instants):
        target = workdir / f"restore{n}"
        vol.restore(t, target)
        helpers.assert_same_tree(snap, helpers.snapshot(target),
                                 f"restore at instant {n} ({label}, {fmt_ns(t)}) vs the mount then")
        helpers.rmtree(target)

    target = workdir / "restore-latest"
    vol.restore("latest", target)
    helpers.assert_same_tree(after, helpers.snapshot(target), "restore at latest vs the mount at the end")

    # A non-empty target is refused without --force, accepted with it.
    (target / "stray").write_bytes(b"x")
    c = vol.restore(instants[0][1], target, check=False)
    assert c.code != 0, f"restore into a non-empty target without --force succeeded:\n{c}"
    assert (target / "stray").read_bytes() == b"x"
    vol.restore(instants[0][1], target, force=True)
    helpers.assert_same_tree(instants[0][2], helpers.snapshot(target), "restore --force over a non-empty target")

    # Times outside the window fail and name the window.
    for label, t in (("before", w["earliest_ns"] - 30 * NS), ("after", w["latest_ns"] + 3600 * NS)):
        tgt = workdir / f"outside-{label}"
        c = vol.restore(t, tgt, check=False)
        assert c.code != 0, f"restore {label} the window succeeded:\n{c}"
        msg = c.out + c.err
        assert w["earliest"][:19] in msg or w["latest"][:19] in msg, \
            f"restore {label} the window does not name the window:\n{c}"
        assert not tgt.exists() or not os.listdir(tgt), f"restore {label} the window wrote into the target"


def _nofile_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-files limit in /proc/PID/limits")


@pytest.mark.timeout(600)
def test_more_files_than_the_daemon_has_descriptors(make_volume, workdir):
    """An application may create more files than the daemon's RLIMIT_NOFILE:
    the mount must not run out of descriptors (EMFILE) on their behalf."""
    vol = make_volume("v")
    vol.start()
    vol.wait_window()
    limit = _nofile_limit(vol.proc.pid)
    n = min(limit + 2000, 70000)
    d = vol.mount / "many"
    d.mkdir()
    for k in range(n):
        try:
            fd = os.open(d / f"f{k}", os.O_CREAT | os.O_WRONLY, 0o644)
        except OSError as e:
            held = len(os.listdir(f"/proc/{vol.proc.pid}/fd"))
            raise AssertionError(f"creating file {k} of {n} through the mount failed with {e!r}; the daemon "
                                 f"holds {held} descriptors (limit {limit})") from None
        try:
            os.write(fd, b"%d" % k)
        finally:
            os.close(fd)
    assert len(os.listdir(d)) == n
    t = time.time_ns()
    (vol.mount / "after").write_bytes(b"x")
    vol.wait_latest(t, timeout=120)
    vol.stop()
    vol.delete_local()
    target = workdir / "r"
    vol.restore(t, target)
    names = os.listdir(target / "many")
    assert len(names) == n, f"restored {len(names)} of {n} files"
    assert (target / "many" / f"f{n - 1}").read_bytes() == b"%d" % (n - 1)
