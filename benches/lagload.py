"""The steady write load and the per-write replication lag, shared by
benches/compare.py (LAG, file:// store) and benches/s3_lag.sh (S3), so that
both measure the same thing the same way.

The load writes 1 MiB chunks of incompressible data, paced to a rate, round
robin over files used as rings. Each write's acknowledgement is timed; its
lag is the time from that acknowledgement until the first segment that
starts at or before it was seen listed in the store (an upper bound, plus
the lister's polling interval).
"""

from __future__ import annotations

import os
import time

MiB = 1 << 20


def pct(xs, p):
    """The p-th percentile of xs by nearest rank (nan when empty)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def paced_writes(fds, ring_bytes, rate, seconds, chunk=MiB):
    """Writes `rate` bytes/s for `seconds` over `fds`, each a ring of
    `ring_bytes`. Returns (acks, t0, t_end, worst_lateness_s); an ack is
    (monotonic after, wall ns after the call returned, wall ns before it)."""
    buf = os.urandom(16 * MiB)  # lz4's 64 KiB window finds nothing to compress in it
    acks = []
    t0 = time.monotonic()
    n, late = 0, 0.0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        due = t0 + n * chunk / rate
        if now < due:
            time.sleep(due - now)  # pacing, not waiting for a condition
        else:
            late = max(late, now - due)
        k, off = divmod((n * chunk) % (len(fds) * ring_bytes), ring_bytes)
        s = (n * chunk) % (len(buf) - chunk + 1)
        data = n.to_bytes(8, "little") + buf[s + 8:s + chunk]
        before = time.time_ns()
        os.pwrite(fds[k], data, off)
        acks.append((time.monotonic(), time.time_ns(), before))
        n += 1
    return acks, t0, time.monotonic(), late


def per_write_lags(acks, segments, t0, warm):
    """Lag in seconds of every write acknowledged `warm` seconds or more
    after t0. `segments` is a sorted list of (first_ns, last_ns,
    wall time first listed in seconds)."""
    lags, j = [], 0
    for mono, ack_ns, _ in acks:
        while j + 1 < len(segments) and segments[j + 1][0] <= ack_ns:
            j += 1
        if mono - t0 >= warm:
            lags.append(segments[j][2] - ack_ns / 1e9)
    return lags
