"""The warm trainer (runPolicy.keepWarmSeconds), operator side, as pure functions: the Job's flag and
env, when a re-run's Job may go to the warm trainer (`handoff_blocker`, `handoff_refusal`), the
admin's cap, the handoff patch and the status of a run whose pod stays up warm."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from finetune_api import contract as c
from finetune_api.spec import FinetuneJobSpec
from finetune_api.status import Phase, Reason
from finetune_api.sweep import apply_parameters
from finetune_operator import builders, lifecycle, policy
from finetune_operator.config import OperatorConfig

OWNER = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
         "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 3}}
SPEC = {
    "dataset": {"configMapRef": {"name": "rows", "key": "train.jsonl"}},
    "output": {"s3": {"bucket": "models", "credentialsSecretRef": {"name": "s3-creds"}}},
    "resources": {"gpus": 1, "cpu": "4"},
    "runPolicy": {"keepWarmSeconds": 300},
}
CFG = OperatorConfig(trainer_image="trainer:test")
NOW = "2026-12-05T10:00:00Z"


def spec_with(**changes) -> dict:
    """SPEC with each `a__b` path set (apply_parameters' `a.b`)."""
    return apply_parameters(SPEC, {path.replace("__", "."): value for path, value in changes.items()})


def build(spec=SPEC, run=1, cfg=CFG, live_jobs=0):
    resolved = builders.resolve_spec(copy.deepcopy(spec), cfg)
    run_config = builders.build_run_config(resolved, OWNER, run)
    config_map = builders.build_config_map(run_config, OWNER)
    return builders.build_job(resolved, OWNER, run, cfg, service_account="demo-trainer",
                              raw_spec_hash=builders.spec_hash(spec), live_jobs=live_jobs,
                              config_digest=builders.config_sha256(config_map))


def stored(job: dict) -> dict:
    """The Job as the apiserver returns it: defaults added, a status."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    job["metadata"].update(uid="job-uid", resourceVersion="7", creationTimestamp=NOW)
    job["spec"].update(completions=1, parallelism=1, completionMode="NonIndexed", manualSelector=False)
    job["spec"]["template"]["metadata"]["labels"]["job-name"] = job["metadata"]["name"]
    pod.update(dnsPolicy="ClusterFirst", schedulerName="default-scheduler")
    for volume in pod["volumes"]:
        if "configMap" in volume:
            volume["configMap"]["defaultMode"] = 420
    job["status"] = {"active": 1, "startTime": NOW}
    return job


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


# ----------------------------------------------------------------------------- the Job


def test_keep_warm_adds_the_flag_and_the_pod_name_env():
    ctr = container(build())
    assert ctr["command"][-2:] == [c.ARG_KEEP_WARM, "300"]
    env = {e["name"]: e for e in ctr["env"]}
    assert env[c.ENV_POD_NAME]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    cold = container(build(spec_with(runPolicy__keepWarmSeconds=0)))
    assert c.ARG_KEEP_WARM not in cold["command"] and c.ENV_POD_NAME not in {e["name"] for e in cold["env"]}


def test_keep_warm_is_refused_for_several_training_processes():
    with pytest.raises(ValidationError, match="spec.runPolicy.keepWarmSeconds: a warm trainer needs a single"):
        FinetuneJobSpec.model_validate(spec_with(resources__gpus=2, training={"gradientAccumulationSteps": 2}))
    with pytest.raises(ValidationError, match="keepWarmSeconds"):
        FinetuneJobSpec.model_validate(spec_with(resources__nodes=2, resources__gpus=0,
                                                 training={"gradientAccumulationSteps": 2}))
    FinetuneJobSpec.model_validate(spec_with(resources__gpus=2, runPolicy__keepWarmSeconds=0,
                                             training={"gradientAccumulationSteps": 2}))


def test_the_admins_cap_refuses_a_longer_warm_time_naming_the_field():
    spec = builders.resolve_spec(spec_with(runPolicy__keepWarmSeconds=901), CFG)
    problems = policy.violations(spec, CFG)
    assert len(problems) == 1 and problems[0].startswith("spec.runPolicy.keepWarmSeconds: 901")
    assert "security.maxKeepWarmSeconds" in problems[0]
    assert not policy.violations(builders.resolve_spec(spec_with(runPolicy__keepWarmSeconds=900), CFG), CFG)
    off = OperatorConfig(trainer_image="trainer:test", max_keep_warm_seconds=0)
    assert policy.violations(builders.resolve_spec(spec_with(runPolicy__keepWarmSeconds=1), off), off)
    assert not policy.violations(builders.resolve_spec(spec_with(runPolicy__keepWarmSeconds=0), off), off)


# ----------------------------------------------------------------------------- may the run go to the warm trainer


def test_a_rerun_whose_job_differs_only_in_the_run_goes_to_the_warm_trainer():
    warm = stored(build())
    # Another learning rate and dataset split: a new config, the same pod; the report interval follows load.
    edited = spec_with(training={"learningRate": 1e-5, "epochs": 2})
    new = build(edited, run=2, live_jobs=500)
    assert container(new)["env"] != container(warm)["env"]  # run, config hash and interval differ
    assert new["metadata"]["name"] != warm["metadata"]["name"]
    assert builders.handoff_blocker(warm, new) is None


@pytest.mark.parametrize("change, where", [
    ({"resources__cpu": "8"}, "resources"),
    ({"resources__image": "trainer:other"}, "image"),
    ({"resources__nodeSelector": {"pool": "a100"}}, "nodeSelector"),
    ({"resources__tolerations": [{"key": "spot", "operator": "Exists"}]}, "tolerations"),
    ({"output__s3__credentialsSecretRef": {"name": "other-creds"}}, "env"),
    ({"baseModel__tokenSecretRef": {"name": "hf"}}, "env"),
    ({"dataset__configMapRef": {"name": "rows-v2", "key": "train.jsonl"}}, "volumes"),
    ({"runPolicy__keepWarmSeconds": 600}, "command"),
    ({"runPolicy__keepWarmSeconds": 0}, "command"),
    ({"runPolicy__backoffLimit": 5}, "backoffLimit"),
])
def test_a_rerun_whose_pod_would_differ_gets_a_new_job(change, where):
    warm = stored(build())
    reason = builders.handoff_blocker(warm, build(spec_with(**change), run=2))
    assert reason and "demo-r1" in reason and where in reason, reason


def test_a_removed_setting_blocks_too_and_so_does_a_deadline():
    warm = stored(build(spec_with(resources__nodeSelector={"pool": "h100"})))
    assert builders.handoff_blocker(warm, build(SPEC, run=2))  # the new Job has no nodeSelector at all
    deadline = spec_with(runPolicy__activeDeadlineSeconds=3600)
    reason = builders.handoff_blocker(stored(build(deadline)), build(deadline, run=2))
    assert reason and "activeDeadlineSeconds" in reason


def test_a_job_without_the_identity_stamp_is_never_handed_a_run():
    warm = stored(build())
    del warm["metadata"]["annotations"][builders.HANDOFF_IDENTITY_ANNOTATION]
    assert "handoff-identity" in builders.handoff_blocker(warm, build(run=2))


def reported_status(until="2026-12-05T10:05:00Z") -> dict:
    manifest = {"name": "manifest.json", "kind": "manifest", "uri": "s3://m/run-1/manifest.json",
                "sizeBytes": 2, "sha256": "0" * 64}
    return {"run": 1, "jobName": "demo-r1", "specHash": "h1", "phase": "Succeeded", "reason": "Completed",
            "message": "training finished; artifacts uploaded", "startTime": "2026-12-05T09:50:00Z",
            "completionTime": "2026-12-05T09:59:00Z", "observedGeneration": 1,
            "progress": {"run": 1, "stage": "Uploading", "percent": 100}, "artifacts": [manifest],
            "metrics": {"trainLoss": 1.0}, "outputUri": "s3://m/run-1/", "conditions": [],
            "warm": {"run": 1, "pod": "demo-r1-abcde", "until": until}}


def test_handoff_refusal_needs_a_warm_reported_run_with_time_left_and_its_job_running():
    status, job = reported_status(), stored(build())
    assert lifecycle.handoff_refusal(status, job, NOW) is None
    assert lifecycle.handoff_refusal({**status, "warm": None}, job, NOW) == "no warm trainer"
    assert lifecycle.handoff_refusal({**status, "warm": {**status["warm"], "run": 0}}, job, NOW)
    assert lifecycle.handoff_refusal({**status, "artifacts": None}, job, NOW)  # never reported complete
    for garbled in ("tomorrow", None, "2026-12-05T10:05:00+99:00"):  # the trainer pod writes status.warm
        bad = {**status, "warm": {**status["warm"], c.WARM_UNTIL: garbled}}
        assert "no RFC 3339 time" in lifecycle.handoff_refusal(bad, job, NOW)
    left = c.HANDOFF_MIN_LEFT_SECONDS - 1
    assert "leaves in" in lifecycle.handoff_refusal(reported_status(f"2026-12-05T10:00:{left:02d}Z"), job, NOW)
    assert lifecycle.handoff_refusal(reported_status(f"2026-12-05T10:00:{left + 1:02d}Z"), job, NOW) is None
    assert lifecycle.handoff_refusal(status, None, NOW)
    complete = {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert "not running" in lifecycle.handoff_refusal(status, complete, NOW)
    suspended = copy.deepcopy(job)
    suspended["spec"]["suspend"] = True
    assert "not running" in lifecycle.handoff_refusal(status, suspended, NOW)
    assert "no pod" in lifecycle.handoff_refusal(status, {**job, "status": {}}, NOW)


def test_the_handoff_patch_tests_warm_moves_the_run_and_clears_with_remove():
    status = reported_status()
    obs = lifecycle.handed_off_observation("demo-r1", 2)
    fields = lifecycle.new_run(status, obs, 2, 2, "h2", "demo-r1", "s3://m/run-2/", NOW)
    fields = {k: v for k, v in fields.items() if k not in ("warm", "handoff")}
    ops = c.handoff_patch(status["warm"], 2, "job: {}\n", "a" * 64, fields, seen=status)
    assert ops[:2] == [{"op": "test", "path": "/status/warm", "value": status["warm"]},
                       {"op": "remove", "path": "/status/warm"}]
    by_path = {op["path"]: op for op in ops[2:]}
    assert by_path["/status/run"]["value"] == 2 and by_path["/status/jobName"]["value"] == "demo-r1"
    assert by_path["/status/phase"]["value"] == "Pending" and by_path["/status/reason"]["value"] == "HandedOff"
    assert [h["run"] for h in by_path["/status/history"]["value"]] == [1]
    # Cleared fields are removed where present and left alone where absent: no null reaches the schema.
    assert by_path["/status/artifacts"]["op"] == by_path["/status/completionTime"]["op"] == "remove"
    assert all(op.get("value", 0) is not None for op in ops)
    del status["metrics"]
    assert "/status/metrics" not in {op["path"] for op in c.handoff_patch(status["warm"], 2, "", "a" * 64, fields,
                                                                           seen=status)}
    assert ops[-1] == {"op": "add", "path": "/status/handoff",
                       "value": {"run": 2, "configSha256": "a" * 64, "config": "job: {}\n"}}


# ----------------------------------------------------------------------------- the status while warm


def job_with(*conditions: str, active: int = 0) -> dict:
    return {"metadata": {"name": "demo-r1"}, "spec": {},
            "status": {"active": active, "conditions": [{"type": t, "status": "True"} for t in conditions]}}


def test_a_reported_run_whose_pod_stays_up_warm_is_succeeded():
    until = "2026-12-05T10:05:00Z"
    obs = lifecycle.observe(job_with(active=1), [], {"run": 1, "stage": "Uploading"}, 1, False, reported=True,
                            warm_until=until)
    assert obs.phase is Phase.SUCCEEDED and obs.reason == Reason.COMPLETED
    assert until in obs.message and "warm" in obs.message
    update = lifecycle.status_update({}, obs, 1, NOW)
    assert update["phase"] == "Succeeded" and update["completionTime"] == NOW
    # Reported, the pod still up and not warm (on its way out): the last stage until the Job completes,
    # so that Finished also means the GPU is free.
    plain = lifecycle.observe(job_with(active=1), [], {"run": 1, "stage": "Uploading"}, 1, False, reported=True)
    assert plain.phase is Phase.UPLOADING
    # Not reported: the stage, as before.
    assert lifecycle.observe(job_with(active=1), [], {"run": 1, "stage": "Uploading"}, 1, False).phase is Phase.UPLOADING


def test_a_warm_job_that_ends_later_leaves_the_result_standing():
    status = {**reported_status(), **lifecycle.status_update(
        {}, lifecycle.observe(job_with(active=1), [], None, 1, False, reported=True, warm_until=NOW), 1, NOW)}
    complete = lifecycle.observe(job_with("Complete"), [], None, 1, False, reported=True, warm_until=NOW)
    assert complete.phase is Phase.SUCCEEDED and "warm" not in complete.message
    update = lifecycle.status_update(status, complete, 1, "2026-12-05T10:06:00Z")
    assert "phase" not in update and "completionTime" not in update  # no new transition, the time stays
    failed_pod = {"metadata": {"name": "demo-r1-x"}, "status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": 75, "message": '{"reason": "Terminated", "message": "SIGTERM"}'}}}]}}
    failed = lifecycle.observe(job_with("Failed"), [failed_pod], None, 1, False, reported=True)
    assert failed.phase is Phase.SUCCEEDED
    # The same failure without the report is the run's failure, as before.
    assert lifecycle.observe(job_with("Failed"), [failed_pod], None, 1, False).phase is Phase.FAILED


def test_a_handed_off_run_is_pending_until_the_trainer_reports_it():
    job = job_with(active=1)
    obs = lifecycle.observe(job, [], {"run": 1, "stage": "Uploading"}, 2, False, handed_off=True)
    assert obs.phase is Phase.PENDING and obs.reason == Reason.HANDED_OFF and "demo-r1" in obs.message
    taken = lifecycle.observe(job, [], {"run": 2, "stage": "Training"}, 2, False, handed_off=False)
    assert taken.phase is Phase.TRAINING
    # The warm pod failing on the handed-off run fails that run: it never reported.
    assert lifecycle.observe(job_with("Failed"), [], None, 2, False, handed_off=True).phase is Phase.FAILED


def test_a_new_job_clears_a_stale_warm_trainer_and_handoff():
    status = {**reported_status(), "handoff": {"run": 2, "configSha256": "a" * 64, "config": ""}}
    obs = lifecycle.observe(None, [], None, 2, False)
    update = lifecycle.new_run(status, obs, 2, 2, "h2", "demo-r2", "s3://m/run-2/", NOW)
    assert update["warm"] is None and update["handoff"] is None
    not_started, _ = lifecycle.not_started(status, lifecycle.Observation(Phase.FAILED, Reason.POLICY_DENIED, "x"), 2)
    assert not_started["warm"] is None and not_started["handoff"] is None
