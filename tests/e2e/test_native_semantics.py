"""The mount against the disk under it: the same operations run on a plain
directory of the native filesystem and through the mount (both on the same
filesystem, by the same uid, gid and umask, in a fresh process each), and
every result must be the same: each call's errno and the resulting tree
(types, modes, owners, device numbers, contents, holes). Then the daemon is
stopped, its source and journal deleted, and the restore from the store
must give the mount's tree again.

Covered: the caller's umask and mode (umask 0, 002, 022, 077; as root and
as a non-root uid; in a plain, a setgid and a default-ACL directory), Unix
domain sockets bound inside the mount, mknod of fifos, sockets and
character and block devices, the fallocate modes the kernel passes to FUSE,
and the cases FUSE cannot carry (O_TMPFILE, FALLOC_FL_COLLAPSE_RANGE and
FALLOC_FL_INSERT_RANGE), which must fail with the errno docs/SEMANTICS.md
names. A restore by a user without CAP_MKNOD must complete, leave the
device nodes out and name them; a redo after a machine crash must make the
special files again; special files already in the source must be in the
initial base; and a store written by the last format 1 build must still
verify and restore.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest

import helpers
from helpers import NONROOT_GID, NONROOT_UID, SETGID_GID

PY = os.path.realpath(sys.executable)

# Run in a fresh process as the given uid, gid and umask: a list of
# operations (JSON on stdin) on paths relative to argv[1], printing one result per
# operation (0 or the errno's name, plus what the operation observed).
WORKER = r'''
import ctypes, errno, json, os, socket, stat, sys
root, umask, ops = sys.argv[1], int(sys.argv[2]), json.load(sys.stdin)
os.umask(umask)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

def data_map(fd):
    size, pos, out = os.fstat(fd).st_size, 0, []
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append([d, h])
        pos = h
    return out

def run(op):
    kind, rel = op[0], op[1]
    p = os.path.join(root, rel)
    if kind == "open":
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, op[2]))
    elif kind == "mkdir":
        os.mkdir(p, op[2])
    elif kind == "mkfifo":
        os.mkfifo(p, op[2])
    elif kind == "mknod":
        os.mknod(p, op[2], os.makedev(op[3], op[4]))
    elif kind == "bind":
        # Bind, then prove the socket works through its path.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(p)
        s.listen(1)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(p)
        a, _ = s.accept()
        c.sendall(b"ping")
        got = a.recv(4)
        for x in (a, c, s):
            x.close()
        return got.decode()
    elif kind == "devnull":
        # Open a (1, 3) node and use it: writes vanish, reads are empty.
        fd = os.open(p, os.O_RDWR)
        try:
            return [os.write(fd, b"gone"), os.read(fd, 10).decode()]
        finally:
            os.close(fd)
    elif kind == "write":
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
        os.pwrite(fd, bytes.fromhex(op[2]), op[3])
        os.close(fd)
    elif kind == "fallocate":
        fd = os.open(p, os.O_RDWR)
        try:
            if libc.fallocate(fd, op[2], op[3], op[4]) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            st = os.fstat(fd)
            return [st.st_size, st.st_blocks, data_map(fd)]
        finally:
            os.close(fd)
    elif kind == "map":
        fd = os.open(p, os.O_RDONLY)
        try:
            return [os.fstat(fd).st_size, data_map(fd)]
        finally:
            os.close(fd)
    elif kind == "tmpfile":
        fd = os.open(p, os.O_TMPFILE | os.O_RDWR, op[2])
        os.close(fd)
    else:
        raise SystemExit(f"unknown op {kind}")
    return None

out = []
for op in ops:
    try:
        out.append([0, run(op)])
    except OSError as e:
        # ENOTSUP and EOPNOTSUPP are one number on Linux: use the name
        # the kernel's sources and docs/SEMANTICS.md use.
        name = "EOPNOTSUPP" if e.errno == errno.EOPNOTSUPP else errno.errorcode.get(e.errno, str(e.errno))
        out.append([name, None])
print(json.dumps(out))
'''


def run_ops(root, ops, *, umask=0o022, uid=0, gid=0) -> list:
    argv = [PY, "-c", WORKER, str(root), str(umask)]
    if uid != 0:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"] + argv
    p = subprocess.run(argv, input=json.dumps(ops), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"worker failed ({argv[:6]}...):\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def both(vol, native, ops, **kw) -> list:
    """Runs `ops` through the mount and natively; asserts identical results."""
    got = run_ops(vol.mount, ops, **kw)
    want = run_ops(native, ops, **kw)
    diffs = [f"{op}: native {w} mount {g}" for op, w, g in zip(ops, want, got) if w != g]
    assert not diffs, f"the mount differs from the native filesystem ({kw}):\n  " + "\n  ".join(diffs)
    return got


def specials(root) -> dict:
    """Every entry that is not a file, directory or symlink: its type bits
    and device number (helpers.snapshot compares modes, not st_rdev)."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), os.major(st.st_rdev),
                                                 os.minor(st.st_rdev))
    return out


def default_acl(entries) -> bytes:
    """A system.posix_acl_default value: (tag, perm) entries, no ids."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF) for t, p in entries)


ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER = 0x01, 0x04, 0x20


def prepare(root) -> None:
    """The directories every case works in, made before the daemon starts
    (so the initial base holds them): plain, setgid (group SETGID_GID), and
    one with a default ACL u::rwx g::rwx o::r-x, under which Linux ignores
    the umask."""
    for name, mode, gid in (("plain", 0o777, 0), ("sgid", 0o2777, SETGID_GID), ("acl", 0o777, 0)):
        d = os.path.join(root, name)
        os.mkdir(d)
        os.chown(d, 0, gid)
        os.chmod(d, mode)
    os.setxattr(os.path.join(root, "acl"), "system.posix_acl_default",
                default_acl([(ACL_USER_OBJ, 7), (ACL_GROUP_OBJ, 7), (ACL_OTHER, 5)]))


@pytest.fixture
def pair(make_volume, workdir):
    vol = make_volume("v")
    native = workdir / "native"
    native.mkdir()
    os.chmod(native, 0o755)
    prepare(vol.source)
    prepare(native)
    vol.start()
    vol.wait_window()
    return vol, native


def assert_same_as_native(vol, native, what) -> helpers.Snapshot:
    snap = helpers.snapshot(vol.mount)
    # mtimes differ by when each side ran; the restore compares them.
    helpers.assert_same_tree(helpers.snapshot(native), snap, f"{what}: mount vs native", mtime=False)
    assert specials(vol.mount) == specials(native), f"{what}: special files differ from native"
    return snap


def stop_and_restore(vol, workdir, snap, what, *, wrapper=()) -> helpers.Cmd:
    """Stops the daemon (everything stored), deletes the source, journal and
    HOME, restores the latest instant (run under `wrapper`, e.g. setpriv)
    and, without a wrapper, compares the result with `snap`."""
    want_specials = specials(vol.mount)
    vol.stop()
    vol.delete_local()
    target = workdir / "restored"
    argv = [*wrapper, helpers.REWIND_BIN, "restore", *vol.store_args(), "--at", "latest",
            "--target", str(target)]
    p = subprocess.run(argv, capture_output=True, text=True, env=vol.env(), timeout=300)
    c = helpers.Cmd(argv, p.returncode, p.stdout, p.stderr)
    assert c.code == 0, f"{what}: restore failed:\n{c}"
    if not wrapper:
        helpers.assert_same_tree(snap, helpers.snapshot(target), f"{what}: restored vs mount")
        assert specials(target) == want_specials, f"{what}: restored special files differ"
    return c


UMASKS = (0, 0o002, 0o022, 0o077)
FILE_MODES = (0o620, 0o664, 0o666, 0o777, 0o4755, 0o2755, 0o1777)
DIR_MODES = (0o620, 0o775, 0o777, 0o1777, 0o2750)


@pytest.mark.parametrize("who", ["root", "nonroot"])
def test_umask_and_mode_decide_like_native(pair, workdir, who):
    """open(O_CREAT), mkdir, mkfifo and mknod(S_IFREG) under every umask
    and mode, in a plain, a setgid and a default-ACL directory: the same
    mode, owner and group as natively (3847756 applied its own umask 022
    on top: umask 002 + 0664 gave 0644, umask 0 + 0620 gave 0600, and
    ignored the default ACL)."""
    vol, native = pair
    uid, gid = (0, 0) if who == "root" else (NONROOT_UID, NONROOT_GID)
    for um in UMASKS:
        ops = []
        for d in ("plain", "sgid", "acl"):
            for m in FILE_MODES:
                ops.append(["open", f"{d}/f-{um:03o}-{m:04o}", m])
                ops.append(["mknod", f"{d}/n-{um:03o}-{m:04o}", stat.S_IFREG | m, 0, 0])
            for m in DIR_MODES:
                ops.append(["mkdir", f"{d}/d-{um:03o}-{m:04o}", m])
            for m in (0o666, 0o640):
                ops.append(["mkfifo", f"{d}/p-{um:03o}-{m:04o}", m])
        res = both(vol, native, ops, umask=um, uid=uid, gid=gid)
        assert all(r[0] == 0 for r in res), f"an operation failed on both sides: {res}"
    snap = assert_same_as_native(vol, native, f"umask cases as {who}")
    # The cases prove something only where the umask mattered natively.
    m = snap.entries
    assert m["plain/f-002-0664"].mode & 0o7777 == 0o664
    assert m["plain/f-000-0620"].mode & 0o7777 == 0o620
    assert m["acl/f-077-0664"].mode & 0o7777 == 0o664, "the default ACL, not the umask, decides"
    assert m["sgid/d-022-0775"].mode & 0o7777 == 0o2755 and m["sgid/d-022-0775"].gid == SETGID_GID
    stop_and_restore(vol, workdir, snap, f"umask cases as {who}")


@pytest.mark.parametrize("who", ["root", "nonroot"])
def test_unix_socket_binds_and_connects(pair, workdir, who):
    """bind() of an AF_UNIX socket inside the mount makes its node (mode
    from the umask), a client connects through the path and a byte goes
    across; the node is journaled and restored as a socket (3847756:
    bind failed with EPERM)."""
    vol, native = pair
    uid, gid = (0, 0) if who == "root" else (NONROOT_UID, NONROOT_GID)
    for um in (0, 0o002, 0o077):
        res = both(vol, native, [["bind", f"plain/s-{um:03o}"], ["bind", f"sgid/s-{um:03o}"]],
                   umask=um, uid=uid, gid=gid)
        assert res == [[0, "ping"], [0, "ping"]], res
    snap = assert_same_as_native(vol, native, f"sockets as {who}")
    assert stat.S_ISSOCK(snap.entries["plain/s-002"].mode)
    stop_and_restore(vol, workdir, snap, f"sockets as {who}")
    # The node, not a listener, comes back (docs/SEMANTICS.md).
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConnectionRefusedError):
        c.connect(str(workdir / "restored" / "plain" / "s-002"))
    c.close()


# (name, type, mode, major, minor): minor 1048575 and major 4095 are the
# largest the kernel's device numbers hold.
NODES = [
    ("null", stat.S_IFCHR, 0o666, 1, 3),
    ("char-big", stat.S_IFCHR, 0o640, 4095, 1048575),
    ("char-mid", stat.S_IFCHR, 0o600, 240, 70000),
    ("loop", stat.S_IFBLK, 0o660, 7, 200),
    ("blk-big", stat.S_IFBLK, 0o644, 259, 1048575),
    ("fifo", stat.S_IFIFO, 0o642, 0, 0),
    ("sock", stat.S_IFSOCK, 0o755, 0, 0),
]


def mknod_ops(d, um):
    return [["mknod", f"{d}/{n}-{um:03o}", t | m, a, b] for n, t, m, a, b in NODES]


def test_mknod_of_every_special_type(pair, workdir):
    """mknod of character and block devices, fifos and sockets, by root and
    by a non-root uid (devices: EPERM on both sides): same results, modes,
    owners and device numbers as natively, and a device node made through
    the mount works (3847756: EPERM for every device and socket)."""
    vol, native = pair
    for um in (0, 0o022):
        both(vol, native, mknod_ops("plain", um) + mknod_ops("sgid", um), umask=um)
    res = both(vol, native, mknod_ops("plain", 0o002), umask=0o002, uid=NONROOT_UID, gid=NONROOT_GID)
    assert [r[0] for r in res] == ["EPERM"] * 5 + [0, 0], res
    assert both(vol, native, [["devnull", "plain/null-000"]]) == [[0, [4, ""]]]
    snap = assert_same_as_native(vol, native, "mknod")
    assert specials(vol.mount)["plain/char-big-000"] == (stat.S_IFCHR, 4095, 1048575)
    stop_and_restore(vol, workdir, snap, "mknod")


FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_COLLAPSE_RANGE = 0x01, 0x02, 0x08
FALLOC_ZERO_RANGE, FALLOC_INSERT_RANGE = 0x10, 0x20
FALLOC_UNSHARE_RANGE, FALLOC_WRITE_ZEROES = 0x40, 0x80
K = 1024


def test_fallocate_modes_the_kernel_passes(pair, workdir):
    """Every fallocate mode FUSE carries (plain, KEEP_SIZE, PUNCH_HOLE,
    ZERO_RANGE, ZERO_RANGE|KEEP_SIZE, and PUNCH_HOLE without KEEP_SIZE,
    which ext4 refuses) gives the native errno, size, block count and data
    map after each call, and restores with the same contents, size and
    holes."""
    vol, native = pair
    data = os.urandom(64 * K).hex()
    ops = [["write", "plain/f", data, 0]]
    for mode, off, ln in [(0, 60 * K, 16 * K), (FALLOC_KEEP_SIZE, 76 * K, 64 * K),
                          (FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 8 * K, 8 * K),
                          (FALLOC_PUNCH_HOLE, 8 * K, 4 * K),
                          (FALLOC_ZERO_RANGE, 20 * K, 6000),
                          (FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE, 70 * K, 20 * K),
                          (FALLOC_ZERO_RANGE, 100 * K, 4 * K),
                          (FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 32 * K, 40 * K)]:
        ops.append(["fallocate", "plain/f", mode, off, ln])
    res = both(vol, native, ops)
    assert [r[0] for r in res] == [0] * 4 + ["EOPNOTSUPP"] + [0] * 4, res
    snap = assert_same_as_native(vol, native, "fallocate")
    want = run_ops(vol.mount, [["map", "plain/f"]])
    stop_and_restore(vol, workdir, snap, "fallocate")
    got = run_ops(workdir / "restored", [["map", "plain/f"]])
    assert got == want, f"restored size and data map {got} != the mount's {want}"


def test_what_fuse_cannot_carry_fails_with_the_documented_errno(pair):
    """O_TMPFILE, FALLOC_FL_COLLAPSE_RANGE and FALLOC_FL_INSERT_RANGE work
    on ext4 but not through FUSE (fuser has no TMPFILE opcode; the kernel's
    fuse_file_fallocate refuses the two modes before the daemon sees them):
    the mount answers EOPNOTSUPP, as docs/SEMANTICS.md says, and the file
    is left unchanged. So do UNSHARE_RANGE and WRITE_ZEROES, whatever the
    native filesystem would say."""
    vol, native = pair
    data = os.urandom(16 * K).hex()
    ops = [["write", "plain/f", data, 0],
           ["fallocate", "plain/f", FALLOC_COLLAPSE_RANGE, 0, 4 * K],
           ["fallocate", "plain/f", FALLOC_INSERT_RANGE, 0, 4 * K],
           ["tmpfile", "plain", 0o600]]
    got = run_ops(vol.mount, ops)
    want = run_ops(native, ops)
    assert [r[0] for r in want] == [0, 0, 0, 0], f"ext4 itself refused: {want}"
    assert [r[0] for r in got] == [0, "EOPNOTSUPP", "EOPNOTSUPP", "EOPNOTSUPP"], got
    assert (vol.mount / "plain" / "f").read_bytes().hex() == data
    got = run_ops(vol.mount, [["fallocate", "plain/f", FALLOC_UNSHARE_RANGE, 0, 4 * K],
                              ["fallocate", "plain/f", FALLOC_WRITE_ZEROES, 0, 4 * K]])
    assert [r[0] for r in got] == ["EOPNOTSUPP", "EOPNOTSUPP"], got
    assert (vol.mount / "plain" / "f").read_bytes().hex() == data


def test_restore_without_cap_mknod_leaves_devices_out_and_says_so(pair, workdir):
    """A restore by a process without CAP_MKNOD completes: every file,
    socket and fifo is there, each device node is missing, named on stderr
    and counted in the summary, and nothing else differs."""
    vol, native = pair
    both(vol, native, mknod_ops("plain", 0) + [["write", "plain/data", "00ff", 3]], umask=0)
    os.rename(vol.mount / "plain" / "loop-000", vol.mount / "sgid" / "loop-moved")
    snap = helpers.snapshot(vol.mount)
    c = stop_and_restore(vol, workdir, snap, "restore without CAP_MKNOD",
                         wrapper=("setpriv", "--bounding-set=-mknod", "--inh-caps=-mknod", "--"))
    devices = ["plain/null-000", "plain/char-big-000", "plain/char-mid-000", "sgid/loop-moved",
               "plain/blk-big-000"]
    for p in devices:
        assert p + ":" in c.err, f"no warning naming {p}:\n{c}"
    assert "5 device node(s) NOT restored" in c.out, c
    want = helpers.Snapshot({p: e for p, e in snap.entries.items() if p not in devices}, snap.links)
    helpers.assert_same_tree(want, helpers.snapshot(workdir / "restored"), "restore without CAP_MKNOD")


def test_redo_after_a_machine_crash_makes_special_files_again(make_volume):
    """After a machine crash whose source lost the special files the
    journal holds (removed behind the daemon's back while it was down),
    the redo at the next start makes them again with their type, mode,
    owner and device number."""
    vol = make_volume("v")
    prepare(vol.source)
    vol.start(env={"REWIND_BOOT_ID": "boot-a-" + os.urandom(4).hex()})
    vol.wait_window()
    res = run_ops(vol.mount, mknod_ops("plain", 0o002) + [["bind", "plain/bound"]], umask=0o002)
    assert all(r[0] == 0 for r in res), res
    os.chown(vol.mount / "plain" / "sock-002", NONROOT_UID, NONROOT_GID)
    os.chmod(vol.mount / "plain" / "fifo-002", 0o600)
    want = specials(vol.mount)
    with open(vol.mount / "plain" / "synced", "wb") as f:
        f.write(b"x")
        os.fsync(f.fileno())
    snap = helpers.snapshot(vol.mount)
    vol.kill9()
    helpers.lazy_unmount(vol.mount)
    for p in (vol.source / "plain").iterdir():
        if p.name != "synced":
            p.unlink()
    vol.start(env={"REWIND_BOOT_ID": "boot-b-" + os.urandom(4).hex()})
    helpers.assert_same_tree(snap, helpers.snapshot(vol.mount), "the mount after the redo")
    assert specials(vol.mount) == want
    vol.stop()


def test_the_base_walk_captures_special_files(make_volume, workdir):
    """Sockets' nodes, fifos and device nodes already in the source when
    protection starts are in the initial base and restore with their type,
    mode, owner and device number (3847756's walk skipped sockets and
    devices with a warning, so a restore lacked them)."""
    vol = make_volume("v")
    prepare(vol.source)
    res = run_ops(vol.source, mknod_ops("plain", 0) + [["bind", "sgid/bound"]], umask=0)
    assert all(r[0] == 0 for r in res), res
    os.chown(vol.source / "plain" / "loop-000", NONROOT_UID, SETGID_GID)
    os.link(vol.source / "plain" / "null-000", vol.source / "sgid" / "null-link")
    vol.start()
    vol.wait_window()
    snap = helpers.snapshot(vol.mount)
    assert specials(vol.mount) == specials(vol.source)
    assert len(specials(vol.mount)) == len(NODES) + 2
    stop_and_restore(vol, workdir, snap, "special files in the initial base")


def test_a_store_made_by_the_format_1_build_restores_through_the_cli(workdir):
    """tests/golden/store-v1 was written by 3847756 (segment, manifest and
    journal format 1; see tests/formats.rs for how): `rewind verify` accepts
    it and `rewind restore` rebuilds its tree, as the build that wrote it
    did."""
    store = f"file://{helpers.REPO / 'tests' / 'golden' / 'store-v1'}"
    c = helpers.rewind("verify", "--store", store, "--volume", "vol")
    assert c.code == 0, f"verify of the format 1 store failed:\n{c}"
    target = workdir / "restored"
    c = helpers.rewind("restore", "--store", store, "--volume", "vol", "--at", "latest", "--target", target)
    assert c.code == 0, f"restore of the format 1 store failed:\n{c}"
    snap = helpers.snapshot(target)
    got = {p: (stat.S_IFMT(e.mode), e.mode & 0o7777, e.uid, e.gid, e.size if e.kind != "dir" else None,
               e.target) for p, e in snap.entries.items()}
    assert got == {
        "d": (stat.S_IFDIR, 0o2775, 0, 0, None, None),
        "d/a": (stat.S_IFREG, 0o644, 1234, 2000, 15, None),
        "e": (stat.S_IFDIR, 0o700, 0, 0, None, None),
        "e/b": (stat.S_IFREG, 0o644, 0, 0, 13, None),
        "e/dl": (stat.S_IFLNK, 0o777, 0, 0, 4, "../d"),
        "e/p": (stat.S_IFIFO, 0o644, 0, 0, None, None),
        "e/sparse": (stat.S_IFREG, 0o600, 0, 0, 100004, None),
        "fifo": (stat.S_IFIFO, 0o640, 0, 0, None, None),
        "hl": (stat.S_IFREG, 0o644, 1234, 2000, 15, None),
        "sym": (stat.S_IFLNK, 0o777, 0, 0, 3, "d/a"),
    }, got
    assert snap.links == frozenset({frozenset({"d/a", "hl"})})
    assert (target / "d" / "a").read_bytes() == b"base file\nmore\n"
    assert os.getxattr(target / "d" / "a", "user.k") == b"val"
