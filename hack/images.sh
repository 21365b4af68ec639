#!/usr/bin/env bash
# Builds the project's images on this machine with no registry and no daemon:
#   1. a Debian bookworm minbase root filesystem (mmdebstrap), kept as a tarball in the cache and
#      imported as localhost/fto/debian:bookworm-<recipe>; a Python base on top of it stands in for
#      python:*-slim-bookworm (Docker Hub is out of reach);
#   2. Dockerfile.operator on the Python base         -> localhost/finetune-operator/operator:dev
#   3. Dockerfile.trainer, CPU variant by build args  -> localhost/finetune-operator/trainer:cpu-dev
#      (Debian base, python3.11; torch from PyPI, since the CPU-only wheel index is not reachable here).
# Layers and images live under the project's cache (buildah --root), so a second run reuses every
# layer and only a changed source file rebuilds the last one.
#
#   hack/images.sh                 # build what is missing; print sizes and build times
#   hack/images.sh operator        # only the operator image (and its bases)
#   hack/images.sh --print-env     # only print the variables below
#
# Tests read $CACHE/images/images.env: FTO_BUILDAH_ROOT, FTO_BUILDAH_RUNROOT, FTO_OCI_RUNTIME, FTO_OPERATOR_IMAGE,
# FTO_TRAINER_IMAGE. Builds run under `nice`: the machine's cores are shared.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
# Python of the bases; the trainer's apt installs the same one (PYTHON build arg).
PYTHON=python3.11
PYTHON_PACKAGES="python3 python3-venv python-is-python3 ca-certificates"

HOST_CA=${FTO_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
CACHE=${FTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
DIR=$CACHE/images
STORE=$CACHE/containers/storage
RUNROOT=/run/finetune-operator-containers
# runc, not crun: crun 1.8 refuses this machine's hybrid cgroups ("cgroups in hybrid mode not
# supported, drop all controllers from cgroupv2": the unified hierarchy holds hugetlb).
RUNTIME=runc
OPERATOR_IMAGE=localhost/finetune-operator/operator:dev
TRAINER_IMAGE=localhost/finetune-operator/trainer:cpu-dev
mkdir -p "$DIR"

# The recipe's hash names the base images: a change of suite, mirror or packages makes new ones.
RECIPE=$(printf '%s\n' "$SUITE" "$MIRROR" "$SECURITY" "$PYTHON_PACKAGES" minbase-nodoc-1 | sha256sum | cut -c1-12)
DEBIAN_IMAGE=localhost/fto/debian:$SUITE-$RECIPE
PYTHON_IMAGE=localhost/fto/python:$SUITE-$RECIPE

write_env() {
  cat >"$DIR/images.env" <<ENV
FTO_BUILDAH_ROOT=$STORE
FTO_BUILDAH_RUNROOT=$RUNROOT
FTO_OCI_RUNTIME=$RUNTIME
FTO_OPERATOR_IMAGE=$OPERATOR_IMAGE
FTO_TRAINER_IMAGE=$TRAINER_IMAGE
ENV
}
if [[ ${1:-} == --print-env ]]; then write_env; cat "$DIR/images.env"; exit 0; fi
# One build at a time per cache (worktrees share it): a second run waits, then finds the layers built.
exec 9>"$DIR/.lock"
flock 9

bah() { nice -n 10 buildah --root "$STORE" --runroot "$RUNROOT" --storage-driver overlay "$@"; }
have_image() { bah inspect --type image "$1" >/dev/null 2>&1; }
timed() { # timed NAME CMD...: run, then record how long it took
  local name=$1 t0=$SECONDS; shift
  "$@"
  echo "images: $name took $((SECONDS - t0))s" | tee -a "$DIR/timings"
}

rootfs_tarball() {
  local tar=$DIR/debian-$SUITE-$RECIPE.tar
  [[ -s $tar ]] && return
  # minbase without docs, man pages or locales (copyright files stay): the same trim as Debian's
  # official slim images.
  nice -n 10 mmdebstrap --variant=minbase --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$tar.tmp" "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY $SUITE-security main"
  mv "$tar.tmp" "$tar"
}

debian_image() {
  have_image "$DEBIAN_IMAGE" && return
  rootfs_tarball
  local ctr; ctr=$(bah from scratch)
  bah add "$ctr" "$DIR/debian-$SUITE-$RECIPE.tar" /
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  bah commit --rm "$ctr" "$DEBIAN_IMAGE"
}

python_image() {
  have_image "$PYTHON_IMAGE" && return
  local ctr; ctr=$(bah from --pull=never "$DEBIAN_IMAGE")
  # shellcheck disable=SC2086 # the package list is words
  bah run --runtime "$RUNTIME" --network host "$ctr" -- sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends $PYTHON_PACKAGES && rm -rf /var/lib/apt/lists/*"
  bah commit --rm "$ctr" "$PYTHON_IMAGE"
}

build() { # build DOCKERFILE TAG BUILD-ARG...
  local file=$1 tag=$2; shift 2
  local args=()
  for a in "$@"; do args+=(--build-arg "$a"); done
  # --layers: every step is cached in the store (the Dockerfiles turn pip's own cache off, and the
  # pip of Debian's venv treats an empty PIP_NO_CACHE_DIR as "off" too); --pull=never: the bases
  # exist only here. This machine reaches PyPI through a TLS proxy whose CA only the host trusts:
  # pip in the build gets the host's bundle through root's pip.conf, mounted for the build only
  # (its empty mount point stays behind in /root, which the images' non-root users never read).
  mkdir -p "$DIR/pip-config"
  cp "$HOST_CA" "$DIR/pip-config/ca.crt"
  printf '[global]\ncert = /root/.config/pip/ca.crt\n' >"$DIR/pip-config/pip.conf"
  bah bud --runtime "$RUNTIME" --layers --pull=never --network host --format docker \
    -v "$DIR/pip-config:/root/.config/pip:ro" "${args[@]}" --force-rm \
    -f "$file" -t "$tag" .
}

size_of() { bah images --format '{{.Size}}' "$1" | sed -n 1p; }

timed "Debian $SUITE base ($DEBIAN_IMAGE)" debian_image
timed "Python base ($PYTHON_IMAGE)" python_image
timed "operator image ($OPERATOR_IMAGE)" build Dockerfile.operator "$OPERATOR_IMAGE" "PYTHON_IMAGE=$PYTHON_IMAGE"
if [[ ${1:-} != operator ]]; then
  timed "trainer image, CPU ($TRAINER_IMAGE)" build Dockerfile.trainer "$TRAINER_IMAGE" \
    "CUDA_IMAGE=$DEBIAN_IMAGE" "BUILD_IMAGE=$DEBIAN_IMAGE" "LLAMA_CPP_CUDA=-DGGML_CUDA=OFF" "PYTHON=$PYTHON"
fi
write_env
for img in "$DEBIAN_IMAGE" "$PYTHON_IMAGE" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
  if have_image "$img"; then echo "images: $img $(size_of "$img")"; fi  # the trainer's may be absent (operator only)
done
