#!/usr/bin/env bash
# Builds the pinned local-stack binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
# etcd, kwok, kwokctl, helm) from the Go module proxy into a cache outside the checkout, so that a
# fresh clone reuses them. No registry ships these binaries; a second run only prints versions.
#
#   hack/build-stack.sh            # build what is missing, print versions and build times
#   FTO_CACHE=/some/dir hack/...   # cache elsewhere
set -euo pipefail

K8S_VERSION=1.36.3
ETCD_VERSION=3.6.16
KWOK_VERSION=0.8.0
HELM_VERSION=3.21.4

CACHE=${FTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
BIN=$CACHE/bin
mkdir -p "$BIN" "$CACHE/build"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

step() { # step NAME OUTPUT CMD... : run CMD unless OUTPUT exists, print its duration
  local name=$1 done_file=$2 t0=$SECONDS; shift 2
  if [[ -s $done_file ]]; then echo "build: $name cached"; return; fi
  "$@"; echo "build: $name took $((SECONDS - t0))s"
}

# k8s.io/kubernetes and etcd's server pin their staging modules to v0.0.0 with replace directives,
# which `go install` refuses; a wrapper module replaces each with the published tag instead.
wrapper_module() { # wrapper_module DIR MODULE VERSION STAGING_PREFIX STAGING_VERSION
  local dir=$1 mod=$2 ver=$3 prefix=$4 sver=$5
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init wrapper >/dev/null 2>&1
  local gomod; gomod=$(go mod download -json "$mod@$ver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  for m in $(awk -v p="$prefix" '$1 ~ p && $2 == "v0.0.0" {print $1}' "$gomod"); do
    go mod edit -replace="$m=$m@$sver"
  done
}

build_k8s() {
  local out=$BIN/k8s-$K8S_VERSION
  wrapper_module "$CACHE/build/k8s" k8s.io/kubernetes "v$K8S_VERSION" '^k8s\\.io/' "v0.${K8S_VERSION#1.}"
  go get k8s.io/kubernetes@"v$K8S_VERSION" >/dev/null 2>&1
  local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION"
  ld+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  mkdir -p "$out.tmp"
  go build -ldflags "$ld" -o "$out.tmp/" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_etcd() {
  local out=$BIN/etcd-$ETCD_VERSION
  # etcd's server module is itself the `etcd` main package; its go.mod already requires tagged
  # siblings but replaces them with relative paths, which `go install` refuses. A bare wrapper
  # module that requires it (no replace lines needed) builds it.
  local dir=$CACHE/build/etcd
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
  go mod init wrapper >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" 2>get.log || { cat get.log; return 1; }
  mkdir -p "$out.tmp"
  go build -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_go_install() { # build_go_install NAME VERSION PKG...
  local name=$1 ver=$2; shift 2
  local out=$BIN/$name-$ver
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" go install -ldflags "-s -w" "$@"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_kwok() {
  local out=$BIN/kwok-$KWOK_VERSION
  [[ -x $out/kwokctl ]] || build_go_install kwok "$KWOK_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION"
  # The kwok controller run on its own refuses to start without stages; kwokctl would embed these
  # defaults (node init + lease heartbeat, pod ready/complete/delete), so ship the same files.
  local src
  src=$(go mod download -json "sigs.k8s.io/kwok@v$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  mkdir -p "$out/stages.tmp"
  cp "$src"/kustomize/stage/node/fast/node-initialize.yaml \
    "$src"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    "$src"/kustomize/stage/pod/fast/pod-{ready,complete,delete}.yaml "$out/stages.tmp/"
  chmod u+w "$out"/stages.tmp/*
  rm -rf "$out/stages" && mv "$out/stages.tmp" "$out/stages"
}

step "kube-apiserver/controller-manager/scheduler v$K8S_VERSION" "$BIN/k8s-$K8S_VERSION/kube-scheduler" build_k8s
step "etcd v$ETCD_VERSION" "$BIN/etcd-$ETCD_VERSION/etcd" build_etcd
step "kwok v$KWOK_VERSION" "$BIN/kwok-$KWOK_VERSION/stages/pod-delete.yaml" build_kwok
step "helm v$HELM_VERSION" "$BIN/helm-$HELM_VERSION/helm" build_go_install helm "$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"

cat >"$BIN/versions.env" <<VERS
K8S_BIN=$BIN/k8s-$K8S_VERSION
ETCD_BIN=$BIN/etcd-$ETCD_VERSION
KWOK_BIN=$BIN/kwok-$KWOK_VERSION
HELM_BIN=$BIN/helm-$HELM_VERSION
VERS
"$BIN/k8s-$K8S_VERSION/kube-apiserver" --version
# sed, not head: head exits after one line, the writer dies of SIGPIPE, and pipefail fails the
# build with 141 whenever the writer had not finished first.
"$BIN/etcd-$ETCD_VERSION/etcd" --version | sed -n 1p
"$BIN/kwok-$KWOK_VERSION/kwok" --version 2>&1 | sed -n 1p
"$BIN/helm-$HELM_VERSION/helm" version --short
