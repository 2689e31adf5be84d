"""The fast path's correctness (issue 5): kernel read passthrough and its
io-mode conflict, journal files recycled under load, and direct or cached
writable opens.

test_read_passthrough_io_modes: with --read-passthrough, a read-only open
while no writer has the file is served by the kernel from the source file;
a writable open while such a reader exists is refused with ETXTBSY (the
kernel would fail it with EIO otherwise, and passthrough writes would skip
the journal); a read-only open while a writer exists is served by the
daemon and sees the writer's data; after the reader closes, writes work
again, are journaled and restored.

test_without_read_passthrough_writers_never_wait: the default serves every
open through the daemon, so a writer opening a file held by a reader works.

test_recycled_journal_files_survive_kill9: enough data to make the journal
rotate through released (recycled) files, a kill -9, a restart over the
dead mount, a clean stop, and a restore from the store alone that matches
what the mount showed byte for byte.

test_writable_opens_direct_or_cached: by default a writable open bypasses
the mount's page cache (one round trip per write; see OpenMode::Direct),
with --cached-writes it does not (checked with fincore); in both modes a
reader with a cached page sees a writer's later write, a shared map of the
writable open reaches the journal on msync, O_APPEND writes land at the end,
and a restore matches the mount.

test_remembered_missing_names_never_hide_a_change: the kernel caches "no such
name" answers; creates, exclusive creates, links, renames, mkdir, symlink,
mknod and re-creates after an unlink through the mount show at once, and the
restore has them.

test_a_write_by_an_unprivileged_user_clears_set_id_bits: set-user-ID and
set-group-ID bits after writes and truncates by a non-root user match the
native filesystem's, in both writable-open modes, and survive the restore.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import subprocess
import time

import pytest

import helpers


def _digest(path) -> str:
    return helpers.file_digest(str(path))


def test_read_passthrough_io_modes(volume, workdir):
    volume.start("--read-passthrough")
    f = volume.mount / "data"
    f.write_bytes(b"first version\n")

    reader = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(reader, 100, 0) == b"first version\n"
        with pytest.raises(OSError) as e:
            os.open(f, os.O_WRONLY)
        assert e.value.errno == errno.ETXTBSY, f"a writable open during a passthrough read gave {e.value!r}"
        assert "refusing a writable open (ETXTBSY)" in volume.log(), "the refusal is logged with its reason"
    finally:
        os.close(reader)

    # The reader is gone: writing works again (the daemon waits for the
    # kernel's RELEASE of the reader rather than refusing).
    w = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(w, b"SECOND", 0)
        # A read-only open while a writer exists is served by the daemon.
        r = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(r, 100, 0) == b"SECONDversion\n"
        finally:
            os.close(r)
        os.fsync(w)
    finally:
        os.close(w)

    # Passthrough reads see what went through the daemon to the source.
    r = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(r, 100, 0) == b"SECONDversion\n"
    finally:
        os.close(r)
    want = _digest(f)
    volume.stop()
    volume.delete_local()
    target = workdir / "restored"
    volume.restore("latest", target)
    assert _digest(target / "data") == want


def test_without_read_passthrough_writers_never_wait(volume):
    volume.start()
    f = volume.mount / "data"
    f.write_bytes(b"abc")
    reader = os.open(f, os.O_RDONLY)
    try:
        w = os.open(f, os.O_WRONLY)
        os.pwrite(w, b"xyz", 0)
        os.close(w)
        assert os.pread(reader, 10, 0) == b"xyz"
    finally:
        os.close(reader)
    volume.stop()


def test_recycled_journal_files_survive_kill9(volume, workdir):
    volume.start()
    data = volume.mount / "big"
    block = 1 << 20
    # 64 MiB journal files: 200 MiB of incompressible writes, with the
    # shipper releasing behind, makes the journal reuse released files.
    fd = os.open(data, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(200):
            os.pwrite(fd, hashlib.sha256(str(i).encode()).digest() * (block // 32), (i % 50) * block)
            if i % 20 == 19:
                os.fsync(fd)
    finally:
        os.close(fd)

    def recycled():
        # Released files become spares named after their first sequence
        # number; zero-filled ones are called new-N.spare.
        return any(not p.name.startswith("new-") for p in volume.journal.glob("*.spare")) and \
            any(p.stat().st_size for p in volume.journal_files())

    helpers.wait_until(recycled, 60, "a released journal file kept as a spare", interval=0.1)
    # More writes land in recycled files; then the daemon dies.
    fd = os.open(data, os.O_WRONLY)
    try:
        for i in range(200, 330):
            os.pwrite(fd, hashlib.sha256(str(i).encode()).digest() * (block // 32), (i % 50) * block)
    finally:
        os.close(fd)
    want = _digest(data)
    volume.kill9()
    volume.start()
    assert _digest(data) == want, "the mount shows every acknowledged write after the restart"
    volume.stop()
    volume.delete_local()
    target = workdir / "restored"
    volume.restore("latest", target)
    assert _digest(target / "big") == want


def test_machine_crash_redo_puts_fsynced_data_back_into_the_source(volume, workdir):
    """fsync waits for the journal alone, so after a power loss the source
    may lack what fsync acknowledged; the restart redoes the journal onto
    the source. The crash is simulated: kill -9, then the source is put
    back to what a lost page cache would leave (a new file gone, an append
    cut off, a rename undone, a setattr lost), and the daemon restarts with
    another boot id."""
    volume.start(env={"REWIND_BOOT_ID": "boot-a-" + os.urandom(4).hex()})
    volume.wait_window()
    m, s = volume.mount, volume.source
    (m / "d").mkdir()
    (m / "log").write_bytes(b"line 1\n")
    (m / "old").write_bytes(b"to be renamed")
    (m / "mode").write_bytes(b"x")
    volume.stop()  # a clean stop syncs the source: this is the durable state
    volume.start(env={"REWIND_BOOT_ID": "boot-a2-" + os.urandom(4).hex()})

    with open(m / "d" / "new", "wb") as f:
        f.write(b"created and fsynced")
        os.fsync(f.fileno())
    with open(m / "log", "ab") as f:
        f.write(b"line 2\n")
        os.fsync(f.fileno())
    os.rename(m / "old", m / "d" / "renamed")
    os.chmod(m / "mode", 0o600)
    with open(m / "log", "ab") as f:
        os.fsync(f.fileno())  # one group commit makes all of the above durable
    before = volume.wait_window()["lineage"]
    volume.kill9()

    # What a lost page cache leaves in the source.
    os.unlink(s / "d" / "new")
    with open(s / "log", "r+b") as f:
        f.truncate(len(b"line 1\n"))
    os.rename(s / "d" / "renamed", s / "old")
    os.chmod(s / "mode", 0o644)

    volume.start(env={"REWIND_BOOT_ID": "boot-b-" + os.urandom(4).hex()})
    assert "redid the journal onto the source" in volume.log()
    assert (m / "d" / "new").read_bytes() == b"created and fsynced"
    assert (m / "log").read_bytes() == b"line 1\nline 2\n"
    assert (m / "d" / "renamed").read_bytes() == b"to be renamed" and not (m / "old").exists()
    assert (m / "mode").stat().st_mode & 0o777 == 0o600
    # The machine crash starts a new lineage, restorable once its base is
    # complete; the old lineage's window does not cover what follows.
    helpers.wait_until(lambda: (volume.window() or {}).get("lineage") not in (None, before), 120,
                       "the new lineage's window to open", interval=0.1)
    want = helpers.snapshot(m)
    t = time.time_ns()
    (m / "after").write_bytes(b"x")
    volume.wait_latest(t, timeout=120)
    volume.stop()
    volume.delete_local()
    target = workdir / "restored"
    volume.restore(t, target)
    helpers.assert_same_tree(want, helpers.snapshot(target), "restore after the redo")


def _resident(path) -> int:
    """Bytes of path in the mount's page cache (fincore: mincore over a map, reads nothing)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_the_file_store_leaves_no_pages_in_the_cache(volume, workdir):
    """Every object the file:// store writes is dropped from the page cache
    once synced: the store keeps a second copy of everything the
    application writes, and cached it would crowd the application's own
    pages out (and it cost the daemon 15% of its CPU under random writes).
    The objects still read back whole: the restore below reads them all."""
    volume.start()
    # The restore below is at t, which must fall inside the window: the
    # first base must be complete before t (it was not, under load).
    volume.wait_window()
    m = volume.mount
    want = os.urandom(8 << 20)
    (m / "big").write_bytes(want)
    t = time.time_ns()
    (m / "after").write_bytes(b"x")  # a record after t, so the window reaches t without a heartbeat
    volume.wait_latest(t, timeout=120)
    objects = [p for p in volume.store_dir.rglob("*") if p.is_file() and not p.name.startswith(".tmp.")]
    segments = [p for p in objects if p.suffix == ".rws"]
    assert sum(p.stat().st_size for p in segments) >= len(want), f"segments hold the write: {segments}"
    cached = {str(p.relative_to(volume.store_dir)): _resident(p) for p in objects}
    assert not any(cached.values()), f"store objects left in the page cache: {cached}"
    volume.stop()
    target = workdir / "restored"
    volume.restore(t, target)
    assert (target / "big").read_bytes() == want


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cached-writes"])
def test_writable_opens_direct_or_cached(volume, workdir, cached):
    """Writable opens bypass the mount's page cache unless --cached-writes:
    either way readers stay coherent with writers, shared maps of a writable
    open work (SQLite's -shm, LMDB) and reach the journal when synced, and
    appends land at the end."""
    volume.start(*(["--cached-writes"] if cached else []))
    f = volume.mount / "data"
    block = os.urandom(256 << 10)
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, block, 0)
        resident = _resident(f)
        if cached:
            assert resident >= len(block), f"--cached-writes: a written page stays cached ({resident} bytes)"
        else:
            assert resident == 0, f"a writable open bypasses the mount's page cache ({resident} bytes cached)"

        # A reader with the first page cached sees the writer's next write.
        r = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(r, 4096, 0) == block[:4096]
            os.pwrite(fd, b"NEW", 10)
            assert os.pread(r, 16, 0) == block[:10] + b"NEW" + block[13:16]
            # Reads through the writable handle see it too.
            assert os.pread(fd, 16, 0) == block[:10] + b"NEW" + block[13:16]
        finally:
            os.close(r)

        # A shared map of the writable open: stores reach the daemon on msync.
        with mmap.mmap(fd, len(block)) as m:
            m[5000:5005] = b"HELLO"
            m.flush()
        r = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(r, 5, 5000) == b"HELLO"
        finally:
            os.close(r)
    finally:
        os.close(fd)

    a = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(a, b"tail-1")
        os.write(a, b"tail-2")
    finally:
        os.close(a)
    assert f.stat().st_size == len(block) + 12
    want = _digest(f)
    volume.stop()
    volume.delete_local()
    target = workdir / "restored"
    volume.restore("latest", target)
    got = (target / "data").read_bytes()
    assert got[5000:5005] == b"HELLO" and got.endswith(b"tail-1tail-2")
    assert _digest(target / "data") == want


def test_remembered_missing_names_never_hide_a_change(volume, workdir):
    """The daemon lets the kernel remember that a name does not exist
    (negative entries, see NEGATIVE_TTL in fs/fuse.rs): asked about a
    missing name three times, the daemon sees one LOOKUP (fuser's request
    log). Every way of making the name exist through the mount must show at
    once, to this process and to another one, and the restore must have it."""
    volume.start(env={"REWIND_LOG": "info,fuser::request=debug"})
    m = volume.mount

    for _ in range(3):
        assert not os.path.exists(m / "asked-thrice")
    lookups = volume.log().count('LOOKUP name "asked-thrice"')
    assert lookups == 1, f"a missing name was looked up {lookups} times, not remembered"

    def missing(name):
        with pytest.raises(FileNotFoundError):
            os.stat(m / name)

    def seen_elsewhere(name) -> bool:
        return subprocess.run(["stat", str(m / name)], capture_output=True).returncode == 0

    for name in ("file", "excl", "link", "moved", "dir", "sym", "node", ".rewind"):
        missing(name)
    assert not seen_elsewhere("file")

    (m / "file").write_bytes(b"one")
    assert (m / "file").read_bytes() == b"one" and seen_elsewhere("file")
    fd = os.open(m / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.link(m / "file", m / "link")
    assert os.stat(m / "link").st_nlink == 2
    os.rename(m / "link", m / "moved")
    missing("link")
    assert (m / "moved").read_bytes() == b"one" and seen_elsewhere("moved")
    os.mkdir(m / "dir")
    os.symlink("file", m / "sym")
    os.mkfifo(m / "node")
    for name in ("excl", "dir", "sym", "node"):
        assert seen_elsewhere(name), name

    # Gone, remembered as gone, and back again.
    os.unlink(m / "file")
    missing("file")
    (m / "file").write_bytes(b"two")
    assert (m / "file").read_bytes() == b"two"
    missing(".rewind")

    listing = sorted(os.listdir(m))
    assert listing == ["dir", "excl", "file", "moved", "node", "sym"], listing
    volume.stop()
    volume.delete_local()
    target = workdir / "restored"
    volume.restore("latest", target)
    assert sorted(os.listdir(target)) == listing
    assert (target / "file").read_bytes() == b"two" and (target / "moved").read_bytes() == b"one"
    assert os.readlink(target / "sym") == "file"


_KILL_PRIVS = """
cd "$1"
for m in 6775 6755 2755 2745 4700 0755; do
  touch "w$m" && chmod "$m" "w$m" && printf x >> "w$m"
  touch "t$m" && chmod "$m" "t$m" && : > "t$m"
done
stat -c '%n %a' w* t*
"""


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cached-writes"])
def test_a_write_by_an_unprivileged_user_clears_set_id_bits(volume, workdir, cached):
    """As natively: a write (or truncate) by a user without CAP_FSETID clears
    set-user-ID, and set-group-ID when group-executable; a write by root keeps
    them. The daemon writes as root, so for writes that bypass the mount's
    page cache it must clear them itself; stat shows it at once, and the
    restore has the cleared modes."""
    native = workdir / "native"
    native.mkdir()
    os.chmod(native, 0o777)
    volume.start(*(["--cached-writes"] if cached else []))
    os.chmod(volume.mount, 0o777)
    outs = []
    for d in (native, volume.mount):
        r = helpers.as_user(helpers.NONROOT_UID, helpers.NONROOT_GID, _KILL_PRIVS, d)
        assert r.returncode == 0, r.stderr.decode()
        outs.append(r.stdout.decode())
    assert outs[0] == outs[1], f"native:\n{outs[0]}\nmount:\n{outs[1]}"
    assert "w6775 775" in outs[1] and "w2745 2745" in outs[1], outs[1]

    for d in (native, volume.mount):
        (d / "root").write_bytes(b"")
        os.chmod(d / "root", 0o6775)
        with open(d / "root", "ab") as f:
            f.write(b"x")
    assert os.stat(volume.mount / "root").st_mode & 0o7777 == 0o6775
    assert os.stat(native / "root").st_mode & 0o7777 == 0o6775

    modes = {p.name: p.stat().st_mode & 0o7777 for p in volume.mount.iterdir()}
    volume.stop()
    volume.delete_local()
    target = workdir / "restored"
    volume.restore("latest", target)
    assert {p.name: p.stat().st_mode & 0o7777 for p in target.iterdir()} == modes
