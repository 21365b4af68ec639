"""The trainer's caches and `auto` choices: cache keys (a hit on the same inputs, a miss on each input's
change), the content-addressed S3 entries against a real SeaweedFS (round trip, corrupt and mismatched
entries rebuilt, never trusted), the compile-cache archive, parallel row encoding equal to serial, and
the micro-batch / checkpointing choice as a pure function."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from finetune_api.spec import DatasetSpec, TrainingSpec
from finetune_trainer.data import prepare as prep
from finetune_trainer.data.sources import Rows
from finetune_trainer.storage.cache import S3Cache, cache_uri, digest
from finetune_trainer.storage.s3 import S3Store
from finetune_trainer.train import auto_batch, compile_cache, trained_cache
from finetune_trainer.train.auto_batch import ModelShape
from tests.trainer_fixtures import ALPACA_ROWS, gemma_tokenizer_dir, write_jsonl

GB = 2**30
GEMMA3_270M = ModelShape(parameters=268_098_176, layers=18, hidden=640, intermediate=2048, vocab=262_144)
LLAMA32_1B = ModelShape(parameters=1_235_814_400, layers=16, hidden=2048, intermediate=8192, vocab=128_256)


# ------------------------------------------------------------------------- auto micro-batch
@pytest.mark.parametrize(("seq", "batch"), [(2048, 32), (512, 128), (1024, 64), (4096, 16), (8192, 8),
                                            (3000, 16), (65536, 1), (131072, 1), (16, 256), (200, 256)])
def test_micro_batch_is_the_pow2_of_65k_tokens_clamped(seq, batch):
    assert auto_batch.micro_batch_for(seq) == batch


def test_gemma_270m_on_an_80gb_gpu_trains_32x2048_without_checkpointing():
    choice = auto_batch.choose(GEMMA3_270M, 2048, 79 * GB, cuda=True)
    assert (choice.batch_size, choice.gradient_checkpointing) == (32, False)
    assert "32 x 2048" in choice.reason


def test_padding_free_batches_of_a_chunked_head_keep_32x2048_on_an_80gb_gpu():
    """A padding-free step's loss is chunked (head_loss.py) for a model whose head is a plain matrix
    product, as Gemma 3's is: its logits are never whole, and an 80 GB H100 keeps 32 x 2048."""
    spec = TrainingSpec(max_seq_length=2048, packing=True)
    assert GEMMA3_270M.chunked_head
    assert auto_batch.resolve(spec, GEMMA3_270M, 78 * GB, cuda=True)[0].batch_size == 32


def test_padding_free_batches_that_hold_their_full_logits_count_them_and_halve_before_checkpointing():
    """A model whose head head_loss cannot take (a logit softcap) holds the whole micro-batch's logits
    padding-free: 32 x 2048 ran out of memory so on an 80 GB H100 (2026-12-05); 16 x 2048 without
    checkpointing fits, and a 141 GB H200 keeps 32."""
    on_h100 = auto_batch.choose(GEMMA3_270M, 2048, 78 * GB, cuda=True, full_logits=True)
    assert (on_h100.batch_size, on_h100.gradient_checkpointing) == (16, False)
    assert auto_batch.peak_bytes(GEMMA3_270M, 65536, False, full_logits=True) > 78 * GB
    on_h200 = auto_batch.choose(GEMMA3_270M, 2048, 139 * GB, cuda=True, full_logits=True)
    assert (on_h200.batch_size, on_h200.gradient_checkpointing) == (32, False)
    on_40gb = auto_batch.choose(GEMMA3_270M, 2048, 39 * GB, cuda=True, full_logits=True)
    assert on_40gb.batch_size < 16 and auto_batch.peak_bytes(
        GEMMA3_270M, on_40gb.batch_size * 2048, on_40gb.gradient_checkpointing, full_logits=True) <= 0.7 * 39 * GB
    softcapped = dataclasses.replace(GEMMA3_270M, chunked_head=False)
    spec = TrainingSpec(max_seq_length=2048, packing=True)
    assert auto_batch.resolve(spec, softcapped, 78 * GB, cuda=True)[0].batch_size == 16
    assert auto_batch.resolve(spec.model_copy(update={"padding_free": "off"}), softcapped, 78 * GB,
                              cuda=True)[0].batch_size == 32


def test_a_smaller_gpu_turns_checkpointing_on_before_it_shrinks_the_batch():
    on_24gb = auto_batch.choose(GEMMA3_270M, 2048, 22 * GB, cuda=True)
    assert (on_24gb.batch_size, on_24gb.gradient_checkpointing) == (32, True)
    on_4gb = auto_batch.choose(GEMMA3_270M, 2048, 4 * GB, cuda=True)
    assert on_4gb.gradient_checkpointing and on_4gb.batch_size < 32
    assert auto_batch.peak_bytes(GEMMA3_270M, on_4gb.batch_size * 2048, True) <= auto_batch.SAFE_FRACTION * 4 * GB


def test_a_1b_model_checkpoints_on_80gb_and_the_memory_model_matches_the_measured_270m():
    assert auto_batch.choose(LLAMA32_1B, 2048, 79 * GB, cuda=True).gradient_checkpointing
    # Measured on an H100 (docs/benchmarks.md): 33.5 GB without checkpointing, 3.5 GB with, 32 x 2048.
    assert 28 * GB < auto_batch.peak_bytes(GEMMA3_270M, 65536, False) < 38 * GB
    assert 2.5 * GB < auto_batch.peak_bytes(GEMMA3_270M, 65536, True) < 5 * GB


def test_explicit_values_always_win():
    choice = auto_batch.choose(GEMMA3_270M, 2048, 4 * GB, cuda=True, batch_size=64, gradient_checkpointing=False)
    assert (choice.batch_size, choice.gradient_checkpointing) == (64, False)
    only_batch = auto_batch.choose(GEMMA3_270M, 2048, 79 * GB, cuda=True, batch_size=4)
    assert (only_batch.batch_size, only_batch.gradient_checkpointing) == (4, False)
    only_ckpt = auto_batch.choose(GEMMA3_270M, 2048, 79 * GB, cuda=True, gradient_checkpointing=True)
    assert (only_ckpt.batch_size, only_ckpt.gradient_checkpointing) == (32, True)


def test_cpu_and_unknown_sizes_keep_the_small_defaults():
    assert auto_batch.choose(GEMMA3_270M, 2048, None, cuda=False) == auto_batch.Choice(8, True, "CPU: the small defaults")
    assert auto_batch.choose(None, 2048, 79 * GB, cuda=True).batch_size == 8
    explicit = auto_batch.choose(GEMMA3_270M, 2048, None, cuda=False, batch_size=2, gradient_checkpointing=False)
    assert (explicit.batch_size, explicit.gradient_checkpointing) == (2, False)


def test_resolve_fills_the_spec_and_the_spec_defaults_to_auto():
    spec = TrainingSpec(max_seq_length=512)
    assert spec.batch_size == "auto" and spec.gradient_checkpointing is None
    resolved, choice = auto_batch.resolve(spec, GEMMA3_270M, 79 * GB, cuda=True)
    assert (resolved.batch_size, resolved.gradient_checkpointing) == (128, False)
    assert TrainingSpec.model_validate({"batchSize": 16}).batch_size == 16
    with pytest.raises(ValueError):
        TrainingSpec.model_validate({"batchSize": "big"})
    with pytest.raises(ValueError):
        TrainingSpec.model_validate({"batchSize": 0})


# ------------------------------------------------------------------------- cache keys
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok") / "gemma"
    shutil.copytree(gemma_tokenizer_dir(), folder)
    return AutoTokenizer.from_pretrained(str(folder))


def test_dataset_key_hits_on_equal_inputs_and_misses_on_each_change(tokenizer, tmp_path):
    from finetune_trainer.data import chat_templates

    template = chat_templates.resolve("gemma3", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    rows = Rows(str(data), [], [data])
    ds, tr = DatasetSpec(source=str(data)), TrainingSpec(max_seq_length=64)

    def key(dataset=ds, training=tr, tok=tokenizer, tmpl=template, parity=16, loaded=rows):
        return digest(prep.cache_inputs(dataset, training, tok, tmpl, parity, prep.source_digest(loaded)))

    base = key()
    assert key() == base  # a hit: same inputs, same key
    other = write_jsonl(tmp_path / "e.jsonl", ALPACA_ROWS[:-1] + [{**ALPACA_ROWS[-1], "output": "Four."}])
    changed = {
        "source bytes": key(loaded=Rows(str(other), [], [other])),
        "format": key(dataset=DatasetSpec(source=str(data), format="alpaca")),
        "split": key(dataset=DatasetSpec(source=str(data), split="test")),
        "validationSplit": key(dataset=DatasetSpec(source=str(data), validation_split=0.1)),
        "maxSamples": key(dataset=DatasetSpec(source=str(data), max_samples=3)),
        "maxSeqLength": key(training=TrainingSpec(max_seq_length=128)),
        "seed": key(training=TrainingSpec(max_seq_length=64, seed=1)),
        "responses only": key(training=TrainingSpec(max_seq_length=64, train_on_responses_only=False)),
        "chat template": key(tmpl=chat_templates.resolve("chatml", tokenizer)),
        "parity samples": key(parity=8),
    }
    assert len({base, *changed.values()}) == len(changed) + 1, changed
    # The same bytes under another name or path are the same dataset: content-addressed.
    copy = tmp_path / "elsewhere" / "d.jsonl"
    copy.parent.mkdir()
    shutil.copy(data, copy)
    assert key(loaded=Rows(str(copy), [], [copy]), dataset=ds) == base
    # Hyperparameters a spec edit changes do not touch the key.
    assert key(training=TrainingSpec(max_seq_length=64, learning_rate=1e-5, epochs=4, batch_size=2)) == base


def test_dataset_key_changes_with_the_tokenizer_files_and_the_preparation_code(tokenizer, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from finetune_trainer.data import chat_templates

    template = chat_templates.resolve("gemma3", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    ds, tr, rows = DatasetSpec(source=str(data)), TrainingSpec(), Rows(str(data), [], [data])
    base = digest(prep.cache_inputs(ds, tr, tokenizer, template, 16, prep.source_digest(rows)))
    folder = tmp_path / "tok2"
    shutil.copytree(tokenizer.name_or_path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 12345
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    edited = AutoTokenizer.from_pretrained(str(folder))
    assert digest(prep.cache_inputs(ds, tr, edited, template, 16, prep.source_digest(rows))) != base
    monkeypatch.setattr(prep, "code_version", lambda: "another-version")
    assert digest(prep.cache_inputs(ds, tr, tokenizer, template, 16, prep.source_digest(rows))) != base


def test_hub_rows_without_files_are_keyed_by_their_content():
    a = Rows("hf:x", [(1, {"text": "a"}), (2, {"text": "b"})], None)
    b = Rows("hf:x", [(1, {"text": "a"}), (2, {"text": "c"})], None)
    assert prep.source_digest(a) == prep.source_digest(Rows("hf:y", list(a.rows), None)) != prep.source_digest(b)


def test_compile_key_changes_with_each_input():
    tr = TrainingSpec(batch_size=32, gradient_checkpointing=False, max_seq_length=2048, packing=True)
    args = dict(backend="unsloth", padding_free="auto", versions={"torch": "2.11.0", "triton": "3.6.0"},
                gpu={"device": "NVIDIA H200", "capability": [9, 0], "cuda": "13.0"}, env={"UNSLOTH_X": "1"})
    base = digest(compile_cache.key_inputs("config:abc", tr, **args))
    assert digest(compile_cache.key_inputs("config:abc", tr, **args)) == base
    variants = [
        compile_cache.key_inputs("config:abd", tr, **args),
        compile_cache.key_inputs("config:abc", tr.model_copy(update={"batch_size": 16}), **args),
        compile_cache.key_inputs("config:abc", tr.model_copy(update={"max_seq_length": 1024}), **args),
        compile_cache.key_inputs("config:abc", tr.model_copy(update={"gradient_checkpointing": True}), **args),
        compile_cache.key_inputs("config:abc", tr.model_copy(update={"method": "qlora"}), **args),
        compile_cache.key_inputs("config:abc", tr, **{**args, "versions": {"torch": "2.12.0", "triton": "3.6.0"}}),
        compile_cache.key_inputs("config:abc", tr, **{**args, "gpu": {**args["gpu"], "device": "NVIDIA H100"}}),
        compile_cache.key_inputs("config:abc", tr, **{**args, "env": {"UNSLOTH_X": "0"}}),
    ]
    assert len({base, *map(digest, variants)}) == len(variants) + 1
    # The learning rate and epochs compile nothing: a spec edit of those reuses the kernels.
    edited = tr.model_copy(update={"learning_rate": 1e-5, "epochs": 4})
    assert digest(compile_cache.key_inputs("config:abc", edited, **args)) == base


def test_model_identity_is_the_config_not_the_path(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"hidden_size": 640, "model_type": "gemma3_text"}))
    assert compile_cache.model_identity(str(tmp_path / "a")) == compile_cache.model_identity(str(tmp_path / "b"))
    (tmp_path / "b" / "config.json").write_text(json.dumps({"hidden_size": 512, "model_type": "gemma3_text"}))
    assert compile_cache.model_identity(str(tmp_path / "a")) != compile_cache.model_identity(str(tmp_path / "b"))


def test_training_key_follows_what_decides_the_adapter(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"rows")

    def key(training=None, **over):
        args = {"model": trained_cache.weights_identity(str(model), None), "dataset_dir": data,
                "training": training or TrainingSpec(), "versions": {"torch": "2.11"}, "device": {"device": "cpu"},
                "world_size": 1, "backend": "transformers", **over}
        return digest(trained_cache.key_inputs(**args))

    same = key()
    assert key() == same
    # Where and how often checkpoints are written does not change the adapter.
    assert key(TrainingSpec(checkpoint_every_steps=7)) == same
    for changed in (key(TrainingSpec(seed=4)), key(TrainingSpec(learning_rate=1e-5)), key(TrainingSpec(epochs=4)),
                    key(device={"device": "NVIDIA H200"}), key(world_size=2), key(versions={"torch": "2.12"})):
        assert changed != same
    (data / "train.parquet").write_bytes(b"other rows")
    assert key() != same
    (data / "train.parquet").write_bytes(b"rows")
    (model / "model.safetensors").write_bytes(b"tuned weights")  # same path and config, other weights
    assert key() != same


def test_a_hub_model_is_reused_only_at_a_pinned_commit():
    commit = "a" * 40
    assert trained_cache.weights_identity("google/gemma-3-270m", commit) == f"hub:google/gemma-3-270m@{commit}"
    assert trained_cache.weights_identity("google/gemma-3-270m", None) is None
    assert trained_cache.weights_identity("google/gemma-3-270m", "main") is None


def test_cache_paths_carry_the_namespace():
    assert cache_uri("models", "finetune", "team-a") == "s3://models/finetune/team-a/.cache/"
    assert cache_uri("models", "", "team-b") == "s3://models/team-b/.cache/"


# ------------------------------------------------------------------------- parallel encoding
def test_parallel_encoding_equals_serial(tokenizer):
    from finetune_trainer.data import chat_templates
    from finetune_trainer.data.formats import normalize

    template = chat_templates.resolve("gemma3", tokenizer)
    rows = [{"instruction": f"Question {i}: {r['instruction']}", "input": r["input"], "output": r["output"] * (1 + i % 3)}
            for i, r in enumerate(ALPACA_ROWS * 6)]
    examples = [normalize(r, "alpaca") for r in rows] + [{"messages": [{"role": "assistant", "content": "x"},
                                                                        {"role": "assistant", "content": "y"}]}]
    serial = prep.encode_all(examples, tokenizer, template, True, workers=1)
    parallel = prep.encode_all(examples, tokenizer, template, True, workers=2, min_rows=0)
    assert len(serial) == len(parallel) == len(examples)
    for a, b in zip(serial, parallel, strict=True):
        if isinstance(a, Exception):
            assert isinstance(b, type(a)) and str(a) == str(b)
        else:
            assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert any(isinstance(r, Exception) for r in serial)  # the malformed row is reported, not dropped


# ------------------------------------------------------------------------- S3 entries
@pytest.fixture
def store(s3, monkeypatch):
    from finetune_api.spec import S3Spec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    bucket = s3.make_bucket(f"cache-{uuid.uuid4().hex[:10]}")
    st = S3Store(S3Spec(bucket=bucket, endpoint=s3.endpoint, force_path_style=True), attempts=1)
    st.bucket = bucket
    return st


def _put(store, uri: str, body: bytes) -> None:
    bucket, _, key = uri[5:].partition("/")
    store.client.put_object(Bucket=bucket, Key=key, Body=body)


def test_an_entry_round_trips_and_a_corrupt_or_mismatched_one_is_a_miss(store, tmp_path):
    cache = S3Cache(store, cache_uri(store.bucket, "finetune", "team-a"), "datasets")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"alpha" * 1000)
    (src / "sub").mkdir()
    (src / "sub" / "b.txt").write_text("beta")
    assert cache.fetch("k1", tmp_path / "d0").reason == "absent"
    assert cache.store_entry("k1", src, ["a.bin", "sub/b.txt"], {"why": "test"})
    hit = cache.fetch("k1", tmp_path / "d1")
    assert hit.hit and (tmp_path / "d1" / "a.bin").read_bytes() == b"alpha" * 1000
    assert (tmp_path / "d1" / "sub" / "b.txt").read_text() == "beta"

    _put(store, cache.entry_uri("k1") + "a.bin", b"alpha" * 999 + b"omega")  # same size, other bytes
    corrupt = cache.fetch("k1", tmp_path / "d2")
    assert not corrupt.hit and corrupt.reason.startswith("corrupt") and not (tmp_path / "d2").exists()
    _put(store, cache.entry_uri("k1") + "a.bin", b"short")
    assert cache.fetch("k1", tmp_path / "d3").reason.startswith("corrupt")

    # An entry whose manifest names another key (copied, or written under the wrong key) is not trusted.
    manifest = store.client.get_object(Bucket=store.bucket, Key=cache.entry_uri("k1")[len(f"s3://{store.bucket}/"):]
                                       + "manifest.json")["Body"].read()
    _put(store, cache.entry_uri("k2") + "manifest.json", manifest)
    assert cache.fetch("k2", tmp_path / "d4").reason.startswith("mismatch")
    _put(store, cache.entry_uri("k3") + "manifest.json", b"{not json")
    assert cache.fetch("k3", tmp_path / "d5").reason.startswith("corrupt")
    # Another namespace's cache is another prefix: team-b never sees team-a's entries.
    assert S3Cache(store, cache_uri(store.bucket, "finetune", "team-b"), "datasets").fetch("k1", tmp_path / "d6").reason == "absent"


def test_prepare_hits_the_cache_and_rebuilds_a_corrupted_entry(store, tokenizer, tmp_path):
    from finetune_trainer.data import chat_templates

    template = chat_templates.resolve("gemma3", tokenizer)
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 5)
    ds, tr = DatasetSpec(source=str(data), validation_split=0.2), TrainingSpec(max_seq_length=64)
    cache = S3Cache(store, cache_uri(store.bucket, "finetune", "team-a"), "datasets")

    def run(n: int) -> tuple[dict, dict[str, bytes]]:
        out = tmp_path / f"prep-{n}"
        report = prep.prepare(ds, tr, tokenizer, template, out, parity_samples=4, cache=cache)
        return report, {name: (out / name).read_bytes() for name in ("train.parquet", "validation.parquet",
                                                                      "parity.parquet")}

    first, files1 = run(1)
    assert first["cache"]["dataset"] == "miss" and first["cache"]["reason"] == "absent" and first["cache"]["stored"]
    second, files2 = run(2)
    assert second["cache"]["dataset"] == "hit" and files2 == files1
    assert second["rows"] == first["rows"] and second["tokens"] == first["tokens"]

    train_uri = cache.entry_uri(_full_key(store, cache))
    _put(store, train_uri + "train.parquet", b"PAR1 not a parquet file PAR1")
    third, files3 = run(3)
    assert third["cache"]["dataset"] == "miss" and third["cache"]["reason"].startswith("corrupt")
    assert third["cache"]["stored"] and files3 == files1  # rebuilt by tokenizing, and written over
    fourth, files4 = run(4)
    assert fourth["cache"]["dataset"] == "hit" and files4 == files1


def _full_key(store, cache: S3Cache) -> str:
    prefix = cache.root[len(f"s3://{store.bucket}/"):]
    keys = {o["Key"][len(prefix):].split("/")[0]
            for o in store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)["Contents"]}
    (key,) = keys
    return key


def test_compile_cache_round_trips_through_s3_and_rejects_a_corrupt_archive(store, tmp_path):
    from finetune_trainer.storage.cache import Lookup

    def dirs(root: Path) -> dict[str, Path]:
        out = {name: root / name for name in compile_cache.ENV_DIRS}
        for p in out.values():
            p.mkdir(parents=True, exist_ok=True)
        return out

    cache = S3Cache(store, cache_uri(store.bucket, "finetune", "team-a"), "compile")
    inputs = {"model": "config:abc", "batchSize": 32}
    made = dirs(tmp_path / "run1")
    (made["inductor"] / "fxgraph" / "ab").mkdir(parents=True)
    (made["inductor"] / "fxgraph" / "ab" / "entry").write_bytes(b"\x00kernel" * 100)
    (made["triton"] / "XYZ").mkdir()
    (made["triton"] / "XYZ" / "k.cubin").write_bytes(b"cubin")
    (made["unsloth"] / "UnslothModule.py").write_text("# generated\n")
    first = compile_cache.CompileCache(cache, made, inputs, tmp_path / "s1")
    assert first.restore().reason == "absent"
    assert first.save() is True

    fresh = dirs(tmp_path / "run2")
    second = compile_cache.CompileCache(cache, fresh, inputs, tmp_path / "s2")
    assert second.restore().hit
    assert (fresh["inductor"] / "fxgraph" / "ab" / "entry").read_bytes() == b"\x00kernel" * 100
    assert (fresh["triton"] / "XYZ" / "k.cubin").read_bytes() == b"cubin"
    assert (fresh["unsloth"] / "UnslothModule.py").read_text() == "# generated\n"
    assert second.save() is False  # a hit is not uploaded again
    assert second.report()["compile"] == "hit"

    _put(store, cache.entry_uri(first.key) + compile_cache.ARCHIVE, b"garbage")
    third = compile_cache.CompileCache(cache, dirs(tmp_path / "run3"), inputs, tmp_path / "s3")
    lookup = third.restore()
    assert isinstance(lookup, Lookup) and not lookup.hit and lookup.reason.startswith("corrupt")
    assert not any((tmp_path / "run3").rglob("entry"))
    other = compile_cache.CompileCache(cache, dirs(tmp_path / "run4"), {**inputs, "batchSize": 16}, tmp_path / "s4")
    assert other.restore().reason == "absent"  # other shapes: another key


def test_a_restored_compile_cache_never_rewrites_a_file_the_process_has_loaded(store, tmp_path):
    """Triton builds its driver stubs into its cache at import, before the restore; the process maps them.
    Written into in place, a mapped library crashes the process at its next call (the GPU re-run that died
    of a segmentation fault at its first step): a restored file must arrive as a new inode."""
    import mmap

    cache = S3Cache(store, cache_uri(store.bucket, "finetune", "team-a"), "compile")
    made = {name: tmp_path / "run1" / name for name in compile_cache.ENV_DIRS}
    (made["triton"] / "HASH").mkdir(parents=True)
    (made["triton"] / "HASH" / "cuda_utils.so").write_bytes(b"stored stub" * 1000)
    first = compile_cache.CompileCache(cache, made, {"model": "m"}, tmp_path / "s1")
    first.restore()
    assert first.save() is True

    here = {name: tmp_path / "run2" / name for name in compile_cache.ENV_DIRS}
    loaded = here["triton"] / "HASH" / "cuda_utils.so"
    loaded.parent.mkdir(parents=True)
    loaded.write_bytes(b"loaded stub" * 1000)  # what this process's imports built and mapped
    with open(loaded, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        inode = os.fstat(f.fileno()).st_ino
        assert compile_cache.CompileCache(cache, here, {"model": "m"}, tmp_path / "s2").restore().hit
        assert mapped[:11] == b"loaded stub" and os.fstat(f.fileno()).st_size == 11000  # as mapped
    assert loaded.read_bytes() == b"stored stub" * 1000 and loaded.stat().st_ino != inode
    assert sorted(p.name for p in here["triton"].iterdir()) == ["HASH"]  # no staging left behind


COMPILE_PROBE = r"""
import json, sys
from pathlib import Path
import torch
from finetune_trainer.train import compile_cache
dirs = compile_cache.use_dirs(Path(sys.argv[1]))
loaded = compile_cache.load_artifacts(dirs) if sys.argv[2] == "load" else None
f = torch.compile(lambda x: torch.nn.functional.gelu(x * 2 + 1).sum(-1))
f(torch.randn(8, 16))
from torch._dynamo.utils import counters
saved = compile_cache.save_artifacts(dirs) if sys.argv[2] == "save" else None
print(json.dumps({"loaded": loaded, "saved": saved, "inductor": dict(counters["inductor"])}))
"""


def test_a_compilation_reaches_a_new_process_through_the_compile_cache(store, tmp_path):
    """torch.compile's artifacts, saved after training, archived to S3 and loaded by the next pod before
    it compiles, turn its compilation into cache hits. Inductor's own folder is elsewhere in both
    processes (Unsloth unsets TORCHINDUCTOR_CACHE_DIR), so the artifacts are the only way across."""
    import subprocess
    import sys

    def probe(root: Path, mode: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in compile_cache.ENV_DIRS.values()}
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / f"inductor-default-{mode}")  # as after Unsloth's import
        out = subprocess.run([sys.executable, "-c", COMPILE_PROBE, str(root), mode], env=env, check=True,
                             capture_output=True, text=True, timeout=600).stdout
        return json.loads(out.strip().splitlines()[-1])

    def dirs(root: Path) -> dict[str, Path]:
        return {name: root / name for name in [*compile_cache.ENV_DIRS, compile_cache.ARTIFACTS_DIR]}

    first = probe(tmp_path / "pod1", "save")
    assert first["saved"] > 0 and first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    cache = S3Cache(store, cache_uri(store.bucket, "finetune", "team-a"), "compile")
    inputs = {"model": "config:probe"}
    assert compile_cache.CompileCache(cache, dirs(tmp_path / "pod1"), inputs, tmp_path / "s1").save() is True

    pod2 = compile_cache.CompileCache(cache, dirs(tmp_path / "pod2"), inputs, tmp_path / "s2")
    assert pod2.restore().hit
    second = probe(tmp_path / "pod2", "load")
    assert second["loaded"] == "loaded"
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not second["inductor"].get("fxgraph_cache_miss")


def test_no_artifacts_to_load_is_said_not_raised(tmp_path):
    dirs = {compile_cache.ARTIFACTS_DIR: tmp_path}
    assert compile_cache.load_artifacts(dirs) == "absent"
    (tmp_path / compile_cache.ARTIFACTS).write_bytes(b"not what torch wrote")
    assert compile_cache.load_artifacts(dirs).startswith("refused")


def test_model_shape_counts_the_parameters_from_the_safetensors_headers():
    from transformers import AutoModelForCausalLM

    from finetune_trainer.train.model_loading import BaseModel, model_shape
    from tests.trainer_fixtures import tiny_gemma

    shape = model_shape(BaseModel(str(tiny_gemma())))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma()))
    assert shape == ModelShape(parameters=sum(p.numel() for p in model.parameters()),
                               layers=model.config.num_hidden_layers, hidden=model.config.hidden_size,
                               intermediate=model.config.intermediate_size, vocab=model.config.vocab_size)


def test_compile_key_ignores_variables_set_after_startup(monkeypatch):
    """A library setting UNSLOTH_*/TRITON_* in-process must not move the key (a re-run would always miss)."""
    import finetune_trainer

    monkeypatch.setattr(finetune_trainer, "STARTUP_ENV", {"UNSLOTH_BLOCK_COMPILE": "0", "PATH": "/bin"})
    tr = TrainingSpec(batch_size=32, gradient_checkpointing=False, max_seq_length=2048, packing=True)
    args = dict(backend="unsloth", padding_free="auto", versions={"torch": "2.11.0"}, gpu={"device": "NVIDIA H200"})

    def key():
        return digest(compile_cache.key_inputs("config:abc", tr, **args, env=compile_cache.switches(
            {"UNSLOTH_FUSED_LINEAR_MIN_ROWS": "2048", "UNSLOTH_BLOCK_COMPILE": "1"})))

    before = key()
    monkeypatch.setenv("UNSLOTH_IS_PRESENT", "1")  # what an import does
    monkeypatch.setenv("TRITON_PTXAS_PATH", "/x")
    assert key() == before
    inputs = compile_cache.key_inputs("config:abc", tr, **args, env=compile_cache.switches({"UNSLOTH_BLOCK_COMPILE": "1"}))
    assert inputs["env"] == {"UNSLOTH_BLOCK_COMPILE": "0"}  # the pod's own value wins over the trainer's default
    monkeypatch.setattr(finetune_trainer, "STARTUP_ENV", {"UNSLOTH_BLOCK_COMPILE": "1"})
    assert key() != before  # a switch the pod was started with is part of the key


def test_what_a_cache_entry_carries_into_the_status_is_bounded():
    """Whoever can write the bucket can write an entry: its origin and parity result reach the status only
    in the shapes the trainer writes them."""
    import numpy as np

    from finetune_trainer.export import cache as export_cache
    from finetune_trainer.export import parity

    origin = trained_cache.origin_fields(json.dumps({
        "namespace": "team-a", "name": "x" * 5000, "uid": "u", "run": 2, "outputUri": "s3://b/p/",
        "extra": {"nested": "blob"}, }))
    assert origin == {"namespace": "team-a", "name": "x" * 512, "uid": "u", "run": 2, "outputUri": "s3://b/p/"}
    assert trained_cache.origin_fields(json.dumps({"run": "2", "name": ["a"]})) == {}
    assert trained_cache.origin_fields("not json") == {} and trained_cache.origin_fields("[1]") == {}

    rows = [{"top1": np.array([1, 2]), "nll": np.array([0.5, 0.7])}]
    written = parity.compare(rows, rows)
    assert export_cache.parity_shaped(written) and export_cache.parity_shaped({})
    assert not export_cache.parity_shaped({**written, "note": "x" * 10**6})
    assert not export_cache.parity_shaped({"perplexity": "1.0"}) and not export_cache.parity_shaped([written])


def test_a_training_entry_restores_only_the_adapter_and_its_log(store, tmp_path):
    """An entry that would write elsewhere in the workdir (the prepared dataset, say) is a miss."""
    from finetune_trainer.paths import Workdir

    cache = S3Cache(store, cache_uri(store.bucket, "runs", "team-a"), "trained")
    made = Workdir(tmp_path / "made")
    (made.adapter).mkdir(parents=True)
    (made.adapter / "train_result.json").write_text("{}")
    (made.adapter / "adapter_model.safetensors").write_bytes(b"lora")
    made.train_log.write_text("{}\n")
    good = trained_cache.TrainedCache(cache, made, {"k": 1})
    assert good.store({"name": "job", "run": 1})
    (made.root / "dataset").mkdir()
    (made.root / "dataset" / "train.parquet").write_bytes(b"poison")
    files = [*trained_cache.entry_files(made), "dataset/train.parquet", trained_cache.ORIGIN]
    assert cache.store_entry(digest({"k": 2}), made.root, files, {"k": 2})

    fresh = Workdir(tmp_path / "fresh")
    fresh.root.mkdir()
    hit = trained_cache.TrainedCache(cache, fresh, {"k": 1})
    assert hit.restore().hit and (fresh.adapter / "adapter_model.safetensors").read_bytes() == b"lora"
    assert hit.origin == {"name": "job", "run": 1}
    other = Workdir(tmp_path / "other")
    other.root.mkdir()
    poisoned = trained_cache.TrainedCache(cache, other, {"k": 2})
    lookup = poisoned.restore()
    assert not lookup.hit and lookup.reason == "corrupt: the entry holds 'dataset'"
    assert not (other.root / "dataset").exists() and not other.adapter.exists()
    # The run that stored an entry does not reuse it on a retry: it resumes from its own checkpoints.
    retry = Workdir(tmp_path / "retry")
    retry.root.mkdir()
    own = trained_cache.TrainedCache(cache, retry, {"k": 1}, run=(None, 1))
    assert own.restore().reason.startswith("own:") and not retry.adapter.exists()
    assert trained_cache.TrainedCache(cache, retry, {"k": 1}, run=("other-uid", 1)).restore().hit
