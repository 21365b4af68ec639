#!/usr/bin/env bash
# Builds llama.cpp's shared libraries with CUDA for an H100/H200 (compute capability 9.0) on a machine
# with no GPU and no CUDA toolkit, and packs them for the GPU machine:
#
#   bench/build-llama-cuda.sh        # → .gpu/llama-cuda.tar.xz (libllama.so + libggml*.so.0, stripped)
#
# - llama.cpp: vendor/llama.cpp of the cached llama-cpp-python sdist (the commit its ctypes bindings
#   expect), built standalone: only libllama and the ggml libraries (no common, tools, examples, tests).
# - CUDA 13.0.2 from PyPI (the versions that torch 2.11's `cuda-toolkit==13.0.2` pins): nvcc, crt
#   headers, nvvm (cicc, libdevice), cccl, the runtime and cuBLAS, unpacked into one toolkit root
#   under the cache. The libraries link to libcudart.so.13, libcublas.so.13 and libcublasLt.so.13, the
#   sonames torch's cu130 wheels bring; GGML_CUDA_NO_VMM=ON keeps libcuda.so (the driver) out of the
#   link, so the driver is only needed at run time (CUDA 13.0 needs driver >= 580).
# - One architecture, sm_90 device code only (90-real: no PTX), FlashAttention kernels for the
#   default KV types (f16, bf16, q8_0, q4_0).
# On the GPU machine bench/gpu-run.sh eval unpacks it into /tmp/llama-cuda and sets
# LLAMA_CPP_LIB_PATH=/tmp/llama-cuda LD_LIBRARY_PATH=/tmp/llama-cuda:<dir of libcublas.so.13>.
# Cached and re-runnable: wheels, toolkit root and build tree live under the cache; a finished pack
# is rebuilt only when missing (FORCE=1 repacks it; the build tree makes that quick). The CUDA compile
# is 144 units: 25 min on 2 cores, 600 MB of wheels; JOBS (default 2) and NICE (default 19) set how
# hard it leans on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PY=0.3.36
CACHE=${FTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
JOBS=${JOBS:-2}
NICE=${NICE:-19}
PACK=.gpu/llama-cuda.tar.xz
export PIP_DISABLE_PIP_VERSION_CHECK=1

# CUDA 13.0.2 (Update 2) components, as cuda-toolkit==13.0.2 pins them; sha256 of each wheel.
WHEELS=(
  "nvidia-cuda-nvcc==13.0.88    56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
  "nvidia-cuda-crt==13.0.88     2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia-nvvm==13.0.88         c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
  "nvidia-cuda-cccl==13.0.85    e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
  "nvidia-cuda-runtime==13.0.96 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
  "nvidia-cublas==13.1.0.3      ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171"
)
WHEEL_DIR=$CACHE/cuda-13.0-wheels
TOOLKIT=$CACHE/cuda-13.0
SRC=$CACHE/llama.cpp-$LLAMA_CPP_PY-src-$(sha256sum hack/patch-llama-cpp.sh | cut -c1-8)  # names the source edits
BUILD=$CACHE/build/llama-cuda-$LLAMA_CPP_PY-sm90

if [[ -f $PACK && -z ${FORCE:-} ]]; then echo "$PACK exists (FORCE=1 rebuilds it)"; exit 0; fi

wheels() {
  mkdir -p "$WHEEL_DIR"
  local entry spec sha name ver f
  for entry in "${WHEELS[@]}"; do
    read -r spec sha <<<"$entry"
    name=${spec%%==*} ver=${spec##*==}
    f=$(compgen -G "$WHEEL_DIR/${name//-/_}-$ver-*.whl" | head -1 || true)
    if [[ -z $f ]]; then
      pip download -q --no-deps --only-binary=:all: -d "$WHEEL_DIR" "$spec"
      f=$(compgen -G "$WHEEL_DIR/${name//-/_}-$ver-*.whl" | head -1)
    fi
    echo "$sha  $f" | sha256sum -c --quiet
  done
}

toolkit() {  # one CUDA root: bin/nvcc, include/, lib64/ (with the unversioned .so links), nvvm/
  local stamp=$TOOLKIT/.assembled-$(printf '%s\n' "${WHEELS[@]}" | sha256sum | cut -c1-16)
  [[ -f $stamp ]] && return
  rm -rf "$TOOLKIT" "$TOOLKIT.tmp" && mkdir -p "$TOOLKIT.tmp"
  local entry spec name ver
  for entry in "${WHEELS[@]}"; do
    read -r spec _ <<<"$entry"
    name=${spec%%==*} ver=${spec##*==}
    python3 -m zipfile -e "$(compgen -G "$WHEEL_DIR/${name//-/_}-$ver-*.whl" | head -1)" "$TOOLKIT.tmp/whl"
  done
  mv "$TOOLKIT.tmp/whl/nvidia/cu13" "$TOOLKIT" && rm -rf "$TOOLKIT.tmp"
  chmod +x "$TOOLKIT"/bin/* "$TOOLKIT"/nvvm/bin/*  # zipfile drops the mode bits
  ln -s lib "$TOOLKIT/lib64"
  local lib
  for lib in cudart cublas cublasLt; do ln -sf "lib$lib.so.13" "$TOOLKIT/lib/lib$lib.so"; done
  ln -sf libnvvm.so.4 "$TOOLKIT/lib/libnvvm.so"
  "$TOOLKIT/bin/nvcc" --version | tail -2
  touch "$stamp"
}

source_tree() {  # vendor/llama.cpp of the sdist that bootstrap.sh caches
  [[ -f $SRC/CMakeLists.txt ]] && return
  local sdist=$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PY.tar.gz
  [[ -f $sdist ]] || pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$LLAMA_CPP_PY"
  rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
  tar xzf "$sdist" -C "$SRC.tmp" --strip-components=3 "llama_cpp_python-$LLAMA_CPP_PY/vendor/llama.cpp"
  hack/patch-llama-cpp.sh "$SRC.tmp"  # the same source edits as the CPU wheel's (exact GELU on the CPU backend)
  mv "$SRC.tmp" "$SRC"
}

build() {
  # The cmake flags: CUDA for sm_90 only; shared libs finding each other by $ORIGIN (as the wheel's do);
  # the CPU backend portable like the CPU wheel's (GGML_NATIVE=OFF); no libcuda.so link (NO_VMM);
  # no NCCL (one GPU); nothing but the libraries.
  PATH=$TOOLKIT/bin:$PATH CUDAToolkit_ROOT=$TOOLKIT cmake -S "$SRC" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_CUDA_COMPILER="$TOOLKIT/bin/nvcc" \
    -DCUDAToolkit_ROOT="$TOOLKIT" \
    -DCMAKE_CUDA_HOST_COMPILER=g++ \
    -DCMAKE_CUDA_ARCHITECTURES=90-real \
    -DGGML_CUDA=ON \
    -DGGML_CUDA_NO_VMM=ON \
    -DGGML_CUDA_NCCL=OFF \
    -DGGML_NATIVE=OFF \
    -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
  local t0=$SECONDS
  nice -n "$NICE" cmake --build "$BUILD" -j "$JOBS" --target llama
  echo "build: $((SECONDS - t0))s"
}

pack() {  # the file llama_cpp loads (libllama.so) and the sonames it needs, beside each other
  local stage
  stage=$(mktemp -d) && chmod 755 "$stage"
  cp -L "$BUILD/bin/libllama.so" "$stage/libllama.so"
  local lib
  for lib in ggml ggml-base ggml-cpu ggml-cuda; do cp -L "$BUILD/bin/lib$lib.so" "$stage/lib$lib.so.0"; done
  strip --strip-unneeded "$stage"/*.so*
  # The unversioned names too: the evaluation's torch head loads ggml-base by its base name, as
  # llama_cpp's loader does (libggml-base.so), beside LLAMA_CPP_LIB_PATH's libllama.so.
  for lib in ggml ggml-base ggml-cpu ggml-cuda; do ln -s "lib$lib.so.0" "$stage/lib$lib.so"; done
  # What they may need: each other, the CUDA 13 sonames torch's wheels bring, the C/C++ runtime.
  local needed
  needed=$(cd "$stage" && for lib in *.so.0 libllama.so; do readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; done | sort -u)
  echo "NEEDED: $(echo $needed)"
  if grep -Evq '^(libggml(-base|-cpu|-cuda)?\.so\.0|libcudart\.so\.13|libcublas(Lt)?\.so\.13|libc\.so\.6|libm\.so\.6|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libgomp\.so\.1|ld-linux-x86-64\.so\.2)$' <<<"$needed"; then
    echo "unexpected NEEDED entry" >&2; exit 1
  fi
  mkdir -p .gpu
  tar cf - --owner=0 --group=0 --sort=name -C "$stage" . | xz -9 -T1 >"$PACK.tmp" && mv "$PACK.tmp" "$PACK"
  rm -rf "$stage"
  ls -l "$PACK" && tar tvJf "$PACK"
}

wheels
toolkit
source_tree
build
pack
