"""The store going away in the middle of `rewind prune`, against file:// and
a real S3 server (moto over HTTP), on a copy of test_prune's history (four
bases, every kept point with the tree the mount showed then).

- S3: prune reaches the server through a Gate that closes by itself (the
  server is gone: connections refused) when prune's second batched delete
  (a DeleteObjects request) passes through it, so some condemned objects
  are deleted and others not.
- file://: prune runs with a test-only pause between its changes to the
  store; once the first condemned object is gone, every directory and file
  of the volume's store is made immutable (chattr +i, which binds root too),
  so the next delete fails with EPERM.

Either way prune exits non-zero with a message that names the store and
what failed; once the store is back every kept point restores exactly and
verify passes; the next prune finishes and a last one has nothing left to
do (no lock or condemned marker remains).
"""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import helpers
from helpers import wait_until
from s3fixtures import S3Volume, s3  # noqa: F401  (module fixture)
from s3server import Gate
from test_prune import check_points, history, prune, prune_json, spawn_prune, store_objects  # noqa: F401


class DeleteTripGate(Gate):
    """A Gate that closes by itself (the server goes away) when the
    `trip_at`-th DeleteObjects request line (`POST /<bucket>?delete`)
    passes through it; that request is not forwarded."""

    TRIP = re.compile(rb"POST /[^ ?]*\?delete[^ ]* HTTP/1\.1")

    def __init__(self, upstream_port, trip_at: int):
        super().__init__(upstream_port)
        self.trip_at = trip_at
        self.seen = 0
        self.tripped = threading.Event()

    def admit(self, conn: dict, data: bytes) -> bool:
        if self.tripped.is_set():
            return False
        seen = conn.get("tail", b"") + data
        hits = len(self.TRIP.findall(seen))
        # A request line counted is not kept in the tail, so that it is
        # never counted twice.
        conn["tail"] = b"" if hits else seen[-512:]
        self.seen += hits
        if self.seen >= self.trip_at:
            self.tripped.set()
            self.close()
            return False
        return True


def assert_recovers(vol, history, workdir, failed: helpers.Cmd, what: str) -> None:
    """After a prune that failed: the kept points and verify, then the
    next prune finishes and the one after has nothing left to do."""
    check_points(vol, history.points, workdir, f"after {what}")
    again = prune_json(vol, "--grace", "0s")
    assert not any(n.startswith("could not remove") for n in again["notes"]), again["notes"]
    check_points(vol, history.points, workdir, f"after the prune that followed {what}")
    last = prune_json(vol, "--grace", "0s")
    left = {k: v["condemned"]["objects"] + v["deleted"]["objects"]
            for k, v in last["kinds"].items() if k != "markers"}
    assert not any(left.values()), f"the prune after the one that finished still found work: {left}\n{failed}"
    keys = store_objects(vol)
    assert not any(k.startswith(("lock/", "condemned/")) for k in keys), sorted(keys)


def test_store_gone_in_the_middle_of_a_prune(history, workdir, s3):  # noqa: F811
    vol = history.copy(workdir / "v")
    if history.backend == "s3":
        failed = prune_cut_by_s3_outage(vol, s3)
        what = "a prune cut by an S3 outage"
    else:
        failed = prune_cut_by_unwritable_store(vol)
        what = "a prune cut by an unwritable store"
    # What the operator reads (pytest -rP shows it).
    print(f"{what}: exit {failed.code}: {failed.err.strip()}")
    assert_recovers(vol, history, workdir, failed, what)


def prune_cut_by_s3_outage(vol, s3) -> helpers.Cmd:  # noqa: F811
    before = set(store_objects(vol))
    gate = DeleteTripGate(s3.port, trip_at=2).open()
    try:
        failed = prune(vol, "--grace", "0s", env={"AWS_ENDPOINT_URL": gate.endpoint})
        assert gate.tripped.is_set(), f"prune made fewer than two DeleteObjects requests:\n{failed}"
        assert failed.code != 0, f"prune succeeded although the store went away:\n{failed}"
        assert "unreachable" in failed.err and gate.endpoint in failed.err, failed.err
        assert "DeleteObjects" in failed.err, failed.err
        # The first DeleteObjects went through: the outage fell in the
        # middle of the deletes. (The test reads the server directly.)
        assert before - set(store_objects(vol)), f"nothing was deleted before the outage\n{failed}"
    finally:
        # The server is back for prune too.
        gate.close()
    return failed


def chattr(root: Path, flag: str) -> None:
    subprocess.run(["chattr", "-R", flag, str(root)], check=True, capture_output=True)


def prune_cut_by_unwritable_store(vol) -> helpers.Cmd:
    store = vol.store_dir / vol.name
    before = set(store_objects(vol))
    p = spawn_prune(vol, "--grace", "0s", env={"REWIND_TEST_PRUNE_PAUSE": "1s"})
    frozen = False
    try:
        # A condemned object is gone: prune is deleting, and its next
        # change to the store comes a pause (1 s) later.
        wait_until(lambda: p.poll() is not None or before - set(store_objects(vol)), 300,
                   "prune's first delete", interval=0.02)
        assert p.poll() is None, f"prune finished before the store could be frozen: {p.communicate()}"
        chattr(store, "+i")
        frozen = True
        out, err = p.communicate(timeout=300)
        failed = helpers.Cmd(p.args, p.returncode, out, err)
        assert failed.code != 0, f"prune succeeded although the store could not be changed:\n{failed}"
        assert str(vol.store_dir) in err and "Operation not permitted" in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if frozen:
            chattr(store, "-i")
    return failed
