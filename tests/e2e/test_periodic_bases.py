"""Periodic incremental bases (issue 13, first part).

`rewind run --base-interval DUR --base-after BYTES` takes a new base while
the application writes, so that a restore replays at most about one base
interval of journal. A periodic base re-reads only the files that changed
since the previous base (records, or a size or mtime that differs from the
previous base's object) and reuses the previous object for the rest.

- test_periodic_bases_restore_every_instant: several periodic bases taken
  under a workload; restores before and after each base, and at latest,
  equal what the mount showed, and latest starts from the newest base.
- test_periodic_base_reads_only_changed_files: the periodic base's log line
  and metrics show it read only the files changed through the mount and
  the one changed behind its back, and uploaded only their new chunks.
- test_base_after_triggers_a_base_by_journal_bytes: a small --base-after
  takes a base long before --base-interval would.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import urllib.request

import pytest

import helpers
from helpers import NS, fmt_ns

# "base walk finished" is the one info line per base; its fields are what
# these tests read.
FIELD = r"(?:^|\s){}=(\S+)"


def base_lines(log: str) -> list[dict]:
    """Every completed base of a run as a dict of its log fields."""
    out = []
    for line in log.splitlines():
        if "base walk finished" not in line:
            continue
        d = {}
        for k in ("kind", "files_read", "files_reused", "bytes_read", "chunks_uploaded", "chunks_reused",
                  "start_seq"):
            m = re.search(FIELD.format(k), line)
            assert m, f"base log line without {k}: {line}"
            d[k] = m.group(1) if k == "kind" else int(m.group(1))
        d["line"] = line
        out.append(d)
    return out


def periodic_bases(vol: helpers.Volume) -> list[dict]:
    return [b for b in vol.ls()["bases"] if b["kind"] == "periodic"]


def restored_from(c: helpers.Cmd) -> tuple[str, int]:
    """(base completion time, records replayed) from restore's summary line."""
    m = re.search(r"base completed (\S+), (\d+) records from (\d+) segments", c.out)
    assert m, f"restore printed no plan summary:\n{c}"
    return m.group(1), int(m.group(2))


class Workload:
    """Random changes through the mount in a few directories: writes at
    random offsets, appends, truncates, creates, unlinks, renames, chmods
    and xattrs, from the test's own thread (so the mount is quiet whenever
    the test takes a snapshot)."""

    def __init__(self, root, seed: int):
        self.root = root
        self.rng = random.Random(seed)
        self.n = 0
        for d in ("a", "b", "c"):
            (root / d).mkdir(exist_ok=True)

    def files(self):
        return [p for d in ("a", "b", "c") for p in (self.root / d).iterdir() if p.is_file()]

    def step(self):
        r, rng = self.rng, self.rng
        self.n += 1
        files = self.files()
        op = r.choice(["create", "write", "write", "write", "append", "truncate", "unlink", "rename",
                       "chmod", "xattr"]) if files else "create"
        if op == "create":
            p = self.root / r.choice("abc") / f"f{self.n}"
            p.write_bytes(rng.randbytes(r.randrange(0, 200_000)))
            return
        p = r.choice(files)
        if op == "write":
            size = p.stat().st_size
            fd = os.open(p, os.O_WRONLY)
            try:
                os.pwrite(fd, rng.randbytes(r.randrange(1, 20_000)), r.randrange(0, size + 1))
            finally:
                os.close(fd)
        elif op == "append":
            with open(p, "ab") as f:
                f.write(rng.randbytes(r.randrange(1, 50_000)))
        elif op == "truncate":
            os.truncate(p, r.randrange(0, p.stat().st_size + 10_000))
        elif op == "unlink":
            p.unlink()
        elif op == "rename":
            p.rename(self.root / r.choice("abc") / f"r{self.n}")
        elif op == "chmod":
            os.chmod(p, r.choice([0o600, 0o644, 0o640, 0o755]))
        else:
            os.setxattr(p, "user.n", b"%d" % self.n)


@pytest.mark.timeout(600)
def test_periodic_bases_restore_every_instant(make_volume, workdir):
    vol = make_volume("v")
    rng = random.Random(13)
    for k in range(40):
        helpers.fill_random(vol.source / "pre" / f"p{k}", rng.randrange(0, 300_000), rng)
    helpers.fill_random(vol.source / "pre" / "big", 3 << 20, rng)
    vol.start("--base-interval", "3s")
    vol.wait_window()
    w = Workload(vol.mount, 1)
    cache = helpers.SnapshotCache()
    instants: list[tuple[int, helpers.Snapshot]] = []
    deadline = time.monotonic() + 240
    # The workload runs until the store holds four periodic bases; an
    # instant (quiet mount, snapshot, time) follows every few changes.
    while len(periodic_bases(vol)) < 4:
        assert time.monotonic() < deadline, f"fewer than 4 periodic bases after 240 s\n{vol.log_tail()}"
        assert vol.alive(), vol.log_tail()
        for _ in range(rng.randrange(5, 40)):
            w.step()
        if rng.random() < 0.7:
            # Changes that leave size and mtime alone, to files the workload
            # does not otherwise touch: only the touched set can tell a
            # periodic base to re-read them. p10..p39 stay untouched.
            p = vol.mount / "pre" / f"p{rng.randrange(10)}"
            if rng.random() < 0.5:
                os.setxattr(p, "user.v", b"%d" % rng.randrange(1 << 30))
            else:
                # New bytes in place, then the old mtime back (a SetAttr).
                st = p.stat()
                if st.st_size:
                    fd = os.open(p, os.O_WRONLY)
                    try:
                        os.pwrite(fd, rng.randbytes(16), rng.randrange(max(1, st.st_size - 16)))
                    finally:
                        os.close(fd)
                    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        if rng.random() < 0.5:
            # Big writes to a file the bases must keep re-reading.
            with open(vol.mount / "pre" / "big", "r+b") as f:
                f.seek(rng.randrange(0, 3 << 20))
                f.write(rng.randbytes(100_000))
        snap = helpers.snapshot(vol.mount, cache)
        instants.append((time.time_ns(), snap))
    final = helpers.snapshot(vol.mount, cache)
    t_final = time.time_ns()
    instants.append((t_final, final))
    (vol.mount / "trailer").write_bytes(b"x")
    after = helpers.snapshot(vol.mount)
    vol.wait_latest(t_final, timeout=60)
    vol.stop()

    info = vol.ls()
    bases = sorted(info["bases"], key=lambda b: b["completed_ns"])
    periodic = [b for b in bases if b["kind"] == "periodic"]
    assert len(periodic) >= 4 and bases[0]["kind"] == "initial", bases
    # One walk at a time: every base's start is followed by its end before
    # the next base starts.
    events = [("start" if "taking a base snapshot" in l else "end") for l in vol.log().splitlines()
              if "taking a base snapshot" in l or "base walk finished" in l]
    assert all(a != b for a, b in zip(events, events[1:])) and events[0] == "start", events
    lines = base_lines(vol.log())
    assert [l["kind"] for l in lines[:1]] == ["Initial"], lines[:1]
    assert all(l["kind"] == "Periodic" for l in lines[1:])
    assert len(lines) >= len(bases)
    seqs = [b["start_seq"] for b in bases]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    # Periodic bases are incremental: the pre-filled files no one touched are reused.
    assert all(l["files_reused"] >= 30 for l in lines[1:]), [l["line"] for l in lines]

    # Restore instants on both sides of every base: the last instant before
    # each completion and the first after it, plus the final one.
    chosen = {len(instants) - 1}
    for b in bases:
        before = [i for i, (t, _) in enumerate(instants) if t < b["completed_ns"]]
        after_b = [i for i, (t, _) in enumerate(instants) if t > b["completed_ns"]]
        if before:
            chosen.add(before[-1])
        if after_b:
            chosen.add(after_b[0])
    spans = {sum(1 for b in bases if b["completed_ns"] <= instants[i][0]) for i in chosen}
    assert len(spans) >= 4, f"instants fall after only {sorted(spans)} bases"

    vol.delete_local()
    for i in sorted(chosen):
        t, snap = instants[i]
        target = workdir / f"r{i}"
        c = vol.restore(t, target)
        used, _ = restored_from(c)
        newest = max((b for b in bases if b["completed_ns"] <= t), key=lambda b: b["completed_ns"])
        assert used == newest["completed"], f"restore at {fmt_ns(t)} used the base of {used}, not {newest}\n{c}"
        helpers.assert_same_tree(snap, helpers.snapshot(target), f"restore at instant {i} ({fmt_ns(t)})")
        helpers.rmtree(target)

    target = workdir / "latest"
    c = vol.restore("latest", target)
    helpers.assert_same_tree(after, helpers.snapshot(target), "restore at latest vs the mount at the end")
    used, records = restored_from(c)
    # Latest starts from the newest base and replays only what came after
    # its start: without periodic bases it would be the initial base and
    # every record of the run.
    assert used == bases[-1]["completed"] and bases[-1]["kind"] == "periodic", f"{c}\n{bases[-1]}"
    total = max(s["last_seq"] for s in info["segments"])
    assert records <= total - bases[-1]["start_seq"], c
    assert records < total // 2, f"restore at latest replayed {records} of {total} records\n{c}"


def metrics_text(vol: helpers.Volume, addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no {name} in\n{text}"
    return float(m.group(1))


@pytest.mark.timeout(600)
def test_periodic_base_reads_only_changed_files(make_volume, workdir):
    vol = make_volume("v")
    rng = random.Random(7)
    n_small = 300
    for k in range(n_small):
        helpers.fill_random(vol.source / "many" / f"d{k % 10}" / f"f{k}", 20_000 + k, rng)
    for k in range(2):
        helpers.fill_random(vol.source / f"big{k}", 5 << 20, rng)
    total_bytes = sum(20_000 + k for k in range(n_small)) + 2 * (5 << 20)
    port = 20000 + os.getpid() % 20000
    addr = f"127.0.0.1:{port}"
    # A long interval: the first periodic base is the one the test sets off
    # with --base-after, after every change below is made.
    vol.start("--base-interval", "1h", "--base-after", "3000000", "--listen", addr)
    vol.wait_window()
    lines = base_lines(vol.log())
    assert len(lines) == 1 and lines[0]["kind"] == "Initial", lines
    assert lines[0]["files_read"] == n_small + 2 and lines[0]["bytes_read"] == total_bytes, lines[0]
    assert lines[0]["files_reused"] == 0
    before = helpers.snapshot(vol.mount)
    t_before = time.time_ns()

    # Through the mount: two small files rewritten, a chmod and an xattr (no data), and
    # 4 KiB into the middle of a 5 MiB file (one of its five chunks changes).
    changed = {}
    for k in (3, 150):
        p = vol.mount / "many" / f"d{k % 10}" / f"f{k}"
        with open(p, "r+b") as f:
            f.write(rng.randbytes(100))
        changed[p.name] = p.stat().st_size
    os.chmod(vol.mount / "many" / "d7" / "f77", 0o600)
    changed["f77"] = (vol.mount / "many" / "d7" / "f77").stat().st_size
    # An xattr changes neither size nor mtime: only the record says so, and
    # reusing the previous object would lose it.
    os.setxattr(vol.mount / "many" / "d0" / "f200", "user.only", b"the record knows")
    changed["f200"] = 20_200
    with open(vol.mount / "big0", "r+b") as f:
        f.seek((2 << 20) + 12345)
        f.write(rng.randbytes(4096))
    changed["big0"] = 5 << 20
    # Behind the mount's back: same size, new content and mtime, no record.
    behind = vol.source / "many" / "d9" / "f99"
    st = behind.stat()
    with open(behind, "r+b") as f:
        f.write(rng.randbytes(50))
    os.utime(behind, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * NS))
    changed["f99"] = st.st_size
    # New chunks: one per rewritten small file, one of big0, the behind-the-mount file.
    new_chunks = 4

    # Now the bytes that set the periodic base off, in a file of their own:
    # the journal stays under --base-after until the last write, which is
    # smaller than any request the kernel splits writes into, so the base
    # starts after every change above.
    with open(vol.mount / "filler", "wb") as f:
        f.write(rng.randbytes(2_950_000))
        f.write(rng.randbytes(100_000))
    changed["filler"] = 3_050_000
    new_chunks += 3  # two chunks of 1 MiB and one of the rest

    helpers.wait_until(lambda: len(base_lines(vol.log())) >= 2, 120, "a periodic base set off by --base-after",
                       interval=0.1, on_timeout=vol.log_tail)
    p = base_lines(vol.log())[1]
    assert p["kind"] == "Periodic", p["line"]
    assert "--base-after" in p["line"], p["line"]
    assert p["files_read"] == len(changed), f"read {p['files_read']} files, changed {sorted(changed)}\n{p['line']}"
    assert p["files_reused"] == n_small + 2 + 1 - len(changed), p["line"]
    assert p["bytes_read"] == sum(changed.values()), f"read {p['bytes_read']} bytes, changed {changed}\n{p['line']}"
    assert p["chunks_uploaded"] == new_chunks, p["line"]
    text = metrics_text(vol, addr)
    assert metric(text, 'rewind_last_base_files{how="read"}') == len(changed)
    assert metric(text, 'rewind_last_base_files{how="reused"}') == n_small + 2 + 1 - len(changed)
    assert metric(text, "rewind_last_base_read_bytes") == sum(changed.values())
    assert metric(text, "rewind_last_base_duration_seconds") > 0
    assert abs(metric(text, "rewind_last_base_completed_seconds") - time.time()) < 120
    # Sampled twice a second: the count restarts at the base.
    helpers.wait_until(lambda: metric(metrics_text(vol, addr), "rewind_journal_bytes_since_base") < 100_000, 10,
                       "rewind_journal_bytes_since_base to restart at the periodic base")

    # The store alone restores before and after the incremental base.
    helpers.wait_until(lambda: len(periodic_bases(vol)) >= 1, 60, "the periodic base's manifest in the store",
                       interval=0.1)
    t_end = time.time_ns()
    (vol.mount / "trailer").write_bytes(b"x")
    vol.wait_latest(t_end)
    vol.stop()
    end = helpers.snapshot(vol.source, skip_top=(".rewind",))
    vol.delete_local()
    for at, want, what in ((t_before, before, "before the changes"), ("latest", end, "latest")):
        target = workdir / f"r-{what.replace(' ', '-')}"
        vol.restore(at, target)
        helpers.assert_same_tree(want, helpers.snapshot(target), f"restore {what}")


@pytest.mark.timeout(300)
def test_base_after_triggers_a_base_by_journal_bytes(make_volume, workdir):
    vol = make_volume("v")
    (vol.source / "seed").write_bytes(b"seed")
    vol.start("--base-interval", "1h", "--base-after", "1000000")
    vol.wait_window()
    assert [b["kind"] for b in vol.ls()["bases"]] == ["initial"]
    rng = random.Random(3)
    with open(vol.mount / "data", "wb") as f:
        for _ in range(20):
            f.write(rng.randbytes(100_000))
    got = helpers.wait_until(lambda: periodic_bases(vol), 120, "a periodic base set off by 2 MB of journal",
                             interval=0.1, on_timeout=vol.log_tail)
    lines = [l for l in base_lines(vol.log()) if l["kind"] == "Periodic"]
    assert lines and all("--base-after 1000000" in l["line"] for l in lines), [l["line"] for l in lines]
    initial = vol.ls()["bases"][0]
    assert got[0]["completed_ns"] - initial["completed_ns"] < 300 * NS, (initial, got)
    want = helpers.snapshot(vol.mount)
    t_end = time.time_ns()
    (vol.mount / "trailer").write_bytes(b"x")
    vol.wait_latest(t_end)
    vol.stop()
    vol.delete_local()
    target = workdir / "r"
    c = vol.restore(t_end, target)
    helpers.assert_same_tree(want, helpers.snapshot(target), "restore after a --base-after base")
    used, _ = restored_from(c)
    assert used == max(b["completed"] for b in vol.ls()["bases"]), c


@pytest.mark.timeout(300)
@pytest.mark.parametrize("catalog", ["kept", "deleted"])
def test_restart_reloads_the_previous_base_and_the_records_after_it(make_volume, workdir, catalog):
    """After a clean restart the previous base and what the earlier run
    changed after it come from the local catalog (kept), or, without one
    (deleted), from the store: the manifest and the records after it. Either
    way a change that leaves size and mtime alone (an xattr) made before the
    restart must still be re-read by the first periodic base, not taken from
    the stale previous object."""
    vol = make_volume("v")
    rng = random.Random(11)
    n = 50
    for k in range(n):
        helpers.fill_random(vol.source / f"f{k}", 10_000 + k, rng)
    vol.start("--base-interval", "1h")
    vol.wait_window()
    os.setxattr(vol.mount / "f1", "user.k", b"set before the restart")
    with open(vol.mount / "f2", "r+b") as f:
        f.write(b"changed before the restart")
    t = time.time_ns()
    (vol.mount / "trailer").write_bytes(b"x")
    vol.wait_latest(t)
    vol.stop()

    if catalog == "deleted":
        shutil.rmtree(vol.journal / "catalog")
    vol.start("--base-interval", "2s")
    with open(vol.mount / "f3", "r+b") as f:
        f.write(b"changed after the restart")
    helpers.wait_until(lambda: any(l["kind"] == "Periodic" for l in base_lines(vol.log())), 60,
                       "a periodic base after the restart", interval=0.1, on_timeout=vol.log_tail)
    log = vol.log()
    initial = vol.ls()["bases"][0]
    line = {"kept": r"catalog: the next base reuses the catalog's base",
            "deleted": r"incremental base: reusing the newest stored base"}[catalog]
    assert re.search(line + ".*base=" + re.escape(initial["key"]), log), vol.log_tail()
    p = next(l for l in base_lines(log) if l["kind"] == "Periodic")
    # f1 (xattr), f2 and the trailer from the earlier run, and f3 unless
    # the base (due at once: the interval counts from the stored base)
    # started before it; the rest is reused.
    assert p["files_read"] in (3, 4) and p["files_reused"] == n + 1 - p["files_read"], p["line"]
    helpers.wait_until(lambda: periodic_bases(vol), 60, "the periodic base's manifest in the store", interval=0.1)
    t = time.time_ns()
    (vol.mount / "trailer").write_bytes(b"y")
    vol.wait_latest(t)
    vol.stop()
    want = helpers.snapshot(vol.source, skip_top=(".rewind",))
    vol.delete_local()
    target = workdir / "r"
    c = vol.restore("latest", target)
    used, _ = restored_from(c)
    assert used == periodic_bases(vol)[-1]["completed"], c
    helpers.assert_same_tree(want, helpers.snapshot(target), "restore at latest after the restart")
