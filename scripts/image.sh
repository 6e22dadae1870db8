#!/usr/bin/env bash
# Builds the kiam image from the Containerfile for amd64 and arm64 with no
# registry, no Docker daemon and no network inside the build (what CI
# runs; needs root):
#
#   1. the base: a minimal Debian root made by mmdebstrap from Debian's
#      packages (ca-certificates, iptables with both backends, conntrack),
#      cached outside the repository keyed by release and package list,
#      imported into podman's storage;
#   2. the binary: cargo build --release for each target outside the
#      container (aarch64 with Debian's cross gcc);
#   3. podman build --build-arg BASE=... --build-arg KIAM=prebuilt, one
#      image per architecture, gathered in a manifest list and written as
#      one OCI archive with a multi-arch index.
#
#   scripts/image.sh            both architectures
#   KIAM_IMAGE_ARCHS=amd64 scripts/image.sh
#
# Prints, on stdout only, what the tests need (tests/image.rs):
#   KIAM_IMAGE=<local name of the amd64 image>
#   KIAM_IMAGE_ARM64=<local name of the arm64 image>   (when built)
#   KIAM_IMAGE_ARCHIVE=<the OCI archive>
# and on stderr each step with its duration and the images' compressed
# sizes. Exits non-zero, saying why, when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf 'image.sh: %s\n' "$*" >&2; }
die() {
  say "$*"
  exit 1
}
started=$SECONDS
timed() {
  local t=$SECONDS
  "$@"
  say "  ($((SECONDS - t)) s)"
}

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap and podman's storage); nothing built"

archs=${KIAM_IMAGE_ARCHS:-amd64,arm64}
IFS=, read -r -a archs <<<"$archs"
cache_root=${KIAM_PEERS_CACHE:-${HOME:-/tmp}/.cache/kiam-peers}
out=${KIAM_IMAGE_OUT:-$root/target/image}
mkdir -p "$out"

# The base. Bump BASE_RECIPE when the hooks below change, so caches rebuild.
DEBIAN_RELEASE=bookworm
BASE_PACKAGES="base-files ca-certificates iptables conntrack"
BASE_RECIPE=r1
# The mirror this project's machines use; security updates come from
# debian-security, as on a Debian host.
DEBIAN_MIRROR=${KIAM_DEBIAN_MIRROR:-http://deb.debian.org}
base_key=$(printf '%s\n' "$DEBIAN_RELEASE" "$BASE_PACKAGES" "$BASE_RECIPE" | sha256sum | cut -c1-12)
base_dir="$cache_root/image-base-$DEBIAN_RELEASE-$base_key"

# --- tools -----------------------------------------------------------------
need=()
for tool in podman:podman runc:runc mmdebstrap:mmdebstrap; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
for a in "${archs[@]}"; do
  case "$a" in
    amd64) ;;
    arm64)
      command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 ||
        need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
      command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
      ;;
    *) die "KIAM_IMAGE_ARCHS: $a is not amd64 or arm64" ;;
  esac
done
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Podman's default runtime is crun, which refuses hosts with cgroup
# controllers on both hierarchies ("hybrid mode"); runc runs there too.
# Nothing here starts a container: the Containerfile has no RUN in the
# stages CI builds.
podman=(podman)

# --- 1. base ---------------------------------------------------------------
# A root with only the packages kiam runs (and their dependencies): no
# shell or package manager beyond what they pull in. Made "chrootless"
# (maintainer scripts run by the host's dpkg against the root), so a
# foreign architecture needs no emulation. The hooks add what chrootless
# dpkg leaves out (the CA bundle) and what scanners and the image need.
make_base() {
  local arch=$1 tar=$2
  say "mmdebstrap $DEBIAN_RELEASE $arch: $BASE_PACKAGES"
  mmdebstrap --quiet --mode=chrootless --variant=custom --format=tar --architectures="$arch" \
    --include="${BASE_PACKAGES// /,}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='cd "$1/usr/share/ca-certificates" && find . -name "*.crt" | LC_ALL=C sort | xargs cat >"$1/etc/ssl/certs/ca-certificates.crt"' \
    --customize-hook='printf "root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin\n" >"$1/etc/passwd"; printf "root:x:0:\nnonroot:x:65532:\n" >"$1/etc/group"' \
    --customize-hook='mkdir -p "$1/usr/share/kiam" && { echo "# debian $(cat "$1/etc/debian_version") ('"$DEBIAN_RELEASE"')"; dpkg-query --admindir="$1/var/lib/dpkg" -W -f "\${Package} \${Version} \${Architecture}\n"; } >"$1/usr/share/kiam/debian-packages.txt"' \
    --customize-hook='rm -rf "$1/var/cache/apt" "$1/var/lib/apt/lists" "$1/var/log"/*' \
    "$DEBIAN_RELEASE" "$tar.tmp" \
    "deb $DEBIAN_MIRROR/debian $DEBIAN_RELEASE main" \
    "deb $DEBIAN_MIRROR/debian $DEBIAN_RELEASE-updates main" \
    "deb $DEBIAN_MIRROR/debian-security $DEBIAN_RELEASE-security main"
  mv "$tar.tmp" "$tar"
}

# Named after the tar's content too: a cache entry made again (deleted to
# pick up security updates) is imported again.
base_image() {
  echo "localhost/kiam-base:$DEBIAN_RELEASE-$base_key-$1-$(sha256sum <"$base_dir/$1.tar" | cut -c1-12)"
}

mkdir -p "$base_dir"
for a in "${archs[@]}"; do
  tar="$base_dir/$a.tar"
  if [ ! -s "$tar" ]; then
    timed make_base "$a" "$tar"
  else
    say "base $a: cached ($tar)"
  fi
  if ! "${podman[@]}" image exists "$(base_image "$a")"; then
    "${podman[@]}" import --quiet --arch "$a" --os linux "$tar" "$(base_image "$a")" >/dev/null
  fi
done

# --- 2. binaries -----------------------------------------------------------
# Release builds of both targets, in the cache unless CARGO_TARGET_DIR says
# otherwise: a clean clone then recompiles only what changed, not every
# dependency twice.
target_dir=${CARGO_TARGET_DIR:-$cache_root/image-target}
export CARGO_TARGET_DIR=$target_dir
bins="$out/bin"
mkdir -p "$bins"
build_bin() {
  local arch=$1 triple
  case "$arch" in
    amd64) triple=x86_64-unknown-linux-gnu ;;
    arm64)
      triple=aarch64-unknown-linux-gnu
      if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$triple"; then
        rustup target add "$triple" >&2
      fi
      # Environment, not .cargo/config.toml: the host build stays as it is.
      export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
      export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
      export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
      ;;
  esac
  # The host's own target builds where a plain `cargo build --release`
  # does, and reuses it.
  local args=(--target "$triple") built="$target_dir/$triple/release/kiam"
  if [ "$(rustc -vV | sed -n 's/^host: //p')" = "$triple" ]; then
    args=()
    built="$target_dir/release/kiam"
  fi
  say "cargo build --release --target $triple"
  CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --locked --bin kiam "${args[@]}" >&2
  install -m 0755 "$built" "$bins/kiam-$arch"
}
for a in "${archs[@]}"; do
  timed build_bin "$a"
done

# --- 3. images -------------------------------------------------------------
list=localhost/kiam:ci
"${podman[@]}" manifest rm "$list" >/dev/null 2>&1 || true
# The previous run's images, so repeated runs do not pile up.
for a in "${archs[@]}"; do
  "${podman[@]}" rmi "localhost/kiam:ci-$a" >/dev/null 2>&1 || true
done
"${podman[@]}" manifest create "$list" >/dev/null
build_image() {
  local arch=$1 base pkgs
  base=$(base_image "$arch")
  # What the base holds, as labels (debian-packages.txt has the same in
  # the image; /var/lib/dpkg/status is there for scanners).
  pkgs=$(tar -xOf "$base_dir/$arch.tar" ./usr/share/kiam/debian-packages.txt |
    grep -v '^#' | awk '{printf "%s%s=%s", (NR>1?" ":""), $1, $2}')
  say "podman build linux/$arch"
  "${podman[@]}" build --quiet --network=none --pull=never --layers=false \
    --platform "linux/$arch" \
    --build-arg "BASE=$base" --build-arg KIAM=prebuilt \
    --build-context "kiam-bin=$bins" \
    --label "org.opencontainers.image.base.name=debian:$DEBIAN_RELEASE (mmdebstrap: $BASE_PACKAGES)" \
    --label "kiam.debian.release=$DEBIAN_RELEASE $(tar -xOf "$base_dir/$arch.tar" ./etc/debian_version)" \
    --label "kiam.debian.packages=$pkgs" \
    --label "org.opencontainers.image.version=$(git describe --always --dirty 2>/dev/null || echo unknown)" \
    -t "localhost/kiam:ci-$arch" -f Containerfile . >/dev/null
  "${podman[@]}" manifest add "$list" "containers-storage:localhost/kiam:ci-$arch" >/dev/null
}
for a in "${archs[@]}"; do
  timed build_image "$a"
done

archive="$out/kiam-oci.tar"
rm -f "$archive"
say "writing $archive (OCI index: ${archs[*]})"
"${podman[@]}" manifest push --quiet --all --format oci "$list" "oci-archive:$archive:ci" >&2
# The archive is the product. Podman 4.3 keeps a list of local images
# half-resolved, and `podman images` then fails for everyone: drop it.
"${podman[@]}" manifest rm "$list" >/dev/null

# Compressed sizes, as a registry stores them: the layers and config each
# architecture's manifest names in the archive.
python3 - "$archive" >&2 <<'EOF'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
blob = lambda d: json.load(t.extractfile("blobs/" + d.replace(":", "/")))
index = json.load(t.extractfile("index.json"))
for top in index["manifests"]:
    entries = blob(top["digest"]).get("manifests", [top])
    for m in entries:
        man = blob(m["digest"])
        size = man["config"]["size"] + sum(l["size"] for l in man["layers"])
        arch = m.get("platform", {}).get("architecture", "?")
        print(f"image.sh: linux/{arch}: {size / 1e6:.1f} MB compressed ({len(man['layers'])} layers)")
EOF

say "done in $((SECONDS - started)) s"
for a in "${archs[@]}"; do
  case "$a" in
    amd64) echo "KIAM_IMAGE=localhost/kiam:ci-amd64" ;;
    arm64) echo "KIAM_IMAGE_ARM64=localhost/kiam:ci-arm64" ;;
  esac
done
echo "KIAM_IMAGE_ARCHIVE=$archive"
