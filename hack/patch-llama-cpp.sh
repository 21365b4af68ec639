#!/usr/bin/env sh
# Edits an unpacked llama.cpp source tree (llama-cpp-python's vendor/llama.cpp) before it is built;
# used by hack/bootstrap.sh, Dockerfile.trainer and bench/build-llama-cuda.sh so every build is the same.
#
#   hack/patch-llama-cpp.sh <llama.cpp source dir>
#
# Exact GELU on the CPU. ggml's CPU backend computes GELU (Gemma's FFN activation) by rounding its input
# to f16 and reading a 64k-entry table, even for f32 tensors. That rounding moves a real Gemma 3 270M's
# per-request log-likelihood by a few thousandths of a nat, up to 0.02, against the same float32 weights
# in PyTorch: most of what separated the evaluation from lm-eval's reference on the CPU
# (docs/evaluation.md). Computed in f32 (tanh per element) it costs nothing measurable beside the
# matmuls. CUDA's GELU is f32 already. The script fails if the line it edits is gone, rather than
# building an unpatched library silently.
set -eu
src=${1:?usage: hack/patch-llama-cpp.sh <llama.cpp source dir>}
vec=$src/ggml/src/ggml-cpu/vec.h
if grep -q '^// finetune-operator: exact GELU' "$vec"; then exit 0; fi
grep -q '^#define GGML_GELU_FP16$' "$vec" || { echo "patch-llama-cpp: no '#define GGML_GELU_FP16' in $vec" >&2; exit 1; }
sed -i 's|^#define GGML_GELU_FP16$|// finetune-operator: exact GELU (hack/patch-llama-cpp.sh)|' "$vec"
