#!/usr/bin/env bash
# Builds the real programs our tests talk to as peers, from their Go
# modules, into a cache outside the repository keyed by name and version, so
# a second run reuses them. Nothing of a peer is kept in this repository: the
# wrapper module that requires it is written into the cache.
#
#   scripts/peers.sh kiam-go         prints the path of Go kiam's `kiam` binary
#   scripts/peers.sh kube-apiserver  prints the path of a real kube-apiserver
#   scripts/peers.sh etcd            prints the path of a real etcd
#   scripts/peers.sh sdk-go          prints the path of tests/clients/go built
#                                    with the AWS SDK for Go v2
#   scripts/peers.sh sdk-java        prints the path of tests/clients/java's jar
#                                    (AWS SDK for Java v2, every dependency inside)
#   scripts/peers.sh helm            prints the path of helm (v3)
#   scripts/peers.sh cfssl           prints the path of cfssl
#   scripts/peers.sh cfssljson       prints the path of cfssljson
#
# Exits non-zero, saying why on stderr, when a peer cannot be built (no Go,
# or the module proxy does not serve a module); the tests that need it then
# say SKIPPED. docs/MIGRATING.md ("Tested against Go kiam") says what the
# build needs and why.
set -euo pipefail

cache_root=${KIAM_PEERS_CACHE:-${HOME:-/tmp}/.cache/kiam-peers}

# Go kiam: github.com/uswitch/kiam at its last commit (2023-10-09, the
# "abandon kiam" merge on master). Its tags (v4.2, ...) are not semantic
# versions, so the module is only known by this pseudo-version.
KIAM_GO_MODULE=github.com/uswitch/kiam
KIAM_GO_VERSION=v0.0.0-20231009093338-29504044e67c
# Bump the suffix whenever the pins below change, so caches rebuild.
KIAM_GO_RECIPE=r2

kiam_go() {
  local dir="$cache_root/kiam-go-$KIAM_GO_VERSION-$KIAM_GO_RECIPE"
  local bin="$dir/bin/kiam"
  if [ -x "$bin" ]; then
    echo "$bin"
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "peers.sh: no 'go' on PATH; cannot build Go kiam" >&2
    return 1
  fi
  local work="$dir/module"
  rm -rf "$work"
  mkdir -p "$work" "$dir/bin"
  # The wrapper module: requires Go kiam. Today's Go builds it with the
  # versions its own go.mod selects; a bump goes here as a second require.
  cat >"$work/go.mod" <<EOF
module kiam-peer

go 1.21

require $KIAM_GO_MODULE $KIAM_GO_VERSION
EOF
  cat >"$work/peer.go" <<EOF
//go:build peer

// Only makes 'go mod tidy' keep Go kiam's main package in the graph.
package peer

import _ "$KIAM_GO_MODULE/cmd/kiam"
EOF
  local log="$dir/build.log"
  local started=$SECONDS
  echo "peers.sh: building Go kiam $KIAM_GO_VERSION into $dir (log: $log)" >&2
  # grpc/examples at the pseudo-version Go kiam requires is served by the
  # module proxy, but the checksum database has no entry for it; its
  # checksum is taken from the proxy alone (it is only in the module graph,
  # no package of it is built).
  if ! (
    cd "$work" &&
      export GOFLAGS=-mod=mod GONOSUMDB=google.golang.org/grpc/examples GOWORK=off &&
      go mod tidy -e &&
      go build -trimpath -o "$bin.tmp" "$KIAM_GO_MODULE/cmd/kiam" &&
      mv "$bin.tmp" "$bin"
  ) >"$log" 2>&1; then
    echo "peers.sh: Go kiam did not build; the end of $log:" >&2
    tail -n 15 "$log" >&2
    return 1
  fi
  echo "peers.sh: Go kiam built in $((SECONDS - started)) s" >&2
  echo "$bin"
}

# A real Kubernetes API server and its etcd, for the tests that run kiam
# against the real thing (tests/real_apiserver.rs). Built stripped
# (-trimpath, -s -w) to keep the cache small.
KUBE_VERSION=v1.36.3
# k8s.io/kubernetes's staging modules are published as k8s.io/<name> at
# v0.<minor>.<patch>; its own go.mod points them at ./staging, which a module
# that requires it cannot use, so the wrapper replaces each by that version.
KUBE_STAGING_VERSION=v0.36.3
KUBE_RECIPE=r1
ETCD_VERSION=v3.6.16
ETCD_RECIPE=r1

# go_peer NAME VERSION RECIPE MODULE PACKAGE BINARY [EXTRA_GO_MOD_FILE]
# Builds PACKAGE (of MODULE at VERSION) through a wrapper module in the
# cache; prints the binary's path.
go_peer() {
  local name=$1 version=$2 recipe=$3 module=$4 package=$5 binary=$6 extra=${7:-}
  local dir="$cache_root/$name-$version-$recipe"
  local bin="$dir/bin/$binary"
  if [ -x "$bin" ]; then
    echo "$bin"
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "peers.sh: no 'go' on PATH; cannot build $name" >&2
    return 1
  fi
  local work="$dir/module"
  rm -rf "$work"
  mkdir -p "$work" "$dir/bin"
  cat >"$work/go.mod" <<EOF
module $name-peer

go 1.26

require $module $version
EOF
  if [ -n "$extra" ]; then
    cat "$extra" >>"$work/go.mod"
  fi
  cat >"$work/peer.go" <<EOF
//go:build peer

// Only makes 'go mod tidy' keep the peer's main package in the graph.
package peer

import _ "$package"
EOF
  local log="$dir/build.log"
  local started=$SECONDS
  echo "peers.sh: building $name $version into $dir (log: $log)" >&2
  if ! (
    cd "$work" &&
      export GOFLAGS="-mod=mod -trimpath" GOWORK=off &&
      go mod tidy -e &&
      go build -ldflags="-s -w" -o "$bin.tmp" "$package" &&
      mv "$bin.tmp" "$bin"
  ) >"$log" 2>&1; then
    echo "peers.sh: $name did not build; the end of $log:" >&2
    tail -n 15 "$log" >&2
    return 1
  fi
  echo "peers.sh: $name built in $((SECONDS - started)) s" >&2
  echo "$bin"
}

kube_apiserver() {
  if ! command -v go >/dev/null 2>&1; then
    echo "peers.sh: no 'go' on PATH; cannot build kube-apiserver" >&2
    return 1
  fi
  local gomod
  # The staging modules are read from k8s.io/kubernetes's own go.mod.
  if ! gomod=$(GOFLAGS= GOWORK=off go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p') || [ ! -f "$gomod" ]; then
    echo "peers.sh: the module proxy does not serve k8s.io/kubernetes@$KUBE_VERSION" >&2
    return 1
  fi
  local replaces
  replaces=$(mktemp)
  {
    echo "replace ("
    sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => \./staging/.*$|\1|p' "$gomod" |
      while read -r m; do echo "	$m => $m $KUBE_STAGING_VERSION"; done
    echo ")"
  } >"$replaces"
  local rc=0
  go_peer kube-apiserver "$KUBE_VERSION" "$KUBE_RECIPE" k8s.io/kubernetes \
    k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$replaces" || rc=$?
  rm -f "$replaces"
  return $rc
}

etcd() {
  go_peer etcd "$ETCD_VERSION" "$ETCD_RECIPE" go.etcd.io/etcd/server/v3 \
    go.etcd.io/etcd/server/v3 etcd
}

# Helm, for tests/helm.rs (helm lint / helm template of deploy/helm/kiam).
# No Debian package provides it; built from its Go module like the peers.
HELM_VERSION=v3.22.0
HELM_RECIPE=r1

helm_bin() {
  go_peer helm "$HELM_VERSION" "$HELM_RECIPE" helm.sh/helm/v3 \
    helm.sh/helm/v3/cmd/helm helm
}

# cfssl and cfssljson, for tests/seed_pki.rs (the seed document's
# certificate steps, followed as written). One module, two binaries, each
# cached under its own name.
CFSSL_VERSION=v1.6.5
CFSSL_RECIPE=r1

cfssl_bin() {
  go_peer cfssl "$CFSSL_VERSION" "$CFSSL_RECIPE" github.com/cloudflare/cfssl \
    github.com/cloudflare/cfssl/cmd/cfssl cfssl
}

cfssljson_bin() {
  go_peer cfssljson "$CFSSL_VERSION" "$CFSSL_RECIPE" github.com/cloudflare/cfssl \
    github.com/cloudflare/cfssl/cmd/cfssljson cfssljson
}

# The SDK clients of tests/e2e_sdk_go_java.rs. Their sources live in the
# repository (tests/clients/); the cache is keyed by the SDK version and a
# digest of those sources, so an edit rebuilds and a second run does not.
SDK_GO_VERSION=v1.33.18 # github.com/aws/aws-sdk-go-v2/config, as in its go.mod
SDK_JAVA_VERSION=2.57.8 # software.amazon.awssdk:bom, as in its pom.xml

# sources_digest DIR FILE...: a short digest of the named files under DIR.
sources_digest() {
  local dir=$1
  shift
  (cd "$dir" && cat "$@") | sha256sum | cut -c1-12
}

sdk_go() {
  local src
  src="$(cd "$(dirname "$0")/.." && pwd)/tests/clients/go"
  local digest
  digest=$(sources_digest "$src" go.mod go.sum main.go)
  local dir="$cache_root/sdk-go-$SDK_GO_VERSION-$digest"
  local bin="$dir/bin/kiam-sdk-go-client"
  if [ -x "$bin" ]; then
    echo "$bin"
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "peers.sh: no 'go' on PATH; cannot build the Go SDK client" >&2
    return 1
  fi
  mkdir -p "$dir/bin"
  local log="$dir/build.log"
  local started=$SECONDS
  echo "peers.sh: building the Go SDK client (config $SDK_GO_VERSION) into $dir (log: $log)" >&2
  # go.sum is committed: -mod=readonly checks every module against it.
  if ! (
    cd "$src" &&
      export GOFLAGS="-mod=readonly -trimpath" GOWORK=off &&
      go build -ldflags="-s -w" -o "$bin.tmp" . &&
      mv "$bin.tmp" "$bin"
  ) >"$log" 2>&1; then
    echo "peers.sh: the Go SDK client did not build; the end of $log:" >&2
    tail -n 15 "$log" >&2
    return 1
  fi
  echo "peers.sh: the Go SDK client built in $((SECONDS - started)) s" >&2
  echo "$bin"
}

sdk_java() {
  local src
  src="$(cd "$(dirname "$0")/.." && pwd)/tests/clients/java"
  local digest
  digest=$(sources_digest "$src" pom.xml src/main/java/kiam/SdkClient.java)
  local dir="$cache_root/sdk-java-$SDK_JAVA_VERSION-$digest"
  local jar="$dir/kiam-sdk-java-client.jar"
  if [ -f "$jar" ]; then
    echo "$jar"
    return 0
  fi
  if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
    echo "peers.sh: no 'mvn' or 'java' on PATH; cannot build the Java SDK client" >&2
    return 1
  fi
  mkdir -p "$dir"
  local log="$dir/build.log"
  local started=$SECONDS
  # The build runs in a copy, so the repository gets no target/; Maven's
  # downloads go to the cache too (shared by versions, so a new SDK version
  # fetches only what changed).
  local work="$dir/build"
  rm -rf "$work"
  mkdir -p "$work"
  cp -R "$src/pom.xml" "$src/src" "$work/"
  echo "peers.sh: building the Java SDK client (SDK $SDK_JAVA_VERSION) into $dir (log: $log)" >&2
  if ! (
    cd "$work" &&
      mvn -B -q -Dmaven.repo.local="$cache_root/maven-repository" package &&
      mv target/kiam-sdk-java-client.jar "$jar.tmp" &&
      mv "$jar.tmp" "$jar"
  ) >"$log" 2>&1; then
    echo "peers.sh: the Java SDK client did not build; the end of $log:" >&2
    tail -n 15 "$log" >&2
    return 1
  fi
  rm -rf "$work"
  echo "peers.sh: the Java SDK client built in $((SECONDS - started)) s" >&2
  echo "$jar"
}

case "${1:-}" in
  kiam-go) kiam_go ;;
  kube-apiserver) kube_apiserver ;;
  etcd) etcd ;;
  sdk-go) sdk_go ;;
  sdk-java) sdk_java ;;
  helm) helm_bin ;;
  cfssl) cfssl_bin ;;
  cfssljson) cfssljson_bin ;;
  *)
    echo "usage: $0 kiam-go|kube-apiserver|etcd|sdk-go|sdk-java|helm|cfssl|cfssljson" >&2
    exit 64
    ;;
esac
