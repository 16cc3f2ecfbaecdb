#!/usr/bin/env bash
# Builds the Kubernetes control plane the tests run against (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler), plus kubelet and
# kube-proxy for the opt-in real node (tests/src/node.rs), from the Go module
# in tests/controlplane/, and kwok (fake nodes whose pods report Running and
# Ready) from tests/controlplane/kwok/, into a cache directory outside the
# repository keyed by the pinned versions and the recipe. A warm cache makes
# this a no-op; a cold one takes a while (see README, "Testing"). Go's own
# build cache (GOCACHE) is shared, so a recipe change recompiles only what it adds.
#
# Prints the binary directory on stdout (all progress goes to stderr), so
# callers can do: BIN=$(scripts/controlplane-build.sh)
#
# Environment:
#   CALLMEBACK_CONTROLPLANE_BIN  use this directory instead of the default cache
#   XDG_CACHE_HOME               cache root (default ~/.cache)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mod="$repo/tests/controlplane"

log() { echo "controlplane-build: $*" >&2; }

command -v go >/dev/null || { log "go is not installed (needed to build Kubernetes)"; exit 1; }

# Versions come from go.mod alone, so the cache key needs no network.
k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
kwok_version="$(awk '$1 == "sigs.k8s.io/kwok" && $2 ~ /^v/ { print $2; exit }' "$mod/kwok/go.mod")"
[[ -n "$k8s_version" && -n "$etcd_version" && -n "$kwok_version" ]] || { log "cannot read versions from $mod/go.mod and $mod/kwok/go.mod"; exit 1; }

# "-node": the recipe with kubelet and kube-proxy. A checkout with the older
# recipe keeps its own directory, so the two never rebuild over each other.
bin="${CALLMEBACK_CONTROLPLANE_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/k8s-${k8s_version}-etcd-${etcd_version}-kwok-${kwok_version}-node/bin}"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kwok)

# The stamp records exactly what was built; a changed go.mod/go.sum or build
# recipe (this script) rebuilds even when the version key stayed the same.
stamp_value="$(cat "$mod/go.mod" "$mod/go.sum" "$mod/kwok/go.mod" "$mod/kwok/go.sum" "$0" | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -f "$bin/.stamp" && "$(cat "$bin/.stamp")" == "$stamp_value" ]] || return 1
  local b
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}

if up_to_date; then
  echo "$bin"
  exit 0
fi

mkdir -p "$(dirname "$bin")"
# Two test binaries (or a test run and a manual build) may start this at once:
# one builds, the other waits and then finds the cache warm.
exec 9>"$(dirname "$bin")/.build.lock"
flock 9
if up_to_date; then
  echo "$bin"
  exit 0
fi

log "building Kubernetes $k8s_version, etcd $etcd_version and kwok $kwok_version into $bin (a cold build takes about 30 minutes on 2 cores; one line per binary follows)"
start=$SECONDS

# Version stamps, as Kubernetes' hack/lib/version.sh sets them: the apiserver
# and controller-manager derive their binary/emulation version from these,
# and an unset gitVersion would make them believe they are v0.0.0.
minor="${k8s_version#v1.}"
minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

staging="$(dirname "$bin")/.bin.tmp.$$"
rm -rf "$staging"
mkdir -p "$staging"
trap 'rm -rf "$staging"' EXIT

# One `go build` per binary, so progress shows per binary; the packages they
# share compile once (Go's build cache).
built=0
build_one() { # <name> <package>
  local name="$1" pkg="$2" t0=$SECONDS
  log "[$((built + 1))/${#binaries[@]}] building $name ($pkg)"
  # The official release builds are static (CGO off) as well; it also avoids
  # needing a C toolchain. -mod=readonly: go.sum is committed and must match.
  (cd "$mod" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" go build -trimpath -ldflags "$ldflags" -o "$staging/$name" "$pkg")
  built=$((built + 1))
  log "[$built/${#binaries[@]}] $name built in $((SECONDS - t0))s"
}
build_one etcd go.etcd.io/etcd/server/v3
build_one kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build_one kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build_one kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build_one kubelet k8s.io/kubernetes/cmd/kubelet
build_one kube-proxy k8s.io/kubernetes/cmd/kube-proxy

log "[$((built + 1))/${#binaries[@]}] building kwok"
t0=$SECONDS
(
  cd "$mod/kwok"
  CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" go build -trimpath -ldflags "-s -w" -o "$staging/" \
    sigs.k8s.io/kwok/cmd/kwok
  # kwok acts only through Stage objects. Take the upstream "fast" node and
  # pod stages (plus node heartbeats, so the node lifecycle controller never
  # marks the node NotReady) from the module itself rather than copying them.
  kwok_dir="$(go mod download -json sigs.k8s.io/kwok | awk -F'"' '$2 == "Dir" { print $4 }')"
  for stage in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    cat "$kwok_dir/kustomize/stage/$stage"
  done >"$staging/kwok-stages.yaml"
)
log "[${#binaries[@]}/${#binaries[@]}] kwok built in $((SECONDS - t0))s"

rm -rf "$bin"
mv "$staging" "$bin"
echo "$stamp_value" >"$bin/.stamp"
log "built in $((SECONDS - start))s"
echo "$bin"
