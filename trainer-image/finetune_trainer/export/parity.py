"""Parity check: does each GGUF predict what the merged Hugging Face model predicts?

On held-out rows, for every position: the HF model's top-1 next token vs the GGUF's (agreement), and
the perplexity of the actual next tokens under each. f16/bf16 should agree almost perfectly; q8_0 and
the K-quants show how much quantization costs. Results go into the manifest and the status metrics.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
MAX_TOKENS = 256  # per row: llama.cpp keeps n_ctx x vocab logits in memory (262k vocab → 1 MB a token)


@torch.no_grad()
def _top1_and_nll(logits: np.ndarray, ids: list[int]) -> dict[str, np.ndarray]:
    """Top-1 predictions and the actual next tokens' negative log-likelihood, from a GGUF's logits.

    In torch (on the GPU where there is one, else on every CPU thread): numpy's single-threaded
    log-softmax over 262k vocabulary columns was most of the parity check's time.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(logits).to(device)
    target = torch.tensor(ids[1:], device=device)
    nll = torch.logsumexp(x[:-1], dim=-1) - x[:-1].gather(1, target[:, None])[:, 0]
    return {"top1": x.argmax(-1).cpu().numpy(), "nll": nll.cpu().numpy()}


def usable_rows(rows: list[list[int]]) -> list[list[int]]:
    """The rows a parity check scores: at least two tokens, at most MAX_TOKENS of each."""
    return [r[:MAX_TOKENS] for r in rows if len(r) >= 2]


@torch.no_grad()
def reference(merged_dir: Path, rows: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """Top-1 predictions and next-token log-probs of the merged model as saved, in fp32."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).to(device).eval()
    out = reference_of(model, rows)
    del model
    return out


@torch.no_grad()
def reference_of(model, rows: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """The same from a model already in memory (fp32, on its device): export's merged model, upcast from
    the 16-bit weights it saved, so the check does not read them back.

    Eager, whatever torch.compile directives the model's classes carry: Unsloth patches them in with
    its import, and rows of as many lengths in fp32 are graphs the training never compiled, compiled
    for a few forwards (the parity reference took about 7 s on an H100 in a process that had not
    compiled them before, 2 s in one that had). The eager model is the truer reference anyway."""
    device = next(model.parameters()).device
    out = []
    with torch.compiler.set_stance("force_eager"):
        for ids in usable_rows(rows):
            logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(ids[1:], device=device)
            out.append({"top1": logits.argmax(-1).cpu().numpy(),
                        "nll": (-logp[:-1].gather(1, target[:, None])[:, 0]).cpu().numpy()})
    return out


def gguf_predictions(gguf_file: Path, rows: list[list[int]]) -> list[dict[str, np.ndarray]]:
    import llama_cpp

    n_ctx = max(len(r) for r in rows) + 8
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=os.cpu_count(), n_gpu_layers=-1, verbose=False)
    out = []
    try:
        for ids in rows:
            llm.reset()
            llm.eval(ids)
            # A view of llama-cpp-python's float32 scores, read before the next eval overwrites them: a
            # copy of a row's logits is 1 MB a token over Gemma's 262k vocabulary.
            out.append(_top1_and_nll(llm.scores[: len(ids)], ids))
    finally:
        llm.close()
    return out


def compare(ref: list[dict], got: list[dict]) -> dict[str, float]:
    agree = np.concatenate([r["top1"] == g["top1"] for r, g in zip(ref, got, strict=True)])
    nll_ref = np.concatenate([r["nll"] for r in ref])
    nll_got = np.concatenate([g["nll"] for g in got])
    return {
        "top1Agreement": round(float(agree.mean()), 4),
        "perplexity": round(math.exp(float(nll_got.mean())), 4),
        "referencePerplexity": round(math.exp(float(nll_ref.mean())), 4),
        "tokens": int(agree.size),
    }


def check(merged_dir: Path, gguf_files: dict[str, Path], rows: list[list[int]],
          ref: list[dict[str, np.ndarray]] | None = None) -> dict[str, dict]:
    """Each GGUF against the merged model; ref: reference_of(the merged model, rows), where made already."""
    rows = usable_rows(rows)
    if not rows:
        return {}
    if ref is None:
        ref = reference(merged_dir, rows)
    results = {}
    for quant, path in gguf_files.items():
        results[quant] = compare(ref, gguf_predictions(path, rows))
        log.info("parity %s: %s", quant, results[quant])
    return results
