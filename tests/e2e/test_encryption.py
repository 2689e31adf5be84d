"""Client-side encryption (issue 15) through a real mount and a real store.

test_no_object_holds_the_known_plaintext: a known file (compressible text
and incompressible bytes) is written through the mount and captured by a
periodic base. A plaintext control volume shows that the search works: its
objects hold the text verbatim and its lz4-compressed form (read back from
the control's own chunk object), and its chunk key is blake3 of the content.
The encrypted volume (file:// and a moto S3 server) holds none of these in
any object's bytes or key, and every object but the wrapped data key is a
sealed envelope.

test_mismatched_keys_are_refused_and_nothing_is_uploaded: a missing key
file, a key file of the wrong length, a wrong key, a key for a plaintext
volume and no key for an encrypted one: `rewind run` exits at start with the
message that names the case, the mount never goes live and the store is byte
for byte as before; restore, ls and verify refuse the same way.

test_tampering_is_caught_by_restore_and_verify: a flipped byte in a segment
or a chunk, two segments swapped and a heartbeat swapped with the lineage marker each
make
`rewind verify` report damage naming the object, and (when restore reads the
object: not a heartbeat) `rewind restore` fail.

test_key_rotation: after `rewind key rotate`, every kept instant restores
with the new key to the mount's tree at that instant, no data object
changed, and the old key is refused.

test_differential_encrypted: the core differential suite (test_differential,
one seed, a smaller prefill) on an encrypted volume: every instant restores
equal to the mount, as it does unencrypted.

test_prune_on_an_encrypted_volume: two prunes through the sealed store
delete the older base; the kept instant restores, verify passes, and every
object left is sealed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import blake3
import pytest

import helpers
import test_differential as differential
import test_s3_restore as s3_restore
from s3fixtures import bucket, make_s3_volume, s3  # noqa: F401  (fixtures)

SEALED = b"RWSEAL01"
TEXT = b"".join(b"known-secret-%06d the quick brown fox jumps over the lazy dog\n" % i for i in range(3000))
NOISE = random.Random(15).randbytes(64 << 10)
KNOWN = TEXT[:100_000] + NOISE  # < 1 MiB: one chunk


def write_key(path: Path, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(32))
    return path


def encrypt(vol, key: Path):
    """Makes every `rewind` the volume's helpers run use `key`."""
    plain_env = vol.env

    def env(extra=None):
        e = plain_env(extra)
        e["REWIND_ENCRYPTION_KEY_FILE"] = str(key)
        if extra and "REWIND_ENCRYPTION_KEY_FILE" in extra:
            # None runs without a key.
            given = extra["REWIND_ENCRYPTION_KEY_FILE"]
            if given is None:
                del e["REWIND_ENCRYPTION_KEY_FILE"]
            else:
                e["REWIND_ENCRYPTION_KEY_FILE"] = given
        return e

    vol.env = env
    return vol


def file_objects(vol) -> dict[str, bytes]:
    root = Path(vol.store_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def s3_objects(vol) -> dict[str, bytes]:
    c = vol.s3.client()
    return {k: c.get_object(Bucket=vol.bucket, Key=k)["Body"].read() for k in vol.keys()}


def write_known_and_wait_for_base(vol):
    """Starts with a short base interval, writes KNOWN through the mount and
    waits for a periodic base that started after the whole write was
    stored (its start_seq is past every record of it), then stops."""
    (vol.source / "seed").write_text("seed")
    vol.start("--base-interval", "1s")
    vol.wait_window()
    with open(vol.mount / "known", "wb") as f:
        f.write(KNOWN)
        os.fsync(f.fileno())
    t = time.time_ns()
    (vol.mount / "tick").write_text("0")
    vol.wait_latest(t)
    stored = max(s["last_seq"] for s in vol.ls()["segments"])
    ticks = [0]

    def captured():
        # A periodic base is taken only after something was written.
        ticks[0] += 1
        (vol.mount / "tick").write_text(str(ticks[0]))
        return any(b["start_seq"] >= stored and b["kind"] == "periodic" for b in vol.ls()["bases"])

    helpers.wait_until(captured, 90, f"a periodic base from seq {stored} on (after the known write)",
                       interval=0.3, on_timeout=vol._diag)
    vol.stop()


def needles(control) -> dict[str, bytes]:
    """What a leak would look like, each checked to be found in the
    plaintext control volume's objects."""
    objs = file_objects(control)
    chunk_hex = blake3.blake3(KNOWN).hexdigest()
    chunk = [v for k, v in objs.items() if k.endswith(f"chunk/{chunk_hex}")]
    assert chunk, f"the control volume has no chunk named blake3(content): {sorted(objs)[:20]}"
    # The chunk body after magic, version and raw length is the lz4 form.
    compressed = chunk[0][14:14 + 96]
    assert compressed not in KNOWN, "the compressed form must differ from the plaintext"
    found = {
        # The text's first line is an lz4 literal; later lines are matches.
        "plaintext text": b"known-secret-0",
        "plaintext words": b"quick brown fox jumps over",
        "plaintext noise": NOISE[1000:1048],
        "lz4 form": compressed,
    }
    for what, n in found.items():
        assert any(n in v for v in objs.values()), f"control: {what} not found in any plaintext object"
    return {**found, "chunk name": chunk_hex.encode()}


def assert_sealed_without(objs: dict[str, bytes], leaks: dict[str, bytes], where: str):
    assert objs, f"{where}: no objects"
    for k, v in objs.items():
        if "/keys/" in f"/{k}":
            assert k.endswith(".rwk") and v.startswith(b"RWKEY001"), k
            continue
        assert v.startswith(SEALED), f"{where}: {k} is not a sealed object: {v[:16]!r}"
        for what, n in leaks.items():
            assert n not in v, f"{where}: {k} contains the {what}"
            assert n.decode(errors="replace") not in k, f"{where}: key {k} contains the {what}"


@pytest.mark.timeout(400)
def test_no_object_holds_the_known_plaintext(make_volume, make_s3_volume, workdir):
    control = make_volume("control")
    write_known_and_wait_for_base(control)
    leaks = needles(control)

    key = write_key(workdir / "key", 1)
    vol = encrypt(make_volume("enc"), key)
    write_known_and_wait_for_base(vol)
    assert_sealed_without(file_objects(vol), leaks, "file://")
    assert "encrypted" in vol.log()

    s3v = encrypt(make_s3_volume("s3enc"), key)
    write_known_and_wait_for_base(s3v)
    assert_sealed_without(s3_objects(s3v), leaks, "s3://")

    for v in (vol, s3v):
        t = v.ls()["window"]["latest_ns"]
        v.delete_local()
        target = workdir / f"restore-{v.root.name}"
        v.restore(t, target)
        assert (target / "known").read_bytes() == KNOWN
        c = v.verify()
        assert c.code == 0, str(c)


def store_state(vol) -> dict[str, tuple[int, int]]:
    root = Path(vol.store_dir)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def refused_run(vol, key_env: dict, expect: str):
    before = store_state(vol)
    vol.start(env=key_env, wait_live=False)
    code = vol.proc.wait(timeout=60)
    log = vol.log()
    assert code != 0, f"`rewind run` started ({expect!r} expected):\n{log}"
    assert expect in log, f"`rewind run` refused without saying {expect!r}:\n{log}"
    assert not helpers.is_fuse_mounted(vol.mount), "the refused run mounted"
    assert store_state(vol) == before, "the refused run changed the store"
    return log


@pytest.mark.timeout(300)
def test_mismatched_keys_are_refused_and_nothing_is_uploaded(make_volume, workdir):
    a = write_key(workdir / "a", 1)
    b = write_key(workdir / "b", 2)
    short = workdir / "short"
    short.write_bytes(b"x" * 31)
    missing = workdir / "no-such-key"

    empty = make_volume("empty")
    for key, expect in ((missing, "cannot read the encryption key file"),
                        (short, "must hold 32 random bytes")):
        refused_run(empty, {"REWIND_ENCRYPTION_KEY_FILE": str(key)}, expect)
        assert store_state(empty) == {}, "an object was stored"

    plain = make_volume("plain")
    (plain.source / "f").write_text("plain")
    plain.start()
    plain.wait_window()
    plain.stop()
    refused_run(plain, {"REWIND_ENCRYPTION_KEY_FILE": str(a)}, "the volume is not encrypted")

    enc = encrypt(make_volume("enc"), a)
    (enc.source / "f").write_text("secret")
    enc.start()
    enc.wait_window()
    t = enc.ls()["window"]["latest_ns"]
    enc.stop()
    refused_run(enc, {"REWIND_ENCRYPTION_KEY_FILE": str(b)}, "wrong encryption key")
    refused_run(enc, {"REWIND_ENCRYPTION_KEY_FILE": None}, "the volume is encrypted")

    # The read-only commands refuse the same cases.
    for vol, env, expect in ((enc, {}, "the volume is encrypted"),
                             (enc, {"REWIND_ENCRYPTION_KEY_FILE": str(b)}, "wrong encryption key"),
                             (plain, {"REWIND_ENCRYPTION_KEY_FILE": str(a)}, "the volume is not encrypted")):
        e = {k: v for k, v in vol.env().items() if k != "REWIND_ENCRYPTION_KEY_FILE"}
        e.update(env)
        for args in (["ls"], ["verify"], ["restore", "--at", "latest", "--target", workdir / "never"]):
            c = helpers.rewind(*args, *vol.store_args(), env=e, timeout=60)
            assert c.code != 0 and expect in c.err, f"{args[0]} did not refuse with {expect!r}:\n{c}"
    assert not (workdir / "never").exists()
    enc.delete_local()
    enc.restore(t, workdir / "ok")
    assert (workdir / "ok" / "f").read_text() == "secret"


def objects_of(vol, kind: str) -> list[Path]:
    return sorted((Path(vol.store_dir) / vol.name / kind).glob("*"))


@pytest.mark.timeout(300)
def test_tampering_is_caught_by_restore_and_verify(make_volume, workdir):
    key = write_key(workdir / "key", 3)
    vol = encrypt(make_volume(), key)
    rng = random.Random(3)
    helpers.fill_random(vol.source / "big", 3 << 20, rng)
    vol.start()
    vol.wait_window()
    for i in range(4):
        t = time.time_ns()
        (vol.mount / f"f{i}").write_bytes(rng.randbytes(5000))
        vol.wait_latest(t + 1)
    vol.stop()
    vol.delete_local()
    c = vol.verify()
    assert c.code == 0, f"the pristine encrypted volume does not verify:\n{c}"

    segs, chunks = objects_of(vol, "seg"), objects_of(vol, "chunk")
    markers = objects_of(vol, "hb")[:1] + objects_of(vol, "lineage")[:1]
    assert len(segs) >= 2 and chunks and len(markers) == 2, (segs, chunks, markers)

    def flip(p: Path):
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))

    def swap(p: Path, q: Path):
        a, b = p.read_bytes(), q.read_bytes()
        p.write_bytes(b)
        q.write_bytes(a)

    # (what, objects damaged, damage, whether restore reads them)
    cases = [
        ("flipped byte in the newest segment", [segs[-1]], lambda: flip(segs[-1]), True),
        ("flipped byte in a chunk", [chunks[0]], lambda: flip(chunks[0]), True),
        ("two segments swapped", [segs[-1], segs[-2]], lambda: swap(segs[-1], segs[-2]), True),
        ("heartbeat and lineage marker swapped", markers, lambda: swap(*markers), False),
    ]
    for n, (what, paths, damage, restore_reads) in enumerate(cases):
        saved = {p: p.read_bytes() for p in paths}
        damage()
        c = vol.verify()
        assert c.code != 0 and "DAMAGE" in c.out, f"verify missed the {what}:\n{c}"
        assert any(p.name in c.out for p in paths), f"verify does not name the damaged object ({what}):\n{c}"
        assert "authentication failed" in c.out, f"verify does not say the tag failed ({what}):\n{c}"
        if restore_reads:
            r = vol.restore("latest", workdir / f"r{n}", check=False)
            assert r.code != 0 and "authentication failed" in r.err, f"restore missed the {what}:\n{r}"
        for p, data in saved.items():
            p.write_bytes(data)
    assert vol.verify().code == 0


@pytest.mark.timeout(300)
def test_key_rotation(make_volume, workdir):
    a = write_key(workdir / "a", 1)
    b = write_key(workdir / "b", 2)
    vol = encrypt(make_volume(), a)
    rng = random.Random(4)
    (vol.source / "seed").write_bytes(rng.randbytes(100_000))
    vol.start()
    vol.wait_window()
    points = []
    for i in range(3):
        (vol.mount / f"f{i}").write_bytes(rng.randbytes(20_000))
        (vol.mount / "seed").write_bytes(rng.randbytes(100_000))
        snap = helpers.snapshot(vol.mount)
        t = time.time_ns()
        points.append((t, snap))
    (vol.mount / "after").write_text("x")
    vol.wait_latest(points[-1][0])
    vol.stop()
    vol.delete_local()
    before = {k: v for k, v in file_objects(vol).items() if "/keys/" not in f"/{k}"}

    c = helpers.rewind("key", "rotate", *vol.store_args(), "--old-key-file", a, "--new-key-file", b,
                       env=vol.env(), timeout=60)
    assert c.code == 0, str(c)
    after = file_objects(vol)
    assert {k: v for k, v in after.items() if "/keys/" not in f"/{k}"} == before, "rotation rewrote data"
    assert len([k for k in after if "/keys/" in f"/{k}"]) == 1, "the old wrapping is still there"

    newkey = encrypt(vol, b)
    for i, (t, snap) in enumerate(points):
        target = workdir / f"r{i}"
        newkey.restore(t, target)
        helpers.assert_same_tree(snap, helpers.snapshot(target), f"restore with the new key at point {i}")
    e = {**vol.env(), "REWIND_ENCRYPTION_KEY_FILE": str(a)}
    c = helpers.rewind("restore", *vol.store_args(), "--at", "latest", "--target", workdir / "old", env=e, timeout=60)
    assert c.code != 0 and "wrong encryption key" in c.err, f"the old key still opens the volume:\n{c}"
    c = helpers.rewind("key", "rotate", *vol.store_args(), "--old-key-file", a, "--new-key-file", b,
                       env=vol.env(), timeout=60)
    assert c.code != 0 and "wrong encryption key" in c.err, f"rotating from the old key again:\n{c}"


@pytest.mark.timeout(900)
def test_differential_encrypted(make_volume, workdir, monkeypatch):
    monkeypatch.setattr(differential, "SINGLE_INSTANTS", 3)
    monkeypatch.setattr(differential, "prefill", s3_restore.small_prefill)
    key = write_key(workdir / "key", 5)
    differential.test_differential_restore_matches_mount(
        lambda *a, **kw: encrypt(make_volume(*a, **kw), key), workdir, 1)
    objs = file_objects(helpers.Volume(workdir / "v"))
    assert all(v.startswith(SEALED) for k, v in objs.items() if "/keys/" not in f"/{k}")


@pytest.mark.timeout(300)
def test_prune_on_an_encrypted_volume(make_volume, workdir):
    """Prune reads, writes (markers) and deletes through the sealed store:
    after two prunes that keep only the newest base and what follows it,
    the older base is gone, the kept instants restore exactly, verify
    passes, and every object left is sealed."""
    key = write_key(workdir / "key", 6)
    vol = encrypt(make_volume(), key)
    rng = random.Random(6)
    helpers.fill_random(vol.source / "old", 300_000, rng)
    vol.start()
    vol.wait_window()
    (vol.mount / "gen1").write_bytes(rng.randbytes(50_000))
    t1 = time.time_ns()
    (vol.mount / "tick").write_text("1")
    vol.wait_latest(t1)
    vol.kill9()
    vol.start()  # an unclean stop: a repair base follows
    helpers.wait_until(lambda: len(vol.ls()["bases"]) >= 2, 90, "the repair base", interval=0.2,
                       on_timeout=vol._diag)
    (vol.mount / "old").unlink()
    (vol.mount / "gen2").write_bytes(rng.randbytes(50_000))
    snap = helpers.snapshot(vol.mount)
    t2 = time.time_ns()
    (vol.mount / "tick").write_text("2")
    vol.wait_latest(t2)
    vol.stop()
    first_base = vol.ls()["bases"][0]["key"]
    policy = ["--keep-seconds", "1s", "--keep-minutes", "0s", "--keep-hours", "0s", "--keep-days", "0s",
              "--grace", "0s"]
    for _ in range(2):
        c = helpers.rewind("prune", *vol.store_args(), *policy, env=vol.env(), timeout=120)
        assert c.code == 0, str(c)
    objs = file_objects(vol)
    assert not any(k.endswith(first_base) for k in objs), f"the first base {first_base} was not pruned"
    assert all(v.startswith(SEALED) for k, v in objs.items() if "/keys/" not in f"/{k}")
    vol.delete_local()
    vol.restore(t2, workdir / "r")
    helpers.assert_same_tree(snap, helpers.snapshot(workdir / "r"), "restore after prune")
    c = vol.verify()
    assert c.code == 0, str(c)
