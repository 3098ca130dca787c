#!/usr/bin/env bash
# Build (or reuse) kube-apiserver, kube-controller-manager and etcd for the release in VERSION.
#
# Why a cache outside the checkout: the cold build takes many minutes on 2 cores, and a
# fresh clone (CI, another worktree) should reuse binaries built from the same go.mod/go.sum.
# The stamp records everything the binaries depend on (release, go.sum, go version, this
# script); when it matches, nothing is built. Prints the bin directory on stdout.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="$(cat "$HERE/VERSION")"
CACHE="${JEST_CONTROLPLANE_CACHE:-$HOME/.cache/jest-operator/controlplane}/$VERSION"
BIN="$CACHE/bin"
STAMP="$CACHE/stamp"
CMDS=(kube-apiserver kube-controller-manager etcd)

want="$( { echo "$VERSION"; go env GOVERSION GOOS GOARCH; cat "$HERE/go.mod" "$HERE/go.sum" "$HERE/build.sh" "$HERE/cmd/etcd/main.go"; } | sha256sum | cut -d' ' -f1)"
have_all=1
for c in "${CMDS[@]}"; do [[ -x "$BIN/$c" ]] || have_all=0; done
if [[ $have_all == 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "$BIN"
  exit 0
fi

minor="${VERSION#v1.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
cpkg=k8s.io/client-go/pkg/version
date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
ldflags="-s -w"
for p in $pkg $cpkg; do
  ldflags+=" -X $p.gitVersion=$VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date -X $p.gitCommit=release-$VERSION"
done

mkdir -p "$BIN"
rm -f "$STAMP"
start=$(date +%s)
cd "$HERE"
echo "building ${CMDS[*]} $VERSION into $BIN (cold build: many minutes on 2 cores)" >&2
CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath -mod=readonly -buildvcs=false" nice -n 10 go build -ldflags "$ldflags" -o "$BIN/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  ./cmd/etcd
echo "$want" > "$STAMP"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$BIN"
