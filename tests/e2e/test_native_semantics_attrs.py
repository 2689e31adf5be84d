"""Attribute changes the native-differential test found the mount making
differently from the native file system under it, each compared with a
native directory on the same file system:

- utimensat(AT_SYMLINK_NOFOLLOW) on a symlink (`os.utime(..., follow_symlinks=False)`,
  `touch -h`) sets the link's own atime and mtime, with explicit times and
  with UTIME_NOW, and leaves the target alone; a restore replays it without
  touching the target either.
- A write, append, truncate (ftruncate and open with O_TRUNC too),
  fallocate or chown (chown(-1, -1) too) by a caller without CAP_FSETID clears
  set-group-ID from a file that lacks group execute when the caller is not
  in the file's group (and keeps it for a member, by its gid or by a
  supplementary group only, and for root), in both write modes
  (FOPEN_DIRECT_IO by default, the page cache with --cached-writes); the
  new mode is journaled, so a restore gives it back.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

import helpers
from helpers import NONROOT_GID, NONROOT_UID, SETGID_GID

PY = os.path.realpath(sys.executable)

# Runs as the caller: applies each (path, op) of the JSON list on stdin and
# prints the outcomes (0 or the errno's name).
WORKER = r'''
import errno, json, os, sys
out = []
for path, op, arg in json.load(sys.stdin):
    try:
        if op == "write":
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, b"w", 100)
            os.close(fd)
        elif op == "append":
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"a")
            os.close(fd)
        elif op == "truncate":
            os.truncate(path, 50)
        elif op == "ftruncate":
            fd = os.open(path, os.O_WRONLY)
            os.ftruncate(fd, 60)
            os.close(fd)
        elif op == "open_trunc":
            os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
        elif op == "fallocate":
            fd = os.open(path, os.O_WRONLY)
            os.posix_fallocate(fd, 0, 300)
            os.close(fd)
        elif op == "chown":
            os.chown(path, -1, arg)
        elif op == "utime":
            if arg:
                os.utime(path, ns=tuple(arg), follow_symlinks=False)
            else:
                os.utime(path, None, follow_symlinks=False)  # UTIME_NOW
        else:
            raise AssertionError(op)
        out.append(0)
    except OSError as e:
        out.append(errno.errorcode[e.errno])
print(json.dumps(out))
'''


def as_caller(uid: int, gid: int, groups: list[int], ops: list) -> list:
    """Runs `ops` in a fresh process with these credentials (no
    capabilities unless uid 0)."""
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
           f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
           "--", PY, "-c", WORKER]
    r = subprocess.run(cmd, input=json.dumps(ops), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"worker as {uid}:{gid} {groups} failed: {r.stderr}"
    return json.loads(r.stdout)


def both(native, mount):
    """The native directory and the mount, each with a fresh `t` directory
    anyone may write in."""
    for root in (native, mount):
        os.mkdir(root / "t")
        os.chmod(root / "t", 0o777)
    return native / "t", mount / "t"


# --------------------------------------------------------------------------
# utimensat(AT_SYMLINK_NOFOLLOW)

T_ATIME = 1_960_000_000 * 10**9 + 123
T_MTIME = 1_970_000_000 * 10**9 + 456


def test_symlink_times_are_set_on_the_link(make_volume, workdir):
    vol = make_volume("v")
    native = workdir / "native"
    native.mkdir()
    os.chmod(native, 0o755)
    vol.start()
    sides = both(native, vol.mount)
    old = 1_500_000_000 * 10**9
    for d in sides:
        (d / "target").write_bytes(b"target\n")
        os.utime(d / "target", ns=(old, old))
        for name, owner in (("root_link", 0), ("user_link", NONROOT_UID)):
            os.symlink("target", d / name)
            os.lchown(d / name, owner, NONROOT_GID if owner else 0)

    t0 = time.time_ns()
    outcomes = []
    for d in sides:
        # Explicit times by root and by the link's owner; UTIME_NOW by a
        # non-owner (whatever the kernel says to that, both sides must say
        # it) and by root.
        res = as_caller(0, 0, [], [[str(d / "root_link"), "utime", [T_ATIME, T_MTIME]]])
        res += as_caller(NONROOT_UID, NONROOT_GID, [],
                         [[str(d / "user_link"), "utime", [T_ATIME, T_MTIME]],
                          [str(d / "root_link"), "utime", None]])
        res += as_caller(0, 0, [], [[str(d / "root_link"), "utime", None]])
        outcomes.append(res)
        st = {n: os.lstat(d / n) for n in ("target", "root_link", "user_link")}
        where = "natively" if d == sides[0] else "through the mount"
        assert res[0] == res[1] == res[3] == 0, f"{where}: {res}"
        assert (st["user_link"].st_atime_ns, st["user_link"].st_mtime_ns) == (T_ATIME, T_MTIME), \
            f"{where}: the owner's utimensat(AT_SYMLINK_NOFOLLOW) did not set the link's times"
        assert st["root_link"].st_mtime_ns >= t0 - 10**9 and st["root_link"].st_atime_ns >= t0 - 10**9, \
            f"{where}: UTIME_NOW on the link did not set it to now: {st['root_link']}"
        assert st["target"].st_mtime_ns == old and st["target"].st_atime_ns == old, \
            f"{where}: utimensat(AT_SYMLINK_NOFOLLOW) changed the target"
    assert outcomes[0] == outcomes[1], f"native {outcomes[0]}, mount {outcomes[1]}"
    # The mount's own view after the attribute cache expires is the source's.
    def times(root, n):
        st = os.lstat(root / n)
        return st.st_atime_ns, st.st_mtime_ns

    for n in ("user_link", "target"):
        helpers.wait_until(lambda: times(sides[1], n) == times(vol.source / "t", n), 5,
                           f"the mount's times of {n} to be the source's once the attribute cache expires")

    # A restore replays the links' records without following them: the
    # target keeps its mtime, the links their targets (symlink times are not
    # restored, docs/SEMANTICS.md).
    vol.stop()
    vol.delete_local()
    target = workdir / "restored"
    vol.restore("latest", target)
    r = target / "t"
    assert os.stat(r / "target").st_mtime_ns == old
    for n in ("root_link", "user_link"):
        assert os.readlink(r / n) == "target"
        assert os.lstat(r / n).st_uid == os.lstat(native / "t" / n).st_uid


# --------------------------------------------------------------------------
# Set-group-ID on changes by callers outside the file's group

# name -> (uid, gid, supplementary groups)
CALLERS = {
    "outsider": (1235, 1235, []),
    "member by gid": (NONROOT_UID, SETGID_GID, []),
    "member by supplementary group": (65534, 65534, [SETGID_GID]),
    "root": (0, 0, []),
}
MODES = [0o2666, 0o2676, 0o6666]  # no group execute, group execute, with set-user-ID
OPS = ["write", "append", "truncate", "ftruncate", "open_trunc", "fallocate", "chown-1", "chgrp"]


def case_name(caller: str, op: str, mode: int) -> str:
    return f"{caller.replace(' ', '_')}.{op}.{mode:o}"


@pytest.mark.parametrize("cached", [False, True], ids=["direct-writes", "cached-writes"])
def test_set_group_id_cleared_for_callers_outside_the_group(make_volume, workdir, cached):
    vol = make_volume("v")
    native = workdir / "native"
    native.mkdir()
    os.chmod(native, 0o755)
    vol.start(*(["--cached-writes"] if cached else []))
    sides = both(native, vol.mount)
    for d in sides:
        for caller, (uid, _gid, _groups) in CALLERS.items():
            for op in OPS:
                for mode in MODES:
                    p = d / case_name(caller, op, mode)
                    p.write_bytes(b"x" * 200)
                    # Owned by the caller (chown needs it), in a group only
                    # some callers are in.
                    os.chown(p, uid, SETGID_GID)
                    os.chmod(p, mode)

    results = {}
    for caller, (uid, gid, groups) in CALLERS.items():
        for d in sides:
            ops = [[str(d / case_name(caller, op, mode)), {"chown-1": "chown", "chgrp": "chown"}.get(op, op),
                    -1 if op == "chown-1" else gid]
                   for op in OPS for mode in MODES]
            outcomes = as_caller(uid, gid, groups, ops)
            k = 0
            for op in OPS:
                for mode in MODES:
                    st = os.lstat(d / case_name(caller, op, mode))
                    results.setdefault((caller, op, mode), []).append(
                        (outcomes[k], oct(stat.S_IMODE(st.st_mode)), st.st_gid, st.st_size))
                    k += 1

    diffs = [f"{caller} {op} on {mode:#o}: native {n}, mount {m}"
             for (caller, op, mode), (n, m) in results.items() if n != m]
    assert not diffs, "the mount differs from the native file system (outcome, mode, gid, size):\n  " \
        + "\n  ".join(diffs)

    # The rule itself, natively, so that the comparison above is about it:
    # without group execute, a non-member loses the bit and members keep it.
    def native_mode(caller, op, mode):
        return int(results[(caller, op, mode)][0][1], 8)
    for op in OPS:
        assert not native_mode("outsider", op, 0o2666) & stat.S_ISGID, op
        for member in ("member by gid", "member by supplementary group", "root"):
            assert native_mode(member, op, 0o2666) & stat.S_ISGID, (member, op)

    # The mount's view once the attribute cache expires is the source's, and
    # the restore gives back the modes (the new mode is journaled).
    def modes(root):
        return {n: os.lstat(root / n).st_mode for n in os.listdir(root)}

    helpers.wait_until(lambda: modes(sides[1]) == modes(vol.source / "t"), 5,
                       "the mount's modes to be the source's once the attribute cache expires")
    vol.stop()
    vol.delete_local()
    target = workdir / "restored"
    vol.restore("latest", target)
    restored = {n: os.lstat(target / "t" / n).st_mode for n in os.listdir(target / "t")}
    native_modes = {n: os.lstat(sides[0] / n).st_mode for n in os.listdir(sides[0])}
    bad = sorted(f"{n}: native {native_modes[n]:o}, restored {restored.get(n, 0):o}"
                 for n in native_modes if restored.get(n) != native_modes[n])
    assert not bad, "restored modes differ from the native ones:\n  " + "\n  ".join(bad)
