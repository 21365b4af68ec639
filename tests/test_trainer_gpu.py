"""`finetune run` on a CUDA GPU: Unsloth's FastLanguageModel with bf16 LoRA and 4-bit QLoRA, on the
tiny Gemma 3, through export and parity. Skipped where there is no CUDA device."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.trainer_fixtures import ALPACA_ROWS, run_job, tiny_gemma, trainer_env, write_jsonl


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method,attention", [("lora", "model"), ("qlora", "model"), ("lora", "varlen")])
def test_finetune_run_with_unsloth(method, attention, s3, tmp_path, monkeypatch):
    """varlen: padding-free batches on FlashAttention's varlen kernel (FINETUNE_ATTENTION=varlen)."""
    from finetune_trainer import varlen_attention

    for k, v in trainer_env(s3, tmp_path / "term").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FINETUNE_ATTENTION", attention)
    calls = varlen_attention.STATS["calls"]
    bucket = s3.make_bucket(f"gpu-{uuid.uuid4().hex[:10]}")
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": f"tiny-{method}"},
           "spec": {"baseModel": {"uri": str(tiny_gemma())},
                    "dataset": {"source": str(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS * 8)), "validationSplit": 0.1},
                    "training": {"method": method, "maxSteps": 20, "batchSize": 4, "learningRate": 5e-3,
                                 "maxSeqLength": 64, "checkpointEverySteps": 10},
                    "export": {"gguf": ["f16", "q8_0"], "paritySamples": 3},
                    "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True}},
                    "resources": {"gpus": 1}}}
    code, _, workdir = run_job(job, tmp_path)
    assert code == 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["backend"] == "unsloth", "the GPU path must train with Unsloth"
    assert metrics["steps"] == 20
    losses = [json.loads(line)["loss"] for line in (workdir / "train-log.jsonl").read_text().splitlines()]
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 1.0, losses
    assert metrics["parity"]["f16"]["top1Agreement"] >= 0.99
    assert (varlen_attention.STATS["calls"] > calls) == (attention == "varlen")


UNSLOTH_PADDING_FREE = r"""
import json, os, sys
import torch
from finetune_api.spec import TrainingSpec
from finetune_trainer import varlen_attention
from finetune_trainer.batching import Batches
from finetune_trainer.model_loading import BaseModel, early_imports, load_for_training

early_imports()
g = torch.Generator().manual_seed(0)
rows = [{"input_ids": (ids := torch.randint(3, 262144, (n,), generator=g).tolist()), "labels": ids}
        for n in (600, 130, 700, 90)]
training = TrainingSpec(max_seq_length=1024, batch_size=4)
out, probe = {}, {}
for padding_free in (True, False):
    torch.manual_seed(0)  # the same LoRA initialisation for both
    model, backend = load_for_training(BaseModel(source=sys.argv[1]), training)
    extra = varlen_attention.enable(model) if padding_free else {}
    batch = Batches(rows, 4, 1024, 0, 0, bucket=True, padding_free=padding_free).get(0)
    if padding_free:  # where the keywords get to, should the kernel not be reached
        base = model.get_base_model()
        probe["attention"] = base.config._attn_implementation
        decoder = base.get_decoder()

        def spy(name):
            def hook(module, args, kwargs):
                probe.setdefault(name, sorted(k for k in kwargs if k.startswith("ft_")))
            return hook

        for name, module in (("decoder", decoder), ("layer0", decoder.layers[0]), ("attn0", decoder.layers[0].self_attn)):
            module.register_forward_pre_hook(spy(name), with_kwargs=True)
    # Scoring: logits come back only with UNSLOTH_RETURN_LOGITS (then the loss takes the plain path).
    os.environ["UNSLOTH_RETURN_LOGITS"] = "1"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        res = model(**batch.model_inputs("cuda"), **(extra or {}), use_cache=False)
    logits = res.logits.float()
    probe.setdefault("callsScoring", varlen_attention.STATS["calls"])
    if padding_free:
        starts = batch.cu_seqlens.tolist()
        per_row = [logits[0, starts[b]:starts[b + 1]] for b in range(4)]
    else:
        order = Batches(rows, 4, 1024, 0, 0).rows_of(0)
        per_row = [logits[b, : len(rows[i]["input_ids"])] for b, i in enumerate(order)]
    # Training: the fused cross-entropy (no logits) and a backward, as the trainer's step runs them.
    del os.environ["UNSLOTH_RETURN_LOGITS"]
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        train_loss = model(**batch.model_inputs("cuda"), **(extra or {}), use_cache=False).loss
    train_loss.backward()
    probe.setdefault("callsTraining", varlen_attention.STATS["calls"])
    print("PROBE " + json.dumps(probe), file=sys.stderr, flush=True)
    grads = {n: p.grad.float().flatten().cpu() for n, p in model.named_parameters() if p.grad is not None}
    out["flat" if padding_free else "padded"] = {"backend": backend, "loss": float(res.loss), "rows": per_row,
                                                 "trainLoss": float(train_loss), "grads": grads}
    del model
diffs = [float((a - b).abs().max()) for a, b in zip(out["flat"]["rows"], out["padded"]["rows"])]
names = sorted(out["flat"]["grads"])
flat, padded = (torch.cat([out[k]["grads"][n] for n in names]) for k in ("flat", "padded"))
print("RESULT " + json.dumps({
    "calls": varlen_attention.STATS["calls"], "probe": probe, "diffs": diffs, "lengths": [len(r) for r in out["flat"]["rows"]],
    "gradTensors": [len(names), len(out["padded"]["grads"])],
    "gradCosine": float(torch.nn.functional.cosine_similarity(flat, padded, dim=0)),
    **{k: {"backend": v["backend"], "loss": v["loss"], "trainLoss": v["trainLoss"]} for k, v in out.items()}}))
"""


def test_unsloth_padding_free_batches_score_as_padded_ones(tmp_path):
    """The padding-free layout through Unsloth's patched Gemma 3: one [1, T] row of sequences on the
    varlen flash kernel scores as the same rows padded, on the model's own attention. Rows longer than
    the sliding window (512), so the local layers' window is exercised too. Its own process: importing
    Unsloth patches transformers' Gemma 3 for everything after it."""
    import subprocess
    import sys

    script = tmp_path / "padding_free.py"
    script.write_text(UNSLOTH_PADDING_FREE)
    env = {**os.environ, "FINETUNE_ATTENTION": "varlen", "UNSLOTH_RETURN_LOGITS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tiny_gemma())], capture_output=True, text=True,
                          env=env, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-5000:]
    result = json.loads(line[len("RESULT "):])
    assert result["calls"] > 0, f"Unsloth's layers did not reach the varlen kernel: {result['probe']}"
    assert result["flat"]["backend"] == result["padded"]["backend"] == "unsloth"
    assert sorted(result["lengths"]) == [90, 130, 600, 700]
    assert result["flat"]["loss"] == pytest.approx(result["padded"]["loss"], rel=1e-2)
    assert max(result["diffs"]) < 0.1, result["diffs"]  # per-token logits agree to bf16 noise
    # The training path (fused cross-entropy, backward): same loss, same gradients on every LoRA tensor.
    assert result["gradTensors"][0] == result["gradTensors"][1] > 0
    assert result["flat"]["trainLoss"] == pytest.approx(result["padded"]["trainLoss"], rel=1e-2)
    assert result["gradCosine"] > 0.99, result
