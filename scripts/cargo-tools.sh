#!/usr/bin/env bash
# Installs the cargo subcommands CI uses (cargo-deny for licences, bans and sources;
# cargo-machete for unused dependencies) at pinned versions into a cache directory
# outside the repository, and prints that bin directory on stdout (progress on stderr).
# A warm cache makes this a no-op; a cold one compiles them from crates.io (a few
# minutes on 2 cores, see README "Testing").
#
# Environment: XDG_CACHE_HOME (cache root, default ~/.cache).
set -euo pipefail

DENY_VERSION=0.20.2
MACHETE_VERSION=0.9.2

root="${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/cargo-tools-deny-${DENY_VERSION}-machete-${MACHETE_VERSION}"
log() { echo "cargo-tools: $*" >&2; }

install() {
  local crate="$1" version="$2" bin="$3"
  if [[ -x "$root/bin/$bin" ]]; then return 0; fi
  log "installing $crate $version into $root (compiles from crates.io)"
  local start=$SECONDS
  # Its own target dir: never the workspace's, whose features and profile differ.
  CARGO_TARGET_DIR="$root/build" cargo install --locked --quiet --root "$root" "$crate" --version "$version"
  rm -rf "$root/build"
  log "$crate built in $((SECONDS - start))s"
}

mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
install cargo-deny "$DENY_VERSION" cargo-deny
install cargo-machete "$MACHETE_VERSION" cargo-machete
echo "$root/bin"
