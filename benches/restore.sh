#!/usr/bin/env bash
# Restore benchmark (issue 14): how fast `rewind restore --at latest` rebuilds
# a volume, beside `cp -a` of the same tree to the same disk in the same run.
#   1. a mixed tree of SIZE_MIB (default 4096): many small files (1-64 KiB),
#      files of 1-64 MiB, and a few large ones (256 MiB each at full size),
#      half random and half repetitive text, so chunks compress like real data;
#   2. a tree of SMALL_FILES (default 100,000) files of 1-8 KiB.
# Each tree gets into its own file:// store through `rewind run` over it (the
# initial base reads it; the script waits for the restore window to appear,
# which needs the base complete, then stops the daemon cleanly). Then each row
# is timed under /usr/bin/time -v with the page cache dropped first
# (`sync; echo 3 > /proc/sys/vm/drop_caches`: this drops every cache on the
# machine, other processes' too, so it runs as root and costs them a re-read):
#   cp -a of the source; restore from the file:// store; and for the mixed
#   tree, restore from a real S3 server on loopback (moto_server from the
#   repo's .venv, its own process, the file store's objects uploaded into it),
#   beside a plain parallel GET loop over the same objects (boto3, 8 threads)
#   that shows what the server itself can serve.
# Each restore is compared with its source (sizes, modes and contents by
# sha256), so a fast wrong restore cannot pass. Prints one table: seconds,
# MB/s (10^6 bytes of file data per second), the speed relative to cp -a of
# the same tree and to `cp -a; sync` (a restore ends with syncfs, so its data
# is on the disk when it returns; cp -a leaves it dirty in the page cache),
# peak RSS, and the load average when the row started.
#   benches/restore.sh                         (SIZE_MIB=4096 SMALL_FILES=100000; ~15 min)
#   benches/restore.sh --quick                 (SIZE_MIB=256 SMALL_FILES=5000; ~2 min)
#   REWIND_RESTORE_ARGS="--jobs 4" benches/restore.sh    (extra restore flags)
#   NO_S3=1 benches/restore.sh                 (skip the S3 rows)
#   BEFORE_BIN=/path/to/older/rewind benches/restore.sh  (its restore rows too, same run)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
B=${REWIND_BIN:-$PWD/target/release/rewind}
PY=${PYTHON:-/work/main/.venv/bin/python}
[[ -x $PY ]] || PY=$REPO/.venv/bin/python
[[ -x $B ]] || { echo "no rewind binary at $B (cargo build --release)"; exit 1; }
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time is missing (Debian package time)"; exit 1; }
[[ $(id -u) == 0 ]] || { echo "run as root: dropping the page cache and FUSE need it"; exit 1; }
if [[ ${1:-} == --quick ]]; then SIZE_MIB=${SIZE_MIB:-256}; SMALL_FILES=${SMALL_FILES:-5000}
else SIZE_MIB=${SIZE_MIB:-4096}; SMALL_FILES=${SMALL_FILES:-100000}; fi
read -r -a RARGS <<<"${REWIND_RESTORE_ARGS:-}"

W=$(mktemp -d /var/tmp/rewind-bench-restore.XXXXXX)
PID= S3PID=
cleanup() {
  [[ -n $PID ]] && kill -9 "$PID" 2>/dev/null || true
  # Closing the only writer of its stdin stops the S3 server (and moto).
  [[ -n $S3PID ]] && { exec {S3IN}>&-; wait "$S3PID" 2>/dev/null || true; }
  while umount -l "$W/mnt" 2>/dev/null; do :; done  # the FUSE mount and the guard under it
  [[ -n ${KEEP:-} ]] && echo "kept $W" || rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{mnt,home}
export HOME=$W/home XDG_CACHE_HOME=$W/home/.cache XDG_STATE_HOME=$W/home/.state
load() { cut -d' ' -f1 /proc/loadavg; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "bench restore: $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo ?); load at start: $(uptime)"
echo "bench restore: writing the mixed tree (${SIZE_MIB} MiB) and the small-file tree (${SMALL_FILES} files)"
"$PY" - "$W/mixed" "$SIZE_MIB" "$W/small" "$SMALL_FILES" <<'PY'
import os, random, sys
mixed, mib, small, nsmall = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = random.Random(14)
def data(n, k):
    # Half random, half repetitive text: compressible like real data.
    h = n // 2
    line = b"rewind restore bench line %08d\n" % k
    return os.urandom(h) + (line * ((n - h) // len(line) + 1))[: n - h]
def write(path, n, k):
    with open(path, "wb") as f:
        while n > 0:
            m = min(n, 8 << 20)
            f.write(data(m, k))
            n -= m
total = mib << 20
budget = {"small": total // 8, "medium": total * 5 // 8}
budget["large"] = total - budget["small"] - budget["medium"]
k = 0
left = budget["small"]
while left > 0:
    d = f"{mixed}/small/d{k % 200:03d}"
    os.makedirs(d, exist_ok=True)
    n = min(left, rng.randrange(1, 65) << 10)
    write(f"{d}/s{k:06d}", n, k); left -= n; k += 1
left = budget["medium"]
while left > 0:
    d = f"{mixed}/medium/d{k % 16:02d}"
    os.makedirs(d, exist_ok=True)
    n = min(left, rng.randrange(1, 65) << 20)
    write(f"{d}/m{k:06d}", n, k); left -= n; k += 1
left = budget["large"]
os.makedirs(f"{mixed}/large", exist_ok=True)
while left > 0:
    n = min(left, 256 << 20)
    write(f"{mixed}/large/l{k:06d}", n, k); left -= n; k += 1
for i in range(nsmall):
    d = f"{small}/d{i % 100:02d}"
    if i < 100:
        os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:06d}", "wb") as f:
        f.write(data(rng.randrange(1, 9) << 10, i))
PY
sync
for t in mixed small; do
  echo "bench restore: $t: $(find "$W/$t" -type f | wc -l) files, $(du -sh --apparent-size "$W/$t" | cut -f1)"
done

# Protects tree $1 into store $W/store-$1 with `rewind run`; returns once the
# restore window exists (the initial base is complete) and the daemon stopped.
protect() {
  local t=$1 store=file://$W/store-$1 deadline=$((SECONDS + 1800)) t0=$SECONDS
  "$B" run --source "$W/$t" --mount "$W/mnt" --store "$store" --volume bench >"$W/run-$t.log" 2>&1 &
  PID=$!
  until "$B" ls --store "$store" --volume bench --json 2>/dev/null |
    "$PY" -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["window"] else 1)' 2>/dev/null; do
    kill -0 $PID 2>/dev/null || { echo "rewind run died:"; tail -30 "$W/run-$t.log"; exit 1; }
    ((SECONDS < deadline)) || { echo "the base of $t did not complete in 1800 s"; tail -30 "$W/run-$t.log"; exit 1; }
    sleep 0.5
  done
  kill -TERM $PID
  wait $PID || { echo "rewind run exited $? on SIGTERM"; tail -30 "$W/run-$t.log"; exit 1; }
  PID=
  while umount -l "$W/mnt" 2>/dev/null; do :; done
  # The daemon's journal and state live in the source; they are not the
  # volume's data, and cp -a must copy the same tree that is restored.
  rm -rf "$W/$t/.rewind"
  echo "bench restore: base of $t complete in $((SECONDS - t0)) s; store $(du -sh "$W/store-$t" | cut -f1)"
}
protect mixed
protect small

# The tree's data bytes, for MB/s.
bytes() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s}'; }
# Sizes, modes and sha256 of every file, relative to the tree.
digest() { (cd "$1" && find . -path ./.rewind -prune -o -type f -printf '%P %s %m\n' | sort >"$2.meta" &&
  find . -path ./.rewind -prune -o -type f -print0 | sort -z | xargs -0 -P2 -n 500 sha256sum | sort -k2 >"$2.sha"); }

rows=()
# row LABEL TREE COMMAND...: times COMMAND with cold caches; the ratios are
# against CP[TREE] and CPSYNC[TREE] when they are set.
row() {
  local label=$1 tree=$2; shift 2
  local cp=${CP[$tree]:--} cps=${CPSYNC[$tree]:--}
  local l; drop_caches; l=$(load)
  /usr/bin/time -v "$@" >"$W/out.txt" 2>"$W/time.txt" || { echo "$label failed:"; tail -20 "$W/out.txt" "$W/time.txt"; exit 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$W/time.txt" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$W/time.txt" | awk '{print $NF}')
  SECS=$("$PY" -c "p='$wall'.split(':'); print(sum(float(x) * 60**i for i, x in enumerate(reversed(p))))")
  rows+=("$("$PY" -c "
b, s = ${SIZES[$tree]}, $SECS
ratio = lambda cp: '-' if cp == '-' else f'{float(cp) / s:.2f}'
print(f'{\"$label\":<40} | {s:>8.2f} | {b / s / 1e6:>8.0f} | {ratio(\"$cp\"):>8} | {ratio(\"$cps\"):>10} | {$rss / 1024:>8.0f} | {\"$l\":>5}')
")")
  echo "bench restore: ${rows[-1]}"
}
restore_check() { # TREE DIR: the restored DIR must equal the source TREE.
  [[ ! -e $2/.rewind ]] || { echo "$2 still has .rewind after a successful restore"; exit 1; }
  digest "$2" "$W/got"
  diff -q "$W/want-$1.meta" "$W/got.meta" >/dev/null && diff -q "$W/want-$1.sha" "$W/got.sha" >/dev/null ||
    { echo "the restore of $1 differs from its source"; diff "$W/want-$1.meta" "$W/got.meta" | head; exit 1; }
}

declare -A SIZES CP CPSYNC
for t in mixed small; do
  SIZES[$t]=$(bytes "$W/$t")
  digest "$W/$t" "$W/want-$t"
  row "$t: cp -a" $t cp -a "$W/$t" "$W/cp-$t"
  cp_secs=$SECS
  rm -rf "$W/cp-$t"; sync
  row "$t: cp -a; sync" $t bash -c 'cp -a "$1" "$2" && sync' - "$W/$t" "$W/cp-$t"
  CP[$t]=$cp_secs CPSYNC[$t]=$SECS
  rm -rf "$W/cp-$t"; sync
  if [[ -n ${BEFORE_BIN:-} ]]; then
    row "$t: restore file:// (BEFORE_BIN)" $t \
      "$BEFORE_BIN" restore --store "file://$W/store-$t" --volume bench --at latest --target "$W/r-$t"
    restore_check $t "$W/r-$t"
    rm -rf "$W/r-$t"
  fi
  row "$t: restore file://" $t \
    "$B" restore --store "file://$W/store-$t" --volume bench --at latest --target "$W/r-$t" "${RARGS[@]}"
  restore_check $t "$W/r-$t"
  rm -rf "$W/r-$t"
done

if [[ -z ${NO_S3:-} ]]; then
  mkfifo "$W/s3in"
  "$PY" "$REPO/tests/e2e/s3server.py" serve --bucket bench <"$W/s3in" >"$W/s3info" &
  S3PID=$!
  exec {S3IN}>"$W/s3in"
  until [[ -s $W/s3info ]]; do
    kill -0 $S3PID 2>/dev/null || { echo "the S3 server did not start"; exit 1; }
    sleep 0.2
  done
  info=$(head -1 "$W/s3info")
  endpoint=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["endpoint"])' "$info")
  export AWS_ENDPOINT_URL=$endpoint AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 \
    AWS_EC2_METADATA_DISABLED=true REWIND_S3_PATH_STYLE=1
  # moto accepts any credentials unless started with --auth.
  echo "bench restore: moto_server at $endpoint; uploading the mixed store"
  s3loop() { # upload|get: every object of the mixed store, 8 threads
    "$PY" - "$1" "$W/store-mixed" <<'PY'
import boto3, os, sys, time
from concurrent.futures import ThreadPoolExecutor
mode, root = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
keys = [os.path.relpath(os.path.join(dp, f), root) for dp, _, fs in os.walk(root) for f in fs if not f.startswith(".tmp.")]
def up(k):
    with open(os.path.join(root, k), "rb") as f:
        s3.put_object(Bucket="bench", Key="p/" + k, Body=f.read())
def get(k):
    return len(s3.get_object(Bucket="bench", Key="p/" + k)["Body"].read())
t = time.monotonic()
with ThreadPoolExecutor(8) as ex:
    n = sum(r or 0 for r in ex.map(up if mode == "upload" else get, keys))
if mode == "get":
    print(f"{len(keys)} objects, {n} bytes in {time.monotonic() - t:.2f} s")
PY
  }
  s3loop upload
  if [[ -n ${BEFORE_BIN:-} ]]; then
    row "mixed: restore s3:// (BEFORE_BIN)" mixed \
      "$BEFORE_BIN" restore --store "s3://bench/p" --volume bench --at latest --target "$W/r-s3"
    restore_check mixed "$W/r-s3"
    rm -rf "$W/r-s3"
  fi
  row "mixed: restore s3:// (moto, loopback)" mixed \
    "$B" restore --store "s3://bench/p" --volume bench --at latest --target "$W/r-s3" "${RARGS[@]}"
  restore_check mixed "$W/r-s3"
  rm -rf "$W/r-s3"
  drop_caches
  echo "bench restore: plain GET loop against moto (8 threads, boto3): $(s3loop get)"
fi

echo
printf '%-40s | %8s | %8s | %8s | %10s | %8s | %5s\n' run seconds MB/s "x cp -a" "x cp+sync" "RSS MiB" load
for r in "${rows[@]}"; do echo "$r"; done
echo "(mixed: ${SIZES[mixed]} bytes; small: ${SIZES[small]} bytes in $SMALL_FILES files; caches dropped before each row;"
echo " restore flags: ${REWIND_RESTORE_ARGS:-none}; $B${BEFORE_BIN:+; BEFORE_BIN=$BEFORE_BIN})"
echo "load at end: $(uptime)"
