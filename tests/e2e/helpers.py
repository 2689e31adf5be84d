"""Shared machinery for the end-to-end suites: a `Volume` that runs the real
`rewind run` over a source/mount/store triple in a per-test directory, the
polling helpers every wait goes through (no fixed sleeps: each wait polls a
condition against a deadline and says what it waited for when it gives up),
and the tree snapshot + comparison that decides whether a restore is exactly
what the mount showed.

Everything here talks to the binary through its command line only
(`$REWIND_BIN`, default <repo>/target/release/rewind), so the suites pin the
product contract in DESIGN.md, not internals.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REWIND_BIN = os.environ.get("REWIND_BIN", str(REPO / "target" / "release" / "rewind"))

# A uid/gid pair no one on the machine uses, for "created by a non-root
# process" and for chown; and a group for setgid directories.
NONROOT_UID = 1234
NONROOT_GID = 1234
SETGID_GID = 2000

NS = 1_000_000_000


# --------------------------------------------------------------------------
# Waiting


class WaitTimeout(AssertionError):
    pass


def wait_until(pred, timeout: float, what: str, interval: float = 0.02, on_timeout=None):
    """Polls `pred()` until it returns a truthy value (returned) or the
    deadline passes (AssertionError naming `what` and the last observation
    `on_timeout()` gives, if any)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            extra = ""
            if on_timeout is not None:
                try:
                    extra = "\n" + str(on_timeout())
                except Exception as e:  # the diagnostics must not hide the timeout
                    extra = f"\n(diagnostics failed: {e!r})"
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        time.sleep(interval)


def fmt_ns(ns: int) -> str:
    """RFC 3339 in UTC with all nine fraction digits."""
    s, frac = divmod(ns, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:09d}Z"


# --------------------------------------------------------------------------
# Mounts


def _unescape_mountinfo(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


class Mount(NamedTuple):
    id: int
    parent: int
    dev: int
    point: str
    fstype: str
    source: str


def mountinfo() -> list[Mount]:
    """Every mount this process sees, in /proc/self/mountinfo's order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, r = left.split(), right.split()
            major, minor = fields[2].split(":")
            out.append(Mount(int(fields[0]), int(fields[1]), os.makedev(int(major), int(minor)),
                             _unescape_mountinfo(fields[4]), r[0], r[1]))
    return out


def mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) for every mount this process sees."""
    return [(m.point, m.fstype) for m in mountinfo()]


def mount_stack(path) -> list[tuple[str, str]]:
    """(fstype, source) of every mount at exactly `path`, bottom first: each
    mount stacked at a path has the one below as its parent."""
    rows = [m for m in mountinfo() if m.point == str(path)]
    ids = {m.id for m in rows}
    ordered = []
    cur = next((m for m in rows if m.parent not in ids), None)
    while cur is not None:
        ordered.append((cur.fstype, cur.source))
        cur = next((m for m in rows if m.parent == cur.id), None)
    assert len(ordered) == len(rows), f"mounts at {path} are not one stack: {rows}"
    return ordered


def mount_type(path) -> str | None:
    # realpath of the parent only: stat of a dead mount point fails.
    p = os.path.join(os.path.realpath(os.path.dirname(str(path))), os.path.basename(str(path)))
    found = None
    for mp, fstype in mounts():
        if mp == p or mp == str(path):
            found = fstype  # last one wins: the top of a stack of mounts
    return found


def is_fuse_mounted(path) -> bool:
    t = mount_type(path)
    return t is not None and t.startswith("fuse")


def lazy_unmount(path) -> None:
    """Detaches a (possibly dead) FUSE mount; harmless when nothing is mounted."""
    for _ in range(8):
        if mount_type(path) is None:
            return
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
        if mount_type(path) is None:
            return
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _top_mount_dev(path) -> int | None:
    """The device number of the topmost FUSE mount at `path`, if any."""
    p = os.path.join(os.path.realpath(os.path.dirname(str(path))), os.path.basename(str(path)))
    found = None
    for m in mountinfo():
        if m.point in (p, str(path)):
            found = m.dev if m.fstype.startswith("fuse") else None
    return found


def mount_is_live(path) -> bool:
    """A live FUSE mount is at `path`: the stat that answers is the mount's
    own (same device as mountinfo says), so a dead mount being detached
    between the two reads cannot pass for a live one with the plain
    directory underneath."""
    dev = _top_mount_dev(path)
    if dev is None:
        return False
    try:
        st = os.stat(path)
        os.listdir(path)
    except OSError:
        return False
    return st.st_dev == dev and _top_mount_dev(path) == dev


# --------------------------------------------------------------------------
# The daemon and the CLI


@dataclass
class Cmd:
    args: list
    code: int
    out: str
    err: str

    def __str__(self):
        return f"$ {' '.join(map(str, self.args))}\nexit {self.code}\nstdout: {self.out[-3000:]}\nstderr: {self.err[-3000:]}"


def rewind(*args, env=None, timeout=300, check=False) -> Cmd:
    argv = [REWIND_BIN, *map(str, args)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"$ {' '.join(argv)} did not finish within {timeout}s; stderr: {e.stderr!r}")
    c = Cmd(argv, p.returncode, p.stdout, p.stderr)
    if check and c.code != 0:
        raise AssertionError(f"command failed:\n{c}")
    return c


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_IOCTL_NOISE = re.compile(r"[^\n]*\[Not Implemented\] ioctl\(.*?out_size: \d+\)\n?", re.DOTALL)


class Volume:
    """One protected directory: source, mount, store and journal under
    `root`, plus a private HOME/XDG tree so that any local catalog the
    daemon keeps lives in the test directory and is deleted with it."""

    def __init__(self, root: Path, name: str = "vol", journal_dir: Path | None = None):
        self.root = Path(root)
        self.name = name
        self.source = self.root / "source"
        self.mount = self.root / "mnt"
        self.store_dir = self.root / "store"
        self.home = self.root / "home"
        self.logs = self.root / "logs"
        self.journal_dir = journal_dir
        for d in (self.source, self.mount, self.store_dir, self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.source, 0o755)
        os.chmod(self.mount, 0o755)
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.log_path: Path | None = None
        self.store_url = f"file://{self.store_dir}"

    # -- environment -----------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        e = dict(os.environ)
        e["HOME"] = str(self.home)
        for k, sub in (("XDG_CACHE_HOME", ".cache"), ("XDG_STATE_HOME", ".local/state"),
                       ("XDG_DATA_HOME", ".local/share"), ("XDG_CONFIG_HOME", ".config"),
                       ("XDG_RUNTIME_DIR", "run")):
            e[k] = str(self.home / sub)
        e.setdefault("REWIND_LOG", "info")
        for k in ("REWIND_STORE", "REWIND_VOLUME"):
            e.pop(k, None)
        if extra:
            e.update(extra)
        return e

    @property
    def journal(self) -> Path:
        return self.journal_dir if self.journal_dir else self.source / ".rewind" / "journal"

    def journal_files(self) -> list[Path]:
        return sorted(self.journal.glob("*.rwj")) if self.journal.exists() else []

    # -- run -------------------------------------------------------------
    def start(self, *extra, segment_interval: str = "1s", shutdown_timeout: str = "30s",
              env: dict | None = None, wait_live: bool = True, timeout: float = 60):
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        self.runs += 1
        self.log_path = self.logs / f"run{self.runs}.log"
        args = [REWIND_BIN, "run", "--source", self.source, "--mount", self.mount,
                "--store", self.store_url, "--volume", self.name,
                "--segment-interval", segment_interval, "--shutdown-timeout", shutdown_timeout]
        if self.journal_dir:
            args += ["--journal-dir", self.journal_dir]
        args += list(extra)
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=subprocess.STDOUT, env=self.env(env))
        logf.close()
        if wait_live:
            self.wait_live(timeout)
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, run: int | None = None) -> str:
        """The daemon's log without colour codes and without fuser's
        multi-line warnings about unimplemented ioctls (TCGETS on every
        Python open), which would bury everything else."""
        p = self.log_path if run is None else self.logs / f"run{run}.log"
        try:
            text = p.read_text(errors="replace") if p else ""
        except FileNotFoundError:
            return ""
        text = _ANSI.sub("", text)
        return _IOCTL_NOISE.sub("", text)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def _diag(self) -> str:
        st = "running" if self.alive() else f"exited {self.proc.returncode if self.proc else None}"
        return f"daemon {st}; mount type {mount_type(self.mount)}; log tail:\n{self.log_tail()}"

    def wait_live(self, timeout: float = 60) -> None:
        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"`rewind run` exited with {self.proc.returncode} before the mount went live\n{self.log_tail(60)}")
            return mount_is_live(self.mount)
        wait_until(ready, timeout, f"the mount {self.mount} to go live", on_timeout=self._diag)

    def stop(self, timeout: float = 90, expect: int | None = 0) -> int:
        """SIGTERM and wait for the exit; asserts the exit code (0 = all in the store)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"`rewind run` did not exit within {timeout}s of SIGTERM\n{self.log_tail()}")
        code = self.proc.returncode
        if expect is not None:
            assert code == expect, f"`rewind run` exited {code} after SIGTERM, expected {expect}\n{self.log_tail(60)}"
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        lazy_unmount(self.mount)

    # -- store CLI ---------------------------------------------------------
    def store_args(self):
        return ["--store", self.store_url, "--volume", self.name]

    def ls(self) -> dict:
        c = rewind("ls", *self.store_args(), "--json", env=self.env(), timeout=60)
        assert c.code == 0, f"rewind ls failed:\n{c}"
        try:
            return json.loads(c.out)
        except json.JSONDecodeError as e:
            raise AssertionError(f"rewind ls --json printed invalid JSON ({e}):\n{c}")

    def window(self) -> dict | None:
        return self.ls().get("window")

    def wait_window(self, timeout: float = 120) -> dict:
        def opened():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"`rewind run` exited with {self.proc.returncode} before the window opened\n{self.log_tail(60)}")
            return self.window()
        return wait_until(opened, timeout, "the restore window to open (first base complete)",
                          interval=0.1, on_timeout=self._diag)

    def wait_latest(self, t_ns: int, timeout: float = 60) -> dict:
        def reached():
            w = self.window()
            return w if w and w["latest_ns"] >= t_ns else None
        def diag():
            info = self.ls()
            return f"window: {info.get('window')}\ngaps: {info.get('gaps')}\n{self._diag()}"
        return wait_until(reached, timeout, f"window.latest to reach {fmt_ns(t_ns)}", interval=0.1,
                          on_timeout=diag)

    def restore(self, at, target: Path, *extra, force=False, lineage=None, check=True, timeout=600) -> Cmd:
        at_s = fmt_ns(at) if isinstance(at, int) else str(at)
        args = ["restore", *self.store_args(), "--at", at_s, "--target", target]
        if force:
            args.append("--force")
        if lineage:
            args += ["--lineage", lineage]
        args += list(extra)
        c = rewind(*args, env=self.env(), timeout=timeout)
        if check:
            assert c.code == 0, f"restore at {at_s} failed:\n{c}"
        return c

    def verify(self, timeout=600) -> Cmd:
        return rewind("verify", *self.store_args(), env=self.env(), timeout=timeout)

    def debug_journal(self) -> list[dict]:
        c = rewind("debug", "journal", "--journal-dir", self.journal, "--json", env=self.env(), timeout=120)
        assert c.code == 0, f"rewind debug journal failed:\n{c}"
        return [json.loads(l) for l in c.out.splitlines() if l.strip()]

    # -- restore preconditions -------------------------------------------
    def delete_local(self) -> None:
        """Deletes everything but the store: source (with the journal inside),
        an outside journal dir, and HOME (where a local catalog would be)."""
        assert not self.alive(), "stop the daemon before deleting its source"
        lazy_unmount(self.mount)
        assert not is_fuse_mounted(self.mount), f"{self.mount} is still mounted"
        for d in (self.source, self.journal_dir, self.home):
            if d is not None and os.path.lexists(d):
                rmtree(d)
        assert not self.source.exists()


def rmtree(path) -> None:
    """rm -rf that refuses to descend into a mount point."""
    path = str(path)
    for mp, _ in mounts():
        if mp == path or mp.startswith(path.rstrip("/") + "/"):
            lazy_unmount(mp)
            if mount_type(mp) is not None:
                raise AssertionError(f"refusing to delete {path}: {mp} is still mounted")
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    shutil.rmtree(path)


# --------------------------------------------------------------------------
# Tree snapshots


@dataclass(frozen=True)
class Entry:
    kind: str            # file, dir, symlink, fifo, other
    mode: int            # full st_mode (type and permission bits)
    uid: int
    gid: int
    size: int | None     # regular files and symlinks
    digest: str | None   # regular files: blake2b of the contents
    target: str | None   # symlinks
    xattrs: tuple        # sorted (name, value) of user.* attributes
    mtime_ns: int | None # regular files only (the contract restores those)
    ino: int = field(compare=False, default=0)
    nlink: int = field(compare=False, default=0)


@dataclass
class Snapshot:
    entries: dict          # relpath -> Entry
    links: frozenset       # frozensets of relpaths that share an inode

    def files(self):
        return {p: e for p, e in self.entries.items() if e.kind == "file"}


def _kind(m: int) -> str:
    if stat.S_ISREG(m):
        return "file"
    if stat.S_ISDIR(m):
        return "dir"
    if stat.S_ISLNK(m):
        return "symlink"
    if stat.S_ISFIFO(m):
        return "fifo"
    return "other"


def _xattrs(path: str) -> tuple:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for n in sorted(names):
        if n.startswith("user."):
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
    return tuple(out)


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()


class SnapshotCache:
    """Digest cache for repeated snapshots of one live tree: a file whose
    (ino, size, mtime, ctime) did not change is not read again."""

    def __init__(self):
        self.d = {}


def snapshot(root, cache: SnapshotCache | None = None, skip_top: tuple = ()) -> Snapshot:
    root = str(root)
    entries = {}
    by_ino: dict[int, list[str]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        absdir = os.path.join(root, rel) if rel else root
        with os.scandir(absdir) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if not rel and name in skip_top:
                continue
            rp = f"{rel}/{name}" if rel else name
            ap = os.path.join(root, rp)
            st = os.lstat(ap)
            k = _kind(st.st_mode)
            size = digest = target = mt = None
            if k == "file":
                size = st.st_size
                mt = st.st_mtime_ns
                key = (rp, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if cache is not None and key in cache.d:
                    digest = cache.d[key]
                else:
                    digest = file_digest(ap)
                    if cache is not None:
                        cache.d[key] = digest
            elif k == "symlink":
                target = os.readlink(ap)
                size = st.st_size
            x = _xattrs(ap) if k != "symlink" else ()
            entries[rp] = Entry(k, st.st_mode, st.st_uid, st.st_gid, size, digest, target, x, mt,
                                st.st_ino, st.st_nlink)
            if k == "dir":
                stack.append(rp)
            elif st.st_nlink > 1:
                by_ino.setdefault(st.st_ino, []).append(rp)
    links = frozenset(frozenset(v) for v in by_ino.values() if len(v) > 1)
    return Snapshot(entries, links)


def diff_snapshots(want: Snapshot, got: Snapshot, *, mtime: bool = True, limit: int = 40) -> list[str]:
    out = []
    for p in sorted(set(want.entries) | set(got.entries)):
        a, b = want.entries.get(p), got.entries.get(p)
        if a is None:
            out.append(f"extra   {p}: {b.kind}")
            continue
        if b is None:
            out.append(f"missing {p}: {a.kind}")
            continue
        fields = ["kind", "mode", "uid", "gid", "digest", "target", "xattrs"]
        if a.kind != "dir":
            fields.append("size")
        if mtime and a.kind == "file":
            fields.append("mtime_ns")
        for f in fields:
            va, vb = getattr(a, f), getattr(b, f)
            if va != vb:
                if f == "mode":
                    va, vb = oct(va), oct(vb)
                out.append(f"differs {p}: {f} want {va!r} got {vb!r}")
    if want.links != got.links:
        wl, gl = set(want.links), set(got.links)
        for g in sorted(wl - gl, key=sorted):
            out.append(f"hard-link group missing: {sorted(g)}")
        for g in sorted(gl - wl, key=sorted):
            out.append(f"hard-link group extra: {sorted(g)}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def assert_same_tree(want: Snapshot, got: Snapshot, what: str, *, mtime: bool = True) -> None:
    d = diff_snapshots(want, got, mtime=mtime)
    assert not d, f"{what}: {len(d)} difference(s):\n  " + "\n  ".join(d)


def tree_listing(root) -> list[tuple]:
    """Every path under root with its type, size and mtime: to prove that a
    command wrote nothing in a directory."""
    out = []
    for dp, dns, fns in os.walk(root):
        for n in sorted(dns + fns):
            p = os.path.join(dp, n)
            st = os.lstat(p)
            out.append((os.path.relpath(p, root), stat.S_IFMT(st.st_mode), st.st_size,
                        st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0))
    return sorted(out)


# --------------------------------------------------------------------------
# Syscalls Python does not wrap

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def renameat2(src, dst, flags: int) -> None:
    r = _libc.renameat2(AT_FDCWD, os.fsencode(str(src)), AT_FDCWD, os.fsencode(str(dst)), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src))


def punch_hole(fd: int, offset: int, length: int) -> None:
    r = _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def as_user(uid: int, gid: int, script: str, *args, timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs a shell script as a non-root uid/gid without supplementary groups."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                           "sh", "-c", script, "sh", *map(str, args)],
                          capture_output=True, timeout=timeout)


def fill_random(path: Path, size: int, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
