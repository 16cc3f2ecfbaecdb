#!/usr/bin/env bash
# Builds the container images the real test node (tests/src/node.rs) runs, as
# OCI image archives, without a container engine: each image is one layer
# holding the binary, the shared libraries `ldd` lists for it, the CA bundle
# and an /etc/passwd naming uid 65532. The node imports them into its
# containerd under exactly the names the chart (appVersion) and a
# VoiceDeployment (spec.image default) use, so `imagePullPolicy: IfNotPresent`
# never pulls. Also builds the pod sandbox ("pause") image from the pause.c
# of the pinned Kubernetes module, since the node has no registry to pull from.
#
# Usage: scripts/node-images.sh BIN_DIR
#   BIN_DIR holds voice-pod and voice-operator (a debug or a release build).
# Prints the directory holding the archives (*.oci.tar) on stdout; progress
# goes to stderr. Archives are cached, keyed by everything that shapes them
# (binary and library contents, this script).
#
# The Dockerfile's images differ only in the base layer: distroless/cc-debian12
# (glibc, libgcc, CA certificates, passwd) there, the host's own copies of the
# same files here.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
log() { echo "node-images: $*" >&2; }

bin_dir="${1:?usage: scripts/node-images.sh BIN_DIR}"
bin_dir="$(cd "$bin_dir" && pwd)"
version="$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2; exit }' "$repo/charts/callmeback/Chart.yaml")"
[[ -n "$version" ]] || { log "cannot read appVersion from charts/callmeback/Chart.yaml"; exit 1; }
# The names the chart and the VoiceDeployment default pull.
pod_image="ghcr.io/callmeback/voice-pod:$version"
operator_image="ghcr.io/callmeback/voice-operator:$version"
# The same operator under the next release's tag: the real-node upgrade test
# (tests/tests/node_e2e.rs) moves the chart's image tag to it, as a release would.
operator_next_image="ghcr.io/callmeback/voice-operator:$version-next"
# The node's containerd is configured with this sandbox image (tests/src/node.rs).
pause_image="callmeback.test/pause:3.10"
ca_bundle=/etc/ssl/certs/ca-certificates.crt

k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$repo/tests/controlplane/go.mod")"
pause_c="$(cd "$repo/tests/controlplane" && go mod download -json "k8s.io/kubernetes@$k8s_version" | awk -F'"' '$2 == "Dir" { print $4 }')/build/pause/linux/pause.c"
[[ -f "$pause_c" ]] || { log "no pause.c in the Kubernetes module ($pause_c)"; exit 1; }
[[ -f "$ca_bundle" ]] || { log "no CA bundle at $ca_bundle (install ca-certificates)"; exit 1; }
command -v gcc >/dev/null || { log "gcc is needed to build the pause image"; exit 1; }

sha() { sha256sum "$1" | cut -d' ' -f1; }
libs_of() { # <binary>: the libraries and loader ldd lists, by the paths the loader uses
  ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

for name in voice-pod voice-operator; do
  [[ -x "$bin_dir/$name" ]] || { log "no $bin_dir/$name (build it first: cargo build -p $name)"; exit 1; }
done
# One directory per set of inputs: every file that ends up in an image, the
# pause source, the compiler and this script. Worktrees with different
# binaries then never overwrite each other's archives.
key="$(
  {
    for name in voice-pod voice-operator; do
      sha "$bin_dir/$name"
      libs_of "$bin_dir/$name" | while read -r lib; do sha "$(readlink -f "$lib")"; done
    done
    sha "$ca_bundle"
    sha "$pause_c"
    gcc --version | head -1
    sha "$0"
  } | sha256sum | cut -c1-16
)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/node-images"
out="$cache/$key"
if [[ -f "$out/.complete" ]]; then
  touch "$out/.complete"
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
# Archives nobody used for two days are stale builds.
find "$cache" -mindepth 1 -maxdepth 1 -type d -mtime +2 -exec rm -rf {} + 2>/dev/null || true

work="$(mktemp -d "${TMPDIR:-/tmp}/node-images.XXXXXX")"
trap 'rm -rf "$work"' EXIT
staging="$work/out"
mkdir -p "$staging"

# The files of one rootfs: the binary, its libraries (with the paths the
# loader looks them up under), the CA bundle, passwd/group for uid 65532.
stage_rootfs() { # <rootfs> <binary> <path in image>
  local root="$1" binary="$2" dest="$3" lib
  install -D -m 0755 "$binary" "$root$dest"
  for lib in $(libs_of "$binary"); do
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
  install -D -m 0644 "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
  mkdir -p "$root/etc" "$root/tmp"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
}

# Writes <staging>/<file>.oci.tar: an OCI image layout with one uncompressed
# layer and the containerd image-name annotation `ctr images import` uses.
write_image() { # <rootfs> <image name> <file> <config JSON "config" object>
  local root="$1" name="$2" file="$3" config="$4" layout="$work/layout-$3"
  mkdir -p "$layout/blobs/sha256"
  # Reproducible layer: sorted, root-owned, epoch timestamps.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$work/layer.tar" .
  local layer_digest layer_size
  layer_digest="$(sha "$work/layer.tar")"
  layer_size="$(stat -c %s "$work/layer.tar")"
  mv "$work/layer.tar" "$layout/blobs/sha256/$layer_digest"
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$config" "$layer_digest" >"$work/config.json"
  local config_digest config_size
  config_digest="$(sha "$work/config.json")"
  config_size="$(stat -c %s "$work/config.json")"
  mv "$work/config.json" "$layout/blobs/sha256/$config_digest"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$work/manifest.json"
  local manifest_digest manifest_size
  manifest_digest="$(sha "$work/manifest.json")"
  manifest_size="$(stat -c %s "$work/manifest.json")"
  mv "$work/manifest.json" "$layout/blobs/sha256/$manifest_digest"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest_digest" "$manifest_size" "$name" "${name##*:}" >"$layout/index.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$layout" -cf "$staging/$file.oci.tar" .
  rm -rf "$layout"
}

user_config() { # <entrypoint> <cmd> <ports JSON>
  printf '{"User":"65532:65532","Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Entrypoint":["%s"],"Cmd":["%s"],"ExposedPorts":%s,"WorkingDir":"/"}' "$1" "$2" "$3"
}

for spec in "voice-pod|voice-pod|$pod_image|serve|{\"8080/tcp\":{},\"9090/tcp\":{}}" \
  "voice-operator|voice-operator|$operator_image|run|{\"8080/tcp\":{}}" \
  "voice-operator|voice-operator-next|$operator_next_image|run|{\"8080/tcp\":{}}"; do
  IFS='|' read -r name file image cmd ports <<<"$spec"
  log "building $image from $bin_dir/$name"
  rm -rf "$work/rootfs"
  stage_rootfs "$work/rootfs" "$bin_dir/$name" "/usr/local/bin/$name"
  write_image "$work/rootfs" "$image" "$file" "$(user_config "/usr/local/bin/$name" "$cmd" "$ports")"
done

# The sandbox image: pause.c built static as upstream does, run as 65535 as upstream does.
log "building $pause_image from $pause_c"
gcc -Os -static -DVERSION="callmeback-$k8s_version" -o "$work/pause" "$pause_c"
rm -rf "$work/rootfs"
install -D -m 0755 "$work/pause" "$work/rootfs/pause"
write_image "$work/rootfs" "$pause_image" pause '{"User":"65535:65535","Entrypoint":["/pause"],"WorkingDir":"/"}'

# Two callers with the same inputs build the same bytes; the first rename wins.
touch "$staging/.complete"
mv -T "$staging" "$out" 2>/dev/null || [[ -f "$out/.complete" ]]
echo "$out"
