"""Crash tests (issue 2).

test_kill9_under_load: at least 20 kill -9s of `rewind run` at random
moments under write load: the first while the base snapshot is being taken,
others right after a restart, others at random points of the 1 s seal and
upload cycle. Each restart happens over the dead mount, which the daemon
must clear itself. A model of every acknowledged change (files created,
appended lines, atomic renames, overwritten slots) must hold on the mount
after each restart and in the restore at `latest` after a final clean stop,
from the store alone; `rewind verify` passes.

test_machine_crash_new_lineage: the daemon is killed, its journal is cut
back to the last fsync (the source is left ahead, as after a power loss)
and it restarts with a different boot id: `rewind ls` shows a second
lineage, fsynced data is restorable, and the new lineage restores to what
the mount shows.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time

import pytest

import helpers
from helpers import NS, fmt_ns

KILLS = 21


class CrashModel:
    """What the writer was told succeeded (acked) and what it merely tried."""

    def __init__(self):
        self.files: dict[str, bytes] = {}        # f/<n>: content, acked
        self.files_tried: dict[str, bytes] = {}  # not acked (in flight at a kill)
        self.lines_acked: set[int] = set()
        self.lines_tried: set[int] = set()
        self.renamed: dict[str, bytes] = {}
        self.renamed_tried: dict[str, bytes] = {}
        self.slots_acked: dict[int, list[bytes]] = {}
        self.slots_tried: dict[int, list[bytes]] = {}

    def check(self, root, what: str):
        root = str(root)
        errs = []
        for name, data in self.files.items():
            p = os.path.join(root, name)
            if not os.path.exists(p):
                errs.append(f"acked file {name} missing")
            elif open(p, "rb").read() != data:
                errs.append(f"acked file {name} has wrong content")
        for name, data in self.files_tried.items():
            p = os.path.join(root, name)
            if os.path.exists(p):
                got = open(p, "rb").read()
                # The kernel may split one large write() into several FUSE
                # requests (seen: 70000 bytes as 65536 + 4464); each request
                # is whole or absent, so an unacknowledged write can leave a
                # prefix that ends on a page boundary, never other bytes.
                if got != data and not (data.startswith(got) and len(got) % 4096 == 0):
                    errs.append(f"unacked file {name} is neither a page-aligned prefix nor whole ({len(got)} of {len(data)} bytes)")
        logp = os.path.join(root, "log", "append.log")
        lines = open(logp, "rb").read().split(b"\n") if os.path.exists(logp) else [b""]
        assert lines[-1] == b"", f"{what}: append.log ends in a partial line {lines[-1][:40]!r}"
        seen = {}
        for ln in lines[:-1]:
            try:
                n = int(ln[:8])
                assert ln == b"%08d:" % n + hashlib.sha256(b"%d" % n).hexdigest().encode()
            except (ValueError, AssertionError):
                errs.append(f"append.log holds a damaged line {ln[:40]!r}")
                continue
            seen[n] = seen.get(n, 0) + 1
        dup = sorted(n for n, c in seen.items() if c > 1)
        if dup:
            errs.append(f"append.log holds lines twice (a redo applied twice?): {dup[:10]}")
        lost = sorted(self.lines_acked - set(seen))
        if lost:
            errs.append(f"append.log lost acknowledged lines: {lost[:10]}")
        ghost = sorted(set(seen) - self.lines_acked - self.lines_tried)
        if ghost:
            errs.append(f"append.log holds lines never written: {ghost[:10]}")
        for name, data in self.renamed.items():
            p = os.path.join(root, name)
            if not os.path.exists(p) or open(p, "rb").read() != data:
                errs.append(f"acked atomic rename {name} missing or wrong")
        for k, acked in self.slots_acked.items():
            p = os.path.join(root, "slots", f"s{k}")
            got = open(p, "rb").read() if os.path.exists(p) else None
            tried = self.slots_tried.get(k, [])
            # The last acked value, or something tried after it.
            ok = [acked[-1]] + [v for v in tried if v > acked[-1]]
            if got not in ok:
                errs.append(f"slot {k} holds {got!r}, expected the last acked {acked[-1]!r} or a later try")
        assert not errs, f"{what}: {len(errs)} problem(s):\n  " + "\n  ".join(errs[:30])


class CrashWriter(threading.Thread):
    """Writes through the mount; an operation is acked when its last call
    returned. Failures (the mount died) wait for the next generation."""

    def __init__(self, mount, seed):
        super().__init__(daemon=True)
        self.mount = str(mount)
        self.rng = random.Random(seed)
        self.m = CrashModel()
        self.cond = threading.Condition()
        self.generation = 0
        self.waiting = False
        self.stop = threading.Event()
        self.n = 0
        self.acks = 0
        self.acks_this_gen = 0
        self.error = None

    def new_generation(self):
        with self.cond:
            self.generation += 1
            self.acks_this_gen = 0
            self.cond.notify_all()

    def one(self):
        r = self.rng
        self.n += 1
        n = self.n
        J = os.path.join
        kind = r.choice(["file", "file", "line", "line", "rename", "slot"])
        if kind == "file":
            name = f"f/{n}"
            data = r.randbytes(r.choice([1, 100, 4096, 20000, 70000]))
            self.m.files_tried[name] = data
            fd = os.open(J(self.mount, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.m.files[name] = self.m.files_tried.pop(name)
        elif kind == "line":
            line = b"%08d:" % n + hashlib.sha256(b"%d" % n).hexdigest().encode() + b"\n"
            self.m.lines_tried.add(n)
            fd = os.open(J(self.mount, "log", "append.log"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
            try:
                assert os.write(fd, line) == len(line)
            finally:
                os.close(fd)
            self.m.lines_acked.add(n)
        elif kind == "rename":
            name = f"r/{n}"
            data = r.randbytes(r.choice([10, 3000]))
            self.m.renamed_tried[name] = data
            tmp = J(self.mount, "r", f".{n}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, J(self.mount, name))
            self.m.renamed[name] = data
        else:
            k = r.randrange(4)
            val = b"%012d" % n
            self.m.slots_tried.setdefault(k, []).append(val)
            fd = os.open(J(self.mount, "slots", f"s{k}"), os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.pwrite(fd, val, 0)
            finally:
                os.close(fd)
            self.m.slots_acked.setdefault(k, []).append(val)
        self.acks += 1
        self.acks_this_gen += 1

    def run(self):
        try:
            while not self.stop.is_set():
                with self.cond:
                    gen = self.generation
                try:
                    self.one()
                    # A steady application rather than a flood: enough load
                    # that every kill interrupts writes, without tens of
                    # thousands of files.
                    time.sleep(0.002)
                except OSError as e:
                    if e.errno not in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
                        raise
                    with self.cond:
                        # The mount died under us: wait for the restart.
                        self.waiting = True
                        self.cond.wait_for(lambda: self.generation != gen or self.stop.is_set())
                        self.waiting = False
        except BaseException as e:
            import traceback
            self.error = traceback.format_exc()


def prefill(source, rng, mib=160):
    for d in ("f", "log", "r", "slots"):
        (source / d).mkdir(parents=True, exist_ok=True)
    for k in range(mib // 4):
        helpers.fill_random(source / "bulk" / f"b{k}", 4 << 20, rng)
    for k in range(200):
        helpers.fill_random(source / "bulk" / "small" / f"s{k}", rng.randrange(0, 3000), rng)


@pytest.mark.timeout(900)
def test_kill9_under_load(make_volume, workdir):
    rng = random.Random(20)
    vol = make_volume("v")
    prefill(vol.source, rng)
    w = CrashWriter(vol.mount, 5)
    kills = []  # (delay, window_open_before_kill, acks in that generation)

    def alive_check():
        assert w.error is None, f"writer failed:\n{w.error}"

    vol.start()
    w.start()
    for k in range(KILLS):
        if k == 0:
            delay = 0.05                      # while the first base is being taken
        elif k % 4 == 1:
            delay = rng.uniform(0.0, 0.15)    # right after a restart
        else:
            delay = rng.uniform(0.2, 2.5)     # at a random phase of seal/upload
        # Some acknowledged writes in this generation before the kill, so
        # that every kill has something to lose.
        if k > 0:
            helpers.wait_until(lambda: w.acks_this_gen > 0 or w.error, 30,
                               f"a write through the restarted mount (kill {k})",
                               on_timeout=vol._diag)
        time.sleep(delay)
        alive_check()
        assert vol.alive(), f"`rewind run` died on its own before kill {k}:\n{vol.log_tail()}"
        window_open = vol.window() is not None
        vol.kill9()
        kills.append((round(delay, 3), window_open, w.acks_this_gen))
        # The writer's next call fails on the dead mount; it then parks
        # until the next generation, so the check below sees a quiet tree.
        helpers.wait_until(lambda: w.waiting or w.error, 30, "the writer to notice the dead mount")
        alive_check()
        # Restart over the dead mount: the daemon mounts over it itself.
        assert helpers.is_fuse_mounted(vol.mount), "the dead mount vanished on its own (kernel detached it?)"
        try:
            vol.start(timeout=60)
        except AssertionError as e:
            raise AssertionError(f"restart {k + 1} over the dead FUSE mount failed: {e}") from None
        # The restarted mount holds every change acknowledged before the kill.
        w.m.check(vol.mount, f"the mount after restart {k + 1} (kills so far: {kills})")
        w.new_generation()
    assert kills[0][1] is False, f"the first kill did not hit the base snapshot: {kills[0]}"

    vol.wait_window(timeout=180)
    helpers.wait_until(lambda: w.acks_this_gen > 50 or w.error, 60, "writes after the last restart")
    w.stop.set()
    w.new_generation()
    w.join(60)
    alive_check()
    w.m.check(vol.mount, "the mount after the last restart")
    t_end = time.time_ns()
    (vol.mount / "after").write_bytes(b"x")
    vol.wait_latest(t_end, timeout=120)
    vol.stop()
    assert w.acks > 200, f"only {w.acks} acknowledged writes"

    c = vol.verify()
    assert c.code == 0, f"rewind verify failed after {len(kills)} kills:\n{c}"
    vol.delete_local()
    target = workdir / "restored"
    vol.restore("latest", target)
    w.m.check(target, f"restore at latest after {len(kills)} kill -9s {kills}")


def cut_journal_after(vol, t_cut: int) -> dict:
    """Cuts the journal back to the last record timed at or before t_cut,
    as a machine crash that lost the page cache would: from the first later
    record on, the (preallocated) files hold zeros."""
    recs = vol.debug_journal()
    assert recs, "rewind debug journal printed no records"
    later = [r for r in recs if r["time_ns"] > t_cut]
    kept = [r for r in recs if r["time_ns"] <= t_cut]
    assert later, f"no journal records after the fsync point (all {len(recs)} records were before it)"
    first_cut = min(later, key=lambda r: r["seq"])
    files_after = {}
    for r in later:
        f = r["file"]
        files_after[f] = min(files_after.get(f, r["offset"]), r["offset"])
    for f, off in files_after.items():
        path = f if os.path.isabs(f) else os.path.join(vol.journal, f)
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.seek(off)
            left = size - off
            while left > 0:
                n = min(left, 1 << 20)
                fh.write(b"\0" * n)
                left -= n
            fh.flush()
            os.fsync(fh.fileno())
    return {"kept": len(kept), "cut": len(later), "first_cut_seq": first_cut["seq"],
            "last_kept_ns": max(r["time_ns"] for r in kept) if kept else None}


@pytest.mark.timeout(600)
def test_machine_crash_new_lineage(make_volume, workdir):
    rng = random.Random(3)
    vol = make_volume("v")
    prefill(vol.source, rng, mib=8)
    vol.start(env={"REWIND_BOOT_ID": "boot-a-" + os.urandom(4).hex()})
    vol.wait_window()
    m = vol.mount
    synced = {}
    for k in range(30):
        data = rng.randbytes(rng.choice([10, 5000, 100000]))
        with open(m / "f" / f"synced{k}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        synced[f"f/synced{k}"] = data
    with open(m / "log" / "append.log", "ab") as f:
        f.write(b"synced line\n")
        os.fdatasync(f.fileno())
    snap_sync = helpers.snapshot(m)
    t_sync = time.time_ns()
    # Changes after the last fsync: the machine crash may lose them from the
    # journal while the source already has them.
    for k in range(20):
        (m / "f" / f"unsynced{k}").write_bytes(rng.randbytes(3000))
    with open(m / "log" / "append.log", "ab") as f:
        f.write(b"unsynced line\n")
    vol.kill9()
    cut = cut_journal_after(vol, t_sync)

    before = sorted(p.name for p in vol.journal.iterdir())
    try:
        vol.start(env={"REWIND_BOOT_ID": "boot-b-" + os.urandom(4).hex()})
    except AssertionError as e:
        raise AssertionError(f"restart after a simulated machine crash failed (journal dir before the "
                             f"restart: {before}; cut: {cut}): {e}") from None
    for name, data in synced.items():
        assert (m / name).read_bytes() == data, f"fsynced {name} lost or changed after the machine crash ({cut})"
    vol.wait_window()
    helpers.wait_until(lambda: len(vol.ls()["lineages"]) >= 2, 120,
                       "`rewind ls` to show a second lineage after the machine crash",
                       on_timeout=lambda: vol.ls())
    (m / "f" / "after-crash").write_bytes(b"new lineage")
    snap_new = helpers.snapshot(m)
    t_new = time.time_ns()
    (m / "after").write_bytes(b"x")
    vol.wait_latest(t_new, timeout=120)
    vol.stop()

    info = vol.ls()
    assert len(info["lineages"]) >= 2, f"expected two lineages after a machine crash: {info['lineages']}"
    c = vol.verify()
    assert c.code == 0, f"rewind verify failed after a machine crash:\n{c}"
    vol.delete_local()

    # The instant of the last record that survived the cut: nothing changed
    # between it and t_sync, so the tree is the one snapshotted then.
    assert cut["last_kept_ns"] is not None, f"the cut kept no record: {cut}"
    t1 = workdir / "at-sync"
    vol.restore(cut["last_kept_ns"], t1)
    helpers.assert_same_tree(snap_sync, helpers.snapshot(t1),
                             f"restore at the last fsynced record ({fmt_ns(cut['last_kept_ns'])}) after a machine crash")
    t2 = workdir / "at-new"
    vol.restore(t_new, t2)
    helpers.assert_same_tree(snap_new, helpers.snapshot(t2), "restore in the new lineage")
