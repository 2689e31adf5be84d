"""Model-based retention test (issue 13): random workloads with several
periodic bases, prunes in between, and every kept point checked against
what the mount showed.

The workload: the differential writers of workload.py (creates, overwrites,
appends, truncates, renames, hard links, unlinks, xattrs, mode and owner
changes, directories, FIFOs; each writer also checks the mount's results
against a native shadow tree) plus a database-like file whose few hot pages
are overwritten many times, appended to and truncated. `rewind run` takes a
periodic base every few seconds.

References: the coordinator pauses every writer at an operation boundary
(workload.Gate), notes the time, snapshots the mount, notes the time again
and lets them go on. Nothing changes the tree between the two times, so the
snapshot is the tree the mount showed at every instant of that *quiet
interval*. Some pauses wait for a base to complete inside them. None is
placed on a whole UTC minute: the minutes tier keeps each whole minute, and
what was written between the base before it and the minute is what a prune
compacts into a delta; the test requires that at least one delta was
written, so that the raw-against-compacted comparison below compares
something.

Which instants are kept is asked of the tool, never computed here: an
instant is kept when it is inside a lineage's window or is one of the
points `rewind ls --json` lists. At random moments during the workload,
and twice after it, a prune runs (--keep-seconds 20s --keep-minutes 10m
--grace 0s) while the workload goes on. Right before each one the store is
frozen (a copy made of hard links: objects are never changed in place, so
the copy keeps what the prune deletes); after it, every instant the prune
turned into an isolated point (one it thinned, so no longer restored from
raw segments but from a kept base and its completing records, or from
compacted deltas) is restored from the frozen raw store and from the pruned
one, and the two must agree, and agree with the mount's tree when the point
falls in a quiet interval. The raw restore is kept for the checks at the end.
Predicting the points from a --dry-run instead would race the clock: the
real prune's seconds tier starts later than its dry run's. After each
prune a reference instant that is no longer kept is refused (between two
kept points, or outside the window) and writes nothing, and every UTC minute
in which a base completed before the window's start still holds a point or
the window's start (the one promise about *which* points that holds for
bases-per-minute and whole-minute deltas alike).

At the end the daemon is stopped, the last prunes run, `rewind verify`
passes, the source, journal and HOME are deleted, and from the store alone:
every kept instant with a reference restores exactly the mount's tree, every
kept point restores exactly its raw restore, every reference instant that is
not kept is refused, `--or-earlier` takes the nearest earlier point, and
latest is the mount's last tree.

Seeds: REWIND_MODEL_SEED="7" (or "1,2,3"; default "1"); `scripts/many-seeds model`
runs many. A seed fixes every writer's operation sequence and the
coordinator's choices; thread interleaving and base timing still vary, so a
replay is close but not identical. REWIND_MODEL_SECONDS sets the workload's
wall time (default 100).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass

import pytest

import helpers
import workload
from helpers import NS, fmt_ns, rewind, wait_until

SEEDS = [int(s) for s in os.environ.get("REWIND_MODEL_SEED", "1").replace(" ", "").split(",") if s]
WORKLOAD_SECONDS = float(os.environ.get("REWIND_MODEL_SECONDS", "100"))
WRITERS = 2
BASE_INTERVAL = "3s"
KEEP_SECONDS = 20
POLICY = ["--keep-seconds", f"{KEEP_SECONDS}s", "--keep-minutes", "10m", "--grace", "0s"]
MIN = 60 * NS
# Operation kinds the issue names; each must succeed at least once.
NAMED_KINDS = ("create", "write", "append", "truncate", "rename", "link", "unlink", "setxattr", "chmod",
               "mkdir")
PAGE = 4096


@dataclass
class Ref:
    """The tree the mount showed at every instant of [from_ns, to_ns]; at_ns
    is the instant of the interval the test restores as its reference."""
    n: int
    kind: str
    from_ns: int
    to_ns: int
    at_ns: int
    snap: helpers.Snapshot

    def holds(self, t: int) -> bool:
        return self.from_ns <= t <= self.to_ns

    def __str__(self):
        return f"reference {self.n} ({self.kind}, quiet {fmt_ns(self.from_ns)} .. {fmt_ns(self.to_ns)})"


class Hot(threading.Thread):
    """An overwrite-heavy database file: most writes land on a few hot
    pages, some append a page or truncate the file back, and a few fsync.
    Goes through the same gate as the writers, so pauses are quiet."""

    def __init__(self, path, seed: int, gate: workload.Gate):
        super().__init__(name="hot", daemon=True)
        self.path = str(path)
        self.rng = random.Random(seed * 1000 + 999)
        self.gate = gate
        self.stop_flag = threading.Event()
        self.crash: str | None = None
        self.writes = 0
        self.fd = -1

    def step(self):
        r = self.rng
        pages = os.fstat(self.fd).st_size // PAGE
        x = r.random()
        # Compressible pages keep the store small; each is still unique to
        # the write.
        page_bytes = r.randbytes(64) * (PAGE // 64)
        if x < 0.02 and pages < 96:
            os.pwrite(self.fd, page_bytes, pages * PAGE)
        elif x < 0.03 and pages > 24:
            os.ftruncate(self.fd, r.randrange(16, pages) * PAGE)
        else:
            page = r.randrange(8) if r.random() < 0.9 else r.randrange(pages)
            os.pwrite(self.fd, page_bytes, page * PAGE)
            self.writes += 1
        if x > 0.995:
            os.fsync(self.fd)

    def run(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR)
            try:
                # About 300 writes a second.
                workload.gated_loop(self.gate, self.stop_flag, self.step, pace=0.003)
            finally:
                os.close(self.fd)
        except BaseException:
            self.crash = traceback.format_exc()


class Model:
    """What the test knows (the quiet intervals and the raw restores of
    every point) and the checks it makes against the store."""

    def __init__(self, vol, workdir):
        self.vol = vol
        self.workdir = workdir
        self.refs: list[Ref] = []
        # Instant -> the tree restored there from raw segments before a
        # prune thinned that part of the timeline.
        self.raw: dict[int, helpers.Snapshot] = {}
        # Completion instants of every base `rewind ls` ever listed.
        self.bases_seen: set[int] = set()
        self.spans: dict[int, int] = {}
        self.n_restores = 0
        self.stats = {"point vs reference": 0, "point vs raw": 0, "window vs reference": 0, "refused": 0,
                      "raw restores": 0, "prunes": 0, "deltas written": 0}

    # -- the tool's answers -------------------------------------------------
    def kept(self, ls: dict):
        """(window, points) of the one lineage, as `rewind ls --json` says.
        A point may be a span (until_ns: a delta's state lasts until the
        next record); `spans` remembers them for is_kept."""
        ws = ls["windows"]
        assert len(ws) == 1, f"expected one lineage: {ws}"
        assert not ls["gaps"], f"unexpected gaps: {ls['gaps']}"
        self.spans = {p["ns"]: p.get("until_ns", p["ns"]) for p in ls["points"]}
        return ws[0], sorted(self.spans)

    def minutes_covered(self, ls: dict, what: str) -> None:
        """The policy's promise, checked against every base seen: each UTC
        minute (all are inside --keep-minutes here) in which a base completed
        before the window's start keeps at least one point, unless the
        window starts in that minute (its start is a base of the minute)."""
        window, points = self.kept(ls)
        self.bases_seen |= {b["completed_ns"] for b in ls["bases"]}
        want = {b // MIN for b in self.bases_seen if b < window["earliest_ns"]}
        have = {t // MIN for t in points} | {window["earliest_ns"] // MIN}
        missing = sorted(want - have)
        assert not missing, (
            f"{what}: no point kept in the minute(s) {[fmt_ns(m * MIN)[:16] for m in missing]}, in which bases "
            f"completed at {[fmt_ns(b) for b in sorted(self.bases_seen) if b // MIN in missing]}; points "
            f"{[fmt_ns(t) for t in points]}, window from {window['earliest']}")

    def is_kept(self, window, t: int) -> bool:
        """t is restorable by the newest `kept` answer."""
        return (window["earliest_ns"] <= t <= window["latest_ns"]
                or any(ns <= t <= until for ns, until in self.spans.items()))

    def ref_at(self, t: int) -> Ref | None:
        return next((r for r in self.refs if r.holds(t)), None)

    # -- restores -----------------------------------------------------------
    def restore(self, t, what: str, store=None) -> helpers.Snapshot:
        """The tree restored at t (ns, or "latest") from the volume's store,
        or from `store` (a frozen copy)."""
        self.n_restores += 1
        target = self.workdir / f"restore{self.n_restores}"
        url = f"file://{store}" if store is not None else self.vol.store_url
        at = fmt_ns(t) if isinstance(t, int) else t
        c = rewind("restore", "--store", url, "--volume", self.vol.name, "--at", at, "--target", target,
                   env=self.vol.env(), timeout=600)
        assert c.code == 0, f"{what}: restore at {at} from {url} failed:\n{c}"
        snap = helpers.snapshot(target)
        helpers.rmtree(target)
        return snap

    def refused(self, t: int, what: str) -> None:
        self.n_restores += 1
        target = self.workdir / f"restore{self.n_restores}"
        c = self.vol.restore(t, target, check=False)
        assert c.code != 0, f"{what}: restore at {fmt_ns(t)}, which is not kept, succeeded:\n{c}"
        assert "between two kept points" in c.err or "outside the restore window" in c.err, \
            f"{what}: restore at {fmt_ns(t)} was refused without saying it is between kept points or outside the window:\n{c}"
        assert not target.exists() or not any(target.iterdir()), f"{what}: a refused restore wrote into {target}"
        self.stats["refused"] += 1

    def check_point(self, t: int, what: str, *, need_raw: bool) -> None:
        """A kept point restores exactly its raw restore and, inside a quiet
        interval, the mount's tree; so does the end of its span, if it has
        one (nothing changed in between)."""
        until = self.spans.get(t, t)
        if until != t and t in self.raw:
            helpers.assert_same_tree(self.raw[t], self.restore(until, what),
                                     f"{what}: the end {fmt_ns(until)} of point {fmt_ns(t)}'s span vs the raw restore at its start")
            self.stats["point vs raw"] += 1
        got = self.restore(t, what)
        ref = self.ref_at(t)
        if ref is not None:
            helpers.assert_same_tree(ref.snap, got, f"{what}: point {fmt_ns(t)} vs the mount's tree ({ref})")
            self.stats["point vs reference"] += 1
        if t in self.raw:
            helpers.assert_same_tree(self.raw[t], got,
                                     f"{what}: point {fmt_ns(t)} vs its restore from raw segments before the prune")
            self.stats["point vs raw"] += 1
        else:
            assert not need_raw, (f"{what}: {fmt_ns(t)} is a kept point, but no prune turned it into one "
                                  f"(points restored from raw segments: {sorted(map(fmt_ns, self.raw))})")

    def check_refs(self, ls: dict, what: str, rng: random.Random | None, sample: int = 0,
                   thinned_from: int | None = None) -> None:
        """Every reference instant that is no longer kept (from `thinned_from`
        on, if given) is refused; `sample` (all when rng is None) of those
        still in the window restore exactly."""
        window, _ = self.kept(ls)
        inside = []
        for r in self.refs:
            if self.is_kept(window, r.at_ns):
                inside.append(r)
            elif r.at_ns < window["earliest_ns"] and (thinned_from is None or r.at_ns >= thinned_from):
                self.refused(r.at_ns, f"{what}, {r}")
            # Later than the window's end: not in the store yet (segments
            # are shipped every second), so neither kept nor thinned.
        if rng is not None:
            inside = rng.sample(inside, min(sample, len(inside)))
        for r in inside:
            helpers.assert_same_tree(r.snap, self.restore(r.at_ns, f"{what}, {r}"),
                                     f"{what}: restore at {fmt_ns(r.at_ns)} vs the mount's tree ({r})")
            self.stats["window vs reference"] += 1
        # The window's first instant is kept too.
        ref = self.ref_at(window["earliest_ns"])
        if ref is not None and (rng is None or rng.random() < 0.5):
            helpers.assert_same_tree(ref.snap, self.restore(window["earliest_ns"], what),
                                     f"{what}: restore at the window's start {window['earliest']} vs {ref}")
            self.stats["window vs reference"] += 1

    # -- prune ------------------------------------------------------------
    def prune_json(self, *args) -> dict:
        c = rewind("prune", *self.vol.store_args(), *POLICY, "--json", *args, env=self.vol.env(), timeout=300)
        assert c.code == 0, f"prune failed:\n{c}"
        return json.loads(c.out)

    def freeze_store(self, name: str):
        """A copy of the store as it is now, made of hard links: objects are
        written to a temporary name and renamed, never changed in place, so
        what a prune deletes afterwards stays in the copy."""
        src = self.vol.store_dir
        dst = self.workdir / name
        for dp, _, fns in os.walk(src):
            rel = os.path.relpath(dp, src)
            os.makedirs(dst / rel, exist_ok=True)
            for n in fns:
                if n.startswith(".tmp."):
                    continue
                try:
                    os.link(os.path.join(dp, n), dst / rel / n)
                except FileNotFoundError:
                    pass  # renamed or deleted while we walked: not part of the store any more
        return dst

    def prune_round(self, what: str, rng: random.Random) -> None:
        t_start = time.monotonic()
        self.stats["prunes"] += 1
        before = self.vol.ls()
        window, old_points = self.kept(before)
        self.bases_seen |= {b["completed_ns"] for b in before["bases"]}
        frozen = self.freeze_store(f"before-prune{self.stats['prunes']}")
        rep = self.prune_json()
        self.stats["deltas written"] += rep["compaction"]["deltas_written"]["objects"]
        after = self.vol.ls()
        window2, points = self.kept(after)
        assert window2["latest_ns"] >= window["latest_ns"], f"{what}: the window shrank at its end: {window} -> {window2}"
        self.minutes_covered(after, what)
        # Every instant this prune turned into an isolated point (it was in
        # the window, restored from raw segments) restores the same tree from
        # the raw segments of the store as it was and from what the prune
        # left (base and completing records, or compacted deltas).
        for t in (t for t in points if t not in old_points):
            assert window["earliest_ns"] <= t <= window["latest_ns"], \
                f"{what}: new point {fmt_ns(t)} was not restorable before the prune (window {window}, points {old_points})"
            self.raw[t] = self.restore(t, f"{what}: raw restore before the prune", store=frozen)
            self.stats["raw restores"] += 1
            ref = self.ref_at(t)
            if ref is not None:
                helpers.assert_same_tree(ref.snap, self.raw[t], f"{what}: raw restore at {fmt_ns(t)} vs {ref}")
            self.check_point(t, what, need_raw=True)
        helpers.rmtree(frozen)
        # Refusals of what this prune thinned; the end checks every one.
        self.check_refs(after, what, rng, sample=2, thinned_from=window["earliest_ns"])
        print(f"{what} ({time.monotonic() - t_start:.1f}s with its checks): points {[fmt_ns(t)[11:23] for t in points]}, window from "
              f"{window2['earliest']}; condemned {({k: v['condemned']['objects'] for k, v in rep['kinds'].items()})}, "
              f"deleted {({k: v['deleted']['objects'] for k, v in rep['kinds'].items()})}"
              f"{'; compaction ' + str(rep['compaction']) if 'compaction' in rep else ''}", flush=True)


def run_model(seed, make_volume, workdir):
    rng = random.Random(seed)
    vol = make_volume("v")
    shadow = workdir / "shadow"
    shadow.mkdir()
    for i in range(WRITERS):
        workload.prefill_writer_dir(vol.source, i, rng)
        assert os.system(f"cp -a {vol.source}/w{i} {shadow}/w{i}") == 0
    (vol.source / "hot").mkdir()
    (vol.source / "hot" / "db").write_bytes(rng.randbytes(64 * PAGE))
    for k in range(30):
        helpers.fill_random(vol.source / "cold" / f"c{k}", rng.randrange(0, 200_000), rng)

    model = Model(vol, workdir)
    gate = workload.Gate()
    writers = [workload.Writer(i, seed, str(vol.mount), str(shadow), gate) for i in range(WRITERS)]
    hot = Hot(vol.mount / "hot" / "db", seed, gate)
    cache = helpers.SnapshotCache()

    def check_threads():
        for w in writers:
            assert w.crash is None, f"writer {w.name} crashed:\n{w.crash}\n{vol.log_tail()}"
        assert hot.crash is None, f"the hot-page writer crashed:\n{hot.crash}\n{vol.log_tail()}"

    def newest_base_ns() -> int:
        return max((b["completed_ns"] for b in vol.ls()["bases"]), default=0)

    def quiet(kind: str, until=None) -> None:
        """Pauses the workload, snapshots the mount, optionally waits
        (`until()` true) while it is quiet, and records the interval."""
        gate.pause()
        t_from = time.time_ns()
        try:
            check_threads()
            snap = helpers.snapshot(vol.mount, cache)
            assert ".rewind" not in snap.entries, "the journal directory is visible through the mount"
            if until is not None:
                wait_until(until, 60, f"the quiet interval's condition ({kind})", interval=0.05,
                           on_timeout=vol._diag)
            t_to = time.time_ns()
        finally:
            gate.resume()
        at = t_from + rng.randrange(t_to - t_from + 1)
        model.refs.append(Ref(len(model.refs), kind, t_from, t_to, at, snap))

    try:
        vol.start("--base-interval", BASE_INTERVAL)
        for w in writers:
            w.start()
            w.go.set()
        hot.start()
        vol.wait_window(timeout=120)
        t0 = time.monotonic()
        end = t0 + WORKLOAD_SECONDS
        prune_at = sorted(t0 + rng.uniform(30, WORKLOAD_SECONDS - 5) for _ in range(rng.choice([2, 3])))
        # A prune and its checks take a while: the workload lasts until the
        # last one planned has run.
        while time.monotonic() < end or prune_at:
            # Let the workload run for a random while (this is the workload, not a wait).
            time.sleep(rng.uniform(0.5, 2.5))
            check_threads()
            assert vol.alive(), vol.log_tail()
            # No pause is placed on a whole minute: the writes between the
            # base before it and the minute are what a prune compacts into
            # a delta, and a pause there would often leave none (a base
            # completes inside it). Kept minutes are compared with their
            # raw-segment restore instead (prune_round).
            if rng.random() < 0.3:
                t_pause = time.time_ns()
                quiet("base", lambda: newest_base_ns() > t_pause)
            else:
                quiet("plain")
            if prune_at and time.monotonic() >= prune_at[0]:
                prune_at.pop(0)
                # The workload goes on while the prune and its checks run.
                model.prune_round(f"prune {model.stats['prunes'] + 1} (during the workload)", rng)

        print(f"workload: {time.monotonic() - t0:.0f}s, {len(model.refs)} quiet intervals", flush=True)
        gate.pause()
        for w in writers:
            w.stop_flag.set()
        hot.stop_flag.set()
        gate.resume()
        for t in writers + [hot]:
            t.join(60)
            assert not t.is_alive(), f"{t.name} did not stop"
        check_threads()
        for w in writers:
            w.close_held()
        t_from = time.time_ns()
        final = helpers.snapshot(vol.mount, cache)
        t_to = time.time_ns()
        model.refs.append(Ref(len(model.refs), "final", t_from, t_to, t_to, final))
        vol.wait_latest(t_to, timeout=90)
        vol.stop()
    finally:
        for w in writers:
            w.stop_flag.set()
        hot.stop_flag.set()
        gate.resume()

    mismatches = [m for w in writers for m in w.mismatches]
    assert not mismatches, f"{len(mismatches)} operations behaved differently on the mount:\n" + "\n".join(mismatches[:30])
    counts = {k: sum(w.counts[k] for w in writers) for k in NAMED_KINDS}
    assert all(counts.values()), f"operation kinds that never succeeded: {counts}"
    assert hot.writes > 1000, f"only {hot.writes} hot-page overwrites"
    bases = vol.ls()["bases"]
    assert sum(1 for b in bases if b["kind"] == "periodic") >= 5, f"too few periodic bases: {bases}"

    # The last prunes: the first thins what the stopped volume left, the
    # second deletes what the first condemned (grace 0).
    model.prune_round("final prune 1", rng)
    model.prune_round("final prune 2", rng)
    c = vol.verify()
    assert c.code == 0, f"verify after the prunes failed:\n{c}"

    # From the store alone.
    vol.delete_local()
    ls = vol.ls()
    window, points = model.kept(ls)
    assert points, f"the prunes kept no isolated point: {ls['tiers']}"
    model.minutes_covered(ls, "from the store alone")
    coarse = [t for t in ls["tiers"] if t["tier"] not in ("seconds", "policy")]
    assert sum(t["points"] for t in coarse) == len(points), f"ls shows tiers {ls['tiers']} for points {ls['points']}"
    text = rewind("ls", *vol.store_args(), env=vol.env(), check=True).out
    assert "minutes tier" in text and "every instant from" in text, f"ls does not show the tiers:\n{text}"
    for t in points:
        model.check_point(t, "from the store alone", need_raw=True)
    model.check_refs(ls, "from the store alone", None)
    # --or-earlier takes the nearest earlier point of a refused reference.
    between = [r for r in model.refs if points[0] < r.at_ns < window["earliest_ns"] and not model.is_kept(window, r.at_ns)]
    if between:
        r = rng.choice(between)
        earlier = max(t for t in points if t <= r.at_ns)
        target = workdir / "or-earlier"
        c = vol.restore(r.at_ns, target, "--or-earlier")
        named = {fmt_ns(earlier)[:19], fmt_ns(model.spans[earlier])[:19]}
        assert any(n in c.out for n in named), f"--or-earlier at {fmt_ns(r.at_ns)} does not name {fmt_ns(earlier)}:\n{c}"
        helpers.assert_same_tree(model.raw[earlier], helpers.snapshot(target),
                                 f"--or-earlier at {fmt_ns(r.at_ns)} vs the point {fmt_ns(earlier)}")
    helpers.assert_same_tree(final, model.restore("latest", "latest"), "restore at latest vs the mount's last tree")
    # The workload outlasts a whole minute before the final seconds tier, so
    # a minute point is always kept, and it is compacted: without a delta
    # the raw-against-compacted comparisons above would compare nothing.
    assert model.stats["deltas written"] >= 1, f"no prune compacted anything: {model.stats}"
    # Kept points are compared with the mount when they fall in a quiet
    # interval, which is left to chance now that no pause sits on a whole
    # minute; every one is compared with its raw-segment restore, and raw
    # restores are compared with the mount throughout the window.
    assert model.stats["point vs raw"] >= 1, f"no kept point was compared with its raw restore: {model.stats}"
    print(f"\nseed {seed}: {len(model.refs)} references, {len(points)} kept points, "
          f"{sum(1 for b in bases if b['kind'] == 'periodic')} periodic bases, {hot.writes} hot overwrites, "
          f"checks {model.stats}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", SEEDS)
def test_model_retention(make_volume, workdir, seed):
    try:
        run_model(seed, make_volume, workdir)
    except AssertionError as e:
        raise AssertionError(f"seed {seed} (replay with REWIND_MODEL_SEED={seed}): {e}") from e
