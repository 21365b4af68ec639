#!/usr/bin/env bash
# Packs what a GPU machine lacks (it has torch/transformers/peft; no network) into .gpu/site.tar.xz,
# small enough to carry to it (64 MiB per call): Unsloth and its pinned companions for Python 3.12,
# boto3, gguf, and the llama.cpp bindings (their ctypes libraries are Python-version independent)
# plus llama.cpp's converter. Unpack there with: mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${FTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
PY312=${PY312:-$(ls /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | sed -n 1p)}
PY312=${PY312:-python3.12}
PKGS=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
  bitsandbytes==0.50.2 cut_cross_entropy==25.1.1 torchao==0.18.0 msgspec==0.22.0 tyro==1.0.17
  docstring_parser==0.18.0 typeguard==4.6.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0
  typing_inspection==0.4.5 typing_extensions==4.16.0 json5==0.17.3 nest_asyncio==1.6.0 structlog==26.1.0
  hf_transfer==0.1.9 fsspec==2026.2.0 boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
  gguf==0.19.0 diskcache==5.6.3)
SITE=.gpu/site
rm -rf "$SITE" && mkdir -p "$SITE" .gpu/wheels
for p in "${PKGS[@]}"; do
  ls .gpu/wheels | grep -i "^${p%%==*}-${p##*==}" >/dev/null 2>&1 ||
    "$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform any -d .gpu/wheels "$p"
done
"$PY312" -m pip install -q --no-deps --no-index --target "$SITE" .gpu/wheels/*.whl
rm -rf "$SITE"/studio "$SITE"/unsloth/studio "$SITE"/bin "$SITE"/hf_transfer*  # a web UI; no hub transfers offline
find "$SITE"/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cuda132*' ! -name '*cpu*' -delete
find "$SITE"/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} +
# llama.cpp bindings from the portable wheel built by hack/bootstrap.sh (it names the folder in $CACHE/env),
# and the converter
LLAMA_CPP_WHEELS=$(sed -n 's/^LLAMA_CPP_WHEELS=//p' "$CACHE/env")
python3 -m zipfile -e "$LLAMA_CPP_WHEELS"/llama_cpp_python-*.whl "$SITE"
rm -rf "$SITE"/lib "$SITE"/include  # the wheel's data copies of llama_cpp/lib and headers
cp -r "$CACHE/llama.cpp-0.3.36" "$SITE/llama.cpp-converter"
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
tar cJf .gpu/site.tar.xz -C "$SITE" .
du -sh "$SITE" .gpu/site.tar.xz
