#!/usr/bin/env bash
# What a real node beside the kwok nodes needs (devstack.realnode starts it; tests/test_real_node.py):
#   - kubelet v$K8S_VERSION, built from the same wrapper module hack/build-stack.sh builds the control
#     plane from (so the same Kubernetes source tree), cached in $CACHE/bin/kubelet-$K8S_VERSION;
#   - containerd and the CNI plugins from Debian (apt);
#   - a pause image for pod sandboxes, compiled from that tree's build/pause/linux/pause.c (the
#     registry that serves registry.k8s.io/pause is out of reach), kept in the buildah store.
# Idempotent: a second run only checks. Needs hack/build-stack.sh and hack/images.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.36.3
CACHE=${FTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
OUT=$CACHE/bin/kubelet-$K8S_VERSION
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

packages() {
  local missing=() cmd
  for cmd in containerd ctr; do command -v "$cmd" >/dev/null || missing+=(containerd); done
  [[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
  ((${#missing[@]} == 0)) && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

kubelet() {
  [[ -x $OUT/kubelet ]] && return
  local mod=$CACHE/build/k8s minor=${K8S_VERSION#1.}
  [[ -f $mod/go.mod ]] || { echo "real-node: $mod is missing: run hack/build-stack.sh first" >&2; return 1; }
  minor=${minor%%.*}
  mkdir -p "$OUT.tmp"
  (cd "$mod" && nice -n 10 go build -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
    -o "$OUT.tmp/" k8s.io/kubernetes/cmd/kubelet)
  rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
}

pause_image() {
  # shellcheck disable=SC1091
  source "$CACHE/images/images.env"
  local b=(buildah --root "$FTO_BUILDAH_ROOT" --runroot "$FTO_BUILDAH_RUNROOT" --storage-driver overlay)
  "${b[@]}" inspect --type image localhost/fto/pause:3.6 >/dev/null 2>&1 && return
  local src tmp ctr
  src=$(cd "$CACHE/build/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
  tmp=$(mktemp -d)
  gcc -Os -static -DVERSION=3.6-local -o "$tmp/pause" "$src"
  ctr=$("${b[@]}" from scratch)
  "${b[@]}" copy "$ctr" "$tmp/pause" /pause
  "${b[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  "${b[@]}" commit --rm "$ctr" localhost/fto/pause:3.6
  rm -rf "$tmp"
}

t0=$SECONDS
packages
kubelet
pause_image
echo "real-node: kubelet $("$OUT/kubelet" --version), $(containerd --version | cut -d' ' -f3) ($((SECONDS - t0))s)"
