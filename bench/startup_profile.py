"""Where a trainer process spends its time before the first training step, on a GPU machine.

    python bench/startup_profile.py --model-dir /tmp/gemma3-270m-random --out OUT_DIR

1. `python -X importtime` of the trainer's early imports (`import unsloth`) in a child process: the
   modules with the most time of their own, and the wall time of that child (run first, so on a fresh
   machine it sees cold files as the first `finetune run` would).
2. The same imports again in this process under cProfile (warm files): the functions with the most
   cumulative time.
3. The trainer's model load (`model_loading.load_for_training`) under cProfile.
4. The trainer's first step on alpaca-shaped packed rows, as `finetune run` takes it (padding-free,
   the head loss, the optimizer's first update) under cProfile, then the next steps' wall times (a
   new shape that compiles again shows up there).

Writes importtime.txt, import.prof.txt, load.prof.txt and step.prof.txt to OUT_DIR and prints the heads.
Local compile caches are whatever the machine has: run it first on a fresh machine for a cold compile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EARLY = "import finetune_trainer.train.model_loading as m; m.early_imports()"


def importtime(out: Path, top: int) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", EARLY], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "importtime.txt").write_text(proc.stderr)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].startswith("import time:") and parts[0].split(":")[1].strip().isdigit():
            rows.append((int(parts[0].split(":")[1]), int(parts[1]), parts[2].rstrip()))
    print(f"child `import unsloth`: {wall:.1f} s wall, rc {proc.returncode}, {len(rows)} modules")
    print(f"{'self s':>8} {'cumul s':>8}  module")
    for own, cumulative, name in sorted(rows, reverse=True)[:top]:
        print(f"{own / 1e6:8.2f} {cumulative / 1e6:8.2f} {name}")


def profiled(label: str, out: Path, top: int, fn):
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        return fn()
    finally:
        prof.disable()
        wall = time.perf_counter() - t0
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).sort_stats("cumulative")
        stats.print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
        (out / f"{label}.prof.txt").write_text(text.getvalue())
        print(f"\n== {label}: {wall:.1f} s wall (cProfile on) ==")
        print("\n".join(text.getvalue().splitlines()[: top + 12]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top", type=int, default=35)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(ROOT / "trainer-image"), str(ROOT / "operator")]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer-image"), str(ROOT / "operator"),
                                                os.environ.get("PYTHONPATH", "")])
    importtime(args.out, args.top)

    from finetune_trainer.train import model_loading

    profiled("import", args.out, args.top, model_loading.early_imports)
    from finetune_api.spec import TrainingSpec

    base = model_loading.BaseModel(source=args.model_dir)
    training = TrainingSpec(batch_size=args.batch, max_seq_length=args.seq, gradient_checkpointing=False)
    model, backend = profiled("load", args.out, args.top, lambda: model_loading.load_for_training(base, training))
    first_steps(model, backend, training, args)
    return 0


def first_steps(model, backend: str, training, args) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    from seed_scenario import MAX_TOKENS, MEDIAN_TOKENS, SIGMA

    from finetune_trainer.train import head_loss, recipe, varlen_attention
    from finetune_trainer.train.batching import Batches

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(MEDIAN_TOKENS), SIGMA, size=4000),  # ~11 packed micro-batches
                      24, MAX_TOKENS).astype(int)
    rows = [{"input_ids": (ids := rng.integers(3, 262_000, size=int(n)).tolist()), "labels": ids} for n in lengths]
    device = next(p.device for p in model.parameters() if p.requires_grad)
    padding_free = varlen_attention.enable(model, training.padding_free)
    head = head_loss.for_model(model, backend) if padding_free else None
    batches = Batches(rows, training.batch_size, training.max_seq_length, 0, training.seed, True, bucket=True,
                      padding_free=padding_free)
    optimizer = recipe.build_optimizer(model, training)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    print(f"\nsteps: padding-free {padding_free}, head {head.kernel if head else 'model'}, "
          f"{batches.per_epoch} micro-batches of {len(rows)} rows")

    def step(m: int) -> float:
        t = time.perf_counter()
        b = batches.get(m)
        recipe.forward_backward(model, b, device, 1.0, padding_free, head)
        recipe.optimizer_step(trainable, optimizer)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    profiled("step", args.out, args.top, lambda: step(0))
    times = [step(m) for m in range(1, min(8, batches.per_epoch))]
    print("next steps (s): " + " ".join(f"{t:.3f}" for t in times))


if __name__ == "__main__":
    raise SystemExit(main())
