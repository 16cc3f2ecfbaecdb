#!/usr/bin/env bash
# Builds Prometheus' promtool and server from the Go module pinned in
# tests/prometheus/ into a cache directory outside the repository keyed by the
# pinned version. The tests use them for the alert-rule unit tests
# (`promtool test rules`), the /metrics lint (`promtool check metrics`) and the
# dashboard preview (a real Prometheus scraping a benchmark). A warm cache makes
# this a no-op; a cold one takes about 13 minutes (see README, "Testing").
#
# Prints the binary directory on stdout (all progress goes to stderr), so
# callers can do: BIN=$(scripts/prometheus-build.sh)
#
# Environment:
#   CALLMEBACK_PROMETHEUS_BIN  use this directory instead of the default cache
#   XDG_CACHE_HOME             cache root (default ~/.cache)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
mod="$repo/tests/prometheus"

log() { echo "prometheus-build: $*" >&2; }

command -v go >/dev/null || { log "go is not installed (needed to build Prometheus)"; exit 1; }

# The version comes from go.mod alone, so the cache key needs no network.
# Prometheus 3.x is tagged v0.3MM.P on the module proxy: v0.316.0 is 3.16.0.
module_version="$(awk '$1 == "github.com/prometheus/prometheus" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
[[ "$module_version" =~ ^v0\.3([0-9][0-9])\.([0-9]+)$ ]] || { log "cannot read a 3.x version of github.com/prometheus/prometheus from $mod/go.mod"; exit 1; }
version="3.$((10#${BASH_REMATCH[1]})).${BASH_REMATCH[2]}"

bin="${CALLMEBACK_PROMETHEUS_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/prometheus-${version}/bin}"
binaries=(promtool prometheus)

# The stamp records exactly what was built; a changed go.mod/go.sum or build
# recipe (this script) rebuilds even when the version key stayed the same.
stamp_value="$(cat "$mod/go.mod" "$mod/go.sum" "$0" | sha256sum | cut -d' ' -f1)"

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

log "building Prometheus $version (module $module_version) into $bin (a cold build took 13 minutes on 2 busy cores; warm is a no-op)"
start=$SECONDS

# What the release builds stamp (.promu.yml), so `promtool --version` tells the truth.
ldflags="-s -w"
ldflags+=" -X github.com/prometheus/common/version.Version=$version"
ldflags+=" -X github.com/prometheus/common/version.Branch=HEAD"
ldflags+=" -X github.com/prometheus/common/version.BuildUser=callmeback"
ldflags+=" -X github.com/prometheus/common/version.BuildDate=19700101-00:00:00"

# Tags: remove_all_sd leaves only the file and http service discovery (the tests
# use static targets), sparing the cloud SDKs; builtinassets is left out, so the
# web UI's assets are neither needed nor built (the HTTP API works without them).
# CGO off, as in the release builds (netgo), and no C toolchain needed.
# -mod=readonly: go.sum is committed and must match.
staging="$(dirname "$bin")/.bin.tmp.$$"
rm -rf "$staging"
mkdir -p "$staging"
trap 'rm -rf "$staging"' EXIT
for b in "${binaries[@]}"; do
  log "building $b"
  t=$SECONDS
  (
    cd "$mod"
    CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" go build -trimpath -tags remove_all_sd \
      -ldflags "$ldflags" -o "$staging/$b" "github.com/prometheus/prometheus/cmd/$b"
  )
  log "built $b in $((SECONDS - t))s"
done

rm -rf "$bin"
mv "$staging" "$bin"
echo "$stamp_value" >"$bin/.stamp"
log "built in $((SECONDS - start))s"
echo "$bin"
