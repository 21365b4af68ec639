"""FinetuneSweep without a cluster: the search-space model, sampling, the study rebuilt from trial
objects (as after an operator restart), early stopping and the derived status."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from pydantic import ValidationError

from finetune_api import FinetuneJobSpec
from finetune_api.sweep import TUNABLE, FinetuneSweepSpec, SweepPhase, TrialState
from finetune_operator import sweep_study as st

TEMPLATE = {"dataset": {"source": "yahma/alpaca-cleaned"}, "training": {"maxSteps": 4},
            "runPolicy": {"queueName": "gpu-queue"}}


def sweep_spec(**kw):
    doc = {"template": TEMPLATE,
           "parameters": [{"path": "training.learningRate", "logUniform": {"min": 1e-5, "max": 5e-4}},
                          {"path": "training.lora.r", "choice": {"values": [8, 16, 32]}},
                          {"path": "training.warmupRatio", "uniform": {"min": 0.0, "max": 0.2}},
                          {"path": "training.batchSize", "int": {"min": 2, "max": 8, "step": 2}}],
           "objective": {"metric": "metrics.trainLoss"}, "maxTrials": 6, "parallelism": 2, **kw}
    return FinetuneSweepSpec.model_validate(doc)


def sweep_object(spec: FinetuneSweepSpec, name="s"):
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneSweep",
            "metadata": {"name": name, "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": spec.model_dump(by_alias=True, exclude_unset=True, mode="json")}


def succeeded(child, loss, **extra):
    child = json.loads(json.dumps(child))
    child["status"] = {"phase": "Succeeded", "run": 1, "metrics": {"trainLoss": loss},
                       "outputUri": f"s3://b/finetune/ml/{child['metadata']['name']}/run-1/",
                       "artifacts": [{"name": "gguf/x.gguf", "kind": "gguf", "uri": "s3://b/x.gguf",
                                      "sizeBytes": 1, "sha256": "0" * 64}], **extra}
    return child


# ----------------------------------------------------------------------------- the model


def test_tunable_paths_come_from_the_finetunejob_model():
    assert {"training.learningRate", "training.lora.r", "training.epochs", "dataset.maxSamples"} <= set(TUNABLE)
    assert TUNABLE["training.lora.r"].kind == "int" and TUNABLE["training.learningRate"].lower_open
    # Where and how a trial runs, and references to Secrets, are not hyperparameters.
    assert not [p for p in TUNABLE if p.split(".")[0] in ("output", "resources", "runPolicy") or "Ref." in p]


@pytest.mark.parametrize(("param", "needle"), [
    ({"path": "training.learningRate", "uniform": {"min": 1e-3, "max": 1e-4}}, "min must be less than max"),
    ({"path": "training.learningRate", "logUniform": {"min": 0, "max": 1e-4}}, "greater than 0"),
    ({"path": "training.learningRate", "uniform": {"min": 0.1, "max": 2.0}}, "training.learningRate must be > 0 and <= 1"),
    ({"path": "training.lora.r", "uniform": {"min": 4, "max": 8}}, "integer field takes an int or choice"),
    ({"path": "training.method", "int": {"min": 1, "max": 2}}, "need a numeric field"),
    ({"path": "training.noSuchField", "choice": {"values": [1]}}, "parameters.0.path"),
    ({"path": "output.s3.bucket", "choice": {"values": ["a"]}}, "parameters.0.path"),
    ({"path": "training.lora.r", "choice": {"values": [8, 0]}},
     "parameters[0] (training.lora.r=0): template.training.lora.r: Input should be greater than or equal to 1"),
    ({"path": "training.method", "choice": {"values": ["lora", "dora"]}}, "(training.method='dora')"),
    # The template sets maxSteps: a trial setting epochs breaks "only one of epochs and maxSteps".
    ({"path": "training.epochs", "int": {"min": 1, "max": 3}}, "set only one of epochs and maxSteps"),
    ({"path": "training.lora.r", "choice": {"values": [8]}, "int": {"min": 1, "max": 2}}, "exactly one of"),
])
def test_invalid_search_spaces_are_rejected_naming_the_parameter(param, needle):
    with pytest.raises(ValidationError) as exc:
        sweep_spec(parameters=[param])
    assert needle in str(exc.value)


def test_grid_needs_discrete_spaces_and_paths_are_unique():
    with pytest.raises(ValidationError, match="algorithm grid needs"):
        sweep_spec(algorithm="grid")
    with pytest.raises(ValidationError, match="tuned twice"):
        sweep_spec(parameters=[{"path": "training.lora.r", "choice": {"values": [8]}},
                               {"path": "training.lora.r", "int": {"min": 1, "max": 4}}])


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_samples_stay_in_their_spaces_and_make_valid_trials(algorithm):
    spec = sweep_spec(algorithm=algorithm, maxTrials=12)
    history = []
    for k in range(12):
        params = st.sample(spec, k, history)
        assert 1e-5 <= params["training.learningRate"] <= 5e-4
        assert params["training.lora.r"] in (8, 16, 32)
        assert 0.0 <= params["training.warmupRatio"] <= 0.2
        assert params["training.batchSize"] in (2, 4, 6, 8)
        assert st.check_trial(spec, params) is None
        FinetuneJobSpec.model_validate(st.build_trial(sweep_object(spec), k, params, False)["spec"])
        history.append(st.TrialRecord(k, f"s-t{k}", params, state=TrialState.COMPLETE, value=float(k % 5)))
    assert len({json.dumps(r.params, sort_keys=True) for r in history}) == 12  # continuous spaces: all distinct


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_the_same_history_gives_the_same_draw_and_seeds_differ(algorithm):
    spec = sweep_spec(algorithm=algorithm)
    history = [st.TrialRecord(k, f"s-t{k}", st.sample(spec, k, []), state=TrialState.COMPLETE, value=k * 0.1)
               for k in range(4)]
    assert st.sample(spec, 4, history) == st.sample(spec, 4, list(reversed(history)))
    assert st.sample(spec, 4, history) != st.sample(sweep_spec(algorithm=algorithm, seed=1), 4, history)


def test_grid_walks_every_combination_once_in_order():
    spec = sweep_spec(algorithm="grid", maxTrials=100, parameters=[
        {"path": "training.lora.r", "choice": {"values": [8, 16]}},
        {"path": "training.batchSize", "int": {"min": 2, "max": 7, "step": 2}}])
    assert spec.grid_size() == 6 and st.max_trials(spec) == 6
    draws = [st.sample(spec, k, []) for k in range(6)]
    assert [(d["training.lora.r"], d["training.batchSize"]) for d in draws] == list(
        itertools.product([8, 16], [2, 4, 6]))


def test_int_space_whose_max_is_off_step_samples_reachable_values():
    spec = sweep_spec(parameters=[{"path": "training.batchSize", "int": {"min": 2, "max": 7, "step": 2}}])
    assert {st.sample(spec, k, [])["training.batchSize"] for k in range(40)} == {2, 4, 6}


# ----------------------------------------------------------------------------- rebuilt after a restart


def test_study_rebuilt_from_trial_objects_continues_without_duplicates():
    """Trials 0-3 exist as FinetuneJobs (two finished, one failed, one running); a fresh operator
    reads them back, samples trial 4 exactly as the undisturbed one would, and never reuses 0-3."""
    spec = sweep_spec(algorithm="tpe", parallelism=3)
    sweep = sweep_object(spec)
    live, children = [], []
    for k in range(4):
        params = st.sample(spec, k, live)
        child = st.build_trial(sweep, k, params, suspend=False)
        if k < 2:
            child = succeeded(child, 1.0 - 0.1 * k)
            live.append(st.TrialRecord(k, child["metadata"]["name"], params, state=TrialState.COMPLETE,
                                       value=1.0 - 0.1 * k))
        elif k == 2:
            child["status"] = {"phase": "Failed", "reason": "InvalidDataset", "message": "row 2"}
            live.append(st.TrialRecord(k, child["metadata"]["name"], params, state=TrialState.FAILED))
        else:
            child["status"] = {"phase": "Training", "run": 1, "progress": {"run": 1, "step": 2, "loss": 3.0}}
            live.append(st.TrialRecord(k, child["metadata"]["name"], params))
        children.append(json.loads(json.dumps(child)))  # as read back from the apiserver

    rebuilt = [st.record_from_child(c, spec) for c in children]
    assert [(r.number, r.params, r.state, r.value) for r in rebuilt] == [
        (r.number, r.params, r.state, r.value) for r in live]
    assert rebuilt[2].message == "InvalidDataset: row 2" and rebuilt[3].losses == {2: 3.0}
    assert st.next_numbers(spec, rebuilt, suspended=False) == [4, 5]  # one running, parallelism 3
    assert st.sample(spec, 4, rebuilt) == st.sample(spec, 4, live)
    study = st.build_study(spec, rebuilt)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "RUNNING"]
    assert study.best_trial.number == 1


def test_next_numbers_respect_parallelism_budget_and_suspension():
    spec = sweep_spec(maxTrials=4, parallelism=2)
    running = st.TrialRecord(0, "s-t0", {})
    done = st.TrialRecord(1, "s-t1", {}, state=TrialState.COMPLETE, value=1.0)
    assert st.next_numbers(spec, [], False) == [0, 1]
    assert st.next_numbers(spec, [running, done], False) == [2]
    assert st.next_numbers(spec, [running, done], True) == []
    finished = [st.TrialRecord(k, f"s-t{k}", {}, state=TrialState.FAILED) for k in range(4)]
    assert st.next_numbers(spec, finished, False) == []  # failed trials count; none is retried


# ----------------------------------------------------------------------------- objective and status


def test_objective_read_from_the_trial_status():
    spec = sweep_spec(objective={"metric": "metrics.eval.piqa.acc", "goal": "maximize"})
    child = st.build_trial(sweep_object(spec), 0, {}, False)
    ok = st.record_from_child(succeeded(child, 1.0, **{}) | {"status": {
        "phase": "Succeeded", "metrics": {"eval": {"piqa": {"acc": 0.61}}}}}, spec)
    assert (ok.state, ok.value) == (TrialState.COMPLETE, 0.61)
    missing = st.record_from_child(succeeded(child, 1.0), spec)
    assert missing.state == TrialState.FAILED and "metrics.eval.piqa.acc" in missing.message
    assert st.metric_value({"metrics": {"x": True}}, "metrics.x") is None
    assert st.metric_value({"metrics": {"x": math.nan}}, "metrics.x") is None


@pytest.mark.parametrize(("goal", "best"), [("minimize", 1), ("maximize", 2)])
def test_status_best_trial_follows_the_goal(goal, best):
    spec = sweep_spec(maxTrials=4, objective={"metric": "metrics.trainLoss", "goal": goal})
    sweep = sweep_object(spec)
    children = [succeeded(st.build_trial(sweep, k, {"training.lora.r": 8 * (k + 1)}, False), loss)
                for k, loss in enumerate([0.5, 0.2, 0.9])]
    failed = st.build_trial(sweep, 3, {"training.lora.r": 8}, False) | {"status": {"phase": "Failed"}}
    records = [st.record_from_child(c, spec) for c in [*children, failed]]
    status = st.sweep_status(spec, records, False, 4)
    assert status["phase"] == SweepPhase.SUCCEEDED and status["trialProgress"] == "4/4"
    assert status["bestTrial"]["name"] == f"s-t{best}" and status["bestTrial"]["parameters"] == {
        "training.lora.r": 8 * (best + 1)}
    assert status["bestTrial"]["outputUri"] == f"s3://b/finetune/ml/s-t{best}/run-1/"
    assert status["bestTrial"]["artifacts"] == ["s3://b/x.gguf"]
    assert [t["state"] for t in status["trials"]] == ["Complete"] * 3 + ["Failed"]


def test_status_phases():
    spec = sweep_spec(maxTrials=2)
    assert st.sweep_status(spec, [], False, 2)["phase"] == SweepPhase.PENDING
    running = [st.TrialRecord(0, "s-t0", {})]
    assert st.sweep_status(spec, running, False, 2)["phase"] == SweepPhase.RUNNING
    assert st.sweep_status(spec, running, True, 2)["phase"] == SweepPhase.SUSPENDED
    failed = [st.TrialRecord(k, f"s-t{k}", {}, state=TrialState.FAILED) for k in range(2)]
    status = st.sweep_status(spec, failed, False, 2)
    assert (status["phase"], status["reason"], status["bestTrial"]) == (SweepPhase.FAILED, "NoTrialSucceeded", None)


def test_trial_object_is_owned_labelled_and_passes_queue_through():
    spec = sweep_spec()
    trial = st.build_trial(sweep_object(spec, "lr"), 3, {"training.learningRate": 1e-4, "training.lora.r": 8}, True)
    meta = trial["metadata"]
    assert meta["name"] == "lr-t3" and meta["labels"] == {st.SWEEP_LABEL: "lr", st.TRIAL_LABEL: "3"}
    assert meta["ownerReferences"][0] | {} == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneSweep",
                                              "name": "lr", "uid": "u-1", "controller": True,
                                              "blockOwnerDeletion": True}
    assert json.loads(meta["annotations"][st.PARAMS_ANNOTATION])["training.lora.r"] == 8
    assert trial["spec"]["training"] == {"maxSteps": 4, "learningRate": 1e-4, "lora": {"r": 8}}
    assert trial["spec"]["runPolicy"] == {"queueName": "gpu-queue", "suspend": True}
    assert trial["spec"]["dataset"] == TEMPLATE["dataset"]


# ----------------------------------------------------------------------------- early stopping


def test_median_rule_stops_a_trial_worse_than_the_completed_median():
    spec = sweep_spec(earlyStopping={"metric": "trainLoss", "minTrials": 2, "minSteps": 2})
    done = [st.TrialRecord(k, f"s-t{k}", {}, state=TrialState.COMPLETE, value=v, losses=losses)
            for k, v, losses in [(0, 1.0, {1: 3.0, 2: 2.0, 4: 1.0}), (1, 1.2, {1: 3.2, 3: 2.2, 4: 1.2})]]
    bad = st.TrialRecord(2, "s-t2", {}, losses={1: 9.0, 3: 2.5})
    good = st.TrialRecord(3, "s-t3", {}, losses={3: 1.9})
    early = st.TrialRecord(4, "s-t4", {}, losses={1: 9.0})
    assert "training loss 2.5 at step 3 is worse than the median 2.1" in st.should_stop(spec, bad, [*done, bad])
    assert st.should_stop(spec, good, [*done, good]) is None
    assert st.should_stop(spec, early, [*done, early]) is None  # before minSteps
    assert st.should_stop(spec, bad, [done[0], bad]) is None  # fewer than minTrials completed
    assert st.should_stop(sweep_spec(), bad, [*done, bad]) is None  # no earlyStopping


def test_a_trial_waiting_for_a_missing_secret_is_not_finished():
    spec = sweep_spec()
    child = st.build_trial(sweep_object(spec), 0, {}, False) | {"status": {
        "phase": "Failed", "reason": "SecretNotFound", "message": "spec.output.s3.credentialsSecretRef: Secret 's3'"}}
    rec = st.record_from_child(child, spec)
    assert rec.state == TrialState.RUNNING and "Secret 's3'" in rec.message


def test_a_trial_deleted_by_hand_stays_recorded_and_its_number_is_never_reused():
    spec = sweep_spec(maxTrials=4, parallelism=2)
    sweep = sweep_object(spec)
    t0 = succeeded(st.build_trial(sweep, 0, {"training.lora.r": 8}, False), 0.4)
    t1 = st.build_trial(sweep, 1, {"training.lora.r": 16}, False)
    rows = st.sweep_status(spec, [st.record_from_child(c, spec) for c in (t0, t1)], False, 4)["trials"]
    rows = json.loads(json.dumps(rows))
    records = st.gather(spec, [], rows)  # both FinetuneJobs deleted
    assert [(r.number, r.state, r.value) for r in records] == [(0, "Complete", 0.4), (1, "Failed", None)]
    assert "deleted" in records[1].message
    assert st.next_numbers(spec, records, False) == [2, 3]
    assert st.best(spec, records).name == "s-t0"


EVAL_TEMPLATE = {**TEMPLATE, "dataset": {**TEMPLATE["dataset"], "validationSplit": 0.1},
                 "training": {"maxSteps": 6, "evalEverySteps": 2}}


def reporting(child, progress, phase="Training"):
    """A trial FinetuneJob as read back while (or after) its trainer reports `progress`."""
    child = json.loads(json.dumps(child))
    status = child.get("status") or {}
    child["status"] = {"run": 1, **status, "phase": status.get("phase", phase), "progress": {"run": 1, **progress}}
    return child


def test_median_rule_on_eval_loss_compares_the_trials_eval_points():
    """earlyStopping's default metric: the validation loss each trial reports at its eval steps
    (progress.evalStep/evalLoss), not its training loss. A trial whose training loss looks best but
    whose eval loss is worse than the completed trials' median at that eval step is pruned; one whose
    eval loss is better goes on although its training loss is worse."""
    spec = sweep_spec(template=EVAL_TEMPLATE, earlyStopping={"minTrials": 2, "minSteps": 2})
    assert spec.early_stopping.metric == "evalLoss"
    sweep = sweep_object(spec)
    done = []
    for k, curve in enumerate([{2: 2.0, 4: 1.5, 6: 1.2}, {2: 2.4, 4: 1.9, 6: 1.6}]):
        child, seen = st.build_trial(sweep, k, {}, False), {}
        for step, loss in curve.items():  # the operator sees each eval report while the trial runs
            rec = st.record_from_child(reporting(child, {"step": step, "loss": 0.1, "evalStep": step,
                                                         "evalLoss": loss}), spec, seen)
            seen = rec.losses
        final = succeeded(child, 1.0)
        final["status"]["progress"] = {"run": 1, "step": 6, "loss": 0.1, "evalStep": 6, "evalLoss": curve[6]}
        done.append(st.record_from_child(final, spec, seen))
    assert [(r.state, r.loss_metric, r.losses) for r in done] == [
        ("Complete", "evalLoss", {2: 2.0, 4: 1.5, 6: 1.2}), ("Complete", "evalLoss", {2: 2.4, 4: 1.9, 6: 1.6})]

    # Step 5's training loss is the lowest of all, its eval loss at step 4 is not: pruned.
    overfit = st.record_from_child(reporting(st.build_trial(sweep, 2, {}, False),
                                             {"step": 5, "loss": 0.01, "evalStep": 4, "evalLoss": 1.8}), spec)
    assert overfit.losses == {4: 1.8}
    reason = st.should_stop(spec, overfit, [*done, overfit])
    assert reason == "eval loss 1.8 at step 4 is worse than the median 1.7 of 2 completed trials"
    # A worse training loss but a better eval loss: goes on.
    steady = st.record_from_child(reporting(st.build_trial(sweep, 3, {}, False),
                                            {"step": 5, "loss": 9.0, "evalStep": 4, "evalLoss": 1.6}), spec)
    assert st.should_stop(spec, steady, [*done, steady]) is None
    # Training steps without an eval yet: nothing to compare.
    fresh = st.record_from_child(reporting(st.build_trial(sweep, 4, {}, False), {"step": 1, "loss": 9.0}), spec)
    assert fresh.losses == {} and st.should_stop(spec, fresh, [*done, fresh]) is None

    # The sweep's status records the points with their metric, and a restart reads them back.
    rows = json.loads(json.dumps(st.sweep_status(spec, [*done, overfit], False, 6)["trials"]))
    assert [(r.get("lossMetric"), r.get("losses")) for r in rows] == [
        ("evalLoss", {"2": 2.0, "4": 1.5, "6": 1.2}), ("evalLoss", {"2": 2.4, "4": 1.9, "6": 1.6}),
        ("evalLoss", {"4": 1.8})]
    rebuilt = st.gather(spec, [], rows)
    assert [r.losses for r in rebuilt] == [r.losses for r in [*done, overfit]]


def test_loss_points_of_another_metric_are_not_compared():
    """Points recorded under trainLoss (or before lossMetric existed) are dropped once the rule
    compares eval losses, and the other way round: the two losses are not on one scale."""
    rows = [{"number": 0, "name": "s-t0", "state": "Complete", "objective": 1.0, "losses": {"2": 0.3}},
            {"number": 1, "name": "s-t1", "state": "Complete", "objective": 1.0, "losses": {"2": 0.4},
             "lossMetric": "trainLoss"},
            {"number": 2, "name": "s-t2", "state": "Complete", "objective": 1.0, "losses": {"2": 1.9},
             "lossMetric": "evalLoss"}]
    on_eval = sweep_spec(template=EVAL_TEMPLATE, earlyStopping={})
    assert [r.losses for r in st.gather(on_eval, [], rows)] == [{}, {}, {2: 1.9}]
    on_train = sweep_spec(earlyStopping={"metric": "trainLoss"})
    assert [r.losses for r in st.gather(on_train, [], rows)] == [{2: 0.3}, {2: 0.4}, {}]
    assert {r.loss_metric for r in st.gather(sweep_spec(), [], rows)} == {"trainLoss"}  # no earlyStopping


def test_eval_loss_early_stopping_needs_the_template_to_evaluate():
    with pytest.raises(ValidationError, match=r"earlyStopping.metric evalLoss \(the default\) needs "
                                              r"template.training.evalEverySteps"):
        sweep_spec(earlyStopping={"minTrials": 2})
    assert sweep_spec(earlyStopping={"metric": "trainLoss"}).early_stopping.metric == "trainLoss"
    tuned = sweep_spec(template={**TEMPLATE, "dataset": {**TEMPLATE["dataset"], "validationSplit": 0.1}},
                       earlyStopping={}, parameters=[{"path": "training.evalEverySteps", "choice": {"values": [1, 2]}}])
    assert tuned.early_stopping.metric == "evalLoss"  # every trial gets evalEverySteps from the parameter
    # A template that evaluates needs validation rows; the FinetuneJob rule names both fields.
    with pytest.raises(ValidationError, match=r"training.evalEverySteps needs dataset.validationSplit > 0"):
        sweep_spec(template={**TEMPLATE, "training": {"maxSteps": 4, "evalEverySteps": 2}},
                   earlyStopping={})
