#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what the tests need
# (system tools, moto and the AWS SDK clients), then runs format, lint and
# every test. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

# System tools for the network-namespace and iptables tests.
need=()
for tool in iptables:iptables conntrack:conntrack ip:iproute2 curl:curl openssl:openssl; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    step "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "WARNING: missing ${need[*]} and not root: tests that need them will say SKIPPED" >&2
  fi
fi

# Python: moto's STS server, the real botocore/boto3/awscli clients, and
# kubernetes-validate for the deploy/ manifests.
venv="$root/.venv"
if [ ! -x "$venv/bin/moto_server" ] || [ ! -x "$venv/bin/aws" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  step "python venv with moto[server], boto3, awscli, kubernetes-validate"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]' boto3 awscli kubernetes-validate
fi
export PATH="$venv/bin:$PATH"
export MOTO_SERVER="$venv/bin/moto_server"

# JavaScript SDK v3 for the end-to-end client tests (when present).
if [ -f tests/js/package.json ] && [ ! -d tests/js/node_modules ]; then
  step "npm install (tests/js)"
  (cd tests/js && npm install --no-audit --no-fund --silent)
fi

# Go kiam, the real peer for tests/interop_gokiam.rs (they say SKIPPED
# without it); a binary given in KIAM_GO_BIN is used as it is.
if [ -z "${KIAM_GO_BIN:-}" ]; then
  step "Go kiam peer (scripts/peers.sh kiam-go)"
  KIAM_GO_BIN=$(bash scripts/peers.sh kiam-go) || KIAM_GO_BIN=
fi
export KIAM_GO_BIN

# A real kube-apiserver and etcd for tests/real_apiserver.rs (it says
# SKIPPED without them); binaries given in the variables are used as they
# are. docs/MIGRATING.md ("Tested against a real kube-apiserver") has the
# versions and the build times.
if [ -z "${KIAM_ETCD_BIN:-}" ]; then
  step "etcd peer (scripts/peers.sh etcd)"
  KIAM_ETCD_BIN=$(bash scripts/peers.sh etcd) || KIAM_ETCD_BIN=
fi
if [ -z "${KIAM_KUBE_APISERVER_BIN:-}" ]; then
  step "kube-apiserver peer (scripts/peers.sh kube-apiserver)"
  KIAM_KUBE_APISERVER_BIN=$(bash scripts/peers.sh kube-apiserver) || KIAM_KUBE_APISERVER_BIN=
fi
export KIAM_ETCD_BIN KIAM_KUBE_APISERVER_BIN

# The container image for tests/image.rs (it says SKIPPED without it):
# built from the Containerfile with podman, for amd64 and arm64, with no
# registry or daemon (scripts/image.sh; needs root). Images given in
# KIAM_IMAGE / KIAM_IMAGE_ARM64 are used as they are.
if [ -z "${KIAM_IMAGE:-}" ] && [ "$(id -u)" = 0 ]; then
  step "container images (scripts/image.sh)"
  if image_env=$(bash scripts/image.sh); then
    while IFS= read -r line; do export "${line?}"; done <<<"$image_env"
  else
    echo "WARNING: scripts/image.sh failed: tests/image.rs will say SKIPPED" >&2
  fi
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${KIAM_TEST_THREADS:-4}"
