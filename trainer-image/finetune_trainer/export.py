"""export-gguf: merge the LoRA adapter into 16-bit weights, convert with llama.cpp's own converter,
quantize every other type from that 16-bit file, and write Ollama Modelfiles.

Never Unsloth's save_pretrained_gguf: it clones and compiles llama.cpp at run time and fails offline.
The converter is the one vendored in llama-cpp-python (pinned with it), run as a subprocess because it
must import its own gguf-py, not the published gguf package.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .chat_templates import ChatTemplate
from .errors import ConfigError
from .model_loading import BaseModel, hf_token, hub_offline, load_merged
from .modelfile import write_modelfile
from .paths import converter_dir
from .tokenizer_files import save_tokenizer

log = logging.getLogger(__name__)
CONVERTER_TYPES = ("f32", "f16", "bf16")  # written by the converter itself


@dataclass
class ExportResult:
    merged_dir: Path
    gguf: dict[str, Path] = field(default_factory=dict)
    modelfiles: dict[str, Path] = field(default_factory=dict)
    parity: dict[str, dict] = field(default_factory=dict)
    # Wall seconds per step: the 16-bit conversion ("convert") and each other type by name.
    seconds: dict[str, float] = field(default_factory=dict)


def ftype(quant: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if value is None:
        raise ConfigError("UnknownQuantization", f"llama.cpp has no quantization type {quant!r}")
    return value


def _tokenizer_model(base: BaseModel, tokenizer) -> Path | None:
    """tokenizer.model of the base, wherever it is: without it the converter writes a wrong vocabulary."""
    candidates = [Path(base.source) / "tokenizer.model", Path(getattr(tokenizer, "vocab_file", "") or "/nonexistent")]
    for c in candidates:
        if c.is_file():
            return c
    if not base.local:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(base.source, "tokenizer.model", revision=base.revision, token=hf_token(),
                                        local_files_only=hub_offline()))
        except Exception:  # noqa: BLE001 - not every tokenizer is SentencePiece
            return None
    return None


def merge(base: BaseModel, adapter_dir: Path, out_dir: Path, tokenizer, template: ChatTemplate) -> Path:
    """16-bit HF folder: merged weights, tokenizer (with tokenizer.model) and the chat template."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_merged(base, adapter_dir, device)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    model_type = model.config.model_type
    stop_id = tokenizer.convert_tokens_to_ids(template.stop) if template.stop else None
    del model
    tokenizer.chat_template = template.jinja
    save_tokenizer(tokenizer, out_dir)
    sp = _tokenizer_model(base, tokenizer)
    if sp is not None:
        shutil.copyfile(sp, out_dir / "tokenizer.model")
    elif model_type.startswith("gemma"):
        raise ConfigError("InvalidModel", f"{base.source} has no tokenizer.model; llama.cpp would write a wrong "
                          "vocabulary for a SentencePiece model")
    # HF generation stops at the end-of-turn marker too (llama.cpp treats it as end-of-generation itself).
    gen_file = out_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = [tokenizer.eos_token_id] + ([stop_id] if stop_id not in (None, tokenizer.unk_token_id, tokenizer.eos_token_id) else [])
    gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    gen_file.write_text(json.dumps(gen, indent=2))
    return out_dir


def convert(merged_dir: Path, out_file: Path, outtype: str, name: str) -> Path:
    conv = converter_dir()
    if conv is None:
        raise ConfigError("ConverterNotFound", "llama.cpp's convert_hf_to_gguf.py was not found: set "
                          "LLAMA_CPP_CONVERTER_DIR or run hack/bootstrap.sh")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(merged_dir), "--outfile", str(out_file),
           "--outtype", outtype, "--model-name", name]
    log.info("converting to GGUF %s with %s", outtype, conv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the converter must never reach for the Hub
    env.pop("NO_LOCAL_GGUF", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out_file.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ConfigError("ConversionFailed", f"convert_hf_to_gguf.py failed ({proc.returncode}):\n{tail}")
    return out_file


def quantize(src: Path, out_file: Path, quant: str) -> Path:
    import llama_cpp

    # llama.cpp prints every tensor it converts; keep that out of the logs unless debugging.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(quant)
    params.nthread = os.cpu_count() or 1
    log.info("quantizing %s → %s", src.name, out_file.name)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out_file).encode(), ctypes.byref(params))
    if rc != 0 or not out_file.exists():
        raise ConfigError("QuantizationFailed", f"llama.cpp could not quantize to {quant} (code {rc})")
    return out_file


def export(merged_dir: Path, out_dir: Path, quants: list[str], name: str, template: ChatTemplate,
           modelfiles: bool = True) -> ExportResult:
    """GGUF files (and Modelfiles) for every requested type, from an already merged 16-bit folder."""
    for q in quants:  # fail before the slow conversion
        if q not in CONVERTER_TYPES:
            ftype(q)
    result = ExportResult(merged_dir)
    if not quants:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    # The 16-bit master every quantization starts from: bf16 if asked for and f16 is not.
    master_type = "bf16" if "bf16" in quants and "f16" not in quants else "f16"
    t0 = time.monotonic()
    master = convert(merged_dir, out_dir / f"{name}-{master_type}.gguf", master_type, name)
    result.seconds["convert"] = round(time.monotonic() - t0, 2)
    for q in quants:
        target = out_dir / f"{name}-{q}.gguf"
        if q == master_type:
            result.gguf[q] = master
        else:
            t0 = time.monotonic()
            result.gguf[q] = convert(merged_dir, target, q, name) if q in CONVERTER_TYPES else quantize(master, target, q)
            result.seconds[q] = round(time.monotonic() - t0, 2)
        if modelfiles:
            result.modelfiles[q] = write_modelfile(result.gguf[q], template, name, q)
    if master_type not in quants:
        master.unlink()  # an intermediate, not an artifact
    return result
