#!/usr/bin/env python3
"""What the local catalog saves the first base after a clean restart.

Usage (as root; needs /dev/fuse):

    benches/catalog_restart.py [--files 2000] [--file-kib 256] [--big-mib 256]
                               [--changed-pct 1] [--churn-mib 64] [--old-bin PATH]

A volume of FILES files of FILE_KIB KiB plus one BIG_MIB MiB file (file://
store, fresh per variant) is protected with --base-interval 1h; through the
mount CHANGED_PCT % of the small files are rewritten and CHURN_MIB MiB of
4 KiB random writes go to the big file; the daemon stops cleanly and starts
again with --base-interval 1s, and the first periodic base's log line is
read. Variants:

- catalog: the catalog is left as the stop wrote it (it matches);
- no catalog: <journal dir>/catalog is deleted before the restart;
- old binary (with --old-bin, e.g. /work/main/target/release/rewind): the
  build before the catalog, which forgot every chunk at each base.

Printed per variant: how the base found its previous base, the bytes read
back from the store before it (the manifest and the segments after its
start, summed from the file:// store; 0 when the catalog is used), `exists`
requests (chunks checked, plus the one for the previous manifest; for the
old binary the chunks its walk checked plus those its manifest check asked
for), chunks counted as stored without a request, files read and reused.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import helpers  # noqa: E402

FIELD = re.compile(r"(?:^|\s)(\w+)=(\S+)")


def first_periodic(log: str) -> dict | None:
    for line in log.splitlines():
        if "base walk finished" in line and "kind=Periodic" in line:
            d = dict(FIELD.findall(line))
            d["line"] = line
            return d
    return None


def reload_bytes(vol: helpers.Volume) -> int:
    info = vol.ls()
    base = max(info["bases"], key=lambda b: (b["completed_ns"], b["start_seq"]))
    root = vol.store_dir / vol.name
    total = (root / base["key"]).stat().st_size
    for s in info["segments"]:
        if s["lineage"] == base["lineage"] and s["last_seq"] > base["start_seq"]:
            total += (root / s["key"]).stat().st_size
    return total


def variant(name: str, binary: str, args, work: Path) -> dict:
    helpers.REWIND_BIN = binary
    vol = helpers.Volume(work / name.replace(" ", "-"))
    rng = random.Random(1)
    for k in range(args.files):
        helpers.fill_random(vol.source / f"d{k % 50}" / f"f{k}", args.file_kib << 10, rng)
    helpers.fill_random(vol.source / "big", args.big_mib << 20, rng)
    try:
        vol.start("--base-interval", "1h", timeout=600)
        vol.wait_window(timeout=1800)
        for k in rng.sample(range(args.files), max(1, args.files * args.changed_pct // 100)):
            with open(vol.mount / f"d{k % 50}" / f"f{k}", "r+b") as f:
                f.write(rng.randbytes(4096))
        with open(vol.mount / "big", "r+b") as f:
            for _ in range((args.churn_mib << 20) // 4096):
                f.seek(rng.randrange(0, (args.big_mib << 20) // 4096) * 4096)
                f.write(rng.randbytes(4096))
        t = time.time_ns()
        (vol.mount / "trailer").write_bytes(b"x")
        vol.wait_latest(t, timeout=600)
        vol.stop(timeout=600)
        nbytes = reload_bytes(vol)
        if name == "no catalog":
            shutil.rmtree(vol.journal / "catalog")
        vol.start("--base-interval", "1s", timeout=600)
        b = helpers.wait_until(lambda: first_periodic(vol.log()), 1800, "the first periodic base",
                               interval=0.2, on_timeout=vol.log_tail)
        log = vol.log()
        vol.stop(timeout=600)
    finally:
        vol.cleanup()
        shutil.rmtree(vol.root, ignore_errors=True)
    walked = int(b["chunks_uploaded"]) + int(b["chunks_reused"])
    if "chunks_checked" in b:
        exists = int(b["chunks_checked"]) + 1
        trusted = int(b["chunks_trusted"])
    else:
        m = re.search(r"had not confirmed; the store holds them all.*chunks=(\d+)", log) or \
            re.search(r"chunks=(\d+).*had not confirmed; the store holds them all", log)
        exists = walked + (int(m.group(1)) if m else 0)
        trusted = 0
    used_catalog = "catalog: the next base reuses" in log
    return {
        "variant": name,
        "previous from": "catalog" if used_catalog else "store",
        "store bytes read": 0 if used_catalog else nbytes,
        "exists requests": exists,
        "chunks trusted": trusted,
        "files read": int(b["files_read"]),
        "files reused": int(b["files_reused"]),
        "base secs": float(b["secs"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--file-kib", type=int, default=256)
    p.add_argument("--big-mib", type=int, default=256)
    p.add_argument("--changed-pct", type=int, default=1)
    p.add_argument("--churn-mib", type=int, default=64)
    p.add_argument("--old-bin")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    new_bin = os.environ.get("REWIND_BIN", helpers.REWIND_BIN)
    work = Path(tempfile.mkdtemp(prefix="rewind-catalog-", dir=args.workdir))
    try:
        rows = [variant("catalog", new_bin, args, work), variant("no catalog", new_bin, args, work)]
        if args.old_bin:
            rows.append(variant("old binary", args.old_bin, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cols = list(rows[0])
    print("  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>16}" if not isinstance(r[c], float) else f"{r[c]:>16.2f}" for c in cols))


if __name__ == "__main__":
    main()
