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

import json
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
    os.setxattr(source / "coord", "user.pair", b"p")
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
                s1 = helpers.snapshot(vol.mount, cache)
                for _attempt in range(20):
                    # A and C rewrite an xattr with the value it has: records
                    # that change nothing compared, right before T1 and right
                    # after T2, so that one segment spans the pair.
                    os.setxattr(vol.mount / "coord", "user.pair", b"p")  # A
                    t1 = time.time_ns()
                    small_op()  # B
                    t2 = time.time_ns()
                    os.setxattr(vol.mount / "coord", "user.pair", b"p")  # C
                    if t2 - t1 < 1_000_000:
                        break
                    s1 = helpers.snapshot(vol.mount, cache)  # retry: B took >= 1 ms
                assert t2 - t1 < 1_000_000, f"could not make a pair of instants under 1 ms apart ({t2 - t1} ns)"
                s2 = helpers.snapshot(vol.mount, cache)
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

    restored = []
    for n, (label, t, snap) in enumerate(instants):
        target = workdir / f"restore{n}"
        vol.restore(t, target)
        restored.append(helpers.snapshot(target))
        helpers.assert_same_tree(snap, restored[-1],
                                 f"restore at instant {n} ({label}, {fmt_ns(t)}) vs the mount then")
        helpers.rmtree(target)

    # `rewind diff` between random pairs of instants (and one sub-millisecond
    # pair) equals the difference of the two restored trees.
    picks = [tuple(sorted(rng.sample(range(len(instants)), 2))) for _ in range(4)]
    picks.append(next((i, i + 1) for i, (label, _, _) in enumerate(instants) if label == "pair-1"))
    picks.append((0, len(instants) - 1))
    for i, j in picks:
        check_diff(vol, instants[i][1], instants[j][1], restored[i], restored[j], f"instants {i} and {j}")
    check_diff_errors(vol, instants[0][1], instants[-1][1], w)

    # `restore --path` gives the same sub-trees as a full restore.
    for n in rng.sample(range(len(instants)), 2):
        check_path_restore(vol, workdir, instants[n][1], restored[n], rng, f"instant {n}")

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


def _under(p: str, roots) -> bool:
    return any(p == r or p.startswith(r + "/") for r in roots)


def run_diff(vol, t1, t2, *extra):
    c = helpers.rewind("diff", *vol.store_args(), "--from", fmt_ns(t1), "--to", fmt_ns(t2), *extra,
                       env=vol.env(), timeout=300)
    return c


def check_diff(vol, t1, t2, s1: helpers.Snapshot, s2: helpers.Snapshot, what: str):
    """Every change `rewind diff -o json` reports is real, and every
    difference between the two restored trees is reported (paths under a
    renamed directory move with it; a path whose file was replaced is
    covered by the change that put the new file there)."""
    c = run_diff(vol, t1, t2, "-o", "json")
    assert c.code == 0, f"diff {what} failed:\n{c}"
    rep = json.loads(c.out)
    by = {}
    for ch in rep["changes"]:
        by.setdefault(ch["change"], []).append(ch)
    paths = lambda kind, key="paths": {p for ch in by.get(kind, []) for p in ch[key]}
    created, deleted = paths("created"), paths("deleted")
    moved_to, moved_from = paths("renamed"), paths("renamed", "from")
    dirs_to = {p for ch in by.get("renamed", []) if ch["kind"] == "dir" for p in ch["paths"]}
    dirs_from = {p for ch in by.get("renamed", []) if ch["kind"] == "dir" for p in ch["from"]}
    new_file = created | moved_to
    e1, e2 = s1.entries, s2.entries
    errs = []
    # What diff says happened did happen.
    for p in created | moved_to:
        if p not in e2:
            errs.append(f"reported at --to but absent there: {p}")
    for p in deleted | moved_from:
        if p not in e1:
            errs.append(f"reported at --from but absent there: {p}")
    for kind, field in (("mode", "mode"), ("owner", "uid")):
        for ch in by.get(kind, []):
            p = ch["path"]
            if p in e1 and p in e2 and not _under(p, dirs_to | dirs_from) and p not in moved_to:
                a, b = e1[p], e2[p]
                same = (a.mode == b.mode) if kind == "mode" else ((a.uid, a.gid) == (b.uid, b.gid))
                if same:
                    errs.append(f"{kind} change reported for {p}, but it is the same")
    # Every difference of the restored trees is reported.
    for p in sorted(set(e2) - set(e1)):
        if p not in new_file and not _under(p, dirs_to):
            errs.append(f"new at --to, not reported: {p}")
    for p in sorted(set(e1) - set(e2)):
        if p not in deleted | moved_from and not _under(p, dirs_from):
            errs.append(f"gone at --to, not reported: {p}")
    rows = {(ch["change"], p) for ch in rep["changes"] for p in ch["paths"]}
    for p in sorted(set(e1) & set(e2)):
        if p in new_file or _under(p, dirs_to | dirs_from):
            continue
        a, b = e1[p], e2[p]
        if a.kind != b.kind:
            errs.append(f"{p} changed kind ({a.kind} -> {b.kind}), not reported")
            continue
        data = (a.digest, a.size, a.target) != (b.digest, b.size, b.target) or \
            (a.kind == "file" and a.mtime_ns != b.mtime_ns)
        checks = [("modified", data), ("mode", a.mode != b.mode),
                  ("owner", (a.uid, a.gid) != (b.uid, b.gid)), ("xattrs", a.xattrs != b.xattrs)]
        for kind, differs in checks:
            if differs and (kind, p) not in rows:
                errs.append(f"{p}: {kind} differs between the restores, not reported")
    assert not errs, f"diff {what} ({fmt_ns(t1)} .. {fmt_ns(t2)}) disagrees with the restores:\n  " + \
        "\n  ".join(errs[:40]) + f"\n{c.out[:3000]}"
    # The table form reports the same number of changes.
    t = run_diff(vol, t1, t2)
    assert t.code == 0, f"diff {what} as a table failed:\n{t}"
    rows = [l for l in t.out.splitlines()[2:] if l.split()[:1] and l.split()[0] in
            ("created", "deleted", "renamed", "modified", "mode", "owner", "xattrs")]
    assert len(rows) == len(rep["changes"]), f"table and JSON differ:\n{t.out[:3000]}"


def check_diff_errors(vol, t1, t2, window):
    c = run_diff(vol, t2, t1)
    assert c.code != 0 and "before --from" in c.err, f"diff with --to before --from:\n{c}"
    c = run_diff(vol, window["earliest_ns"] - 30 * NS, t2)
    assert c.code != 0 and (window["earliest"][:19] in c.err or window["latest"][:19] in c.err), \
        f"diff from outside the window does not name the window:\n{c}"
    c = run_diff(vol, t1, t2, "--path", "no/such/path")
    assert c.code != 0 and "no/such/path" in c.err and "neither" in c.err, f"diff of a missing --path:\n{c}"
    c = run_diff(vol, t1, t2, "--path", "w0", "-o", "json")
    assert c.code == 0, f"diff --path w0 failed:\n{c}"
    for ch in json.loads(c.out)["changes"]:
        assert any(_under(p, ["w0"]) for p in ch["paths"] + ch.get("from", [])), f"--path w0 let through {ch}"


def check_path_restore(vol, workdir, t, full: helpers.Snapshot, rng, what: str):
    """A restore of a few paths (a writer's tree, a random file, a random
    directory and a hard-linked file when there is one) equals those paths,
    the directories above them and the hard links among them in the full
    restore; a path that did not exist is refused by name."""
    ents = full.entries
    files = sorted(p for p, e in ents.items() if e.kind == "file" and not p.startswith("bulk/"))
    dirs = sorted(p for p, e in ents.items() if e.kind == "dir" and "/" in p)
    linked = sorted(p for g in full.links for p in g)
    paths = {"w0"} | set(rng.sample(files, min(2, len(files)))) | set(rng.sample(dirs, min(1, len(dirs))))
    if linked:
        paths.add(rng.choice(linked))
    paths = sorted(paths)
    keep = {p for p in ents if any(_under(p, [q]) or _under(q, [p]) for q in paths)}
    want = helpers.Snapshot({p: e for p, e in ents.items() if p in keep},
                            frozenset(g & keep for g in full.links if len(g & keep) > 1))
    target = workdir / "restore-paths"
    extra = [a for p in paths for a in ("--path", p)]
    vol.restore(t, target, *extra)
    got = helpers.snapshot(target)
    helpers.assert_same_tree(want, got, f"restore --path {paths} at {what} vs the full restore")
    assert not (target / ".rewind").exists(), "a finished --path restore left its marker"
    helpers.rmtree(target)
    missing = workdir / "restore-missing"
    c = vol.restore(t, missing, "--path", "w0", "--path", "no/such/file", check=False)
    assert c.code != 0 and "no/such/file" in c.out + c.err, f"restore of a missing --path:\n{c}"
    assert not missing.exists() or not os.listdir(missing), "a refused --path restore wrote into its target"


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
