"""`finetune run` on a CUDA GPU: Unsloth's FastLanguageModel with bf16 LoRA and 4-bit QLoRA, on the
tiny Gemma 3, through export and parity. Skipped where there is no CUDA device."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.trainer_fixtures import ALPACA_ROWS, run_job, tiny_gemma, trainer_env, write_jsonl


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_run_with_unsloth(method, s3, tmp_path, monkeypatch):
    for k, v in trainer_env(s3, tmp_path / "term").items():
        monkeypatch.setenv(k, v)
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
