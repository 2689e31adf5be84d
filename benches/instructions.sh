#!/usr/bin/env bash
# The daemon's CPU cost per GiB written, counted in instructions rather than
# seconds: `rewind run` runs under valgrind's callgrind while fio writes a
# fixed amount through the mount (B2's shape: 4 KiB random writes into one
# file, fresh incompressible data), then the daemon stops cleanly and the
# script prints the instructions it executed per GiB written, with the
# functions that took the most. Instruction counts are repeatable whatever
# else the machine runs, so two builds compare on a busy machine where
# `benches/compare.py`'s CPU seconds would not (they remain the measure of
# time; this is the measure of work). Needs root, /dev/fuse, fio, valgrind.
#   benches/instructions.sh [MIB]        (default 64 MiB written; a few minutes)
# Knobs (environment): REWIND_BIN, BS (fio block size, default 4k),
# JOBS (fio jobs, default 4), TOP (functions listed, default 15), KEEP (a path
# to keep callgrind's output at, for callgrind_annotate --tree=caller).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${REWIND_BIN:-$PWD/target/release/rewind}
MIB=${1:-64}
BS=${BS:-4k}
JOBS=${JOBS:-4}
TOP=${TOP:-15}
[[ -x $B ]] || { echo "no rewind binary at $B (cargo build --release)"; exit 1; }
for t in fio valgrind callgrind_annotate callgrind_control awk; do
  command -v $t >/dev/null || { echo "$t is missing (Debian packages fio, valgrind)"; exit 1; }
done

W=$(mktemp -d /tmp/rewind-instr.XXXXXX)
mkdir -p "$W/src" "$W/mnt" "$W/store" "$W/journal"
daemon=""
cleanup() {
  [[ -n $daemon ]] && kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  # rewind run leaves its read-only guard at the mountpoint.
  while umount -l "$W/mnt" 2>/dev/null; do :; done
  rm -rf "$W"
}
trap cleanup EXIT

# The file exists before the daemon starts, so the initial base holds it and
# the count is of the writes alone (plus one base's walk of a sparse file).
truncate -s $((MIB * 1024 * 1024 / JOBS))  "$W/src/f"
valgrind --tool=callgrind --callgrind-out-file="$W/cg.out" --trace-children=no --instr-atstart=no \
  "$B" run --source "$W/src" --mount "$W/mnt" --store "$W/store" --volume v \
  --journal-dir "$W/journal" >"$W/daemon.log" 2>&1 &
daemon=$!
window_open() { "$B" ls --store "$W/store" --volume v --json 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["window"] else 1)' 2>/dev/null; }
deadline=$((SECONDS + 600))
until window_open; do
  ((SECONDS < deadline)) || { echo "the daemon did not store its first base in 600 s:"; cat "$W/daemon.log"; exit 1; }
  kill -0 $daemon 2>/dev/null || { echo "the daemon exited:"; cat "$W/daemon.log"; exit 1; }
  sleep 1
done
# Count from here: the start and the initial base (a walk of the sparse
# file, which hashes and compresses its zeros) are not what is measured.
callgrind_control -i on $daemon >/dev/null
echo "writing $MIB MiB with fio ($BS random writes, $JOBS jobs) through the mount under callgrind"
fio --name=b2 --filename="$W/mnt/f" --rw=randwrite --bs="$BS" --numjobs="$JOBS" \
  --size=$((MIB / JOBS))M --io_size=$((MIB / JOBS))M --refill_buffers --ioengine=psync \
  --group_reporting --output="$W/fio.txt" >/dev/null
kill -TERM $daemon
wait $daemon || { echo "the daemon did not stop cleanly:"; tail -20 "$W/daemon.log"; exit 1; }
daemon=""
callgrind_annotate "$W/cg.out" >"$W/annotated.txt" 2>/dev/null
total=$(awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1; exit}' "$W/annotated.txt")
printf 'commit %s  binary %s\n' "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" "$B"
awk -v t="$total" -v m="$MIB" 'BEGIN { printf "instructions: %d in all, %.2f G per GiB written (%d MiB)\n", t, t / m * 1024 / 1e9, m }' 
echo "the functions that executed the most instructions themselves:"
sed -n '/^Ir/,$p' "$W/annotated.txt" | sed -n "3,$((TOP + 2))p"
if [[ -n ${KEEP:-} ]]; then cp "$W/cg.out" "$KEEP"; echo "callgrind output kept at $KEEP"; fi
