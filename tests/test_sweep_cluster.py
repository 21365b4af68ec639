"""FinetuneSweep on the real local stack: admission of search spaces by the apiserver, a random
sweep of tiny-model trials through the whole pipeline (with the operator SIGKILLed mid-sweep), and
suspension handed down to the trials."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import trainer_fixtures as fx
import yaml
from operator_fixtures import kubectl, wait_for

from finetune_api.sweep import FinetuneSweepSpec
from finetune_operator import sweep_study as st

pytest_plugins = ["operator_fixtures"]
pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
SWEEP_CRD = ROOT / "crds" / "finetune.dev_finetunesweeps.yaml"
RUNNER = {"finetune.dev/local-runner": "true"}
ROWS = [{"instruction": f"Say the word number {i}.", "output": f"Word {i}: kestrel."} for i in range(24)]


@pytest.fixture(scope="session")
def sweep_crd(crd, kubeconfig) -> Path:
    kubectl(kubeconfig, "apply", "--server-side", "-f", str(SWEEP_CRD))
    wait_for(lambda: kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=10s",
                             "crd/finetunesweeps.finetune.dev", check=False).returncode == 0, 60, "CRD Established")
    wait_for(lambda: kubectl(kubeconfig, "get", "fts", "-A", check=False).returncode == 0, 30, "fts served")
    return SWEEP_CRD


def sweep(name, template, **spec):
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneSweep", "metadata": {"name": name},
            "spec": {"template": template,
                     "parameters": [{"path": "training.learningRate", "logUniform": {"min": 1e-4, "max": 3e-2}}],
                     "objective": {"metric": "metrics.trainLoss"}, "maxTrials": 4, "parallelism": 2, **spec}}


def tiny_template(base, s3, bucket, node_selector=RUNNER, max_steps=3):
    return {
        "baseModel": {"uri": str(base)},
        "dataset": {"configMapRef": {"name": "rows", "key": "train.jsonl"}, "format": "alpaca"},
        "training": {"maxSteps": max_steps, "batchSize": 2, "maxSeqLength": 64},
        "export": {"gguf": ["f16"], "parityCheck": False, "ollamaModelfile": False},
        "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True,
                          "credentialsSecretRef": {"name": "s3"}}},
        "resources": {"gpus": 0, "nodeSelector": node_selector},
    }


@pytest.fixture
def inputs(k8s, s3):
    k8s.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
               "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
    k8s.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"},
               "data": {"train.jsonl": "\n".join(json.dumps(r) for r in ROWS)}})
    return fx.tiny_gemma()


def trials(k8s, name):
    return sorted((k8s.get("ftj", selector=f"{st.SWEEP_LABEL}={name}") or {}).get("items", []),
                  key=lambda t: int(t["metadata"]["labels"][st.TRIAL_LABEL]))


def sweep_status(k8s, name):
    return (k8s.get("fts", name) or {}).get("status") or {}


# ----------------------------------------------------------------------------- admission

VALID_TEMPLATE = {"dataset": {"source": "yahma/alpaca-cleaned"}, "training": {"maxSteps": 10}}


def dry_run(kubeconfig, doc):
    return kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                   input=yaml.safe_dump(doc), check=False)


def test_valid_sweep_and_the_example_are_admitted(kubeconfig, sweep_crd):
    proc = dry_run(kubeconfig, sweep("ok", VALID_TEMPLATE, algorithm="grid", parameters=[
        {"path": "training.lora.r", "choice": {"values": [8, 16]}},
        {"path": "training.batchSize", "int": {"min": 2, "max": 8, "step": 2}}]))
    assert proc.returncode == 0, proc.stderr
    example = yaml.safe_load((ROOT / "examples" / "sweep.yaml").read_text())
    FinetuneSweepSpec.model_validate(example["spec"])
    proc = dry_run(kubeconfig, example)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("params", "extra", "expected"), [
    ([{"path": "training.learningRate", "uniform": {"min": 1e-3, "max": 1e-4}}], {},
     ["spec.parameters[0].uniform", "uniform: min must be less than max"]),
    ([{"path": "training.learningRate", "logUniform": {"min": 0, "max": 1e-4}}], {},
     ["spec.parameters[0].logUniform.min", "should be greater than 0"]),
    ([{"path": "training.learningRate", "uniform": {"min": 0.5, "max": 2.0}}], {},
     ["spec.parameters[0]", "training.learningRate must be > 0 and <= 1"]),
    ([{"path": "training.noSuchField", "choice": {"values": [1]}}], {},
     ["spec.parameters[0].path", "Unsupported value"]),
    ([{"path": "output.s3.bucket", "choice": {"values": ["x"]}}], {},
     ["spec.parameters[0].path", "Unsupported value"]),
    ([{"path": "training.lora.r", "uniform": {"min": 4, "max": 8}}], {},
     ["spec.parameters[0]", "an integer field takes an int or choice space"]),
    ([{"path": "training.lora.r", "choice": {"values": [8]}, "int": {"min": 1, "max": 4}}], {},
     ["spec.parameters[0]", "set exactly one of choice, uniform, logUniform and int"]),
    ([{"path": "training.lora.r", "choice": {"values": [8]}}, {"path": "training.lora.r", "int": {"min": 1, "max": 4}}],
     {}, ["spec.parameters[1]", "Duplicate value"]),
    ([{"path": "training.learningRate", "logUniform": {"min": 1e-5, "max": 1e-4}}], {"algorithm": "grid"},
     ["spec", "algorithm grid needs every parameter to be a choice or int space"]),
    ([{"path": "training.lora.r", "choice": {"values": [8]}}], {"maxTrials": 0}, ["spec.maxTrials"]),
    ([{"path": "training.lora.r", "choice": {"values": [8]}}], {"earlyStopping": {"minTrials": 2}},
     ["spec.earlyStopping", "earlyStopping.metric evalLoss (the default) needs template.training.evalEverySteps"]),
    ([{"path": "training.lora.r", "choice": {"values": [8]}}], {"earlyStopping": {"metric": "testLoss"}},
     ["spec.earlyStopping.metric", "Unsupported value"]),
], ids=["min-ge-max", "loguniform-zero", "out-of-field-bounds", "unknown-path", "untunable-path",
        "uniform-on-int", "two-spaces", "duplicate-path", "grid-continuous", "max-trials",
        "eval-loss-stopping-without-eval-steps", "unknown-stopping-metric"])
def test_invalid_search_space_is_rejected_naming_the_field(kubeconfig, sweep_crd, params, extra, expected):
    proc = dry_run(kubeconfig, sweep("bad", VALID_TEMPLATE, parameters=params, **extra))
    assert proc.returncode != 0
    for needle in expected:
        assert needle in proc.stderr, proc.stderr


def test_template_rules_apply_at_admission(kubeconfig, sweep_crd):
    """The template is a FinetuneJob spec with its own CEL rules (here: only one of epochs and maxSteps)."""
    template = copy.deepcopy(VALID_TEMPLATE)
    template["training"]["epochs"] = 2
    proc = dry_run(kubeconfig, sweep("bad", template))
    assert proc.returncode != 0 and "training: set only one of epochs and maxSteps" in proc.stderr, proc.stderr


def test_values_invalid_for_the_template_fail_the_sweep_naming_the_parameter(sweep_crd, operator, k8s):
    """What the apiserver cannot know (a choice value the field rejects, a value clashing with the
    template) the operator reports: phase Failed, reason InvalidSpec, the parameter named; no trials."""
    k8s.apply(sweep("clash", VALID_TEMPLATE, parameters=[
        {"path": "training.learningRate", "logUniform": {"min": 1e-5, "max": 1e-4}},
        {"path": "training.epochs", "int": {"min": 1, "max": 3}}]))
    status = wait_for(lambda: sweep_status(k8s, "clash").get("phase") == "Failed" and sweep_status(k8s, "clash"),
                      60, "sweep Failed")
    assert status["reason"] == "InvalidSpec"
    assert "spec.parameters[1] (training.epochs=1)" in status["message"]
    assert "set only one of epochs and maxSteps" in status["message"]
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["status"] == "True"
    assert trials(k8s, "clash") == []


# ----------------------------------------------------------------------------- sweeps that run


def test_random_sweep_picks_the_best_trial_and_survives_an_operator_kill(
        sweep_crd, operator, k8s, kubeconfig, namespace, s3, bucket, inputs, pod_runner):
    """Four trials, two at a time, of the tiny model through the whole pipeline. The operator is
    SIGKILLed once the first two trials exist and restarted: the study is rebuilt from the trials, no
    trial is created twice, trials 2 and 3 get exactly the parameters an undisturbed sweep draws, and
    the best trial is the one with the lowest trainLoss, its artifacts in S3. The trials evaluate every
    step (training.evalEverySteps) and the sweep records those eval losses for early stopping, whose
    minTrials (4) no running trial of 4 can meet, so none is pruned."""
    template = tiny_template(inputs, s3, bucket)
    template["dataset"]["validationSplit"] = 0.25
    template["training"]["evalEverySteps"] = 1
    doc = sweep("lr", template, seed=7, earlyStopping={"minTrials": 4})
    assert k8s.apply(doc).returncode == 0
    wait_for(lambda: len(sweep_status(k8s, "lr").get("trials") or []) == 2, 120, "two trials recorded")
    operator.stop(signal.SIGKILL)
    assert [t["metadata"]["name"] for t in trials(k8s, "lr")] == ["lr-t0", "lr-t1"]  # parallelism 2
    operator.start()

    status = wait_for(lambda: sweep_status(k8s, "lr").get("phase") in ("Succeeded", "Failed") and
                      sweep_status(k8s, "lr"), 900, "sweep finished", interval=1)
    children = trials(k8s, "lr")
    assert status["phase"] == "Succeeded", (status, [c.get("status", {}).get("message") for c in children],
                                            pod_runner.log_tails())
    assert [c["metadata"]["name"] for c in children] == ["lr-t0", "lr-t1", "lr-t2", "lr-t3"]
    assert status["trialProgress"] == "4/4"
    spec = FinetuneSweepSpec.model_validate(doc["spec"])
    losses = {}
    for k, child in enumerate(children):
        params = json.loads(child["metadata"]["annotations"][st.PARAMS_ANNOTATION])
        assert params == st.sample(spec, k, [])  # random draws are fixed by (seed, k), restart or not
        assert child["spec"]["training"]["learningRate"] == params["training.learningRate"]
        assert child["metadata"]["ownerReferences"][0]["kind"] == "FinetuneSweep"
        assert child["status"]["phase"] == "Succeeded"
        assert len(k8s.get("jobs", selector=f"finetune.dev/job={child['metadata']['name']}")["items"]) == 1
        losses[child["metadata"]["name"]] = child["status"]["metrics"]["trainLoss"]
        row = status["trials"][k]
        assert (row["name"], row["state"], row["parameters"]) == (child["metadata"]["name"], "Complete", params)
        assert row["objective"] == pytest.approx(losses[row["name"]])
        # The trainer's last eval report passed the CRD's schema and reached the sweep's loss points.
        progress = child["status"]["progress"]
        assert progress["evalStep"] == 3
        assert progress["evalLoss"] == pytest.approx(child["status"]["metrics"]["evalLoss"], abs=1e-4)
        assert row["lossMetric"] == "evalLoss" and set(row["losses"]) <= {"1", "2", "3"}
        assert row["losses"]["3"] == progress["evalLoss"]

    assert len(set(losses.values())) > 1  # the learning rates made a difference, so choosing means something
    best = status["bestTrial"]
    assert best["name"] == min(losses, key=losses.get)
    assert best["value"] == pytest.approx(min(losses.values()))
    best_child = next(c for c in children if c["metadata"]["name"] == best["name"])
    assert best["outputUri"] == best_child["status"]["outputUri"]
    assert best["outputUri"].startswith(f"s3://{bucket}/finetune/{namespace}/{best['name']}/")
    gguf = [u for u in best["artifacts"] if u.endswith(".gguf")]
    assert gguf and all(u.startswith(best["outputUri"]) for u in best["artifacts"])
    head = s3.client().head_object(Bucket=bucket, Key=gguf[0].split(f"s3://{bucket}/", 1)[1])
    assert head["ContentLength"] > 0
    assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["status"] == "True"
    table = kubectl(kubeconfig, "get", "fts", "lr", "-n", namespace).stdout
    assert "TRIALS" in table and "BEST" in table and "OBJECTIVE" in table and best["name"] in table


def test_suspended_sweep_suspends_its_unfinished_trials(sweep_crd, operator, k8s, kubeconfig, namespace, s3,
                                                        bucket, inputs):
    """No node matches the trials' selector, so they stay unfinished. Suspending the sweep sets
    runPolicy.suspend on them (their Jobs are suspended) and creates no more; resuming undoes it."""
    doc = sweep("hold", tiny_template(inputs, s3, bucket, node_selector={"finetune.dev/nowhere": "true"}))
    k8s.apply(doc)
    wait_for(lambda: len(trials(k8s, "hold")) == 2, 60, "two trials")
    kubectl(kubeconfig, "patch", "fts", "hold", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')

    def all_suspended():
        children = trials(k8s, "hold")
        return all(c["spec"].get("runPolicy", {}).get("suspend") is True
                   and (c.get("status") or {}).get("phase") == "Suspended" for c in children) and children

    wait_for(all_suspended, 60, "trials suspended")
    for child in trials(k8s, "hold"):
        assert k8s.get("job", f"{child['metadata']['name']}-r1")["spec"]["suspend"] is True
    status = wait_for(lambda: sweep_status(k8s, "hold").get("phase") == "Suspended" and sweep_status(k8s, "hold"),
                      30, "sweep Suspended")
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["status"] == "True"
    assert len(trials(k8s, "hold")) == 2

    kubectl(kubeconfig, "patch", "fts", "hold", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: all(c["spec"]["runPolicy"]["suspend"] is False for c in trials(k8s, "hold")), 60, "resumed")
    wait_for(lambda: sweep_status(k8s, "hold").get("phase") == "Running", 30, "sweep Running")
    assert len(trials(k8s, "hold")) == 2  # still two unfinished trials: parallelism 2


def test_a_finetunejob_with_a_trials_name_is_never_taken_over(sweep_crd, operator, k8s, s3, bucket, inputs):
    """Someone else's FinetuneJob already has trial 0's name: the sweep neither reads its status as the
    trial's nor suspends it; trial 0 is recorded as failed (its number is not reused) and trial 1 runs."""
    template = tiny_template(inputs, s3, bucket, node_selector={"finetune.dev/nowhere": "true"})
    squatter = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "squat-t0"},
                "spec": template}
    assert k8s.apply(squatter).returncode == 0
    k8s.apply(sweep("squat", template, maxTrials=2, parallelism=2))

    def recorded():
        rows = {t["number"]: t for t in sweep_status(k8s, "squat").get("trials") or []}
        return len(rows) == 2 and rows
    rows = wait_for(recorded, 60, "two trials in the sweep's status")
    assert rows[0]["state"] == "Failed" and "does not own it" in rows[0]["message"], rows[0]
    assert rows[1]["name"] == "squat-t1" and rows[1]["state"] == "Running"
    assert [t["metadata"]["name"] for t in trials(k8s, "squat")] == ["squat-t1"]
    foreign = k8s.get("ftj", "squat-t0")
    assert "ownerReferences" not in foreign["metadata"] and st.SWEEP_LABEL not in (foreign["metadata"].get("labels") or {})
    assert "suspend" not in foreign["spec"].get("runPolicy", {})
