"""Native-differential operations (issue 12): one worker process applies a
deterministic random sequence of file-system operations to a plain
directory on the native file system and, right after, to the same relative
path through the mount, and reports both outcomes (value or errno, plus the
lstat of the paths the operation touched) per operation.

Workers are real processes (`python nativeops.py CONFIG-JSON`), because
umask, uid, gid and supplementary groups are per process: each worker drops
to its own credentials and umask before its first operation (see WORKERS).

Determinism: worker i owns the directory `w<i>` and, in the shared
directories `sg` (setgid, group NONROOT_GID, 2775) and `sgx` (setgid and
sticky, group SETGID_GID, 3777), the top-level names that start with
`w<i>_`. Every name it creates anywhere starts with that prefix, symlink
targets included, so whatever directory a symlink is moved to it can only
resolve to a name of the same worker. The next operation is drawn from the
worker's RNG (seeded by seed and index) and the native side's state of the
worker's own names, which no other worker touches: the sequence is a
function of (seed, index) whatever the interleaving with the other workers.

Divergence control: when an operation succeeds natively and fails through
the mount for a kind in REPAIRED_KINDS, the worker brings the two sides back
together (copies the native contents over the mount's file for
COLLAPSE/INSERT_RANGE; removes the native node for O_TMPFILE, device nodes
and sockets), and when a touched path differs in its permission bits or
owner only, it sets the mount's to the native ones (as root, through a
helper forked before the worker dropped its privileges); the record says
so. One
difference then does not cascade into every later operation on that path:
the records show where behaviour first differs. The difference itself is
still in the record and the test decides whether it is an expected one.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
import socket
import stat
import sys

# uid/gid used by helpers.py as well (kept literal here so that the worker
# imports nothing from the test tree after dropping privileges).
NONROOT_UID = 1234
NONROOT_GID = 1234
SETGID_GID = 2000

# One entry per worker process: credentials and umask. Root and non-root,
# a member of the shared setgid directory's group through its primary gid
# (w1) and through a supplementary group only (w2, which FUSE requests do
# not carry), and a non-member (w4), each with its own umask.
WORKERS = [
    {"uid": 0, "gid": 0, "groups": [], "umask": 0o022},
    {"uid": NONROOT_UID, "gid": NONROOT_GID, "groups": [], "umask": 0o002},
    {"uid": 65534, "gid": 65534, "groups": [NONROOT_GID], "umask": 0o077},
    {"uid": 0, "gid": 0, "groups": [], "umask": 0o000},
    {"uid": 1235, "gid": 1235, "groups": [], "umask": 0o000},
]
SHARED = {"sg": (0, NONROOT_GID, 0o2775), "sgx": (0, SETGID_GID, 0o3777)}

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40

FALLOCATE_MODES = {
    "fallocate": 0,
    "fallocate_keep_size": FALLOC_FL_KEEP_SIZE,
    "fallocate_punch_hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "fallocate_zero_range": FALLOC_FL_ZERO_RANGE,
    "fallocate_zero_range_keep_size": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    "fallocate_collapse_range": FALLOC_FL_COLLAPSE_RANGE,
    "fallocate_insert_range": FALLOC_FL_INSERT_RANGE,
    # ext4 has no UNSHARE_RANGE (EOPNOTSUPP natively): compared all the same.
    "fallocate_unshare_range": FALLOC_FL_UNSHARE_RANGE,
}
# Combinations the VFS itself refuses before any file system sees them
# (EOPNOTSUPP on Linux 6.11+, EINVAL before): compared all the same.
FALLOCATE_INVALID = [FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_KEEP_SIZE,
                     FALLOC_FL_ZERO_RANGE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     FALLOC_FL_INSERT_RANGE | FALLOC_FL_KEEP_SIZE]

WEIGHTS = {
    "create": 4, "mkdir": 2, "mkfifo": 1, "mknod_reg": 1, "mknod_chr": 1.2, "mknod_blk": 1.2,
    "socket": 1.5, "symlink": 1.5, "link": 2, "unlink": 3, "rmdir": 1,
    "rename": 2, "rename_over": 1.5, "rename_noreplace": 1, "rename_exchange": 1,
    "truncate": 2, "write": 3, "append": 2, "read": 1,
    **{k: 1 for k in FALLOCATE_MODES}, "fallocate_invalid": 0.6,
    "tmpfile": 1.5, "setxattr": 2, "removexattr": 1.2, "chmod": 2, "chown": 2, "utime": 1,
}
# Kinds that never succeed natively on ext4 (the minimum-success check skips them).
NEVER_SUCCEED = {"fallocate_invalid", "fallocate_unshare_range"}
# Kinds whose success-natively/failure-through-the-mount is repaired (see the module doc).
REPAIRED_KINDS = {"fallocate_collapse_range", "fallocate_insert_range", "tmpfile", "mknod_chr",
                  "mknod_blk", "socket"}

NB = os.O_NONBLOCK  # no open may ever block (fifos)
NAMES = [f"n{k}" for k in range(12)]
SYMLINK_TAILS = ["n1", "n2", "n3", "n4/{p}n5", "missing"]
SYMLINK_ESCAPES = ["/nonexistent-rewind-e2e/x", "../../../../../../../../../../nonexistent-rewind-e2e/y"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


def err(e: OSError) -> list:
    # ENOTSUP and EOPNOTSUPP are one number on Linux; name it as the kernel's FUSE code does.
    if e.errno == errno.EOPNOTSUPP:
        return ["E", "EOPNOTSUPP"]
    return ["E", errno.errorcode.get(e.errno, str(e.errno))]


def is_err(r) -> bool:
    return isinstance(r, list) and len(r) == 2 and r[0] == "E"


def outcome(r) -> str:
    """'ok' or the errno name of an operation's top-level result."""
    return r[1] if is_err(r) else "ok"


def _try(f, *a, **kw):
    try:
        return f(*a, **kw)
    except OSError as e:
        return err(e)


TYPE = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
        stat.S_IFSOCK: "s", stat.S_IFCHR: "c", stat.S_IFBLK: "b"}


def lstat_tuple(path: str) -> list:
    """What an operation's effect on one path is compared by."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return err(e)
    t = TYPE.get(stat.S_IFMT(st.st_mode), "?")
    return [t, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
            None if t == "d" else st.st_size, st.st_nlink,
            [os.major(st.st_rdev), os.minor(st.st_rdev)] if t in "cb" else None]


def normal(v):
    """JSON-shaped (tuples become lists, bytes hex) so both sides compare alike."""
    return json.loads(json.dumps(v, default=lambda o: o.hex() if isinstance(o, bytes) else repr(o)))


# --------------------------------------------------------------------------
# The worker's view of its own names (native side)


class State:
    def __init__(self, native_root: str, idx: int):
        self.p = f"w{idx}_"
        self.roots = [f"w{idx}", *SHARED]
        self.entries: dict[str, tuple] = {}  # relpath -> (type char, size, followed type)
        for r in self.roots:
            self._walk(native_root, r, top_shared=(r in SHARED))

    def _walk(self, base: str, rel: str, top_shared: bool):
        try:
            names = sorted(os.listdir(os.path.join(base, rel)))
        except OSError:
            return
        for n in names:
            if top_shared and not n.startswith(self.p):
                continue
            rp = f"{rel}/{n}"
            ap = os.path.join(base, rp)
            try:
                st = os.lstat(ap)
            except OSError:
                continue
            t = TYPE.get(stat.S_IFMT(st.st_mode), "?")
            try:
                ft = TYPE.get(stat.S_IFMT(os.stat(ap).st_mode), "?")
            except OSError:
                ft = None
            self.entries[rp] = (t, st.st_size, ft)
            if t == "d":
                self._walk(base, rp, False)

    def of(self, *types):
        return [p for p, e in self.entries.items() if e[0] in types]

    @property
    def dirs(self):
        return self.roots + self.of("d")

    def openable(self):
        """Non-regular paths a data operation may open for an errno (never a
        device node, nor a symlink to one)."""
        return [p for p, e in self.entries.items() if e[0] != "f" and e[0] not in "cb" and e[2] not in ("c", "b")]


class Gen:
    """Draws one operation: (kind, description, targets, op(root) -> result)."""

    def __init__(self, rng: random.Random, idx: int, cfg: dict):
        self.r = rng
        self.idx = idx
        self.cfg = cfg
        self.p = f"w{idx}_"

    def new(self, s: State) -> str:
        return f"{self.r.choice(s.dirs)}/{self.p}{self.r.choice(NAMES)}"

    def pick(self, seq, fallback):
        return self.r.choice(seq) if seq else fallback

    def any_entry(self, s: State, fallback):
        return self.pick(sorted(s.entries), fallback)

    def file_or_odd(self, s: State, newp):
        """A regular file mostly, now and then a directory, fifo, socket or
        missing name (for the errno)."""
        r = self.r.random()
        if r < 0.88:
            return self.pick(s.of("f"), newp)
        if r < 0.97:
            return self.pick(s.openable(), newp)
        return newp

    def draw(self, s: State):
        kind, desc, targets, op = self._draw(s)
        # An operation on a symlink (create, chmod, write, ... through it)
        # lands on what it points to: look at that path too.
        for t in list(targets):
            if t in s.entries and s.entries[t][0] == "l":
                dest = os.readlink(os.path.join(self.cfg["native"], t))
                q = os.path.normpath(os.path.join(os.path.dirname(t), dest))
                if not dest.startswith("/") and not q.startswith("..") and q not in targets:
                    targets.append(q)
        return kind, desc, targets, op

    def _draw(self, s: State):
        r = self.r
        kinds = list(WEIGHTS)
        kind = r.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
        if len(s.entries) > 45 and kind in ("create", "mkdir", "mkfifo", "mknod_reg", "mknod_chr", "mknod_blk",
                                            "socket", "symlink", "link", "tmpfile"):
            kind = r.choice(["unlink", "unlink", "rmdir"])
        J = os.path.join
        newp = self.new(s)
        data = r.randbytes(r.choice([0, 1, 100, 4096, 5000, 20000]))

        if kind == "create":
            x = r.random()
            p = newp if x < 0.6 else self.file_or_odd(s, newp)
            extra = r.choice([0, os.O_EXCL, os.O_TRUNC])
            mode = r.choice([0o666, 0o644, 0o600, 0o777, 0o755, 0o640, 0o660, 0o2755, 0o4755, 0o2775, 0o1777, 0o6777])

            def op(b):
                fd = os.open(J(b, p), NB | os.O_CREAT | os.O_WRONLY | extra, mode)
                try:
                    return os.write(fd, data)
                finally:
                    os.close(fd)
            return kind, f"create {p} extra={extra:#o} mode={mode:#o} len={len(data)}", [p], op

        if kind == "mkdir":
            mode = r.choice([0o777, 0o755, 0o700, 0o775, 0o2775, 0o1777, 0o3777, 0o750, 0o2700])
            p = newp if r.random() < 0.9 else self.any_entry(s, newp)
            return kind, f"mkdir {p} mode={mode:#o}", [p], lambda b: os.mkdir(J(b, p), mode)

        if kind in ("mkfifo", "mknod_reg", "mknod_chr", "mknod_blk"):
            mode = r.choice([0o666, 0o644, 0o600, 0o620, 0o777, 0o2666, 0o4644, 0o1666])
            p = newp if r.random() < 0.9 else self.any_entry(s, newp)
            if kind == "mkfifo":
                return kind, f"mkfifo {p} mode={mode:#o}", [p], lambda b: os.mkfifo(J(b, p), mode)
            fmt, dev = {"mknod_reg": (stat.S_IFREG, 0), "mknod_chr": (stat.S_IFCHR, os.makedev(1, 3)),
                        "mknod_blk": (stat.S_IFBLK, os.makedev(7, 200))}[kind]
            return kind, f"{kind} {p} mode={mode:#o}", [p], lambda b: os.mknod(J(b, p), fmt | mode, dev)

        if kind == "socket":
            p = newp if r.random() < 0.9 else self.any_entry(s, newp)
            parent, name = p.rsplit("/", 1)

            def op(b):
                # bind() takes at most 107 bytes: name the directory through
                # an O_PATH descriptor's magic link instead of its long path.
                dfd = os.open(J(b, parent), os.O_PATH | os.O_DIRECTORY)
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as so:
                        so.bind(f"/proc/self/fd/{dfd}/{name}")
                    return 0
                finally:
                    os.close(dfd)
            return kind, f"socket bind {p}", [p], op

        if kind == "symlink":
            if r.random() < 0.85:
                target = self.p + r.choice(SYMLINK_TAILS).format(p=self.p)
            else:
                target = r.choice(SYMLINK_ESCAPES)
            p = newp if r.random() < 0.9 else self.any_entry(s, newp)

            def op(b):
                os.symlink(target, J(b, p))
                return os.readlink(J(b, p))
            return kind, f"symlink {p} -> {target}", [p], op

        if kind == "link":
            x = r.random()
            src = (self.pick(s.of("f", "l", "p", "s", "c", "b"), newp) if x < 0.85
                   else self.pick(s.of("d"), newp) if x < 0.92 else newp)
            dst = newp if r.random() < 0.85 else self.any_entry(s, newp)
            return kind, f"link {src} {dst}", [src, dst], \
                lambda b: os.link(J(b, src), J(b, dst), follow_symlinks=False)

        if kind == "unlink":
            x = r.random()
            p = (self.pick(s.of("f", "l", "p", "s", "c", "b"), newp) if x < 0.88
                 else self.pick(s.of("d"), newp) if x < 0.96 else newp)
            return kind, f"unlink {p}", [p], lambda b: os.unlink(J(b, p))

        if kind == "rmdir":
            empty = [d for d in s.of("d") if not any(e.startswith(d + "/") for e in s.entries)]
            x = r.random()
            p = (self.pick(empty, newp) if x < 0.6 else self.pick(s.of("d"), newp) if x < 0.9
                 else self.any_entry(s, newp))
            return kind, f"rmdir {p}", [p], lambda b: os.rmdir(J(b, p))

        if kind in ("rename", "rename_over", "rename_noreplace", "rename_exchange"):
            src = self.any_entry(s, newp)
            if kind == "rename":
                dst = newp
            elif kind == "rename_over":
                dst = self.pick([e for e in sorted(s.entries) if e != src], newp)
            else:
                dst = r.choice([newp, self.any_entry(s, newp), self.any_entry(s, newp)])
            flags = {"rename_noreplace": RENAME_NOREPLACE, "rename_exchange": RENAME_EXCHANGE}.get(kind, 0)

            def op(b):
                if flags:
                    renameat2(J(b, src), J(b, dst), flags)
                else:
                    os.rename(J(b, src), J(b, dst))
            return kind, f"{kind} {src} {dst}", [src, dst], op

        if kind == "truncate":
            p = self.file_or_odd(s, newp)
            size = r.choice([0, r.randrange(0, 5000), r.randrange(0, 100000), 4096 * r.randrange(0, 30)])
            via_fd = r.random() < 0.5

            def op(b):
                if via_fd:
                    fd = os.open(J(b, p), NB | os.O_WRONLY)
                    try:
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
                else:
                    os.truncate(J(b, p), size)
                return size
            return kind, f"truncate {p} {size} via_fd={via_fd}", [p], op

        if kind == "write":
            p = self.file_or_odd(s, newp)
            off = r.randrange(0, 70000)
            blob = data or b"x"

            def op(b):
                fd = os.open(J(b, p), NB | os.O_WRONLY)
                try:
                    return os.pwrite(fd, blob, off)
                finally:
                    os.close(fd)
            return kind, f"pwrite {p} off={off} len={len(blob)}", [p], op

        if kind == "append":
            p = self.file_or_odd(s, newp)
            blob = data or b"y"

            def op(b):
                fd = os.open(J(b, p), NB | os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, blob)
                    return os.lseek(fd, 0, os.SEEK_CUR)
                finally:
                    os.close(fd)
            return kind, f"append {p} len={len(blob)}", [p], op

        if kind == "read":
            p = self.file_or_odd(s, newp)

            def op(b):
                fd = os.open(J(b, p), NB | os.O_RDONLY)
                try:
                    h, n = hashlib.blake2b(digest_size=12), 0
                    while chunk := os.read(fd, 1 << 20):
                        h.update(chunk)
                        n += len(chunk)
                    return [n, h.hexdigest()]
                finally:
                    os.close(fd)
            return kind, f"read {p}", [p], op

        if kind in FALLOCATE_MODES or kind == "fallocate_invalid":
            files = s.of("f")
            big = [f for f in files if s.entries[f][1] >= 8192]
            p = self.pick(big, self.pick(files, newp)) if r.random() < 0.8 else self.file_or_odd(s, newp)
            size = s.entries[p][1] if p in s.entries else 0
            blocks = size // 4096
            if kind == "fallocate_invalid":
                mode, off, ln = r.choice(FALLOCATE_INVALID), 0, 4096
            else:
                mode = FALLOCATE_MODES[kind]
                aligned = r.random() < 0.85
                if kind == "fallocate_collapse_range" and aligned and blocks >= 2:
                    off = 4096 * r.randrange(0, blocks - 1)
                    ln = 4096 * r.randrange(1, blocks - off // 4096)
                elif kind == "fallocate_insert_range" and aligned:
                    off = 4096 * r.randrange(0, blocks + 1)
                    ln = 4096 * r.randrange(1, 5)
                elif aligned:
                    off = 4096 * r.randrange(0, blocks + 3)
                    ln = 4096 * r.randrange(1, 6)
                else:
                    off, ln = r.randrange(0, size + 9000), r.randrange(1, 20000)

            def op(b):
                fd = os.open(J(b, p), NB | os.O_RDWR)
                try:
                    fallocate(fd, mode, off, ln)
                    return os.fstat(fd).st_size
                finally:
                    os.close(fd)
            return kind, f"{kind} {p} mode={mode:#x} off={off} len={ln} (size {size})", [p], op

        if kind == "tmpfile":
            x = r.random()
            d = r.choice(s.dirs) if x < 0.92 else self.pick(s.of("f"), newp)
            mode = r.choice([0o600, 0o644, 0o666, 0o640, 0o777, 0o660])
            excl = r.random() < 0.15
            dst = newp

            def op(b):
                fd = os.open(J(b, d), os.O_TMPFILE | os.O_RDWR | (os.O_EXCL if excl else 0), mode)
                try:
                    n = os.write(fd, data)
                    st = os.fstat(fd)
                    linked = _try(os.link, f"/proc/self/fd/{fd}", J(b, dst), follow_symlinks=True)
                    return [n, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, st.st_nlink, linked]
                finally:
                    os.close(fd)
            return kind, f"O_TMPFILE in {d} mode={mode:#o} excl={excl} len={len(data)}, linkat -> {dst}", [dst], op

        if kind == "setxattr":
            p = self.any_entry(s, newp) if r.random() < 0.95 else newp
            name = f"user.k{r.randrange(4)}"
            val = r.randbytes(r.choice([0, 5, 100, 1000]))
            flags = r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            follow = r.random() < 0.5

            def op(b):
                os.setxattr(J(b, p), name, val, flags, follow_symlinks=follow)
                return sorted(os.listxattr(J(b, p), follow_symlinks=follow))
            return kind, f"setxattr {p} {name} len={len(val)} flags={flags} follow={follow}", [p], op

        if kind == "removexattr":
            withx = []
            for e in sorted(s.entries):
                if s.entries[e][0] in "fd":
                    try:
                        if os.listxattr(os.path.join(self.cfg["native"], e), follow_symlinks=False):
                            withx.append(e)
                    except OSError:
                        pass
            p = self.pick(withx, newp) if r.random() < 0.8 else self.any_entry(s, newp)
            try:
                names = sorted(os.listxattr(os.path.join(self.cfg["native"], p), follow_symlinks=False))
            except OSError:
                names = []
            name = r.choice(names) if names and r.random() < 0.8 else f"user.k{r.randrange(4)}"
            follow = r.random() < 0.5
            return kind, f"removexattr {p} {name} follow={follow}", [p], \
                lambda b: os.removexattr(J(b, p), name, follow_symlinks=follow)

        if kind == "chmod":
            p = self.any_entry(s, newp) if r.random() < 0.95 else newp
            mode = r.choice([0o600, 0o644, 0o640, 0o755, 0o700, 0o4755, 0o2755, 0o2750, 0o6755,
                             0o1777, 0o2775, 0o3777, 0o444, 0o660, 0o2770, 0o2710])
            if p in s.entries and s.entries[p][2] == "d":
                mode |= 0o700  # the worker keeps its own directories usable
            return kind, f"chmod {p} {mode:#o}", [p], lambda b: os.chmod(J(b, p), mode)

        if kind == "chown":
            p = self.any_entry(s, newp) if r.random() < 0.95 else newp
            c = self.cfg
            if c["uid"] == 0:
                uid = r.choice([-1, 0, NONROOT_UID, 1235, 65534])
                gid = r.choice([-1, 0, NONROOT_GID, SETGID_GID, 65534])
            else:
                uid = r.choice([-1, -1, c["uid"], 0])
                gid = r.choice([-1, c["gid"], *c["groups"], SETGID_GID])
            follow = r.random() < 0.5
            return kind, f"chown {p} {uid}:{gid} follow={follow}", [p], \
                lambda b: os.chown(J(b, p), uid, gid, follow_symlinks=follow)

        if kind == "utime":
            p = self.any_entry(s, newp) if r.random() < 0.95 else newp
            at = r.randrange(10**9, 2 * 10**9) * 10**9 + r.randrange(10**9)
            mt = r.randrange(10**9, 2 * 10**9) * 10**9 + r.randrange(10**9)
            follow = r.random() < 0.7

            def op(b):
                os.utime(J(b, p), ns=(at, mt), follow_symlinks=follow)
                st = os.stat(J(b, p), follow_symlinks=follow)
                return st.st_mtime_ns
            return kind, f"utime {p} mtime={mt} follow={follow}", [p], op

        raise AssertionError(kind)


def run_side(op, root: str, targets) -> dict:
    try:
        res = op(root)
    except OSError as e:
        res = err(e)
    return normal({"r": res, "st": [lstat_tuple(os.path.join(root, t)) for t in targets]})


def repair(kind: str, targets, native: str, mount: str, rn: dict) -> str:
    """Brings the mount's side back to the native one (or the native back to
    the mount's) after an operation that succeeded only natively."""
    t = targets[0]
    if kind in ("fallocate_collapse_range", "fallocate_insert_range"):
        with open(os.path.join(native, t), "rb") as f:
            content = f.read()
        fd = os.open(os.path.join(mount, t), NB | os.O_WRONLY)
        try:
            os.pwrite(fd, content, 0)
            os.ftruncate(fd, len(content))
        finally:
            os.close(fd)
        return "copied the native contents over the mount's file"
    if kind == "tmpfile":
        if is_err(rn["r"][5]):
            return "nothing linked natively"
        os.unlink(os.path.join(native, t))
        return "unlinked the native linked O_TMPFILE"
    os.unlink(os.path.join(native, t))
    return "unlinked the native node"


class RootHelper:
    """A child forked while the worker is still root: it applies the
    worker's resyncs (chown, chmod through the mount) with root's power,
    which a non-root worker lacks (it could not put back a set-group-ID bit
    of a group it is not in, nor an owner)."""

    def __init__(self):
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(w1)
            os.close(r2)
            with os.fdopen(r1) as fin, os.fdopen(w2, "w") as fout:
                for line in fin:
                    path, uid, gid, mode = json.loads(line)
                    res = [_try(os.chown, path, uid, gid, follow_symlinks=False) if uid is not None else None,
                           _try(os.chmod, path, mode, follow_symlinks=False) if mode is not None else None]
                    fout.write(json.dumps(res) + "\n")
                    fout.flush()
            os._exit(0)
        os.close(r1)
        os.close(w2)
        self.to = os.fdopen(w1, "w")
        self.back = os.fdopen(r2)

    def fix(self, path: str, uid, gid, mode) -> list:
        self.to.write(json.dumps([path, uid, gid, mode]) + "\n")
        self.to.flush()
        return json.loads(self.back.readline())

    def close(self) -> None:
        self.to.close()
        os.waitpid(self.pid, 0)


def resync_attrs(helper: RootHelper, targets, mount: str, rn: dict, rm: dict) -> str | None:
    """A path both sides have as the same type, with different permission
    bits or owner (a umask ignored, say), gets the native ones through the
    mount, so that later operations do not all differ because of that one."""
    done = []
    for t, a, b in zip(targets, rn["st"], rm["st"]):
        if is_err(a) or is_err(b) or a == b or a[0] != b[0]:
            continue
        if a[4:] != b[4:]:
            continue  # size, links or device differ: not something a chmod mends
        owner = a[2:4] != b[2:4]
        res = helper.fix(os.path.join(mount, t), a[2] if owner else None, a[3] if owner else None,
                         int(a[1], 8) if a[0] != "l" else None)
        now = lstat_tuple(os.path.join(mount, t))
        what = (f"set {t} to {a[1]} {a[2]}:{a[3]} through the mount as root"
                + ("" if now == a else f" but it shows {now} ({res})"))
        done.append(what)
    return "; ".join(done) or None


def worker(cfg: dict) -> None:
    out = open(cfg["out"], "w")  # opened while still root
    os.chdir("/")
    helper = RootHelper()
    os.setgroups(cfg["groups"])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    os.umask(cfg["umask"])
    idx = cfg["idx"]
    rng = random.Random(cfg["seed"] * 1000 + idx)
    gen = Gen(rng, idx, cfg)
    native, mount = cfg["native"], cfg["mount"]
    for n in range(cfg["ops"]):
        s = State(native, idx)
        kind, desc, targets, op = gen.draw(s)
        rn = run_side(op, native, targets)
        rm = run_side(op, mount, targets)
        rec = {"n": n, "w": idx, "kind": kind, "desc": desc, "native": rn, "mount": rm, "repair": None}
        if rn != rm and kind in REPAIRED_KINDS and not is_err(rn["r"]) and is_err(rm["r"]):
            rec["repair"] = repair(kind, targets, native, mount, rn)
        elif rn != rm:
            rec["repair"] = resync_attrs(helper, targets, mount, rn, rm)
        out.write(json.dumps(rec) + "\n")
        out.flush()
    helper.close()
    out.write(json.dumps({"done": True, "w": idx}) + "\n")
    out.close()


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
