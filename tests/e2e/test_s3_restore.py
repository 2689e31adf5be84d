"""Restores from s3:// at run level (issue 3, "What it must show").

test_differential_on_s3 and test_sqlite_on_s3 run the core suites' own
test functions (test_differential.py, test_sqlite.py, issue 2) unchanged,
with a volume whose store is s3://BUCKET/rw on a moto server (the
`make_volume` they take is given S3 volumes; every `rewind` they run gets
the S3 endpoint and keys). To keep the time down they run one seed and
fewer single instants (module constants patched for the call), and the
differential prefill is smaller: a base on S3 uploads one object per chunk,
so the core suite's 1,200-file prefill already takes the base walk tens of
seconds, and every restore downloads it again.

test_volumes_sharing_a_prefix_do_not_mix: two volumes whose names share a
string prefix ("shop/db", "shop/db-logs") run at once under one bucket
prefix; each restores to its own mount's tree, verifies, and lists only its
own lineage and objects.

test_nested_volume_name_refused_or_kept_apart: a volume "shop" whose key
prefix holds another volume's data ("shop/db"): `rewind run` must either
refuse it early with a message that says so, or keep the two apart (its
verify, ls and restore see only its own objects, and it must not abort the
other volume's uploads).
"""

from __future__ import annotations

import os
import random
import time

import pytest

import helpers
import test_differential as differential
import test_sqlite as sqlite_suite
import workload
from s3fixtures import bucket, make_s3_volume, s3  # noqa: F401  (fixtures)


def small_prefill(source, rng):
    """test_differential.prefill with a tenth of its bulk files: the writer
    directories and the coordinator's ticker are the same."""
    for i in range(differential.WRITERS):
        workload.prefill_writer_dir(source, i, rng)
    for d in range(3):
        for k in range(40):
            helpers.fill_random(source / "bulk" / f"d{d}" / f"f{k}", rng.randrange(0, 6000), rng)
    helpers.fill_random(source / "bulk" / "big0", 3 << 20, rng)
    (source / "coord").mkdir()
    # The pair instants rewrite this xattr with the value it already has.
    os.setxattr(source / "coord", "user.pair", b"p")
    (source / "coord" / "ticker").write_bytes(b"." * 64)


@pytest.mark.timeout(420)
def test_differential_on_s3(make_s3_volume, workdir, monkeypatch):
    monkeypatch.setattr(differential, "SINGLE_INSTANTS", 3)
    # PAIRS stays 4: with fewer, no pair may fall inside one segment (the
    # suite asserts one does), since a pair spans three mount snapshots.
    monkeypatch.setattr(differential, "prefill", small_prefill)
    differential.test_differential_restore_matches_mount(make_s3_volume, workdir, 1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_sqlite_on_s3(make_s3_volume, workdir, monkeypatch, mode):
    monkeypatch.setattr(sqlite_suite, "INSTANTS", 3)
    sqlite_suite.test_sqlite_restore_at_instants(make_s3_volume, workdir, mode)


def fill(vol, rng, tag):
    """A few files whose contents name the volume."""
    d = vol.mount / "data"
    d.mkdir(exist_ok=True)
    for k in range(5):
        (d / f"f{k}").write_bytes(tag.encode() + rng.randbytes(rng.choice([10, 5000, 200000])))
    (vol.mount / "whoami").write_text(tag)


def finish(vol):
    """A record after t, the window past it, a clean stop; the mount's tree at t."""
    snap = helpers.snapshot(vol.mount)
    t = time.time_ns()
    (vol.mount / "after").write_bytes(b"x")
    vol.wait_latest(t, timeout=90)
    return t, snap


@pytest.mark.timeout(240)
def test_volumes_sharing_a_prefix_do_not_mix(make_s3_volume, workdir):
    rng = random.Random(5)
    names = ["shop/db", "shop/db-logs"]
    vols = [make_s3_volume(f"v{i}", name=n, prefix="shared") for i, n in enumerate(names)]
    for v in vols:
        (v.source / "seeded").write_text(f"seed of {v.name}")
        v.start()
    for v in vols:
        v.wait_window()
    # Interleaved writes while both run.
    for _ in range(3):
        for v in vols:
            fill(v, rng, v.name)
    ends = [finish(v) for v in vols]
    for v in vols:
        v.stop()

    lineages = []
    for v in vols:
        info = v.ls()
        assert info["volume"] == v.name, info
        assert len(info["lineages"]) == 1, f"{v.name} lists {info['lineages']}"
        lineages.append(info["lineages"][0]["id"])
        own = f"{v.prefix}/{v.name}/"
        assert all(k.startswith(own) for k in v.keys())
        c = v.verify()
        assert c.code == 0, f"rewind verify of {v.name} failed with another volume in the prefix:\n{c}"
    assert lineages[0] != lineages[1]
    for v in vols:
        v.delete_local()
    for v, (t, snap) in zip(vols, ends):
        target = workdir / f"restore-{v.name.replace('/', '_')}"
        v.restore(t, target)
        helpers.assert_same_tree(snap, helpers.snapshot(target), f"restore of {v.name} (another volume shares the prefix)")
        assert (target / "whoami").read_text() == v.name


@pytest.mark.timeout(240)
def test_nested_volume_name_refused_or_kept_apart(make_s3_volume, workdir):
    rng = random.Random(6)
    inner = make_s3_volume("inner", name="shop/db", prefix="shared")
    (inner.source / "seeded").write_text("inner")
    inner.start()
    inner.wait_window()
    fill(inner, rng, inner.name)

    # "shop" would list and own everything under shared/shop/, which holds shop/db.
    outer = make_s3_volume("outer", name="shop", prefix="shared")
    (outer.source / "seeded").write_text("outer")
    outer.start(wait_live=False)
    helpers.wait_until(lambda: outer.proc.poll() is not None or helpers.mount_is_live(outer.mount), 60,
                       "`rewind run --volume shop` to go live or refuse", on_timeout=outer._diag)
    problems = []
    if outer.proc.poll() is not None:
        # Refused: it must say why, and must have written nothing.
        log = outer.log()
        assert outer.proc.returncode != 0
        assert "shop/db" in log or "another volume" in log, \
            f"`rewind run --volume shop` refused without naming the other volume's data:\n{outer.log_tail()}"
        assert not [k for k in outer.keys() if not k.startswith("shared/shop/db/")], "the refused run wrote objects"
        outer_end = None
    else:
        outer.wait_window()
        fill(outer, rng, outer.name)
        outer_end = finish(outer)
        outer.stop()
    inner_end = finish(inner)
    inner.stop()

    c = inner.verify()
    assert c.code == 0, f"rewind verify of shop/db failed:\n{c}"
    if outer_end is not None:
        c = outer.verify()
        if c.code != 0:
            problems.append("`rewind run --volume shop` accepted a store prefix (shared/shop/) that holds volume "
                            "shop/db's objects, and `rewind verify --volume shop` then reports the other volume's "
                            f"objects as damage:\n{c}")
        info = outer.ls()
        if len(info["lineages"]) != 1:
            problems.append(f"`rewind ls --volume shop` lists {len(info['lineages'])} lineages: {info['lineages']}")
    for v in (inner, outer):
        v.delete_local()
    for v, end in ((inner, inner_end), (outer, outer_end)):
        if end is None:
            continue
        t, snap = end
        target = workdir / f"restore-{v.name.replace('/', '_')}"
        v.restore(t, target)
        helpers.assert_same_tree(snap, helpers.snapshot(target), f"restore of {v.name} (nested volume names)")
    assert not problems, "\n\n".join(problems)
