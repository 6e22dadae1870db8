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

# The AWS SDK for Go v2 and Java v2 clients of tests/e2e_sdk_go_java.rs
# (it says SKIPPED without them); built from tests/clients/ into the peer
# cache, keyed by SDK version and a digest of their sources.
if [ -z "${KIAM_SDK_GO_BIN:-}" ]; then
  step "Go SDK v2 client (scripts/peers.sh sdk-go)"
  KIAM_SDK_GO_BIN=$(bash scripts/peers.sh sdk-go) || KIAM_SDK_GO_BIN=
fi
if [ -z "${KIAM_SDK_JAVA_JAR:-}" ]; then
  step "Java SDK v2 client (scripts/peers.sh sdk-java)"
  KIAM_SDK_JAVA_JAR=$(bash scripts/peers.sh sdk-java) || KIAM_SDK_JAVA_JAR=
fi
export KIAM_SDK_GO_BIN KIAM_SDK_JAVA_JAR
# helm for tests/helm.rs (the chart in deploy/helm/kiam) and cfssl/cfssljson
# for tests/seed_pki.rs (the seed document's PKI steps); they say SKIPPED
# without them. Binaries given in the variables are used as they are.
if [ -z "${KIAM_HELM_BIN:-}" ]; then
  step "helm (scripts/peers.sh helm)"
  KIAM_HELM_BIN=$(bash scripts/peers.sh helm) || KIAM_HELM_BIN=
fi
if [ -z "${KIAM_CFSSL_BIN:-}" ]; then
  step "cfssl (scripts/peers.sh cfssl)"
  KIAM_CFSSL_BIN=$(bash scripts/peers.sh cfssl) || KIAM_CFSSL_BIN=
fi
if [ -z "${KIAM_CFSSLJSON_BIN:-}" ]; then
  step "cfssljson (scripts/peers.sh cfssljson)"
  KIAM_CFSSLJSON_BIN=$(bash scripts/peers.sh cfssljson) || KIAM_CFSSLJSON_BIN=
fi
export KIAM_HELM_BIN KIAM_CFSSL_BIN KIAM_CFSSLJSON_BIN
# The container image for tests/image.rs (it says SKIPPED without it):
# built from the Containerfile with podman, for amd64 and arm64, with no
# registry or daemon (scripts/image.sh; needs root). Images given in
# KIAM_IMAGE / KIAM_IMAGE_ARM64 are used as they are. As root (CI) a failed
# image build fails the run; KIAM_SKIP_IMAGE=1 skips it on purpose.
if [ -z "${KIAM_IMAGE:-}" ] && [ "$(id -u)" = 0 ] && [ "${KIAM_SKIP_IMAGE:-}" != 1 ]; then
  step "container images (scripts/image.sh)"
  image_env=$(bash scripts/image.sh)
  while IFS= read -r line; do export "${line?}"; done <<<"$image_env"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${KIAM_TEST_THREADS:-4}"
