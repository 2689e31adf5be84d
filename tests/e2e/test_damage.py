"""Damage tests (issue 2).

On a stopped store: a flipped byte or a truncated tail in a segment, a chunk
and a base manifest makes `rewind restore` and `rewind verify` fail with a
clear message, and nothing is written outside the target. A segment forged
with a valid checksum whose records name `../` paths is refused, and a
symlink that points out of the volume, with writes through it, never makes
restore write outside the target.

In the local journal (after a kill -9): a torn tail is cut and reported at
restart, keeping acknowledged-and-fsynced data; a flipped byte in the middle
is refused with a clear error.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import helpers
from conftest import TMP_ROOT
from helpers import NS

VOL = "vol"
DAMAGE_WORDS = ("damage", "corrupt", "checksum", "mismatch", "truncat", "invalid", "torn")


def _has_any(text: str, words) -> bool:
    t = text.lower()
    return any(w in t for w in words)


# --------------------------------------------------------------------------
# A pristine store, built once for the module


@pytest.fixture(scope="module")
def pristine(request):
    problems = request.config._rewind_problems
    if problems:
        pytest.fail("cannot run the e2e suites: " + "; ".join(problems), pytrace=False)
    d = TMP_ROOT / "damage-pristine"
    if d.exists():
        helpers.rmtree(d)
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    vol = helpers.Volume(d / "v", name=VOL)
    rng = random.Random(99)
    for k in range(5):
        helpers.fill_random(vol.source / "data" / f"big{k}", rng.choice([1, 3, 5]) << 20, rng)
    for k in range(40):
        helpers.fill_random(vol.source / "data" / "small" / f"s{k}", rng.randrange(1, 5000), rng)
    os.symlink("big0", vol.source / "data" / "link")
    try:
        vol.start()
        win = vol.wait_window()
        base_seq = max(b["start_seq"] for b in vol.ls()["bases"])
        (vol.mount / "changes").mkdir()

        def enough_segments():
            segs = [s for s in vol.ls()["segments"] if s["first_seq"] > base_seq]
            return len(segs) >= 3

        n = 0
        deadline = time.monotonic() + 60
        while not enough_segments():
            assert time.monotonic() < deadline, f"no 3 segments after the base: {vol.ls()}\n{vol.log_tail()}"
            n += 1
            helpers.fill_random(vol.mount / "changes" / f"c{n}", rng.randrange(1, 200000), rng)
            with open(vol.mount / "changes" / "log", "ab") as f:
                f.write(b"line %d\n" % n)
            time.sleep(0.05)
        snap = helpers.snapshot(vol.mount)
        t = time.time_ns()
        (vol.mount / "after").write_bytes(b"x")
        vol.wait_latest(t)
        vol.stop()
        root_ino = os.stat(vol.source).st_ino
        info = vol.ls()
        vol.delete_local()
    finally:
        vol.cleanup()
    yield SimpleNamespace(store=vol.store_dir, snap=snap, t=t, info=info, root_ino=root_ino, window=win)
    helpers.rmtree(d)


def store_objects(store_dir: Path) -> dict[str, list[str]]:
    """Keys of the volume's objects by kind (seg/, chunk/, base/, ...)."""
    root = store_dir / VOL
    out: dict[str, list[str]] = {}
    for dp, _, fns in os.walk(root):
        for fn in fns:
            if fn.startswith(".tmp."):
                continue
            key = os.path.relpath(os.path.join(dp, fn), root)
            out.setdefault(key.split("/")[0], []).append(key)
    for v in out.values():
        v.sort()
    return out


@pytest.fixture
def case(pristine, make_volume, workdir):
    """A private copy of the pristine store, and a sandbox for the target."""
    vol = make_volume("v")
    vol.name = VOL
    shutil.rmtree(vol.store_dir)
    shutil.copytree(pristine.store, vol.store_dir, symlinks=True)
    helpers.rmtree(vol.source)
    sandbox = workdir / "sandbox"
    sandbox.mkdir()
    (sandbox / "sentinel").write_bytes(b"untouched")
    return SimpleNamespace(vol=vol, sandbox=sandbox, target=sandbox / "target", workdir=workdir,
                           objects=store_objects(vol.store_dir), p=pristine)


def outside_target(workdir: Path, target: Path):
    rel = os.path.relpath(target, workdir)
    return [e for e in helpers.tree_listing(workdir) if not (e[0] == rel or e[0].startswith(rel + "/"))]


def pick(case, kind: str) -> str:
    objs = case.objects
    if kind == "segment":
        base_seq = max(b["start_seq"] for b in case.p.info["bases"])
        segs = [k for k in objs.get("seg", []) if int(Path(k).stem.split("-")[3]) > base_seq]
        assert segs, f"no segment after the base in the store: {objs.keys()}"
        return segs[len(segs) // 2]
    if kind == "chunk":
        chunks = objs.get("chunk", [])
        assert chunks, f"no chunk/ objects in the store: {sorted(objs)}"
        return max(chunks, key=lambda k: os.path.getsize(case.vol.store_dir / VOL / k))
    if kind == "manifest":
        bases = objs.get("base", [])
        assert bases, f"no base/ manifest in the store: {sorted(objs)}"
        return bases[-1]
    raise AssertionError(kind)


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > 8, f"{path} is too small to damage"
    if how == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) * 2 // 3]))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("kind", ["segment", "chunk", "manifest"])
def test_store_damage_is_refused(case, kind, how):
    vol = case.vol
    key = pick(case, kind)
    damage(vol.store_dir / VOL / key, how)
    before = outside_target(case.workdir, case.target)

    c = vol.restore("latest", case.target, check=False)
    assert c.code != 0, f"restore succeeded over a {kind} with a {how}ped byte/tail ({key}):\n{c}"
    assert _has_any(c.out + c.err, DAMAGE_WORDS), f"restore's message does not say what is damaged:\n{c}"
    v = vol.verify()
    assert v.code != 0, f"verify passed over a damaged {kind} ({key}):\n{v}"
    assert os.path.basename(key) in v.out + v.err, f"verify does not name the damaged object {key}:\n{v}"
    assert outside_target(case.workdir, case.target) == before, "restore or verify wrote outside the target"
    assert (case.sandbox / "sentinel").read_bytes() == b"untouched"


@pytest.mark.timeout(300)
def test_pristine_store_restores_and_verifies(case):
    """The control for the damage cases: the same copy, undamaged, is fine."""
    v = case.vol.verify()
    assert v.code == 0, f"verify failed on an undamaged store:\n{v}"
    case.vol.restore(case.p.t, case.target)
    helpers.assert_same_tree(case.p.snap, helpers.snapshot(case.target), "restore of the undamaged copy")


# --------------------------------------------------------------------------
# A forged segment that names paths outside the target


def _lz4_literals(raw: bytes) -> bytes:
    """An lz4 block holding `raw` as one literal run (valid lz4, no matches)."""
    n = len(raw)
    out = bytearray()
    if n < 15:
        out.append(n << 4)
    else:
        out.append(0xF0)
        rest = n - 15
        while rest >= 255:
            out.append(255)
            rest -= 255
        out.append(rest)
    return bytes(out) + raw


def _bytes(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def forge_segment(lineage: int, first_seq: int, t0: int, records: list[bytes]) -> tuple[str, bytes]:
    """Encodes records (tag + body, without seq/time) as a segment per
    docs/FORMAT.md (segment.rs), with a valid blake3 trailer."""
    import blake3
    raw = bytearray()
    for i, body in enumerate(records):
        rec = struct.pack("<Qq", first_seq + i, t0 + i) + body
        raw += struct.pack("<I", len(rec)) + rec
    last_seq, last_ns = first_seq + len(records) - 1, t0 + len(records) - 1
    out = bytearray(b"RWSEG001")
    out += struct.pack("<HHQQQqqQQ", 1, 0, lineage, first_seq, last_seq, t0, last_ns, len(records), len(raw))
    block = _lz4_literals(bytes(raw))
    out += struct.pack("<II", len(raw), len(block)) + block
    out += blake3.blake3(bytes(out)).digest()
    key = f"seg/{t0:020}-{last_ns:020}-{lineage:016x}-{first_seq:020}-{last_seq:020}.rws"
    return key, bytes(out)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [b"forged-but-benign", b"../escaped", b"a/../../escaped",
                                  b"/tmp/rewind-e2e-escaped", b".."])
def test_forged_segment_with_hostile_name_is_refused(case, name):
    vol = case.vol
    segs = case.objects["seg"]
    last = Path(segs[-1]).stem.split("-")
    lineage, last_seq, last_ns = int(last[2], 16), int(last[4]), int(last[1])
    ino = 987654321
    create = (bytes([1]) + struct.pack("<Q", case.p.root_ino) + _bytes(name) + struct.pack("<QB", ino, 1)
              + struct.pack("<IIIqQ", 0o100644, 0, 0, last_ns, 0) + _bytes(b""))
    write = bytes([5]) + struct.pack("<QQQq", ino, 0, 6, last_ns) + _bytes(b"pwned\n")
    t0 = last_ns + 1000
    key, data = forge_segment(lineage, last_seq + 1, t0, [create, write])
    p = vol.store_dir / VOL / key
    p.write_bytes(data)
    before = outside_target(case.workdir, case.target)
    escaped = [Path("/tmp/rewind-e2e-escaped"), case.sandbox / "escaped", case.workdir / "escaped"]
    for e in escaped:
        if e.exists():
            e.unlink()

    c = vol.restore("latest", case.target, check=False)
    if name == b"forged-but-benign":
        # The control: the forger writes segments the restore accepts.
        assert c.code == 0, f"restore refused a well-formed forged segment (test forger broken?):\n{c}"
        assert (case.target / "forged-but-benign").read_bytes() == b"pwned\n"
        return
    assert c.code != 0, f"restore applied a segment that creates {name!r}:\n{c}"
    assert name.decode() in c.out + c.err or _has_any(c.out + c.err, ("name", "path", "hostile", "unsafe", "invalid")), \
        f"restore's message does not say why it refused:\n{c}"
    for e in escaped:
        assert not e.exists(), f"restore wrote {e} outside the target"
    assert outside_target(case.workdir, case.target) == before, "restore wrote outside the target"


# --------------------------------------------------------------------------
# Symlinks that point out of the volume


@pytest.mark.timeout(300)
def test_symlink_out_of_target_with_writes_through_it(make_volume, workdir):
    vol = make_volume("v")
    outside = workdir / "outside"
    outside.mkdir()
    vol.start()
    vol.wait_window()
    m = vol.mount
    # A directory with an open file, renamed away and replaced by a symlink
    # to the outside: writes through the old handle go to the renamed file.
    (m / "d").mkdir()
    fd = os.open(m / "d" / "f", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"before\n")
    os.rename(m / "d", m / "d2")
    os.symlink(str(outside), m / "d")
    os.symlink("../../../../../../../../.." + str(outside), m / "rel")
    os.write(fd, b"after\n")
    os.close(fd)
    # Writes through the symlinks land outside the mount (the kernel follows
    # them); restore must never recreate them by following the links.
    (m / "d" / "through-abs").write_bytes(b"outside1")
    (m / "rel" / "through-rel").write_bytes(b"outside2")
    (m / "d2" / "g").write_bytes(b"inside")
    os.symlink("d2/f", m / "inner")
    with open(m / "inner", "ab") as f:
        f.write(b"via inner link\n")
    snap = helpers.snapshot(m)
    t = time.time_ns()
    (m / "after").write_bytes(b"x")
    vol.wait_latest(t)
    vol.stop()
    outside_before = helpers.tree_listing(outside)
    assert sorted(e[0] for e in outside_before) == ["through-abs", "through-rel"]
    vol.delete_local()
    target = workdir / "target"
    vol.restore(t, target)
    helpers.assert_same_tree(snap, helpers.snapshot(target), "restore with symlinks out of the volume")
    assert (target / "d2" / "f").read_bytes() == b"before\nafter\nvia inner link\n"
    assert helpers.tree_listing(outside) == outside_before, "restore wrote through a symlink out of the target"


# --------------------------------------------------------------------------
# The local journal


def frame_bounds(path: Path, rec: dict) -> tuple[int, int]:
    """(start, end) of a record's frame (len:u32 | check:8 | record), whether
    `rewind debug journal` reports the frame's or the record's offset/len."""
    with open(path, "rb") as f:
        f.seek(rec["offset"])
        head = f.read(4)
        (n,) = struct.unpack("<I", head)
        if n == rec["len"]:
            return rec["offset"], rec["offset"] + 12 + n
        if n + 12 == rec["len"]:
            return rec["offset"], rec["offset"] + rec["len"]
        f.seek(rec["offset"] - 12)
        (n,) = struct.unpack("<I", f.read(4))
        assert n == rec["len"], f"cannot locate the frame of {rec} in {path}"
        return rec["offset"] - 12, rec["offset"] + n


def journal_volume(make_volume, rng, files=40):
    """A volume whose writes after the base sit only in the journal (the
    segment interval is an hour), then kill -9."""
    vol = make_volume("v")
    helpers.fill_random(vol.source / "pre" / "a", 100000, rng)
    vol.start(segment_interval="3600s")
    # No wait for the window: with an hour-long interval the records only
    # need to be in the journal, which they are once acknowledged.
    acked = {}
    for k in range(files):
        data = rng.randbytes(rng.choice([10, 3000, 70000]))
        with open(vol.mount / f"f{k}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        acked[f"f{k}"] = data
    vol.kill9()
    return vol, acked


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tail", ["partial-frame", "garbage"])
def test_journal_torn_tail_is_cut_and_reported(make_volume, workdir, tail):
    rng = random.Random(5)
    vol, acked = journal_volume(make_volume, rng)
    recs = vol.debug_journal()
    assert recs, "no journal records after writes and a kill -9"
    last = max(recs, key=lambda r: r["seq"])
    path = Path(last["file"]) if os.path.isabs(last["file"]) else vol.journal / last["file"]
    _, end = frame_bounds(path, last)
    with open(path, "r+b") as f:
        f.seek(end)
        if tail == "partial-frame":
            f.write(struct.pack("<I", 300) + rng.randbytes(8) + rng.randbytes(120))
        else:
            f.write(rng.randbytes(64))
    # Restart with the default interval so the recovered records ship.
    vol.start()
    log = vol.log()
    assert _has_any(log, ("torn", "cut", "truncat")), f"the restart did not report the torn journal tail:\n{vol.log_tail(60)}"
    for name, data in acked.items():
        assert (vol.mount / name).read_bytes() == data, f"fsynced {name} lost after a torn tail"
    t = time.time_ns()
    (vol.mount / "after").write_bytes(b"x")
    vol.wait_latest(t)
    vol.stop()
    vol.delete_local()
    vol.restore("latest", workdir / "r")
    for name, data in acked.items():
        assert (workdir / "r" / name).read_bytes() == data, f"restore lost fsynced {name} after a torn tail"
    assert (workdir / "r" / "after").read_bytes() == b"x"


@pytest.mark.timeout(300)
def test_journal_flipped_byte_in_the_middle_is_refused(make_volume, workdir):
    rng = random.Random(6)
    vol, acked = journal_volume(make_volume, rng)
    recs = sorted(vol.debug_journal(), key=lambda r: r["seq"])
    assert len(recs) >= 10, f"only {len(recs)} journal records"
    mid = recs[len(recs) // 2]
    path = Path(mid["file"]) if os.path.isabs(mid["file"]) else vol.journal / mid["file"]
    start, end = frame_bounds(path, mid)
    with open(path, "r+b") as f:
        pos = start + 12 + (end - start - 12) // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    vol.start(segment_interval="3600s", wait_live=False)
    helpers.wait_until(lambda: not vol.alive(), 60, "`rewind run` to refuse the damaged journal",
                       on_timeout=vol._diag)
    assert vol.proc.returncode != 0, f"`rewind run` exited 0 over a damaged journal:\n{vol.log_tail()}"
    log = vol.log()
    assert _has_any(log, DAMAGE_WORDS) and "journal" in log.lower(), \
        f"`rewind run` did not say the journal is damaged:\n{vol.log_tail(60)}"
    assert not helpers.mount_is_live(vol.mount), "the mount went live over a damaged journal"
