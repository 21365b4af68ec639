"""The real Gemma 3 270M (google/gemma-3-270m, from the PyPI GGUF): dequantize, fine-tune a few steps
on CPU, export q8_0, check parity and that the GGUF's vocabulary is the original one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer_fixtures import real_gguf, run_job, trainer_env

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def test_fine_tune_the_real_270m_from_its_gguf_and_export_q8_0(s3, bucket, tmp_path, monkeypatch):
    import llama_cpp

    for k, v in trainer_env(s3, tmp_path / "term").items():
        monkeypatch.setenv(k, v)
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "gemma-270m"},
           "spec": {"baseModel": {"uri": str(real_gguf())},
                    "dataset": {"source": str(EXAMPLES / "alpaca-mini.jsonl"), "validationSplit": 0.2},
                    "training": {"maxSteps": 3, "batchSize": 2, "maxSeqLength": 128, "learningRate": 2e-4},
                    "export": {"gguf": ["q8_0"], "paritySamples": 4, "adapter": True},
                    "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True}},
                    "resources": {"gpus": 0}}}
    code, _, workdir = run_job(job, tmp_path)
    assert code == 0

    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0 < metrics["trainLoss"] < 20
    assert metrics["parity"]["q8_0"]["top1Agreement"] >= 0.9
    assert (workdir / "merged" / "tokenizer.model").exists()

    exported = llama_cpp.Llama(str(workdir / "gguf" / "gemma-270m-q8_0.gguf"), n_ctx=128, verbose=False)
    original = llama_cpp.Llama(str(real_gguf()), vocab_only=True, verbose=False)
    try:
        for text in ("The capital of France is", "<start_of_turn>user\nhi<end_of_turn>\n", "  spaced\n\n\ttabs"):
            assert exported.tokenize(text.encode(), special=True) == original.tokenize(text.encode(), special=True)
        assert exported.n_vocab() == original.n_vocab() == 262144
        out = exported.create_completion("The capital of France is", max_tokens=5, temperature=0)
        assert out["choices"][0]["text"].strip()
    finally:
        exported.close()
        original.close()
