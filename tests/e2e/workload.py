"""The differential workload: writer threads that apply the same random
operation to the FUSE mount and to a shadow copy on the native filesystem
(the model), compare the two results (values and errnos), and stop at a
barrier whenever the coordinator wants a consistent instant.

Each writer owns one directory (`w<i>`) in both trees, so its operation
sequence is deterministic for a seed whatever the interleaving with other
writers; the mount still sees all writers at once, which is what exercises
the global sequence.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import traceback

import helpers

# Relative weights of the operation kinds; every kind must also reach
# MIN_COUNT successes per run (asserted by the test).
WEIGHTS = {
    "create": 4, "write": 5, "append": 3, "sparse": 1, "punch": 1, "truncate": 2,
    "rename": 2, "rename_over": 2, "rename_noreplace": 1, "rename_exchange": 1,
    "link": 2, "unlink": 2, "unlink_open_write": 1, "identity_shuffle": 1,
    "hold": 1, "write_held": 2, "symlink": 1, "chmod": 1, "chown": 1,
    "setxattr": 2, "removexattr": 1, "mkdir": 1, "rmdir": 1, "nonroot": 1,
    "utime": 1, "fsync": 1, "mkfifo": 0.3,
}
MIN_COUNT = 4
# Every open is non-blocking: a FIFO created by mkfifo must never hang a writer.
NB = os.O_NONBLOCK

NAMES = [f"n{i}" for i in range(14)]
PROTECTED_DIRS = {"pub", "sg"}
# Symlink targets: siblings, dangling names, and paths that leave the tree
# but whose parent does not exist (so nothing that follows them can create
# anything outside).
SYMLINK_TARGETS = ["n1", "n2", "D0", "D0/n3", "missing", "/nonexistent-rewind-e2e/x",
                   "../../../../../../../../nonexistent-rewind-e2e/y"]


class Gate:
    """Writers enter/leave around each operation; the coordinator pauses
    them all at an operation boundary."""

    def __init__(self):
        self.cond = threading.Condition()
        self.paused = False
        self.active = 0

    def enter(self):
        with self.cond:
            while self.paused:
                self.cond.wait()
            self.active += 1

    def leave(self):
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def pause(self, timeout=60):
        with self.cond:
            self.paused = True
            if not self.cond.wait_for(lambda: self.active == 0, timeout):
                raise AssertionError(f"writers did not reach the barrier within {timeout}s")

    def resume(self):
        with self.cond:
            self.paused = False
            self.cond.notify_all()


def gated_loop(gate: Gate, stop_flag: threading.Event, step, pace: float = 0.0) -> None:
    """Calls step() inside the gate until stop_flag is set, sleeping `pace`
    seconds outside it after each call (the workload's rate, not a wait)."""
    while not stop_flag.is_set():
        gate.enter()
        try:
            if stop_flag.is_set():
                return
            step()
        finally:
            gate.leave()
        if pace:
            time.sleep(pace)


def _try(f, *a):
    try:
        r = f(*a)
        return r
    except OSError as e:
        return ("E", errno.errorcode.get(e.errno, e.errno))


def _is_err(r):
    return isinstance(r, tuple) and len(r) == 2 and r[0] == "E"


class Writer(threading.Thread):
    def __init__(self, idx: int, seed: int, mount_root: str, shadow_root: str, gate: Gate):
        super().__init__(name=f"writer{idx}", daemon=True)
        self.idx = idx
        self.rng = random.Random(seed * 1000 + idx)
        self.sides = {"m": os.path.join(mount_root, f"w{idx}"), "s": os.path.join(shadow_root, f"w{idx}")}
        self.gate = gate
        self.go = threading.Event()
        self.stop_flag = threading.Event()
        self.counts = {k: 0 for k in WEIGHTS}
        self.attempts = 0
        self.mismatches: list[str] = []
        self.crash: str | None = None
        self.held = {"m": None, "s": None}
        self.kinds = list(WEIGHTS)
        self.weights = [WEIGHTS[k] for k in self.kinds]

    # -- state of the model (the shadow side) ---------------------------
    def _state(self):
        root = self.sides["s"]
        files, dirs, links, other = [], [""], [], []
        for dp, dns, fns in os.walk(root):
            rel = os.path.relpath(dp, root)
            rel = "" if rel == "." else rel
            for n in dns + fns:
                rp = f"{rel}/{n}" if rel else n
                st = os.lstat(os.path.join(root, rp))
                if os.path.islink(os.path.join(root, rp)):
                    links.append(rp)
                elif n in dns:
                    dirs.append(rp)
                elif os.path.isfile(os.path.join(root, rp)):
                    files.append(rp)
                else:
                    other.append(rp)
            # os.walk does not descend into symlinked dirs: good.
        return files, dirs, links, other

    def _new_path(self, dirs):
        r = self.rng
        d = r.choice(dirs)
        return f"{d}/{r.choice(NAMES)}" if d else r.choice(NAMES)

    def _pick(self, seq, fallback):
        return self.rng.choice(seq) if seq else fallback

    def close_held(self):
        for side in ("m", "s"):
            if self.held[side] is not None:
                try:
                    os.close(self.held[side])
                except OSError:
                    pass
                self.held[side] = None

    # -- one step -----------------------------------------------------
    def step(self):
        r = self.rng
        files, dirs, links, other = self._state()
        mutable_dirs = [d for d in dirs if d and d.split("/")[0] not in PROTECTED_DIRS]
        kind = r.choices(self.kinds, self.weights)[0]
        if len(files) > 40 and kind in ("create", "mkdir", "symlink", "link", "mkfifo"):
            kind = "unlink"
        newp = self._new_path(dirs)
        anyf = self._pick(files, newp)
        anyp = self._pick(files + links + mutable_dirs + other, newp)
        data = r.randbytes(r.choice([0, 1, 17, 512, 4096, 40000]))

        J = os.path.join
        if kind == "create":
            flags = os.O_CREAT | os.O_WRONLY | r.choice([0, os.O_EXCL, os.O_TRUNC, os.O_TRUNC])
            p = r.choice([newp, anyf])

            def op(b):
                fd = os.open(J(b, p), NB | flags, 0o644)
                try:
                    return os.write(fd, data)
                finally:
                    os.close(fd)
        elif kind == "write":
            off = r.randrange(0, 70000)

            def op(b):
                fd = os.open(J(b, anyf), NB | os.O_WRONLY)
                try:
                    return os.pwrite(fd, data or b"x", off)
                finally:
                    os.close(fd)
        elif kind == "append":
            def op(b):
                fd = os.open(J(b, anyf), NB | os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, data or b"y")
                    return os.lseek(fd, 0, os.SEEK_CUR)
                finally:
                    os.close(fd)
        elif kind == "sparse":
            off = r.randrange(16, 256) * 4096 * 4
            fresh = r.random() < 0.7
            p = newp if fresh else anyf
            blob = r.randbytes(4096)

            def op(b):
                fd = os.open(J(b, p), NB | os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    os.pwrite(fd, blob, off)
                    res = [os.fstat(fd).st_size, _try(os.lseek, fd, 0, os.SEEK_DATA),
                           _try(os.lseek, fd, 0, os.SEEK_HOLE)]
                    return res
                finally:
                    os.close(fd)
        elif kind == "punch":
            off = r.randrange(0, 16) * 4096
            ln = r.randrange(1, 8) * 4096

            def op(b):
                fd = os.open(J(b, anyf), NB | os.O_RDWR)
                try:
                    helpers.punch_hole(fd, off, ln)
                    return os.fstat(fd).st_size
                finally:
                    os.close(fd)
        elif kind == "truncate":
            size = r.choice([0, r.randrange(0, 5000), r.randrange(0, 300000), r.randrange(0, 2 << 20)])
            via_fd = r.random() < 0.5

            def op(b):
                if via_fd:
                    fd = os.open(J(b, anyf), NB | os.O_WRONLY)
                    try:
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
                else:
                    os.truncate(J(b, anyf), size)
                return size
        elif kind == "rename":
            src, dst = anyp, newp

            def op(b):
                os.rename(J(b, src), J(b, dst))
        elif kind == "rename_over":
            src = anyp
            dst = self._pick([f for f in files if f != src], newp)

            def op(b):
                os.rename(J(b, src), J(b, dst))
        elif kind == "rename_noreplace":
            src, dst = anyp, r.choice([newp, anyf])

            def op(b):
                helpers.renameat2(J(b, src), J(b, dst), helpers.RENAME_NOREPLACE)
        elif kind == "rename_exchange":
            a, c = anyp, self._pick(files + links + mutable_dirs, newp)

            def op(b):
                helpers.renameat2(J(b, a), J(b, c), helpers.RENAME_EXCHANGE)
        elif kind == "link":
            src, dst = self._pick(files + links, newp), newp

            def op(b):
                os.link(J(b, src), J(b, dst), follow_symlinks=False)
        elif kind == "unlink":
            p = self._pick(files + links + other, newp)

            def op(b):
                os.unlink(J(b, p))
        elif kind == "unlink_open_write":
            other_name = newp
            link_first = r.random() < 0.5
            off = r.randrange(0, 5000)
            blob = data or b"z" * 10

            def op(b):
                fd = os.open(J(b, anyf), NB | os.O_RDWR)
                try:
                    res = [_try(os.link, J(b, anyf), J(b, other_name)) if link_first else None,
                           _try(os.unlink, J(b, anyf)),
                           os.pwrite(fd, blob, off),
                           _try(os.fsync, fd),
                           os.pread(fd, len(blob), off) == blob,
                           os.fstat(fd).st_nlink]
                    return res
                finally:
                    os.close(fd)
        elif kind == "identity_shuffle":
            x, y = newp, self._new_path(dirs)
            d1, d2, d3 = r.randbytes(100), r.randbytes(200), r.randbytes(50)

            def op(b):
                res = []
                fd = os.open(J(b, x), NB | os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
                try:
                    res.append(os.write(fd, d1))
                    res.append(_try(os.rename, J(b, x), J(b, y)))
                    fd2 = _try(os.open, J(b, x), NB | os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                    if not _is_err(fd2):
                        res.append(os.write(fd2, d2))
                        os.close(fd2)
                    else:
                        res.append(fd2)
                    res.append(os.pwrite(fd, d3, 10))
                finally:
                    os.close(fd)
                return res
        elif kind == "hold":
            p = anyf
            self.close_held()

            def op(b):
                side = "m" if b == self.sides["m"] else "s"
                self.held[side] = os.open(J(b, p), NB | os.O_RDWR)
        elif kind == "write_held":
            off = r.randrange(0, 20000)
            blob = data or b"h"

            def op(b):
                side = "m" if b == self.sides["m"] else "s"
                if self.held[side] is None:
                    return ("E", "nothing held")
                return os.pwrite(self.held[side], blob, off)
        elif kind == "symlink":
            target = r.choice(SYMLINK_TARGETS)

            def op(b):
                os.symlink(target, J(b, newp))
                return os.readlink(J(b, newp))
        elif kind == "chmod":
            p = self._pick(files + mutable_dirs, newp)
            mode = r.choice([0o600, 0o644, 0o640, 0o755, 0o700, 0o4755, 0o2750, 0o1777, 0o444])
            if p in mutable_dirs:
                mode |= 0o700  # keep our own directories usable

            def op(b):
                os.chmod(J(b, p), mode)
        elif kind == "chown":
            p = self._pick(files + links + mutable_dirs, newp)
            uid = r.choice([0, helpers.NONROOT_UID, 1235])
            gid = r.choice([0, helpers.NONROOT_GID, helpers.SETGID_GID])
            follow = r.random() < 0.5

            def op(b):
                os.chown(J(b, p), uid, gid, follow_symlinks=follow)
        elif kind == "setxattr":
            p = self._pick(files + mutable_dirs, newp)
            name = f"user.k{r.randrange(4)}"
            val = r.randbytes(r.choice([0, 5, 100, 300]))

            def op(b):
                os.setxattr(J(b, p), name, val)
        elif kind == "removexattr":
            withx = [f for f in files + mutable_dirs
                     if os.listxattr(os.path.join(self.sides["s"], f), follow_symlinks=False)]
            p = self._pick(withx, newp) if r.random() < 0.8 else self._pick(files, newp)
            try:
                xs = os.listxattr(os.path.join(self.sides["s"], p))
            except OSError:  # absent, or a dangling symlink
                xs = []
            name = r.choice(xs) if xs and r.random() < 0.8 else f"user.k{r.randrange(4)}"

            def op(b):
                os.removexattr(J(b, p), name)
        elif kind == "mkdir":
            mode = r.choice([0o755, 0o700, 0o775])

            def op(b):
                os.mkdir(J(b, newp), mode)
        elif kind == "rmdir":
            empty = [d for d in mutable_dirs if not os.listdir(os.path.join(self.sides["s"], d))]
            p = self._pick(empty, newp) if r.random() < 0.7 else self._pick(mutable_dirs, newp)

            def op(b):
                os.rmdir(J(b, p))
        elif kind == "nonroot":
            which = r.choice(["pub", "sg", "sgdir", "denied"])
            name = r.choice(NAMES)
            blob = r.randbytes(30).hex()
            denied_target = self._pick([f for f in files if not f.startswith(("pub/", "sg/"))], newp)

            def op(b):
                if which == "pub":
                    c = helpers.as_user(helpers.NONROOT_UID, helpers.NONROOT_GID,
                                        '[ -p "$2" ] && exit 3; printf %s "$1" > "$2"', blob, J(b, "pub", name))
                elif which == "sg":
                    c = helpers.as_user(helpers.NONROOT_UID, helpers.NONROOT_GID,
                                        '[ -p "$2" ] && exit 3; printf %s "$1" >> "$2"', blob, J(b, "sg", name))
                elif which == "sgdir":
                    c = helpers.as_user(helpers.NONROOT_UID, helpers.NONROOT_GID,
                                        'mkdir "$2" && printf %s "$1" > "$2/f"', blob, J(b, "sg", name + "d"))
                else:
                    c = helpers.as_user(1236, 1236, '[ -p "$2" ] && exit 3; printf %s "$1" >> "$2"', blob, J(b, denied_target))
                if c.returncode != 0:
                    # Success and failure are compared between the sides; the
                    # message names the path, which differs, so not its text.
                    return ("E", f"exit {c.returncode}")
                return 0
        elif kind == "utime":
            p = self._pick(files + mutable_dirs, newp)
            mt = r.randrange(10**9, 2 * 10**9) * helpers.NS + r.randrange(helpers.NS)

            def op(b):
                os.utime(J(b, p), ns=(mt, mt))
        elif kind == "fsync":
            def op(b):
                fd = os.open(J(b, anyf), NB | os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, data or b"s")
                    os.fsync(fd)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        elif kind == "mkfifo":
            def op(b):
                os.mkfifo(J(b, newp), 0o640)
        else:
            raise AssertionError(kind)

        rm = _try(op, self.sides["m"])
        rs = _try(op, self.sides["s"])
        self.attempts += 1
        if rm != rs:
            self.mismatches.append(f"w{self.idx} op#{self.attempts} {kind}: mount gave {rm!r}, native gave {rs!r}")
        elif not _is_err(rm):
            self.counts[kind] += 1

    def run(self):
        self.go.wait()
        try:
            gated_loop(self.gate, self.stop_flag, self.step)
        except BaseException:
            self.crash = traceback.format_exc()


def prefill_writer_dir(root, idx: int, rng: random.Random) -> None:
    """The files a writer finds when it starts: the base snapshot races
    writes, renames and unlinks of these."""
    from pathlib import Path
    d = Path(root) / f"w{idx}"
    d.mkdir(parents=True)
    for k in range(6):
        helpers.fill_random(d / f"n{k}", rng.choice([0, 100, 5000, 70000, 300000]), rng)
    helpers.fill_random(d / "n6", 2 << 20, rng)
    (d / "D0").mkdir()
    (d / "D1").mkdir()
    for k in range(3):
        helpers.fill_random(d / "D0" / f"n{k}", rng.randrange(0, 20000), rng)
    os.link(d / "n1", d / "D1" / "n9")
    os.symlink("n2", d / "n7")
    os.setxattr(d / "n3", "user.k0", b"prefilled")
    os.chown(d / "n4", helpers.NONROOT_UID, helpers.NONROOT_GID)
    (d / "pub").mkdir()
    os.chmod(d / "pub", 0o777)
    (d / "sg").mkdir()
    os.chown(d / "sg", 0, helpers.SETGID_GID)
    os.chmod(d / "sg", 0o2777)
