"""Packed and padding-free batches: rows trained together score exactly as they would one by one.

With packing, batching.py restarts position ids at every row and leaves the attention mask out, so
transformers builds a block-diagonal causal mask (windowed on sliding layers). Padding-free batches
(what the trainer runs on GPU) are one [1, T] row with cu_seqlens, read by varlen_attention. Checked on
CPU on a tiny Gemma 3 whose sliding window is shorter than the rows, for the attention implementations
the trainer runs: sdpa (transformers on CPU), flex attention (Unsloth's pick for Gemma 3 on GPU) and
varlen (its reference path here; the flash kernel behind it is checked on a GPU, `pytest -m gpu`).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from finetune_api.spec import TrainingSpec
from finetune_trainer.errors import ConfigError
from finetune_trainer.train import varlen_attention
from finetune_trainer.train.batching import IGNORE, Batches

LENGTHS = [13, 21, 7, 30, 5, 18, 26, 9]


def tiny_model(attn: str, dtype=torch.float32, device="cpu", head_dim=16):
    from transformers import AttentionInterface, Gemma3ForCausalLM, Gemma3TextConfig

    if attn == varlen_attention.NAME:
        AttentionInterface.register(attn, varlen_attention.varlen_attention_forward)

    torch.manual_seed(0)  # same seed, same weights, whatever the attention implementation
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation=attn)
    return Gemma3ForCausalLM(config).eval().to(device=device, dtype=dtype)


def varlen_model(attn: str = "sdpa", dtype=torch.float32, device="cpu", head_dim=16):
    """The trainer's route: the model keeps its attention; enable() reroutes padding-free calls."""
    model = tiny_model(attn, dtype, device, head_dim)
    assert varlen_attention.enable(model)
    return model


def decoder_mask(model, inputs: dict):
    """The attention mask the decoder stack is handed when the model is called on `inputs`."""
    seen = []
    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
    handle = decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")),
                                               with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def make_rows(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(3, 256, (n,), generator=g).tolist()), "labels": ids} for n in lengths]


@pytest.fixture(scope="module")
def packed():
    rows = make_rows()
    batches = Batches(rows, batch_size=4, max_seq_length=48, pad_id=0, seed=0, packing=True)
    batch = batches.get(0)
    in_batch = [rows[i] for i in batches.rows_of(0)]
    assert batch.position_ids is not None and batch.attention_mask is None
    assert len(in_batch) > batch.input_ids.shape[0] > 1  # several sequences, more rows than sequences
    assert max(len(r["input_ids"]) for r in in_batch) > 8  # rows longer than the sliding window
    return batch, in_batch


def loss_row_by_row(model, rows) -> float:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=device)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total += float(loss) * (len(row["input_ids"]) - 1)
        count += len(row["input_ids"]) - 1
    return total / count


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_a_packed_batch_trains_as_its_rows_one_by_one(packed, attn):
    batch, rows = packed
    model = tiny_model(attn)
    with torch.no_grad():
        loss = float(model(**batch.model_inputs("cpu"), use_cache=False).loss)
    assert loss == pytest.approx(loss_row_by_row(tiny_model("eager"), rows), rel=1e-4)


def test_the_check_can_fail_rows_that_see_each_other_score_differently(packed):
    batch, rows = packed
    inputs = batch.model_inputs("cpu")
    inputs["position_ids"] = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)  # no restarts
    with torch.no_grad():
        leaky = float(tiny_model("sdpa")(**inputs, use_cache=False).loss)
    assert leaky != pytest.approx(loss_row_by_row(tiny_model("eager"), rows), rel=1e-3)


# ---------------------------------------------------------------------------------- padding-free
@pytest.mark.parametrize("packing", [False, True])
def test_a_padding_free_batch_is_its_rows_back_to_back(packing):
    rows = make_rows()
    batches = Batches(rows, batch_size=3, max_seq_length=32, pad_id=0, seed=0, packing=packing, bucket=True,
                      padding_free=True)
    for m in range(batches.per_epoch):
        b = batches.get(m)
        in_batch = [rows[i] for i in batches.rows_of(m)]
        lengths = [len(r["input_ids"]) for r in in_batch]
        assert b.input_ids.shape[0] == 1 and b.attention_mask is None and b.tokens == sum(lengths)
        width = b.input_ids.shape[1]
        assert width >= b.tokens and width % 64 == 0  # a bucket: a few fixed totals, so few compiles
        starts = b.cu_seqlens.tolist()
        assert starts[: len(lengths) + 1] == [sum(lengths[:k]) for k in range(len(lengths) + 1)]
        assert starts[-1] == width and b.max_seqlen == 32
        assert all(0 < e - s <= b.max_seqlen for s, e in itertools.pairwise(starts))  # the tail too
        for s, e in itertools.pairwise(starts):  # positions restart per sequence; no loss across a boundary
            assert b.position_ids[0, s:e].tolist() == list(range(e - s))
            assert b.labels[0, s] == IGNORE
        assert (b.labels[0, b.tokens:] == IGNORE).all() and (b.input_ids[0, b.tokens:] == 0).all()
        flat = [t for r in in_batch for t in r["input_ids"]]
        assert b.input_ids[0, : b.tokens].tolist() == flat
        assert b.label_tokens == sum(n - 1 for n in lengths)


def logits_row_by_row(model, rows) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0] for r in rows])


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "eager"])
@pytest.mark.parametrize("packing", [False, True])
def test_a_padding_free_batch_trains_as_its_rows_one_by_one(packing, attn):
    rows = make_rows()
    batches = Batches(rows, batch_size=4, max_seq_length=48, pad_id=0, seed=0, packing=packing, bucket=True,
                      padding_free=True)
    b = batches.get(0)
    in_batch = [rows[i] for i in batches.rows_of(0)]
    assert len(in_batch) > 1 and b.input_ids.shape[1] > b.tokens  # several sequences and a padded tail
    model = varlen_model(attn)
    calls = varlen_attention.STATS["calls"]
    with torch.no_grad():
        out = model(**b.model_inputs("cpu"), use_cache=False)
    assert varlen_attention.STATS["calls"] == calls + 2  # both layers, the sliding one and the full one
    eager = tiny_model("eager")
    torch.testing.assert_close(out.logits[0, : b.tokens], logits_row_by_row(eager, in_batch), atol=1e-4, rtol=1e-4)
    assert float(out.loss) == pytest.approx(loss_row_by_row(eager, in_batch), rel=1e-4)


def test_the_padding_free_check_can_fail_one_long_sequence_scores_differently():
    rows = make_rows()
    b = Batches(rows, 4, 48, 0, 0, padding_free=True).get(0)
    inputs = b.model_inputs("cpu")
    inputs[varlen_attention.CU_SEQLENS] = torch.tensor([0, b.input_ids.shape[1]], dtype=torch.int32)
    model = varlen_model()
    with torch.no_grad():
        leaky = model(**inputs, use_cache=False).logits[0]
    in_batch = [rows[i] for i in Batches(rows, 4, 48, 0, 0).rows_of(0)]
    first = len(in_batch[0]["input_ids"])
    reference = logits_row_by_row(tiny_model("eager"), in_batch)
    torch.testing.assert_close(leaky[:first], reference[:first], atol=1e-4, rtol=1e-4)  # the first row sees no other
    assert (leaky[first:] - reference[first:]).abs().max() > 1e-2  # the rest see the rows before them


def test_without_cu_seqlens_each_right_padded_row_is_one_sequence():
    rows = make_rows()
    b = Batches(rows, 4, 48, 0, 0).get(0)  # padded rows, as a plain forward or generate would pass them
    in_batch = [rows[i] for i in Batches(rows, 4, 48, 0, 0).rows_of(0)]
    inputs = b.model_inputs("cpu")
    inputs.pop("attention_mask")
    with torch.no_grad():
        logits = tiny_model(varlen_attention.NAME)(**inputs, use_cache=False).logits
    real = torch.cat([logits[k, : len(r["input_ids"])] for k, r in enumerate(in_batch)])
    torch.testing.assert_close(real, logits_row_by_row(tiny_model("eager"), in_batch), atol=1e-4, rtol=1e-4)


def test_a_model_padding_free_cannot_serve_stays_padded_under_auto_and_fails_under_on():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    assert TrainingSpec().padding_free == "auto"
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            attn_implementation="sdpa"))
    assert gemma2.config.attn_logit_softcapping  # what the flash kernel has no parameter for
    assert varlen_attention.enable(gemma2, "auto") is False
    assert not hasattr(gemma2, "_finetune_varlen_hooks")  # left as it was: padded batches
    with pytest.raises(ConfigError, match=r"training\.paddingFree is on, but its attention softcaps logits") as err:
        varlen_attention.enable(gemma2, "on")
    assert err.value.reason == "PaddingFreeUnsupported"


def test_enable_reroutes_only_padding_free_calls_and_can_be_switched_off():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert varlen_attention.enable(tiny_model("sdpa"), "off") is False
    model = varlen_model("sdpa")  # auto
    assert model.config._attn_implementation == "sdpa"  # the model keeps its attention for other calls
    # A padding-free call hands the decoder an empty, already-prepared mask mapping (no mask is built).
    flat = Batches(make_rows(), 4, 48, 0, 0, padding_free=True).get(0)
    assert decoder_mask(model, flat.model_inputs("cpu")) == {"sliding_attention": None, "full_attention": None}
    assert ALL_ATTENTION_FUNCTIONS["sdpa"]._finetune_varlen_router
    varlen_model("sdpa")  # enabling twice wraps once
    assert not getattr(ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__, "_finetune_varlen_router", False)
    rows = make_rows()
    b = Batches(rows, 4, 48, 0, 0).get(0)  # a padded batch still runs the model's own attention
    calls = varlen_attention.STATS["calls"]
    with torch.no_grad():
        padded = model(**b.model_inputs("cpu"), use_cache=False)
    assert varlen_attention.STATS["calls"] == calls
    in_batch = [rows[i] for i in Batches(rows, 4, 48, 0, 0).rows_of(0)]
    assert float(padded.loss) == pytest.approx(loss_row_by_row(tiny_model("eager"), in_batch), rel=1e-4)


def test_the_trainers_loader_and_route_score_and_train_padding_free_as_padded():
    """tests/padding_free_check.py on CPU (the transformers backend, LoRA, PEFT's wrapper): the same
    check the GPU test runs through Unsloth, so the check itself is proven before a GPU runs it."""
    from tests import padding_free_check
    from tests.trainer_fixtures import tiny_gemma

    lengths = [60, 13, 70, 9]
    result = padding_free_check.run(tiny_gemma(), "cpu", lengths, 96, timeout=300)
    padding_free_check.assert_same(result, "transformers", lengths, logit_tolerance=1e-3, head="torch")
    assert result["probe"]["attn0"] == ["ft_cu_seqlens", "ft_max_seqlen"]  # the keywords reach attention


def test_compiled_decoder_layers_take_the_route_without_recompiling():
    """Unsloth compiles each decoder layer: the route must trace, count as reached, and compile once
    per layer kind, not once per call (a Python counter read inside the graph made dynamo recompile
    every call)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    rows = make_rows()
    b = Batches(rows, 4, 48, 0, 0, padding_free=True).get(0)
    in_batch = [rows[i] for i in Batches(rows, 4, 48, 0, 0).rows_of(0)]
    model = varlen_model("sdpa")
    for layer in model.model.layers:
        layer.compile(backend="eager", dynamic=False)
    calls = varlen_attention.STATS["calls"]
    reference = logits_row_by_row(tiny_model("eager"), in_batch)
    graphs, before = [], counters["stats"]["unique_graphs"]  # the counter lives as long as the process
    for _ in range(3):
        with torch.no_grad():
            out = model(**b.model_inputs("cpu"), use_cache=False)
        torch.testing.assert_close(out.logits[0, : b.tokens], reference, atol=1e-4, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    assert 0 < graphs[0] == graphs[-1] <= 2, graphs  # the sliding layer's graph and the full one's, once
    assert varlen_attention.STATS["calls"] > calls


def test_a_wrapper_set_on_the_shared_interface_still_routes_to_the_kernel(monkeypatch):
    """Unsloth replaces flex_attention with `ALL_ATTENTION_FUNCTIONS[name] = wrapper`, an entry of the
    shared instance that shadows AttentionInterface.register(); the route must still be taken."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {})  # restored after the test
    reached = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def wrapper(*args, **kwargs):
        reached.append(True)
        return sdpa(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = wrapper
    model = varlen_model("sdpa")
    b = Batches(make_rows(), 4, 48, 0, 0, padding_free=True).get(0)
    calls = varlen_attention.STATS["calls"]
    with torch.no_grad():
        model(**b.model_inputs("cpu"), use_cache=False)
    assert varlen_attention.STATS["calls"] == calls + 2 and not reached
    with torch.no_grad():  # other calls still go through the wrapper that was there
        model(**Batches(make_rows(), 4, 48, 0, 0).get(0).model_inputs("cpu"), use_cache=False)
    assert len(reached) == 2


@pytest.mark.parametrize("peft", [False, True])
def test_the_loss_never_sees_the_padding_free_keywords_the_layers_do(peft):
    """A causal LM hands its extra keywords to its loss too; Unsloth's fused cross-entropy leaves its
    fast kernel for any keyword it does not know, so enable() keeps them to the decoder stack. With
    PEFT's wrapper around the model too, as the trainer runs it."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("sdpa")
    seen = []
    original = base.loss_function

    def loss_function(*args, **kwargs):
        seen.append(set(kwargs))
        return original(*args, **kwargs)

    base.loss_function = loss_function
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])) if peft else base
    assert varlen_attention.enable(model)
    b = Batches(make_rows(), 4, 48, 0, 0, padding_free=True).get(0)
    inputs = b.model_inputs("cpu")
    assert varlen_attention.CU_SEQLENS in inputs and varlen_attention.MAX_SEQLEN in inputs
    calls = varlen_attention.STATS["calls"]
    for _ in range(2):  # and again: nothing is left over from the call before
        with torch.no_grad():
            model(**inputs, use_cache=False)
    assert varlen_attention.STATS["calls"] == calls + 4
    assert len(seen) == 2 and not any(key.startswith("ft_") for keys in seen for key in keys), seen
    # A call without them (generate, a padded batch) finds none held for it, and keeps its own mask.
    padded = Batches(make_rows(), 4, 48, 0, 0).get(0).model_inputs("cpu")
    assert torch.equal(decoder_mask(model, padded), padded["attention_mask"])
    assert varlen_attention.STATS["calls"] == calls + 4


def test_unsloths_own_decoder_is_handed_the_lengths_under_its_name(monkeypatch):
    """Unsloth's fast decoder (Llama & co.) takes packed rows itself: it reads `packed_seq_lengths` and
    never consults the attention registry. Unsloth needs a GPU, so a stand-in takes its place here:
    transformers' Llama forward, installed the way Unsloth installs its own and recorded. What is
    checked is the trainer's side: the route is chosen for it alone, the lengths arrive under Unsloth's
    name in host memory with none of our keywords, and reaching attention is counted."""
    import functools
    import sys
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, attn_implementation="sdpa")
    assert varlen_attention.enable(LlamaForCausalLM(config), "auto") is False  # on transformers: no layer types
    seen, original = [], LlamaModel.forward

    def fast_forward(self, *args, **kwargs):
        seen.append(dict(kwargs))
        return original(self, *args, **kwargs)

    @functools.wraps(fast_forward)  # as on the H100: the class held a wrapper around Unsloth's forward
    def wrapped(self, *args, **kwargs):
        return fast_forward(self, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "unsloth.models.llama", types.SimpleNamespace(LlamaModel_fast_forward=fast_forward))
    monkeypatch.setattr(LlamaModel, "forward", wrapped)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert varlen_attention.enable(model, "auto")
    rows = make_rows()
    b = Batches(rows, 4, 48, 0, 0, padding_free=True).get(0)
    calls = varlen_attention.STATS["calls"]
    with torch.no_grad():
        model(**b.model_inputs("cpu"), use_cache=False)
    lengths = seen[-1][varlen_attention.UNSLOTH_LENGTHS]
    assert lengths.device.type == "cpu" and lengths.tolist() == torch.diff(b.cu_seqlens).tolist()
    assert sum(lengths.tolist()) == b.input_ids.shape[1]  # the padded tail too, as sequences of its own
    assert not any(key.startswith("ft_") for key in seen[-1]), sorted(seen[-1])
    assert varlen_attention.STATS["calls"] == calls + 1  # the first layer's attention got them
    with torch.no_grad():  # a padded batch: nothing handed over, nothing counted
        model(**Batches(rows, 4, 48, 0, 0).get(0).model_inputs("cpu"), use_cache=False)
    assert varlen_attention.UNSLOTH_LENGTHS not in seen[-1]
    assert varlen_attention.STATS["calls"] == calls + 1


def test_unsloth_is_lent_the_varlen_kernel_only_where_it_has_none(monkeypatch):
    """Unsloth on torch 2.11 finds no varlen_attn it can use (it wants torch 2.12's enable_gqa) and runs
    packed rows one SDPA call per sequence; the trainer lends it the flash kernel under that contract,
    and leaves a kernel Unsloth found itself alone. (The kernel runs on CUDA only: the Llama check in
    tests/test_trainer_families.py counts Unsloth's calls to it on a GPU.)"""
    import sys
    import types

    without = types.SimpleNamespace(_TORCH_VARLEN_ATTN=None)
    monkeypatch.setitem(sys.modules, "unsloth.utils.attention_dispatch", without)
    assert varlen_attention.lend_unsloth_the_kernel()
    assert without._TORCH_VARLEN_ATTN is varlen_attention.unsloth_varlen_attn
    assert not varlen_attention.lend_unsloth_the_kernel()  # once

    def its_own(*args, **kwargs):
        raise AssertionError("not called here")

    with_one = types.SimpleNamespace(_TORCH_VARLEN_ATTN=its_own)
    monkeypatch.setitem(sys.modules, "unsloth.utils.attention_dispatch", with_one)
    assert not varlen_attention.lend_unsloth_the_kernel() and with_one._TORCH_VARLEN_ATTN is its_own
    monkeypatch.setitem(sys.modules, "unsloth.utils.attention_dispatch", types.SimpleNamespace())
    assert not varlen_attention.lend_unsloth_the_kernel()  # a Unsloth without that switch: nothing to lend to


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("head_dim", [16, 256])  # 256: Gemma 3's, the flash kernel's largest
def test_flash_varlen_matches_rows_one_by_one_in_loss_and_gradients(packing, head_dim):
    """The CUDA path: torch's FlashAttention varlen kernel, bf16, forward and backward."""
    rows = make_rows(LENGTHS * 4)
    b = Batches(rows, 8, 48, 0, 0, packing=packing, bucket=True, padding_free=True).get(0)
    in_batch = [rows[i] for i in Batches(rows, 8, 48, 0, 0, packing=packing).rows_of(0)]
    # flex_attention: the implementation Unsloth runs Gemma 3 on, and the one its patched layers (once
    # Unsloth is imported in this process, e.g. by test_trainer_gpu) still dispatch through the registry.
    flash = varlen_model("flex_attention", torch.bfloat16, "cuda", head_dim)
    eager = tiny_model("eager", torch.bfloat16, "cuda", head_dim)
    loss = flash(**b.model_inputs("cuda"), use_cache=False).loss
    loss.backward()
    total = 0.0
    for row in in_batch:
        ids = torch.tensor([row["input_ids"]], device="cuda")
        n = len(row["input_ids"]) - 1
        total = total + eager(input_ids=ids, labels=ids, use_cache=False).loss * n
    ref = total / sum(len(r["input_ids"]) - 1 for r in in_batch)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=2e-2)
    for (name, p), q in zip(flash.named_parameters(), eager.parameters(), strict=True):
        cos = torch.nn.functional.cosine_similarity(p.grad.float().flatten(), q.grad.float().flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_inputs_under_autocast_take_the_flash_kernel(monkeypatch):
    """What Unsloth hands over for Gemma 3: fp32 q/k/v inside bf16 autocast. The reference path would
    build a T x T mask (seconds per step at training sizes), so it must not be taken."""
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference path ran on CUDA")

    reference = varlen_attention._reference
    monkeypatch.setattr(varlen_attention, "_reference", no_reference)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 300, 256, device="cuda", generator=g)
    k, v = (torch.randn(1, 1, 300, 256, device="cuda", generator=g) for _ in range(2))
    cu = torch.tensor([0, 40, 200, 300], dtype=torch.int32, device="cuda")
    kwargs = {varlen_attention.CU_SEQLENS: cu, varlen_attention.MAX_SEQLEN: 256}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = varlen_attention.varlen_attention_forward(torch.nn.Module(), q, k, v, None, sliding_window=64, **kwargs)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 300, 4, 256)
    expected = reference(q, k, v, cu, 256 ** -0.5, 64)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_attention_the_kernel_cannot_serve_is_a_permanent_config_error():
    """Attention dropout or non-causal attention comes from the model's configuration: a retry would fail
    the same way, so it is a ConfigError (exit 42, never retried), not a ValueError (retried as internal)."""
    q = k = v = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ConfigError) as err:
        varlen_attention.varlen_attention_forward(torch.nn.Module(), q, k, v, None, dropout=0.1)
    assert err.value.reason == "PaddingFreeUnsupported" and "dropout" in str(err.value)
    bidirectional = torch.nn.Module()
    bidirectional.is_causal = False
    with pytest.raises(ConfigError) as err:
        varlen_attention.varlen_attention_forward(bidirectional, q, k, v, None)
    assert err.value.reason == "PaddingFreeUnsupported" and "not causal" in str(err.value)
