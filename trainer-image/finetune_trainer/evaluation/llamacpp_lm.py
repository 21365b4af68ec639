"""lm-eval model ``llama-cpp-inprocess``: a GGUF file scored in this process through llama-cpp-python.

lm-eval's own ``gguf`` model sends one HTTP request per (context, continuation) to a llama.cpp
server and reads top-10 logprobs back, which is orders of magnitude slower (docs/benchmarks.md,
"Evaluation speed"). This class calls ``llama_decode`` directly and asks llama.cpp for logits
only at the positions that are scored, so nothing else crosses the C boundary.

How requests are batched:

* **loglikelihood** (``packed=True``, the default): requests are tokenized like lm-eval's ``hf``
  model (context + continuation encoded together, the continuation is whatever follows the
  context's tokens), one sequence per distinct input, sorted. ``packing.plan`` lays many sequences
  into one ``llama_decode`` as a token trie: a token shared by several sequences (few-shot prefix,
  question, the common start of two answers) is decoded once for all of them (``seq_id`` lists
  each sequence through it; the KV cache is unified and cleared between batches), and logits are
  computed only at scored positions. Log-softmax is taken at those rows only.
  ``packed=False`` is the earlier path: one sequence per decode, consecutive sorted requests
  sharing the KV cells of their common prefix (``prefix_cache``).
* **loglikelihood_rolling**: lm-eval's disjoint rolling windows of ``max_length`` tokens, each
  scored as a loglikelihood request and summed per document.
* **generate_until**: greedy decoding, one sequence at a time, stopping at an end-of-generation
  token, a stop string or ``max_gen_toks``; prompts are sorted so that shared few-shot prefixes
  stay in the KV cache.

Where the logits come from (``head``): llama.cpp's own output layer, or, for the architectures
``head.ARCHITECTURES`` allows, llama.cpp runs the transformer body only and torch computes the output
layer and the log-softmax at the rows asked for (``head.py``: bf16 matmuls with float32 logits on a
CPU, float32 on CUDA). The packed and the sequential path read their rows through the same
``_Logits``/``_Hidden`` interface, so either head serves both; greedy generation (one row per
decode) keeps llama.cpp's head.

Sliding-window models (Gemma 3) are loaded with ``swa_full=True``: the KV cache then keeps every
position, which prefix reuse needs (a pruned sliding-window cache cannot be rolled back).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ..cpus import usable_cpus
from . import packing
from .head import HeadUnsupported, HiddenCapture, TorchHead, choose_head, resolve_head

log = logging.getLogger(__name__)

MODEL_NAME = "llama-cpp-inprocess"
DEFAULT_N_CTX = 4096  # covers MMLU 5-shot and HellaSwag 10-shot prompts; the KV cache of the 270M is ~75 MB
DEFAULT_N_SEQ = 128  # sequences per llama_decode (llama.cpp allows 256)
# Rows of logits reduced at once; bounds the float64 scratch to rows * n_vocab * 8 bytes.
_ROWS_PER_REDUCTION = 32
_TOKEN_CACHE = 4096  # tokenized strings kept (contexts recur across a question's choices)

# progress(done, total, what): called as requests finish, for status updates.
Progress = Callable[[int, int, str], None]


@register_model(MODEL_NAME)
class LlamaCppLM(TemplateLM):
    """Score a GGUF file with llama.cpp in this process.

    Args:
        pretrained: path of the GGUF file (``model_path`` is accepted too).
        n_ctx: context size of the llama.cpp context (KV cache); default 4096.
        max_length: longest input scored, default ``min(n_batch, the model's training context)``.
        n_batch: tokens per ``llama_decode`` call (default and at most: n_ctx, the unified KV cache
            holds a whole batch).
        n_ubatch: tokens per compute step inside a decode.
        n_seq_max: sequences per decode (llama.cpp allows 256).
        max_outputs: logits rows per decode (default: 256 MiB of logits, 16 to 512 rows).
        n_gpu_layers: layers offloaded to a GPU (-1 = all; ignored by a CPU-only build).
        n_threads: CPU threads (default: every core the process may use).
        flash_attn: None lets llama.cpp decide (on where the backend has it; off with an f32 cache,
            whose scores it would round); True/False force it.
        kv_type: the KV cache's type, ``f16`` (llama.cpp's default) or ``f32``.
        max_gen_toks: default generation budget when a task sets none.
        add_bos_token: override the GGUF's ``tokenizer.ggml.add_bos_token``.
        progress: optional ``progress(done, total, what)`` callback.
        packed: score log-likelihoods with many sequences per decode (default); False uses the
            sequential path (one sequence per decode).
        prefix_cache: sequential path only: keep the KV cache between requests and reuse their
            common prefix (default); False evaluates every request from an empty cache.
        head: the output layer: ``"auto"`` (torch where the architecture allows it, see head.py),
            ``"llamacpp"`` or ``"torch"``; default ``$FINETUNE_EVAL_HEAD``, else auto.
        head_device: the torch head's device (default: cuda when torch sees a GPU, else cpu).
        head_precision: the torch head's ``"bf16"`` (CPU default) or ``"fp32"`` (CUDA default) matmuls.
    """

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        max_length: int | None = None,
        n_batch: int | None = None,
        n_ubatch: int = 512,
        n_seq_max: int = DEFAULT_N_SEQ,
        max_outputs: int | None = None,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        seed: int = 1234,
        progress: Progress | None = None,
        packed: bool = True,
        prefix_cache: bool = True,
        head: str | None = None,
        head_device: str | None = None,
        head_precision: str | None = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import llama_cpp
        from llama_cpp import _internals, _logger

        path = pretrained or model_path
        if not path:
            raise ValueError(f"{MODEL_NAME}: pass pretrained=<path of a .gguf file>")
        if kwargs:
            log.warning("%s ignores unknown arguments: %s", MODEL_NAME, sorted(kwargs))
        self._lc = llama_cpp
        self.path = Path(path)
        _logger.set_verbose(bool(verbose))
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if int(n_gpu_layers) < 0 else int(n_gpu_layers)  # INT32_MAX: all
        self._model = _internals.LlamaModel(path_model=str(self.path), params=mparams, verbose=bool(verbose))
        threads = int(n_threads or usable_cpus())
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = int(n_ctx)
        # The unified KV cache holds a whole batch (all its sequences), so a batch is at most n_ctx tokens.
        cparams.n_batch = min(int(n_batch or n_ctx), int(n_ctx))
        cparams.n_ubatch = min(int(n_ubatch), cparams.n_batch)
        cparams.n_seq_max = max(1, min(int(n_seq_max), cparams.n_batch))  # llama.cpp: at most n_outputs_max
        # Logits rows per decode: llama.cpp keeps n_outputs * n_vocab floats (1 MiB a row for 262k),
        # and sizes the output layer's compute buffer for as many rows.
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._model.vocab)
        self._max_outputs = int(max_outputs or max(16, min(512, (256 << 20) // (4 * n_vocab))))
        cparams.n_outputs_max = max(self._max_outputs, cparams.n_seq_max)
        cparams.kv_unified = True  # tokens shared by several sequences need one cache for all of them
        cparams.swa_full = True
        # f32 keys/values make a full-precision model's scores comparable with an f32 PyTorch reference;
        # llama.cpp's default (f16) halves the cache and is what Ollama runs.
        kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}.get(kv_type)
        if kv is None:
            raise ValueError(f"{MODEL_NAME}: kv_type must be f16 or f32, not {kv_type!r}")
        if flash_attn is None and kv_type == "f32":
            # llama.cpp's CPU flash attention is not float32 inside: on an AVX-512/AMX Xeon it moved a
            # tiny Gemma 3's f32 scores by up to 0.015 nats a request against PyTorch in float32, and
            # by 1e-5 without it (tests/test_evaluation.py, tuned-f32). An f32 cache asks for exactness.
            flash_attn = False
        # Flash attention skips the cache tiles a query cannot see (the other sequences of a batch);
        # AUTO keeps it off where a backend lacks it.
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None else
                                   llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else
                                   llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.type_k = cparams.type_v = kv
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = False
        # The output layer: llama.cpp's, or torch's on the hidden states a graph callback copies out.
        self._head: TorchHead | None = None
        self._capture: HiddenCapture | None = None
        head = resolve_head(head)
        spec, self.head_reason = choose_head(head, self.path)
        if spec is not None:
            try:
                self._head = TorchHead(self.path, spec, n_vocab, self._model.n_embd(), device=head_device,
                                       threads=threads, precision=head_precision)
            except HeadUnsupported as exc:
                if head == "torch":
                    raise
                self.head_reason = f"llama.cpp's head: {exc}"
            else:
                self._capture = HiddenCapture(self._model.n_embd(), cparams.n_outputs_max)
                cparams.cb_eval = self._capture.callback
                cparams.cb_eval_user_data = None
        self.head = "torch" if self._head is not None else "llamacpp"
        log.info("%s: %s", self.path.name, self.head_reason)
        self._context = _internals.LlamaContext(model=self._model, params=cparams, verbose=bool(verbose))
        self._ctx = self._context.ctx
        self._vocab = self._model.vocab
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = self._model.n_vocab()
        self._n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self._n_batch = min(llama_cpp.llama_n_batch(self._ctx), self._n_ctx)
        self._n_seq = llama_cpp.llama_n_seq_max(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, self._n_seq)
        self._kv: list[int] = []  # the tokens of sequence 0 whose keys/values the cache holds, in order
        self.n_threads = threads
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload()) and int(n_gpu_layers) != 0
        n_ctx_train = self._model.n_ctx_train()
        self._max_length = int(max_length) if max_length else min(self._n_batch, n_ctx_train)
        if self._max_length > self._n_batch:
            raise ValueError(f"max_length {self._max_length} exceeds n_batch/n_ctx {self._n_batch}")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.progress = progress
        self.packed = bool(packed)
        self.prefix_cache = bool(prefix_cache)
        bos = self._model.token_bos()
        self._bos = bos if bos >= 0 else None
        self._bos_text = self._detokenize([bos], special=True) if self._bos is not None else None
        self._warned_sampling = False
        # lm-eval encodes a multiple-choice context once per choice, twice (alone and with the
        # choice); tokenizing a long few-shot prompt is not free, so each context is tokenized once.
        self._tokens: dict[tuple[str, bool], list[int]] = {}

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_context", None) is not None:
            self._context.close()
            self._context = None
        self._capture = self._head = None  # the callback lives as long as the context that calls it
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the bindings may be gone already
            self.close()

    # -- what lm-eval asks of a model ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._model.token_eos()

    @property
    def prefix_token_id(self) -> int:
        return self._bos if self._bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.path.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Tokenize as the ``hf`` model does: BOS when the model wants one and the text has none."""
        if add_special_tokens is None:
            add = self.add_bos_token if self.add_bos_token is not None else True
            if self._bos_text and string.startswith(self._bos_text):
                add = False
        else:
            add = add_special_tokens
        key = (string, add)
        tokens = self._tokens.get(key)
        if tokens is None:
            tokens = self._tokenize(string.encode("utf-8"), add)
            if len(self._tokens) >= _TOKEN_CACHE:
                self._tokens.clear()
            self._tokens[key] = tokens
        tokens = list(tokens)
        if add and self.add_bos_token and self._bos is not None and tokens[:1] != [self._bos]:
            tokens = [self._bos, *tokens]  # forced on although the GGUF says no BOS
        left = kwargs.get("left_truncate_len")
        return tokens[-left:] if left else tokens

    def _tokenize(self, text: bytes, add_bos: bool) -> list[int]:
        # A buffer sized for the text (at most one token per byte, plus BOS/EOS), not n_ctx_train tokens.
        size = len(text) + 8
        buf = (self._lc.llama_token * size)()
        n = self._lc.llama_tokenize(self._vocab, text, len(text), buf, size, add_bos, True)
        if n < 0:  # never expected; llama.cpp says how many it needs
            size = -n
            buf = (self._lc.llama_token * size)()
            n = self._lc.llama_tokenize(self._vocab, text, len(text), buf, size, add_bos, True)
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n}) on {len(text)} bytes")
        return buf[:n]

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._detokenize(list(tokens), special=not skip_special_tokens)

    def _detokenize(self, tokens: list[int], special: bool = False) -> str:
        if not tokens:
            return ""
        arr = (self._lc.llama_token * len(tokens))(*tokens)
        size = max(64, 8 * len(tokens))
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lc.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1

    # -- the forward pass ------------------------------------------------------------------------

    def _decode(self, batch) -> int:
        if self._capture is not None:
            self._capture.reset()
        return self._lc.llama_decode(self._ctx, batch)

    def _outputs(self, n: int) -> _Logits | _Hidden:
        """The last decode's n output rows, as logits (llama.cpp's head) or hidden states (torch's).

        Generation turns the capture off (``_greedy``) and reads llama.cpp's logits."""
        if self._capture is not None and self._capture.enabled:
            return _Hidden(self._head, self._capture.hidden(n))
        ptr = self._lc.llama_get_logits(self._ctx)
        return _Logits(np.ctypeslib.as_array(ptr, shape=(n, self._n_vocab)))

    def _forward(self, tokens: Sequence[int], wanted: Iterable[int],
                 on_logits: Callable[[_Logits | _Hidden, list[int]], None]) -> None:
        """Make the KV cache hold exactly ``tokens`` and hand over the outputs at ``wanted`` positions.

        ``on_logits(rows, positions)`` receives the k output rows (``_Logits`` or ``_Hidden``), valid
        only during the call. Positions already in the cache are not decoded again, except those
        whose logits are wanted (llama.cpp keeps no logits of earlier calls).
        """
        tokens = list(tokens)
        wanted = sorted(set(wanted))
        keep = packing.common_prefix(self._kv, tokens) if self.prefix_cache else 0
        if wanted:
            keep = min(keep, wanted[0])
        if keep < len(self._kv) and not self._lc.llama_memory_seq_rm(self._mem, 0, keep, -1):
            self._lc.llama_memory_clear(self._mem, True)
            keep = 0
        del self._kv[keep:]
        want = set(wanted)
        batch = self._batch
        step = min(self._n_batch, self._max_outputs)  # a chunk's logits rows fit the output buffer
        for start in range(keep, len(tokens), step):
            chunk = tokens[start:start + step]
            out_positions = []
            batch.n_tokens = len(chunk)
            for k, tok in enumerate(chunk):
                pos = start + k
                batch.token[k] = tok
                batch.pos[k] = pos
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                flag = pos in want
                batch.logits[k] = flag
                if flag:
                    out_positions.append(pos)
            rc = self._decode(batch)
            if rc != 0:
                self._lc.llama_memory_clear(self._mem, True)
                self._kv.clear()
                raise RuntimeError(f"llama_decode returned {rc} ({len(chunk)} tokens at position {start})")
            self._kv.extend(chunk)
            if out_positions:
                on_logits(self._outputs(len(out_positions)), out_positions)

    # -- loglikelihood ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        prepared = []
        truncated = 0
        for _, context_enc, continuation_enc in requests:
            truncated += len(context_enc) + len(continuation_enc) > self.max_length + 1
            if not continuation_enc:
                raise ValueError("loglikelihood request with an empty continuation")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"continuation of {len(continuation_enc)} tokens exceeds max_length {self.max_length}")
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            inp = tuple(whole[:-1])
            prepared.append((inp, len(inp) - len(continuation_enc), tuple(continuation_enc)))
        if truncated:
            log.warning("%d of %d requests exceed max_length %d tokens; their contexts were cut from the left",
                        truncated, len(requests), self.max_length)
        if self.packed:
            # An input scored at more positions than one decode may return (a long rolling window)
            # goes the sequential way, in chunks.
            long = [i for i, (inp, first, _) in enumerate(prepared) if len(inp) - first > self._max_outputs]
            results = self._score_packed(prepared, disable_tqdm, skip=set(long))
            for i, result in zip(long, self._score_sequential([prepared[i] for i in long], True), strict=True):
                results[i] = result
        else:
            results = self._score_sequential(prepared, disable_tqdm)
        for req, result in zip(requests, results, strict=True):
            if req[0] is not None and req[0][0] is not None:
                self.cache_hook.add_partial("loglikelihood", req[0], result)
        return results

    def _score_packed(self, prepared: list[tuple[tuple[int, ...], int, tuple[int, ...]]],
                      disable_tqdm: bool, skip: set[int]) -> list[tuple[float, bool] | None]:
        """Many sequences per llama_decode, shared prefixes once, logits only where scored (see packing).

        Requests in ``skip`` are left as None."""
        # One sequence per distinct input; its first scored position is the earliest of its requests'.
        first_of: dict[tuple[int, ...], int] = {}
        owners: dict[tuple[int, ...], list[int]] = {}
        for i, (inp, first, _) in enumerate(prepared):
            if i not in skip:
                first_of[inp] = min(first, first_of.get(inp, first))
                owners.setdefault(inp, []).append(i)
        seqs = [packing.Seq(inp, first_of[inp]) for inp in sorted(first_of)]
        batches = packing.plan(seqs, self._n_batch, self._max_outputs, self._n_seq)
        results: list[tuple[float, bool] | None] = [None] * len(prepared)
        total, done = len(prepared) - len(skip), 0
        pbar = tqdm(total=total, disable=disable_tqdm, desc="loglikelihood (llama.cpp)")
        self._kv.clear()  # the batches below use the whole cache
        if self.progress:
            self.progress(0, total, "loglikelihood")
        for batch in batches:
            rows = self._decode_packed(batch)
            wanted: dict[int, set[int]] = {}  # logits row -> target tokens scored there
            for s, m in enumerate(batch.members):
                for i in owners[seqs[m].tokens]:
                    _, first, cont = prepared[i]
                    for j, tok in enumerate(cont):
                        wanted.setdefault(batch.rows[s][first + j], set()).add(tok)
            logprob, greedy = rows.scores(wanted)
            n = 0
            for s, m in enumerate(batch.members):
                for i in owners[seqs[m].tokens]:
                    _, first, cont = prepared[i]
                    at = list(zip((batch.rows[s][first + j] for j in range(len(cont))), cont, strict=True))
                    results[i] = (float(sum(logprob[rt] for rt in at)), all(greedy[rt] for rt in at))
                    n += 1
            done += n
            pbar.update(n)
            if self.progress:
                self.progress(done, total, "loglikelihood")
        self._lc.llama_memory_clear(self._mem, True)
        pbar.close()
        return results

    def _decode_packed(self, plan: packing.Batch) -> _Logits | _Hidden:
        """Decode one planned batch from an empty cache; its n_outputs rows, valid until the next decode."""
        self._lc.llama_memory_clear(self._mem, True)
        batch = self._batch
        batch.n_tokens = len(plan)
        for k, (tok, pos, ids, out) in enumerate(zip(plan.token, plan.pos, plan.seq_ids, plan.output, strict=True)):
            batch.token[k] = tok
            batch.pos[k] = pos
            batch.n_seq_id[k] = len(ids)
            seq_id = batch.seq_id[k]
            for j, s in enumerate(ids):
                seq_id[j] = s
            batch.logits[k] = out
        rc = self._decode(batch)
        if rc != 0:
            self._lc.llama_memory_clear(self._mem, True)
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(plan)} tokens in "
                               f"{len(plan.members)} sequences")
        return self._outputs(plan.n_outputs)

    def _score_sequential(self, prepared: list[tuple[tuple[int, ...], int, tuple[int, ...]]],
                          disable_tqdm: bool) -> list[tuple[float, bool]]:
        """One sequence per llama_decode; with prefix_cache, consecutive sorted inputs share KV cells.

        The path before packing, kept as the reference it is tested against and as a fallback
        (``packed=False``); with ``prefix_cache=False`` every request starts from an empty cache.
        """
        results: list[tuple[float, bool] | None] = [None] * len(prepared)
        order = sorted(range(len(prepared)), key=lambda i: prepared[i][0])
        pbar = tqdm(total=len(prepared), disable=disable_tqdm, desc="loglikelihood (llama.cpp, sequential)")
        done = 0
        if self.progress:
            self.progress(0, len(prepared), "loglikelihood")
        for inp, group in groupby(order, key=lambda i: prepared[i][0]):
            group = list(group)
            targets: dict[int, set[int]] = {}
            for i in group:
                _, first, cont = prepared[i]
                for j, tok in enumerate(cont):
                    targets.setdefault(first + j, set()).add(tok)
            stats: dict[int, tuple[dict[int, float], dict[int, bool]]] = {}

            def collect(rows: _Logits | _Hidden, positions: list[int], stats=stats, targets=targets) -> None:
                wanted = {r: targets[p] for r, p in enumerate(positions) if p in targets}
                logprob, greedy = rows.scores(wanted)
                for r, pos in enumerate(positions):
                    if pos in targets:
                        stats[pos] = ({t: logprob[r, t] for t in targets[pos]}, {t: greedy[r, t] for t in targets[pos]})

            self._forward(inp, targets, collect)
            for i in group:
                _, first, cont = prepared[i]
                logprob = sum(stats[first + j][0][tok] for j, tok in enumerate(cont))
                greedy = all(stats[first + j][1][tok] for j, tok in enumerate(cont))
                results[i] = (float(logprob), greedy)
            pbar.update(len(group))
            done += len(group)
            if self.progress:
                self.progress(done, len(prepared), "loglikelihood")
        pbar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for n, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    # As lm-eval's hf and vllm models do: the text's own tokenization, BOS included
                    # when the model adds one (so the first window also scores BOS after the prefix).
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1),
            ):
                windows.append((None, context, continuation))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores, strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prepared = []
        truncated = 0
        for context, gen_kwargs in (req.args for req in requests):
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kw.get("do_sample") and not self._warned_sampling:
                log.warning("%s decodes greedily; do_sample/temperature are ignored", MODEL_NAME)
                self._warned_sampling = True
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_gen = int(kw.pop("max_gen_toks"))
            room = self.max_length - max_gen
            if room <= 0:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room in max_length {self.max_length}")
            prompt = self.tok_encode(context)
            truncated += len(prompt) > room
            prepared.append((tuple(prompt[-room:]), until, max_gen))
        if truncated:
            log.warning("%d of %d prompts exceed max_length %d minus max_gen_toks; cut from the left",
                        truncated, len(requests), self.max_length)

        results: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: prepared[i][0])
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until (llama.cpp)")
        if self.progress:
            self.progress(0, len(requests), "generate_until")
        for done, i in enumerate(order, start=1):
            prompt, until, max_gen = prepared[i]
            text = self._greedy(list(prompt), until, max_gen)
            results[i] = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
            pbar.update(1)
            if self.progress:
                self.progress(done, len(requests), "generate_until")
        pbar.close()
        return results  # type: ignore[return-value]

    def _greedy(self, tokens: list[int], until: list[str], max_gen: int) -> str:
        picked: list[int] = []

        def take(rows: _Logits, positions: list[int]) -> None:
            picked.append(rows.argmax(len(positions) - 1))

        stops = [s for s in until if s]
        generated: list[int] = []
        if not tokens:  # an empty prompt for a model without BOS
            tokens = [self.prefix_token_id]
        # One row per decode is bound by reading the head's weight, which llama.cpp holds quantized
        # (smallest): generation keeps llama.cpp's head whichever head scores.
        if self._capture is not None:
            self._capture.enabled = False
        try:
            self._forward(tokens, [len(tokens) - 1], take)
            while True:
                tok = picked.pop()
                if self._lc.llama_vocab_is_eog(self._vocab, tok):
                    break
                generated.append(tok)
                text = self._detokenize(generated)
                if any(s in text for s in stops) or len(generated) >= max_gen or len(tokens) >= self._n_ctx:
                    break
                tokens.append(tok)
                self._forward(tokens, [len(tokens) - 1], take)
        finally:
            if self._capture is not None:
                self._capture.enabled = True
        return self._detokenize(generated)


class _Logits:
    """Output rows as llama.cpp's logits (a float32 view of its buffer, valid until the next decode)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: Sequence[int]) -> _Logits:
        return _Logits(self.rows[list(index)])

    def scores(self, wanted: dict[int, set[int]]) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], bool]]:
        """log_softmax(row r)[t] and whether t is row r's maximum, for every row r and token t in ``wanted``."""
        logprob, peak = _log_softmax_at(self.rows, wanted)
        return logprob, {(r, t): bool(self.rows[r, t] >= peak[r]) for r, t in logprob}

    def argmax(self, r: int) -> int:
        return int(self.rows[r].argmax())


class _Hidden:
    """Output rows as final hidden states, turned into logits by the torch head when asked."""

    def __init__(self, head: TorchHead, hidden: np.ndarray) -> None:
        self.head, self.hidden = head, hidden

    def __len__(self) -> int:
        return len(self.hidden)

    def take(self, index: Sequence[int]) -> _Hidden:
        return _Hidden(self.head, self.hidden[list(index)])

    def scores(self, wanted: dict[int, set[int]]) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], bool]]:
        return self.head.score(self.hidden, wanted)


def _log_softmax_at(rows: np.ndarray, wanted: dict[int, set[int]]) -> tuple[dict[tuple[int, int], float], np.ndarray]:
    """log_softmax(rows[r])[t] for every row r and token t in ``wanted``, and each wanted row's maximum.

    float32 throughout: the maximum is subtracted before exp, and numpy's pairwise summation keeps the
    log-sum-exp of 262k terms within ~1e-6 nats. Rows are reduced in runs of consecutive wanted rows,
    a few at a time, in one scratch buffer (for Gemma 3 this is a tenth of the scoring time).
    """
    out: dict[tuple[int, int], float] = {}
    peak = np.full(len(rows), np.inf, dtype=np.float32)
    todo = sorted(wanted)
    scratch = np.empty((min(_ROWS_PER_REDUCTION, len(todo)), rows.shape[1]), dtype=np.float32)
    k = 0
    while k < len(todo):
        lo = todo[k]
        hi = lo + 1
        while hi - lo < _ROWS_PER_REDUCTION and k + (hi - lo) < len(todo) and todo[k + (hi - lo)] == hi:
            hi += 1
        block = rows[lo:hi]
        buf = scratch[:hi - lo]
        top = block.max(axis=1)
        np.subtract(block, top[:, None], out=buf)
        np.exp(buf, out=buf)
        lse = top + np.log(buf.sum(axis=1))
        peak[lo:hi] = top
        for r in range(lo, hi):
            for t in wanted[r]:
                out[r, t] = float(rows[r, t]) - float(lse[r - lo])
        k += hi - lo
    return out, peak


