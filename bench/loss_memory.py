"""Where a training step's memory goes at the LM head: padded against padding-free micro-batches.

On an H100, `batchSize: auto`'s 32 x 2048 ran out of memory padding-free while the same micro-batch
padded fits (docs/benchmarks.md, "Time to model"): the padding-free step held the whole micro-batch's
logits. This probe runs the trainer's own step (recipe.forward_backward, then optimizer_step) four times
per layout and micro-batch on the random-init Gemma 3 270M shape, and prints, for each, the peak GPU
memory and time of the last step, the size of the `logits` the model returned (hidden states where the
head's loss is chunked; an empty placeholder where Unsloth's fused loss ran inside the model) and how
many times the model's module called Unsloth's fused loss. Layouts:

- `padding-free`: the trainer's default, the loss from the hidden states (head_loss.py, Unsloth's kernel)
- `padding-free+torch`: the same with head_loss's own torch kernel
- `padding-free+model`: the model's own loss (what ran out of memory)
- `padded`: padded rows, the model's own loss (Unsloth's fused loss)

    bench/gpu-run.sh lossmem              # BATCHES="8 16 32" SEQ=2048 by default
    python3 bench/loss_memory.py --model-dir DIR --batches 8 16 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def count_fused_calls() -> dict[str, int]:
    """Wraps `unsloth_fused_ce_loss` in every module Unsloth generated (they look the name up at call
    time), so a step shows whether the chunked loss ran."""
    calls = {"fused": 0}
    for name, module in list(sys.modules.items()):
        fn = getattr(module, "unsloth_fused_ce_loss", None)
        if fn is None or "compiled" not in name:
            continue

        def counting(*args, _fn=fn, **kwargs):
            calls["fused"] += 1
            return _fn(*args, **kwargs)

        module.unsloth_fused_ce_loss = counting
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layouts", nargs="+", default=["padding-free", "padding-free+torch", "padding-free+model",
                                                     "padded"])
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    os.environ["FINETUNE_BACKEND"] = "unsloth"
    from finetune_trainer.train.model_loading import early_imports

    early_imports()
    import torch
    from train_throughput import synthetic_rows

    from finetune_api.spec import LoraSpec, TrainingSpec
    from finetune_trainer.train import head_loss, varlen_attention
    from finetune_trainer.train.batching import Batches
    from finetune_trainer.train.model_loading import BaseModel, load_for_training
    from finetune_trainer.train.recipe import build_optimizer, forward_backward, optimizer_step

    device = torch.device("cuda")
    results = []
    for layout in args.layouts:
        for batch in args.batches:
            training = TrainingSpec(method="lora", max_seq_length=args.seq, batch_size=batch,
                                    gradient_checkpointing=False, packing=True, lora=LoraSpec(r=16, alpha=16),
                                    padding_free="off" if layout == "padded" else "auto")
            model, backend = load_for_training(BaseModel(source=args.model_dir), training)
            calls = count_fused_calls()
            padding_free = varlen_attention.enable(model, training.padding_free)
            os.environ[head_loss.ENV] = {"padding-free+torch": "torch", "padding-free+model": "off"}.get(layout, "auto")
            head = head_loss.for_model(model, backend) if padding_free else None
            optimizer = build_optimizer(model, training)
            rows = synthetic_rows(batch * 40, args.seq, "real")
            batches = Batches(rows, batch, args.seq, pad_id=0, seed=0, packing=True, bucket=True,
                              padding_free=padding_free)
            # forward_backward returns only the loss: the size of the logits the model returned is read
            # by a hook on the outermost call.
            seen = {"logits": None}

            def logits_size(_m, _a, out, seen=seen):
                try:
                    seen["logits"] = out.logits.numel()
                except NotImplementedError:  # Unsloth's fused loss ran: its `logits` raise when read
                    seen["logits"] = 0

            model.register_forward_hook(logits_size)
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            peak, error, seconds = None, None, None
            try:
                for m in range(4):  # the first steps compile; the last is the one measured
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    forward_backward(model, batches.get(m), device, 1.0, padding_free=padding_free, head=head)
                    optimizer_step(trainable, optimizer)
                    torch.cuda.synchronize()
                    seconds = time.perf_counter() - t0
                    peak = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError as e:
                error = str(e).splitlines()[0][:200]
            r = {"layout": layout, "paddingFree": padding_free, "headLoss": head.kernel if head else "model",
                 "batch": batch, "seq": args.seq, "stepSeconds": round(seconds, 4) if seconds else None,
                 "tokensPerStep": batch * args.seq, "peakGiB": round(peak, 2) if peak else None,
                 "logitsNumel": seen["logits"], "fusedLossCalls": calls["fused"], "error": error,
                 "gpu": torch.cuda.get_device_name(),
                 "memoryGiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
            print(json.dumps(r), flush=True)
            results.append(r)
            del model, optimizer, batches, head
            torch.cuda.empty_cache()
    if args.out:
        # Unsloth's generated modules, to read which loss branch each layout took
        for f in Path(os.environ.get("UNSLOTH_COMPILE_LOCATION", "unsloth_compiled_cache")).glob("*Gemma3*.py"):
            (Path(args.out).parent / f"unsloth-{f.name}.txt").write_text(f.read_text())
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
