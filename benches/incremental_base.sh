#!/usr/bin/env bash
# Incremental base against a full base (issue 13): a volume of FILES files of
# 1 MiB of random data (default 4096, 4 GiB) protected by `rewind run` with a
# file:// store on the same disk. Three bases are measured:
#   1. the initial base (a full read into an empty store);
#   2. a periodic base after 1% of the files changed through the mount
#      (64 KiB overwritten in each; the base is started by --base-after,
#      which the last pass of overwrites crosses, --base-interval is 1h);
#   3. a full base of that same changed volume: the daemon stops cleanly,
#      its journal and state are removed, and a new lineage starts, whose
#      first base reads everything (chunks already stored are not uploaded).
# The source's pages are dropped from the page cache before the two full
# bases (posix_fadvise on our files only; the machine is shared); the
# incremental base reads files just written through the mount. Figures: files
# and bytes read and chunks uploaded come from the daemon's "base walk
# finished" log line; bytes uploaded is what the base added under chunk/
# and base/ in the store (only bases write there).
#   benches/incremental_base.sh            (FILES=4096; a few minutes)
#   benches/incremental_base.sh --quick    (FILES=128; about half a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${REWIND_BIN:-$PWD/target/release/rewind}
[[ -x $B ]] || { echo "no rewind binary at $B (cargo build --release)"; exit 1; }
if [[ ${1:-} == --quick ]]; then FILES=${FILES:-128}; else FILES=${FILES:-4096}; fi
CHANGED=$((FILES / 100 > 0 ? FILES / 100 : 1))
PASS=$((CHANGED * 64 * 1024))
# The third pass of overwrites crosses it, the rest of that pass stays far
# below it, so exactly one periodic base follows the changes.
AFTER=$((PASS * 5 / 2))

W=$(mktemp -d /var/tmp/rewind-bench-incr.XXXXXX)
PID=
cleanup() {
  [[ -n $PID ]] && kill -9 "$PID" 2>/dev/null || true
  while umount -l "$W/mnt" 2>/dev/null; do :; done  # the FUSE mount and the guard under it
  [[ -n ${KEEP:-} ]] && echo "kept $W" || rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{src,mnt,store}
export HOME=$W XDG_CACHE_HOME=$W/.cache XDG_STATE_HOME=$W/.state
store=(--store "file://$W/store" --volume vol)

echo "bench incremental: $(nproc) cores; load at start: $(uptime)"
echo "bench incremental: writing $FILES files of 1 MiB; $CHANGED of them ($(awk "BEGIN {printf \"%.1f\", $CHANGED * 100 / $FILES}")%) will change"
python3 - "$W/src" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for k in range(n):
    d = f"{root}/d{k % 64:02d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{k:05d}", "wb") as f:
        f.write(os.urandom(1 << 20))
PY
sync
drop_cache() {
  python3 - "$W/src" <<'PY'
import os, sys
for dp, _, fs in os.walk(sys.argv[1]):
    for f in fs:
        fd = os.open(os.path.join(dp, f), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}
stored() { # bytes and count of objects under chunk/ and base/
  find "$W/store" \( -path '*/chunk/*' -o -path '*/base/*' \) -type f ! -name '.tmp.*' -printf '%s\n' |
    awk '{s+=$1; n++} END {printf "%.0f %.0f\n", s, n}'
}
start() {
  "$B" run --source "$W/src" --mount "$W/mnt" "${store[@]}" --base-interval 1h --base-after "$AFTER" \
    >>"$W/run.log" 2>&1 &
  PID=$!
}
stop() {
  kill -TERM $PID
  wait $PID || { echo "rewind run exited $? on SIGTERM"; tail -30 "$W/run.log"; exit 1; }
  PID=
}
# Waits for the Nth "base walk finished" line and the Nth manifest in the
# store, then prints that base's row.
rows=()
measure() {
  local n=$1 label=$2 before=$3 deadline=$((SECONDS + 1200))
  until (($(sed 's/\x1b\[[0-9;]*m//g' "$W/run.log" | grep -c 'base walk finished') >= n)) &&
    (($(find "$W/store" -path '*/base/*' -type f ! -name '.tmp.*' | wc -l) >= n)); do
    kill -0 $PID 2>/dev/null || { echo "rewind run died:"; tail -30 "$W/run.log"; exit 1; }
    ((SECONDS < deadline)) || { echo "base $n did not finish in 1200 s"; tail -30 "$W/run.log"; exit 1; }
    sleep 0.2
  done
  local line after
  line=$(sed 's/\x1b\[[0-9;]*m//g' "$W/run.log" | grep 'base walk finished' | sed -n "${n}p")
  after=$(stored)
  rows+=("$(python3 - "$label" "$line" "$before" "$after" <<'PY'
import re, sys
label, line, before, after = sys.argv[1:]
f = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
b0, n0 = map(int, before.split()); b1, n1 = map(int, after.split())
print(f"{label:<36} | {int(f['files_read']):>10} | {int(f['files_reused']):>12} | {int(f['bytes_read']) / 2**20:>8.1f} | "
      f"{int(f['chunks_uploaded']):>9} | {int(f['chunks_reused']):>13} | {(b1 - b0) / 2**20:>12.1f} | {float(f['secs']):>7.2f}")
PY
)")
  echo "bench incremental: ${rows[-1]}"
}

drop_cache
start
measure 1 "1. initial base (full, empty store)" "0 0"
before=$(stored)
# Overwrite 64 KiB in each changed file, three passes at the same offsets:
# the set of changed files stays CHANGED; the third pass crosses --base-after.
python3 - "$W/mnt" "$FILES" "$CHANGED" <<'PY'
import os, sys
root, n, changed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
step = n // changed
for p in range(3):
    for i in range(changed):
        k = i * step
        fd = os.open(f"{root}/d{k % 64:02d}/f{k:05d}", os.O_WRONLY)
        os.pwrite(fd, os.urandom(64 << 10), (k % 16) << 16)
        os.close(fd)
PY
measure 2 "2. periodic base, 1% files changed" "$before"
stop
periodic=$(sed 's/\x1b\[[0-9;]*m//g' "$W/run.log" | grep 'base walk finished' | grep -c 'kind=Periodic' || true)
[[ $periodic == 1 ]] || { echo "expected exactly one periodic base, saw $periodic"; exit 1; }

rm -rf "$W/src/.rewind"
before=$(stored)
drop_cache
start
measure 3 "3. full base of the same volume" "$before"
stop

echo
printf '%-36s | %10s | %12s | %8s | %9s | %13s | %12s | %7s\n' base "files read" "files reused" "MiB read" "chunks up" "chunks reused" "MiB uploaded" seconds
for r in "${rows[@]}"; do echo "$r"; done
echo "(FILES=$FILES x 1 MiB, $CHANGED changed by 64 KiB each; --base-after $AFTER bytes; MiB uploaded = chunk/ and base/ growth in the store)"
echo "load at end: $(uptime)"
