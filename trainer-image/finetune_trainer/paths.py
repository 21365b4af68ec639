"""Where things live: the cache outside the checkout, llama.cpp's converter, and the run's workdir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is the converter we use
IMAGE_CONVERTER_DIR = Path("/opt/llama.cpp")


def cache_dir() -> Path:
    """The project's cache outside the checkout: $FTO_CACHE, else $XDG_CACHE_HOME/finetune-operator.
    The one rule for Python (devstack and evaluation use it too); hack/bootstrap.sh and
    hack/build-stack.sh spell it in shell, since they run before any virtualenv exists."""
    if os.environ.get("FTO_CACHE"):
        return Path(os.environ["FTO_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "finetune-operator"


def converter_dir() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py with its own conversion/ and gguf-py/ next to it."""
    candidates = [os.environ.get("LLAMA_CPP_CONVERTER_DIR"), IMAGE_CONVERTER_DIR,
                  cache_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}"]
    for c in candidates:
        if c and (Path(c) / "convert_hf_to_gguf.py").is_file():
            return Path(c)
    return None


@dataclass(frozen=True)
class Workdir:
    """The layout of one run's scratch space; every stage reads and writes only here (and S3)."""

    root: Path

    @property
    def base_model(self) -> Path:  # a base model fetched from S3 or dequantized from GGUF
        return self.root / "base-model"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def tokenizer_ahead(self) -> Path:  # the merged folder's tokenizer files, written while the model trains
        return self.root / "tokenizer-ahead"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def train_log(self) -> Path:
        return self.root / "train-log.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss-curve.png"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def ensure(self) -> Workdir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self
