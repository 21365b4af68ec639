"""`finetune run` on model families beyond Gemma 3 (the product's next targets), against a real local
S3, on CPU and, where CUDA exists, through Unsloth: a tiny random Llama and a tiny random Gemma 2,
each with the Gemma 3 SentencePiece tokenizer (the converter reads any SentencePiece vocabulary),
trained, exported to f16 and q8_0 GGUF of llama.cpp's architecture for that family, checked for
parity and uploaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer_fixtures import (
    ALPACA_ROWS,
    cuda_available,
    run_job,
    save_with_gemma_tokenizer,
    trainer_env,
    write_jsonl,
)

# family: (transformers config and model class names, config fields, llama.cpp's architecture name)
SHAPE = dict(vocab_size=262144, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
             pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "llama"),
    # Gemma 2 caps attention and final logits (soft-capping) and alternates sliding and global layers.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 32, "query_pre_attn_scalar": 64}, "gemma2"),
}


def build_model(family: str, out: Path) -> Path:
    import torch
    import transformers

    config_cls, model_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SHAPE, **extra)
    return save_with_gemma_tokenizer(getattr(transformers, model_cls)(config).to(torch.bfloat16), out)


def run_family(family: str, s3, bucket: str, tmp_path: Path, monkeypatch, gpus: int) -> dict:
    """`finetune run` on the family's tiny model; checks what holds on every device, returns the metrics."""
    from gguf import GGUFReader

    for k, v in trainer_env(s3, tmp_path / "termination-log").items():
        monkeypatch.setenv(k, v)
    model = build_model(family, tmp_path / family)
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 5)
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
           "metadata": {"name": f"tiny-{family}", "namespace": "team-a"},
           "spec": {"baseModel": {"uri": str(model)}, "dataset": {"source": str(data)},
                    "training": {"maxSteps": 12, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 64},
                    "export": {"gguf": ["f16", "q8_0"], "paritySamples": 4},
                    "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True}},
                    "resources": {"gpus": gpus}}}
    rc, _, workdir = run_job(job, tmp_path)
    assert rc == 0

    losses = [json.loads(line)["loss"] for line in (workdir / "train-log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[:2]) / 2 - sum(losses[-2:]) / 2 > 1.0, losses
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["parity"]["f16"]["top1Agreement"] >= 0.95, metrics["parity"]
    assert metrics["parity"]["q8_0"]["top1Agreement"] >= 0.8, metrics["parity"]
    arch = FAMILIES[family][3]
    for quant in ("f16", "q8_0"):
        reader = GGUFReader(str(workdir / "gguf" / f"tiny-{family}-{quant}.gguf"))
        assert reader.fields["general.architecture"].contents() == arch
        assert reader.fields[f"{arch}.block_count"].contents() == SHAPE["num_hidden_layers"]
    uploaded = {o["Key"].rsplit("/", 1)[-1] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert {f"tiny-{family}-f16.gguf", f"tiny-{family}-q8_0.gguf", "manifest.json"} <= uploaded
    return metrics


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_trains_exports_and_keeps_parity(family, s3, bucket, tmp_path, monkeypatch):
    assert run_family(family, s3, bucket, tmp_path, monkeypatch, gpus=0)["backend"] == "transformers"


def test_the_unsloth_switches_a_family_needs_follow_its_config(tmp_path):
    """model_loading reads the model_type from the folder's config and sets that family's Unsloth
    switches before Unsloth loads it: Gemma 2 trains without the block compile (see the GPU test)."""
    from finetune_trainer.train.model_loading import UNSLOTH_FAMILY_ENV, BaseModel, model_type

    assert model_type(BaseModel(str(build_model("gemma2", tmp_path / "gemma2")))) == "gemma2"
    assert model_type(BaseModel(str(build_model("llama", tmp_path / "llama")))) == "llama"
    assert model_type(BaseModel(str(tmp_path / "nowhere"))) is None  # from_pretrained then says why
    assert UNSLOTH_FAMILY_ENV["gemma2"] == {"UNSLOTH_BLOCK_COMPILE": "0"} and "llama" not in UNSLOTH_FAMILY_ENV


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family,padding_free", [("llama", True), ("gemma2", False)])
def test_a_family_trains_with_unsloth(family, padding_free, s3, bucket, tmp_path, monkeypatch):
    """The same on a GPU, through Unsloth. Llama trains padding-free (`auto`) through Unsloth's own packed
    attention; Gemma 2 on padded batches (its attention softcaps logits), without Unsloth's block compile
    (model_loading.UNSLOTH_FAMILY_ENV: with it, Inductor failed compiling the block's backward)."""
    from finetune_trainer.train import varlen_attention

    calls = varlen_attention.STATS["calls"]
    assert run_family(family, s3, bucket, tmp_path, monkeypatch, gpus=1)["backend"] == "unsloth"
    assert (varlen_attention.STATS["calls"] > calls) == padding_free


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_unsloth_padding_free_llama_batches_score_as_padded_ones(tmp_path):
    """Llama under Unsloth, one [1, T] row of sequences handed over as `packed_seq_lengths`, against the
    same rows padded: logits, fused loss and every LoRA gradient (tests/padding_free_check.py, its own
    process)."""
    from tests import padding_free_check

    lengths = [600, 130, 700, 90]
    result = padding_free_check.run(build_model("llama", tmp_path / "llama"), "cuda", lengths, 1024)
    padding_free_check.assert_same(result, "unsloth", lengths, logit_tolerance=0.1,  # bf16 noise
                                    head="model")
    assert result["probe"]["attn0"] == ["packed_seq_lengths"]  # Unsloth's keyword, none of ours
    assert result["lent"] > 0  # Unsloth ran the packed row on the lent varlen kernel, not per sequence
