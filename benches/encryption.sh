#!/usr/bin/env bash
# The cost of client-side encryption (issue 15): the same workload with and
# without --encryption-key-file on a file:// store. Each mode starts
# `rewind run` on a source of SIZE_MIB MiB (half random, half repetitive
# text, so lz4 has work), waits for the initial base, copies another SIZE_MIB
# MiB file in through the mount, waits until the store holds it and stops.
# The daemon's CPU seconds (user + system, /usr/bin/time) per GiB protected
# (base plus journaled bytes) and the wall time of `rewind restore --at
# latest` (MB/s of restored data; the target's pages are written back before
# the clock stops) with its CPU seconds are printed per mode; ROUNDS (default
# 1) repeats both modes, alternating, since neighbours on a shared machine
# move single figures a lot. Other work on the machine moves the
# figures: the load average at the start and end is printed with them.
#   benches/encryption.sh           (SIZE_MIB=256 by default; about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${REWIND_BIN:-$PWD/target/release/rewind}
SIZE_MIB=${SIZE_MIB:-256}
[[ -x $BIN ]] || { echo "no rewind binary at $BIN (cargo build --release)"; exit 1; }
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time is missing (Debian package time)"; exit 1; }
W=$(mktemp -d /var/tmp/rewind-bench-enc.XXXXXX)
PID=
cleanup() {
  [[ -n $PID ]] && kill -9 "$PID" 2>/dev/null || true
  for m in "$W"/*/mnt; do
    while umount -l "$m" 2>/dev/null; do :; done  # the FUSE mount and the guard under it
  done
  rm -rf "$W"
}
trap cleanup EXIT
export HOME=$W/home XDG_CACHE_HOME=$W/home/.cache XDG_STATE_HOME=$W/home/.state
head -c 32 /dev/urandom >"$W/key"

gen() {  # gen FILE SEED: SIZE_MIB MiB, half random, half text
  python3 - "$1" "$SIZE_MIB" "$2" <<'PY'
import os, random, sys
path, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with open(path, "wb") as f:
    for k in range(mib // 2):
        f.write(rng.randbytes(1 << 20))
        line = b"rewind encryption bench line %08d\n" % k
        f.write((line * ((1 << 20) // len(line) + 1))[: 1 << 20])
PY
}
gen "$W/payload" 2

echo "bench encryption: $(nproc) cores; load at start: $(uptime)"
for round in $(seq 1 "${ROUNDS:-1}"); do
for mode in plain encrypted; do
  D=$W/$mode
  if [[ -d $D ]]; then
    while umount -l "$D/mnt" 2>/dev/null; do :; done  # the previous round's guard
    rm -rf "$D"
  fi
  mkdir -p "$D"/{src,mnt,store}
  gen "$D/src/base" 1
  key=()
  [[ $mode == encrypted ]] && key=(--encryption-key-file "$W/key")
  store=(--store "file://$D/store" --volume bench "${key[@]}")
  /usr/bin/time -f "%U %S" -o "$D/cpu" "$BIN" run --source "$D/src" --mount "$D/mnt" "${store[@]}" \
    2>"$D/run.log" &
  PID=$!
  latest() { "$BIN" ls "${store[@]}" --json 2>/dev/null | python3 -c 'import json,sys; w=json.load(sys.stdin)["window"]; print(w["latest_ns"] if w else 0)' 2>/dev/null || echo 0; }
  for _ in $(seq 1 1200); do
    [[ $(latest) != 0 ]] && break
    kill -0 $PID 2>/dev/null || { echo "rewind run died:"; tail -30 "$D/run.log"; exit 1; }
    sleep 0.25
  done
  cp "$W/payload" "$D/mnt/payload"
  sync -f "$D/mnt/payload"
  t=$(date +%s%N)
  echo x >"$D/mnt/after"
  for _ in $(seq 1 2400); do
    (( $(latest) >= t )) && break
    sleep 0.25
  done
  (( $(latest) >= t )) || { echo "the store did not catch up"; tail -30 "$D/run.log"; exit 1; }
  # $PID is /usr/bin/time; the daemon is its only child.
  pkill -TERM -P $PID
  wait $PID || { echo "rewind run exited $?"; tail -30 "$D/run.log"; exit 1; }
  PID=
  read -r user sys <"$D/cpu"
  store_mib=$(du -sm "$D/store" | cut -f1)
  t0=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$D/restore-cpu" "$BIN" restore "${store[@]}" --at latest --target "$D/restored" --quiet >/dev/null
  sync -f "$D/restored/payload"
  t1=$(date +%s.%N)
  read -r ruser rsys <"$D/restore-cpu"
  cmp -s "$W/payload" "$D/restored/payload" || { echo "restored payload differs"; exit 1; }
  cmp -s "$D/src/base" "$D/restored/base" || { echo "restored base file differs"; exit 1; }
  python3 - "$mode" "$user" "$sys" "$SIZE_MIB" "$t0" "$t1" "$store_mib" "$ruser" "$rsys" <<'PY'
import sys
mode, user, sys_, mib, t0, t1, store = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
rcpu = float(sys.argv[8]) + float(sys.argv[9])
gib = 2 * mib / 1024
secs = t1 - t0
print(f"bench encryption: {mode:9s} run CPU {user + sys_:6.2f} s ({user:.2f} user, {sys_:.2f} sys) = {(user + sys_) / gib:6.2f} s/GiB protected; "
      f"restore of {2 * mib} MiB in {secs:.2f} s = {2 * mib * 1.048576 / secs:6.1f} MB/s ({rcpu:.2f} s CPU); store {store} MiB")
PY
done
done
echo "bench encryption: load at end: $(uptime)"
