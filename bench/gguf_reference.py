"""A full-precision twin of a quantized GGUF, for checking the evaluation's arithmetic on a real model.

    .venv/bin/python bench/gguf_reference.py --gguf gemma-3-270m-q4_k_m.gguf --out /tmp/ref
    # → /tmp/ref/hf/ (the dequantized weights as float32 safetensors + the GGUF's tokenizer rebuilt)
    #   /tmp/ref/model-f32.gguf (the same weights back in an f32 GGUF)
    .venv/bin/python bench/eval_speed.py --piqa PIQA --gguf /tmp/ref/model-f32.gguf --kv-type f32 \\
        --hf-reference /tmp/ref/hf --baselines --heads llamacpp,torch:fp32

A q4_k_m file cannot be compared with a PyTorch model to 0.01 nats: llama.cpp's CPU kernels round
activations to 8 bits before each quantized matmul, so any change in summation order moves a
long answer by tenths of a nat (docs/evaluation.md). Dequantized once to float32, the same weights
exist in both worlds with no quantization left, so the packed llama.cpp scoring and lm-eval's own
`hf` model must agree up to float32 arithmetic — what the issue's 0.01-nat bar is about.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer-image"))


def dequantize(gguf: Path, out: Path) -> Path:
    """The GGUF's weights as a float32 Hugging Face folder (transformers dequantizes while loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer.train.gguf_tokenizer import tokenizer_from_gguf

    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # loaded from a GGUF it still says it is quantized; save_pretrained refuses that
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer_from_gguf(gguf, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    from finetune_trainer.export.convert import convert

    hf = dequantize(args.gguf.resolve(), args.out / "hf")
    f32 = args.out / "model-f32.gguf"
    if not f32.exists():
        convert(hf, f32, "f32", args.gguf.stem)
    print(f"reference: {hf} and {f32} ({f32.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
