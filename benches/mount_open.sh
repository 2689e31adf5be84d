#!/usr/bin/env bash
# Mount view benchmark: a volume of FILES small files and BIG_MIB MiB of
# large ones protected by `rewind run` (base, a few seconds of changes, a
# clean stop, the source deleted), then, from the store alone:
# `rewind mount --at latest` until it is serving (no chunk is fetched
# before a read), a cold sequential read of one large file through the
# view, the view's peak RSS, and beside them `rewind restore --at latest`.
#   benches/mount_open.sh            (FILES=50000 BIG_MIB=1024 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${REWIND_BIN:-$PWD/target/release/rewind}
FILES=${FILES:-50000}
BIG_MIB=${BIG_MIB:-1024}
[[ -x $BIN ]] || { echo "no rewind binary at $BIN (cargo build --release)"; exit 1; }
W=$(mktemp -d "${BENCH_TMP:-$PWD/.test-tmp}/bench-view.XXXXXX" 2>/dev/null || mktemp -d /var/tmp/bench-view.XXXXXX)
PID=
VPID=
cleanup() {
  [[ -n $PID ]] && kill -9 "$PID" 2>/dev/null || true
  [[ -n $VPID ]] && kill -9 "$VPID" 2>/dev/null || true
  while umount -l "$W/mnt" 2>/dev/null; do :; done
  while umount -l "$W/view" 2>/dev/null; do :; done
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{src,mnt,store,home,view}
export HOME=$W/home XDG_CACHE_HOME=$W/home/.cache XDG_STATE_HOME=$W/home/.state
STORE=file://$W/store
now() { date +%s.%N; }
secs() { python3 -c "print(round($2-$1,2))"; }

python3 - "$W/src" "$FILES" "$BIG_MIB" <<'PY'
import os, random, sys
root, files, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(1)
for k in range(files):
    d = f"{root}/small/d{k % 500:03d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{k:06d}", "wb") as f:
        f.write(rng.randbytes(rng.randrange(100, 4000)))
os.makedirs(f"{root}/big", exist_ok=True)
for k in range(big // 64):
    with open(f"{root}/big/b{k:03d}", "wb") as f:
        f.write(os.urandom(64 << 20))
PY
echo "bench: source of $FILES small files and $BIG_MIB MiB in large ones: $(du -sh "$W/src" | cut -f1)"

"$BIN" run --source "$W/src" --mount "$W/mnt" --store "$STORE" --volume bench 2>"$W/run.log" &
PID=$!
window() { "$BIN" ls --store "$STORE" --volume bench --json 2>/dev/null | python3 -c 'import json,sys; w=json.load(sys.stdin)["window"]; print(w["latest_ns"] if w else "")' 2>/dev/null || true; }
for _ in $(seq 1 6000); do
  [[ -n "$(window)" ]] && break
  kill -0 $PID 2>/dev/null || { echo "rewind run died:"; tail -30 "$W/run.log"; exit 1; }
  sleep 0.1
done
for k in $(seq 1 200); do head -c 100000 /dev/urandom >"$W/mnt/small/d000/new$k"; done
t_end=$(python3 -c 'import time; print(time.time_ns())')
echo x >"$W/mnt/after"
for _ in $(seq 1 1200); do l=$(window); [[ -n $l && $l -ge $t_end ]] && break; sleep 0.1; done
kill -TERM $PID; wait $PID; PID=
rm -rf "$W/src" "$W/home"; mkdir -p "$W/home"

t0=$(now)
"$BIN" mount --store "$STORE" --volume bench --at latest "$W/view" >"$W/view.log" 2>&1 &
VPID=$!
until grep -q "^mounted" "$W/view.log"; do
  kill -0 $VPID 2>/dev/null || { cat "$W/view.log"; exit 1; }
  sleep 0.05
done
t1=$(now)
echo "bench: rewind mount serving after $(secs "$t0" "$t1") s ($(grep -o '[0-9]* entries' "$W/view.log"))"
t0=$(now); find "$W/view" | wc -l >/dev/null; t1=$(now)
echo "bench: find (names only) over the whole view: $(secs "$t0" "$t1") s"
t0=$(now); cat "$W/view/big/b000" >/dev/null; t1=$(now)
echo "bench: cold sequential read of 64 MiB through the view: $(python3 -c "print(round(64/($t1-$t0)))") MiB/s"
echo "bench: view peak RSS $(awk '/VmHWM/ {print int($2/1024)}' /proc/$VPID/status) MiB"
kill -TERM $VPID; wait $VPID; VPID=
t0=$(now)
"$BIN" restore --store "$STORE" --volume bench --at latest --target "$W/restored" --quiet >/dev/null
t1=$(now)
echo "bench: rewind restore of the same instant: $(secs "$t0" "$t1") s"
