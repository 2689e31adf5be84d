"""`rewind run --on-journal-full=gap` on s3:// (issue 13): past
--max-journal-bytes the journal drops what the store has not taken, the
timeline records an explicit gap and a new lineage begins with a new base.

The daemon reaches moto through a `Gate` (s3fixtures); closing it is the
outage. --max-journal-bytes is 70 MB: journal files are preallocated 64 MiB
each, so the second file passes the bound and the next write drops.

test_gap_while_the_store_is_away: writers keep going during the outage
(they write several times the bound within a deadline, the journal files on
disk stay within the bound plus one file, /readyz stays ready), the log says
at each drop why changes are dropped and, after the store returns, once
that protection is whole again; a restore before the gap equals the tree the
mount showed then, one after the new base equals the tree the mount showed
then, one inside the gap is refused with a message naming it; `rewind ls`
shows the gap with its reason; `rewind verify` passes.

test_gap_survives_kill9_before_the_store_returns: kill -9 right after the
drop while the store is still away, restart while it is still away: the
gap's note in the journal directory brings the gap to the store once it
returns, the new lineage gets its base, verify passes and the latest
restore equals the mount.
"""

from __future__ import annotations

import time

import pytest

import helpers
from s3fixtures import (  # noqa: F401  (fixtures)
    BulkWriter,
    bucket,
    gate,
    make_s3_volume,
    s3,
    wait_metric,
)

MIB = 1 << 20
MAX_BYTES = 70_000_000
FILE = 64 * MIB  # the journal's preallocated file size
DROPPING = "because --on-journal-full=gap"
WHOLE = "protection is whole again after the journal gap"


def writer_ok(w):
    assert w.error is None, f"the writer failed:\n{w.error}"


def journal_on_disk(vol) -> int:
    return sum(p.stat().st_size for p in vol.journal_files())


def write_tree(root, tag: str):
    """A few small files and one that later phases overwrite."""
    d = root / "small"
    d.mkdir(exist_ok=True)
    for i in range(20):
        (d / f"{tag}-{i}").write_bytes(f"{tag} {i}\n".encode() * (i + 1))
    (root / "same-name").write_bytes(f"state {tag}\n".encode() * 100)


def write_tree_within(vol, tag: str, timeout: float = 60):
    """write_tree through the mount on a thread, asserting that it finishes
    by a deadline: in gap mode writers must never wait for the store."""
    import threading
    err = []

    def go():
        try:
            write_tree(vol.mount, tag)
        except BaseException as e:  # reported below
            err.append(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"writes through the mount ({tag}) did not finish within {timeout}s\n{vol._diag()}"
    assert not err, err


def quiet_point(vol):
    """The mount's tree at an instant no write is in flight, and that
    instant; a later record makes the store's window reach past it."""
    t = time.time_ns()
    snap = helpers.snapshot(vol.mount)
    (vol.mount / f"tick-{t}").write_bytes(b"t")
    return t, snap


def declared_gaps(vol) -> list[dict]:
    return [g for g in vol.ls()["gaps"] if g.get("declared")]


def flood_until_dropped(vol, bulk, drops: int, deadline: float):
    """Waits (while the store is away) for `drops` drops and the writer to
    have written past them, checking that writers never stall and that the
    journal on disk stays within the bound plus one file."""
    biggest = 0

    def dropped():
        nonlocal biggest
        writer_ok(bulk)
        assert vol.alive(), f"`rewind run` died during the outage:\n{vol.log_tail()}"
        biggest = max(biggest, journal_on_disk(vol))
        assert biggest <= MAX_BYTES + FILE + 2 * MIB, \
            f"journal files on disk total {biggest}, past the bound {MAX_BYTES} plus one file"
        return vol.log().count(DROPPING) >= drops and bulk.written >= (drops + 1) * FILE
    helpers.wait_until(dropped, deadline, f"{drops} drop(s) with the writer going on",
                       interval=0.1,
                       on_timeout=lambda: f"written {bulk.written / MIB:.0f} MiB, "
                                          f"journal {journal_on_disk(vol) / MIB:.0f} MiB\n{vol._diag()}")
    return biggest


@pytest.mark.timeout(420)
def test_gap_while_the_store_is_away(make_s3_volume, workdir, gate, s3):
    vol = make_s3_volume(run_endpoint=gate.endpoint)
    write_tree(vol.source, "seed")
    vol.start("--listen", "127.0.0.1:0", "--max-journal-bytes", str(MAX_BYTES),
              "--on-journal-full", "gap")
    vol.wait_window()
    first_lineage = vol.window()["lineage"]
    write_tree(vol.mount, "before")
    t_before, snap_before = quiet_point(vol)
    vol.wait_latest(t_before)

    gate.close()
    bulk = BulkWriter(vol.mount, 41, size=4 * MIB, rate=1 << 40, subdir="big")
    bulk.start()
    try:
        biggest = flood_until_dropped(vol, bulk, drops=2, deadline=240)
        m = vol.metrics()
        assert m["rewind_journal_gaps_total"] >= 2, m
        assert m["rewind_journal_dropped_bytes_total"] >= FILE // 2, m
        assert m["rewind_journal_writable"] == 1, f"writers are held although the mode is gap: {m}"
        assert vol.status("/readyz") == 200, "a journal gap took the sidecar out of readiness"
    finally:
        bulk.stop.set()
    bulk.join(60)
    writer_ok(bulk)
    drop_lines = [l for l in vol.log().splitlines() if DROPPING in l]
    assert "--max-journal-bytes 70000000" in drop_lines[0] and "dropping" in drop_lines[0], drop_lines[0]
    # Changes after the drops, still during the outage, belong to the new lineage.
    write_tree_within(vol, "during")

    gate.open()
    helpers.wait_until(lambda: WHOLE in vol.log(), 180, "the log line saying protection is whole again",
                       interval=0.2, on_timeout=vol._diag)
    helpers.wait_until(lambda: vol.window()["lineage"] != first_lineage, 60,
                       "the window to move to the gap's lineage", interval=0.2)
    write_tree(vol.mount, "after")
    t_after, snap_after = quiet_point(vol)
    vol.wait_latest(t_after, timeout=120)

    gaps = declared_gaps(vol)
    assert len(gaps) == 1, f"one gap expected (drops while it is open continue it): {vol.ls()['gaps']}"
    g = gaps[0]
    assert t_before < g["from_ns"] < g["to_ns"] < t_after, (helpers.fmt_ns(t_before), g, helpers.fmt_ns(t_after))
    assert "--on-journal-full=gap" in g["reason"] and "dropped" in g["reason"], g
    ls_text = helpers.rewind("ls", *vol.store_args(), env=vol.env(), check=True).out
    assert any(l.strip().startswith("gap ") and "--on-journal-full=gap" in l for l in ls_text.splitlines()), ls_text
    started = {l["id"]: (l["started"] or {}).get("reason") for l in vol.ls()["lineages"]}
    assert started.get(g["lineage"]) == "journal-gap", started

    vol.stop(expect=0)
    c = vol.verify()
    assert c.code == 0, f"rewind verify does not accept the declared gap:\n{c}"

    vol.delete_local()
    inside = (g["from_ns"] + g["to_ns"]) // 2
    c = vol.restore(inside, workdir / "inside", check=False)
    assert c.code != 0, f"a restore inside the gap succeeded:\n{c}"
    assert "falls in a gap" in c.err and "--on-journal-full=gap" in c.err, c
    assert helpers.fmt_ns(g["from_ns"])[:19] in c.err and helpers.fmt_ns(g["to_ns"])[:19] in c.err, \
        f"the refusal does not name the restorable instants on each side:\n{c}"
    vol.restore(t_before, workdir / "before")
    helpers.assert_same_tree(snap_before, helpers.snapshot(workdir / "before"), "restore before the gap")
    vol.restore(t_after, workdir / "after")
    helpers.assert_same_tree(snap_after, helpers.snapshot(workdir / "after"), "restore after the new base")
    print(f"gap mode: {len(drop_lines)} drops, {bulk.written / MIB:.0f} MiB written during the outage, "
          f"journal on disk at most {biggest / MIB:.0f} MiB (bound {MAX_BYTES / MIB:.0f} MiB)")


@pytest.mark.timeout(420)
def test_gap_survives_kill9_before_the_store_returns(make_s3_volume, workdir, gate, s3):
    vol = make_s3_volume(run_endpoint=gate.endpoint)
    write_tree(vol.source, "seed")
    args = ("--max-journal-bytes", str(MAX_BYTES), "--on-journal-full", "gap")
    vol.start(*args)
    vol.wait_window()
    first_lineage = vol.window()["lineage"]
    write_tree(vol.mount, "before")
    t_before, _ = quiet_point(vol)
    vol.wait_latest(t_before)

    gate.close()
    bulk = BulkWriter(vol.mount, 42, size=4 * MIB, rate=1 << 40, subdir="big")
    bulk.start()
    try:
        flood_until_dropped(vol, bulk, drops=1, deadline=240)
    finally:
        bulk.stop.set()
        # The writer parks on the dead mount after the kill.
        vol.kill9()
        bulk.new_generation()
    bulk.join(60)
    notes = list(vol.journal.glob("*.gap"))
    assert notes, f"no gap note in {vol.journal}: {sorted(p.name for p in vol.journal.iterdir())}"
    assert not declared_gaps(vol), "the store holds a gap marker although it was away"

    # Restart while the store is still away; the mount goes live without it.
    vol.start(*args)
    write_tree_within(vol, "restarted")
    gate.open()
    helpers.wait_until(lambda: WHOLE in vol.log(), 180, "protection whole again after the restart",
                       interval=0.2, on_timeout=vol._diag)
    helpers.wait_until(lambda: not list(vol.journal.glob("*.gap")), 30,
                       "the note removed once the store holds the gap marker")
    gaps = declared_gaps(vol)
    assert len(gaps) == 1, vol.ls()["gaps"]
    assert gaps[0]["lineage"] != first_lineage
    assert vol.window()["lineage"] == gaps[0]["lineage"]
    t_end, snap_end = quiet_point(vol)
    vol.wait_latest(t_end, timeout=120)
    vol.stop(expect=0)
    c = vol.verify()
    assert c.code == 0, f"rewind verify after the restart:\n{c}"
    vol.delete_local()
    vol.restore(t_end, workdir / "end")
    helpers.assert_same_tree(snap_end, helpers.snapshot(workdir / "end"), "restore after the restart")
    c = vol.restore((gaps[0]["from_ns"] + gaps[0]["to_ns"]) // 2, workdir / "inside", check=False)
    assert c.code != 0 and "falls in a gap" in c.err, c
