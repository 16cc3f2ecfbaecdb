#!/usr/bin/env bash
# The one command that runs every test (the README's test command).
# It installs or starts whatever the tests need; nothing is done by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
