"""The output layer (LM head) in torch instead of llama.cpp, for log-likelihood scoring.

For a small model with a large vocabulary the output layer is a large part of every decode (Gemma 3:
262,144 rows). llama.cpp's portable CPU kernels run it as a quantized matmul; torch runs the same
weights through oneDNN, which uses the CPU's bf16 units (AMX, AVX-512 BF16) where it has them.
So llama.cpp runs the transformer body only:

* a ggml scheduler callback (``cb_eval``, :class:`HiddenCapture`) is asked about every graph node;
  it wants ``result_norm`` (the final normed hidden state, one row per token whose logits were
  asked for, in batch order), copies it out with ggml's own accessors and tells the scheduler to
  stop, so the output matmul after it (``result_output``) never runs. llama.cpp still copies its
  (now unwritten) logits buffer after the decode; nothing reads it.
* :class:`TorchHead` multiplies those rows by the head weight, dequantized once from the GGUF
  (``output.weight``, or ``token_embd.weight`` where the model ties them), applies the final logit
  soft-capping where the architecture has one, and reduces each row to its log-sum-exp, its maximum
  and the logits of the tokens asked for, a tile of the vocabulary at a time (a row's logits are
  never all in memory at once). On a CPU the weight and the hidden state are rounded to bf16 and
  multiplied as float32 tensors with oneDNN's bf16 math mode on: bf16 products are exact in float32,
  so the logits are the same (up to summation order) whether torch's dispatcher picks oneDNN's bf16
  kernel (AMX, AVX-512 BF16; which it does for some shapes only) or a float32 GEMM; they are float32
  sums, never rounded to bf16. On CUDA plain float32. The log-sum-exp is float32.

Only architectures whose head llama.cpp 0.3.36 builds as exactly ``output @ result_norm`` (plus
Gemma 2's soft-capping) are allowed (``ARCHITECTURES``, read off ``src/models/<arch>.cpp``); an
output bias or an output scale tensor, an unknown architecture or a weight type gguf-py cannot
dequantize keep llama.cpp's head. ``head="auto"`` (the default, or ``$FINETUNE_EVAL_HEAD``) picks
torch where allowed and torch imports; ``"llamacpp"`` always uses llama.cpp's head; ``"torch"``
fails when it cannot be used.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HEADS = ("auto", "llamacpp", "torch")
HEAD_ENV = "FINETUNE_EVAL_HEAD"
RESULT_NORM = b"result_norm"

# architecture -> (head weight, final logit soft-capping). A head weight of None means output.weight,
# or token_embd.weight when the file has none (tied embeddings); Gemma and Gemma 2 always use
# token_embd.weight. Soft-capping: None = the graph has none; a number = llama.cpp's default when the
# GGUF has no <arch>.final_logit_softcapping key (0 = none).
ARCHITECTURES: dict[str, tuple[str | None, float | None]] = {
    "gemma": ("token_embd.weight", None),
    "gemma2": ("token_embd.weight", 30.0),
    "gemma3": (None, 0.0),
    "llama": (None, None),
    "mistral3": (None, None),
    "phi3": (None, None),
    "qwen2": (None, None),
    "qwen3": (None, None),
}
# Tensors that would make llama.cpp's head more than a matmul: a bias (qwen2, phi3 may have one) and
# the NVFP4 output scales.
_EXTRA_HEAD_TENSORS = ("output.bias", "output.scale", "output.input_scale")
_CPU_TILE = 4096  # vocabulary columns per matmul: a (rows x tile) float32 block stays in cache
_DEQUANT_ROWS = 16384  # weight rows dequantized at once (bounds the float32 scratch)


class HeadUnsupported(ValueError):
    """The torch head cannot reproduce this model's output layer."""


@dataclass(frozen=True)
class HeadSpec:
    arch: str
    weight: str  # GGUF tensor name
    softcap: float  # 0: none


def resolve_head(requested: str | None) -> str:
    """The head asked for: the argument, else $FINETUNE_EVAL_HEAD, else auto."""
    head = (requested or os.environ.get(HEAD_ENV) or "auto").strip().lower()
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    return head


def head_spec(index: GGUFIndex) -> HeadSpec:
    """What the torch head needs from a GGUF file's index; HeadUnsupported says why not."""
    arch = index.fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise HeadUnsupported(f"architecture {arch!r} is not among those whose head is a plain matmul "
                              f"({', '.join(sorted(ARCHITECTURES))})")
    names = index.tensors
    extra = [n for n in _EXTRA_HEAD_TENSORS if n in names]
    if extra:
        raise HeadUnsupported(f"the output layer has {', '.join(extra)}")
    weight, cap_default = ARCHITECTURES[arch]
    if weight is None:
        weight = "output.weight" if "output.weight" in names else "token_embd.weight"
    if weight not in names:
        raise HeadUnsupported(f"no {weight} tensor")
    softcap = 0.0
    if cap_default is not None:
        value = index.fields.get(f"{arch}.final_logit_softcapping")
        softcap = float(cap_default if value is None else value)
        if arch == "gemma2" and softcap <= 0:  # llama.cpp divides by it unconditionally
            raise HeadUnsupported(f"gemma2 with final_logit_softcapping {softcap}")
    return HeadSpec(arch=arch, weight=weight, softcap=softcap)


def choose_head(requested: str | None, path: str | os.PathLike) -> tuple[HeadSpec | None, str]:
    """(spec, reason): spec is None where llama.cpp's head is used; reason says why, for the log.

    ``requested="torch"`` raises HeadUnsupported (or ImportError) instead of falling back.
    """
    head = resolve_head(requested)
    if head == "llamacpp":
        return None, "llama.cpp's head (asked for)"
    try:
        spec = head_spec(GGUFIndex(path))
        import gguf  # noqa: F401  (dequantizes the weight)
        import torch  # noqa: F401
    except (HeadUnsupported, ImportError) as exc:
        if head == "torch":
            raise
        return None, f"llama.cpp's head: {exc}"
    return spec, f"torch head ({spec.arch}, {spec.weight}{f', soft-cap {spec.softcap:g}' if spec.softcap else ''})"


class GGUFIndex:
    """A GGUF file's scalar metadata and tensor table, read without its arrays.

    gguf-py's GGUFReader decodes every array element (a 262k-entry vocabulary takes seconds); this
    reads the header with ``struct`` over an mmap and skips arrays. ``fields``: key -> scalar (arrays
    are None); ``tensors``: name -> (ggml type, dims, absolute byte offset of the data).
    """

    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, path: str | os.PathLike) -> None:
        import mmap
        import struct

        self.path = Path(path)
        with open(self.path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
                raise HeadUnsupported(f"{self.path.name}: not a little-endian GGUF v2/v3 file")
            n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
            at = 24

            def read(fmt: str) -> Any:
                nonlocal at
                value = struct.unpack_from("<" + fmt, buf, at)[0]
                at += struct.calcsize(fmt)
                return value

            def string() -> str:
                nonlocal at
                n = read("Q")
                at += n
                return bytes(buf[at - n:at]).decode("utf-8", errors="replace")

            def value(kind: int) -> Any:
                nonlocal at
                if kind in self._SCALARS:
                    return read(self._SCALARS[kind])
                if kind == 8:
                    return string()
                if kind != 9:
                    raise HeadUnsupported(f"{self.path.name}: unknown GGUF value type {kind}")
                item, count = read("I"), read("Q")
                if item in self._SCALARS:
                    at += count * struct.calcsize(self._SCALARS[item])
                else:
                    for _ in range(count):
                        value(item)
                return None

            self.fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                self.fields[key] = value(read("I"))
            infos = []
            for _ in range(n_tensors):
                name = string()
                dims = [read("Q") for _ in range(read("I"))]
                infos.append((name, read("I"), dims, read("Q")))
            align = int(self.fields.get("general.alignment") or 32)
            start = (at + align - 1) // align * align
            self.tensors: dict[str, tuple[int, list[int], int]] = {
                name: (kind, dims, start + offset) for name, kind, dims, offset in infos}
        finally:
            buf.close()

    def rows(self, name: str) -> tuple[np.ndarray, int]:
        """A 2-D tensor's raw rows (uint8, one row of ggml blocks each, memory-mapped) and its ggml type."""
        import gguf

        kind, dims, offset = self.tensors[name]
        if len(dims) != 2:
            raise HeadUnsupported(f"{name} has {len(dims)} dimensions")
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        row_bytes = dims[0] // block * size
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(dims[1], row_bytes))
        return data, kind


class TorchHead:
    """The output layer of one GGUF file in torch: ``score`` hidden-state rows.

    Args:
        path: the GGUF file.
        spec: from :func:`head_spec`.
        n_vocab, n_embd: what llama.cpp reports for the loaded model (checked against the weight).
        device: ``"cuda"`` when torch sees a GPU, else ``"cpu"`` (default).
        threads: torch CPU threads during the head's work (default: leave torch's setting).
        precision: ``"bf16"`` (weight and hidden state rounded to bf16, float32 sums and logits; the
            CPU default) or ``"fp32"`` (the CUDA default).
    """

    def __init__(self, path: str | os.PathLike, spec: HeadSpec, n_vocab: int, n_embd: int, *,
                 device: str | None = None, threads: int | None = None, precision: str | None = None) -> None:
        import gguf
        import torch

        self._torch = torch
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cpu = self.device.type == "cpu"
        self.precision = precision or ("bf16" if cpu else "fp32")
        if self.precision not in ("bf16", "fp32") or (self.precision == "bf16" and not cpu):
            raise ValueError(f"head precision {self.precision!r} on {self.device.type} (bf16 is a CPU option)")
        self.threads = int(threads) if threads and cpu else None
        data, kind = GGUFIndex(path).rows(spec.weight)
        kind = gguf.GGMLQuantizationType(kind)
        if data.shape[0] != n_vocab:
            raise HeadUnsupported(f"{spec.weight} has {data.shape[0]} rows, the vocabulary {n_vocab}")
        weight = torch.empty((n_vocab, n_embd), dtype=torch.float32, device=self.device)
        for lo in range(0, n_vocab, _DEQUANT_ROWS):
            try:
                rows = gguf.quants.dequantize(data[lo:lo + _DEQUANT_ROWS], kind)
            except NotImplementedError as exc:
                raise HeadUnsupported(f"{spec.weight} is {kind.name}: {exc}") from exc
            rows = rows.reshape(-1, rows.shape[-1])
            if rows.shape[1] != n_embd:
                raise HeadUnsupported(f"{spec.weight} rows have {rows.shape[1]} values, the model {n_embd}")
            chunk = torch.from_numpy(np.require(rows, np.float32, ["C", "W"]))
            weight[lo:lo + len(rows)] = chunk.bfloat16() if self.precision == "bf16" else chunk
        self.weight = weight  # float32 (holding bf16 values for bf16 products)
        self.n_vocab, self.n_embd = n_vocab, n_embd
        self.tile = _CPU_TILE if cpu else n_vocab

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        """Torch's thread count and float32 matmul precision for the head, restored afterwards."""
        torch = self._torch
        threads = torch.get_num_threads()
        if self.threads and threads != self.threads:
            torch.set_num_threads(self.threads)
        backend = torch.backends.mkldnn.matmul if self.device.type == "cpu" else torch.backends.cuda.matmul
        before = backend.fp32_precision
        backend.fp32_precision = "bf16" if self.precision == "bf16" else "ieee"
        try:
            with torch.inference_mode():
                yield
        finally:
            backend.fp32_precision = before
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _tiles(self, hidden: np.ndarray) -> Iterator[tuple[int, Any]]:
        """(first column, logits of every row over that tile of the vocabulary), float32, soft-capped."""
        torch = self._torch
        h = torch.from_numpy(np.require(hidden, np.float32, ["C", "W"])).to(self.device)
        if self.precision == "bf16":
            h = h.bfloat16().float()
        buf = torch.empty((len(h), min(self.tile, self.n_vocab)), dtype=torch.float32, device=self.device)
        cap = self.spec.softcap
        for lo in range(0, self.n_vocab, self.tile):
            w = self.weight[lo:lo + self.tile]
            y = torch.mm(h, w.t(), out=buf[:, :len(w)])
            if cap:
                y.div_(cap).tanh_().mul_(cap)
            yield lo, y

    def score(self, hidden: np.ndarray, wanted: dict[int, set[int]]) -> tuple[dict[tuple[int, int], float],
                                                                             dict[tuple[int, int], bool]]:
        """For each row r of ``hidden`` in ``wanted`` and each token t wanted there: log_softmax(logits[r])[t]
        and whether logits[r, t] is the row's maximum (greedy)."""
        torch = self._torch
        rows = sorted(wanted)
        if not rows:
            return {}, {}
        pairs = sorted((t, i) for i, r in enumerate(rows) for t in wanted[r])
        tok = np.fromiter((t for t, _ in pairs), dtype=np.int64, count=len(pairs))
        if tok[0] < 0 or tok[-1] >= self.n_vocab:
            raise ValueError(f"token id outside the vocabulary of {self.n_vocab}")
        at = torch.from_numpy(np.fromiter((i for _, i in pairs), dtype=np.int64, count=len(pairs))).to(self.device)
        cols = torch.from_numpy(tok).to(self.device)
        bounds = np.searchsorted(tok, np.arange(0, self.n_vocab + self.tile, self.tile))
        n = len(rows)
        with self._mode():
            peak = torch.full((n,), -torch.inf, device=self.device)
            total = torch.zeros(n, device=self.device)
            picked = torch.empty(len(pairs), device=self.device)
            for k, (lo, y) in enumerate(self._tiles(hidden[rows])):
                a, b = bounds[k], bounds[k + 1]
                if b > a:
                    picked[a:b] = y[at[a:b], cols[a:b] - lo]
                top = torch.maximum(peak, y.amax(dim=1))
                # online log-sum-exp: rescale the running sum to the new maximum, add this tile's terms
                total.mul_(torch.exp(peak - top)).add_(y.sub_(top[:, None]).exp_().sum(dim=1))
                peak = top
            logprob = (picked - (peak + total.log())[at]).tolist()
            greedy = (picked >= peak[at]).tolist()
        logprobs, greedies = {}, {}
        for (t, i), lp, g in zip(pairs, logprob, greedy, strict=True):
            logprobs[rows[i], t] = lp
            greedies[rows[i], t] = g
        return logprobs, greedies


class HiddenCapture:
    """llama.cpp's ``cb_eval``: copy ``result_norm`` of every compute step of a decode and stop there.

    ggml's scheduler asks the callback about each node (``ask=True``: is this tensor wanted?),
    computes up to the first wanted one, then calls it again (``ask=False``) with the result; a False
    answer ends the computation of that graph split. With every layer on one backend the whole graph
    is one split, so nothing after ``result_norm`` (the output matmul) runs. A decode of several
    ubatches computes several graphs, each adding its rows (llama.cpp splits a batch in order: the
    unified KV cache takes the simple split).

    The tensor is read with ggml's exported accessors (``ggml_get_name``, ``ggml_nrows``,
    ``ggml_backend_tensor_get``), not through the struct's layout. ``trace``, when a list, records
    every node name asked about (tests use it to see that nothing after ``result_norm`` was asked for).
    With ``enabled`` False the callback wants no tensor and llama.cpp computes its own logits.
    """

    def __init__(self, n_embd: int, max_rows: int) -> None:
        import llama_cpp

        lib = _ggml_base(llama_cpp)
        self._name = lib.ggml_get_name
        self._nrows = lib.ggml_nrows
        self._nelements = lib.ggml_nelements
        self._nbytes = lib.ggml_nbytes
        self._get = lib.ggml_backend_tensor_get
        self.n_embd = int(n_embd)
        self.buffer = np.empty((int(max_rows), self.n_embd), dtype=np.float32)
        self.rows = 0
        self.enabled = True  # False: want nothing, the graph runs to its end (llama.cpp's own logits)
        self.error: str | None = None
        self.trace: list[bytes] | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._eval)  # keep a reference

    def reset(self) -> None:
        self.rows = 0
        self.error = None

    def hidden(self, expected: int) -> np.ndarray:
        """The rows captured since ``reset`` (a view, valid until the next decode)."""
        if self.error is None and self.rows != expected:
            self.error = f"captured {self.rows} rows of result_norm, the batch asked for {expected}"
        if self.error is not None:
            raise RuntimeError(f"torch head: {self.error}")
        return self.buffer[:expected]

    def _eval(self, tensor: int, ask: bool, _user: Any) -> bool:
        try:
            name = self._name(tensor)
            if ask:
                if self.trace is not None:
                    self.trace.append(name)
                return self.enabled and name == RESULT_NORM
            if name != RESULT_NORM:
                return True
            rows, values = self._nrows(tensor), self._nelements(tensor)
            if values != rows * self.n_embd or self._nbytes(tensor) != 4 * values:
                self.error = f"result_norm holds {values} values in {self._nbytes(tensor)} bytes, not float32 rows of {self.n_embd}"
                return False
            if self.rows + rows > len(self.buffer):
                self.error = f"result_norm rows exceed the {len(self.buffer)} outputs a decode may have"
                return False
            if rows:
                self._get(tensor, self.buffer[self.rows:].ctypes.data, 0, 4 * values)
            self.rows += rows
            return False  # the rest of the graph is the output layer: skip it
        except Exception as exc:  # an exception cannot cross the C boundary; report it after the decode
            self.error = f"{type(exc).__name__}: {exc}"
            return False


def _ggml_base(llama_cpp: Any) -> ctypes.CDLL:
    """libggml-base next to llama-cpp-python's libllama (the copy libllama already loaded)."""
    from llama_cpp._ctypes_extensions import load_shared_library

    base = getattr(llama_cpp.llama_cpp, "_base_path", None) or Path(llama_cpp.__file__).parent / "lib"
    lib = load_shared_library("ggml-base", Path(base))
    tensor = ctypes.c_void_p
    lib.ggml_get_name.argtypes, lib.ggml_get_name.restype = [tensor], ctypes.c_char_p
    lib.ggml_nrows.argtypes, lib.ggml_nrows.restype = [tensor], ctypes.c_int64
    lib.ggml_nelements.argtypes, lib.ggml_nelements.restype = [tensor], ctypes.c_int64
    lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [tensor], ctypes.c_size_t
    lib.ggml_backend_tensor_get.argtypes = [tensor, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib
