"""`finetune run` end to end on a tiny Gemma 3 with the real tokenizer, on CPU, against a real local S3
(SeaweedFS) and an HTTPS fake apiserver: prepare → train → export f16/q8_0/q4_k_m → parity → upload,
then the GGUF files in llama.cpp, the manifest against the objects, an idempotent re-upload, the
export-gguf command on its own, and a preempted run resuming from its S3 checkpoint."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune_api import RunConfig
from finetune_trainer import pipeline
from finetune_trainer.cli import main
from finetune_trainer.reporting.progress import Reporter
from tests.trainer_fixtures import ALPACA_ROWS, FakeApiServer, run_job, tiny_gemma, trainer_env, write_jsonl

QUANTS = ["f16", "q8_0", "q4_k_m"]
EVAL_TASKS = Path(__file__).resolve().parent / "data" / "eval"


def job_manifest(name: str, bucket: str, endpoint: str, data: Path, tiny: Path, **spec_overrides) -> dict:
    spec = {
        "baseModel": {"uri": str(tiny)},
        "dataset": {"source": str(data), "validationSplit": 0.2},
        # A high learning rate on a small repeated set: the loss must visibly fall in a few steps.
        "training": {"maxSteps": 12, "batchSize": 4, "learningRate": 5e-3, "maxSeqLength": 64,
                     "checkpointEverySteps": 4},
        "export": {"gguf": QUANTS, "paritySamples": 4},
        "output": {"s3": {"bucket": bucket, "endpoint": endpoint, "forcePathStyle": True, "prefix": "runs"}},
        "resources": {"gpus": 0},
    }
    for key, value in spec_overrides.items():
        spec[key] = {**spec.get(key, {}), **value}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
            "metadata": {"name": name, "namespace": "team-a"}, "spec": spec}


@pytest.fixture(scope="module")
def env(s3, tmp_path_factory):
    """Offline, S3 credentials from the environment, status reporting to a fake apiserver."""
    apiserver = FakeApiServer(tmp_path_factory.mktemp("apiserver")).start()
    term = tmp_path_factory.mktemp("term") / "termination-log"
    values = {**trainer_env(s3, term), "FINETUNE_PROGRESS_INTERVAL": "1000",
              **apiserver.env("tiny", namespace="team-a", run=1)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield SimpleNamespace(apiserver=apiserver, termination_log=term)
    apiserver.stop()


@pytest.fixture(scope="module")
def trained(env, s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    bucket = s3.make_bucket(f"trainer-{uuid.uuid4().hex[:10]}")
    data = write_jsonl(root / "data.jsonl", ALPACA_ROWS * 5)
    rc, config, workdir = run_job(job_manifest("tiny", bucket, s3.endpoint, data, tiny_gemma()), root)
    cfg = RunConfig.load(config)
    return SimpleNamespace(rc=rc, config=config, workdir=workdir, bucket=bucket, cfg=cfg,
                           prefix=cfg.output_uri.removeprefix(f"s3://{bucket}/"),
                           metrics=json.loads((workdir / "metrics.json").read_text()) if rc == 0 else None,
                           manifest=json.loads((workdir / "manifest.json").read_text()) if rc == 0 else None)


def test_run_succeeds_and_reports_every_stage_to_the_status(trained, env):
    assert trained.rc == 0
    patches = [r["body"] for r in env.apiserver.requests]
    assert all(p[0] == {"op": "test", "path": "/status/run", "value": 1} for p in patches)
    stages = [p[1]["value"]["stage"] for p in patches]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == \
        ["Preparing", "Training", "Exporting", "Uploading"]
    training = [p[1]["value"] for p in patches if p[1]["value"].get("step")]
    assert training[-1]["step"] == training[-1]["totalSteps"] == 12
    assert training[-1]["tokensPerSecond"] > 0 and training[-1]["learningRate"] >= 0
    final = {op["path"]: op["value"] for op in patches[-1][1:]}
    assert set(final) == {"/status/progress", "/status/metrics", "/status/artifacts"}
    assert final["/status/metrics"]["steps"] == 12
    assert {a["kind"] for a in final["/status/artifacts"]} >= {"gguf", "modelfile", "adapter", "plot",
                                                               "dataset-report", "manifest"}


def test_loss_falls_and_the_adapter_weights_change(trained):
    from safetensors.torch import load_file

    log = [json.loads(line) for line in (trained.workdir / "train-log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log]
    assert [e["step"] for e in log] == list(range(1, 13))
    assert sum(losses[:2]) / 2 - sum(losses[-2:]) / 2 > 1.5, losses
    final = load_file(str(trained.workdir / "adapter" / "adapter_model.safetensors"))
    earlier = load_file(str(trained.workdir / "checkpoints" / "step-00000008" / "adapter" / "adapter_model.safetensors"))
    lora_b = [k for k in final if "lora_B" in k]
    assert len(lora_b) == 6 * 7  # every projection of every layer
    assert all(final[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: it moved
    assert any(not final[k].equal(earlier[k]) for k in final)  # and kept moving after step 8
    assert (trained.workdir / "loss-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_parity_reference_from_memory_is_the_saved_model_read_back(trained, tmp_path):
    """Export scores the GGUFs against the merged model still in memory; its predictions must be those
    of the folder it saved, as read back in fp32 (a bf16 round trip of RoPE's inv_freq once was not)."""
    from transformers import AutoTokenizer

    from finetune_trainer.data import chat_templates
    from finetune_trainer.data.prepare import load_split
    from finetune_trainer.export import convert, parity
    from finetune_trainer.train.model_loading import BaseModel

    tokenizer = AutoTokenizer.from_pretrained(str(trained.workdir / "merged"))
    rows = [list(r["input_ids"]) for r in load_split(trained.workdir / "dataset", "parity")][:4]
    in_memory: list = []
    events: list = []

    def on_saved(folder):  # export starts the converter here, while the reference runs: all must be on disk
        events.append(("saved", sorted(p.name for p in folder.iterdir())))

    def with_model(model):
        events.append(("model", None))
        in_memory.extend(parity.reference_of(model, rows))

    merged = convert.merge(BaseModel(str(tiny_gemma())), trained.workdir / "adapter", tmp_path / "merged", tokenizer,
                          chat_templates.resolve("auto", tokenizer), with_model=with_model, on_saved=on_saved)
    assert [e[0] for e in events] == ["saved", "model"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json"} <= set(events[0][1])
    assert sorted(p.name for p in merged.iterdir()) == events[0][1]  # nothing written after the converter starts
    read_back = parity.reference(merged, rows)
    assert len(in_memory) == len(read_back) == len(parity.usable_rows(rows)) > 0
    for a, b in zip(in_memory, read_back, strict=True):
        assert (a["top1"] == b["top1"]).all()
        assert abs(a["nll"] - b["nll"]).max() < 1e-4


def test_each_gguf_loads_in_llama_cpp_chats_and_carries_template_and_eos(trained):
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained.workdir / "merged"))
    for quant in QUANTS:
        path = trained.workdir / "gguf" / f"tiny-{quant}.gguf"
        llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, seed=0)
        try:
            meta = llm.metadata
            assert "<start_of_turn>" in meta["tokenizer.chat_template"]
            assert meta["tokenizer.ggml.eos_token_id"] == "1"
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            end_of_turn = llm.tokenize(b"<end_of_turn>", add_bos=False, special=True)
            assert end_of_turn == [106] and llama_cpp.llama_vocab_is_eog(vocab, 106)
            # The same vocabulary as the model's tokenizer, whitespace runs and control tokens included.
            for text in ("  two  spaces\n\n\tand a tab", "<start_of_turn>user\nhi<end_of_turn>\n", "<b>x</b>"):
                assert llm.tokenize(text.encode(), special=True) == hf(text)["input_ids"], text
            out = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                             max_tokens=8, temperature=0)
            assert isinstance(out["choices"][0]["message"]["content"], str)
            assert out["usage"]["completion_tokens"] >= 1
        finally:
            llm.close()
        modelfile = (trained.workdir / "gguf" / f"tiny-{quant}.Modelfile").read_text()
        assert f"FROM ./tiny-{quant}.gguf" in modelfile
        assert 'PARAMETER stop "<end_of_turn>"' in modelfile and "<start_of_turn>model" in modelfile


def test_parity_with_the_merged_model_is_within_tolerance(trained):
    parity = trained.metrics["parity"]
    assert set(parity) == set(QUANTS)
    assert parity["f16"]["top1Agreement"] >= 0.99
    assert parity["q8_0"]["top1Agreement"] >= 0.9
    assert parity["q4_k_m"]["top1Agreement"] >= 0.5
    for quant, tolerance in (("f16", 0.01), ("q8_0", 0.05), ("q4_k_m", 0.5)):
        p = parity[quant]
        assert abs(p["perplexity"] / p["referencePerplexity"] - 1) <= tolerance, (quant, p)
        assert p["tokens"] > 20
    assert trained.manifest["parity"] == parity


def test_metrics_say_where_the_export_time_went(trained):
    timings = trained.metrics["timings"]
    steps = timings["exportSteps"]
    # merge, the 16-bit conversion, every other type by name, parity; the master f16 costs no extra step.
    # parityReference: the merged model's predictions, made on its device while the conversion runs;
    # merge.load and merge.save: the parts of merge.
    assert set(steps) == {"merge", "merge.load", "merge.save", "convert", "parity", "parityReference"} | \
        (set(QUANTS) - {"f16"})
    assert all(isinstance(s, float) and s >= 0 for s in steps.values())
    assert steps["merge.load"] + steps["merge.save"] <= steps["merge"] + 0.02
    in_turn = sum(v for k, v in steps.items() if k not in ("parityReference", "merge.load", "merge.save"))
    assert in_turn <= timings["exportSeconds"] + 0.1
    assert steps["merge"] + steps["parityReference"] + steps["parity"] <= timings["exportSeconds"] + 0.1


def test_manifest_lists_every_artifact_and_its_checksums_match_the_objects(trained, s3):
    client = s3.client()
    arts = trained.manifest["artifacts"]
    names = {a["name"] for a in arts}
    assert {f"gguf/tiny-{q}.gguf" for q in QUANTS} | {f"gguf/tiny-{q}.Modelfile" for q in QUANTS} <= names
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "loss-curve.png",
            "dataset/report.json"} <= names
    for a in arts:
        key = a["uri"].removeprefix(f"s3://{trained.bucket}/")
        assert key == trained.prefix + a["name"]
        body = client.get_object(Bucket=trained.bucket, Key=key)["Body"].read()
        assert len(body) == a["sizeBytes"] and hashlib.sha256(body).hexdigest() == a["sha256"], a["name"]
        head = client.head_object(Bucket=trained.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["Metadata"]["sha256"] == a["sha256"]
        checksum = head["ChecksumSHA256"]
        if "-" not in checksum:  # a single-part upload carries the object's own SHA-256
            assert base64.b64decode(checksum).hex() == a["sha256"]
    f16 = next(a for a in arts if a["name"] == "gguf/tiny-f16.gguf")
    assert f16["sizeBytes"] > 64 * 2**20  # large enough to have gone up in parts
    manifest_obj = json.loads(client.get_object(Bucket=trained.bucket, Key=trained.prefix + "manifest.json")["Body"].read())
    assert manifest_obj["artifacts"] == arts and manifest_obj["metrics"]["steps"] == 12
    checkpoints = client.list_objects_v2(Bucket=trained.bucket, Prefix=trained.prefix + "checkpoints/")
    keys = {o["Key"].removeprefix(trained.prefix) for o in checkpoints["Contents"]}
    assert {f"checkpoints/step-0000000{s}/state.json" for s in (4, 8)} | {"checkpoints/step-00000012/state.json"} <= keys


def test_upload_again_sends_nothing_that_is_already_there(trained, s3, caplog):
    client = s3.client()
    key = trained.prefix + "gguf/tiny-q8_0.gguf"
    before = client.head_object(Bucket=trained.bucket, Key=key)["LastModified"]
    caplog.set_level("INFO")
    assert main(["upload", "--config", str(trained.config), "--workdir", str(trained.workdir)]) == 0
    skipped = [r.getMessage() for r in caplog.records if "already there" in r.getMessage()]
    assert len(skipped) == len(trained.manifest["artifacts"])
    assert client.head_object(Bucket=trained.bucket, Key=key)["LastModified"] == before


def test_export_gguf_command_on_its_own(trained, tmp_path):
    import llama_cpp

    out = tmp_path / "out" / "mine.gguf"
    rc = main(["export-gguf", "--checkpoint-dir", str(trained.workdir / "adapter"), "--base-model", str(tiny_gemma()),
               "--quantization", "q8_0", "--output-file", str(out)])
    assert rc == 0 and out.exists()
    assert (out.parent / "mine.Modelfile").read_text().startswith("# Ollama Modelfile for mine (q8_0)")
    assert (out.parent / "merged" / "tokenizer.model").exists()
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    try:
        assert llm.metadata["general.file_type"] == "7"  # MOSTLY_Q8_0
    finally:
        llm.close()


class Preempted(Exception):
    pass


class InterruptingReporter(Reporter):
    """Calls `interrupt(step)` once training reaches `at_step`: a node going away, a kubelet's SIGTERM."""

    def __init__(self, at_step: int, interrupt, **kw):
        super().__init__(**kw)
        self.at_step, self.interrupt = at_step, interrupt

    def train_step(self, step, total_steps, metrics):
        super().train_step(step, total_steps, metrics)
        if step == self.at_step:
            self.interrupt(step)


def preempt(step):
    raise Preempted(f"preempted at step {step}")


def test_a_preempted_run_resumes_from_its_s3_checkpoint_and_continues_the_step_count(env, s3, bucket, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 5)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_manifest(
        "tiny-resume", bucket, s3.endpoint, data, tiny_gemma(),
        training={"maxSteps": 8, "checkpointEverySteps": 3}, export={"gguf": ["q8_0"], "parityCheck": False},
        # The Evaluating stage with the evaluation module's own offline test task.
        evaluation={"tasks": ["tiny_antonyms"], "limit": 4, "dataUri": str(EVAL_TASKS), "includeBase": True})))
    cfg = RunConfig.load(config)
    with pytest.raises(Preempted):
        pipeline.run(cfg, tmp_path / "pod-1", reporter=InterruptingReporter(5, preempt, run=1, interval=1000))
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix="runs/team-a/tiny-resume/run-1/checkpoints/")
    assert any(o["Key"].endswith("step-00000003/state.json") for o in listing["Contents"])

    # A new pod: empty disk, same run. It must fetch step 3 from S3 and train steps 4..8 only.
    workdir = tmp_path / "pod-2"
    assert main(["run", "--config", str(config), "--workdir", str(workdir), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (workdir / "train-log.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6, 7, 8]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["restarts"] == 1
    assert "tiny_antonyms" in metrics["eval"]["q8_0"]
    assert "tiny_antonyms" in metrics["eval"]["base"]  # includeBase: the base model converted and scored too
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert "eval/eval.json" in {a["name"] for a in manifest["artifacts"] if a["kind"] == "eval"}
    state = json.loads((workdir / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["restarts"] == 1 and len(state["losses"]) == 8  # the loss history survived the restart


def test_sigterm_checkpoints_the_current_step_and_exits_transient(trained, tmp_path):
    from finetune_api.spec import TrainingSpec
    from finetune_trainer.errors import TransientError
    from finetune_trainer.paths import Workdir
    from finetune_trainer.train import recipe
    from finetune_trainer.train.checkpoints import Checkpoints
    from finetune_trainer.train.model_loading import BaseModel

    before = signal.getsignal(signal.SIGTERM)
    wd = Workdir(tmp_path / "work").ensure()
    training = TrainingSpec(max_steps=6, batch_size=2, max_seq_length=64, checkpoint_every_steps=100)
    with pytest.raises(TransientError) as err:
        recipe.train(BaseModel(str(tiny_gemma())), training, trained.workdir / "dataset", wd,
                     InterruptingReporter(2, lambda _: os.kill(os.getpid(), signal.SIGTERM), interval=1000), Checkpoints(wd.checkpoints))
    assert err.value.reason == "Terminated" and err.value.exit_code == 75
    assert "SIGTERM at step 2" in err.value.message
    assert json.loads((wd.checkpoints / "step-00000002" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_the_parity_reference_runs_eagerly_through_modules_that_carry_torch_compile():
    """Unsloth's patched classes carry torch.compile directives; the reference's fp32 forwards on rows of
    many lengths must not compile them (graphs the training never made), and must not change what the
    model predicts. Outside the reference the directives hold again."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer.export import parity

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma()), dtype=torch.float32).eval()
    rows = [[2, 5, 7, 9, 11], [2, 11, 13], [2, 4, 6, 8, 10, 12, 14]]  # three lengths: three graphs
    eager = parity.reference_of(model, rows)
    graphs: list = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    mlp = model.model.layers[0].mlp
    mlp.forward = torch.compile(mlp.forward, backend=counting_backend)
    try:
        got = parity.reference_of(model, rows)
        assert graphs == []
        for a, b in zip(eager, got, strict=True):
            assert (a["top1"] == b["top1"]).all() and abs(a["nll"] - b["nll"]).max() < 1e-6
        with torch.no_grad():
            model(torch.tensor([rows[0]]), use_cache=False)
        assert len(graphs) == 1  # the stance was put back
    finally:
        torch._dynamo.reset()


def test_the_converter_started_ahead_writes_the_same_file_as_a_cold_one(trained, tmp_path, caplog):
    """The run starts llama.cpp's converter while the model trains (its imports overlap training) and
    writes the merged folder's tokenizer files meanwhile, for the converter to parse ahead; merge copies
    them. What the converter writes is byte for byte what it writes cold; what it served ahead is said.
    A staged file whose bytes differ from the merged folder's is not served: it is read as usual."""
    from transformers import AutoTokenizer

    from finetune_trainer.data import chat_templates
    from finetune_trainer.export import convert
    from finetune_trainer.train.model_loading import BaseModel

    base = BaseModel(str(tiny_gemma()))
    tokenizer = AutoTokenizer.from_pretrained(str(trained.workdir / "merged"))
    template = chat_templates.resolve("auto", tokenizer)
    staged = tmp_path / "tokenizer-ahead"
    warm = convert.WarmConverter(base.source, staged)  # started before the files exist, as in a run
    convert.stage_tokenizer_files(base, tokenizer, template, staged)
    merged = convert.merge(base, trained.workdir / "adapter", tmp_path / "merged", tokenizer, template,
                           tokenizer_files=staged)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (merged / name).read_bytes() == (staged / name).read_bytes(), name
    with caplog.at_level("INFO", logger="finetune_trainer.export.convert"):
        ahead = convert.convert(merged, tmp_path / "ahead.gguf", "f16", "tiny", warm)
    assert "(started ahead)" in caplog.text and warm.take() is None  # used once, then gone
    served = json.loads(caplog.text.split("tokenizer files parsed ahead ", 1)[1].splitlines()[0])
    # tokenizer.json and tokenizer_config.json parsed; the SentencePiece vocabulary the converter
    # builds twice for Gemma 3 (vocabulary, then embedding rows) built once, ahead.
    assert served["state"] == "ready" and served["json"] == 2 and served["vocab"] == 2, served
    cold = convert.convert(merged, tmp_path / "cold.gguf", "f16", "tiny")
    assert hashlib.sha256(ahead.read_bytes()).digest() == hashlib.sha256(cold.read_bytes()).digest()

    config = json.loads((staged / "tokenizer_config.json").read_text())  # staged, then changed before merge
    config["model_max_length"] = 7
    (staged / "tokenizer_config.json").write_text(json.dumps(config))
    stale = convert.WarmConverter(base.source, staged)
    caplog.clear()
    with caplog.at_level("INFO", logger="finetune_trainer.export.convert"):
        other = convert.convert(merged, tmp_path / "stale.gguf", "f16", "tiny", stale)
    served = json.loads(caplog.text.split("tokenizer files parsed ahead ", 1)[1].splitlines()[0])
    # Only tokenizer.json matched; the vocabulary (it reads tokenizer_config.json) was built at conversion,
    # once: the embedding rows' second build found the first.
    assert served["json"] == 1 and served["vocab"] == 1 and served["misses"] >= 2, served
    assert hashlib.sha256(other.read_bytes()).digest() == hashlib.sha256(cold.read_bytes()).digest()

    unused = convert.WarmConverter(base.source)  # every type came from the export cache, say
    proc = unused.proc
    unused.close()
    assert proc.returncode == 0 and not list(tmp_path.glob("*.gguf"))[3:]


def test_the_dataset_is_prepared_in_a_child_while_the_training_libraries_load(trained, s3, tmp_path, monkeypatch,
                                                                               caplog):
    """On a GPU the run encodes the dataset in a child process while it imports Unsloth (forced on here):
    the same stage in the same workdir, so the same prepared files as the run that prepared in process."""
    monkeypatch.setenv("FINETUNE_PREPARE_AHEAD", "on")
    bucket = s3.make_bucket(f"ahead-{uuid.uuid4().hex[:10]}")  # its own dataset cache: a miss, encoded
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 5)
    job = job_manifest("tiny", bucket, s3.endpoint, data, tiny_gemma(), training={"maxSteps": 2},
                       export={"gguf": []})
    with caplog.at_level("WARNING"):
        rc, _, workdir = run_job(job, tmp_path)
    assert rc == 0
    child_log = (workdir / "prepare-ahead.log").read_text()
    assert "== stage Preparing" in child_log and "cache miss" in child_log
    # The child's work was used: it ended well, with the class this process's AutoTokenizer picks.
    assert "ahead failed" not in caplog.text and "the dataset child encoded with" not in caplog.text
    assert json.loads((workdir / "dataset" / "report.json").read_text())["tokenizerClass"] == "GemmaTokenizer"
    for split in ("train", "validation", "parity"):
        assert (workdir / "dataset" / f"{split}.parquet").read_bytes() == \
            (trained.workdir / "dataset" / f"{split}.parquet").read_bytes()


def test_a_failed_child_prepare_is_done_again_in_the_training_process(env, s3, tmp_path, caplog):
    import subprocess
    import sys

    from finetune_trainer.data.prepare_ahead import Ahead

    bucket = s3.make_bucket(f"ahead-{uuid.uuid4().hex[:10]}")
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 5)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_manifest("tiny", bucket, s3.endpoint, data, tiny_gemma(),
                                                  training={"maxSteps": 2}, export={"gguf": []})))
    with open(tmp_path / "child.log", "w") as out:
        failed = Ahead(subprocess.Popen([sys.executable, "-c", "print('out of memory, say'); raise SystemExit(3)"],
                                        stdout=out, stderr=subprocess.STDOUT), tmp_path / "child.log")
    with caplog.at_level("WARNING", logger="finetune_trainer.data.prepare_ahead"):
        out = pipeline.run(RunConfig.load(config), tmp_path / "work", ahead=failed)
    assert "preparing the dataset ahead failed (exit 3)" in caplog.text
    assert out["metrics"]["dataset"]["used"] == len(ALPACA_ROWS) * 5
    assert (tmp_path / "work" / "dataset" / "train.parquet").exists()


def test_a_child_that_encoded_with_another_tokenizer_class_is_not_trusted(env, s3, tmp_path, caplog):
    """The child loads the class tokenizer_config.json names (no AutoTokenizer import); where this process's
    AutoTokenizer picks another, what the child encoded is thrown away and encoded again here."""
    import subprocess
    import sys

    from finetune_trainer.data.prepare_ahead import Ahead

    bucket = s3.make_bucket(f"ahead-{uuid.uuid4().hex[:10]}")
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA_ROWS * 5)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_manifest("tiny", bucket, s3.endpoint, data, tiny_gemma(),
                                                  training={"maxSteps": 2}, export={"gguf": []})))
    dataset = tmp_path / "work" / "dataset"
    dataset.mkdir(parents=True)
    child = ("import json, sys; open(sys.argv[1], 'w').write(json.dumps("
             "{'tokenizerClass': 'OtherTokenizer', 'rows': {'used': 1}}))")
    with open(tmp_path / "child.log", "w") as out:
        other = Ahead(subprocess.Popen([sys.executable, "-c", child, str(dataset / "report.json")],
                                       stdout=out, stderr=subprocess.STDOUT), tmp_path / "child.log")
    with caplog.at_level("WARNING", logger="finetune_trainer.pipeline"):
        out = pipeline.run(RunConfig.load(config), tmp_path / "work", ahead=other)
    assert "the dataset child encoded with OtherTokenizer where this process loads GemmaTokenizer" in caplog.text
    assert out["metrics"]["dataset"]["used"] == len(ALPACA_ROWS) * 5
    assert json.loads((dataset / "report.json").read_text())["tokenizerClass"] == "GemmaTokenizer"
