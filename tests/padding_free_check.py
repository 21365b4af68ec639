"""The trainer's padding-free route, padded against padding-free, on the model loader's own backend:
Unsloth on a GPU (its patched, compiled Gemma 3 layers), transformers on CPU. Run as a script, one
process per check, because importing Unsloth patches transformers for the rest of a process:

    python tests/padding_free_check.py MODEL_DIR cuda 600,130,700,90 1024 [lora|qlora]

Loads the model twice (same seed, same LoRA initialisation): once with varlen_attention enabled and
the batch laid out as one [1, T] row, once padded on the model's own attention. Prints one line,
`RESULT {json}`: per-token logit differences per sequence, scoring and training losses, the cosine
between the two runs' LoRA gradients, and where the `ft_*` keywords got to (for when the kernel is
not reached). tests/test_trainer_gpu.py and tests/test_trainer_packing.py hold the verdicts.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch


def main(model_dir: str, device: str, lengths: list[int], max_len: int, method: str = "lora") -> dict:
    from finetune_api.spec import TrainingSpec
    from finetune_trainer.train import head_loss, recipe, varlen_attention
    from finetune_trainer.train.batching import Batches
    from finetune_trainer.train.model_loading import BaseModel, early_imports, load_for_training

    early_imports()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 262144, (n,), generator=g).tolist()), "labels": ids}
            for n in lengths]
    n = len(rows)
    training = TrainingSpec(max_seq_length=max_len, batch_size=n, method=method)
    cuda = device == "cuda"
    out, probe = {}, {}
    for padding_free in (True, False):
        torch.manual_seed(0)  # the same LoRA initialisation for both
        model, backend = load_for_training(BaseModel(source=model_dir), training)
        if padding_free:
            assert varlen_attention.enable(model, "on"), "varlen_attention.enable() declined the model"
            _spy(model, probe)
        batch = Batches(rows, n, max_len, 0, 0, bucket=cuda, padding_free=padding_free).get(0)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
        # Scoring: with Unsloth, logits come back only with UNSLOTH_RETURN_LOGITS (the loss then takes
        # the plain path).
        os.environ["UNSLOTH_RETURN_LOGITS"] = "1"
        with torch.no_grad(), autocast:
            res = model(**batch.model_inputs(device), use_cache=False)
        logits = res.logits.float()
        probe.setdefault("callsScoring", varlen_attention.STATS["calls"])
        if padding_free:
            starts = batch.cu_seqlens.tolist()
            per_row = [logits[0, starts[b]:starts[b + 1]] for b in range(n)]
        else:
            order = Batches(rows, n, max_len, 0, 0).rows_of(0)
            per_row = [logits[b, : len(rows[i]["input_ids"])] for b, i in enumerate(order)]
        # Training: the loss and a backward as the trainer's step runs them: padding-free, from the hidden
        # states in row chunks (head_loss.py); padded, the model's own (Unsloth's fused cross-entropy).
        del os.environ["UNSLOTH_RETURN_LOGITS"]
        head = head_loss.for_model(model, backend) if padding_free else None
        if padding_free:
            probe["headLoss"] = head.kernel if head else "model"
        model.train()
        train_loss = recipe.model_loss(model, batch, torch.device(device), head)
        train_loss.backward()
        probe.setdefault("callsTraining", varlen_attention.STATS["calls"])
        grads = {name: p.grad.float().flatten().cpu() for name, p in model.named_parameters() if p.grad is not None}
        out["flat" if padding_free else "padded"] = {
            "backend": backend, "loss": float(res.loss), "rows": per_row, "trainLoss": float(train_loss.detach()),
            "grads": grads}
        del model
    names = sorted(out["flat"]["grads"])
    flat, padded = (torch.cat([out[k]["grads"][name] for name in names]) for k in ("flat", "padded"))
    return {
        "calls": varlen_attention.STATS["calls"], "lent": varlen_attention.STATS["lent"], "probe": probe,
        "diffs": [float((a - b).abs().max()) for a, b in zip(out["flat"]["rows"], out["padded"]["rows"], strict=True)],
        "lengths": [len(r) for r in out["flat"]["rows"]],
        "gradTensors": [len(names), len(out["padded"]["grads"])],
        "gradCosine": float(torch.nn.functional.cosine_similarity(flat, padded, dim=0)),
        **{k: {"backend": v["backend"], "loss": v["loss"], "trainLoss": v["trainLoss"]} for k, v in out.items()},
    }


def _spy(model, probe: dict) -> None:
    """Notes which padding-free keywords (ours, `ft_*`, or Unsloth's) reach the decoder, its first layer
    and that layer's attention."""
    from finetune_trainer.train import varlen_attention

    decoder = model.get_base_model().get_decoder()

    def spy(name):
        def hook(module, args, kwargs):
            probe.setdefault(name, sorted(k for k in kwargs
                                          if k.startswith("ft_") or k == varlen_attention.UNSLOTH_LENGTHS))
        return hook

    for name, module in (("decoder", decoder), ("layer0", decoder.layers[0]), ("attn0", decoder.layers[0].self_attn)):
        module.register_forward_pre_hook(spy(name), with_kwargs=True)
    probe["attention"] = model.get_base_model().config._attn_implementation


def run(model_dir, device: str, lengths: list[int], max_len: int, method: str = "lora", timeout: int = 600) -> dict:
    """Runs the check in its own process and returns its result."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, str(model_dir), device, ",".join(map(str, lengths)), str(max_len),
                           method], capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-5000:]
    return json.loads(line[len("RESULT "):])


def assert_same(result: dict, backend: str, lengths: list[int], logit_tolerance: float, head: str) -> None:
    """The verdict: the kernel was reached, and padding-free scores and trains as padded. `head`: how the
    padding-free loss was computed (head_loss.py): "unsloth" or "torch" from the hidden states in row
    chunks, "model" by the model's own forward (Unsloth's fast decoder)."""
    assert result["calls"] > 0, f"the layers did not reach the varlen kernel: {result['probe']}"
    assert result["probe"]["headLoss"] == head, result["probe"]
    assert result["flat"]["backend"] == result["padded"]["backend"] == backend
    assert sorted(result["lengths"]) == sorted(lengths)
    assert result["flat"]["loss"] == pytest.approx(result["padded"]["loss"], rel=1e-2)
    assert max(result["diffs"]) < logit_tolerance, result["diffs"]
    # The training path (the loss as training computes it, backward): every LoRA tensor's gradient.
    assert result["gradTensors"][0] == result["gradTensors"][1] > 0
    assert result["flat"]["trainLoss"] == pytest.approx(result["padded"]["trainLoss"], rel=1e-2)
    assert result["gradCosine"] > 0.99, result


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4]), *sys.argv[5:6])
    print("RESULT " + json.dumps(result), flush=True)
