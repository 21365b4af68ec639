"""Data-parallel training on CPU (gloo): `finetune run` under torchrun with 2 processes in one "pod"
trains the same loss curve as 1 process with the same global batch and exports the same GGUF tensors.

Both runs are real subprocesses (torchrun through finetune_trainer.launch, as the operator's Job runs
it) on the tiny Gemma 3, against the real local S3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.trainer_fixtures import ALPACA_ROWS, offline_env, tiny_gemma, write_jsonl

STEPS = 6


def job(name: str, bucket: str, endpoint: str, data: Path) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {
                "baseModel": {"uri": str(tiny_gemma())},
                "dataset": {"source": str(data), "validationSplit": 0.2},
                # 2 micro-batches of 2 rows a step: one each for 2 processes, both for 1. Process 0
                # evaluates every 2 steps while the other waits: the curves must still match.
                "training": {"maxSteps": STEPS, "batchSize": 2, "gradientAccumulationSteps": 2,
                             "learningRate": 5e-3, "maxSeqLength": 64, "checkpointEverySteps": 3,
                             "evalEverySteps": 2},
                "export": {"gguf": ["f16"], "parityCheck": False},
                "output": {"s3": {"bucket": bucket, "endpoint": endpoint, "forcePathStyle": True}},
                "resources": {"gpus": 0}}}


def run(root: Path, manifest: dict, s3, processes: int) -> tuple[subprocess.CompletedProcess, Path]:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(manifest))
    trainer = ["-m", "finetune_trainer", "run", "--config", str(config), "--workdir", str(root / "work")]
    launch = ["-m", "finetune_trainer.launch", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else []
    env = offline_env(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key,
                      FINETUNE_TERMINATION_LOG=str(root / "termination-log"), OMP_NUM_THREADS="1")
    for var in ("FINETUNE_JOB_NAME", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # no status reports, no outer torchrun
        env.pop(var, None)
    proc = subprocess.run([sys.executable, *launch, *trainer], env=env, capture_output=True, text=True, timeout=600)
    return proc, root / "work"


def losses(workdir: Path) -> list[float]:
    from finetune_trainer.paths import Workdir

    return [json.loads(line)["loss"] for line in Workdir(workdir).train_log.read_text().splitlines()]


def eval_losses(workdir: Path) -> dict[int, float]:
    from finetune_trainer.paths import Workdir

    entries = [json.loads(line) for line in Workdir(workdir).train_log.read_text().splitlines()]
    return {e["step"]: e["evalLoss"] for e in entries if "evalLoss" in e}


def tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    return {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    bucket = s3.make_bucket("ddp-" + root.name.lower().replace("_", "-")[:40])
    data = write_jsonl(root / "data.jsonl", ALPACA_ROWS * 5)
    one = run(root / "one", job("one", bucket, s3.endpoint, data), s3, processes=1)
    two = run(root / "two", job("two", bucket, s3.endpoint, data), s3, processes=2)
    return one, two


def test_two_processes_train_the_loss_curve_of_one(runs):
    (one, one_dir), (two, two_dir) = runs
    assert one.returncode == 0, one.stderr[-4000:]
    assert two.returncode == 0, two.stderr[-4000:]
    assert "rank 1 of 2" in two.stderr  # it really ran two processes
    curve_one, curve_two = losses(one_dir), losses(two_dir)
    assert len(curve_one) == len(curve_two) == STEPS  # one training log, written by rank 0 alone
    assert curve_one[-1] < curve_one[0]  # it trained
    np.testing.assert_allclose(curve_two, curve_one, rtol=1e-4)
    evals_one, evals_two = eval_losses(one_dir), eval_losses(two_dir)  # evalEverySteps: rank 0, between barriers
    assert list(evals_two) == list(evals_one) == [2, 4]
    np.testing.assert_allclose(list(evals_two.values()), list(evals_one.values()), rtol=1e-4)
    result_one = json.loads((one_dir / "adapter" / "train_result.json").read_text())
    result_two = json.loads((two_dir / "adapter" / "train_result.json").read_text())
    assert result_two["tokens"] == result_one["tokens"]  # the global figure, summed over the ranks
    assert result_two["eval_loss"] == pytest.approx(result_one["eval_loss"], rel=1e-4)


def test_two_processes_export_the_same_gguf_tensors(runs):
    (one, one_dir), (two, two_dir) = runs
    assert one.returncode == 0 and two.returncode == 0
    a, b = tensors(one_dir / "gguf" / "one-f16.gguf"), tensors(two_dir / "gguf" / "two-f16.gguf")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        # f16 of weights equal to fp32 rounding: at most one f16 step apart.
        np.testing.assert_allclose(b[name], a[name], rtol=2e-3, atol=1e-4, err_msg=name)
