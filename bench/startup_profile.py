"""Where a trainer process spends its time before the first training step, on a GPU machine.

    python bench/startup_profile.py --model-dir /tmp/gemma3-270m-random --out OUT_DIR

1. `python -X importtime` of the trainer's early imports (`import unsloth`) in a child process: the
   modules with the most time of their own, and the wall time of that child (run first, so on a fresh
   machine it sees cold files as the first `finetune run` would).
2. The same imports again in this process under cProfile (warm files): the functions with the most
   cumulative time.
3. The trainer's model load (`model_loading.load_for_training`) under cProfile.

Writes importtime.txt, import.prof.txt and load.prof.txt to OUT_DIR and prints the heads.
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
    profiled("load", args.out, args.top, lambda: model_loading.load_for_training(base, training))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
