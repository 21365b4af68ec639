"""The warm trainer (`finetune run --keep-warm`, warm.py): after its run the process takes the next one,
handed over through a folder here (the operator's channel, the status, is the cluster test's), and trains
it with the model it kept. On the tiny Gemma 3 against a real S3 (SeaweedFS), on CPU.

What must hold: the handed-over run trains exactly as a cold process would (the kept model's adapter is
reset to the values the load gave it), the model is loaded once for both runs, each run's artifacts land
under its own prefix, and a config that is not what it claims to be is refused with a reason."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from safetensors.torch import load_file

from finetune_api import RunConfig, contract
from finetune_api.egress import EgressPolicy
from finetune_api.runconfig import RunRef
from finetune_api.spec import FinetuneJobSpec
from finetune_trainer import warm
from finetune_trainer.cli import _fail, main
from finetune_trainer.errors import ConfigError
from tests.trainer_fixtures import ALPACA_ROWS, tiny_gemma, trainer_env, write_jsonl


def _config(bucket: str, endpoint: str, data, run: int, steps: int, lr: float) -> RunConfig:
    spec = FinetuneJobSpec.model_validate({
        "baseModel": {"uri": str(tiny_gemma())},
        "dataset": {"source": str(data)},
        "training": {"maxSteps": steps, "learningRate": lr, "maxSeqLength": 64},
        "export": {"gguf": ["f16"], "paritySamples": 2, "ollamaModelfile": False},
        "output": {"s3": {"bucket": bucket, "endpoint": endpoint, "forcePathStyle": True, "prefix": "warm"}},
        "resources": {"gpus": 0},
    })
    return RunConfig.build(spec, RunRef(namespace="team-w", name="warm", uid="u-1", run=run))


@pytest.fixture(scope="module")
def warm_runs(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    bucket = s3.make_bucket(f"warm-{uuid.uuid4().hex[:10]}")
    data = write_jsonl(root / "data.jsonl", ALPACA_ROWS * 5)
    first, second = _config(bucket, s3.endpoint, data, 1, 3, 5e-3), _config(bucket, s3.endpoint, data, 2, 4, 1e-3)
    (root / "run-1.yaml").write_text(first.to_yaml())
    handoff = root / "handoff"
    handoff.mkdir()
    (handoff / warm.DirHandoffs.NEXT).write_text(second.to_yaml())  # taken as soon as run 1 is done
    loads = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in trainer_env(s3, root / "termination-log").items():
            mp.setenv(k, v)
        from finetune_trainer.train import recipe

        real_load = recipe.load_for_training
        mp.setattr(recipe, "load_for_training", lambda *a, **kw: loads.append(1) or real_load(*a, **kw))
        rc = main(["run", "--config", str(root / "run-1.yaml"), "--workdir", str(root / "work"),
                   contract.ARG_KEEP_WARM, "2", "--handoff-dir", str(handoff)])
        # The same run 2, cold: a new process's load, another workdir and no caches from the warm runs.
        mp.setenv("FINETUNE_CACHE", "off")
        (root / "cold-2.yaml").write_text(second.to_yaml())
        cold_rc = main(["run", "--config", str(root / "cold-2.yaml"), "--workdir", str(root / "cold")])
    return {"rc": rc, "cold_rc": cold_rc, "root": root, "loads": loads, "bucket": bucket, "s3": s3,
            "configs": (first, second)}


def test_the_handed_over_run_trains_as_a_cold_one_on_the_model_kept(warm_runs):
    root = warm_runs["root"]
    assert (warm_runs["rc"], warm_runs["cold_rc"]) == (0, 0)
    # Loaded for run 1 and the cold run only: run 2 took the model run 1 left.
    assert len(warm_runs["loads"]) == 2
    first = json.loads((root / "work" / "metrics.json").read_text())
    second = json.loads((root / "work" / "warm" / "run-2" / "metrics.json").read_text())
    cold = json.loads((root / "cold" / "metrics.json").read_text())
    assert first["cache"]["model"] == "loaded" and second["cache"]["model"] == "kept (warm trainer)"
    assert (first["steps"], second["steps"]) == (3, 4)
    # Exactly the cold run's adapter: had the kept adapter not been reset to its loaded values, run 2
    # would have gone on from run 1's training.
    warm_adapter = load_file(root / "work" / "warm" / "run-2" / "adapter" / "adapter_model.safetensors")
    cold_adapter = load_file(root / "cold" / "adapter" / "adapter_model.safetensors")
    assert warm_adapter.keys() == cold_adapter.keys()
    for name, value in cold_adapter.items():
        assert (warm_adapter[name] == value).all(), name
    assert second["trainLoss"] == cold["trainLoss"]
    # The folder channel: taken, and no one advertised as waiting after it left.
    assert (root / "handoff" / "taken-after-run-1.yaml").is_file()
    assert not (root / "handoff" / warm.DirHandoffs.WARM).exists()


def test_each_handed_over_run_uploads_under_its_own_prefix(warm_runs):
    client, bucket = warm_runs["s3"].client(), warm_runs["bucket"]
    for cfg in warm_runs["configs"]:
        prefix = cfg.output_uri.removeprefix(f"s3://{bucket}/")
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}manifest.json")["Body"].read())
        assert manifest["job"]["run"] == cfg.job.run
        assert any(a["uri"].endswith(".gguf") for a in manifest["artifacts"])


def _handed(cfg: RunConfig) -> tuple[str, str]:
    text = cfg.to_yaml()
    return text, hashlib.sha256(text.encode()).hexdigest()


def test_a_handoff_is_refused_unless_it_is_this_jobs_next_run_as_sent():
    first = _config("bkt", "http://127.0.0.1:1", "/data/x.jsonl", 1, 3, 1e-3)
    good = _config("bkt", "http://127.0.0.1:1", "/data/x.jsonl", 2, 4, 1e-4)
    assert warm.accept(*_handed(good), first, first).job.run == 2
    text, digest = _handed(good)
    refusals = {
        "altered on the way": (text.replace("0.0001", "0.1"), digest),
        "another job": _handed(good.model_copy(update={"job": good.job.model_copy(update={"name": "other"})})),
        "another uid": _handed(good.model_copy(update={"job": good.job.model_copy(update={"uid": "u-2"})})),
        "not a later run": _handed(good.model_copy(update={"job": good.job.model_copy(update={"run": 1})})),
        "another egress rule": _handed(good.model_copy(update={"egress": EgressPolicy(allowed_hosts=["evil.example"])})),
        "no config": ("", hashlib.sha256(b"").hexdigest()),
    }
    for what, (t, d) in refusals.items():
        with pytest.raises(ConfigError) as exc:
            warm.accept(t, d, first, first)
        assert exc.value.reason == warm.REFUSED, what


def test_a_handed_over_runs_failure_is_never_retried(monkeypatch, tmp_path):
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(tmp_path / "termination-log"))
    assert _fail("S3Unavailable", "down", contract.EXIT_TRANSIENT) == contract.EXIT_TRANSIENT
    monkeypatch.setattr(warm.Serving, "handed_run", 2)
    # The Job's retry would run the pod template's run 1 again: the failure must fail the Job at once.
    assert _fail("S3Unavailable", "down", contract.EXIT_TRANSIENT) == contract.EXIT_CONFIG_ERROR
    assert json.loads((tmp_path / "termination-log").read_text().splitlines()[-1])["reason"] == "S3Unavailable"


def test_the_kept_model_is_let_go_when_the_load_would_read_something_else(tmp_path):
    from finetune_api.spec import TrainingSpec
    from finetune_trainer.train.model_loading import BaseModel
    from finetune_trainer.train.model_pool import load_key

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights one")
    base, training = BaseModel(str(folder)), TrainingSpec(max_steps=3)
    key = load_key(base, training, "unsloth")
    assert load_key(base, training.model_copy(update={"learning_rate": 1e-5, "max_steps": 9}), "unsloth") == key
    for other in (training.model_copy(update={"seed": 7}), training.model_copy(update={"max_seq_length": 512}),
                  training.model_copy(update={"lora": training.lora.model_copy(update={"r": 32})})):
        assert load_key(base, other, "unsloth") != key
    (folder / "model.safetensors").write_bytes(b"weights two, same path")  # a volume updated in place
    assert load_key(base, training, "unsloth") != key


def test_a_warm_pods_disk_keeps_only_the_small_files_of_earlier_runs(tmp_path):
    root = tmp_path / "work"
    for run in (root, root / warm.WARM_DIR / "run-2"):
        for folder in ("checkpoints", "merged", "gguf", "dataset"):
            (run / folder).mkdir(parents=True)
            (run / folder / "big").write_bytes(b"x" * 1000)
        (run / "metrics.json").write_text("{}")
    warm.clear_earlier_runs(root)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "metrics.json", "warm/run-2/metrics.json"]
