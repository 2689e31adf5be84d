"""SQLite on the mount under continuous transactions (issue 2).

A writer commits small transactions back to back (python's sqlite3 module)
and logs, for each, the wall-clock time before BEGIN (start) and after
COMMIT returned (acknowledgement); a reader connection queries alongside.
Instants are taken at random moments. After the daemon stops and the source
is deleted, each instant is restored: the database must pass
`PRAGMA integrity_check` (the sqlite3 CLI) and hold every transaction
acknowledged by T and none started after T, with its invariants intact.
Run in WAL mode and in rollback-journal (DELETE) mode.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import threading
import time

import pytest

import helpers
from helpers import fmt_ns

INSTANTS = 6


class TxWriter(threading.Thread):
    def __init__(self, path, mode, seed):
        super().__init__(daemon=True)
        self.path, self.mode = str(path), mode
        self.rng = random.Random(seed)
        self.log: list[tuple] = []  # (id, start_ns, ack_ns, size, sum)
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            con = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            mode = con.execute(f"PRAGMA journal_mode={self.mode}").fetchone()[0]
            assert mode.lower() == self.mode, f"journal_mode is {mode}"
            con.execute("PRAGMA synchronous=" + ("NORMAL" if self.mode == "wal" else "FULL"))
            con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB, sum INTEGER)")
            con.execute("CREATE TABLE IF NOT EXISTS c(k INTEGER PRIMARY KEY, n INTEGER, total INTEGER)")
            con.execute("CREATE INDEX IF NOT EXISTS t_sum ON t(sum)")
            con.execute("INSERT OR IGNORE INTO c VALUES (0, 0, 0)")
            n = 0
            while not self.stop.is_set():
                n += 1
                size = self.rng.choice([10, 100, 1000, 5000, 70000])
                payload = self.rng.randbytes(size)
                s = sum(payload[:64])
                start = time.time_ns()
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT INTO t VALUES (?, ?, ?)", (n, payload, s))
                con.execute("UPDATE c SET n = ?, total = total + ? WHERE k = 0", (n, s))
                if n % 7 == 0:
                    con.execute("DELETE FROM t WHERE id = ? AND length(payload) > 4000", (n - 5,))
                con.execute("COMMIT")
                ack = time.time_ns()
                self.log.append((n, start, ack, size, s))
            con.close()
        except BaseException as e:  # reported by the test
            self.error = repr(e)


class Reader(threading.Thread):
    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = str(path)
        self.stop = threading.Event()
        self.error = None
        self.reads = 0

    def run(self):
        try:
            con = sqlite3.connect(self.path, timeout=30)
            while not self.stop.is_set():
                try:
                    con.execute("SELECT count(*), max(id) FROM t").fetchone()
                    self.reads += 1
                except sqlite3.OperationalError as e:
                    if "no such table" not in str(e) and "locked" not in str(e):
                        raise
                time.sleep(0.005)
            con.close()
        except BaseException as e:
            self.error = repr(e)


def check_db(db, t, log, what):
    r = subprocess.run(["sqlite3", str(db), "PRAGMA integrity_check;"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", \
        f"{what}: integrity_check failed: {r.stdout!r} {r.stderr!r}"
    con = sqlite3.connect(str(db))
    try:
        rows = dict(con.execute("SELECT id, sum FROM t").fetchall())
        n, total = con.execute("SELECT n, total FROM c WHERE k = 0").fetchone()
    finally:
        con.close()
    by_id = {e[0]: e for e in log}
    acked = [i for i, s, a, _, _ in log if a <= t]
    started_after = [i for i, s, a, _, _ in log if s > t]
    # One writer commits ids 1, 2, 3, ... in order, and the counter row says
    # how many committed: every acknowledged one, none started after T.
    assert n >= max(acked, default=0), \
        f"{what}: {n} transactions in the database, but {max(acked)} were acknowledged by T"
    assert not started_after or n < min(started_after), \
        f"{what}: {n} transactions in the database, but transaction {min(started_after)} started after T"
    want = {i: by_id[i][4] for i in range(1, n + 1)}
    for i in range(7, n + 1, 7):
        if by_id[i - 5][3] > 4000:
            want.pop(i - 5, None)
    assert rows == want, f"{what}: rows differ from transactions 1..{n}: " \
        f"missing {sorted(set(want) - set(rows))[:10]}, extra {sorted(set(rows) - set(want))[:10]}"
    assert total == sum(by_id[i][4] for i in range(1, n + 1)), f"{what}: counter total is inconsistent"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_sqlite_restore_at_instants(make_volume, workdir, mode):
    rng = random.Random({"wal": 1, "delete": 2}[mode])
    vol = make_volume("v")
    vol.start()
    vol.wait_window()
    (vol.mount / "app").mkdir()
    db = vol.mount / "app" / "app.db"
    w = TxWriter(db, mode, 7)
    w.start()
    helpers.wait_until(lambda: len(w.log) > 20 or w.error, 60, "the first transactions")
    rd = Reader(db)
    rd.start()
    instants = []
    try:
        for _ in range(INSTANTS):
            # The transactions run on; instants fall at random points, some
            # in the middle of a transaction.
            time.sleep(rng.uniform(0.2, 1.3))
            assert w.error is None and w.is_alive(), f"writer failed: {w.error}\n{vol.log_tail()}"
            instants.append(time.time_ns())
        time.sleep(0.3)
    finally:
        w.stop.set()
        rd.stop.set()
        w.join(60)
        rd.join(60)
    assert w.error is None, f"writer failed: {w.error}\n{vol.log_tail()}"
    assert rd.error is None, f"reader failed: {rd.error}"
    assert len(w.log) > 100, f"only {len(w.log)} transactions committed"
    (vol.mount / "after").write_bytes(b"x")  # a record timed after the last instant
    vol.wait_latest(instants[-1])
    vol.stop()
    vol.delete_local()

    for k, t in enumerate(instants):
        target = workdir / f"r{k}"
        vol.restore(t, target)
        rdb = target / "app" / "app.db"
        assert rdb.exists(), f"restore at {fmt_ns(t)} has no database: {os.listdir(target)}"
        check_db(rdb, t, w.log, f"{mode} restore at instant {k} ({fmt_ns(t)})")
        helpers.rmtree(target)
