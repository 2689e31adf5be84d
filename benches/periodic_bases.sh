#!/usr/bin/env bash
# Restore-at-latest time with and without periodic bases (issue 13): a
# 64 MiB file under fio's 4 KiB random writes at 20 MB/s for SECS seconds
# (default 60) through the mount, once with --base-interval 1h (no periodic
# base in the run) and once with --base-interval INTERVAL (default 10s); then
# the daemon stops, the source is deleted, and `rewind restore --at latest`
# is timed. Prints each run's restore summary (base used, records replayed)
# and the periodic bases' log lines (files and bytes read). Needs root,
# /dev/fuse and fio. Usage: benches/periodic_bases.sh [SECS] [INTERVAL]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${REWIND_BIN:-$PWD/target/release/rewind}
SECS=${1:-60}
INTERVAL=${2:-10s}
work=$(mktemp -d /tmp/rewind-periodic-bases.XXXXXX)
trap 'for m in "$work"/*/mnt; do while umount -l "$m" 2>/dev/null; do :; done; done; rm -rf "$work"' EXIT

for interval in 1h "$INTERVAL"; do
  d=$work/$interval
  mkdir -p "$d/src" "$d/mnt" "$d/store"
  fio --name=prep --filename="$d/src/db" --size=64M --rw=write --bs=1M >/dev/null
  store=(--store "file://$d/store" --volume db)
  "$B" run --source "$d/src" --mount "$d/mnt" "${store[@]}" --base-interval "$interval" \
    >"$d/run.log" 2>&1 &
  pid=$!
  until "$B" ls "${store[@]}" --json 2>/dev/null | grep -q '"earliest_ns"'; do sleep 0.2; done
  fio --name=w --filename="$d/mnt/db" --size=64M --rw=randwrite --bs=4k --rate=20m \
    --time_based --runtime="$SECS" --ioengine=psync >/dev/null
  kill -TERM $pid
  wait $pid
  rm -rf "$d/src"
  echo "== --base-interval $interval, ${SECS}s of 4 KiB random writes at 20 MB/s"
  sed 's/\x1b\[[0-9;]*m//g' "$d/run.log" | grep 'base walk finished' |
    grep -o 'kind=[A-Za-z]* files_read=[0-9]* files_reused=[0-9]* bytes_read=[0-9]* chunks_uploaded=[0-9]*.*secs=[0-9.]*' || true
  "$B" restore "${store[@]}" --at latest --target "$d/restored" --quiet
done
