"""run_eval and the in-process llama.cpp lm-eval model, on tiny Gemma 3 models built here (CPU, no network).

The models: a Gemma 3 architecture (6 layers, hidden 64, a 16-token sliding window so that the
sliding-window cache is exercised) with a 400-piece SentencePiece tokenizer trained on the test
tasks' text, randomly initialised ("base"), and a copy fine-tuned with plain torch for a few hundred
steps on the antonym sentences the test tasks are made of ("tuned"). Both are converted to GGUF with
llama.cpp's own converter; the tuned one is also quantized to q4_k_m.

The tasks (tests/data/eval): tiny_antonyms (multiple choice), tiny_antonyms_gen (greedy generation,
exact match) and tiny_stories_ppl (loglikelihood_rolling perplexity over documents longer than the
32-token max_length used for the parity test, so several rolling windows per document).

Tolerances (f16 GGUF through llama.cpp vs the fp32 checkpoint through lm-eval's `hf` model):
  * per-request log-likelihood (a few continuation tokens): |Δ| < 0.05 nats; per rolling document
    (~60 tokens, all scored): |Δ| < 0.005 nats per token. f16 weights and llama.cpp's kernels move these
    tiny models' per-token log-probabilities by ~1e-3 (the f32 GGUF agrees to ~3e-4); the bounds still
    catch an off-by-one position, a missing or extra BOS, a wrong token split, a sliding window
    applied to the wrong layers or a non-normalised softmax, each of which moves a request by nats.
  * accuracy and exact match: within one example (a near-tie between two choices may flip).
  * perplexities: relative difference < 1 %.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune_api.spec import EvaluationSpec
from finetune_trainer.cli import main
from finetune_trainer.errors import ConfigError
from finetune_trainer.evaluation import results as R
from finetune_trainer.evaluation import run_eval, select_models
from finetune_trainer.evaluation.data import resolve_task_dir

TASKS_DIR = Path(__file__).parent / "data" / "eval"
ALL_TASKS = ["tiny_antonyms", "tiny_antonyms_gen", "tiny_stories_ppl"]
PARITY_MAX_LENGTH = 32
# One llama.cpp thread: its workers spin while waiting, which is slow on two shared cores.
LLAMA_ARGS = {"n_ctx": 256, "n_threads": 1}
LL_TOL = 0.05  # nats, per loglikelihood request
LL_TOL_PER_TOKEN = 0.005  # nats per scored token, per loglikelihood_rolling document
EXACT_TOL = 0.01  # nats per request, float32 on both sides (issue 21's bar; test_adapter_matches_hf_model's tuned-f32)


def _converter() -> Path:
    cache = os.environ.get("FTO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-operator"
    return Path(cache) / "llama.cpp-0.3.36" / "convert_hf_to_gguf.py"


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / name).read_text().splitlines()]


def _sentences() -> list[str]:
    """The fine-tuning data: the distribution the tiny_antonyms* tasks are drawn from."""
    return [f"The opposite of {r['word']} is {r['answer']}." for r in _jsonl("antonyms.jsonl")]


def _task_lines() -> list[str]:
    return _sentences() + [r["text"] for r in _jsonl("antonym_stories.jsonl")]


# -- building the tiny models --------------------------------------------------------------------------


def build_tokenizer(out: Path) -> None:
    """A 400-piece SentencePiece BPE with Gemma's special-token layout, saved as tokenizer.model + tokenizer.json."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_task_lines() * 4), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        hard_vocab_limit=False, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True}))
    GemmaTokenizer.from_pretrained(out).save_pretrained(out)


def build_base(out: Path) -> None:
    """Random-init Gemma 3, shaped so that llama.cpp computes what transformers computes: llama.cpp
    fixes Gemma 3's layout (every 6th layer global, the others sliding-window; attention scaled by
    1/sqrt(head_dim)), so the tiny config has 6 layers and query_pre_attn_scalar == head_dim, as the
    real 270M (18 layers, head_dim 256 == query_pre_attn_scalar) has."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    build_tokenizer(out)
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512,
        sliding_window=16, layer_types=["sliding_attention"] * 5 + ["full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    Gemma3ForCausalLM(config).save_pretrained(out)


def fine_tune(base: Path, out: Path, steps: int = 100) -> list[float]:
    """Plain torch, full fine-tuning on the antonym sentences. Returns the losses.

    Each step packs the 36 sentences, shuffled, six to a row (the shape of the tiny_stories_ppl
    documents; a row starts like a tiny_antonyms prompt). The loss floor is about 0.4 nats/token (the
    word after "The opposite of" is unpredictable); 100 steps come close to it.
    """
    import random

    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "right"
    model = Gemma3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sentences = _sentences()
    model.train()
    losses = []
    for _ in range(steps):
        order = rng.sample(sentences, len(sentences))
        enc = tok([" ".join(order[i:i + 6]) for i in range(0, len(order), 6)], return_tensors="pt", padding=True)
        loss = model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # the converter reads tokenizer.model
        shutil.copy(base / name, out / name)
    return losses


def to_gguf(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    r = subprocess.run([sys.executable, str(_converter()), str(hf_dir), "--outtype", outtype, "--outfile", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matrices: one thread is 10x faster than two when the two cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tiny-gemma3")
    base_hf, tuned_hf = root / "base-hf", root / "tuned-hf"
    build_base(base_hf)
    losses = fine_tune(base_hf, tuned_hf)
    base = to_gguf(base_hf, root / "base-f16.gguf")
    f16 = to_gguf(tuned_hf, root / "tuned-f16.gguf")
    q4 = quantize(f16, root / "tuned-q4_k_m.gguf", "q4_k_m")
    f32 = to_gguf(tuned_hf, root / "tuned-f32.gguf", "f32")
    return SimpleNamespace(base_hf=base_hf, tuned_hf=tuned_hf, base=base, f16=f16, f32=f32, q4_k_m=q4, losses=losses)


# -- pure helpers -------------------------------------------------------------------------------------


def test_task_metrics_drop_single_filters_and_keep_stderr():
    entry = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,remove_whitespace": 0.25,
             "exact_match_stderr,remove_whitespace": "N/A", "f1,strict": 0.1, "f1,flexible": 0.2}
    assert R.task_metrics(entry) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match": 0.25,
                                     "f1,strict": 0.1, "f1,flexible": 0.2}


def test_quantization_cost_is_each_quant_minus_the_most_precise():
    per_model = {"q4_k_m": {"t": {"acc": 0.5, "acc_stderr": 0.1}}, "base": {"t": {"acc": 0.25}},
                 "f16": {"t": {"acc": 0.75, "acc_stderr": 0.1}}, "q8_0": {"t": {"acc": 0.75}}}
    metrics = R.build_metrics(per_model)
    assert list(metrics)[:4] == ["base", "f16", "q8_0", "q4_k_m"]
    assert metrics["quantizationCost"] == {"reference": "f16", "q8_0": {"t": {"acc": 0.0}}, "q4_k_m": {"t": {"acc": -0.25}}}
    assert metrics["fineTuningGain"] == {"model": "f16", "base": "base", "delta": {"t": {"acc": 0.5}}}
    assert "quantizationCost" not in R.build_metrics({"q4_k_m": {"t": {"acc": 0.5}}})


def test_markdown_has_one_row_per_metric_and_delta_columns():
    per_model = {"f16": {"t": {"acc": 0.75, "acc_stderr": 0.05}}, "q4_k_m": {"t": {"acc": 0.5, "acc_stderr": 0.05}},
                 "base": {"t": {"acc": 0.25, "acc_stderr": 0.05}}}
    md = R.render_markdown(per_model, {"t": {"acc": True}})
    assert "| Task | Metric | base | f16 | q4_k_m | f16 − base | q4_k_m − f16 |" in md
    assert "| t | acc ↑ | 0.2500 ± 0.0500 | 0.7500 ± 0.0500 | 0.5000 ± 0.0500 | +0.5000 | -0.2500 |" in md


def test_select_models_filters_and_checks(tmp_path):
    files = {q: tmp_path / f"{q}.gguf" for q in ("f16", "q4_k_m", "base")}
    for p in files.values():
        p.write_bytes(b"GGUF")
    spec = EvaluationSpec(tasks=["t"])
    assert [n for n, _ in select_models(files, spec)] == ["f16", "q4_k_m"]
    spec = EvaluationSpec(tasks=["t"], quantizations=["q4_k_m"], include_base=True)
    assert [n for n, _ in select_models(files, spec)] == ["base", "q4_k_m"]
    with pytest.raises(ConfigError, match="q8_0"):
        select_models(files, EvaluationSpec(tasks=["t"], quantizations=["q8_0"]))
    with pytest.raises(ConfigError, match="includeBase"):
        select_models({"f16": files["f16"]}, EvaluationSpec(tasks=["t"], include_base=True))


# -- the tiny models ------------------------------------------------------------------------------


def _tokenizer_agrees(tiny) -> None:
    from transformers import AutoTokenizer

    from finetune_trainer.evaluation.llamacpp_lm import LlamaCppLM

    hf = AutoTokenizer.from_pretrained(tiny.tuned_hf)
    lm = LlamaCppLM(pretrained=str(tiny.f16), n_ctx=128, n_threads=1)
    try:
        for text in [*_task_lines()[::9], "The opposite of Zebra 123 is  x\n\ny.", "", "ünïcödé ✓"]:
            assert lm.tok_encode(text) == hf(text).input_ids, text
            assert lm.tok_encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
    finally:
        lm.close()


def test_fine_tuning_learned(tiny):
    assert tiny.losses[-1] < 0.5 * tiny.losses[0]
    _tokenizer_agrees(tiny)


def _simple_evaluate(model, model_args, tasks, num_fewshot=None):
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    return evaluator.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False), log_samples=True, bootstrap_iters=0,
        random_seed=1, numpy_random_seed=1, torch_random_seed=1, fewshot_random_seed=1)


@pytest.mark.parametrize("which", ["base", "tuned", "tuned-f32"])
def test_adapter_matches_hf_model(tiny, which, monkeypatch):
    """Same tasks, same prompts: llama.cpp on the f16 GGUF vs lm-eval's `hf` model on the fp32 checkpoint.
    `tuned-f32`: the same float32 numbers on both sides (f32 GGUF, f32 KV cache, torch head in float32),
    so only float32 arithmetic may differ: every request within EXACT_TOL (issue 21's 0.01 nats a
    request; measured worst 1e-5). It holds because llama.cpp is built with an exact GELU
    (hack/patch-llama-cpp.sh), and because the adapter turns llama.cpp's CPU flash attention off for an
    f32 cache: with ggml's stock f16 GELU table, or with that kernel on (0.0148 on an AVX-512 Xeon),
    this case fails."""
    import finetune_trainer.evaluation.llamacpp_lm  # noqa: F401  (registers llama-cpp-inprocess)

    monkeypatch.chdir(TASKS_DIR)
    hf_dir, gguf = {"base": (tiny.base_hf, tiny.base), "tuned": (tiny.tuned_hf, tiny.f16),
                    "tuned-f32": (tiny.tuned_hf, tiny.f32)}[which]
    args = {"pretrained": str(gguf), "n_ctx": 64, "n_threads": 1, "max_length": PARITY_MAX_LENGTH}
    if which == "tuned-f32":
        args.update(kv_type="f32", head="torch", head_precision="fp32")
    ours = _simple_evaluate("llama-cpp-inprocess", args, ALL_TASKS, num_fewshot=2)
    ref = _simple_evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu",
                                  "batch_size": 16, "max_length": PARITY_MAX_LENGTH}, ALL_TASKS, num_fewshot=2)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    worst = {}
    for task in ("tiny_antonyms", "tiny_stories_ppl"):
        a, b = ours["samples"][task], ref["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for sa, sb in zip(a, b, strict=True):
            assert sa["arguments"] == sb["arguments"]
            for args, ra, rb in zip(sa["arguments"], sa["resps"], sb["resps"], strict=True):
                if task == "tiny_antonyms":  # a few continuation tokens
                    delta, tol = abs(ra[0][0] - rb[0][0]), LL_TOL
                else:  # a whole document, every token scored
                    delta, tol = abs(ra[0] - rb[0]), LL_TOL_PER_TOKEN * len(tok(args[0]).input_ids)
                if which == "tuned-f32":
                    tol = EXACT_TOL
                worst[task] = max(worst.get(task, 0.0), delta)
                assert delta < tol, (task, sa["doc_id"], ra, rb, tol)
    print(f"{which}: worst |Δ loglikelihood| per request (nats): {worst}")

    n = len(ours["samples"]["tiny_antonyms"])
    res_a, res_b = ours["results"], ref["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(res_a["tiny_antonyms"][metric] - res_b["tiny_antonyms"][metric]) * n <= 1 + 1e-9
    gen = "exact_match,remove_whitespace"
    assert abs(res_a["tiny_antonyms_gen"][gen] - res_b["tiny_antonyms_gen"][gen]) * n <= 1 + 1e-9
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        a, b = res_a["tiny_stories_ppl"][metric], res_b["tiny_stories_ppl"][metric]
        assert math.isclose(a, b, rel_tol=0.01), (metric, a, b)
    if which != "base":  # the generations themselves, where the model is confident
        gens_a = [s["filtered_resps"][0] for s in ours["samples"]["tiny_antonyms_gen"]]
        gens_b = [s["filtered_resps"][0] for s in ref["samples"]["tiny_antonyms_gen"]]
        assert sum(x != y for x, y in zip(gens_a, gens_b, strict=True)) <= 1, (gens_a, gens_b)


def _scoring_requests(lm) -> list[tuple]:
    """Multiple-choice requests with few-shot prefixes and multi-token answers sharing their first tokens,
    and story continuations with contexts longer than the 16-token sliding window."""
    reqs = []
    rows = _jsonl("antonyms.jsonl")
    shots = "".join(f"The opposite of {r['word']} is {r['answer']}. " for r in rows[:3])
    for r in rows[3:15]:
        context = lm.tok_encode(f"{shots}The opposite of {r['word']} is")
        for choice in r["choices"]:
            whole = lm.tok_encode(f"{shots}The opposite of {r['word']} is {choice}.")
            reqs.append(((None, None), context, whole[len(context):]))
    story = _jsonl("antonym_stories.jsonl")[0]["text"]
    for cut in (60, 90, 120, 150):
        ctx = lm.tok_encode(story[:cut])
        for cont in (" cold.", " small", " x", " is"):
            reqs.append(((None, None), ctx, lm.tok_encode(cont, add_special_tokens=False)))
    return reqs


@pytest.mark.parametrize("head", ["llamacpp", "torch"])
def test_packed_scoring_equals_each_request_alone(tiny, head):
    """Many sequences per decode with shared prefixes == every request alone from an empty cache.

    Small batch budgets make the 64 requests span many decodes (and batches split questions).
    """
    from finetune_trainer.evaluation.llamacpp_lm import LlamaCppLM

    packed = LlamaCppLM(pretrained=str(tiny.f16), n_ctx=256, n_threads=1, n_seq_max=5, max_outputs=24, head=head)
    alone = LlamaCppLM(pretrained=str(tiny.f16), n_ctx=256, n_threads=1, packed=False, prefix_cache=False, head=head)
    try:
        assert packed.head == alone.head == head
        reqs = _scoring_requests(packed)
        assert len(reqs) == 12 * 4 + 16
        got = packed._loglikelihood_tokens(reqs[::-1], disable_tqdm=True)[::-1]
        ref = alone._loglikelihood_tokens(reqs, disable_tqdm=True)
    finally:
        packed.close()
        alone.close()
    worst = max(abs(a[0] - b[0]) for a, b in zip(got, ref, strict=True))
    print(f"{head} head: worst |Δ loglikelihood| packed vs alone: {worst:.2e} nats")
    assert worst < 0.01
    assert [g for _, g in got] == [g for _, g in ref]
    for q in range(0, len(reqs), 4):  # the argmax choice of every 4-way question
        pick = [max(range(4), key=lambda i, run=run: run[q + i][0]) for run in (got, ref)]
        assert pick[0] == pick[1], q


# -- the output layer in torch (evaluation/head.py) ---------------------------------------------------


def _compare(got, ref) -> tuple[float, int, int]:
    """Worst |Δ loglikelihood|, greedy flags that differ, 4-way questions whose argmax differs."""
    worst = max(abs(a[0] - b[0]) for a, b in zip(got, ref, strict=True))
    flags = sum(a[1] != b[1] for a, b in zip(got, ref, strict=True))
    picks = sum(max(range(4), key=lambda i: got[q + i][0]) != max(range(4), key=lambda i: ref[q + i][0])
                for q in range(0, 48, 4))
    return worst, flags, picks


@pytest.mark.parametrize("model", ["f32", "f16", "q4_k_m"])
def test_torch_head_matches_llamacpp_head(tiny, model):
    """The same requests scored with llama.cpp's output layer and with torch's, packed and sequential:
    the same greedy flags and argmax choices, and log-likelihoods as close as the heads' arithmetic
    allows. Torch in float32 on the f32 file computes llama.cpp's sums in another order (< 1e-4 nats);
    on the f16 file llama.cpp rounds the hidden state to f16 first, and on the q4_k_m file to 8 bits
    (its quantized dot products), so these differ by that rounding. Torch's CPU default, bf16
    products, rounds weight and hidden state to bf16: within LL_TOL of every llama.cpp head."""
    from finetune_trainer.evaluation.llamacpp_lm import LlamaCppLM

    gguf = getattr(tiny, model)
    runs = {}
    for head, precision in (("llamacpp", None), ("torch", "bf16"), ("torch", "fp32")):
        for packed in (True, False):
            lm = LlamaCppLM(pretrained=str(gguf), n_ctx=256, n_threads=1, n_seq_max=5, max_outputs=24,
                            packed=packed, head=head, head_precision=precision)
            try:
                assert lm.head == head
                reqs = _scoring_requests(lm)
                runs[head, precision, packed] = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
            finally:
                lm.close()
    bound = {("f32", "fp32"): 1e-4, ("f16", "fp32"): 0.005}
    for packed in (True, False):
        ref = runs["llamacpp", None, packed]
        for precision in ("fp32", "bf16"):
            worst, flags, picks = _compare(runs["torch", precision, packed], ref)
            print(f"{model} {'packed' if packed else 'sequential'}: torch ({precision}) vs llama.cpp head: "
                  f"worst |Δ| {worst:.2e} nats, {flags} greedy flags and {picks} choices differ")
            assert worst < bound.get((model, precision), LL_TOL), (precision, worst)
            assert flags == 0 and picks == 0
        assert _compare(runs["torch", "bf16", packed], runs["torch", "fp32", packed])[0] < LL_TOL


def test_torch_head_skips_llamacpp_output_layer(tiny):
    """With the torch head, llama.cpp's graph stops at result_norm: the scheduler never even asks about
    the output matmul (result_output), and the logits buffer llama.cpp copies out is not the model's
    logits. With the callback wanting nothing, the same decode runs llama.cpp's head, whose logits are
    the torch head's on the captured rows (the rows are the right ones, in batch order)."""
    import numpy as np

    from finetune_trainer.evaluation import packing
    from finetune_trainer.evaluation.llamacpp_lm import LlamaCppLM

    lm = LlamaCppLM(pretrained=str(tiny.f16), n_ctx=256, n_threads=1, head="torch", head_precision="fp32")
    try:
        reqs = _scoring_requests(lm)[:12]
        seqs = sorted({packing.Seq(tuple(c + w[:-1]), len(c) - 1) for _, c, w in reqs}, key=lambda q: q.tokens)
        (plan,) = packing.plan(seqs, 256, 64, 16)
        assert plan.n_outputs > 4
        lm._capture.trace = trace = []
        hidden = lm._decode_packed(plan).hidden.copy()
        assert b"result_norm" in trace and b"result_output" not in trace, trace[-5:]
        garbage = np.ctypeslib.as_array(lm._lc.llama_get_logits(lm._ctx), shape=(plan.n_outputs, lm._n_vocab))
        logits = hidden @ lm._head.weight.numpy().T
        assert np.abs(garbage - logits).max() > 1.0

        del trace[:]
        lm._capture.enabled = False  # the callback wants no tensor: llama.cpp computes its logits
        computed = lm._decode_packed(plan).rows
        assert b"result_output" in trace
        assert np.abs(computed - logits).max() < 0.01
        assert (computed.argmax(axis=1) == logits.argmax(axis=1)).all()
    finally:
        lm.close()


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[int, int]], **fields: float) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        w.add_float32(f"{arch}.{key}", value)
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_head_chooser(tmp_path, monkeypatch):
    """Torch computes the head only where llama.cpp's is exactly a matmul of output (or the tied
    token_embd) with result_norm, plus Gemma 2's soft-capping; anything else keeps llama.cpp's."""
    from finetune_trainer.evaluation.head import HeadSpec, HeadUnsupported, choose_head, resolve_head

    emb = {"token_embd.weight": (16, 4)}
    out = {**emb, "output.weight": (16, 4)}
    gpt2 = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", out)
    spec, why = choose_head("auto", gpt2)
    assert spec is None and "gpt2" in why
    with pytest.raises(HeadUnsupported, match="gpt2"):
        choose_head("torch", gpt2)
    biased = _write_gguf(tmp_path / "qwen2.gguf", "qwen2", {**out, "output.bias": (16,)})
    assert choose_head("auto", biased)[0] is None and "output.bias" in choose_head("auto", biased)[1]
    assert choose_head("auto", _write_gguf(tmp_path / "q.gguf", "qwen2", out))[0] == HeadSpec("qwen2", "output.weight", 0.0)
    assert choose_head("auto", _write_gguf(tmp_path / "l.gguf", "llama", emb))[0] == HeadSpec("llama", "token_embd.weight", 0.0)
    # Gemma and Gemma 2 always use token_embd; Gemma 2 soft-caps at 30 unless the file says otherwise
    assert choose_head("auto", _write_gguf(tmp_path / "g.gguf", "gemma", out))[0].weight == "token_embd.weight"
    assert choose_head("auto", _write_gguf(tmp_path / "g2.gguf", "gemma2", emb))[0].softcap == 30.0
    g2 = _write_gguf(tmp_path / "g2b.gguf", "gemma2", emb, final_logit_softcapping=25.0)
    assert choose_head("auto", g2)[0] == HeadSpec("gemma2", "token_embd.weight", 25.0)
    g3 = _write_gguf(tmp_path / "g3.gguf", "gemma3", out, final_logit_softcapping=7.5)
    assert choose_head("auto", g3)[0] == HeadSpec("gemma3", "output.weight", 7.5)
    assert choose_head("auto", _write_gguf(tmp_path / "g3b.gguf", "gemma3", emb))[0].softcap == 0.0
    # the llama.cpp head when asked, also through the environment; the argument wins over it
    assert choose_head("llamacpp", g3)[0] is None
    monkeypatch.setenv("FINETUNE_EVAL_HEAD", "llamacpp")
    assert resolve_head(None) == "llamacpp" and choose_head(None, g3)[0] is None
    assert choose_head("auto", g3)[0] is not None
    monkeypatch.setenv("FINETUNE_EVAL_HEAD", "fast")
    with pytest.raises(ValueError, match="auto, llamacpp, torch"):
        resolve_head(None)


def test_head_default_is_torch_for_gemma3_unless_the_environment_says(tiny, monkeypatch):
    """And greedy generation, which keeps llama.cpp's head, decodes the same text either way."""
    from finetune_trainer.evaluation.llamacpp_lm import LlamaCppLM

    prompt = "The opposite of hot is cold. The opposite of big is"
    lm = LlamaCppLM(pretrained=str(tiny.q4_k_m), n_ctx=64, n_threads=1)
    try:
        assert lm.head == "torch" and "gemma3" in lm.head_reason
        text = lm._greedy(lm.tok_encode(prompt), ["."], 8)
        assert lm._capture.enabled  # back on for scoring
    finally:
        lm.close()
    monkeypatch.setenv("FINETUNE_EVAL_HEAD", "llamacpp")
    lm = LlamaCppLM(pretrained=str(tiny.q4_k_m), n_ctx=64, n_threads=1)
    try:
        assert lm.head == "llamacpp"
        assert lm._greedy(lm.tok_encode(prompt), ["."], 8) == text and text.strip()
    finally:
        lm.close()


@pytest.fixture(scope="session")
def evaluated(tiny, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval")
    spec = EvaluationSpec(tasks=ALL_TASKS, data_uri=str(TASKS_DIR), include_base=True)
    messages = []
    metrics = run_eval({"f16": tiny.f16, "q4_k_m": tiny.q4_k_m, "base": tiny.base}, spec, workdir,
                       report=lambda m, p, eta: messages.append((m, p, eta)), model_args=LLAMA_ARGS)
    return SimpleNamespace(metrics=metrics, workdir=workdir, messages=messages)


def test_fine_tuned_model_beats_its_base(evaluated):
    m = evaluated.metrics
    assert m["f16"]["tiny_antonyms"]["acc"] >= 0.9 > 0.5 >= m["base"]["tiny_antonyms"]["acc"]
    assert m["f16"]["tiny_antonyms_gen"]["exact_match"] >= 0.8 > 0.1 >= m["base"]["tiny_antonyms_gen"]["exact_match"]
    assert m["f16"]["tiny_stories_ppl"]["word_perplexity"] < 0.1 * m["base"]["tiny_stories_ppl"]["word_perplexity"]
    gain = m["fineTuningGain"]
    assert gain["model"] == "f16" and gain["delta"]["tiny_antonyms"]["acc"] > 0.4


def test_run_eval_reports_quantization_cost_and_writes_files(evaluated):
    m = evaluated.metrics
    assert list(m)[:3] == ["base", "f16", "q4_k_m"]
    cost = m["quantizationCost"]
    assert cost["reference"] == "f16"
    for task in ALL_TASKS:
        for metric, delta in cost["q4_k_m"][task].items():
            assert delta == pytest.approx(m["q4_k_m"][task][metric] - m["f16"][task][metric], abs=1e-5)
    doc = json.loads((evaluated.workdir / "eval.json").read_text())
    assert doc["metrics"] == json.loads(json.dumps(m))
    assert set(doc["models"]) == {"base", "f16", "q4_k_m"} and doc["models"]["f16"]["sizeBytes"] > 0
    assert doc["nSamples"]["tiny_antonyms"]["effective"] == 36
    md = (evaluated.workdir / "eval.md").read_text()
    assert "| tiny_antonyms | acc ↑ |" in md and "q4_k_m − f16" in md and "f16 − base" in md
    assert "| tiny_stories_ppl | word_perplexity ↓ |" in md
    assert evaluated.messages[-1][1:] == (100.0, 0)
    assert all(p is None or 0 <= p <= 100 for _, p, _ in evaluated.messages)
    # progress in requests with an ETA, as each model's passes finish
    done = [m for m, _, eta in evaluated.messages if "loglikelihood requests" in m and eta is not None]
    assert any(m.startswith("evaluating base: loglikelihood requests ") and ", ETA " in m for m in done), done


def test_task_data_from_s3(tiny, s3, bucket, tmp_path, monkeypatch):
    """`finetune eval` on its own reads an s3:// dataUri through the trainer's S3 layer, configured from
    the environment (endpoint and keys), and takes only the keys under the prefix."""
    client = s3.client()
    for path in TASKS_DIR.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"eval-tasks/{path.relative_to(TASKS_DIR).as_posix()}")
    client.put_object(Bucket=bucket, Key="eval-tasks-other/decoy.yaml", Body=b"task: decoy\n")
    for key, value in {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
                       "AWS_SECRET_ACCESS_KEY": s3.secret_key}.items():
        monkeypatch.setenv(key, value)
    spec = EvaluationSpec(tasks=["tiny_antonyms"], limit=8, data_uri=f"s3://{bucket}/eval-tasks")
    metrics = run_eval({"f16": tiny.f16}, spec, tmp_path / "work", model_args=LLAMA_ARGS)
    assert metrics["f16"]["tiny_antonyms"]["acc"] >= 0.75
    got = tmp_path / "work" / "eval-tasks"
    assert sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()) == sorted(
        p.relative_to(TASKS_DIR) for p in TASKS_DIR.rglob("*") if p.is_file())
    with pytest.raises(ConfigError, match="no objects under"):
        resolve_task_dir(f"s3://{bucket}/no-such-tasks", tmp_path / "empty")


def test_cli(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--gguf", f"f16={tiny.f16}", "--gguf", f"q4_k_m={tiny.q4_k_m}", "--tasks", "tiny_antonyms",
               "--limit", "8", "--num-fewshot", "1", "--include-path", str(TASKS_DIR), "--output", str(out),
               "--n-ctx", "128", "--n-threads", "1", "--head", "llamacpp"])
    assert rc == 0
    doc = json.loads((out / "eval.json").read_text())
    assert doc["models"]["f16"]["head"] == doc["models"]["q4_k_m"]["head"] == "llamacpp"
    assert doc["numFewshot"]["tiny_antonyms"] == 1 and doc["nSamples"]["tiny_antonyms"]["effective"] == 8
    assert "quantizationCost" in doc["metrics"]
    assert "acc" in json.loads(capsys.readouterr().out)["f16"]["tiny_antonyms"]  # the metrics, as JSON
    assert "| tiny_antonyms | acc ↑ |" in (out / "eval.md").read_text()


def test_offline_copy_of_a_builtin_task_replaces_it(tiny, tmp_path):
    """docs/evaluation.md's recipe: a task YAML named like a built-in, reading local JSON Lines."""
    import lm_eval
    import yaml

    offline = TASKS_DIR / "offline-builtin"
    builtin = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/arc/arc_easy.yaml").read_text())
    ours = yaml.safe_load((offline / "arc_easy.yaml").read_text())
    for key in ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "metadata"):
        assert ours[key] == builtin[key], key
    spec = EvaluationSpec(tasks=["arc_easy"], num_fewshot=1, data_uri=str(offline))
    metrics = run_eval({"f16": tiny.f16}, spec, tmp_path, model_args=LLAMA_ARGS)
    assert set(metrics["f16"]["arc_easy"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert json.loads((tmp_path / "eval.json").read_text())["nSamples"]["arc_easy"]["effective"] == 4


def test_mmlu_runs_offline_from_the_task_library(tiny, tmp_path):
    """`evaluation.tasks: [mmlu]` with no dataUri: lm-eval's mmlu group from the local task library that
    hack/bootstrap.sh builds (finetune_trainer.evaluation.mmlu), one question per subject, 5-shot."""
    from finetune_trainer.evaluation.data import task_library

    library = task_library()
    assert library is not None and (library / "mmlu" / "_mmlu.yaml").is_file(), "run hack/bootstrap.sh"
    spec = EvaluationSpec(tasks=["mmlu"], limit=1)
    metrics = run_eval({"f16": tiny.f16}, spec, tmp_path, model_args={"n_ctx": 1024, "n_threads": 1})
    assert 0.0 <= metrics["f16"]["mmlu"]["acc"] <= 1.0
    doc = json.loads((tmp_path / "eval.json").read_text())
    subtasks = [t for t in doc["details"]["f16"] if t.startswith("mmlu_") and t not in (
        "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")]
    assert len(subtasks) == 57
    assert {"mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"} <= set(doc["details"]["f16"])
    assert doc["numFewshot"]["mmlu_abstract_algebra"] == 5
    assert all(doc["nSamples"][t]["effective"] == 1 for t in subtasks)
