#!/usr/bin/env bash
# Restore benchmark: a 1 GiB volume protected by `rewind run`, a minute of
# changes through the mount (random overwrites, appends, new files, renames),
# a clean stop, the source deleted, then `rewind restore --at latest` under
# /usr/bin/time -v. Prints the base time, the restore's wall time and peak
# RSS, and checks the restored tree against checksums taken on the mount.
#   benches/restore_1g.sh              (CHANGE_SECONDS=60 SIZE_MIB=1024 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${REWIND_BIN:-$PWD/target/release/rewind}
SECS=${CHANGE_SECONDS:-60}
SIZE_MIB=${SIZE_MIB:-1024}
[[ -x $BIN ]] || { echo "no rewind binary at $BIN (cargo build --release)"; exit 1; }
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time is missing (Debian package time)"; exit 1; }
W=$(mktemp -d "${BENCH_TMP:-$PWD/.test-tmp}/bench-1g.XXXXXX" 2>/dev/null || mktemp -d /var/tmp/bench-1g.XXXXXX)
PID=
cleanup() {
  [[ -n $PID ]] && kill -9 "$PID" 2>/dev/null || true
  while umount -l "$W/mnt" 2>/dev/null; do :; done  # the FUSE mount and the guard under it
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{src,mnt,store,home}
export HOME=$W/home XDG_CACHE_HOME=$W/home/.cache XDG_STATE_HOME=$W/home/.state
STORE=file://$W/store

echo "bench: writing ${SIZE_MIB} MiB into the source"
python3 - "$W/src" "$SIZE_MIB" <<'PY'
import os, random, sys
root, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(1)
os.makedirs(f"{root}/small", exist_ok=True)
small = 64  # MiB in 2048 files of 32 KiB
for k in range(2048):
    with open(f"{root}/small/s{k:04d}", "wb") as f:
        f.write(os.urandom(32 << 10))
for k in range((mib - small) // 4):
    d = f"{root}/d{k % 16:02d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{k:04d}", "wb") as f:
        # Half random, half repetitive text: compressible like real data.
        f.write(os.urandom(2 << 20) + (b"rewind bench line %08d\n" % k) * ((2 << 20) // 24) + b"\0" * ((2 << 20) % 24))
PY
du -sh "$W/src"

t0=$(date +%s.%N)
"$BIN" run --source "$W/src" --mount "$W/mnt" --store "$STORE" --volume bench 2>"$W/run.log" &
PID=$!
window() { "$BIN" ls --store "$STORE" --volume bench --json 2>/dev/null | python3 -c 'import json,sys; w=json.load(sys.stdin)["window"]; print(w["latest_ns"] if w else "")' 2>/dev/null || true; }
for _ in $(seq 1 3000); do
  [[ -n "$(window)" ]] && break
  kill -0 $PID 2>/dev/null || { echo "rewind run died:"; tail -30 "$W/run.log"; exit 1; }
  sleep 0.1
done
[[ -n "$(window)" ]] || { echo "the base did not complete in 300 s"; tail -30 "$W/run.log"; exit 1; }
t1=$(date +%s.%N)
echo "bench: base of ${SIZE_MIB} MiB complete in $(python3 -c "print(round($t1-$t0,2))") s"

echo "bench: ${SECS} s of changes through the mount"
python3 - "$W/mnt" "$SECS" <<'PY'
import os, random, sys, time
root, secs = sys.argv[1], float(sys.argv[2])
rng = random.Random(2)
files = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs]
end = time.monotonic() + secs
n = ops = nbytes = 0
os.makedirs(f"{root}/new", exist_ok=True)
while time.monotonic() < end:
    r = rng.random()
    if r < 0.6:
        p = rng.choice(files)
        data = os.urandom(rng.choice([4096, 16384, 65536]))
        fd = os.open(p, os.O_WRONLY)
        os.pwrite(fd, data, rng.randrange(0, 4 << 20))
        os.close(fd)
        nbytes += len(data)
    elif r < 0.8:
        with open(f"{root}/new/log", "ab") as f:
            f.write(b"line %d\n" % ops)
    elif r < 0.95:
        n += 1
        p = f"{root}/new/n{n}"
        with open(p + ".tmp", "wb") as f:
            f.write(os.urandom(rng.randrange(100, 100000)))
        os.rename(p + ".tmp", p)
        files.append(p)
    else:
        p = rng.choice(files)
        os.truncate(p, rng.randrange(0, 4 << 20))
    ops += 1
    time.sleep(0.002)  # a steady application, not a flood
print(f"bench: {ops} operations, {nbytes >> 20} MiB overwritten, {n} new files")
PY
(cd "$W/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$W/before.sha"
t_end=$(python3 -c 'import time; print(time.time_ns())')
echo x >"$W/mnt/after"
for _ in $(seq 1 1200); do
  l=$(window); [[ -n $l && $l -ge $t_end ]] && break; sleep 0.1
done
kill -TERM $PID
wait $PID || { echo "rewind run exited $? on SIGTERM"; tail -30 "$W/run.log"; exit 1; }
PID=
du -sh "$W/store"
rm -rf "$W/src" "$W/home"
mkdir -p "$W/home"

echo "bench: restore --at latest"
/usr/bin/time -v "$BIN" restore --store "$STORE" --volume bench --at latest --target "$W/restored" --quiet \
  2>"$W/time.txt" >/dev/null || { cat "$W/time.txt"; exit 1; }
(cd "$W/restored" && find . -type f ! -path ./after -print0 | sort -z | xargs -0 sha256sum) >"$W/after.sha"
if diff -q "$W/before.sha" "$W/after.sha" >/dev/null; then ok=identical; else ok=DIFFERENT; fi
wall=$(grep "Elapsed (wall clock)" "$W/time.txt" | awk '{print $NF}')
rss=$(grep "Maximum resident set size" "$W/time.txt" | awk '{print $NF}')
cpu=$(grep "Percent of CPU" "$W/time.txt" | awk '{print $NF}')
echo "bench: restore of ${SIZE_MIB} MiB + ${SECS} s of changes: wall ${wall}, peak RSS $((rss / 1024)) MiB, CPU ${cpu}; contents ${ok}"
[[ $ok == identical ]]
