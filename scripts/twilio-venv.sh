#!/usr/bin/env bash
# Creates (once) a test-only Python virtualenv holding Twilio's official helper
# library, used by tests/tests/twilio_signature.rs to compute reference
# X-Twilio-Signature values. It lives in a cache directory outside the repo so the
# checkout stays clean; delete it to force a fresh install.
#
# Prints the path of the venv's python on stdout (logs go to stderr).
set -euo pipefail

venv="${CALLMEBACK_TWILIO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/twilio-venv}"
python="$venv/bin/python"

if [ -x "$python" ] && "$python" -c 'import twilio.request_validator' 2>/dev/null; then
    echo "$python"
    exit 0
fi

# A lock, so parallel test binaries do not build the same venv twice.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if ! { [ -x "$python" ] && "$python" -c 'import twilio.request_validator' 2>/dev/null; }; then
    echo "twilio-venv: creating $venv" >&2
    # A bare Debian machine has no python3 or lacks its venv module (python3-venv).
    if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        echo "twilio-venv: installing python3 and python3-venv" >&2
        (apt-get update -qq && apt-get install -y -qq python3 python3-venv) >&2
    fi
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$python" -m pip install --quiet --disable-pip-version-check 'twilio>=9,<10' >&2
fi
echo "$python"
