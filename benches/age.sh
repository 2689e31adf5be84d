#!/usr/bin/env bash
# Restore time and store size against the age of a lineage (issue 13): a
# 256 MiB file under fio's 4 KiB random writes at 20 MB/s through the mount
# (fresh random data in every write, --refill_buffers, so nothing compresses),
# with periodic bases (--base-interval, default 1m) and a prune every
# PRUNE_EVERY seconds (default 120) with short spans (--keep-seconds 2m
# --keep-minutes 3m, no hour or day tier, --grace 0s), so that the spans are
# reached within the run. At each age (minutes of writing, default 1 3 6 10)
# fio stops, the store catches up, a prune runs, and the script measures the
# store (bytes and objects) and times `rewind restore --at latest` into a new
# directory while the daemon keeps running. Prints one row per age; the
# figures should be flat in the age. Needs root, /dev/fuse and fio.
#   benches/age.sh [AGE_MINUTES...]      (default 1 3 6 10; about 15 minutes)
#   benches/age.sh --quick               (ages of 10 and 20 s, 32 MiB; about a minute)
# Knobs (environment): SIZE_MIB, RATE (fio --rate), BASE_INTERVAL,
# PRUNE_EVERY (seconds), KEEP_SECONDS, KEEP_MINUTES.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${REWIND_BIN:-$PWD/target/release/rewind}
[[ -x $B ]] || { echo "no rewind binary at $B (cargo build --release)"; exit 1; }
command -v fio >/dev/null || { echo "fio is missing (Debian package fio)"; exit 1; }

if [[ ${1:-} == --quick ]]; then
  shift
  ages_s=(10 20)
  : "${SIZE_MIB:=32}" "${RATE:=5m}" "${BASE_INTERVAL:=5s}" "${PRUNE_EVERY:=8}"
  : "${KEEP_SECONDS:=5s}" "${KEEP_MINUTES:=1m}"
else
  ages_s=()
  for m in "${@:-1 3 6 10}"; do
    for a in $m; do ages_s+=($((a * 60))); done
  done
fi
SIZE_MIB=${SIZE_MIB:-256}
RATE=${RATE:-20m}
BASE_INTERVAL=${BASE_INTERVAL:-1m}
PRUNE_EVERY=${PRUNE_EVERY:-120}
KEEP_SECONDS=${KEEP_SECONDS:-2m}
KEEP_MINUTES=${KEEP_MINUTES:-3m}

W=$(mktemp -d /var/tmp/rewind-bench-age.XXXXXX)
PID=
FIO=
cleanup() {
  [[ -n $FIO ]] && kill "$FIO" 2>/dev/null || true
  [[ -n $PID ]] && kill -9 "$PID" 2>/dev/null || true
  while umount -l "$W/mnt" 2>/dev/null; do :; done  # the FUSE mount and the guard under it
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{src,mnt,store}
export HOME=$W XDG_CACHE_HOME=$W/.cache XDG_STATE_HOME=$W/.state
store=(--store "file://$W/store" --volume db)
policy=(--keep-seconds "$KEEP_SECONDS" --keep-minutes "$KEEP_MINUTES" --keep-hours 0s --keep-days 0s --grace 0s)

echo "bench age: $(nproc) cores; load at start: $(uptime)"
echo "bench age: ${SIZE_MIB} MiB file, fio 4 KiB random writes of incompressible data at --rate=$RATE, --base-interval $BASE_INTERVAL (and the default --base-after of 1 GiB of journal), prune every ${PRUNE_EVERY}s with ${policy[*]}"
fio --name=prep --filename="$W/src/db" --size="${SIZE_MIB}M" --rw=write --bs=1M --refill_buffers >/dev/null

"$B" run --source "$W/src" --mount "$W/mnt" "${store[@]}" --base-interval "$BASE_INTERVAL" \
  >"$W/run.log" 2>&1 &
PID=$!
latest() { "$B" ls "${store[@]}" --json 2>/dev/null | python3 -c 'import json,sys; w=json.load(sys.stdin)["window"]; print(w["latest_ns"] if w else 0)' 2>/dev/null || echo 0; }
wait_latest() { # until the store's window reaches $1 (ns), or 300 s
  local deadline=$((SECONDS + 300))
  until (($(latest) >= $1)); do
    kill -0 $PID 2>/dev/null || { echo "rewind run died:"; tail -30 "$W/run.log"; exit 1; }
    ((SECONDS < deadline)) || { echo "the store did not catch up in 300 s"; tail -30 "$W/run.log"; exit 1; }
    sleep 0.2
  done
}
wait_latest 1
prunes=0
prune() {
  "$B" prune "${store[@]}" "${policy[@]}" >>"$W/prune.log" 2>&1 || { echo "prune failed:"; tail -20 "$W/prune.log"; exit 1; }
  prunes=$((prunes + 1))
}

rows=()
written=0
done_s=0
next_prune=$PRUNE_EVERY
for age in "${ages_s[@]}"; do
  secs=$((age - done_s))
  ((secs > 0)) || { echo "ages must grow: $age s after $done_s s"; exit 1; }
  fio --name=w --filename="$W/mnt/db" --size="${SIZE_MIB}M" --rw=randwrite --bs=4k --refill_buffers --rate="$RATE" \
    --time_based --runtime="$secs" --ioengine=psync --output-format=json --output="$W/fio.json" &
  FIO=$!
  t0=$SECONDS
  while kill -0 $FIO 2>/dev/null; do
    if ((done_s + SECONDS - t0 >= next_prune)); then
      prune
      next_prune=$((next_prune + PRUNE_EVERY))
    fi
    sleep 1
  done
  wait $FIO
  FIO=
  done_s=$age
  written=$((written + $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["io_bytes"])' "$W/fio.json")))
  # A change after fio's last write makes the store's window pass it.
  t_end=$(python3 -c 'import time; print(time.time_ns())')
  echo x >"$W/mnt/after"
  wait_latest "$t_end"
  prune
  bytes=$(find "$W/store" -type f ! -name '.tmp.*' -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s}')
  objects=$(find "$W/store" -type f ! -name '.tmp.*' | wc -l)
  rm -rf "$W/restored"
  r0=$(date +%s.%N)
  out=$("$B" restore "${store[@]}" --at latest --target "$W/restored" --quiet)
  r1=$(date +%s.%N)
  records=$(grep -o '[0-9]* records from [0-9]* segments' <<<"$out")
  bases=$(sed 's/\x1b\[[0-9;]*m//g' "$W/run.log" | grep -c 'base walk finished' || true)
  rows+=("$(printf '%5ss  | %6s MiB | %5s | %-31s | %9.2f | %8s MiB | %7s | %s' \
    "$age" $((written >> 20)) "$bases" "$records" "$(python3 -c "print($r1-$r0)")" \
    $((bytes >> 20)) "$objects" "$(cut -d, -f1 /proc/loadavg | awk '{print $1}')")")
  echo "bench age: ${rows[-1]}"
done

kill -TERM $PID
wait $PID || { echo "rewind run exited $? on SIGTERM"; tail -30 "$W/run.log"; exit 1; }
PID=
echo
echo "age    | fio wrote  | bases | replayed by restore --at latest | restore s | store bytes | objects | load"
for r in "${rows[@]}"; do echo "$r"; done
echo "($prunes prunes; bases counts every base completed so far, the first included; load is the 1-minute load average when the row was taken)"
echo "load at end: $(uptime)"
