#!/usr/bin/env bash
# Builds the real programs our tests talk to as peers, from their Go
# modules, into a cache outside the repository keyed by name and version, so
# a second run reuses them. Nothing of a peer is kept in this repository: the
# wrapper module that requires it is written into the cache.
#
#   scripts/peers.sh kiam-go    prints the path of Go kiam's `kiam` binary
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

case "${1:-}" in
  kiam-go) kiam_go ;;
  *)
    echo "usage: $0 kiam-go" >&2
    exit 64
    ;;
esac
