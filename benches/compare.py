#!/usr/bin/env python3
"""Rewind against the native filesystem it wraps: one command, one table of medians.

Usage (as root; needs /dev/fuse, fio, fusermount3, /usr/bin/time):

    benches/compare.py [--reps 3] [--quick] [--jobs B1,B2,...] [--journal-dir DIR] [--store-dir DIR]
                       [--pg-conf NAME=VALUE ...]
                       [--workdir DIR] [--json OUT] [--keep] [--rewind-arg=--threads=8 ...]
                       [--reference]

    REWIND_BIN=/path/to/rewind benches/compare.py ...   (skips `cargo build --release`)

Setup. WORKDIR (default <repo>/target/bench, the repo's disk) holds native/
(fio runs here directly), src/ (Rewind's source), mnt/ (Rewind's mount),
store/ (the file:// store) and rewind.log (the daemon's log, kept). One
`rewind run` daemon serves the whole session; its journal is
src/.rewind/journal unless --journal-dir. Every job runs on both sides,
interleaved (native, rewind, native, rewind, ...) --reps times, each run in a
fresh directory that is deleted afterwards (through the mount for Rewind),
after `sync` and dropping the page cache. The table shows medians; the rep
values follow it so the spread is visible.

--reference adds a third side to every fio job and B6: libfuse's C
passthrough example (passthrough_ll.c, shipped by Debian's libfuse3-dev,
installed with apt-get if missing and compiled into WORKDIR; nothing of it is
kept in this repository), mounted from refsrc/ at refmnt/ with its defaults:
multi-threaded, cache=auto (1 s timeouts), no kernel passthrough, no
writeback cache. It keeps no journal and ships nothing, so its column is what
the FUSE round trip alone costs on this machine, measured in the same run:
the issue's reference figures, no longer quoted from elsewhere. A run the
reference fails costs only its figure ("-"), with the error logged:
passthrough_ll holds a descriptor for every inode the kernel remembers, so
full-size B4 (20,000 files) fails with EMFILE where the hard limit of open
files is 20,000 (as on the CI machine kind; --quick's 2,000 fit). PG has no
reference figure: the example mounts without allow_other, so the postgres
user cannot enter the mount, and it creates every file as root, whose data
directory PostgreSQL refuses to use.

Jobs and their figures (MB = 10^6 bytes, GB = 10^9 bytes):
  B1          sequential 1 MiB writes of a 1 GiB file, fsync at the end
              (fio --end_fsync=1; fio's runtime includes that fsync). MB/s.
  B2          random 4 KiB writes, 4 jobs, into 4 files of 256 MiB, 15 s. The
              files are written sequentially by an untimed fio pass first
              (fio's own layout for randwrite is only a fallocate, which leaves
              unwritten extents), so the timed pass overwrites data. IOPS.
              Without fsync the native side runs at page-cache speed.
  B3-1, B3-8  4 KiB sequential writes with an fsync after each, 1 and 8 jobs,
              10 s. IOPS: measures the synchronous path (Rewind: journal group
              commit plus the source file's fsync).
  B4          create + one 4 KiB write + close of 20000 files in one directory
              (fio --create_on_open). files/s = files / fio's job runtime. The
              creates happen inside fio's timed loop (checked: a Python
              open/write/close loop of 20000 files takes the same time as
              fio's runtime, and the rep lines also show files/s over the
              whole fio wall time, which adds fio's ~0.5 s start-up).
  B5-*        cold-cache reads of a 1 GiB file written once per side before
              the reps: seq = 1 MiB sequential reads (MB/s), rand = 4 KiB
              random reads for 10 s (IOPS); ro = opened O_RDONLY (--readonly),
              rw = opened O_RDWR but only read (--rw=rw/randrw --rwmixread=100),
              which tells whether Rewind's read path depends on the open mode.
              The rep lines show how much of the file was cached before (0:
              checked with fincore) and after each run. Through a FUSE mount
              a page is cached twice (mount and source), and fio's FADV_RANDOM
              hint reaches only the FUSE file: the daemon's reads of the
              source get the kernel's readahead heuristics, which grow reads
              next to pages already cached, so a random run pulls in more of
              the source than it asked for (of a 1 GiB file in 10 s, all of
              it), which makes rand faster than native. libfuse's example
              (--reference) reads the source the same way.
  B6          SQLite (Python's stdlib module, one subprocess per run), WAL,
              synchronous=FULL: transactions of one ~200-byte insert plus a
              counter update, for 10 s, fresh database. tx/s.
  PG          PostgreSQL's pgbench (TPC-B-like, the default script): Debian's
              PostgreSQL (apt-get install postgresql if missing), a fresh
              cluster per run whose data directory is on the side (initdb,
              default settings: fsync on, synchronous_commit on), run as the
              postgres user, its socket in a directory off the mount;
              `pgbench -i -s 10`, a CHECKPOINT and the settle step (untimed),
              then `pgbench -c 4 -j 2 -T 30`. TPS without the initial
              connection time. The GB of its CPU s/GB are the WAL bytes the
              run generated (pg_current_wal_lsn before and after). The rep
              lines add the WAL bytes per transaction and, for Rewind, the
              journal's payload bytes per transaction (the daemon's
              rewind_journal_written_bytes_total): what its commits flush;
              and PostgreSQL's own counts of what it wrote per transaction
              (8 KiB data pages from pg_stat_bgwriter, WAL write calls from
              pg_stat_wal), to tell which part the journal's payload is.
              --pg-conf NAME=VALUE (repeatable) starts every side's cluster
              with that setting (default: initdb's).
  B7          (once, not per rep) benches/restore_1g.sh: a 1 GiB volume plus
              60 s of changes restored with `rewind restore --at latest`.
              MB/s = the base volume's size (SIZE_MIB) / restore wall time:
              the files created during the changes are restored too but not
              counted, so the figure errs low. Also its peak RSS.
  LAG         replication lag on the main daemon under a paced 50 MB/s load
              of incompressible 1 MiB pwrite()s through the mount (a ring of 4
              files of 128 MiB), 5 s warm-up then 20 s measured, the method of
              benches/s3_lag.sh on the file:// store: the store's seg/
              directory is listed every 50 ms; lag = time a segment is first
              listed - the write's acknowledgement time, where the segment is
              the last whose first record time (from its key) is <= the ack:
              an upper bound, +50 ms of polling. p50, p99 and the achieved
              write rate. No native counterpart.
  --quick: B1 128 MiB, B2 64 MiB/file 4 s, B3 4 s, B4 2000 files, B5 128 MiB
  (random reads 4 s), B6 3 s, PG scale 2 for 5 s, LAG 2 s warm-up + 6 s, B7 skipped unless named
  in --jobs (then SIZE_MIB=128 CHANGE_SECONDS=10).

Around every run:
  CPU s/GB    busy CPU time of the whole machine (/proc/stat user+nice+system+
              irq+softirq; idle and iowait excluded) over the run, divided by
              the GB the application moved (fio's read+write bytes; for B6 the
              process's write() bytes, /proc/self/io wchar). The window also
              covers a `sync` after the run on both sides and, for Rewind,
              the wait until the daemon has shipped everything, so writeback
              and shipping are paid by the run that caused them. In
              parentheses: the daemon's own utime+stime share.
  peak anon   maximum RssAnon of the daemon, sampled every 100 ms for the
              whole session.

Limits: the machine's cores are shared (the load average is printed), so
whole-machine CPU counts other processes too, and small machines give noisy
medians: look at the rep values. Native runs write to the page cache, so
jobs without fsync partly measure memory bandwidth. The file:// store lives
on the same disk as the source unless --workdir says otherwise, so shipping
competes with the application for the disk.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lagload  # noqa: E402  (benches/lagload.py: the LAG load, shared with s3_lag.sh)
from lagload import MiB, pct  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

ALL_JOBS = ["B1", "B2", "B3-1", "B3-8", "B4", "B5-seq-ro", "B5-seq-rw", "B5-rand-ro", "B5-rand-rw", "B6", "PG", "LAG",
            "B7"]
# Ratio targets (rewind / native); the comparison is ">=".
TARGETS = {"B1": 0.40, "B2": 0.25, "B3-1": 0.80, "B3-8": 1.0, "B4": 0.35, "B5-seq-ro": 0.90, "B5-rand-ro": 0.90,
           "B5-seq-rw": 0.50, "B5-rand-rw": 0.50, "B6": 0.60, "PG": 0.90}
# Jobs the reference cannot run at all (see --reference above).
NO_REFERENCE = {"PG"}
MEM_TARGET_MIB = 128
LAG_P99_TARGET_S = 2.0

# Sizes in MiB, durations in seconds, b4 a number of files.
FULL = dict(b1=1024, b2=256, b2_s=15, b3_s=10, b4=20000, b5=1024, b5_s=10, b6_s=10, pg_scale=10, pg_s=30,
            b7_mib=1024, b7_s=60, lag_warm=5, lag_s=20)
QUICK = dict(b1=128, b2=64, b2_s=4, b3_s=4, b4=2000, b5=128, b5_s=4, b6_s=3, pg_scale=2, pg_s=5, b7_mib=128,
             b7_s=10, lag_warm=2, lag_s=6)

# A segment key as src/segment.rs `key()` writes it: first_ns-last_ns-lineage-first_seq-last_seq.
SEG_KEY = re.compile(r"^(\d{20})-(\d{20})-[0-9a-f]{16}-(\d{20})-(\d{20})\.rws$")
LISTEN_LINE = re.compile(r"health and metrics on http://([0-9.:]+)")


class BenchError(Exception):
    """What broke and where to look; main() prints it and exits 1."""


def log(msg):
    print(f"compare: {msg}", flush=True)


def wait_for(cond, timeout, what, poll=0.05):
    """Polls cond() until it returns something truthy; BenchError after timeout seconds."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def detach_all(path):
    """Detaches every mount at `path`: a FUSE mount, dead or alive, and the
    read-only guard `rewind run` leaves under its own."""
    while sh(["umount", "-l", str(path)]).returncode == 0:
        pass


# ---------------------------------------------------------------- machine

CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_cpu_s():
    """Whole-machine busy CPU seconds: user+nice+system+irq+softirq (not idle, iowait, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = v[:7]
    return (user + nice + system + irq + softirq) / CLK_TCK


def proc_cpu_s(pid):
    """A process's utime+stime in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fuse_mounted(path):
    """True when /proc/self/mountinfo shows a fuse mount at path."""
    path = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4].replace("\\040", " ")
            if mnt == path and right.split()[0].startswith("fuse"):
                return True
    return False


def df_line(path):
    out = sh(["df", "-T", str(path)]).stdout.splitlines()
    if len(out) < 2:
        return f"{path}: df failed"
    dev, fstype = out[1].split()[:2]
    return f"{path} on {dev} ({fstype})"


def environment(workdir, journal, store, binary):
    head = sh(["git", "rev-parse", "--short", "HEAD"], cwd=REPO).stdout.strip() or "unknown"
    if sh(["git", "status", "--porcelain"], cwd=REPO).stdout.strip():
        head += "-dirty"
    st = os.stat(binary)
    return {
        "workdir": df_line(workdir),
        "journal": df_line(journal),
        "store": df_line(store),
        "kernel": os.uname().release,
        "nproc": os.cpu_count(),
        "git": head,
        "binary": f"{binary} ({sh([binary, '--version']).stdout.strip()}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.st_mtime))})",
        "fio": sh(["fio", "--version"]).stdout.strip(),
    }


# ---------------------------------------------------------------- the daemon

class Daemon:
    """One `rewind run` for the session, with its metrics address and a memory sampler."""

    def __init__(self, binary, workdir, journal_dir, extra, store_dir=None):
        self.binary, self.workdir = binary, workdir
        self.src, self.mnt = workdir / "src", workdir / "mnt"
        self.store = Path(store_dir) if store_dir else workdir / "store"
        self.journal = Path(journal_dir) if journal_dir else self.src / ".rewind" / "journal"
        self.logpath = workdir / "rewind.log"
        self.extra, self.journal_dir = extra, journal_dir
        self.proc = None
        self.addr = None
        self.peak_anon_kib = 0
        self.window_anon_kib = 0  # peak since the last take_window_peak()
        self._stop = threading.Event()

    def start(self):
        cmd = [str(self.binary), "run", "--source", str(self.src), "--mount", str(self.mnt),
               "--store", f"file://{self.store}", "--volume", "bench", "--listen", "127.0.0.1:0"]
        if self.journal_dir:
            cmd += ["--journal-dir", str(self.journal_dir)]
        cmd += self.extra
        log(f"starting {' '.join(cmd)}")
        self.logfile = open(self.logpath, "wb")
        # Its own session: a Ctrl-C on the terminal reaches only this script, whose
        # finally block then stops the daemon in order.
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, REWIND_LOG=os.environ.get("REWIND_LOG", "info")))
        threading.Thread(target=self._sample_memory, daemon=True).start()
        m = wait_for(lambda: self.check("at startup") or LISTEN_LINE.search(self.logtext()), 60,
                     f"the metrics address in {self.logpath}")
        self.addr = m.group(1)
        wait_for(lambda: self.check("at startup") or fuse_mounted(self.mnt), 60, f"the fuse mount at {self.mnt}")
        wait_for(lambda: self.check("at startup") or "rewind_restore_window_earliest_seconds" in self.scrape(), 120,
                 "the first base (rewind_restore_window_earliest_seconds)")
        log(f"daemon pid {self.proc.pid} live, metrics on {self.addr}")

    def logtext(self):
        return self.logpath.read_text(errors="replace")

    def check(self, where):
        """Raises BenchError if the daemon has exited; returns None so it can lead an `or`."""
        if self.proc.poll() is not None:
            tail = "".join(self.logtext().splitlines(True)[-15:])
            raise BenchError(f"rewind run died {where} (exit code {self.proc.returncode}); "
                             f"log {self.logpath}, last lines:\n{tail}")
        return None

    def scrape(self):
        with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=5) as r:
            return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1])
                    for l in r.read().decode().splitlines() if l and not l.startswith("#")}

    def wait_shipped(self, timeout=600):
        """Waits until everything journaled before now is in the store.

        The daemon's monitor samples the journal twice a second, so only a
        scrape taken more than 0.5 s from now can vouch for writes made before
        now; rewind_replication_lag_seconds is 0 exactly when the last journal
        sequence is stored.
        """
        after = time.monotonic() + 0.6

        def done():
            self.check("while shipping")
            m = self.scrape()
            if m["rewind_store_outage"]:
                # A run whose shipping stalls costs the daemon less CPU and
                # the disk fewer writes: its figures would flatter Rewind.
                outage = [l for l in self.logtext().splitlines() if "rewind::outage" in l][-2:]
                raise BenchError("the store is failing (rewind_store_outage 1), so this run's figures would leave "
                                 "shipping out; fix the store (a full disk?) and run again. Log "
                                 f"{self.logpath}:\n" + "\n".join(outage))
            return time.monotonic() >= after and m["rewind_replication_lag_seconds"] == 0

        wait_for(done, timeout, "the daemon to ship its backlog", poll=0.1)

    def cpu_s(self):
        return proc_cpu_s(self.proc.pid)

    def _sample_memory(self):
        path = f"/proc/{self.proc.pid}/status"
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            kib = int(line.split()[1])
                            self.peak_anon_kib = max(self.peak_anon_kib, kib)
                            self.window_anon_kib = max(self.window_anon_kib, kib)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.1)

    def take_window_peak(self):
        v, self.window_anon_kib = self.window_anon_kib, 0
        return v / 1024

    def stop(self, timeout=120):
        """SIGTERM, then wait for the exit code (0: everything stored)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"rewind run did not exit {timeout} s after SIGTERM; log {self.logpath}")
        self._stop.set()
        return code

    def cleanup(self):
        """Always safe: kills a daemon still running and detaches the mount."""
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        detach_all(self.mnt)


REF_EXAMPLES = Path("/usr/share/doc/libfuse3-dev/examples")


class Reference:
    """libfuse's passthrough_ll example, built here and mounted for the session (see --reference)."""

    def __init__(self, workdir):
        self.src, self.mnt = workdir / "refsrc", workdir / "refmnt"
        self.binary = workdir / "passthrough_ll"
        self.logpath = workdir / "libfuse.log"
        self.proc = None

    def build(self):
        source = REF_EXAMPLES / "passthrough_ll.c"
        if not source.exists() or not shutil.which("pkg-config"):
            log("--reference: apt-get install libfuse3-dev pkg-config (the example's source and headers)")
            r = sh(["apt-get", "install", "-y", "-q", "libfuse3-dev", "pkg-config"],
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            if r.returncode != 0:
                raise BenchError(f"--reference: apt-get install libfuse3-dev pkg-config failed:\n{r.stderr[-2000:]}")
        if not source.exists():
            raise BenchError(f"--reference: libfuse3-dev is installed but {source} is missing")
        flags = sh(["pkg-config", "--cflags", "--libs", "fuse3"])
        if flags.returncode != 0:
            raise BenchError(f"--reference: pkg-config fuse3 failed: {flags.stderr.strip()}")
        cmd = ["gcc", "-O2", "-o", str(self.binary), str(source), *flags.stdout.split(), "-lpthread"]
        r = sh(cmd)
        if r.returncode != 0:
            raise BenchError(f"--reference: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        version = sh(["pkg-config", "--modversion", "fuse3"]).stdout.strip()
        return f"libfuse {version} example passthrough_ll.c, gcc -O2, defaults (multi-threaded, cache=auto)"

    def start(self):
        cmd = [str(self.binary), "-f", "-o", f"source={self.src}", str(self.mnt)]
        log(f"starting the reference: {' '.join(cmd)}")
        self.logfile = open(self.logpath, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.check("at startup") or fuse_mounted(self.mnt), 30, f"the reference mount at {self.mnt}")

    def check(self, where):
        if self.proc.poll() is not None:
            raise BenchError(f"the reference passthrough_ll died {where} (exit code {self.proc.returncode}); "
                             f"log {self.logpath}")
        return None

    def cpu_s(self):
        return proc_cpu_s(self.proc.pid)

    def cleanup(self):
        detach_all(self.mnt)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- workloads

def fio(outdir, tag, args, timeout):
    """Runs one fio command (JSON to a file kept in outdir) and returns (jobs[0], wall seconds)."""
    out = outdir / f"{tag}.json"
    cmd = ["fio", "--ioengine=psync", "--output-format=json", "--group_reporting", f"--output={out}", *args]
    t0 = time.monotonic()
    try:
        r = sh(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {tag} did not finish in {timeout:.0f} s: {' '.join(cmd)}")
    wall = time.monotonic() - t0
    text = out.read_text(errors="replace") if out.exists() else ""
    if r.returncode != 0:
        raise BenchError(f"fio {tag} exited {r.returncode}: {' '.join(cmd)}\n{r.stderr[-2000:]}{text[-1000:]}")
    try:
        job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes before the JSON
    except (ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio {tag}: no JSON result in {out} ({e})\n{r.stderr[-2000:]}")
    if job.get("error"):
        raise BenchError(f"fio {tag}: job error {job['error']} ({cmd})\n{r.stderr[-2000:]}")
    return job, wall


def moved(job):
    return job["read"]["io_bytes"] + job["write"]["io_bytes"]


WRITE = ["--refill_buffers"]  # incompressible, fresh data on every write (no dedup or compression shortcuts)


def run_b1(ctx, d, tag):
    job, wall = fio(ctx.fiodir, tag, [f"--name=b1", f"--directory={d}", "--rw=write", "--bs=1M",
                                      f"--size={ctx.size['b1']}M", "--end_fsync=1", *WRITE], 600)
    return dict(value=job["write"]["bw_bytes"] / 1e6, bytes=moved(job), wall=wall)


def run_b2(ctx, d, tag):
    common = [f"--name=b2", f"--directory={d}", "--numjobs=4", f"--size={ctx.size['b2']}M", *WRITE]
    # Untimed layout: the same file names (b2.N.0), written sequentially, so the
    # timed pass overwrites real data rather than fallocated extents.
    fio(ctx.fiodir, tag + "-layout", [*common, "--rw=write", "--bs=1M", "--end_fsync=1"], 900)
    ctx.settle()
    t = ctx.size["b2_s"]
    job, wall = fio(ctx.fiodir, tag, [*common, "--rw=randwrite", "--bs=4k", "--time_based", f"--runtime={t}"],
                    t + 600)
    return dict(value=job["write"]["iops"], bytes=moved(job), wall=wall)


def run_b3(numjobs):
    def run(ctx, d, tag):
        t = ctx.size["b3_s"]
        job, wall = fio(ctx.fiodir, tag, [f"--name=b3", f"--directory={d}", "--rw=write", "--bs=4k", "--fsync=1",
                                          f"--numjobs={numjobs}", "--size=64M", "--time_based", f"--runtime={t}",
                                          *WRITE], t + 600)
        return dict(value=job["write"]["iops"], bytes=moved(job), wall=wall)
    return run


def run_b4(ctx, d, tag):
    n = ctx.size["b4"]
    job, wall = fio(ctx.fiodir, tag, [f"--name=b4", f"--directory={d}", "--rw=write", "--bs=4k", "--filesize=4k",
                                      f"--nrfiles={n}", "--openfiles=1", "--create_on_open=1",
                                      "--file_service_type=sequential", *WRITE], 1200)
    created = len(os.listdir(d))
    if created != n or job["write"]["total_ios"] != n:
        raise BenchError(f"fio {tag}: expected {n} files of one write each, found {created} files and "
                         f"{job['write']['total_ios']} writes")
    runtime = job["write"]["runtime"] / 1000
    return dict(value=n / runtime, bytes=moved(job), wall=wall, files_per_wall_s=n / wall)


def resident_bytes(path):
    """Bytes of path in the page cache (fincore: mincore() over a mapping, reads nothing)."""
    r = sh(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)])
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def run_b5(mode, rw):
    """mode seq|rand, rw ro|rw: reads of the file laid out by Ctx.b5_file()."""
    def run(ctx, d, tag):
        f = ctx.b5_file()
        # "Cold" is checked, not assumed: what is cached, on the mount and under it,
        # before the run and after it (how much of the file the run pulled in).
        fs = ctx.fuse()
        files = [f] + ([fs.src / f.relative_to(fs.mnt)] if fs else [])
        cached = [resident_bytes(p) for p in files]
        size = f"--size={ctx.size['b5']}M"
        if mode == "seq":
            args = ["--rw=read", "--readonly"] if rw == "ro" else ["--rw=rw", "--rwmixread=100"]
            args += ["--bs=1M", size]
        else:
            t = ctx.size["b5_s"]
            args = ["--rw=randread", "--readonly"] if rw == "ro" else ["--rw=randrw", "--rwmixread=100"]
            args += ["--bs=4k", size, "--time_based", f"--runtime={t}"]
        job, wall = fio(ctx.fiodir, tag, [f"--name=b5", f"--filename={f}", *args], 900)
        if job["write"]["io_bytes"]:
            raise BenchError(f"fio {tag}: a read-only job wrote {job['write']['io_bytes']} bytes")
        figure = job["read"]["bw_bytes"] / 1e6 if mode == "seq" else job["read"]["iops"]
        return dict(value=figure, bytes=moved(job), wall=wall, cached_before=cached,
                    cached_after=[resident_bytes(p) for p in files])
    return run


SQLITE_CHILD = r"""
import json, os, sqlite3, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
db.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
db.execute("INSERT INTO counter VALUES (1, 0)")
n = 0
t0 = time.monotonic()
end = t0 + secs
while time.monotonic() < end:
    db.execute("BEGIN")
    db.execute("INSERT INTO rows (payload) VALUES (?)", (os.urandom(200),))
    db.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
    db.execute("COMMIT")
    n += 1
elapsed = time.monotonic() - t0
assert db.execute("SELECT n FROM counter").fetchone()[0] == n
db.close()
io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
print(json.dumps({"tx": n, "seconds": elapsed, "wchar": int(io["wchar"]), "rchar": int(io["rchar"])}))
"""


def run_b6(ctx, d, tag):
    secs = ctx.size["b6_s"]
    t0 = time.monotonic()
    r = sh([sys.executable, "-c", SQLITE_CHILD, str(d / "bench.db"), str(secs)], timeout=secs + 300)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError(f"sqlite {tag} exited {r.returncode}:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout)
    return dict(value=res["tx"] / res["seconds"], bytes=res["wchar"], wall=wall, tx=res["tx"])


def pg_bindir():
    """The newest Debian PostgreSQL's program directory, installing the package if none is there."""
    def find():
        dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), key=lambda p: int(p.parts[-3]))
        return dirs[-1].parent if dirs else None
    if find() is None:
        log("PG: apt-get install postgresql (Debian's PostgreSQL, for pgbench)")
        r = sh(["apt-get", "install", "-y", "-q", "postgresql"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode != 0 or find() is None:
            raise BenchError(f"PG: apt-get install postgresql failed:\n{r.stderr[-2000:]}")
    return find()


class Postgres:
    """One PostgreSQL cluster for one run: data directory on the side, socket off it, run as postgres."""

    PORT = "5499"

    def __init__(self, d, tag, logdir, conf=()):
        import pwd
        self.conf = conf
        self.bindir = pg_bindir()
        self.pw = pwd.getpwnam("postgres")
        self.data = d / "pgdata"
        # The socket directory is not on the side: the run measures the data directory's I/O.
        self.sock = Path(f"/tmp/rewind-bench-pg-{os.getpid()}")
        self.log = logdir / f"{tag}-postgres.log"
        self.running = False

    def as_postgres(self, prog, *args, timeout=600, check=True):
        cmd = ["runuser", "-u", "postgres", "--", str(self.bindir / prog), *args]
        try:
            r = sh(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"PG: {' '.join(cmd)} did not finish in {timeout} s")
        if check and r.returncode != 0:
            raise BenchError(f"PG: {' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-1000:]}{r.stderr[-2000:]}"
                             + (f"\nserver log {self.log}:\n{self.log.read_text()[-2000:]}" if self.log.exists() else ""))
        return r

    def start(self):
        os.chown(self.data.parent, self.pw.pw_uid, self.pw.pw_gid)
        shutil.rmtree(self.sock, ignore_errors=True)
        self.sock.mkdir()
        os.chown(self.sock, self.pw.pw_uid, self.pw.pw_gid)
        self.log.touch()
        os.chown(self.log, self.pw.pw_uid, self.pw.pw_gid)
        self.as_postgres("initdb", "-D", str(self.data), "--no-instructions", "-A", "trust", "-U", "postgres")
        self.as_postgres("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "120", "-o",
                         f"-k {self.sock} -c listen_addresses= -p {self.PORT}"
                         + "".join(f" -c {c}" for c in self.conf), "start")
        self.running = True

    def client(self, prog, *args, timeout=600):
        return self.as_postgres(prog, "-h", str(self.sock), "-p", self.PORT, "-U", "postgres", *args,
                                timeout=timeout)

    def sql(self, query):
        return self.client("psql", "-X", "-q", "-A", "-t", "-d", "postgres", "-c", query).stdout.strip()

    def writes(self):
        """PostgreSQL's own counters of what it wrote: data pages (8 KiB) by
        the checkpointer, the background writer and the backends, and WAL
        write calls (each rewrites at least the current 8 KiB WAL page)."""
        row = self.sql("SELECT b.buffers_checkpoint + b.buffers_clean + b.buffers_backend, w.wal_write "
                       "FROM pg_stat_bgwriter b, pg_stat_wal w")
        pages, wal_writes = row.split("|")
        return {"data_pages": int(pages), "wal_writes": int(wal_writes)}

    def stop(self):
        if self.running:
            self.as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "120", "stop", check=False)
            self.running = False
        shutil.rmtree(self.sock, ignore_errors=True)


def run_pg(ctx, d, tag):
    pg = Postgres(d, tag, ctx.fiodir, ctx.pg_conf)
    try:
        pg.start()
        pg.client("pgbench", "-i", "-q", "-s", str(ctx.size["pg_scale"]), "postgres", timeout=1200)
        pg.sql("CHECKPOINT")
        ctx.settle()
        lsn0 = pg.sql("SELECT pg_current_wal_lsn()")
        writes0 = pg.writes()
        journal = lambda: ctx.daemon.scrape()["rewind_journal_written_bytes_total"] if ctx.side == "rewind" else 0
        j0 = journal()
        t0 = time.monotonic()
        secs = ctx.size["pg_s"]
        r = pg.client("pgbench", "-c", "4", "-j", "2", "-T", str(secs), "postgres", timeout=secs + 600)
        wall = time.monotonic() - t0
        wal = int(pg.sql(f"SELECT pg_current_wal_lsn() - '{lsn0}'::pg_lsn").split(".")[0])
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", r.stdout)
        tx = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
        if not m or not tx:
            raise BenchError(f"pgbench {tag}: no TPS in its output:\n{r.stdout[-2000:]}")
        if failed and int(failed.group(1)):
            raise BenchError(f"pgbench {tag}: {failed.group(1)} failed transactions:\n{r.stdout[-2000:]}")
        res = dict(value=float(m.group(1)), bytes=wal, wall=wall, tx=int(tx.group(1)), wal_per_tx=wal / int(tx.group(1)))
        # What PostgreSQL itself wrote per transaction, both sides alike:
        # data pages (8 KiB each) and WAL write calls.
        writes1 = pg.writes()
        for k in writes0:
            res[f"{k}_per_tx"] = (writes1[k] - writes0[k]) / res["tx"]
        if ctx.side == "rewind":
            # What each commit's journal flush carries beside the WAL (see the report).
            res["journal_per_tx"] = (journal() - j0) / int(tx.group(1))
        return res
    finally:
        pg.stop()


def prepare_b5(ctx):
    ctx.b5_file()


# job -> (figure unit, runner, untimed preparation or None); B7 and LAG are run apart.
JOBS = {
    "B1": ("MB/s", run_b1, None),
    "B2": ("IOPS", run_b2, None),
    "B3-1": ("IOPS", run_b3(1), None),
    "B3-8": ("IOPS", run_b3(8), None),
    "B4": ("files/s", run_b4, None),
    "B5-seq-ro": ("MB/s", run_b5("seq", "ro"), prepare_b5),
    "B5-seq-rw": ("MB/s", run_b5("seq", "rw"), prepare_b5),
    "B5-rand-ro": ("IOPS", run_b5("rand", "ro"), prepare_b5),
    "B5-rand-rw": ("IOPS", run_b5("rand", "rw"), prepare_b5),
    "B6": ("tx/s", run_b6, None),
    "PG": ("TPS", run_pg, None),
}


class Ctx:
    """What a run needs: sizes, directories, the daemon, and the current side."""

    def __init__(self, size, workdir, daemon, reference=None):
        self.size, self.workdir, self.daemon, self.reference = size, workdir, daemon, reference
        self.fiodir = workdir / "fio"
        self.side = None
        self.pg_conf = ()
        self._b5 = {}

    def fuse(self):
        """The FUSE daemon behind the current side: the Daemon, the Reference, or None for native."""
        return {"rewind": self.daemon, "libfuse": self.reference}.get(self.side)

    def root(self):
        return self.workdir / "native" if self.side == "native" else self.fuse().mnt

    def start_clock(self):
        """Starts (or restarts) the CPU accounting of the current run."""
        self.cpu0 = busy_cpu_s()
        self.daemon_cpu0 = self.fuse().cpu_s() if self.fuse() else None

    def settle(self):
        """Between an untimed setup step and the timed step: everything on disk,
        shipped (Rewind) and out of the page cache; the setup's CPU is not counted."""
        os.sync()
        if self.side == "rewind":
            self.daemon.wait_shipped()
        drop_caches()
        self.start_clock()

    def b5_file(self):
        """The B5 file of the current side, written once (through the mount for Rewind)."""
        if self.side not in self._b5:
            d = self.root() / "b5"
            d.mkdir(exist_ok=True)
            log(f"laying out the {self.size['b5']} MiB B5 file on {self.side}")
            fio(self.fiodir, f"B5-layout-{self.side}", ["--name=b5lay", f"--filename={d / 'b5.dat'}", "--rw=write",
                                                       "--bs=1M", f"--size={self.size['b5']}M", "--end_fsync=1",
                                                       *WRITE], 900)
            if self.side == "rewind":
                self.daemon.wait_shipped()
            self._b5[self.side] = d / "b5.dat"
        return self._b5[self.side]

    def drop_b5(self):
        for f in self._b5.values():
            shutil.rmtree(f.parent)
        self._b5.clear()


def measured_run(ctx, job, rep, runner, prepare=None):
    """One run of a job on ctx.side, in a fresh directory, with its CPU and memory."""
    tag = f"{job}-{ctx.side}-{rep}"
    try:
        return _measured_run(ctx, job, rep, runner, prepare, tag)
    except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
        # A dead daemon explains any failure on the mount: say so first.
        if ctx.fuse():
            ctx.fuse().check(f"during {tag}")
        raise BenchError(f"{tag} on {ctx.root()}: {e}") from e


def _measured_run(ctx, job, rep, runner, prepare, tag):
    rewind, fs = ctx.side == "rewind", ctx.fuse()
    if fs:
        fs.check(f"before {tag}")
    d = ctx.root() / f"run-{tag}"
    d.mkdir()
    if prepare:
        prepare(ctx)  # before the cache drop and outside the accounting
    drop_caches()
    if rewind:
        ctx.daemon.take_window_peak()
    ctx.start_clock()
    res = runner(ctx, d, tag)
    # Writeback and shipping belong to the run that caused them.
    os.sync()
    if rewind:
        ctx.daemon.wait_shipped()
    cpu = busy_cpu_s() - ctx.cpu0
    gb = res["bytes"] / 1e9
    res.update(job=job, side=ctx.side, rep=rep, cpu_s=cpu, cpu_s_per_gb=cpu / gb if gb else None)
    if fs:
        dc = fs.cpu_s() - ctx.daemon_cpu0
        res.update(daemon_cpu_s=dc, daemon_cpu_s_per_gb=dc / gb if gb else None)
    if rewind:
        res.update(peak_anon_mib=ctx.daemon.take_window_peak())
    shutil.rmtree(d)
    if fs:
        fs.check(f"after {tag}")
    return res


# ---------------------------------------------------------------- LAG

def seg_dir(store, timeout=60):
    """Where the volume's segments land in the file:// store (a directory named seg holding *.rws)."""
    def find():
        for dp, _, files in os.walk(store):
            if Path(dp).name == "seg" and any(SEG_KEY.match(f) for f in files):
                return Path(dp)
        return None
    return wait_for(find, timeout, f"a segment under {store}", poll=0.1)


def run_lag(ctx):
    """Replication lag per 1 MiB write under a paced load (see the module docstring)."""
    try:
        return _run_lag(ctx)
    except (OSError, ValueError) as e:
        ctx.daemon.check("during LAG")
        raise BenchError(f"LAG: {e}") from e


def _run_lag(ctx):
    daemon, size = ctx.daemon, ctx.size
    rate, chunk, ring, nfiles = 50e6, MiB, 128 * MiB, 4
    warm, secs = size["lag_warm"], size["lag_s"]
    d = daemon.mnt / "lag"
    d.mkdir()
    # A short write so that the seg/ directory exists and can be found.
    (d / "probe").write_bytes(os.urandom(4096))
    segdir = seg_dir(daemon.store)
    seen = {name: time.time() for name in os.listdir(segdir) if SEG_KEY.match(name)}
    stop = threading.Event()
    lister_error = []

    def lister():
        try:
            while not stop.is_set():
                names = os.listdir(segdir)
                now = time.time()
                for name in names:
                    if name not in seen and SEG_KEY.match(name):
                        seen[name] = now
                time.sleep(0.05)
        except Exception as e:  # surfaced after the load
            lister_error.append(e)

    th = threading.Thread(target=lister, daemon=True)
    th.start()
    fds = [os.open(d / f"f{k}", os.O_CREAT | os.O_WRONLY, 0o644) for k in range(nfiles)]
    c0, d0 = busy_cpu_s(), daemon.cpu_s()
    log(f"LAG: writing {rate / 1e6:.0f} MB/s through the mount for {warm + secs} s")
    try:
        acks, t0, t_end, late = lagload.paced_writes(fds, ring, rate, warm + secs, chunk)
    finally:
        for fd in fds:
            os.close(fd)
    n = len(acks)
    last_call_ns = acks[-1][2]

    def segs():
        return sorted((int(m.group(1)), int(m.group(2)), t) for name, t in list(seen.items())
                      if (m := SEG_KEY.match(name)))

    wait_for(lambda: daemon.check("during LAG") or any(last >= last_call_ns for _, last, _ in segs()), 300,
             "the store to list the last LAG write")
    stop.set()
    th.join(5)
    if lister_error:
        raise BenchError(f"LAG: listing {segdir} failed: {lister_error[0]}")
    c1, d1 = busy_cpu_s(), daemon.cpu_s()
    lags = lagload.per_write_lags(acks, segs(), t0, warm)
    measured = sum(1 for mono, _, _ in acks if mono - t0 >= warm)
    achieved = measured * chunk / (t_end - t0 - warm) / 1e6
    gb = n * chunk / 1e9
    shutil.rmtree(d)
    daemon.wait_shipped()
    return dict(p50=pct(lags, 50), p99=pct(lags, 99), max=max(lags), writes=len(lags), rate_mbs=achieved,
                target_mbs=rate / 1e6, worst_pacing_delay_s=late, segdir=str(segdir),
                cpu_s_per_gb=(c1 - c0) / gb, daemon_cpu_s_per_gb=(d1 - d0) / gb,
                peak_anon_mib=daemon.take_window_peak())


# ---------------------------------------------------------------- B7

def wall_seconds(s):
    """/usr/bin/time's 'Elapsed (wall clock)': [h:]m:ss.ss."""
    secs = 0.0
    for part in s.split(":"):
        secs = secs * 60 + float(part)
    return secs


def run_b7(binary, workdir, size):
    tmp = workdir / "b7"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, REWIND_BIN=str(binary), SIZE_MIB=str(size["b7_mib"]),
               CHANGE_SECONDS=str(size["b7_s"]), BENCH_TMP=str(tmp))
    logpath = workdir / "b7.log"
    log(f"B7: benches/restore_1g.sh SIZE_MIB={size['b7_mib']} CHANGE_SECONDS={size['b7_s']} (log {logpath})")
    r = sh([str(REPO / "benches" / "restore_1g.sh")], env=env, timeout=3600)
    out = r.stdout + r.stderr
    logpath.write_text(out)
    if r.returncode != 0:
        raise BenchError(f"B7: restore_1g.sh exited {r.returncode}; output in {logpath}:\n{out[-2000:]}")
    base = re.search(r"base of (\d+) MiB complete in ([\d.]+) s", out)
    changes = re.search(r"(\d+) operations, (\d+) MiB overwritten, (\d+) new files", out)
    rest = re.search(r"restore of (\d+) MiB .*?: wall (\S+), peak RSS (\d+) MiB, CPU (\S+); contents (\w+)", out)
    if not (base and changes and rest):
        raise BenchError(f"B7: could not parse restore_1g.sh's output ({logpath})")
    wall = wall_seconds(rest.group(2))
    mib = int(rest.group(1))
    return dict(size_mib=mib, change_seconds=size["b7_s"], base_s=float(base.group(2)),
                operations=int(changes.group(1)), overwritten_mib=int(changes.group(2)),
                new_files=int(changes.group(3)), restore_wall_s=wall, restore_mbs=mib * MiB / 1e6 / wall,
                peak_rss_mib=int(rest.group(3)), cpu=rest.group(4), contents=rest.group(5))


# ---------------------------------------------------------------- report

def fmt(v, nd=None):
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if nd is None:
        nd = 0 if abs(v) >= 100 else 2 if abs(v) < 10 else 1
    return f"{v:,.{nd}f}"


def summarize(job, unit, runs):
    # A failed reference run has no value (see main).
    values = lambda side: [r["value"] for r in runs if r["side"] == side and r["value"] is not None]
    nat, rew, ref = values("native"), values("rewind"), values("libfuse")
    med = lambda xs: statistics.median(xs) if xs else None
    n, w, lf = med(nat), med(rew), med(ref)
    ratio = w / n if n and w is not None else None
    target = TARGETS.get(job)
    cpu = lambda side, k: med([r[k] for r in runs if r["side"] == side and r.get(k) is not None])
    return dict(job=job, unit=unit, native=n, rewind=w, ratio=ratio, target=target,
                met=None if ratio is None or target is None else ratio >= target,
                cpu_native=cpu("native", "cpu_s_per_gb"), cpu_rewind=cpu("rewind", "cpu_s_per_gb"),
                cpu_daemon=cpu("rewind", "daemon_cpu_s_per_gb"), native_reps=nat, rewind_reps=rew,
                libfuse=lf, libfuse_ratio=lf / n if n and lf is not None else None, libfuse_reps=ref,
                cpu_libfuse=cpu("libfuse", "cpu_s_per_gb"), cpu_libfuse_daemon=cpu("libfuse", "daemon_cpu_s_per_gb"))


def table(rows, reference):
    head = ["job", "figure unit", "native (median)", "rewind (median)", "ratio rewind/native", "target", "met?",
            "CPU s/GB native", "CPU s/GB rewind (daemon share)"]
    if reference:
        head += ["libfuse ref (median)", "ratio libfuse/native", "CPU s/GB libfuse (daemon share)"]
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def report(summaries, lag, b7, peak_mib, env, runs):
    yes = lambda b: "-" if b is None else ("yes" if b else "NO")
    reference = any(s["libfuse"] is not None for s in summaries)
    extra = ["-", "-", "-"] if reference else []
    rows = []
    for s in summaries:
        rows.append([s["job"], s["unit"], fmt(s["native"]), fmt(s["rewind"]), fmt(s["ratio"], 2),
                     f">= {s['target']:.2f}", yes(s["met"]), fmt(s["cpu_native"], 2),
                     f"{fmt(s['cpu_rewind'], 2)} ({fmt(s['cpu_daemon'], 2)})"])
        if reference:
            rows[-1] += [fmt(s["libfuse"]), fmt(s["libfuse_ratio"], 2),
                         f"{fmt(s['cpu_libfuse'], 2)} ({fmt(s['cpu_libfuse_daemon'], 2)})"]
    if lag:
        rows.append(["LAG p99", "s", "-", fmt(lag["p99"], 2), "-", f"<= {LAG_P99_TARGET_S:.0f} s",
                     yes(lag["p99"] <= LAG_P99_TARGET_S), "-",
                     f"{fmt(lag['cpu_s_per_gb'], 2)} ({fmt(lag['daemon_cpu_s_per_gb'], 2)})", *extra])
    if peak_mib is not None:
        rows.append(["peak anon memory", "MiB", "-", fmt(peak_mib, 1), "-", f"<= {MEM_TARGET_MIB} MiB",
                     yes(peak_mib <= MEM_TARGET_MIB), "-", "-", *extra])
    out = [table(rows, reference), ""]
    if peak_mib is not None:
        out.append(f"peak anonymous memory of rewind run (RssAnon, 100 ms samples, whole session): {peak_mib:.1f} MiB")
    if b7:
        out.append(f"B7 restore: {b7['size_mib']} MiB volume + {b7['change_seconds']} s of changes "
                   f"({b7['operations']} operations, {b7['new_files']} new files): restore wall "
                   f"{b7['restore_wall_s']:.2f} s = {b7['restore_mbs']:.1f} MB/s (base size / wall), peak RSS "
                   f"{b7['peak_rss_mib']} MiB, CPU {b7['cpu']}, contents {b7['contents']}; base took "
                   f"{b7['base_s']:.2f} s")
    if lag:
        out.append(f"LAG (file:// store): per-write lag p50 {lag['p50']:.2f} s, p99 {lag['p99']:.2f} s, max "
                   f"{lag['max']:.2f} s over {lag['writes']} writes of 1 MiB; write rate achieved "
                   f"{lag['rate_mbs']:.1f} MB/s of {lag['target_mbs']:.0f} (worst pacing delay "
                   f"{lag['worst_pacing_delay_s'] * 1000:.0f} ms)")
    if summaries:
        out += ["", f"rep values (run order native, rewind{', libfuse' if reference else ''}, ...):"]
    for s in summaries:
        out.append(f"  {s['job']:<11} {s['unit']:<8} native: {' '.join(fmt(v) for v in s['native_reps'])}"
                   f"  | rewind: {' '.join(fmt(v) for v in s['rewind_reps'])}"
                   + (f"  | libfuse: {' '.join(fmt(v) for v in s['libfuse_reps'])}" if reference else ""))
        mine = lambda side, k: [r[k] for r in runs if r["job"] == s["job"] and r["side"] == side and k in r]
        if s["job"] == "B4":
            w = lambda side: " ".join(fmt(v) for v in mine(side, "files_per_wall_s"))
            out.append(f"  {'':<20} files/s over fio's wall time (start-up included): native {w('native')}"
                       f"  | rewind {w('rewind')}" + (f"  | libfuse {w('libfuse')}" if reference else ""))
        if s["job"] == "PG":
            w = lambda side, k: " ".join(fmt(v, 0) for v in mine(side, k))
            out.append(f"  {'':<20} bytes per transaction: WAL native {w('native', 'wal_per_tx')}  | WAL rewind "
                       f"{w('rewind', 'wal_per_tx')}  | rewind's journal (every file's writes) "
                       f"{w('rewind', 'journal_per_tx')}")
            w2 = lambda side, k: " ".join(fmt(v, 2) for v in mine(side, k))
            out.append(f"  {'':<20} PostgreSQL's writes per transaction (pg_stat_bgwriter, pg_stat_wal): "
                       f"8 KiB data pages native {w2('native', 'data_pages_per_tx')}  | rewind "
                       f"{w2('rewind', 'data_pages_per_tx')}; WAL write calls native "
                       f"{w2('native', 'wal_writes_per_tx')}  | rewind {w2('rewind', 'wal_writes_per_tx')}")
        if s["job"].startswith("B5"):
            mib = lambda v: "+".join(fmt((b or 0) / MiB, 0) for b in v)
            c = lambda side: " ".join(f"{mib(a)}->{mib(b)}" for a, b in zip(mine(side, "cached_before"),
                                                                            mine(side, "cached_after")))
            out.append(f"  {'':<20} MiB of the file cached before->after each run: native {c('native')}  | "
                       f"rewind (mount+source) {c('rewind')}"
                       + (f"  | libfuse (mount+source) {c('libfuse')}" if reference else ""))
        out.append(f"  {'':<20} rewind peak anon MiB per run: "
                   f"{' '.join(fmt(v, 0) for v in mine('rewind', 'peak_anon_mib'))}")
    out.append("")
    out.append("environment:")
    for k, v in env.items():
        out.append(f"  {k}: {v}")
    return "\n".join(out)


# ---------------------------------------------------------------- main

def select_jobs(spec, quick):
    if not spec:
        return [j for j in ALL_JOBS if not (quick and j == "B7")]
    chosen = []
    for name in (s.strip().upper() for s in spec.split(",") if s.strip()):
        # "B3" means B3-1 and B3-8, "B5" every B5 job, "B5-SEQ" both sequential ones.
        match = [j for j in ALL_JOBS if j.upper() == name or j.upper().startswith(name + "-")]
        if not match:
            sys.exit(f"compare: unknown job {name!r}; jobs: {', '.join(ALL_JOBS)}")
        chosen += [j for j in match if j not in chosen]
    return [j for j in ALL_JOBS if j in chosen]


def binary_path():
    if os.environ.get("REWIND_BIN"):
        b = Path(os.environ["REWIND_BIN"]).resolve()
    else:
        log("cargo build --release --bin rewind")
        r = subprocess.run(["cargo", "build", "--release", "--bin", "rewind"], cwd=REPO)
        if r.returncode != 0:
            raise BenchError("cargo build --release failed")
        b = REPO / "target" / "release" / "rewind"
    if not os.access(b, os.X_OK):
        raise BenchError(f"no rewind binary at {b}")
    return b


def prepare_workdir(workdir, journal_dir, store_dir=None):
    workdir.mkdir(parents=True, exist_ok=True)
    for mnt in ("mnt", "refmnt"):
        detach_all(workdir / mnt)  # mounts left by an interrupted run
    for name in ("native", "src", "mnt", "store", "fio", "b7", "refsrc", "refmnt"):
        shutil.rmtree(workdir / name, ignore_errors=True)
        if name not in ("b7",):
            (workdir / name).mkdir()
    if journal_dir:
        j = Path(journal_dir)
        if j.exists() and any(j.iterdir()):
            raise BenchError(f"--journal-dir {j} is not empty (it would be recovered into this store)")
        j.mkdir(parents=True, exist_ok=True)
    if store_dir:
        d = Path(store_dir)
        if d.exists() and any(d.iterdir()):
            raise BenchError(f"--store-dir {d} is not empty")
        d.mkdir(parents=True, exist_ok=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs per job and side (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes and short runs; B7 only if named in --jobs")
    p.add_argument("--jobs", help=f"comma-separated subset of {','.join(ALL_JOBS)} (B3, B5 select their group)")
    p.add_argument("--journal-dir", help="pass --journal-dir to rewind run (must be empty or absent)")
    p.add_argument("--store-dir", help="the file:// store's directory (default WORKDIR/store, the source's disk; "
                                       "a directory on tmpfs stands in for a remote store that writes nothing "
                                       "to this machine's disks; must be empty or absent)")
    p.add_argument("--workdir", type=Path, default=REPO / "target" / "bench", help="default <repo>/target/bench")
    p.add_argument("--json", type=Path, help="also write every raw number here")
    p.add_argument("--keep", action="store_true", help="keep the data directories and the store at the end")
    p.add_argument("--rewind-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for rewind run, e.g. --rewind-arg=--threads=8 (repeatable)")
    p.add_argument("--pg-conf", action="append", default=[], metavar="NAME=VALUE",
                   help="a PostgreSQL setting for job PG on every side, e.g. --pg-conf shared_buffers=512MB "
                        "(repeatable; default: initdb's settings)")
    p.add_argument("--reference", action="store_true",
                   help="also run every fio job and B6 through libfuse's C passthrough example (see above)")
    return p.parse_args()


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    a = parse_args()
    if os.geteuid() != 0:
        sys.exit("compare: run as root (drop_caches, FUSE allow_other)")
    size = QUICK if a.quick else FULL
    jobs = select_jobs(a.jobs, a.quick)
    workdir = a.workdir.resolve()
    # SIGTERM behaves like Ctrl-C, so that the finally blocks unmount and stop the daemon.
    signal.signal(signal.SIGTERM, interrupted)
    binary = binary_path()
    prepare_workdir(workdir, a.journal_dir, a.store_dir)
    daemon = Daemon(binary, workdir, a.journal_dir, a.rewind_arg, a.store_dir)
    reference = Reference(workdir) if a.reference else None
    sides = ("native", "rewind", "libfuse") if reference else ("native", "rewind")
    runs, summaries, lag, b7, peak, env, exit_code = [], [], None, None, None, {}, 0
    try:
        fio_jobs = [j for j in jobs if j in JOBS]
        if fio_jobs or "LAG" in jobs:
            daemon.start()
            env = environment(workdir, daemon.journal, daemon.store, binary)
            if "PG" in fio_jobs:
                env["postgresql"] = sh([str(pg_bindir() / "postgres"), "--version"]).stdout.strip()
                if a.pg_conf:
                    env["postgresql settings"] = " ".join(a.pg_conf)
            if reference and fio_jobs:
                env["reference"] = reference.build()
                reference.start()
            for k, v in env.items():
                log(f"{k}: {v}")
            ctx = Ctx(size, workdir, daemon, reference)
            ctx.pg_conf = tuple(a.pg_conf)
            for job in fio_jobs:
                unit, runner, prepare = JOBS[job]
                job_runs = []
                for rep in range(1, a.reps + 1):
                    for side in sides:
                        if side == "libfuse" and job in NO_REFERENCE:
                            continue
                        ctx.side = side
                        try:
                            r = measured_run(ctx, job, rep, runner, prepare)
                        except BenchError as e:
                            if side != "libfuse":
                                raise
                            # The reference is a yardstick: its failure costs its figure, not the run.
                            log(f"{job} rep {rep} libfuse FAILED, no reference figure: {e}")
                            runs.append(dict(job=job, side=side, rep=rep, value=None, error=str(e)))
                            continue
                        log(f"{job} rep {rep} {side}: {fmt(r['value'])} {unit} (CPU {fmt(r['cpu_s_per_gb'], 2)} s/GB)")
                        job_runs.append(r)
                runs += job_runs
                summaries.append(summarize(job, unit, job_runs))
                if job.startswith("B5") and not any(j.startswith("B5") for j in fio_jobs[fio_jobs.index(job) + 1:]):
                    ctx.drop_b5()
            if "LAG" in jobs:
                ctx.side = "rewind"
                lag = run_lag(ctx)
                log(f"LAG: p50 {lag['p50']:.2f} s, p99 {lag['p99']:.2f} s at {lag['rate_mbs']:.1f} MB/s")
            code = daemon.stop()
            peak = daemon.peak_anon_kib / 1024
            if code != 0:
                exit_code = 1
                log(f"rewind run exited {code} on SIGTERM (0 means everything stored); log {daemon.logpath}")
        else:
            env = environment(workdir, workdir, workdir, binary)
        if "B7" in jobs:
            b7 = run_b7(binary, workdir, size)
    except BenchError as e:
        print(f"compare: FAILED: {e}\ncompare: daemon log: {daemon.logpath}", file=sys.stderr, flush=True)
        exit_code = 1
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        exit_code = 130
    except Exception:
        traceback.print_exc()
        print(f"compare: FAILED (unexpected error above)\ncompare: daemon log: {daemon.logpath}", file=sys.stderr)
        exit_code = 1
    finally:
        daemon.cleanup()
        if reference:
            reference.cleanup()
        if not a.keep:
            for name in ("native", "src", "store", "b7", "refsrc"):
                shutil.rmtree(workdir / name, ignore_errors=True)
            if a.store_dir:
                shutil.rmtree(a.store_dir, ignore_errors=True)
    env["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if summaries or lag or b7:
        print()
        print(report(summaries, lag, b7, peak, env, runs))
    if a.json:
        a.json.write_text(json.dumps(dict(args=vars(a) | {"workdir": str(workdir), "json": str(a.json)},
                                          sizes=size, env=env, runs=runs, summaries=summaries, lag=lag, b7=b7,
                                          peak_anon_mib=peak, daemon_log=str(daemon.logpath),
                                          exit_code=exit_code), indent=1, default=str))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
