"""The operator's state machine (finetune_operator.lifecycle) as pure functions: new run or in-place
edit, retiring a run, a generation that cannot start, a deleted Job, Kueue's queue."""

from __future__ import annotations

from finetune_api.status import Phase, Reason
from finetune_operator import lifecycle as L
from finetune_operator.lifecycle import Observation

NOW = "2026-12-05T10:00:00Z"


def running_status() -> dict:
    return {"run": 2, "specHash": "abc", "jobName": "ft-r2", "phase": "Training", "reason": "StageStarted",
            "message": "step 3", "observedGeneration": 4, "startTime": "2026-12-05T09:00:00Z",
            "outputUri": "s3://models/ft/run-2/", "metrics": {"trainLoss": 1.5},
            "history": [{"run": 1, "phase": "Succeeded"}], "conditions": []}


def test_same_spec_is_the_run_in_hand_and_a_changed_one_is_a_new_run():
    status = running_status()
    assert L.in_place(status, "abc")
    assert not L.in_place(status, "def")
    assert not L.in_place({**status, "jobName": None}, "abc")  # the last generation never started
    assert not L.in_place({}, "abc")


def test_suspend_is_applied_in_place_and_kueue_owns_unsuspending():
    assert L.suspend_change(True, False, None) is True
    assert L.suspend_change(False, True, None) is False
    assert L.suspend_change(False, True, "team-a") is None  # Kueue admits it, not the operator
    assert L.suspend_change(True, True, None) is None and L.suspend_change(False, False, None) is None
    assert L.queued("team-a", suspend=False) and not L.queued("team-a", suspend=True) and not L.queued(None, False)


def test_a_missing_secret_is_a_wait_that_retires_the_running_run_once():
    status = running_status()
    obs = Observation(Phase.PENDING, Reason.SECRET_NOT_FOUND, "spec.output.s3.credentialsSecretRef: Secret 's3' not found")
    update, changed = L.not_started(status, obs, 5, NOW)
    assert changed and L.retried(obs.reason)
    assert update["phase"] == "Pending" and update["reason"] == "SecretNotFound" and update["observedGeneration"] == 5
    assert all(update[k] is None for k in ("jobName", "specHash", "progress", "metrics", "artifacts", "outputUri"))
    assert update["history"][-1] == {"run": 2, "generation": 4, "jobName": "ft-r2", "phase": "Training (superseded)",
                                     "startTime": "2026-12-05T09:00:00Z", "completionTime": NOW,
                                     "reason": "StageStarted", "message": "step 3",
                                     "outputUri": "s3://models/ft/run-2/", "metrics": {"trainLoss": 1.5}}
    # The retry 30 s later sees the same thing: no second Event, no second count, nothing retired again.
    again, changed = L.not_started({**status, **update}, obs, 5, NOW)
    assert not changed and "history" not in again


def test_a_spec_problem_is_failed_and_sticky():
    obs = Observation(Phase.FAILED, Reason.INVALID_SPEC, "spec.training.epochs: must be > 0")
    update, changed = L.not_started({}, obs, 1, NOW)
    assert changed and update["phase"] == "Failed" and not L.retried(obs.reason)
    assert not L.retried(Reason.POLICY_DENIED) and not L.retried(Reason.JOB_REJECTED)
    assert L.warns(obs) and L.warns(Observation(Phase.PENDING, Reason.CONFIGMAP_NOT_FOUND, ""))
    assert not L.warns(Observation(Phase.PENDING, Reason.POD_PENDING, ""))


def test_a_new_run_retires_the_previous_one_and_starts_clean():
    status = running_status()
    obs = L.observe({"metadata": {"name": "ft-r3"}, "spec": {}}, [], None, 3, queued=False)
    update = L.new_run(status, obs, 6, 3, "def", "ft-r3", "s3://models/ft/run-3/", NOW)
    assert update["run"] == 3 and update["jobName"] == "ft-r3" and update["specHash"] == "def"
    assert update["phase"] == "Pending" and update["startTime"] == NOW and update["completionTime"] is None
    assert update["progress"] is None and update["metrics"] is None
    assert [h["run"] for h in update["history"]] == [1, 2]
    assert "history" not in L.new_run({}, obs, 1, 1, "abc", "ft-r1", "s3://models/ft/run-1/", NOW)


def test_a_deleted_job_fails_an_unfinished_run_and_a_finished_result_stands():
    status = running_status()
    assert L.in_flight(status) and not L.in_flight({**status, "jobName": None})
    assert L.job_deleted(status, None, deleted=False)  # gone while Training
    assert L.job_deleted(status, {"metadata": {}}, deleted=True)
    assert not L.job_deleted({**status, "phase": "Pending"}, None, deleted=False)  # not created yet
    assert L.deleted_observation(status).reason == Reason.JOB_DELETED
    assert L.settled({**status, "phase": "Succeeded"}, None, deleted=False)  # its TTL removed the Job
    assert not L.settled(status, None, deleted=True)
    assert L.abandon_job(Observation(Phase.FAILED, Reason.POD_NOT_STARTING, "InvalidImageName"))
    assert not L.abandon_job(Observation(Phase.PENDING, Reason.POD_NOT_STARTING, "ImagePullBackOff"))
