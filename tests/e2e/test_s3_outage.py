"""`rewind run` on s3:// through store outages (issue 3, "What it must show").

moto keeps its objects in memory, so the server is never killed: the daemon
reaches it through a `Gate` (a loopback relay) whose closing refuses and
cuts every connection, or the server process is frozen (SIGSTOP: requests
hang until their deadlines). The CLI (ls, verify, restore) and the test's
own checks reach moto directly.

test_outage_loses_nothing: the gate closes while a multipart upload of a
segment is in flight and stays closed >= 20 s while the application keeps
writing (acknowledged writes recorded by the crash suite's model and a bulk
writer); /readyz stays ready and the metrics show the outage. When the gate
reopens the daemon catches up; after a clean stop (exit 0) every
acknowledged change restores at latest from the store alone, `rewind
verify` passes and no multipart upload is left open.

test_kill9_during_outage[refused|hanging]: the same with kill -9 of
`rewind run` during the outage, a restart during it (over the dead mount,
which the daemon clears itself; it must go live within RESTART_DEADLINE
although the store does not answer), another kill -9 during the outage and
a restart after it.

test_journal_full_writers_wait: `--max-journal-bytes 100000000` (journal
files are preallocated 64 MiB each, so the second file trips the bound)
filled with incompressible data during an outage: the writer stalls
without an error, `rewind_journal_writable` is 0, /readyz is not ready and
the log says "journal full"; when the store returns the writer proceeds,
shipped journal files are deleted, and nothing is lost.

test_sigterm_during_outage_keeps_the_journal: SIGTERM during an outage
(once before any base is stored, once after) exits by --shutdown-timeout
with 2 (or 3 without a base) and keeps the journal; the run after the
outage stores everything.
"""

from __future__ import annotations

import os
import time

import pytest

import helpers
from s3fixtures import (  # noqa: F401  (fixtures)
    BulkWriter,
    bucket,
    gate,
    make_s3_volume,
    paced_crash_writer,
    s3,
    wait_metric,
)

OUTAGE = 20.0           # seconds the store stays unreachable, at least
RESTART_DEADLINE = 30.0  # a restart during an outage must serve the mount by then
MIB = 1 << 20


def writer_ok(*writers):
    for w in writers:
        assert w.error is None, f"{type(w).__name__} failed:\n{w.error}"


def finish_and_restore(vol, workdir, writers, crash_writer=None, bulk=None, problems=None):
    """Stops the writers, waits for the store to hold everything, stops the
    daemon cleanly, verifies, checks for open multipart uploads, deletes
    everything local and restores latest from the store alone. Contract
    breaches that do not stop the scenario go to `problems`."""
    problems = [] if problems is None else problems
    for w in writers:
        w.stop.set()
        if hasattr(w, "new_generation"):
            w.new_generation()
    for w in writers:
        w.join(60)
        assert not w.is_alive(), f"{w.name} did not stop"
    writer_ok(*writers)
    t_end = time.time_ns()
    (vol.mount / "after").write_bytes(b"x")  # a record timed after t_end
    vol.wait_latest(t_end, timeout=180)
    vol.stop(expect=0)
    c = vol.verify()
    assert c.code == 0, f"rewind verify failed after the outage:\n{c}"
    left = vol.open_uploads()
    if left:
        abort_lines = [l for l in vol.log().splitlines() if "could not abort multipart upload" in l]
        problems.append(f"{len(left)} multipart upload(s) left open after a clean stop (exit 0): {left}\n"
                        + "\n".join(l[:400] for l in abort_lines[:3]))
    vol.delete_local()
    target = workdir / "restored"
    vol.restore("latest", target)
    if crash_writer is not None:
        crash_writer.m.check(target, "restore at latest after the outage")
    if bulk is not None:
        bulk.check(target, "restore at latest after the outage")
    return problems


def make_dirs(source):
    """The directories test_crash.CrashWriter writes into."""
    for d in ("f", "log", "r", "slots"):
        (source / d).mkdir(parents=True, exist_ok=True)


@pytest.mark.timeout(300)
def test_outage_loses_nothing(make_s3_volume, workdir, gate, s3):
    vol = make_s3_volume(run_endpoint=gate.endpoint)
    make_dirs(vol.source)
    vol.start("--listen", "127.0.0.1:0")
    vol.wait_window()
    cw = paced_crash_writer(vol.mount, 31)
    # 40 MiB/s of incompressible data: segments above 16 MiB go up as
    # multipart uploads, so the outage can cut one mid-upload.
    bulk = BulkWriter(vol.mount, 31, size=8 * MIB, rate=0, subdir="big")
    cw.start()
    bulk.start()
    try:
        wait_metric(vol, "rewind_segments_shipped_total", lambda v: v >= 1, 60, "a segment shipped before the outage")
        bulk.rate = 40 * MIB
        helpers.wait_until(lambda: vol.open_uploads() or writer_ok(cw, bulk), 60,
                           "a multipart upload in flight (a segment over 16 MiB)", interval=0.01)
        gate.close()
        t_out = time.monotonic()
        bulk.rate = 1 * MIB
        m0 = vol.metrics()
        acks0, bytes0 = cw.acks, bulk.written
        assert m0["rewind_journal_writable"] == 1

        # While the store is unreachable the application keeps writing and
        # stays in its Service; the metrics show the outage.
        def outage_seen():
            writer_ok(cw, bulk)
            assert vol.alive(), f"`rewind run` died during the outage:\n{vol.log_tail()}"
            return time.monotonic() - t_out >= OUTAGE and cw.acks > acks0 + 100 and bulk.written > bytes0
        helpers.wait_until(outage_seen, OUTAGE + 60, f"{OUTAGE:.0f} s of outage with writes acknowledged",
                           on_timeout=lambda: f"acks {cw.acks - acks0}, bulk bytes {bulk.written - bytes0}\n{vol._diag()}")
        m1 = vol.metrics()
        assert vol.status("/readyz") == 200, "an S3 outage took the sidecar out of readiness"
        assert m1["rewind_upload_errors_total"] > m0["rewind_upload_errors_total"], m1
        assert m1["rewind_replication_lag_seconds"] >= OUTAGE / 2, \
            f"replication lag does not show a {OUTAGE:.0f} s outage: {m1}"
        assert m1["rewind_journal_writable"] == 1 and m1["rewind_mount_live"] == 1, m1
        # The segments stored so far (moto, read directly), to see the first new one.
        segs_during = [k for k in vol.keys() if "/seg/" in k]

        gate.open()
        t_back = time.monotonic()
        helpers.wait_until(lambda: len([k for k in vol.keys() if "/seg/" in k]) > len(segs_during), 60,
                           "the first segment uploaded after the store returned", on_timeout=vol._diag)
        catch_up_first = time.monotonic() - t_back
    finally:
        cw.stop.set()
        bulk.stop.set()
    problems = finish_and_restore(vol, workdir, [cw, bulk], cw, bulk)
    assert cw.acks > acks0 + 100 and bulk.acked, "too little was written"
    print(f"outage {OUTAGE:.0f}s: first upload {catch_up_first:.1f}s after the store returned; "
          f"{cw.acks} small and {len(bulk.acked)} bulk writes acknowledged")
    assert not problems, "\n\n".join(problems)


class Outage:
    """Starts and ends an outage of one kind: "refused" (the gate closes:
    connections refused and cut) or "hanging" (the server is frozen)."""

    def __init__(self, kind, gate, s3):
        self.kind, self.gate, self.s3 = kind, gate, s3
        self.t0 = None

    def begin(self):
        self.t0 = time.monotonic()
        self.gate.close() if self.kind == "refused" else self.s3.freeze()

    def end(self):
        self.gate.open() if self.kind == "refused" else self.s3.thaw()
        d, self.t0 = time.monotonic() - self.t0, None
        return d

    @property
    def on(self):
        return self.t0 is not None

    def elapsed(self):
        return time.monotonic() - self.t0


@pytest.mark.timeout(360)
@pytest.mark.parametrize("kind", ["refused", "hanging"])
def test_kill9_during_outage(make_s3_volume, workdir, gate, s3, kind):
    vol = make_s3_volume(run_endpoint=gate.endpoint)
    make_dirs(vol.source)
    vol.start()
    vol.wait_window()
    cw = paced_crash_writer(vol.mount, 32)
    cw.start()
    outage = Outage(kind, gate, s3)
    problems = []  # contract breaches that let the scenario go on; asserted at the end

    def kill_and_wait(what):
        writer_ok(cw)
        assert vol.alive(), f"`rewind run` died on its own before {what}:\n{vol.log_tail()}"
        vol.kill9()
        helpers.wait_until(lambda: cw.waiting or cw.error, 30, f"the writer to notice the dead mount ({what})")
        writer_ok(cw)
        assert helpers.is_fuse_mounted(vol.mount), "the dead mount vanished on its own"

    try:
        helpers.wait_until(lambda: cw.acks > 50 or cw.error, 60, "writes before the outage")
        helpers.wait_until(lambda: len(vol.ls()["segments"]) >= 1, 60, "a segment in the store")
        outage.begin()
        acks0 = cw.acks
        helpers.wait_until(lambda: cw.acks > acks0 + 30 or cw.error, 30, "writes acknowledged during the outage")
        kill_and_wait("the first kill, during the outage")

        # Restart during the outage, over the dead mount.
        t0 = time.monotonic()
        vol.start(wait_live=False)
        try:
            vol.wait_live(RESTART_DEADLINE)
            live_after = time.monotonic() - t0
        except AssertionError as e:
            problems.append(f"restart during a {kind} outage: the mount was not live {RESTART_DEADLINE:.0f} s "
                            f"after `rewind run` started (the app has no mount meanwhile):\n{str(e)[:1500]}")
            d = outage.end()
            problems[-1] += f"\n(outage ended after {d:.0f} s to let the scenario go on)"
            vol.wait_live(300)
            live_after = time.monotonic() - t0
        cw.m.check(vol.mount, f"the mount after a restart during a {kind} outage")
        cw.new_generation()
        helpers.wait_until(lambda: cw.acks_this_gen > 30 or cw.error, 30, "writes after the restart")

        if outage.on:
            helpers.wait_until(lambda: outage.elapsed() >= OUTAGE and cw.acks_this_gen > 30 or cw.error,
                               OUTAGE + 30, f"{OUTAGE:.0f} s of outage")
            kill_and_wait("the second kill, during the outage")
            outage_len = outage.end()
            # Restart after the outage.
            vol.start(timeout=60)
            cw.m.check(vol.mount, f"the mount after a restart after a {kind} outage")
            cw.new_generation()
            helpers.wait_until(lambda: cw.acks_this_gen > 30 or cw.error, 30, "writes after the second restart")
        else:
            outage_len = None
    finally:
        cw.stop.set()
        cw.new_generation()
        if outage.on:
            outage.end()
    finish_and_restore(vol, workdir, [cw], cw, problems=problems)
    print(f"{kind} outage of {outage_len} s; restart during it live after {live_after:.1f} s; {cw.acks} writes acknowledged")
    assert not problems, "\n\n".join(problems)


@pytest.mark.timeout(300)
def test_journal_full_writers_wait(make_s3_volume, workdir, gate, s3):
    max_bytes = 100_000_000
    vol = make_s3_volume(run_endpoint=gate.endpoint)
    (vol.source / "seed").write_bytes(b"seed")
    vol.start("--listen", "127.0.0.1:0", "--max-journal-bytes", str(max_bytes))
    vol.wait_window()
    m0 = vol.metrics()
    assert m0["rewind_journal_writable"] == 1 and m0["rewind_journal_bytes"] <= max_bytes, m0

    gate.close()
    t_out = time.monotonic()
    # As fast as it can: more than the bound of incompressible data.
    bulk = BulkWriter(vol.mount, 33, size=8 * MIB, rate=1 << 40, subdir="big")
    bulk.start()
    try:
        def stalled():
            writer_ok(bulk)
            assert vol.alive(), f"`rewind run` died during the outage:\n{vol.log_tail()}"
            return bulk.written >= 48 * MIB and time.monotonic() - bulk.last_ack > 3
        helpers.wait_until(stalled, 60, "the writer to stall on the full journal",
                           on_timeout=lambda: f"written {bulk.written / MIB:.0f} MiB\n{vol._diag()}")
        stalled_at = bulk.written
        m = wait_metric(vol, "rewind_journal_writable", lambda v: v == 0, 10, "rewind_journal_writable to go 0")
        assert m["rewind_journal_bytes"] > max_bytes, f"the writer waits below the bound: {m}"
        on_disk = sum(p.stat().st_size for p in vol.journal_files())
        assert on_disk > max_bytes, f"journal files on disk total {on_disk}, not past the bound {max_bytes}"
        assert stalled_at <= max_bytes + 64 * MIB, f"{stalled_at} bytes written past a {max_bytes} bound"
        helpers.wait_until(lambda: "journal full: writers wait until the store catches up" in vol.log(), 10,
                           "the WARN log line about the full journal", on_timeout=vol.log_tail)
        assert vol.status("/readyz") == 503, "readiness does not show that writers wait"
        # The writer keeps waiting (never fails) as long as the store is away.
        helpers.wait_until(lambda: time.monotonic() - t_out >= OUTAGE, OUTAGE + 5, "the outage to last")
        writer_ok(bulk)
        assert bulk.written == stalled_at, f"the writer moved on while the journal was full ({stalled_at} -> {bulk.written})"
        assert bulk.is_alive() and vol.alive()

        gate.open()
        helpers.wait_until(lambda: bulk.written > stalled_at or writer_ok(bulk), 90,
                           "the writer to proceed after the store returned", on_timeout=vol._diag)
        wait_metric(vol, "rewind_journal_writable", lambda v: v == 1, 60, "rewind_journal_writable back to 1")
        # Shipped journal files are deleted.
        helpers.wait_until(lambda: bulk.written >= stalled_at + 32 * MIB or writer_ok(bulk), 60, "more writes")
    finally:
        bulk.stop.set()
    bulk.join(60)
    writer_ok(bulk)
    wait_metric(vol, "rewind_journal_bytes", lambda v: v <= max_bytes, 60, "the journal back under its bound")
    helpers.wait_until(lambda: sum(p.stat().st_size for p in vol.journal_files()) <= max_bytes, 30,
                       "shipped journal files deleted from disk",
                       on_timeout=lambda: [(p.name, p.stat().st_size) for p in vol.journal_files()])
    problems = finish_and_restore(vol, workdir, [bulk], bulk=bulk)
    print(f"journal full: writer stalled at {stalled_at / MIB:.0f} MiB, {len(bulk.acked)} files of 8 MiB acknowledged")
    assert not problems, "\n\n".join(problems)


SHUTDOWN = 3.0   # --shutdown-timeout of the SIGTERM test
STOP_SLACK = 15.0  # beyond it: one store request's retries (about 6 s) and the exit


@pytest.mark.timeout(240)
def test_sigterm_during_outage_keeps_the_journal(make_s3_volume, workdir, gate, s3):
    """SIGTERM while the store is away: `rewind run` exits by its
    --shutdown-timeout (plus STOP_SLACK) with 2 (records left in the
    journal, kept for the next start), or 3 when only the base is missing;
    the next start after the outage ships them. Three runs: the first
    starts with the store already unreachable (no base yet), the second
    stops during an outage after its base, the third stops cleanly. A
    daemon that does not exit in time is killed (-9) and the scenario goes
    on: the journal must still bring everything to the store."""
    vol = make_s3_volume(run_endpoint=gate.endpoint)
    (vol.source / "d").mkdir()
    acked = {}
    problems = []

    def write(tag, n):
        for k in range(n):
            name = f"d/{tag}-{k}"
            data = os.urandom(k * 1000 + 1)
            (vol.mount / name).write_bytes(data)
            acked[name] = data

    def sigterm(what, allowed):
        t = time.monotonic()
        try:
            code = vol.stop(timeout=SHUTDOWN + STOP_SLACK, expect=None)
        except AssertionError:
            problems.append(f"{what}: `rewind run --shutdown-timeout {SHUTDOWN:.0f}s` had not exited "
                            f"{SHUTDOWN + STOP_SLACK:.0f} s after SIGTERM (killed -9); its log (store retries left out):\n"
                            + "\n".join([l[:300] for l in vol.log().splitlines()
                                          if "rewind::" in l and "rewind::store::s3" not in l][-6:]))
            return
        if code not in allowed:
            problems.append(f"{what}: SIGTERM exited {code} after {time.monotonic() - t:.1f} s, expected one of {allowed}")
        assert vol.journal_files(), f"{what}: the journal was not kept"

    # Run 1: the store is unreachable from the start.
    gate.close()
    t0 = time.monotonic()
    vol.start(shutdown_timeout=f"{SHUTDOWN:.0f}s", timeout=60)
    live_after = time.monotonic() - t0
    write("a", 20)
    sigterm("SIGTERM during an outage, no base stored yet", (2, 3))
    assert not [k for k in vol.keys() if "/seg/" in k or "/base/" in k], "objects stored through a closed gate?"

    # Run 2: the store is back; a base, then another outage and SIGTERM.
    gate.open()
    vol.start(shutdown_timeout=f"{SHUTDOWN:.0f}s")
    vol.wait_window()
    write("b", 20)
    helpers.wait_until(lambda: any(k.endswith(".rws") for k in vol.keys()), 60, "segments in the store")
    gate.close()
    write("c", 20)
    # The outage is under way: the daemon has failed to upload them.
    helpers.wait_until(lambda: "retrying, writes stay in the journal" in vol.log(), 30,
                       "the daemon to report the failed upload", on_timeout=vol.log_tail)
    sigterm("SIGTERM during an outage with records not yet stored", (2,))

    # Run 3: after the outage, everything goes up and the stop is clean.
    gate.open()
    vol.start()
    write("d", 5)
    t_end = time.time_ns()
    (vol.mount / "after").write_bytes(b"x")
    vol.wait_latest(t_end, timeout=120)
    vol.stop(expect=0)
    c = vol.verify()
    assert c.code == 0, f"rewind verify failed:\n{c}"
    assert vol.open_uploads() == []
    vol.delete_local()
    target = workdir / "restored"
    vol.restore("latest", target)
    missing = [n for n, data in acked.items() if not (target / n).exists() or (target / n).read_bytes() != data]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged files missing or wrong after SIGTERMs during outages: {missing[:10]}"
    print(f"run started during an outage went live after {live_after:.1f} s")
    assert not problems, "\n\n".join(problems)
