"""`finetune run` on a CUDA GPU: Unsloth's FastLanguageModel with bf16 LoRA and 4-bit QLoRA, on the
tiny Gemma 3, through export and parity. Skipped where there is no CUDA device."""

from __future__ import annotations

import json

import pytest

from tests import padding_free_check
from tests.trainer_fixtures import ALPACA_ROWS, cuda_available, run_job, tiny_gemma, trainer_env, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method,padding_free", [("lora", "auto"), ("qlora", "auto"), ("lora", "off"),
                                                 ("qlora", "off")])
def test_finetune_run_with_unsloth(method, padding_free, s3, bucket, tmp_path, monkeypatch):
    """paddingFree auto: 16-bit LoRA and 4-bit QLoRA train padding-free on FlashAttention's varlen
    kernel; off: on padded batches."""
    from finetune_trainer.train import varlen_attention

    for k, v in trainer_env(s3, tmp_path / "term").items():
        monkeypatch.setenv(k, v)
    calls = varlen_attention.STATS["calls"]
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": f"tiny-{method}"},
           "spec": {"baseModel": {"uri": str(tiny_gemma())},
                    "dataset": {"source": str(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS * 8)), "validationSplit": 0.1},
                    "training": {"method": method, "maxSteps": 20, "batchSize": 4, "learningRate": 5e-3,
                                 "maxSeqLength": 64, "checkpointEverySteps": 10, "paddingFree": padding_free},
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
    assert (varlen_attention.STATS["calls"] > calls) == (padding_free == "auto")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_unsloth_padding_free_batches_score_as_padded_ones(method):
    """The padding-free layout through Unsloth's patched, compiled Gemma 3 (16-bit or 4-bit): one [1, T]
    row of sequences on the varlen flash kernel scores and trains (fused loss, LoRA gradients) as the
    same rows padded on the model's own attention. Rows longer than the sliding window (512), so the
    local layers' window is exercised too. Its own process: importing Unsloth patches transformers for
    everything after it."""
    lengths = [600, 130, 700, 90]
    result = padding_free_check.run(tiny_gemma(), "cuda", lengths, 1024, method)
    padding_free_check.assert_same(result, "unsloth", lengths, logit_tolerance=0.1,  # bf16 noise
                                    head="unsloth")
