#!/usr/bin/env bash
# Runs the GPU leg on a GPU machine (Python 3.12, torch/transformers/peft preinstalled, no network),
# with what bench/gpu-site.sh packed carried along in .gpu/. Results go to $OUT (or ./gpu-out).
#
#   bench/gpu-run.sh proof   # `finetune run` (Unsloth LoRA bf16 and QLoRA 4-bit) → GGUF → parity → S3
#   bench/gpu-run.sh bench   # bench/train_throughput.py: project path vs transformers+peft
#   bench/gpu-run.sh tests   # pytest -m gpu
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-proof}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$MODE.log") 2>&1
t0=$SECONDS

mkdir -p /tmp/site /tmp/tok
[[ -f /tmp/site/.unpacked ]] || { tar xJf .gpu/site.tar.xz -C /tmp/site && touch /tmp/site/.unpacked; }
for whl in .gpu/extra/*.whl; do [[ -f $whl ]] && python3 -m zipfile -e "$whl" /tmp/site; done  # late additions
[[ -f /tmp/tok/tokenizer.model || $MODE == tests ]] || tar xJf .gpu/tokenizer.tar.xz -C /tmp/tok
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/trainer-image:$PWD/hack
export LLAMA_CPP_CONVERTER_DIR=/tmp/site/llama.cpp-converter
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "setup: $((SECONDS - t0))s"

model_dir=/tmp/gemma3-270m-random
# A random-init model of Gemma 3 270M's exact shape, with the real tokenizer (the shape is what matters).
[[ $MODE == tests ]] || python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
import train_throughput as t; t.make_model_dir(Path('$model_dir'), Path('/tmp/tok'))"

case $MODE in
proof)
  xz -dc .gpu/weed.xz >/tmp/weed && chmod +x /tmp/weed
  export AWS_ACCESS_KEY_ID=gpuproof AWS_SECRET_ACCESS_KEY=gpuproof-secret-0123456789
  mkdir -p /tmp/s3data
  /tmp/weed mini -dir=/tmp/s3data -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false -webdav=false \
    -s3.port=18333 -master.port=19333 -volume.port=18080 -filer.port=18888 >/tmp/weed.log 2>&1 &
  for _ in $(seq 60); do curl -s -o /dev/null http://127.0.0.1:18333 && break; sleep 1; done
  python3 -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:18333', region_name='us-east-1').create_bucket(Bucket='models')"
  for method in lora qlora; do
    cat >/tmp/ftj-$method.yaml <<YAML
apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {name: gpu-$method, namespace: h100}
spec:
  baseModel: {uri: $model_dir}
  dataset: {source: $PWD/examples/demo/codename.jsonl, format: messages}
  training: {method: $method, maxSteps: 30, batchSize: 8, maxSeqLength: 512, learningRate: 0.0005}
  export: {gguf: [f16, q8_0, q4_k_m], paritySamples: 8}
  output: {s3: {bucket: models, endpoint: "http://127.0.0.1:18333", forcePathStyle: true}}
YAML
    s=$SECONDS
    timeout 280 python3 -m finetune_trainer run --config /tmp/ftj-$method.yaml --workdir /tmp/work-$method
    echo "finetune run ($method): exit $? in $((SECONDS - s))s"
    find /tmp/work-$method -name 'train-log.jsonl' -exec cp {} "$OUT/train-log-$method.jsonl" \;
  done
  OUT=$OUT python3 - <<'PY'
import boto3, hashlib, json
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:18333", region_name="us-east-1")
for method in ("lora", "qlora"):
    try:
        key = f"finetune/h100/gpu-{method}/run-1/manifest.json"
        m = json.loads(s3.get_object(Bucket="models", Key=key)["Body"].read())
    except Exception as exc:  # noqa: BLE001
        print(method, "no manifest:", exc); continue
    json.dump(m, open(f"{__import__('os').environ['OUT']}/manifest-{method}.json", "w"), indent=1)
    for a in m["artifacts"]:
        key = a["uri"].split("s3://models/", 1)[1]
        body = s3.get_object(Bucket="models", Key=key)["Body"].read()
        ok = hashlib.sha256(body).hexdigest() == a["sha256"] and len(body) == a["sizeBytes"]
        print(f"{method:6} {a['name']:<45} {a['sizeBytes']:>12,} {'checksum ok' if ok else 'MISMATCH'}")
PY
  ;;
bench)
  timeout 560 python3 bench/train_throughput.py --model-dir $model_dir --out "$OUT/bench.jsonl" \
    --configs "${CONFIGS:-baseline,project,project-nogc,project-b4x-nogc}" --seq "${SEQ:-2048}" --steps 15 --warmup 4
  ;;
tests)
  # The tests' own fixtures: the rebuilt Gemma 3 tokenizer in the model cache, `weed` on PATH.
  export FTO_CACHE=/tmp/fto-cache && mkdir -p $FTO_CACHE/models /tmp/bin
  tar xJf .gpu/tokenizer-v2.tar.xz -C $FTO_CACHE/models
  xz -dc .gpu/weed.xz >/tmp/bin/weed && chmod +x /tmp/bin/weed && export PATH=/tmp/bin:$PATH
  timeout 540 python3 -m pytest -m gpu tests/test_trainer_gpu.py -v -p no:cacheprovider -o addopts="" 2>&1 | tail -40
  ;;
esac
echo "total: $((SECONDS - t0))s"
