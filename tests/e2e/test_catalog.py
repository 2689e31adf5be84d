"""The local catalog (issue 13): an index of the last base in the journal
directory, never the truth.

- test_next_base_is_right_whatever_the_catalog: a volume stopped and
  started again and again, with the catalog left alone (it matches the
  newest stored base: the first periodic base reads nothing back from the
  store and checks the previous base's chunks with one request), deleted,
  corrupted (garbage over every file of it) and stale (the copy of an
  older base's catalog put back). Each time the log says which source the
  next base used and why, that base is correct (restores at instants after
  it equal what the mount showed) and `rewind verify` passes.
- test_a_prune_between_runs_deletes_chunks_a_stale_catalog_names: a prune
  with --grace 0s deletes the first base and the chunks only it named;
  then a stale catalog that still describes that base is put back, twice:
  before a clean start (the newest manifest is reloaded from the store) and
  before a start after kill -9 (a repair base, whose chunks the catalog
  would vouch for if the store still held its manifest). Both bases upload
  those chunks again instead of trusting the catalog, and every point
  restores after another prune --grace 0s.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest

import helpers
from helpers import rewind

# "base walk finished" is the one info line per base.
FIELD = re.compile(r"(?:^|\s)(\w+)=(\S+)")
REUSED_LINE = "catalog: the next base reuses the catalog's base"
RELOAD_LINE = "incremental base: reusing the newest stored base"


def base_lines(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if "base walk finished" in line:
            d = {k: v for k, v in FIELD.findall(line)}
            for k in ("files_read", "files_reused", "chunks_uploaded", "chunks_reused", "chunks_trusted",
                      "chunks_checked", "start_seq"):
                d[k] = int(d[k])
            d["line"] = line
            out.append(d)
    return out


def catalog_dir(vol: helpers.Volume) -> Path:
    return vol.journal / "catalog"


def catalog_files(vol: helpers.Volume) -> list[Path]:
    return sorted(p for p in catalog_dir(vol).rglob("*") if p.is_file())


def mutate(vol: helpers.Volume, rng: random.Random, n: int) -> None:
    """A few changes through the mount: a rewrite in place, an xattr (no
    size or mtime change: only the record tells), a new file, a rename and
    4 KiB into the big file."""
    m = vol.mount
    with open(m / "d" / f"f{rng.randrange(40)}", "r+b") as f:
        f.write(rng.randbytes(500))
    os.setxattr(m / "d" / f"f{rng.randrange(40, 80)}", "user.n", b"%d" % n)
    (m / "d" / f"new{n}").write_bytes(rng.randbytes(rng.randrange(1, 70_000)))
    victims = sorted((m / "d").glob("new*"))
    if len(victims) > 1:
        victims[0].rename(m / "d" / f"moved{n}")
    with open(m / "big", "r+b") as f:
        f.seek(rng.randrange(0, 6 << 20))
        f.write(rng.randbytes(4096))


def quiet_instant(vol: helpers.Volume) -> tuple[int, helpers.Snapshot]:
    snap = helpers.snapshot(vol.mount)
    return time.time_ns(), snap


def first_periodic(vol: helpers.Volume) -> dict:
    """Waits for this run's first periodic base to finish and for its
    manifest to be in the store."""
    def done():
        ps = [b for b in base_lines(vol.log()) if b["kind"] == "Periodic"]
        return ps[0] if ps else None
    b = helpers.wait_until(done, 120, "a periodic base in this run", interval=0.1, on_timeout=vol.log_tail)
    helpers.wait_until(lambda: any(x["start_seq"] == b["start_seq"] for x in vol.ls()["bases"]), 60,
                       "its manifest in the store", interval=0.1, on_timeout=vol.log_tail)
    return b


def newest_base(vol: helpers.Volume) -> dict:
    return max(vol.ls()["bases"], key=lambda b: (b["completed_ns"], b["start_seq"]))


def store_bytes_a_reload_reads(vol: helpers.Volume, base: dict) -> int:
    """What reloading `base` from the store reads: its manifest and every
    segment with records after its start (file:// store)."""
    root = vol.store_dir / vol.name
    info = vol.ls()
    total = (root / base["key"]).stat().st_size
    for s in info["segments"]:
        if s["lineage"] == base["lineage"] and s["last_seq"] > base["start_seq"]:
            total += (root / s["key"]).stat().st_size
    return total


def restore_and_compare(vol: helpers.Volume, instants, workdir: Path) -> None:
    vol.delete_local()
    for i, (t, snap) in enumerate(instants):
        target = workdir / f"r{i}"
        vol.restore(t, target)
        helpers.assert_same_tree(snap, helpers.snapshot(target), f"restore at instant {i} ({helpers.fmt_ns(t)})")
        helpers.rmtree(target)
    c = vol.verify()
    assert c.code == 0, f"verify failed:\n{c}"


@pytest.mark.timeout(900)
def test_next_base_is_right_whatever_the_catalog(make_volume, workdir):
    vol = make_volume("v")
    rng = random.Random(13)
    for k in range(120):
        helpers.fill_random(vol.source / "d" / f"f{k}", 30_000 + k, rng)
    helpers.fill_random(vol.source / "big", 6 << 20, rng)
    vol.start("--base-interval", "1h")
    vol.wait_window()
    mutate(vol, rng, 0)
    instants = [quiet_instant(vol)]
    vol.stop()
    # The catalog of the initial base, with the changes made after it.
    saved = workdir / "catalog-of-the-initial-base"
    shutil.copytree(catalog_dir(vol), saved)
    initial = newest_base(vol)

    def garbage():
        files = catalog_files(vol)
        assert files, f"no catalog in {catalog_dir(vol)}"
        for p in files:
            p.write_bytes(rng.randbytes(max(p.stat().st_size, 64)))

    def put_back_the_old_one():
        shutil.rmtree(catalog_dir(vol))
        shutil.copytree(saved, catalog_dir(vol))

    measured = {}
    cases = [
        ("matches", None, REUSED_LINE),
        ("deleted", lambda: shutil.rmtree(catalog_dir(vol)), "catalog not used: there is no catalog"),
        ("corrupted", garbage, "catalog not used: the catalog was damaged ("),
        ("stale", put_back_the_old_one, "catalog not used: the catalog describes base " + initial["key"]
         + ", but the newest stored base is "),
        ("matches again", None, REUSED_LINE),
    ]
    for n, (case, damage, want) in enumerate(cases, start=1):
        before = newest_base(vol)
        reload_bytes = store_bytes_a_reload_reads(vol, before)
        if damage:
            damage()
        # The first periodic base is due at once: the earlier run (or
        # this write) made records after the newest stored base.
        vol.start("--base-interval", "2s")
        (vol.mount / "kick").write_bytes(b"%d" % n)
        b = first_periodic(vol)
        log = vol.log()
        assert want in log, f"{case}: no line {want!r}\n{vol.log_tail()}"
        if want == REUSED_LINE:
            line = next(l for l in log.splitlines() if REUSED_LINE in l)
            assert f"base={before['key']}" in line, f"{case}: {line}\nnewest stored: {before['key']}"
            assert RELOAD_LINE not in log, f"{case}: reloaded from the store although the catalog matched"
        else:
            assert "reloads the newest manifest and the records after it from the store" in log, case
            line = next(l for l in log.splitlines() if RELOAD_LINE in l)
            assert f"base={before['key']}" in line, f"{case}: {line}"
            assert REUSED_LINE not in log, case
        # Incremental either way: most files are reused, and the previous
        # base's chunks count as stored with one request for its manifest.
        assert b["files_reused"] >= 100 and b["files_read"] <= 10, f"{case}: {b['line']}"
        assert b["chunks_trusted"] >= 120, f"{case}: {b['line']}"
        assert b["chunks_checked"] <= b["chunks_uploaded"] + b["chunks_reused"], f"{case}: {b['line']}"
        measured[case] = (0 if want == REUSED_LINE else reload_bytes, b)
        instants.append(quiet_instant(vol))
        mutate(vol, rng, n)
        instants.append(quiet_instant(vol))
        vol.stop()

    # What the restart's base read from the store with and without the catalog.
    for case, (nbytes, b) in measured.items():
        print(f"{case}: store bytes read before the base {nbytes}; exists requests "
              f"{b['chunks_checked'] + 1} ({b['chunks_trusted']} chunks trusted)")
    assert measured["deleted"][0] > 0
    restore_and_compare(vol, instants, workdir)


@pytest.mark.timeout(600)
def test_a_prune_between_runs_deletes_chunks_a_stale_catalog_names(make_volume, workdir):
    vol = make_volume("v")
    rng = random.Random(5)
    first = rng.randbytes(3 << 20)
    for k in range(30):
        helpers.fill_random(vol.source / f"f{k}", 20_000 + k, rng)
    (vol.source / "a").write_bytes(first)
    vol.start("--base-interval", "1h")
    vol.wait_window()
    vol.stop()
    # The catalog now describes the initial base, which alone names the
    # chunks of `first`.
    saved = workdir / "catalog-of-the-initial-base"
    shutil.copytree(catalog_dir(vol), saved)
    initial = newest_base(vol)
    chunks_before = {p.name for p in (vol.store_dir / vol.name / "chunk").iterdir()}

    vol.start("--base-interval", "1s")
    (vol.mount / "a").write_bytes(rng.randbytes(3 << 20))
    first_periodic(vol)
    vol.stop()
    second = newest_base(vol)
    assert second["kind"] == "periodic", second

    # The seconds tier's anchor is the newest base, so the initial base and
    # the chunks only it names go, at once.
    helpers.wait_until(lambda: time.time_ns() > second["completed_ns"] + 2 * helpers.NS, 10, "2 s")
    policy = ["--keep-seconds", "1s", "--keep-minutes", "0s", "--keep-hours", "0s", "--keep-days", "0s"]
    c = rewind("prune", *vol.store_args(), *policy, "--grace", "0s", env=vol.env(), timeout=120)
    assert c.code == 0, f"prune failed:\n{c}"
    keys = {b["key"] for b in vol.ls()["bases"]}
    assert initial["key"] not in keys and second["key"] in keys, (keys, c)
    gone = chunks_before - {p.name for p in (vol.store_dir / vol.name / "chunk").iterdir()}
    assert len(gone) == 3, f"the prune deleted {len(gone)} chunks, expected the 3 of the first content\n{c}"

    # 1. A clean start with the stale catalog: the newest manifest comes
    # from the store, and `a` gets its first content back.
    put_back(saved, vol)
    vol.start("--base-interval", "1h")
    # The base thread logs it once the mount is live.
    helpers.wait_until(lambda: "catalog not used: the catalog describes base " + initial["key"] in vol.log(),
                       30, "the catalog decision in the log", on_timeout=vol.log_tail)
    (vol.mount / "a").write_bytes(first)
    instants = [quiet_instant(vol)]
    # 2. kill -9 before any base, and the stale catalog again: the repair
    # base reads every file and finds the catalog's manifest gone.
    vol.kill9()
    put_back(saved, vol)
    vol.start("--base-interval", "1h")
    vol.wait_window()
    helpers.wait_until(lambda: base_lines(vol.log()), 60, "the repair base's log line", on_timeout=vol.log_tail)
    b = base_lines(vol.log())[0]
    log = vol.log()
    assert b["kind"] == "Repair", b["line"]
    assert "catalog not used: this start takes a repair base after an unclean stop" in log, vol.log_tail()
    assert "the next base reads every file" in log, vol.log_tail()
    assert "count as stored if the store still holds its manifest" in log, vol.log_tail()
    # The catalog's manifest is gone: nothing is trusted, the three chunks
    # of `a` are found missing and uploaded again.
    assert b["chunks_trusted"] == 0 and b["chunks_uploaded"] >= 3, b["line"]
    assert {p.name for p in (vol.store_dir / vol.name / "chunk").iterdir()} >= gone
    instants.append(quiet_instant(vol))
    vol.stop()

    c = rewind("prune", *vol.store_args(), *policy, "--grace", "0s", env=vol.env(), timeout=120)
    assert c.code == 0, f"prune failed:\n{c}"
    # The repair base keeps the kill -9's gap: the instant before it is
    # pruned, the one after it restores from the repair base.
    restore_and_compare(vol, instants[1:], workdir)
    target = workdir / "latest"
    vol.restore("latest", target)
    assert (target / "a").read_bytes() == first


def put_back(saved: Path, vol: helpers.Volume) -> None:
    shutil.rmtree(catalog_dir(vol), ignore_errors=True)
    shutil.copytree(saved, catalog_dir(vol))
