"""The seed scenario, timed end to end: what a user feels from `kubectl apply` to a GGUF in S3.

    python bench/seed_scenario.py --model-dir /tmp/gemma3-270m-random --out /tmp/seed   # on the GPU machine
    bench/gpu-run.sh seed                                                              # the same, packed

1. Makes alpaca-shaped rows deterministically (no network): instruction / optional input / output of
   English-like words, whole-row lengths lognormal like alpaca-cleaned's (p50 ~139, p99 ~671 tokens
   with Gemma's tokenizer and chat template; the prepare report prints what they came out as).
2. Runs `finetune run` as the training pod would (a fresh process and workdir, S3 on loopback):
   Gemma 3 270M shape, random init, real tokenizer; --epochs (2), packing, micro-batch auto, seq 2048,
   q4_k_m. Then the spec edit of the seed's second step — epochs 4, learningRate 1e-5 — as run 2 of
   the same FinetuneJob (a new pod: a fresh workdir; only S3 carries the caches over).
3. The same scenario the way a user does it without this project, in its own process: TRL's
   SFTTrainer + PEFT (bf16 LoRA r16 on all projections, packing, gradient checkpointing, 8 x 4
   accumulation = the same ~65k tokens a step), then llama.cpp's converter (f16) and quantizer
   (q4_k_m). Where the full baseline would not fit the time limit, it trains --baseline-steps steps
   and extrapolates the rest of the epochs from its steady step time: the output says so.

Prints each run's phase breakdown from process start to manifest.json in S3 (imports, prepare, load,
first step, steps, save, export parts, upload), cache hit/miss, and the end-to-end ratio to the
baseline measured in the same invocation. Results: <out>/seed.json (+ logs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 51_760  # alpaca-cleaned's size
# Whole-row token lengths of alpaca-cleaned with Gemma's chat template, as lognormal(median, sigma):
# p50 139, p99 671 → sigma = ln(671 / 139) / 2.326 ≈ 0.68.
MEDIAN_TOKENS, SIGMA, MIN_TOKENS, MAX_TOKENS = 139, 0.68, 24, 2048
TOKENS_PER_WORD = 1.0  # these words are ~1 Gemma token each (4,000 rows measured: p50 137, p99 ~700, mean 177)
TEMPLATE_TOKENS = 14  # <bos><start_of_turn>user\n … <end_of_turn>\n<start_of_turn>model\n … <end_of_turn>\n
_WORD_TEXT = (
    "the of and to in is that for it as with was on be by this are from or have an they which one you were "
    "all we her she there would their will when who him been has more if no out do so can what up said "
    "about other into than its time only could new them man some these then two first may any like now "
    "my such make over our even most me state after also made many did must before back see through way "
    "where get much go well your know should down work year because come people just say each those take "
    "day good how long little own great under last right old life very world still between never place "
    "same another while might us part without found again water number small city write answer explain "
    "describe list example create give three reasons summarize following sentence paragraph word change "
    "language function data value model system process result question simple short story poem color "
    "country history science energy health food plant animal computer program code table report"
)
WORDS = _WORD_TEXT.split()
INSTRUCTIONS = ("Explain", "Describe", "Give three examples of", "Summarize", "Write a short story about",
                "List the steps to", "Rewrite the following sentence about", "Classify", "Compare",
                "Generate a title for")


# ------------------------------------------------------------------------------------ data
def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose rendered length follows alpaca-cleaned's distribution; same seed, same rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    totals = np.clip(rng.lognormal(math.log(MEDIAN_TOKENS), SIGMA, size=n), MIN_TOKENS, MAX_TOKENS)
    has_input = rng.random(n) < 0.4  # ~40 % of alpaca rows carry an input
    rows = []
    vocab = np.array(WORDS)
    for i in range(n):
        words = max(6, int((totals[i] - TEMPLATE_TOKENS) / TOKENS_PER_WORD))
        n_instr = int(min(max(4, words * 0.15), 40))
        n_input = int(words * 0.25) if has_input[i] else 0
        n_out = max(2, words - n_instr - n_input)
        pick = vocab[rng.integers(0, len(vocab), size=n_instr + n_input + n_out)]
        lead = INSTRUCTIONS[int(rng.integers(0, len(INSTRUCTIONS)))]
        rows.append({"instruction": f"{lead} {' '.join(pick[:n_instr])}.",
                     "input": " ".join(pick[n_instr:n_instr + n_input]),
                     "output": " ".join(pick[n_instr + n_input:]).capitalize() + "."})
    return rows


def write_data(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed)))
    return path


# --------------------------------------------------------------------------- the project's run
MARKS = {  # log line → the moment it marks
    "prepare": re.compile(r"== stage Preparing"),
    "train": re.compile(r"== stage Training"),
    "loaded": re.compile(r"training config: "),
    "export": re.compile(r"== stage Exporting"),
    "upload": re.compile(r"== stage Uploading"),
    "finished": re.compile(r"run finished: manifest.json"),  # in S3, and the status says so
}


def spec_for(args, data: Path, epochs: float, learning_rate: float) -> dict:
    return {
        "baseModel": {"uri": str(args.model_dir)},
        "dataset": {"source": str(data), "format": "alpaca"},
        "training": {"method": "lora", "epochs": epochs, "learningRate": learning_rate, "packing": True,
                     "maxSeqLength": args.seq, "batchSize": "auto", "lora": {"r": 16, "alpha": 16}},
        "export": {"gguf": ["q4_k_m"]},
        "output": {"s3": {"bucket": args.bucket, "endpoint": args.endpoint, "forcePathStyle": True,
                          "prefix": "finetune"}},
    }


def local_compile_caches() -> list[str]:
    """Each compiler's cache on this machine, as torch and Unsloth name them: Unsloth unsets
    TORCHINDUCTOR_CACHE_DIR at import, and keeps its torch.compile bundle in ~/.cache. Left on the
    machine, those made every run after the machine's first compile as if its cache had hit."""
    import getpass
    import tempfile

    return [os.environ.get("FINETUNE_COMPILE_CACHE_DIR") or f"{tempfile.gettempdir()}/finetune-compile-cache",
            f"{tempfile.gettempdir()}/torchinductor_{getpass.getuser()}",
            str(Path.home() / ".triton" / "cache"), str(Path.home() / ".cache" / "unsloth" / "mega_cache"),
            "unsloth_compiled_cache"]


def run_project(args, spec: dict, run: int, out: Path) -> dict:
    """`finetune run` on run <run> of FinetuneJob bench/seed, in a fresh process and workdir."""
    sys.path[:0] = [str(ROOT / "operator")]
    from finetune_api import RunConfig
    from finetune_api.runconfig import RunRef
    from finetune_api.spec import FinetuneJobSpec

    cfg = RunConfig.build(FinetuneJobSpec.model_validate(spec), RunRef(namespace="bench", name="seed", run=run))
    workdir = Path(args.workdir_root) / f"run-{run}"
    # A new pod: no workdir, and no compile caches on local disk (only what S3 keeps).
    subprocess.run(["rm", "-rf", str(workdir), *local_compile_caches()], check=True)
    if args.forget_trained:  # the same spec run again must train and export again, not reuse both
        forget_trained(args, cfg.output_uri)
    workdir.mkdir(parents=True)
    config = workdir.parent / f"run-{run}.yaml"
    config.write_text(cfg.to_yaml())
    marks: dict[str, float] = {}
    steps: list[float] = []
    t0 = time.monotonic()
    residency = [sys.executable, str(ROOT / "bench" / "page_residency.py")]
    if args.residency:  # what of the GPU libraries a cold machine had to read during this run
        subprocess.run([*residency, "snapshot", str(out / f"residency-run{run}-before.json")], check=False)
    # Optionally with every thread's stack sampled (bench/stack_sampler.py): where a slow phase spends it.
    sampler = [str(ROOT / "bench" / "stack_sampler.py"), str(out / f"stacks-run{run}.txt"), str(args.stacks)] \
        if args.stacks else []
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, *sampler, "-m", "finetune_trainer", "run", "--config", str(config),
                             "--workdir", str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    stop = threading.Event()

    def watch_steps():  # when each step's line lands in the training log
        log, seen = workdir / "train-log.jsonl", 0
        while not stop.is_set():
            if log.exists():
                n = log.read_text().count("\n")
                steps.extend([time.monotonic() - t0] * (n - seen))
                seen = n
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_steps, daemon=True)
    watcher.start()
    with open(out / f"project-run{run}.log", "w") as logf:
        for line in proc.stdout:
            logf.write(line)
            for name, pattern in MARKS.items():
                if name not in marks and pattern.search(line):
                    marks[name] = time.monotonic() - t0
            if re.search(r"cache (hit|miss)|Error|error:|batchSize/gradientCheckpointing auto", line):
                print(f"  [run {run}] {line.rstrip()[:220]}", flush=True)
    rc = proc.wait()
    marks["end"] = time.monotonic() - t0
    time.sleep(0.2)
    stop.set()
    watcher.join()
    if args.residency:
        subprocess.run([*residency, "snapshot", str(out / f"residency-run{run}-after.json")], check=False)
        subprocess.run([*residency, "diff", str(out / f"residency-run{run}-before.json"),
                        str(out / f"residency-run{run}-after.json")], check=False)
    metrics = json.loads((workdir / "metrics.json").read_text()) if (workdir / "metrics.json").exists() else {}
    log = [json.loads(x) for x in (workdir / "train-log.jsonl").read_text().splitlines()] \
        if (workdir / "train-log.jsonl").exists() else []
    return {"rc": rc, "run": run, "marks": marks, "stepTimes": steps, "metrics": metrics,
            "manifest": manifest_in_s3(args, cfg.output_uri), "steadyTokensPerSecond": steady_rate(log),
            "report": json.loads((workdir / "dataset" / "report.json").read_text())
            if (workdir / "dataset" / "report.json").exists() else {}}


def run_warm(args, spec1: dict, spec2: dict, out: Path) -> dict:
    """The re-run on a warm trainer: run 1 with `--keep-warm`, and as soon as its manifest is in S3 the
    edited spec is handed to the same process (as the operator does through the status; here through
    `--handoff-dir`). Run 2's phases count from the handoff, its "imports" being handoff → its prepare stage."""
    sys.path[:0] = [str(ROOT / "operator")]
    from finetune_api import RunConfig
    from finetune_api.runconfig import RunRef
    from finetune_api.spec import FinetuneJobSpec

    cfgs = [RunConfig.build(FinetuneJobSpec.model_validate(spec), RunRef(namespace="bench", name="warm", run=run))
            for run, spec in ((1, spec1), (2, spec2))]
    workdir = Path(args.workdir_root) / "warm"
    handoff = Path(args.workdir_root) / "warm-handoff"
    subprocess.run(["rm", "-rf", str(workdir), str(handoff), *local_compile_caches()], check=True)
    if args.forget_trained:
        forget_trained(args, cfgs[0].output_uri)
    workdir.mkdir(parents=True)
    handoff.mkdir(parents=True)
    config = workdir.parent / "warm-run-1.yaml"
    config.write_text(cfgs[0].to_yaml())
    runs = [{"marks": {}, "stepTimes": [], "t0": 0.0}, {"marks": {}, "stepTimes": [], "t0": None}]
    logs = [workdir / "train-log.jsonl", workdir / "warm" / "run-2" / "train-log.jsonl"]
    t_start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "finetune_trainer", "run", "--config", str(config),
                             "--workdir", str(workdir), "--keep-warm", "120", "--handoff-dir", str(handoff)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stop = threading.Event()

    def watch_steps():
        seen = [0, 0]
        while not stop.is_set():
            for i, log in enumerate(logs):
                if runs[i]["t0"] is not None and log.exists():
                    n = log.read_text().count("\n")
                    runs[i]["stepTimes"].extend([time.monotonic() - t_start - runs[i]["t0"]] * (n - seen[i]))
                    seen[i] = n
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_steps, daemon=True)
    watcher.start()
    current = 0
    with open(out / "project-warm.log", "w") as logf:
        for line in proc.stdout:
            logf.write(line)
            now = time.monotonic() - t_start
            marks = runs[current]["marks"]
            for name, pattern in MARKS.items():
                if name not in marks and pattern.search(line):
                    marks[name] = now - runs[current]["t0"]
            if re.search(r"cache (hit|miss)|Error|error:|warm trainer", line):
                print(f"  [warm run {current + 1}] {line.rstrip()[:220]}", flush=True)
            if "finished" in marks and current == 0:  # hand the edited spec over at once
                marks["end"] = marks["finished"]
                # Read now: the warm trainer clears run 1's folders when it takes run 2.
                report = workdir / "dataset" / "report.json"
                runs[0]["report"] = json.loads(report.read_text()) if report.exists() else {}
                (handoff / "next.tmp").write_text(cfgs[1].to_yaml())
                (handoff / "next.tmp").replace(handoff / "next.yaml")
                runs[1]["t0"], current = time.monotonic() - t_start, 1
            elif current == 1 and "finished" in marks and "run 2 done; waiting" in line:
                marks["end"] = marks["finished"]
                proc.terminate()  # it would wait 120 s for a third run: it leaves, and exits 0
    rc = proc.wait()
    time.sleep(0.2)
    stop.set()
    watcher.join()
    results = []
    for i, (cfg, run) in enumerate(zip(cfgs, runs, strict=True)):
        wd = workdir if i == 0 else workdir / "warm" / "run-2"
        metrics = json.loads((wd / "metrics.json").read_text()) if (wd / "metrics.json").exists() else {}
        log = [json.loads(x) for x in logs[i].read_text().splitlines()] if logs[i].exists() else []
        run["marks"].setdefault("end", run["marks"].get("finished", 0.0))
        results.append({"rc": rc, "run": cfg.job.run, "marks": run["marks"], "stepTimes": run["stepTimes"],
                        "metrics": metrics, "manifest": manifest_in_s3(args, cfg.output_uri),
                        "steadyTokensPerSecond": steady_rate(log),
                        "report": run.get("report") or (json.loads((wd / "dataset" / "report.json").read_text())
                                                        if (wd / "dataset" / "report.json").exists() else {})})
    return {"first": results[0], "second": results[1]}


def steady_rate(log: list[dict]) -> float | None:
    rates = sorted(e["tokensPerSecond"] for e in log[3:] if "tokensPerSecond" in e)
    return round(rates[len(rates) // 2], 1) if rates else None


def forget_trained(args, output_uri: str) -> None:
    """Deletes the training and export caches' entries under the job's namespace (the dataset and
    compile caches stay: a spec edit of epochs and learning rate reuses those)."""
    import boto3

    bucket, _, prefix = output_uri[5:].partition("/")
    namespace_root = "/".join(prefix.split("/")[:2])  # <prefix>/<namespace>
    s3 = boto3.client("s3", endpoint_url=args.endpoint, region_name="us-east-1")
    for kind in ("trained", "exports"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{namespace_root}/.cache/{kind}/"):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=obj["Key"])


def manifest_in_s3(args, output_uri: str) -> bool:
    import boto3

    bucket, _, prefix = output_uri[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=args.endpoint, region_name="us-east-1")
    try:
        s3.head_object(Bucket=bucket, Key=prefix + "manifest.json")
        return True
    except Exception:  # noqa: BLE001
        return False


def phases(r: dict) -> dict[str, float | None]:
    """Seconds per phase from the marks: process start → manifest.json in S3."""
    m, steps = r["marks"], r["stepTimes"]
    ex = r["metrics"].get("timings", {}).get("exportSteps", {})
    first, last = (steps[0], steps[-1]) if steps else (None, None)
    n = len(steps)
    # The first step carries compilation; the steps phase is the rest, plus one steady step for it.
    steady = (last - first) / (n - 1) if n > 1 else None
    step_time = (last - first + steady) if steady else None

    def span(a, b):
        return round(b - a, 1) if a is not None and b is not None else None

    out = {
        "imports": span(0.0, m.get("prepare")), "prepare": span(m.get("prepare"), m.get("train")),
        "load": span(m.get("train"), m.get("loaded")),
        "firstStep": span(m.get("loaded"), first) if first is not None else None,
        "steps": round(step_time, 1) if step_time else None, "save": span(last, m.get("export")),
        "export": span(m.get("export"), m.get("upload")),
        **{f"export.{k}": v for k, v in ex.items()},
        "upload": span(m.get("upload"), m.get("finished", m["end"])),
        "exit": span(m.get("finished"), m["end"]),  # the process ending after it (not in the total)
        "total": round(m.get("finished", m["end"]), 1),
    }
    out["overhead"] = round(out["total"] - step_time, 1) if step_time else None  # everything but steady steps
    return out


# ------------------------------------------------------------------------- the baseline
GEMMA3_TEMPLATE = ROOT / "trainer-image" / "finetune_trainer" / "data" / "templates" / "gemma3.j2"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def baseline_worker(args) -> None:
    """TRL SFTTrainer + PEFT then llama.cpp's converter and quantizer; prints one JSON line of marks."""
    t0 = float(args.t0)
    marks: dict[str, float] = {}

    def mark(name):
        marks[name] = time.time() - t0

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    mark("imports")
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if not tok.chat_template:
        tok.chat_template = GEMMA3_TEMPLATE.read_text()
    ds = load_dataset("json", data_files=str(args.data), split="train")

    def to_prompt_completion(row):  # alpaca → conversational prompt-completion: loss on the answer only
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return {"prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": row["output"]}]}

    ds = ds.map(to_prompt_completion, remove_columns=ds.column_names)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    mark("loaded")
    step_times: list[float] = []

    class Steps(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.time() - t0)

    config = SFTConfig(
        output_dir=str(Path(args.workdir_root) / "baseline"), per_device_train_batch_size=8,
        gradient_accumulation_steps=4, num_train_epochs=args.epochs, learning_rate=2e-4, bf16=True,
        packing=True, max_length=args.seq, gradient_checkpointing=True, logging_steps=10, save_strategy="no",
        report_to=[], seed=3407, max_steps=args.baseline_steps or -1)
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[Steps()],
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS,
                                                task_type="CAUSAL_LM"))
    mark("tokenized")
    packed_rows = len(trainer.train_dataset)
    full_steps = math.ceil(math.ceil(packed_rows / 8) / 4) * math.ceil(args.epochs)
    trainer.train()
    mark("trained")
    merged = Path(args.workdir_root) / "baseline-merged"
    trainer.model.merge_and_unload().save_pretrained(str(merged))
    tok.save_pretrained(str(merged))
    for f in ("tokenizer.model",):  # llama.cpp's converter reads the SentencePiece model itself
        if (Path(args.model_dir) / f).exists():
            (merged / f).write_bytes((Path(args.model_dir) / f).read_bytes())
    mark("merged")
    sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer-image")]
    # llama.cpp's converter and quantizer, called as a user would call them
    from finetune_trainer.export import convert

    f16 = convert.convert(merged, Path(args.workdir_root) / "baseline-f16.gguf", "f16", "baseline")
    mark("converted")
    convert.quantize(f16, Path(args.workdir_root) / "baseline-q4_k_m.gguf", "q4_k_m")
    mark("quantized")
    print("BASELINE " + json.dumps({"marks": marks, "stepTimes": step_times, "fullSteps": full_steps,
                                    "packedRows": packed_rows, "tokensPerStep": 8 * 4 * args.seq}), flush=True)


def run_baseline(args, data: Path, out: Path) -> dict:
    t0 = time.time()
    cmd = [sys.executable, __file__, "--baseline-worker", "--t0", repr(t0), "--data", str(data),
           "--model-dir", str(args.model_dir), "--seq", str(args.seq), "--epochs", str(args.epochs),
           "--baseline-steps", str(args.baseline_steps), "--workdir-root", str(args.workdir_root)]
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_BACKEND"}
    with open(out / "baseline.log", "w") as logf:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, env=env)
    end = time.time() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BASELINE ")), None)
    if proc.returncode != 0 or line is None:
        return {"rc": proc.returncode, "error": "see baseline.log"}
    r = json.loads(line[len("BASELINE "):])
    m, steps = r["marks"], r["stepTimes"]
    n = len(steps)
    warm = steps[min(3, n - 1):] if n > 4 else steps
    steady = (warm[-1] - warm[0]) / (len(warm) - 1) if len(warm) > 1 else None
    measured_steps = steps[-1] - m["tokenized"] if steps else 0.0
    cut = bool(args.baseline_steps) and r["fullSteps"] > n
    full_train = (measured_steps + steady * (r["fullSteps"] - n)) if cut and steady else measured_steps
    extrapolated_total = end - measured_steps + full_train
    return {"rc": 0, "marks": m, "end": round(end, 1), "stepsRun": n, "fullSteps": r["fullSteps"],
            "steadyStepSeconds": round(steady, 3) if steady else None,
            "steadyTokensPerSecond": round(r["tokensPerStep"] / steady, 1) if steady else None,
            "cutAndExtrapolated": cut, "total": round(extrapolated_total if cut else end, 1),
            "phases": {"imports": round(m["imports"], 1), "loadDataAndModel": round(m["loaded"] - m["imports"], 1),
                       "tokenizeAndPack": round(m["tokenized"] - m["loaded"], 1),
                       "steps": round(full_train, 1), "stepsMeasured": round(measured_steps, 1),
                       "merge": round(m["merged"] - m["trained"], 1), "convert": round(m["converted"] - m["merged"], 1),
                       "quantize": round(m["quantized"] - m["converted"], 1)}}


# ------------------------------------------------------------------------------ printing
def print_project(r: dict, label: str) -> None:
    p = phases(r)
    met = r["metrics"]
    cache = met.get("cache", {})
    print(f"\n{label}: exit {r['rc']}, manifest.json in S3: {r['manifest']}, {p['total']} s total, "
          f"{p['overhead']} s not steady steps; steps {met.get('steps')}, micro-batch {met.get('batchSize')}, "
          f"checkpointing {met.get('gradientCheckpointing')}, steady {r['steadyTokensPerSecond']} tokens/s")
    print(f"  auto: {met.get('auto')}")
    print(f"  cache: dataset {cache.get('dataset', '-')} ({cache.get('reason', '-')}), "
          f"compile {cache.get('compile', '-')} ({cache.get('compileReason', '-')})")
    print("  " + "  ".join(f"{k} {v}" for k, v in p.items() if v is not None))
    tokens = r["report"].get("tokens", {})
    if tokens:
        print(f"  data: {r['report'].get('rows', {}).get('used')} rows, {tokens.get('total')} tokens, "
              f"lengths {tokens.get('lengthPercentiles')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="the random-init Gemma 3 270M folder with the real tokenizer")
    ap.add_argument("--out", default="seed-out", help="results folder")
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--rerun-epochs", type=float, default=4)
    ap.add_argument("--rerun-lr", type=float, default=1e-5)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="project,rerun,baseline",
                    help="which of project,rerun,warm,baseline to run (warm: run 1 on a warm trainer, run 2 handed to it)")
    ap.add_argument("--baseline-steps", type=int, default=30,
                    help="train the baseline this many steps and extrapolate the epochs (0: the whole epochs)")
    ap.add_argument("--endpoint", default="http://127.0.0.1:18333")
    ap.add_argument("--bucket", default="models")
    ap.add_argument("--workdir-root", default="/tmp/seed-work")
    ap.add_argument("--stacks", type=float, default=0,
                    help="sample the trainer's stacks every this many seconds (bench/stack_sampler.py; 0: off)")
    ap.add_argument("--residency", action="store_true",
                    help="report which GPU library files each run brought into the page cache")
    ap.add_argument("--forget-trained", action="store_true",
                    help="delete the training and export caches' entries first (to repeat a run as it was)")
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--t0", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_worker:
        baseline_worker(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    data = write_data(Path(args.workdir_root) / f"alpaca-shaped-{args.rows}-{args.seed}.jsonl", args.rows, args.seed)
    results_file = out / "seed.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["config"] = {"rows": args.rows, "epochs": args.epochs, "rerunEpochs": args.rerun_epochs,
                         "seq": args.seq, "baselineSteps": args.baseline_steps}
    if "project" in parts:
        results["project"] = run_project(args, spec_for(args, data, args.epochs, 2e-4), 1, out)
        print_project(results["project"], f"project run 1 ({args.epochs:g} epochs)")
    if "rerun" in parts:
        results["rerun"] = run_project(args, spec_for(args, data, args.rerun_epochs, args.rerun_lr), 2, out)
        print_project(results["rerun"], f"project run 2 (spec edited: {args.rerun_epochs:g} epochs, lr {args.rerun_lr:g})")
    if "warm" in parts:
        results["warm"] = run_warm(args, spec_for(args, data, args.epochs, 2e-4),
                                   spec_for(args, data, args.rerun_epochs, args.rerun_lr), out)
        for k in ("first", "second"):
            results["warm"][k]["phases"] = phases(results["warm"][k])
        print_project(results["warm"]["first"], f"warm trainer, run 1 ({args.epochs:g} epochs, --keep-warm)")
        print_project(results["warm"]["second"], f"warm trainer, run 2 handed over (spec edited: "
                      f"{args.rerun_epochs:g} epochs, lr {args.rerun_lr:g}); from the handoff")
    if "baseline" in parts:
        results["baseline"] = run_baseline(args, data, out)
        b = results["baseline"]
        print(f"\nbaseline (TRL SFTTrainer + PEFT, then llama.cpp convert + quantize): {json.dumps(b.get('phases', b))}")
        if b.get("cutAndExtrapolated"):
            print(f"  EXTRAPOLATED: {b['stepsRun']} of {b['fullSteps']} steps run; the rest at the steady "
                  f"{b['steadyStepSeconds']} s a step ({b['steadyTokensPerSecond']} tokens/s); total {b['total']} s "
                  f"(measured wall {b['end']} s)")
    for k in ("project", "rerun"):
        if k in results:
            results[k]["phases"] = phases(results[k])
    results_file.write_text(json.dumps(results, indent=1))
    # Run 1 of the project: the cold pod's (project), else the warm trainer's first (the same cold start).
    first = results.get("project") or (results.get("warm") or {}).get("first")
    if first and results.get("baseline", {}).get("rc") == 0:
        p, b = first["phases"]["total"], results["baseline"]["total"]
        label = " (baseline extrapolated)" if results["baseline"]["cutAndExtrapolated"] else ""
        print(f"\nend to end, process start → q4_k_m: project {p} s, baseline {b} s{label}: {b / p:.2f}x")
        if results["baseline"].get("steadyTokensPerSecond") and first.get("steadyTokensPerSecond"):
            print(f"steady step throughput: {first['steadyTokensPerSecond'] / results['baseline']['steadyTokensPerSecond']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
