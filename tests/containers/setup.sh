#!/usr/bin/env bash
# Makes this Debian machine able to build and run the Rewind image with no
# container registry, then builds sidecar/Dockerfile, unchanged, as
# localhost/rewind:test (or $REWIND_IMAGE), and the container suite's
# application image. It installs podman, runc, debootstrap and
# fuse-overlayfs from Debian, writes a containers.conf for this host's
# quirks, and makes the base images the Dockerfile names:
# `debian:bookworm-slim` from debootstrap and, for --full,
# `rust:1-bookworm` from the machine's own Rust toolchain.
#
#   tests/containers/setup.sh          the runtime stage, with the build stage
#                                      replaced by this host's release binary
#                                      ($REWIND_BIN, default
#                                      target/release/rewind, stripped) through
#                                      `--build-context build=DIR`: what
#                                      scripts/test-all runs, in about a minute
#   tests/containers/setup.sh --full   both stages: cargo builds the binary in
#                                      the build container, as a user's
#                                      `docker build` does (tens of minutes
#                                      cold on a loaded two-core machine; the
#                                      Dockerfile's cache mounts make a rebuild
#                                      after a source change take minutes)
#
# Run as root from anywhere; idempotent, and every step whose result already
# exists is skipped.
#
# The containers.conf goes to $REWIND_CONTAINERS_STATE (default
# /var/tmp/rewind-containers); point CONTAINERS_CONF at it to use podman by
# hand (tests/containers/conftest.py does). Two host quirks need it: crun
# refuses this host's hybrid cgroup hierarchy, so runc is selected, and
# podman's default RLIMIT_NOFILE/NPROC for containers lie above the host's
# hard limits, which fails every container start, so default_ulimits are set
# to the hard limits.
set -euo pipefail
cd "$(dirname "$0")/../.."
full=0
case "${1:-}" in
  --full) full=1 ;;
  "") ;;
  *) echo "usage: $0 [--full]" >&2; exit 2 ;;
esac
tag=${REWIND_IMAGE:-localhost/rewind:test}
state=${REWIND_CONTAINERS_STATE:-/var/tmp/rewind-containers}
mkdir -p "$state"
say() { echo "containers-setup: $*"; }

missing=()
for pkg in podman runc debootstrap fuse-overlayfs; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Well under the hard limits: podman's own processes run with a lower
# RLIMIT_NPROC than the shell that starts them (32768 against 96365 seen
# here), and runc cannot raise a limit above its own.
limit() { local hard=$1 cap=$2; [[ $hard == unlimited || $hard -gt $cap ]] && echo "$cap" || echo "$hard"; }
nofile=$(limit "$(ulimit -Hn)" 65536)
nproc=$(limit "$(ulimit -Hu)" 16384)
conf="$state/containers.conf"
cat > "$conf.new" <<EOF
# Written by tests/containers/setup.sh; see the comment there.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
# Not systemd as PID 1: podman's systemd cgroup manager and journald event
# logger would fail, so use plain cgroupfs and a file.
if [[ "$(ps -p 1 -o comm=)" != systemd ]]; then
  printf 'cgroup_manager = "cgroupfs"\nevents_logger = "file"\n' >> "$conf.new"
fi
mv "$conf.new" "$conf"
export CONTAINERS_CONF="$conf"
# podman build does not apply default_ulimits to its RUN steps: it is told.
ulimits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

# Niceness for the heavy steps: the machine is shared with other builds.
heavy=(nice -n 19)

if ! podman image exists docker.io/library/debian:bookworm-slim; then
  say "making debian:bookworm-slim with debootstrap (about a minute)"
  root="$state/rootfs"
  rm -rf "$root"
  "${heavy[@]}" debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$state/debootstrap.log" 2>&1 \
    || { cat "$state/debootstrap.log" >&2; exit 1; }
  rm -f "$root"/var/cache/apt/archives/*.deb
  rm -rf "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - docker.io/library/debian:bookworm-slim >/dev/null
  rm -rf "$root"
fi

proxy=()
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  [[ -n ${!v:-} ]] && proxy+=(--build-arg "$v=${!v}")
done

if ((full)); then
  # The rust image is rebuilt when the machine's toolchain or local CAs change.
  sysroot=$(rustc --print sysroot)
  rustc_version=$(rustc --version)
  mkdir -p /usr/local/share/ca-certificates
  cas=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-16)
  want="$rustc_version; CAs $cas"
  have=$(podman image inspect --format '{{index .Labels "rewind.rustc"}}' docker.io/library/rust:1-bookworm 2>/dev/null || true)
  if [[ "$have" != "$want" ]]; then
    say "making rust:1-bookworm from $sysroot ($rustc_version)"
    "${heavy[@]}" podman build "${ulimits[@]}" --pull=never --network host --label "rewind.rustc=$want" \
      --build-context hostca=/usr/local/share/ca-certificates \
      -f tests/containers/rust.Containerfile --ignorefile tests/containers/rust.ignore \
      -t docker.io/library/rust:1-bookworm "$sysroot"
  fi

  say "building sidecar/Dockerfile, both stages, as $tag"
  # --network host: the build stage's cargo fetches crates from crates.io and
  # the runtime stage's apt-get reaches Debian exactly as this host does.
  "${heavy[@]}" podman build "${ulimits[@]}" --pull=never --network host "${proxy[@]}" -f sidecar/Dockerfile -t "$tag" .
else
  bin=${REWIND_BIN:-target/release/rewind}
  [[ -x $bin ]] || { echo "containers-setup: no release binary at $bin: run cargo build --release first (or use --full)" >&2; exit 1; }
  say "building sidecar/Dockerfile's runtime stage on $bin as $tag"
  # A build context named like a stage replaces that stage: the runtime
  # stage's `COPY --from=build /rewind` takes this directory's file, and the
  # build stage is not run.
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  strip -o "$ctx/rewind" "$bin"
  "${heavy[@]}" podman build "${ulimits[@]}" --pull=never --network host "${proxy[@]}" \
    --build-context "build=$ctx" -f sidecar/Dockerfile -t "$tag" .
fi

app_sum=$(sha256sum tests/containers/app.Containerfile | cut -c1-16)
have=$(podman image inspect --format '{{index .Labels "rewind.app"}}' localhost/rewind-test-app 2>/dev/null || true)
if [[ "$have" != "$app_sum" ]]; then
  say "building the suite's application image"
  "${heavy[@]}" podman build "${ulimits[@]}" --pull=never --network host "${proxy[@]}" --label "rewind.app=$app_sum" \
    -f tests/containers/app.Containerfile -t localhost/rewind-test-app tests/containers
fi
