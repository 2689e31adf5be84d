"""The parallel restore and its progress lines (issue 14, "Fast restore" and
"Progress people expect").

test_progress_lines_in_a_log: `rewind restore` and `rewind verify` with
stderr a pipe (as in a pod's log) print plain periodic lines while they
work and one closing line per phase whose total is exact: the base's bytes
are the volume's file bytes, the records' objects are the segments and
deltas the restore names, the chunks' bytes the same file bytes. The
restore uses several jobs and its contents equal the source. A restore of
one directory (--path) counts only that directory's bytes.

test_s3_going_away_mid_restore: a real S3 server (moto, its own process)
reached through a Gate that closes itself, as a server going away, at the
chosen chunk GET of a restore with 8 jobs: the restore fails naming the
store, the target keeps its incomplete marker, and a restore once the
server is back completes and equals the source.
"""

from __future__ import annotations

import random
import re
import threading
import time

import pytest

import helpers
from s3fixtures import bucket, make_s3_volume, s3  # noqa: F401  (fixtures)
from s3server import Gate

# Random, distinct files, so every chunk is unique and the byte totals of
# the base, of the verified chunks and of the files are one number.
SIZES = [0, 1, 4095, 70_000] + [(1 << 20) * (k % 3) + 997 * k for k in range(1, 21)]


def fill(source, seed=14):
    rng = random.Random(seed)
    for i, n in enumerate(SIZES):
        helpers.fill_random(source / f"d{i % 3}" / f"f{i:02d}", n, rng)
    return sum(SIZES)


def tree(root):
    return helpers.snapshot(root, skip_top=(".rewind",))


PERIODIC = re.compile(r"^rewind: (\w+): [\d.]+ (B|KiB|MiB|GiB)? ?of [\d.]+ ?(B|KiB|MiB|GiB)? \(\d+%\), .+, ETA \S+$")


MIB = 1 << 20
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": MIB, "GiB": 1 << 30}
BASE_TOTAL = re.compile(r"^rewind: base: [\d.]+ ?(?:B|KiB|MiB|GiB)? of ([\d.]+) ?(B|KiB|MiB|GiB) \(")


def closing(err, label):
    """The closing line of phase `label`: its exact count."""
    m = re.findall(rf"^rewind: {label}: done, (\d+) (bytes|objects)( \([^)]*\))? in [\d.]+s, .+$", err, re.M)
    assert len(m) == 1, f"expected one closing line for {label}:\n{err}"
    return int(m[0][0])


@pytest.mark.timeout(300)
def test_progress_lines_in_a_log(volume, workdir):
    total = fill(volume.source)  # the base's bytes: the file written after it is a record
    volume.start()
    volume.wait_window()
    t = time.time_ns()
    (volume.mount / "after-base").write_bytes(b"a record after the base")
    volume.wait_latest(t)
    volume.stop()
    want = tree(volume.source)

    target = workdir / "restored"
    # 1 ms between lines: decoding and writing tens of MiB of chunks takes
    # far longer, so periodic lines must appear before the closing one.
    c = volume.restore("latest", target, "--jobs", "6", "--progress-every", "1ms")
    helpers.assert_same_tree(want, tree(target), "restore with 6 jobs")
    assert not (target / ".rewind").exists()
    periodic = [l for l in c.err.splitlines() if PERIODIC.match(l)]
    assert any(l.startswith("rewind: base: ") for l in periodic), c
    assert closing(c.err, "base") == total, c
    m = re.search(r"records from (\d+) segments and (\d+) deltas", c.out)
    assert m, c
    assert closing(c.err, "records") == int(m.group(1)) + int(m.group(2)), c
    # No bar and no control characters in a log.
    assert "\r" not in c.err and "\x1b" not in c.err, c

    # A restore of one directory fetches only its files' chunks, and its
    # base phase counts only their bytes: the closing line, and the total
    # every periodic line shows (rounded to a tenth of its unit), are that
    # directory's bytes, not the whole base's (three times as many).
    sub = sum(n for i, n in enumerate(SIZES) if i % 3 == 1)
    p = volume.restore("latest", workdir / "part", "--path", "d1", "--progress-every", "1ms")
    assert closing(p.err, "base") == sub, p
    totals = [float(m.group(1)) * UNITS[m.group(2)] for l in p.err.splitlines() if (m := BASE_TOTAL.match(l))]
    assert totals and all(abs(t - sub) <= 0.001 * sub + 0.05 * MIB for t in totals), (sub, totals, p)

    v = helpers.rewind("verify", *volume.store_args(), "--progress-every", "1ms", env=volume.env(), timeout=300)
    assert v.code == 0, v
    assert closing(v.err, "chunks") == total, v
    segs = int(re.search(r"checked (\d+) segments", v.out).group(1))
    assert closing(v.err, "segments") == segs, v


class ChunkTripGate(Gate):
    """A Gate that closes by itself (the server goes away: connections cut,
    new ones refused) when the `trip_at`-th chunk GET passes through it;
    that request is not forwarded."""

    TRIP = re.compile(rb"GET /[^ ]*/chunk/[0-9a-f]{64}[ ?]")

    def __init__(self, upstream_port, trip_at: int):
        super().__init__(upstream_port)
        self.trip_at = trip_at
        self.seen = 0
        self.lock_trip = threading.Lock()
        self.tripped = threading.Event()

    def admit(self, conn: dict, data: bytes) -> bool:
        with self.lock_trip:
            if self.tripped.is_set():
                return False
            self.seen += len(self.TRIP.findall(data))
            if self.seen >= self.trip_at:
                self.tripped.set()
                threading.Thread(target=self.close, daemon=True).start()
                return False
        return True


@pytest.mark.timeout(300)
def test_s3_going_away_mid_restore(make_s3_volume, s3, workdir):
    v = make_s3_volume()
    fill(v.source)
    v.start()
    v.wait_window()
    v.stop()
    want = tree(v.source)

    gate = ChunkTripGate(s3.port, trip_at=5).open()
    try:
        target = workdir / "restored"
        c = helpers.rewind("restore", *v.store_args(), "--at", "latest", "--target", target, "--jobs", "8",
                           env=v.env({"AWS_ENDPOINT_URL": gate.endpoint}), timeout=240)
        assert gate.tripped.is_set(), c
        assert c.code != 0, f"a restore whose store went away must fail:\n{c}"
        assert "restore-incomplete" in c.err and "unreachable" in c.err, c
        assert (target / ".rewind" / "restore-incomplete").exists(), c
    finally:
        gate.close()

    again = v.restore("latest", target, "--jobs", "8", force=True)
    helpers.assert_same_tree(want, tree(target), "restore once the server is back")
    assert not (target / ".rewind").exists()
