"""Re-runs reuse what they can: `finetune run` three times on the tiny Gemma 3 (real tokenizer) against a
real S3 (SeaweedFS), as three pods of one FinetuneJob would (each in a fresh workdir), status reported to
an HTTPS fake apiserver. Run 2 edits steps and learning rate: it reuses the prepared dataset and trains.
Run 3 only asks for another GGUF type: it reuses run 2's adapter and never trains. Run 4 adds an
evaluation: it reuses the adapter and run 3's GGUF, and neither trains nor converts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from finetune_api import RunConfig
from finetune_api.runconfig import RunRef
from finetune_api.spec import FinetuneJobSpec
from finetune_trainer.cli import main
from tests.trainer_fixtures import ALPACA_ROWS, FakeApiServer, tiny_gemma, trainer_env, write_jsonl

TASKS_DIR = Path(__file__).parent / "data" / "eval"


def _spec(bucket: str, endpoint: str, data, steps: int, lr: float, gguf: str, evaluate: bool) -> FinetuneJobSpec:
    evaluation = {"evaluation": {"tasks": ["tiny_antonyms"], "limit": 4, "dataUri": str(TASKS_DIR)}} if evaluate else {}
    return FinetuneJobSpec.model_validate({**evaluation,
        "baseModel": {"uri": str(tiny_gemma())},
        "dataset": {"source": str(data), "validationSplit": 0.2},
        "training": {"maxSteps": steps, "learningRate": lr, "maxSeqLength": 64},
        "export": {"gguf": [gguf], "paritySamples": 2, "ollamaModelfile": False},
        "output": {"s3": {"bucket": bucket, "endpoint": endpoint, "forcePathStyle": True, "prefix": "runs"}},
        "resources": {"gpus": 0},
    })


def _must_not(run: int, what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"run {run} called {what} although an earlier run made the same output")
    return fail


@pytest.fixture(scope="module")
def reruns(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("rerun")
    bucket = s3.make_bucket(f"rerun-{uuid.uuid4().hex[:10]}")
    data = write_jsonl(root / "data.jsonl", ALPACA_ROWS * 5)
    apiserver = FakeApiServer(root / "apiserver").start()
    runs = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {**trainer_env(s3, root / "termination-log"), "FINETUNE_PROGRESS_INTERVAL": "1000"}.items():
                mp.setenv(k, v)
            edits = [(3, 5e-3, "f16", False), (5, 1e-5, "f16", False), (5, 1e-5, "q8_0", False), (5, 1e-5, "q8_0", True)]
            for run, (steps, lr, gguf, evaluate) in enumerate(edits, 1):
                if run == 3:  # an export-only change: training must come from the cache
                    mp.setattr("finetune_trainer.train.recipe.train", _must_not(run, "train"))
                if run == 4:  # an evaluate-only change: the GGUF too
                    mp.setattr("finetune_trainer.export.convert.merge", _must_not(run, "merge"))
                for k, v in apiserver.env("cached", namespace="team-c", run=run).items():
                    mp.setenv(k, v)
                cfg = RunConfig.build(_spec(bucket, s3.endpoint, data, steps, lr, gguf, evaluate),
                                      RunRef(namespace="team-c", name="cached", run=run))
                config = root / f"run-{run}.yaml"
                config.write_text(cfg.to_yaml())
                workdir = root / f"work-{run}"  # a new pod: nothing on disk from run 1
                before = len(apiserver.requests)
                rc = main(["run", "--config", str(config), "--workdir", str(workdir)])
                runs.append({"rc": rc, "workdir": workdir, "cfg": cfg, "patches": apiserver.requests[before:],
                             "metrics": json.loads((workdir / "metrics.json").read_text()) if rc == 0 else None})
    finally:
        apiserver.stop()
    return runs, bucket, s3


def test_run_two_hits_the_dataset_cache_and_says_so_in_the_status(reruns):
    runs, bucket, s3 = reruns
    assert [r["rc"] for r in runs] == [0, 0, 0, 0]
    first, second = (r["metrics"]["cache"] for r in runs[:2])
    assert first["dataset"] == "miss" and first["reason"] == "absent" and first["stored"] is True
    assert second["dataset"] == "hit" and second["key"] == first["key"]
    patches = [r["body"] for r in runs[1]["patches"]]
    final = {op["path"]: op["value"] for op in patches[-1][1:]}
    assert final["/status/metrics"]["cache"]["dataset"] == "hit"
    # The re-run trained on exactly the rows run 1 prepared, and with its own hyperparameters.
    for split in ("train", "validation", "parity"):
        assert (runs[0]["workdir"] / "dataset" / f"{split}.parquet").read_bytes() == \
            (runs[1]["workdir"] / "dataset" / f"{split}.parquet").read_bytes()
    assert [r["metrics"]["steps"] for r in runs] == [3, 5, 5, 5]
    # The entry lives under the namespace's cache prefix, with its manifest.
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="runs/team-c/.cache/datasets/")["Contents"]]
    assert any(k.endswith("/manifest.json") for k in keys) and any(k.endswith("/train.parquet") for k in keys)


def test_cpu_runs_keep_the_small_auto_defaults(reruns):
    runs, _, _ = reruns
    metrics = runs[0]["metrics"]
    assert (metrics["batchSize"], metrics["gradientCheckpointing"]) == (8, True)
    assert metrics["auto"].startswith("CPU")


def test_an_export_only_change_reuses_the_adapter_and_says_whose(reruns):
    runs, bucket, s3 = reruns
    first, second, third = (r["metrics"]["cache"] for r in runs[:3])
    # Runs 1 and 2 trained different inputs: both missed and stored their adapters.
    assert (first["training"], second["training"]) == ("miss", "miss")
    assert first["trainingKey"] != second["trainingKey"] and first["trainingStored"] and second["trainingStored"]
    # Run 3 changed only the export: run 2's adapter, byte for byte, and the status names run 2.
    assert third["training"] == "hit" and third["trainingKey"] == second["trainingKey"]
    assert third["trainedBy"] == {"namespace": "team-c", "name": "cached", "uid": None, "run": 2,
                                  "outputUri": runs[1]["cfg"].output_uri}
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (runs[2]["workdir"] / "adapter" / name).read_bytes() == (runs[1]["workdir"] / "adapter" / name).read_bytes()
    assert runs[2]["metrics"]["trainLoss"] == runs[1]["metrics"]["trainLoss"]
    assert "restarts" not in runs[2]["metrics"] or runs[2]["metrics"]["restarts"] == 0
    # Its own export: the new type, converted from the reused adapter, in its own run folder.
    assert set(runs[2]["metrics"]["parity"]) == {"q8_0"}
    progress = [op["value"] for r in runs[2]["patches"] for op in r["body"][1:] if op["path"] == "/status/progress"]
    assert any("training cache hit" in (p.get("message") or "") for p in progress)
    assert progress[-1]["step"] == progress[-1]["totalSteps"] == 5
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="runs/team-c/.cache/trained/")["Contents"]]
    assert sum(k.endswith("/manifest.json") for k in keys) == 2


def test_an_evaluate_only_change_reuses_the_gguf_too(reruns):
    runs, bucket, s3 = reruns
    third, fourth = (r["metrics"]["cache"] for r in runs[2:])
    assert third["exports"] == {"q8_0": "miss: absent"}  # run 2 made f16 only
    assert fourth["training"] == "hit" and fourth["exports"] == {"q8_0": "hit"}
    # Run 3's file, byte for byte, and its parity result; uploaded again under run 4's own prefix.
    name = "cached-q8_0.gguf"
    assert (runs[3]["workdir"] / "gguf" / name).read_bytes() == (runs[2]["workdir"] / "gguf" / name).read_bytes()
    assert runs[3]["metrics"]["parity"] == runs[2]["metrics"]["parity"]
    assert "tiny_antonyms" in runs[3]["metrics"]["eval"]["q8_0"]
    assert not (runs[3]["workdir"] / "gguf" / "cached-q8_0.Modelfile").exists()  # the spec turned them off
    prefix = runs[3]["cfg"].output_uri.removeprefix(f"s3://{bucket}/")
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert f"{prefix}gguf/{name}" in keys
    assert "merge" not in runs[3]["metrics"]["timings"]["exportSteps"]
