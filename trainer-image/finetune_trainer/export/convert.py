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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.chat_templates import ChatTemplate
from ..errors import ConfigError
from ..paths import converter_dir
from ..train.model_loading import BaseModel, hf_token, hub_offline, load_merged
from .converter_child import AHEAD_PREFIX, COMPLETE
from .modelfile import write_modelfile
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


def _derived_buffers(model) -> dict[str, Any]:
    """The buffers a model computes at construction rather than reads from its checkpoint (RoPE's
    inv_freq, Gemma's embed_scale), as a float32 load of the saved folder computes them: a bf16 round
    trip of these shifts every position's rotation and skews the parity reference. Built on a skeleton
    whose weights are never allocated."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on the meta device; buffers real, on the CPU
        skeleton = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    saved = skeleton.state_dict().keys()
    return {n: b for n, b in skeleton.named_buffers() if n not in saved and n in dict(model.named_buffers())}


def merge(base: BaseModel, adapter_dir: Path, out_dir: Path, tokenizer, template: ChatTemplate,
          with_model: Callable[[Any], None] | None = None,
          on_saved: Callable[[Path], None] | None = None, seconds: dict[str, float] | None = None,
          tokenizer_files: Path | None = None) -> Path:
    """16-bit HF folder: merged weights, tokenizer (with tokenizer.model) and the chat template.

    on_saved: called with the folder once it is complete on disk, before with_model: export starts
    the conversion there, so the converter (CPU) and the reference predictions (GPU) run at once.
    with_model: called with the merged model as saved (16-bit weights, upcast to fp32, on the device
    it merged on) before it is freed, e.g. for the parity check's reference predictions.
    seconds: filled with the wall time of loading and merging ("load") and of writing the folder ("save").
    tokenizer_files: the tokenizer files staged ahead (stage_tokenizer_files), copied where complete.
    """
    import torch

    t0 = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_merged(base, adapter_dir, device)
    t1 = time.monotonic()
    shutil.rmtree(out_dir, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    _write_tokenizer(base, tokenizer, template, model.config.model_type, out_dir, tokenizer_files)
    if seconds is not None:
        seconds.update(load=round(t1 - t0, 2), save=round(time.monotonic() - t1, 2))
    if on_saved is not None:
        on_saved(out_dir)
    if with_model is not None:
        model.float()
        for name, value in _derived_buffers(model).items():
            model.get_buffer(name).copy_(value)
        with_model(model.eval())
    del model
    return out_dir


def _write_tokenizer_files(base: BaseModel, tokenizer, template: ChatTemplate, out_dir: Path) -> None:
    """The tokenizer files (with the chat template) and SentencePiece's tokenizer.model, where the base has one."""
    tokenizer.chat_template = template.jinja
    save_tokenizer(tokenizer, out_dir)
    sp = _tokenizer_model(base, tokenizer)
    if sp is not None:
        shutil.copyfile(sp, out_dir / "tokenizer.model")


def stage_tokenizer_files(base: BaseModel, tokenizer, template: ChatTemplate, out_dir: Path) -> Path:
    """The merged folder's tokenizer files, written ahead (while the model trains) and marked complete
    last: the warm converter parses them meanwhile, and merge copies them, so the converter meets the
    very bytes it parsed."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    _write_tokenizer_files(base, tokenizer, template, out_dir)
    (out_dir / COMPLETE).write_text("")
    return out_dir


def _write_tokenizer(base: BaseModel, tokenizer, template: ChatTemplate, model_type: str, out_dir: Path,
                     staged: Path | None = None) -> None:
    """The tokenizer files, tokenizer.model and the generation config's stop tokens, beside the weights.
    staged: stage_tokenizer_files' folder, copied where it is complete."""
    if staged is not None and (staged / COMPLETE).exists():
        for f in staged.iterdir():
            if f.name != COMPLETE:
                shutil.copyfile(f, out_dir / f.name)
    else:
        _write_tokenizer_files(base, tokenizer, template, out_dir)
    if model_type.startswith("gemma") and not (out_dir / "tokenizer.model").exists():
        raise ConfigError("InvalidModel", f"{base.source} has no tokenizer.model; llama.cpp would write a wrong "
                          "vocabulary for a SentencePiece model")
    # HF generation stops at the end-of-turn marker too (llama.cpp treats it as end-of-generation itself).
    stop_id = tokenizer.convert_tokens_to_ids(template.stop) if template.stop else None
    gen_file = out_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = [tokenizer.eos_token_id] + ([stop_id] if stop_id not in (None, tokenizer.unk_token_id, tokenizer.eos_token_id) else [])
    gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    gen_file.write_text(json.dumps(gen, indent=2))


def _converter() -> Path:
    conv = converter_dir()
    if conv is None:
        raise ConfigError("ConverterNotFound", "llama.cpp's convert_hf_to_gguf.py was not found: set "
                          "LLAMA_CPP_CONVERTER_DIR or run hack/bootstrap.sh")
    return conv


def _converter_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the converter must never reach for the Hub
    env.pop("NO_LOCAL_GGUF", None)
    return env


class WarmConverter:
    """llama.cpp's converter started ahead (while the model trains), ready for one conversion at export
    (converter_child.py). tokenizer_dir: the merged folder's tokenizer files, being written ahead
    (stage_tokenizer_files), for the child to parse meanwhile.

    The same converter, arguments and environment as a cold `convert`, so the same file comes out; a
    child that died or was never asked is replaced by a cold run, or ended by close()."""

    def __init__(self, base_source: str, tokenizer_dir: Path | None = None):
        self.tokenizer_dir = tokenizer_dir
        self.proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer.export.converter_child", str(_converter()), base_source,
             str(tokenizer_dir or "")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_converter_env())

    def take(self) -> subprocess.Popen | None:
        """The child, once (None if it is gone already)."""
        proc, self.proc = self.proc, None
        return proc if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        proc = self.take()
        if proc is not None:
            try:
                proc.communicate("", timeout=30)  # stdin closed at once: it exits without converting
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def convert(merged_dir: Path, out_file: Path, outtype: str, name: str, warm: WarmConverter | None = None) -> Path:
    conv = _converter()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(merged_dir), "--outfile", str(out_file), "--outtype", outtype, "--model-name", name]
    child = warm.take() if warm is not None else None
    log.info("converting to GGUF %s with %s%s", outtype, conv, " (started ahead)" if child else "")
    if child is not None:
        stdout, stderr = child.communicate(json.dumps(argv) + "\n")
        proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
        for line in stdout.splitlines():
            if line.startswith(AHEAD_PREFIX):
                log.info("converter: tokenizer files parsed ahead %s", line[len(AHEAD_PREFIX):])
    else:
        proc = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), *argv], capture_output=True,
                              text=True, env=_converter_env())
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
           modelfiles: bool = True, warm: WarmConverter | None = None) -> ExportResult:
    """GGUF files (and Modelfiles) for every requested type, from an already merged 16-bit folder.
    warm: a converter started ahead, for the 16-bit master."""
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
    master = convert(merged_dir, out_dir / f"{name}-{master_type}.gguf", master_type, name, warm)
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
