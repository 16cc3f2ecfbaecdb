#!/usr/bin/env bash
# A longer property-test campaign over every parser that sees a peer's input
# (Twilio stream frames, webhook forms, the signature URL builder, call contexts,
# SSE, Deepgram and ElevenLabs messages, the chunker, persona and routes files,
# durations, dial limits, phone numbers, the call API's timing fields).
#
# It runs the same property tests `cargo test` runs (one definition of each
# property), with PROPTEST_CASES cases each instead of proptest's default 256.
# A failure is shrunk and written to the test's proptest-regressions file, so the
# finding replays in every later `cargo test`.
#
# Usage: scripts/parser-campaign.sh [CASES]   (default 100000)
set -euo pipefail
cases="${1:-100000}"
cd "$(dirname "$0")/.."
export PROPTEST_CASES="$cases"
echo "parser campaign: $cases cases per property" >&2
start=$(date +%s)
cargo test -p voice-pod --lib -- never_panic without_panic never_a_panic losslessly \
  --test-threads 2
echo "campaign wall time: $(( $(date +%s) - start )) s" >&2
