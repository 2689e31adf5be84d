"""Native-differential test (issue 12): the mount must behave like the
native file system it passes through, operation by operation, for
processes of different umasks, uids, gids and groups, and a restore must
give back the tree the native file system ended with.

Worker processes (nativeops.py; WORKERS there lists root and non-root
credentials, umasks 0, 002, 022 and 077, a supplementary-group-only member
of the shared setgid directory's group and a non-member) each apply their
own deterministic random sequence of operations (creates with every mode
bit, mkdir, mkfifo, mknod of regular files and char/block devices, AF_UNIX
sockets, symlinks, hard links, unlink, rmdir, renames plain, over, with
RENAME_NOREPLACE and RENAME_EXCHANGE, truncates, writes, appends, reads,
every fallocate mode, O_TMPFILE + linkat, user xattrs, chmod with set-id
and sticky bits, chown, utimensat) first to a plain directory on the same
file system as the mount's source, then through the mount at the same
relative path. Per operation the return value or errno and the lstat of
the touched paths (type, mode, owner, size, link count, rdev) must be
equal, except for the documented EXPECTED_DIFFERENCES below, which must
hold exactly. Then the two trees must be equal (type, mode, owner, size,
contents, symlink target, rdev, link count, hard-link groups, every xattr,
and the mtime of the regular files both sides stamped with the same
utimensat). Then the daemon stops, the source and journal are deleted, the
store is restored at latest, and the restored tree must equal the native
tree (and the mount's last view) in everything the contract restores:
device nodes and sockets are not restored (docs/SEMANTICS.md), only user.*
xattrs count.

Seeds: REWIND_NATIVE_SEEDS="1,2,3" (the default, fixed for CI); operations
per worker: REWIND_NATIVE_OPS (default 1000); `scripts/many-seeds native` runs
many seeds. Run with -s to see the per-kind outcome counts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
import nativeops
from nativeops import SHARED, WORKERS, is_err, outcome

SEEDS = [int(s) for s in os.environ.get("REWIND_NATIVE_SEEDS", "1,2,3").replace(" ", "").split(",") if s]
OPS = int(os.environ.get("REWIND_NATIVE_OPS", "1000"))
# Per seed, every kind must have been attempted MIN_ATTEMPTS times and have
# succeeded natively MIN_OK times (kinds that can succeed on ext4).
MIN_ATTEMPTS = max(3, OPS // 50)
MIN_OK = max(2, OPS // 200)

# The differences the mount has by design, each documented as unsupported:
# kind -> (native outcomes it applies to, the errno the mount gives then,
# why). Compared exactly: the test fails if the mount gives anything else
# for those native outcomes, the fixed errno included (then the entry is
# stale and must go). Every other operation must be strictly equal.
FUSE_FALLOCATE = ("the kernel's FUSE client refuses every fallocate mode but KEEP_SIZE, PUNCH_HOLE and "
                  "ZERO_RANGE with EOPNOTSUPP before the daemon sees the request (fs/fuse/file.c)")
EXPECTED_DIFFERENCES = {
    "fallocate_collapse_range": (("ok", "EINVAL"), "EOPNOTSUPP", FUSE_FALLOCATE),
    "fallocate_insert_range": (("ok", "EINVAL"), "EOPNOTSUPP", FUSE_FALLOCATE),
    "tmpfile": (("ok",), "EOPNOTSUPP", "fuser 0.18 has no FUSE_TMPFILE: the daemon answers ENOSYS and "
                                       "the kernel turns it into EOPNOTSUPP for O_TMPFILE"),
}
# Not restored (docs/SEMANTICS.md, "What is not restored").
NOT_RESTORED_TYPES = {"s", "c", "b"}


# --------------------------------------------------------------------------
# Setup


def prefill(source: Path, rng: random.Random) -> None:
    for name, (uid, gid, mode) in SHARED.items():
        (source / name).mkdir()
        os.chown(source / name, uid, gid)
        os.chmod(source / name, mode)
    for i, w in enumerate(WORKERS):
        uid, gid = w["uid"], w["gid"]
        d = source / f"w{i}"
        d.mkdir()
        os.chmod(d, 0o755)
        p = f"w{i}_"
        for k, size in enumerate([0, 5000, 20000, 70000]):
            helpers.fill_random(d / f"{p}n{k}", size, rng)
        (d / f"{p}n4").mkdir()
        helpers.fill_random(d / f"{p}n4" / f"{p}n5", 12000, rng)
        os.link(d / f"{p}n1", d / f"{p}n6")
        os.symlink(f"{p}n2", d / f"{p}n7")
        os.setxattr(d / f"{p}n3", "user.k0", b"prefilled")
        os.mkfifo(d / f"{p}n8", 0o644)
        for path, _dirs, files in os.walk(d):
            for n in [*_dirs, *files, ""]:
                os.chown(os.path.join(path, n) if n else path, uid, gid, follow_symlinks=False)
        for sh, k in (("sg", 9), ("sgx", 10)):
            f = source / sh / f"{p}n{k}"
            helpers.fill_random(f, 9000, rng)
            os.chmod(f, 0o664)
            os.chown(f, uid, -1)  # the group stays the directory's (setgid)


# --------------------------------------------------------------------------
# Trees


def tree(root, *, user_xattrs_only: bool = False) -> tuple[dict, frozenset]:
    """relpath -> attributes, and the hard-link groups (sets of relpaths
    sharing an inode)."""
    root = str(root)
    out, by_ino, stack = {}, collections.defaultdict(list), [""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(os.path.join(root, rel) if rel else root)):
            rp = f"{rel}/{name}" if rel else name
            ap = os.path.join(root, rp)
            st = os.lstat(ap)
            t = nativeops.TYPE.get(stat.S_IFMT(st.st_mode), "?")
            try:
                names = sorted(os.listxattr(ap, follow_symlinks=False))
                xattrs = tuple((n, os.getxattr(ap, n, follow_symlinks=False).hex()) for n in names
                               if not user_xattrs_only or n.startswith("user."))
            except OSError as e:
                xattrs = ("E", nativeops.err(e)[1])
            out[rp] = {
                "type": t, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
                "size": None if t == "d" else st.st_size,
                "digest": helpers.file_digest(ap) if t == "f" else None,
                "target": os.readlink(ap) if t == "l" else None,
                "rdev": (os.major(st.st_rdev), os.minor(st.st_rdev)) if t in "cb" else None,
                "nlink": st.st_nlink, "xattrs": xattrs,
                "mtime_ns": st.st_mtime_ns if t == "f" else None,
            }
            if t == "d":
                stack.append(rp)
            elif st.st_nlink > 1:
                by_ino[st.st_ino].append(rp)
    return out, frozenset(frozenset(v) for v in by_ino.values() if len(v) > 1)


def diff_trees(want, got, *, mtime_of=None, skip_types=frozenset(), limit=60) -> list[str]:
    """Differences of `got` from `want`; mtimes only of the regular files in
    `mtime_of` (None: all), and nothing of entries of the `skip_types`."""
    (we, wl), (ge, gl) = want, got
    keep = lambda e: e["type"] not in skip_types
    we = {p: e for p, e in we.items() if keep(e)}
    ge = {p: e for p, e in ge.items() if keep(e)}
    wl = {g for g in wl if all(p in we for p in g)}
    gl = {g for g in gl if all(p in ge for p in g)}
    out = []
    for p in sorted(set(we) | set(ge)):
        a, b = we.get(p), ge.get(p)
        if a is None or b is None:
            out.append(f"{'extra  ' if a is None else 'missing'} {p}: {(a or b)['type']}")
            continue
        for f, va in a.items():
            if f == "mtime_ns" and mtime_of is not None and p not in mtime_of:
                continue
            if va != b[f]:
                out.append(f"differs {p}: {f} want {va!r} got {b[f]!r}")
    for g in sorted(wl - gl, key=sorted):
        out.append(f"hard-link group missing: {sorted(g)}")
    for g in sorted(gl - wl, key=sorted):
        out.append(f"hard-link group extra: {sorted(g)}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


# --------------------------------------------------------------------------
# Outcomes


def classify(rec) -> str | None:
    """None when the operation behaved as it must; else what went wrong."""
    rn, rm, kind = rec["native"], rec["mount"], rec["kind"]
    exp = EXPECTED_DIFFERENCES.get(kind)
    if exp is not None and outcome(rn["r"]) in exp[0]:
        if rm["r"] == ["E", exp[1]]:
            return None
        return (f"EXPECTED_DIFFERENCES says the mount gives {exp[1]} when the native result is "
                f"{outcome(rn['r'])}, but it gave {outcome(rm['r'])} (entry stale? {exp[2]})")
    if rn == rm:
        return None
    return "result differs" if rn["r"] != rm["r"] else "same result, the lstat after it differs"


def report(records) -> tuple[str, dict]:
    """The per-kind outcome table (native outcome -> count, mount outcome
    where it differs) and the counts."""
    by_kind = collections.defaultdict(collections.Counter)
    differing = collections.defaultdict(collections.Counter)
    for rec in records:
        k = rec["kind"]
        on, om = outcome(rec["native"]["r"]), outcome(rec["mount"]["r"])
        by_kind[k][on] += 1
        if classify(rec) is not None:
            differing[k][f"native {on} / mount {om}"] += 1
        elif on != om:
            differing[k][f"expected: native {on} / mount {om}"] += 1
    lines = [f"{'kind':32} {'n':>4} {'ok':>4}  native errnos; differences"]
    for k in nativeops.WEIGHTS:
        c = by_kind.get(k, collections.Counter())
        errs = ", ".join(f"{e}={n}" for e, n in sorted(c.items()) if e != "ok")
        dif = "; ".join(f"{d}: {n}" for d, n in sorted(differing.get(k, {}).items()))
        lines.append(f"{k:32} {sum(c.values()):4} {c['ok']:4}  {errs}{'; ' + dif if dif else ''}")
    return "\n".join(lines), by_kind


STAT_FIELDS = ("type", "mode", "uid", "gid", "size", "nlink", "rdev")


def signature(rec, why: str) -> str:
    """What kind of difference an operation shows, and for whom: the unit
    the failure message groups by."""
    rn, rm = rec["native"], rec["mount"]
    w = WORKERS[rec["w"]]
    who = f"[uid {w['uid']} gid {w['gid']} groups {w['groups']} umask {w['umask']:03o}]"
    if why.startswith("EXPECTED"):
        what = why
    elif rn["r"] != rm["r"]:
        on, om = outcome(rn["r"]), outcome(rm["r"])
        what = f"native {on} / mount {om}" + (" (different values)" if on == om else "")
    else:
        parts = []
        for a, b in zip(rn["st"], rm["st"]):
            if a == b:
                continue
            if is_err(a) or is_err(b):
                parts.append(f"{outcome(a) if is_err(a) else 'exists'} natively, "
                             f"{outcome(b) if is_err(b) else 'exists'} on the mount")
            else:
                parts.append(",".join(f for f, x, y in zip(STAT_FIELDS, a, b) if x != y))
        what = "same result, lstat after it differs in " + "; ".join(parts)
    return f"{rec['kind']}: {what} {who}"


def mismatch_summary(records, examples=2) -> list[str]:
    groups = collections.defaultdict(list)
    for rec in records:
        why = classify(rec)
        if why is not None:
            groups[signature(rec, why)].append(rec)
    out = []
    for sig, recs in sorted(groups.items()):
        out.append(f"{len(recs):4} x {sig}")
        for rec in recs[:examples]:
            out.append(f"       w{rec['w']} op#{rec['n']} {rec['desc']}\n         native {json.dumps(rec['native'])}"
                       f"\n         mount  {json.dumps(rec['mount'])}"
                       + (f"\n         then: {rec['repair']}" if rec["repair"] else ""))
    return out


# --------------------------------------------------------------------------


def run_workers(workdir: Path, native: Path, mount: Path, seed: int, ops: int) -> list[dict]:
    procs = []
    for i, w in enumerate(WORKERS):
        cfg = {**w, "idx": i, "seed": seed, "ops": ops, "native": str(native), "mount": str(mount),
               "out": str(workdir / f"ops-w{i}.jsonl")}
        errf = open(workdir / f"w{i}.stderr", "wb")
        procs.append(subprocess.Popen([sys.executable, str(Path(nativeops.__file__)), json.dumps(cfg)],
                                      stdin=subprocess.DEVNULL, stdout=errf, stderr=subprocess.STDOUT))
        errf.close()
    try:
        helpers.wait_until(lambda: all(p.poll() is not None for p in procs), 240, "the workers to finish",
                           interval=0.05,
                           on_timeout=lambda: {f"w{i}": sum(1 for _ in open(workdir / f"ops-w{i}.jsonl"))
                                               for i in range(len(procs))})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    records = []
    for i, p in enumerate(procs):
        lines = [json.loads(l) for l in (workdir / f"ops-w{i}.jsonl").read_text().splitlines()]
        assert p.returncode == 0 and lines and lines[-1].get("done"), \
            f"worker w{i} failed (exit {p.returncode}):\n{(workdir / f'w{i}.stderr').read_text()[-4000:]}"
        records += lines[:-1]
    return records


def stamp_mtimes(native: Path, mount: Path, problems: list) -> set:
    """Sets the mtime of about half the regular files, on both sides, to
    the same value: those mtimes are then comparable with the native ones
    (an operation's own mtime is taken at a different instant on each side)."""
    stamped = set()
    for rp, e in sorted(tree(native)[0].items()):
        h = hashlib.blake2b(rp.encode(), digest_size=8).digest()
        if e["type"] != "f" or h[0] & 1:
            continue
        mt = 1_600_000_000 * helpers.NS + int.from_bytes(h[1:5], "little")
        res = [nativeops._try(os.utime, os.path.join(root, rp), ns=(mt, mt), follow_symlinks=False)
               for root in (native, mount)]
        if res[0] != res[1]:
            problems.append(f"stamping the mtime of {rp}: native {res[0]}, mount {res[1]}")
        stamped.add(rp)
    return stamped


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", SEEDS)
def test_native_differential(make_volume, workdir, seed):
    rng = random.Random(seed)
    vol = make_volume("v")
    native = workdir / "native"
    prefill(vol.source, rng)
    subprocess.run(["cp", "-a", str(vol.source), str(native)], check=True)
    os.chmod(native, 0o755)
    # Same file system as the source, so that errnos and limits compare.
    assert os.stat(native).st_dev == os.stat(vol.source).st_dev, "native dir and source on different file systems"
    base = diff_trees(tree(vol.source), tree(native))
    assert not base, "cp -a did not copy the prefilled source exactly:\n" + "\n".join(base)

    vol.start()
    records = run_workers(workdir, native, vol.mount, seed, OPS)
    table, by_kind = report(records)
    print(f"\nseed {seed}: {len(records)} operations from {len(WORKERS)} workers\n{table}")

    problems = []
    bad = mismatch_summary(records)
    if bad:
        n = sum(1 for rec in records if classify(rec) is not None)
        problems.append(f"{n} operations differ between the native file system and the mount "
                        f"(count x kind: difference [worker]):\n" + "\n".join(bad))

    stamped = stamp_mtimes(native, vol.mount, problems)
    assert len(stamped) >= 10, f"only {len(stamped)} regular files got a common mtime"
    want = tree(native)
    seen = tree(vol.mount)
    seen_user = tree(vol.mount, user_xattrs_only=True)
    assert ".rewind" not in seen[0], "the journal directory is visible through the mount"
    d = diff_trees(want, seen, mtime_of=stamped)
    if d:
        problems.append(f"the mount's tree differs from the native tree ({len(d)}):\n  " + "\n  ".join(d))

    vol.stop()
    vol.delete_local()
    target = workdir / "restored"
    vol.restore("latest", target)
    restored = tree(target, user_xattrs_only=True)
    d = diff_trees(tree(native, user_xattrs_only=True), restored, mtime_of=stamped, skip_types=NOT_RESTORED_TYPES)
    if d:
        problems.append(f"the restored tree differs from the native tree ({len(d)}):\n  " + "\n  ".join(d))
    d = diff_trees(seen_user, restored, skip_types=NOT_RESTORED_TYPES)
    if d:
        problems.append(f"the restored tree differs from the mount's last view ({len(d)}):\n  " + "\n  ".join(d))

    low = {k: dict(by_kind.get(k, {})) for k in nativeops.WEIGHTS
           if sum(by_kind.get(k, {}).values()) < MIN_ATTEMPTS
           or (k not in nativeops.NEVER_SUCCEED and by_kind.get(k, {}).get("ok", 0) < MIN_OK)}
    if low:
        problems.append(f"operation kinds below {MIN_ATTEMPTS} attempts or {MIN_OK} native successes: {low}")
    assert not problems, f"seed {seed}:\n" + "\n\n".join(problems) + f"\n\noutcomes per kind:\n{table}"


@pytest.mark.timeout(120)
def test_native_differential_control(workdir):
    """The harness itself, with no mount: both sides are plain directories
    on the same file system, so every operation and both trees must agree,
    except that every EXPECTED_DIFFERENCES entry must be reported stale
    (the "mount" side now behaves natively): the table is compared in both
    directions, and the workers' sequences hold no difference of their own
    (timing, inode numbers, another worker's names)."""
    a, b = workdir / "a", workdir / "b"
    a.mkdir()
    os.chmod(a, 0o755)
    prefill(a, random.Random(SEEDS[0]))
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    records = run_workers(workdir, a, b, SEEDS[0], min(OPS, 300))
    stale = collections.Counter(r["kind"] for r in records if (classify(r) or "").startswith("EXPECTED"))
    other = [r for r in records if classify(r) is not None and r["kind"] not in EXPECTED_DIFFERENCES]
    assert not other, "two native directories differ:\n" + "\n".join(mismatch_summary(other))
    assert set(stale) == set(EXPECTED_DIFFERENCES), \
        f"EXPECTED_DIFFERENCES entries not reported stale when both sides are native: {stale}"
    assert not any(r["repair"] for r in records), "a repair ran although nothing differed"
    d = diff_trees(tree(a), tree(b), mtime_of=set())
    assert not d, "two native directories ended different:\n" + "\n".join(d)
