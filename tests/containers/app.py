"""The application of the container suite: it runs in its own container
beside the sidecar, on the volume the webhook mounts into it, and writes a
SQLite database there as fast as it can, one committed row per transaction.

It reports on stdout, one JSON object a line, which the suite reads with
`podman logs`: {"ok": ID} after each commit returns, and on failure the
error together with the errno of a plain file create in the same directory
(the probe), which tells what the directory is at that moment: ENOTCONN (a
dead FUSE mount), EROFS (Rewind's read-only guard) or 0 (it took the write).
A failure closes the database and the application retries, as a real one
would, until the volume comes back. SIGTERM ends it after the transaction in
hand, with {"stopped": true}.

`app.py DIR MODE DB` writes DIR/DB with journal_mode MODE (wal or delete);
`app.py DIR MODE DB check` prints {"rows": [...], "integrity": "..."} for
that database and exits.
"""

import errno
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import time

directory, mode, db_name = sys.argv[1:4]
db_path = os.path.join(directory, db_name)
stopping = False


def emit(**fields):
    fields["t"] = time.time()
    print(json.dumps(fields), flush=True)


def on_term(signum, frame):
    global stopping
    stopping = True


def probe():
    path = os.path.join(directory, ".probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        return e.errno
    os.close(fd)
    os.unlink(path)
    return 0


def check():
    con = sqlite3.connect(db_path)
    rows = con.execute("SELECT id, body, digest FROM t ORDER BY id").fetchall()
    bad = [i for i, body, digest in rows if hashlib.sha256(body).hexdigest() != digest]
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    print(json.dumps({"rows": [r[0] for r in rows], "bad": bad, "integrity": integrity}), flush=True)


def write_forever():
    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random()
    con = None
    last = None
    while not stopping:
        try:
            if con is None:
                con = sqlite3.connect(db_path, timeout=5, isolation_level=None)
                con.execute(f"PRAGMA journal_mode={mode}")
                con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB NOT NULL, digest TEXT NOT NULL)")
                emit(opened=True)
            body = rng.randbytes(rng.randint(100, 4000))
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("INSERT INTO t (body, digest) VALUES (?, ?)",
                              (body, hashlib.sha256(body).hexdigest())).lastrowid
            con.execute("COMMIT")
            emit(ok=row)
            last = None
        except (sqlite3.Error, OSError) as e:
            code = probe()
            seen = (str(e), code)
            if seen != last:
                emit(error=str(e), probe=code, probe_name=errno.errorcode.get(code, "written"))
                last = seen
            if con is not None:
                try:
                    con.close()
                except sqlite3.Error:
                    pass
                con = None
            # A real application backs off before it retries.
            time.sleep(0.05)
    if con is not None:
        con.close()
    emit(stopped=True)


if sys.argv[4:] == ["check"]:
    check()
else:
    write_forever()
