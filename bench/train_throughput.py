"""Training throughput: the project's path (the trainer's own loader, batching, optimizer and step)
against a plain transformers + PEFT baseline, same model shape, sequence length and LoRA, one GPU.

    python bench/train_throughput.py --out bench-results.json            # all configs
    python bench/train_throughput.py --configs baseline,project --seq 2048 --batch 8

Each config runs in its own process (Unsloth patches transformers at import; the baseline must not
see that, and peak memory must be per config). Prints per config: tokens/s (non-padding tokens),
step time, peak GPU memory, MFU = 6·N·tokens/s over the GPU's dense bf16 peak, and the ratio to the
baseline measured in the same invocation. Random-init Gemma 3 270M (the shape is what matters), or
with `--shape llama-3.2-1b` a random-init model of Llama 3.2 1B's shape.

Data modes: `full` feeds full-length random sequences (no padding: pure kernel throughput);
`real` feeds rows with an instruction-tuning length distribution (lognormal, median ~250 tokens),
padded to the longest row per micro-batch, or packed where the config says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
    sliding_window=512, rope_theta=1_000_000.0, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, tie_word_embeddings=True,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
# Llama 3.2 1B's shape (RoPE scaling left out: it changes no kernel's cost).
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, rope_theta=500_000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)
# name: (transformers config class, model class, fields)
SHAPES = {
    "gemma3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3_270M),
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", LLAMA32_1B),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# name: (implementation, micro-batch multiplier, gradient checkpointing, packing). Checkpointing:
# "offload" (the trainer's default with Unsloth: activations parked in CPU memory), "gpu" (plain
# recompute, activations kept on the GPU), or False.
CONFIGS = {
    "baseline": ("hf", 1, "gpu", False),             # what users run without us: HF + PEFT, checkpointing
    "project": ("project", 1, "offload", False),     # the trainer's defaults
    "project-nogc": ("project", 1, False, False),
    # micro-batch 4 at seq 2048: without checkpointing (~1 GB a row) about 10 % of the baseline's memory
    "project-bhalf-nogc": ("project", 0.5, False, False),
    "project-b4x": ("project", 4, "offload", False),
    "project-b4x-gcgpu": ("project", 4, "gpu", False),
    "project-b4x-nogc": ("project", 4, False, False),
    "project-b8x": ("project", 8, "offload", False),
    "project-b8x-gcgpu": ("project", 8, "gpu", False),
    "project-b8x-nogc": ("project", 8, False, False),  # ~65 GB on an 80 GB card
    "project-b16x": ("project", 16, "offload", False),
    "project-b16x-nogc": ("project", 16, False, False),  # seq 512: as many tokens a step as b4x at 2048
    "project-packed": ("project", 1, "offload", True),
    "project-b4x-packed": ("project", 4, "offload", True),
    "baseline-qlora": ("hf", 1, "gpu", False),
    "project-qlora": ("project", 1, "offload", False),
    "project-b4x-qlora": ("project", 4, "offload", False),
    "project-b4x-packed-qlora": ("project", 4, "offload", True),
}
# A config name may end in "+<lever>"s (project-b4x+padded+fp32logits): the same config with the
# levers' spec fields or environment, so one invocation measures a config with and without them
# against the same baseline. The trainer's defaults are on in every project config; most levers take
# one back.
SPEC_LEVERS = {
    "padded": {"padding_free": "off"},  # padded rows on the model's own attention
}
LEVERS = {
    # Unsloth's fused LM-head loss as Unsloth sets it: fp32 logits (the trainer: bf16, as transformers'
    # own loss reads them), in chunks of 512 rows (the trainer: 2048)
    "fp32logits": {"UNSLOTH_LOGPROB_FP32_LOGITS": "1"},
    "exacttarget": {"UNSLOTH_LOGPROB_FP32_LOGITS": "2"},  # bf16 logits, the target's one in fp32
    "autorows": {"UNSLOTH_FUSED_LINEAR_MIN_ROWS": "0"},
    "celtile64": {"UNSLOTH_FUSED_LINEAR_BWD_TILE_MB": "64"},  # with fp32logits: 64 MB logit tiles, not 256
}


def config_base(name: str) -> str:
    """The config a name with levers is built on (project-b4x+padded → project-b4x); unknown ones fail."""
    base = name.partition("+")[0]
    if base not in CONFIGS:
        raise KeyError(f"no config {base!r}; known: {', '.join(CONFIGS)}")
    return base


def config_env(name: str, extra: Sequence[str] = ()) -> dict[str, str]:
    """The environment a config's worker runs with: --env's KEY=VALUEs, then its levers' (what the
    results record is what the worker was given)."""
    env = dict(e.split("=", 1) for e in extra)
    for lever in name.split("+")[1:]:
        if lever not in SPEC_LEVERS:
            env.update(LEVERS[lever])  # an unknown lever fails here, before any config runs
    return env


def config_spec(name: str) -> dict[str, str]:
    return {k: v for lever in name.split("+")[1:] for k, v in SPEC_LEVERS.get(lever, {}).items()}


def run_name(args) -> str:
    """The config as the results name it: with its levers, and the --label if any."""
    return args.config + (f"+{args.label}" if args.label else "")


def beside_results(args, kind: str, suffix: str) -> Path:
    # '.' for '+' in file names: the GPU machine's tool brings no file back whose name has a '+'.
    return Path(args.out).with_name(f"{kind}-{run_name(args)}{suffix}".replace("+", "."))


def make_model_dir(path: Path, tokenizer_dir: Path | None, shape: str = "gemma3-270m") -> Path:
    import torch
    import transformers

    if (path / "config.json").exists():
        return path
    config_cls, model_cls, fields = SHAPES[shape]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).to(torch.bfloat16)
    model.save_pretrained(path)
    if tokenizer_dir:  # as files: llama.cpp's converter needs the SentencePiece tokenizer.model itself
        import shutil

        for f in tokenizer_dir.iterdir():
            shutil.copy(f, path / f.name)
    elif shape != "gemma3-270m":
        save_stub_tokenizer(path)
    return path


def save_stub_tokenizer(path: Path) -> None:
    """A four-token tokenizer: Unsloth's Llama loader loads one with the model, and the bench feeds
    token ids, so any tokenizer with the config's special tokens will do."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>",
                            eos_token="</s>", bos_token="<s>", unk_token="<unk>").save_pretrained(path)


def synthetic_rows(n: int, seq: int, mode: str, seed: int = 0, vocab: int = GEMMA3_270M["vocab_size"]) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    if mode == "full":
        lengths = np.full(n, seq)
    else:  # instruction tuning: most rows short, a long tail
        lengths = np.clip(rng.lognormal(mean=np.log(250), sigma=0.8, size=n).astype(int), 32, seq)
    rows = []
    for length in lengths:
        ids = rng.integers(3, vocab, size=int(length)).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def worker(args) -> dict:
    import torch

    base = config_base(args.config)
    impl, mult, gc, packing = CONFIGS[base]
    qlora = base.endswith("qlora")
    batch = max(1, int(args.batch * mult))
    if impl == "project":
        os.environ["FINETUNE_BACKEND"] = "unsloth"
        from finetune_trainer.train.model_loading import early_imports

        early_imports()  # Unsloth first, as the trainer does
    from finetune_api.spec import LoraSpec, TrainingSpec
    from finetune_trainer.train import varlen_attention
    from finetune_trainer.train.batching import Batches

    training = TrainingSpec(method="qlora" if qlora else "lora", max_seq_length=args.seq, batch_size=batch,
                            gradient_checkpointing=bool(gc), packing=packing, lora=LoraSpec(r=16, alpha=16),
                            **config_spec(args.config))
    t_load = time.monotonic()
    if impl == "project":
        from finetune_trainer.train.model_loading import BaseModel, load_for_training
        from finetune_trainer.train.recipe import build_optimizer

        model, backend = load_for_training(BaseModel(source=args.model_dir), training,
                                           offload_checkpoints=gc != "gpu")
        optimizer = build_optimizer(model, training)
    else:
        model, optimizer, backend = hf_baseline(args.model_dir, training), None, "transformers+peft"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    load_s = time.monotonic() - t_load
    device = torch.device("cuda")
    n_params = sum(p.numel() for p in model.parameters())
    if qlora:  # 4-bit weights count as half-bytes in numel(); use the model shape's real count
        n_params = args.n_params or n_params
    rows = synthetic_rows(max(batch * (args.steps + args.warmup) * 3, 64), args.seq, args.data,
                          vocab=SHAPES[args.shape][2]["vocab_size"])
    # The project pads to power-of-two widths on CUDA, as the trainer does (one compile per bucket);
    # the baseline pads to the longest row of each micro-batch, as transformers' collators do.
    # The project trains padding-free, as the trainer does (the lever "+padded" switches it off): one
    # [1, T] row per micro-batch on FlashAttention's varlen kernel.
    padding_free = impl == "project" and varlen_attention.enable(model, training.padding_free)
    batches = Batches(rows, batch, args.seq, pad_id=0, seed=0, packing=packing, bucket=impl == "project",
                      padding_free=padding_free)
    model.train()
    torch.cuda.reset_peak_memory_stats()

    losses = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The trainer's own step (recipe.py), not a copy: one micro-batch's forward and backward, then the
    # clipped update. The baseline takes the same path through its plain transformers + PEFT model.
    from finetune_trainer.train.recipe import forward_backward, optimizer_step

    def step(m: int) -> int:
        b = batches.get(m)
        # padding-free's "the varlen kernel ran" check is done below after the warmup steps, as before
        losses.append(forward_backward(model, b, device, 1.0, padding_free=False))  # read after the timing
        optimizer_step(trainable, optimizer)
        return b.tokens

    t_compile = time.monotonic()
    timed = range(args.warmup, args.warmup + args.steps)
    first_of_width: dict[int, int] = {}
    for m in timed:
        first_of_width.setdefault(batches.get(m).input_ids.shape[1], m)
    # First steps compile kernels: the warmup steps, then one step of every width the timed steps
    # will see, so no compilation lands inside the measurement.
    for m in [*range(args.warmup), *first_of_width.values()]:
        t = time.monotonic()
        step(m)
        torch.cuda.synchronize()
        if padding_free:  # as the trainer: never across sequences
            varlen_attention.require_reached()
        print(f"{args.config}: warmup step {m} ({batches.get(m).input_ids.shape[1]} wide) "
              f"{time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
    torch.cuda.synchronize()
    warm_s = time.monotonic() - t_compile
    tokens, t0 = 0, time.monotonic()
    losses.clear()
    for m in timed:
        tokens += step(m)
    torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    loss = torch.stack(losses).float().mean().item()
    tps = tokens / seconds
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    busy = None
    if args.profile:  # after the timed steps, so profiling overhead never touches the numbers above
        try:
            busy = profile_steps(step, args.warmup + args.steps, args.profile, seconds / args.steps, args)
        except Exception as exc:  # noqa: BLE001 - the timed result must survive a profiler problem
            print(f"profile failed: {exc!r}", flush=True)
    return {
        "config": run_name(args), "shape": args.shape, "backend": backend, "gpu": name,
        "seq": args.seq, "microBatch": batch, "gradientCheckpointing": gc, "packing": packing,
        "method": training.method, "data": args.data, "paddingFree": padding_free,
        "env": config_env(args.config, args.env),
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "tokensPerSecond": round(tps), "meanLoss": round(loss, 4), "stepSeconds": round(seconds / args.steps, 4),
        "peakMemoryGB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(6 * n_params * tps / peak, 4), "params": n_params,
        "loadSeconds": round(load_s, 1), "warmupSeconds": round(warm_s, 1), "steps": args.steps,
        "widths": sorted(first_of_width), "varlenCalls": varlen_attention.STATS["calls"],
        "lentKernelCalls": varlen_attention.STATS["lent"],
        **({"gpuBusy": busy} if busy is not None else {}),
    }


# Kernel name → where the time goes. Order matters: the first pattern that matches wins.
KERNEL_GROUPS = (
    ("cross-entropy (Unsloth's fused LM-head loss)", ("_fl_",)),
    ("attention", ("flex", "flash", "fmha", "attention", "triton_tem_fused")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "matmul", "sm90_")),
    ("copy H2D/D2H", ("memcpy htod", "memcpy dtoh", "memcpy", "pinned")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton fused (norms, rope, CE, LoRA glue)", ("triton_",)),
    ("elementwise/reduce (eager)", ("elementwise", "reduce", "vectorized", "unrolled", "index", "copy", "fill")),
)


def profile_steps(step, first: int, n: int, step_seconds: float, args) -> float:
    """Profiles n more steps; prints kernel time by group and the top kernels; returns GPU-busy share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for m in range(first, first + n):
            step(m)
        torch.cuda.synchronize()
    if args.trace and args.out:  # the timeline, for where the GPU waits on the host (chrome://tracing)
        import gzip
        import shutil

        raw = beside_results(args, "trace", ".json")
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    # Kernels only (device-side events): CPU ops also carry their kernels' time and would count twice.
    events = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")] or \
        [e for e in prof.key_averages() if e.self_cpu_time_total == 0]
    kernels = sorted(((e.key, e.self_device_time_total, e.count) for e in events if e.self_device_time_total > 0),
                     key=lambda k: -k[1])
    total_us = sum(t for _, t, _ in kernels)
    groups: dict[str, float] = {}
    for key, t, _ in kernels:
        low = key.lower()
        group = next((g for g, pats in KERNEL_GROUPS if any(p in low for p in pats)), "other")
        groups[group] = groups.get(group, 0.0) + t
    lines = [f"profile {args.config}: {n} steps, kernels {total_us / 1e3 / n:.1f} ms/step of "
             f"{step_seconds * 1e3:.1f} ms/step wall ({total_us / 1e6 / n / step_seconds:.0%} GPU busy)"]
    lines += [f"  {g:<44}{t / 1e3 / n:>9.1f} ms/step {t / total_us:>6.1%}" for g, t in
              sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += ["  top kernels:"] + [f"  {t / 1e3 / n:>9.2f} ms/step x{c // n:<5} {k[:150]}" for k, t, c in kernels[:30]]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        beside_results(args, "profile", ".txt").write_text(text)
    return round(total_us / 1e6 / n / step_seconds, 3)


def hf_baseline(model_dir: str, training):
    """Plain transformers + PEFT as its docs show it: bf16 (or bitsandbytes 4-bit), checkpointing, sdpa."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if training.method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map={"": 0}, **kw)
    if training.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)
    elif training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = training.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="baseline,project,project-nogc,project-b4x,project-b4x-nogc")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="micro-batch of the baseline (configs scale it)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data", choices=["full", "real"], default="full")
    p.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-270m", help="the random-init model's shape")
    p.add_argument("--model-dir", default=None, help="where the random-init model is kept (default /tmp/<shape>-random)")
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--out", default=None, help="append results as JSON lines here")
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps per config")
    p.add_argument("--trace", action="store_true", help="with --profile: also write the profiled steps' trace")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the workers (a lever such as UNSLOTH_FLEX_TUNED_BACKWARD=1)")
    p.add_argument("--label", default="", help="suffix for the config names in the results (names the lever)")
    p.add_argument("--config", help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--n-params", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    model_dir = make_model_dir(Path(args.model_dir or f"/tmp/{args.shape}-random"),
                               Path(args.tokenizer_dir) if args.tokenizer_dir else None, args.shape)
    import torch
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).parameters())
    results = []
    names = args.configs.split(",")
    for name in names:  # a typo fails now, not after the configs before it have run
        config_base(name), config_env(name)
    for name in names:
        cmd = [sys.executable, __file__, "--config", name, "--seq", str(args.seq), "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", args.data,
               "--shape", args.shape, "--model-dir", str(model_dir), "--n-params", str(n_params),
               "--profile", str(args.profile),
               *(["--trace"] if args.trace else []),
               "--label", args.label] + [f"--env={e}" for e in args.env] + (["--out", args.out] if args.out else [])
        env = {**os.environ, **config_env(name, args.env)}
        t0 = time.monotonic()
        # stderr streams (compile progress, warmup steps); stdout carries the result line
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or not line:
            print(f"{name}: FAILED ({proc.returncode})\n{proc.stdout[-4000:]}", flush=True)
            continue
        for ln in proc.stdout.splitlines():  # the worker's profile, if any
            if not ln.startswith("RESULT "):
                print(ln, flush=True)
        res = json.loads(line[len("RESULT "):])
        res["wallSeconds"] = round(time.monotonic() - t0, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")

    base = {r["method"]: r for r in results if r["config"].startswith("baseline")}
    print(f"\n{'config':<28}{'tok/s':>10}{'step s':>9}{'peak GB':>9}{'MFU':>7}{'vs base':>9}  (seq {args.seq}, data {args.data})")
    for r in results:
        ref = base.get(r["method"])
        ratio = f"{r['tokensPerSecond'] / ref['tokensPerSecond']:.2f}x" if ref else "-"
        print(f"{r['config']:<28}{r['tokensPerSecond']:>10,}{r['stepSeconds']:>9.3f}{r['peakMemoryGB']:>9.1f}"
              f"{r['mfu'] * 100:>6.1f}%{ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
