#!/usr/bin/env bash
# S3 upload throughput and replication lag under a steady write load.
#
#   benches/s3_lag.sh        (RATE_MBS=50 SECONDS_LOAD=30 WARMUP=5 by default)
#
# Setup: moto_server from .venv (tests/e2e/s3server.py serve, its own
# process, loopback HTTP), `rewind run --store s3://lag/bench --listen ...`
# over a fresh source, and a writer that pwrite()s incompressible 1 MiB
# chunks through the mount at RATE_MBS MB/s (10^6 bytes), paced, into a ring
# of 4 files of 128 MiB (so the source stays small).
#
# Method (both figures exclude the first WARMUP seconds):
#  * upload throughput: rewind_shipped_bytes_total from /metrics, sampled
#    every 100 ms; its rate over the measured interval, next to the write
#    rate the application achieved (journal bytes) in the same interval.
#  * replication lag, per write: the time from a chunk's acknowledgement
#    (pwrite returned, wall clock A) to the segment holding it being
#    durable, i.e. listed by the store. The bench LISTs the volume's seg/
#    keys every 50 ms and notes when each key first appears (D). A record is
#    timed between the pwrite call (B) and its return (A), and segment keys
#    carry their first and last record times, so the write is in the last
#    segment whose first_ns <= A (or, if a segment boundary fell inside that
#    pwrite, the one before: then the figure errs long):
#    lag = D(that segment) - A, an upper bound (plus up to 50 ms of
#    polling). p50/p99/max over every chunk written after the warm-up.
#  * upload ceiling: when the load stops with a backlog, the rate at which
#    the backlog drains (shipped bytes from the end of the load to the last
#    write being listed, over that time).
#  * for comparison, the daemon's own gauge rewind_replication_lag_seconds
#    (age of the oldest acknowledged change not yet in the store) sampled
#    every 100 ms from the warm-up's end until the last write is listed:
#    p50/p99/max of the samples.
# The load average is printed: the machine's 2 cores are shared, and other
# processes' load moves the figures.
# moto is a Python server: the figures bound what Rewind does against it on
# this machine, not against AWS.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${REWIND_BIN:-$PWD/target/release/rewind}
PY=$PWD/.venv/bin/python
[[ -x $BIN ]] || { echo "no rewind binary at $BIN (cargo build --release)"; exit 1; }
[[ -x $PY && -x .venv/bin/moto_server ]] || { echo "no .venv with moto: run scripts/setup"; exit 1; }
mkdir -p "${BENCH_TMP:-$PWD/.test-tmp}"
W=$(mktemp -d "${BENCH_TMP:-$PWD/.test-tmp}/bench-s3lag.XXXXXX")
export W BIN
exec "$PY" - "$@" <<'PY'
import json, os, re, signal, subprocess, sys, threading, time, urllib.request
from pathlib import Path

W, BIN = Path(os.environ["W"]), os.environ["BIN"]
RATE = float(os.environ.get("RATE_MBS", "50")) * 1e6
SECS = float(os.environ.get("SECONDS_LOAD", "30"))
WARM = float(os.environ.get("WARMUP", "5"))
REPO = Path.cwd()
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "benches"))
from s3server import S3Server  # noqa: E402
import lagload  # noqa: E402  (the load and the lag, shared with compare.py's LAG)
from lagload import pct  # noqa: E402

CHUNK, FILE, NFILES = 1 << 20, 128 << 20, 4
procs = []


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in r.read().decode().splitlines()
                if l and not l.startswith("#")}


def wait(cond, timeout, what):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            sys.exit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


s3 = S3Server().start()
run = None
try:
    s3.create_bucket("lag")
    for d in ("src", "mnt", "home"):
        (W / d).mkdir()
    env = s3.env(HOME=str(W / "home"), REWIND_LOG="info")
    log = open(W / "run.log", "wb")
    run = subprocess.Popen([BIN, "run", "--source", W / "src", "--mount", W / "mnt", "--store", "s3://lag/bench",
                            "--volume", "bench", "--listen", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    logtext = lambda: (W / "run.log").read_text(errors="replace")
    wait(lambda: re.search(r"health and metrics on http://([0-9.:]+)", logtext()) or run.poll() is not None, 60, "--listen")
    assert run.poll() is None, logtext()[-3000:]
    addr = re.search(r"health and metrics on http://([0-9.:]+)", logtext()).group(1)
    wait(lambda: "rewind_restore_window_earliest_seconds" in scrape(addr), 120, "the first base")

    c = s3.client()
    seen = {}  # seg key -> wall time first listed
    stop = threading.Event()

    def lister():
        try:
            list_loop()
        except Exception:
            if not stop.is_set():
                raise

    def list_loop():
        while not stop.is_set():
            token = None
            while True:
                kw = {"Bucket": "lag", "Prefix": "bench/bench/seg/"}
                if token:
                    kw["ContinuationToken"] = token
                r = c.list_objects_v2(**kw)
                now = time.time()
                for o in r.get("Contents", []):
                    seen.setdefault(o["Key"], now)
                if not r.get("IsTruncated"):
                    break
                token = r["NextContinuationToken"]
            time.sleep(0.05)

    samples = []  # (monotonic, metrics)

    def sampler():
        while not stop.is_set():
            samples.append((time.monotonic(), scrape(addr)))
            time.sleep(0.1)

    threads = [threading.Thread(target=lister, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for t in threads:
        t.start()

    fds = [os.open(W / "mnt" / f"f{k}", os.O_CREAT | os.O_WRONLY, 0o644) for k in range(NFILES)]
    print(f"bench: writing {RATE / 1e6:.0f} MB/s of incompressible data for {WARM + SECS:.0f} s through the mount",
          flush=True)
    try:
        acks, t0, t_load_end, late = lagload.paced_writes(fds, FILE, RATE, WARM + SECS, CHUNK)
    finally:
        for fd in fds:
            os.close(fd)
    last_call_ns = acks[-1][2]

    def segs():
        out = []
        for key, d in list(seen.items()):
            m = re.search(r"/seg/(\d+)-(\d+)-", key)
            out.append((int(m.group(1)), int(m.group(2)), d))
        return sorted(out)

    m_end = scrape(addr)
    t_drain0 = time.monotonic()
    print(f"bench: load done; shipped {m_end['rewind_shipped_bytes_total'] / 1e6:.0f} MB of "
          f"{m_end['rewind_journal_written_bytes_total'] / 1e6:.0f} MB journaled; lag now "
          f"{m_end['rewind_replication_lag_seconds']:.1f} s; waiting for the store to hold the last write", flush=True)
    wait(lambda: any(l >= last_call_ns for _, l, _ in segs()), 600, "the store to hold the last write")
    t_drain1 = time.monotonic()
    m_drained = scrape(addr)
    stop.set()
    for t in threads:
        t.join(5)

    # Per-write lag over the measured interval.
    lags = lagload.per_write_lags(acks, segs(), t0, WARM)
    # Metrics over the measured interval.
    meas = [(t, m) for t, m in samples if WARM <= t - t0 <= WARM + SECS]
    (ta, ma), (tb, mb) = meas[0], meas[-1]
    up = (mb["rewind_shipped_bytes_total"] - ma["rewind_shipped_bytes_total"]) / (tb - ta)
    wr = (mb["rewind_journal_written_bytes_total"] - ma["rewind_journal_written_bytes_total"]) / (tb - ta)
    segn = mb["rewind_segments_shipped_total"] - ma["rewind_segments_shipped_total"]
    glag = [m["rewind_replication_lag_seconds"] for t, m in samples if t - t0 >= WARM]
    drained = m_drained["rewind_shipped_bytes_total"] - m_end["rewind_shipped_bytes_total"]
    drain_s = t_drain1 - t_drain0
    achieved = (sum(1 for mono, _, _ in acks if mono - t0 >= WARM) * CHUNK) / (t_load_end - t0 - WARM)
    errs = mb["rewind_upload_errors_total"]

    run.send_signal(signal.SIGTERM)
    code = run.wait(120)
    run = None
    print(f"bench: application write rate {achieved / 1e6:.1f} MB/s (target {RATE / 1e6:.0f}; "
          f"worst pacing delay {late * 1000:.0f} ms); journal {wr / 1e6:.1f} MB/s")
    print(f"bench: upload throughput {up / 1e6:.1f} MB/s ({segn:.0f} segments in {tb - ta:.1f} s, "
          f"{errs:.0f} upload errors); backlog at the end {(m_end['rewind_journal_written_bytes_total'] - m_end['rewind_shipped_bytes_total']) / 1e6:.0f} MB, "
          f"drained at {drained / max(drain_s, 1e-9) / 1e6:.1f} MB/s in {drain_s:.1f} s")
    print(f"bench: replication lag per write (ack -> segment listed): p50 {pct(lags, 50):.2f} s, "
          f"p99 {pct(lags, 99):.2f} s, max {max(lags):.2f} s over {len(lags)} writes of 1 MiB")
    print(f"bench: rewind_replication_lag_seconds samples: p50 {pct(glag, 50):.2f} s, p99 {pct(glag, 99):.2f} s, "
          f"max {max(glag):.2f} s ({len(glag)} samples)")
    print(f"bench: rewind run exited {code} on SIGTERM; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    sys.exit(0 if code == 0 else 1)
finally:
    if run is not None and run.poll() is None:
        run.kill()
        run.wait()
    # The FUSE mount and the read-only guard under it.
    while subprocess.run(["umount", "-l", str(W / "mnt")], capture_output=True).returncode == 0:
        pass
    s3.stop()
    if not os.environ.get("KEEP"):
        subprocess.run(["rm", "-rf", str(W)])
    else:
        print(f"bench: kept {W}")
PY
