#!/usr/bin/env python3
"""Where one FUSE request's time goes: Rewind beside libfuse's C passthrough, from the kernel's trace.

Usage (as root; needs tracefs, fio, /dev/fuse):

    benches/requests.py [--seconds 2] [--reps 3] [--workdir DIR]
    REWIND_BIN=/path/to/rewind benches/requests.py ...   (skips `cargo build --release`)

compare.py says how fast each job runs; this says why a small synchronous
request costs what it costs. One `rewind run` and libfuse's passthrough_ll
example (built as compare.py --reference builds it) serve two mounts. For
each side, interleaved --reps times, one fio job writes 4 KiB blocks
sequentially for --seconds (two loads: no fsync, and an fsync after each
write) while ftrace records the FUSE request events (fuse_request_send,
fuse_request_end), the daemon's read/pwrite64/writev/newfstat/fdatasync/fsync
system calls and the scheduler's switches and wake-ups. Every FUSE_WRITE
and FUSE_FSYNC request is cut into phases:

  dispatch   the application sends it -> a daemon thread's read() of
             /dev/fuse returns (the wake-up and scheduling of a worker)
  work       that read returns -> the same thread starts its reply
             (writev): what the daemon does for the request; the system
             calls inside it are listed with their own durations
  reply      writev starts -> the kernel ends the request
  total      send -> end (fio's completion latency adds the application's
             own wake-up after the end)

and per request the context switches and wake-ups of the machine that
involve fio or the daemon. The table shows medians (and means) per phase,
then Rewind/libfuse ratios. Tracing adds a few microseconds to every
system call on both sides alike; read the phases side by side, not as
absolute costs.
"""
import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (BenchError, Daemon, Reference, binary_path, drop_caches, log,  # noqa: E402
                     prepare_workdir, sh)

REPO = Path(__file__).resolve().parent.parent
TRACING = Path("/sys/kernel/tracing")
EVENTS = ["fuse/fuse_request_send", "fuse/fuse_request_end", "sched/sched_switch", "sched/sched_wakeup"] + [
    f"syscalls/sys_{d}_{c}" for c in ("read", "pwrite64", "writev", "newfstat", "fdatasync") for d in ("enter", "exit")] + ["syscalls/sys_enter_fsync", "syscalls/sys_exit_fsync"]
LOADS = {"write": [], "write+fsync": ["--fsync=1"]}
LINE = re.compile(r"\s*(\S+)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+):? ?(.*)")


def tracefs():
    if not (TRACING / "events").exists():
        r = sh(["mount", "-t", "tracefs", "nodev", str(TRACING)])
        if r.returncode != 0:
            raise BenchError(f"tracefs is not mounted at {TRACING} and mounting it failed: {r.stderr.strip()}")
    missing = [e for e in EVENTS if not (TRACING / "events" / e).exists()]
    if missing:
        raise BenchError(f"this kernel lacks the trace events {', '.join(missing)} (FUSE request events "
                         f"need Linux 6.13 or later; syscall events need CONFIG_FTRACE_SYSCALLS)")


def set_events(on):
    for e in EVENTS:
        (TRACING / "events" / e / "enable").write_text("1" if on else "0")


def traced_fio(directory, load, seconds, outdir, tag):
    """Runs one fio job under the trace; returns (trace text, fio's job result)."""
    (TRACING / "buffer_size_kb").write_text("16384")
    (TRACING / "trace").write_text("")
    out = outdir / f"{tag}.json"
    cmd = ["fio", "--ioengine=psync", "--output-format=json", f"--output={out}", "--name=w",
           f"--directory={directory}", "--rw=write", "--bs=4k", "--size=256M", "--refill_buffers", "--time_based",
           f"--runtime={seconds}", *LOADS[load]]
    set_events(True)
    try:
        r = sh(cmd, timeout=seconds + 120)
    finally:
        set_events(False)
    if r.returncode != 0:
        raise BenchError(f"fio {tag} exited {r.returncode}: {r.stderr[-2000:]}")
    text = (TRACING / "trace").read_text(errors="replace")
    # ftrace marks a dropped stretch "CPU:N [LOST M EVENTS]" where it happened.
    if re.search(r"\[LOST \d+ EVENTS\]", text):
        log(f"{tag}: the trace buffer overflowed; the phases cover the requests it kept")
    job = json.loads(out.read_text()[out.read_text().index("{"):])["jobs"][0]
    return text, job


def phases(text, daemon_pid, mnt):
    """Phases of every FUSE_WRITE and FUSE_FSYNC request fio sent (see the module docstring)."""
    tids = set(int(t) for t in os.listdir(f"/proc/{daemon_pid}/task"))
    ev = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            ev.append((float(m.group(3)) * 1e6, m.group(1), int(m.group(2)), m.group(4), m.group(5)))
    # The mount's FUSE connection is numbered by its device's minor number;
    # other FUSE mounts on the machine are left out.
    conn = str(os.minor(os.stat(mnt).st_dev))
    fio = {pid for t, comm, pid, name, args in ev
           if comm == "fio" and name == "fuse_request_send" and f"connection {conn} " in args}
    if not fio:
        raise BenchError(f"the trace holds no FUSE request sent by fio on connection {conn}")
    ours = tids | fio
    per_op = collections.defaultdict(lambda: collections.defaultdict(list))
    counts = collections.Counter()
    pend = None
    for t, comm, pid, name, args in ev:
        if name in ("sched_switch", "sched_wakeup"):
            if pid in ours or any(f"pid={p} " in args for p in ours):
                counts[name] += 1
            continue
        if name.startswith("fuse_request"):
            if f"connection {conn} " not in args:
                continue
            if name == "fuse_request_send" and pid in fio:
                op = re.search(r"\((\w+)\)", args).group(1)
                counts["requests"] += 1
                pend = {"op": op, "send": t} if op in ("FUSE_WRITE", "FUSE_FSYNC") else None
            elif name == "fuse_request_end" and pend and "writev" in pend:
                p = per_op[pend["op"]]
                p["dispatch"].append(pend["read"] - pend["send"])
                p["work"].append(pend["writev"] - pend["read"])
                p["reply"].append(t - pend["writev"])
                p["total"].append(t - pend["send"])
                for k, v in pend["calls"].items():
                    p[k].append(v)
                pend = None
            continue
        if pend is None or pid not in tids:
            continue
        exit_ = args.startswith("->")
        if name == "sys_read" and exit_ and "read" not in pend:
            pend.update(read=t, tid=pid, calls=collections.Counter())
        elif pend.get("tid") != pid or "writev" in pend:
            continue
        elif name == "sys_writev" and not exit_:
            pend["writev"] = t
        elif name in ("sys_pwrite64", "sys_newfstat", "sys_fdatasync", "sys_fsync"):
            if exit_ and "at" in pend:
                pend["calls"][f"  {name[4:]} (sum)"] += t - pend.pop("at")
            elif not exit_:
                pend["at"] = t
    return per_op, counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2, help="traced seconds per run (default 2)")
    p.add_argument("--reps", type=int, default=3, help="runs per load and side (default 3)")
    p.add_argument("--workdir", type=Path, default=REPO / "target" / "bench-requests")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("requests: run as root (tracefs, FUSE)")
    workdir = a.workdir.resolve()
    tracefs()
    binary = binary_path()
    prepare_workdir(workdir, None)
    daemon, ref = Daemon(binary, workdir, None, []), Reference(workdir)
    merged = {}
    try:
        daemon.start()
        ref.build()
        ref.start()
        for rep in range(1, a.reps + 1):
            for load in LOADS:
                for side, fs in (("rewind", daemon), ("libfuse", ref)):
                    d = fs.mnt / f"{load}-{rep}"
                    d.mkdir()
                    os.sync()
                    drop_caches()
                    text, job = traced_fio(d, load, a.seconds, workdir / "fio", f"{side}-{load}-{rep}")
                    per_op, counts = phases(text, fs.proc.pid, fs.mnt)
                    m = merged.setdefault((load, side), dict(ops=collections.defaultdict(
                        lambda: collections.defaultdict(list)), counts=collections.Counter(), clat=[], iops=[]))
                    for op, ph in per_op.items():
                        for k, v in ph.items():
                            m["ops"][op][k] += v
                    m["counts"].update(counts)
                    m["clat"].append(job["write"]["clat_ns"]["mean"] / 1000)
                    m["iops"].append(job["write"]["iops"])
                    log(f"{load} rep {rep} {side}: {job['write']['iops']:,.0f} IOPS")
                    fs.check(f"after {load} rep {rep}")
    finally:
        set_events(False)
        daemon.cleanup()
        ref.cleanup()
    print()
    for load in LOADS:
        print(f"== load {load}: fio, 1 job, 4 KiB sequential writes{' + fsync each' if LOADS[load] else ''}, "
              f"{a.seconds:g} s x {a.reps}")
        r, l = merged[(load, "rewind")], merged[(load, "libfuse")]
        print(f"  {'':26} {'rewind':>16} {'libfuse':>16} {'ratio':>7}")
        med = statistics.median
        print(f"  {'fio IOPS (median)':26} {med(r['iops']):16,.0f} {med(l['iops']):16,.0f} "
              f"{med(r['iops']) / med(l['iops']):7.2f}")
        print(f"  {'fio clat mean us (median)':26} {med(r['clat']):16.1f} {med(l['clat']):16.1f} "
              f"{med(r['clat']) / med(l['clat']):7.2f}")
        for k in ("sched_switch", "sched_wakeup"):
            rv, lv = r["counts"][k] / r["counts"]["requests"], l["counts"][k] / l["counts"]["requests"]
            print(f"  {k + ' per request':26} {rv:16.2f} {lv:16.2f} {rv / lv:7.2f}")
        for op in sorted(set(r["ops"]) | set(l["ops"])):
            print(f"  {op} (median / mean us, n)")
            keys = ["dispatch", "work"] + sorted(k for k in set(r["ops"][op]) | set(l["ops"][op]) if k.startswith("  ")) \
                + ["reply", "total"]
            for k in keys:
                rv, lv = r["ops"][op].get(k, []), l["ops"][op].get(k, [])
                cell = lambda v: f"{med(v):6.1f} / {statistics.mean(v):6.1f}" if v else f"{'-':>15}"
                ratio = f"{med(rv) / med(lv):7.2f}" if rv and lv and med(lv) else f"{'-':>7}"
                print(f"    {k:24} {cell(rv):>16} {cell(lv):>16} {ratio}   n={len(rv)}/{len(lv)}")
        print()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; kernel {os.uname().release}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"requests: FAILED: {e}")
