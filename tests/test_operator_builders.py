"""Pure builders and the status state machine: no cluster needed."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from pydantic import ValidationError

from finetune_api import RunConfig
from finetune_api import contract as c
from finetune_api.spec import FinetuneJobSpec
from finetune_api.status import Phase
from finetune_operator import builders
from finetune_operator.config import OperatorConfig
from finetune_operator.handlers import format_validation_error
from finetune_operator.lifecycle import Observation, completion_reported, observe, status_update, transition

OWNER = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
         "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 3}}
SPEC = {
    "dataset": {"source": "yahma/alpaca-cleaned"},
    "output": {"s3": {"bucket": "models", "credentialsSecretRef": {"name": "s3-creds"}}},
    "baseModel": {"tokenSecretRef": {"name": "hf"}},
    "runPolicy": {"queueName": "gpu-queue", "activeDeadlineSeconds": 3600},
}
CFG = OperatorConfig(trainer_image="trainer:test", default_node_selector={"pool": "gpu"})


def build(spec=SPEC, run=1, cfg=CFG):
    resolved = builders.resolve_spec(copy.deepcopy(spec), cfg)
    return builders.build_job(resolved, OWNER, run, cfg, service_account="demo-trainer",
                              raw_spec_hash=builders.spec_hash(spec))


def test_job_carries_owner_labels_gpu_and_queue():
    job = build()
    meta, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert meta["name"] == "demo-r1"
    assert meta["ownerReferences"][0] | {} == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
                                                "name": "demo", "uid": "uid-1", "controller": True,
                                                "blockOwnerDeletion": True}
    assert meta["labels"][c.KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["suspend"] is True  # Kueue unsuspends on admission
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"pool": "gpu"}  # operator default applied
    assert pod["restartPolicy"] == "Never"


def test_config_error_exit_code_fails_the_job_at_once():
    rules = build()["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [c.EXIT_CONFIG_ERROR]


def test_trainer_runs_non_root_without_privilege_escalation():
    pod = build()["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # A read-only root: the trainer writes only to its volumes, /tmp among them.
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", "/workspace", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path


def test_credentials_only_as_secret_references():
    env = build()["spec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert by_name["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert by_name["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert all("value" not in by_name[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"))


def test_cpu_job_requests_no_gpu_and_follows_suspend():
    spec = {**SPEC, "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"}, "runPolicy": {"suspend": True}}
    job = build(spec)
    res = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {"limits": {"cpu": "2", "memory": "4Gi"}, "requests": {"cpu": "2", "memory": "4Gi"}}
    assert job["spec"]["suspend"] is True
    assert c.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]


def test_the_admins_compile_cache_choice_reaches_the_trainer():
    """Compile caches hold code the trainer runs: the cluster admin decides (security.compileCache)."""
    def compile_env(cfg):
        env = {e["name"]: e.get("value") for e in build(SPEC, cfg=cfg)["spec"]["template"]["spec"]["containers"][0]["env"]}
        return env[c.ENV_COMPILE_CACHE]

    assert CFG.compile_cache is True and compile_env(CFG) == "on"
    assert compile_env(dataclasses.replace(CFG, compile_cache=False)) == "off"


def test_dataset_configmap_is_mounted_and_named_in_env():
    spec = {**SPEC, "dataset": {"configMapRef": {"name": "rows", "key": "train.jsonl"}}}
    pod = build(spec)["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env[c.ENV_DATASET_FILE] == f"{c.DATASET_MOUNT}/train.jsonl"
    volume = next(v for v in pod["volumes"] if v["name"] == "dataset")
    assert volume["configMap"] == {"name": "rows", "items": [{"key": "train.jsonl", "path": "train.jsonl"}]}


def test_run_config_resolves_defaults_and_run_prefix():
    spec = builders.resolve_spec(copy.deepcopy(SPEC), CFG)
    rc = builders.build_run_config(spec, OWNER, run=4)
    # keyed by uid: a re-created FinetuneJob of the same name never meets the deleted one's checkpoints
    assert rc.output_uri == "s3://models/finetune/team-a/demo/uid-1/run-4/"
    assert rc.spec.training.learning_rate == 2e-4 and rc.spec.export.gguf == ["q4_k_m"]
    cm = builders.build_config_map(rc, OWNER)
    assert cm["metadata"]["name"] == "demo-r4-config"
    import yaml
    again = RunConfig.model_validate(yaml.safe_load(cm["data"][c.CONFIG_FILE]))
    assert again == rc  # the trainer reads back exactly what the operator resolved


def test_spec_hash_ignores_suspend_only():
    base = builders.spec_hash(SPEC)
    suspended = copy.deepcopy(SPEC)
    suspended["runPolicy"]["suspend"] = True
    assert builders.spec_hash(suspended) == base
    bare = {k: v for k, v in SPEC.items() if k != "runPolicy"}
    assert builders.spec_hash({**bare, "runPolicy": {"suspend": True}}) == builders.spec_hash(bare)
    changed = copy.deepcopy(SPEC)
    changed["training"] = {"learningRate": 1e-5}
    assert builders.spec_hash(changed) != base


def test_the_job_pins_the_sha256_of_its_run_config():
    """The pod template (immutable once the Job exists) carries the hash of the ConfigMap's run.yaml."""
    import hashlib

    resolved = builders.resolve_spec(copy.deepcopy(SPEC), CFG)
    config_map = builders.build_config_map(builders.build_run_config(resolved, OWNER, 1), OWNER)
    digest = builders.config_sha256(config_map)
    assert digest == hashlib.sha256(config_map["data"][c.CONFIG_FILE].encode()).hexdigest()
    job = builders.build_job(resolved, OWNER, 1, CFG, service_account="demo-trainer",
                             raw_spec_hash=builders.spec_hash(SPEC), config_digest=digest)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[c.ENV_CONFIG_SHA256] == digest


def test_role_is_scoped_to_one_object():
    role = builders.build_role(OWNER)
    assert all(rule["resourceNames"] == ["demo"] for rule in role["rules"])
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "patch"}


@pytest.mark.parametrize("bad, field", [
    ({"training": {"epochs": 2, "maxSteps": 10}}, "training"),
    ({"training": {"method": "qlora"}, "resources": {"gpus": 0}}, "qlora"),
    ({"export": {"gguf": ["q9_z"]}}, "export.gguf.0"),
    ({"training": {"learningRate": 0}}, "training.learningRate"),
])
def test_python_validation_names_the_field(bad, field):
    with pytest.raises(ValidationError) as exc:
        FinetuneJobSpec.model_validate({**SPEC, **bad})
    assert field in format_validation_error(exc.value)


# ----------------------------------------------------------------------------- state machine

def job_with(conditions=(), suspend=False, active=0):
    return {"metadata": {"name": "demo-r1"}, "spec": {"suspend": suspend},
            "status": {"active": active, "conditions": [{"type": t, "status": "True", "reason": r, "message": m}
                                                         for t, r, m in conditions]}}


def failed_pod(message, code=42):
    return {"metadata": {"name": "p"}, "status": {"startTime": "2026-01-01T00:00:00Z", "containerStatuses": [
        {"state": {"terminated": {"exitCode": code, "message": message}}}]}}


def test_progress_stage_drives_the_phase_only_for_the_current_run():
    job = job_with(active=1)
    assert observe(job, [], {"run": 2, "stage": "Training"}, run=2, queued=False).phase == "Training"
    assert observe(job, [], {"run": 1, "stage": "Exporting"}, run=2, queued=False).phase == "Pending"


def test_config_error_carries_the_trainers_reason_and_message():
    job = job_with([("Failed", "PodFailurePolicy", "Container trainer exited 42")])
    obs = observe(job, [failed_pod('{"reason": "InvalidDataset", "message": "row 7: no instruction"}')], None, 1, False)
    assert (obs.phase, obs.reason, obs.message) == ("Failed", "InvalidDataset", "row 7: no instruction")


def test_suspended_and_queued():
    assert observe(job_with(suspend=True), [], None, 1, queued=True).phase == "Queued"
    assert observe(job_with(suspend=True), [], None, 1, queued=False).phase == "Suspended"


def test_status_update_is_idempotent_and_sets_conditions():
    obs = observe(job_with([("Complete", "", "")]), [], None, 1, False, reported=True)
    first = status_update({}, obs, generation=3, now="2026-01-01T00:00:00Z")
    conds = {cond["type"]: cond for cond in first["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["Failed"]["status"] == "False"
    assert conds["Finished"]["status"] == "True"
    assert conds["Succeeded"]["observedGeneration"] == 3
    assert first["phase"] == "Succeeded" and first["completionTime"] == "2026-01-01T00:00:00Z"
    assert status_update(first, obs, generation=3, now="2026-01-02T00:00:00Z") == {}


def test_jobs_by_phase_gauge_follows_transitions_and_deletion():
    from finetune_operator import metrics

    def value(phase):
        return metrics.JOBS.labels(phase=phase)._value.get()

    metrics.observe_phase("ns", "gauge-test", "Pending")
    pending = value("Pending")
    metrics.observe_phase("ns", "gauge-test", "Succeeded")
    assert value("Pending") == pending - 1 and value("Succeeded") >= 1
    succeeded = value("Succeeded")
    metrics.forget("ns", "gauge-test")
    assert value("Succeeded") == succeeded - 1


def test_token_bucket_bounds_writes_per_second():
    from finetune_operator.ratelimit import TokenBucket

    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0], sleep=sleep)
    waits = [bucket.acquire() for _ in range(25)]
    assert sum(1 for w in waits if w == 0) == 5  # the burst goes through at once
    # the other 20 are spread at 10 per second
    assert 1.9 <= now[0] <= 2.1


def test_progress_interval_spreads_reports_over_live_jobs():
    cfg = OperatorConfig(progress_interval_seconds=5, progress_reports_per_second=20)
    assert builders.progress_interval(cfg, 0) == 5
    assert builders.progress_interval(cfg, 100) == 5
    assert builders.progress_interval(cfg, 500) == 25  # 500 trainers x 1/25 s = 20 reports/s
    env = {e["name"]: e.get("value") for e in build()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[c.ENV_PROGRESS_INTERVAL] == str(CFG.progress_interval_seconds)


def test_gpu_hours_of_a_run():
    from finetune_operator.lifecycle import gpu_hours

    assert gpu_hours("2026-01-01T00:00:00Z", "2026-01-01T01:30:00Z", 2) == 3.0
    assert gpu_hours("2026-01-01T00:00:00Z", "2026-01-01T01:30:00Z", 0) == 0.0  # CPU runs cost no GPU time
    assert gpu_hours(None, "2026-01-01T01:30:00Z", 1) == 0.0


def test_a_completed_job_without_the_trainers_report_is_not_success():
    """A node that completes pods without running the trainer must not make a run Succeeded."""
    complete = job_with([("Complete", "", "")])
    obs = observe(complete, [], None, 1, False)
    assert (obs.phase, obs.reason) == ("Failed", "NoCompletionReport")
    conds = {c["type"]: c for c in status_update({}, obs, 1)["conditions"]}
    assert conds["Succeeded"]["status"] == "False" and conds["Finished"]["status"] == "True"


def test_completion_report_is_the_manifest_of_this_run():
    manifest = {"kind": "manifest", "name": "manifest.json"}
    assert completion_reported({"progress": {"run": 2}, "artifacts": [manifest]}, 2)
    assert not completion_reported({"progress": {"run": 1}, "artifacts": [manifest]}, 2)  # a stale run's
    assert not completion_reported({"progress": {"run": 2}, "artifacts": [{"kind": "gguf"}]}, 2)
    assert not completion_reported({}, 2)


def waiting_pod(reason, message=""):
    return {"metadata": {"name": "p"}, "status": {"containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": reason, "message": message}}}]}}


@pytest.mark.parametrize("reason, phase", [("ImagePullBackOff", "Pending"), ("ErrImagePull", "Pending"),
                                           ("CreateContainerConfigError", "Pending"),
                                           ("InvalidImageName", "Failed"), ("ErrImageNeverPull", "Failed")])
def test_a_pod_that_cannot_start_shows_in_the_status(reason, phase):
    obs = observe(job_with(active=1), [waiting_pod(reason, "pull access denied")], None, 1, False)
    assert (obs.phase, obs.reason) == (phase, "PodNotStarting")
    assert reason in obs.message and "pull access denied" in obs.message
    assert observe(job_with(active=1), [waiting_pod("ContainerCreating")], None, 1, False).reason == "PodPending"


@pytest.mark.parametrize("message, phase", [
    ('pods "demo-r1-x" is forbidden: exceeded quota: q, requested: pods=1, used: pods=0, limited: pods=0', "Pending"),
    ('error looking up service account team-a/demo-trainer: serviceaccount "demo-trainer" not found', "Pending"),
    ('pods "demo-r1-x" is forbidden: violates PodSecurity "restricted:latest": seccompProfile', "Failed"),
    ('admission webhook "pods.example.com" denied the request: no GPUs on Sundays', "Failed"),
])
def test_a_pod_the_job_cannot_create_shows_in_the_status(message, phase):
    from finetune_operator.lifecycle import abandon_job

    obs = observe(job_with(), [], None, 1, False, failed_create=message)
    assert (obs.phase, obs.reason) == (phase, "PodNotCreated")
    assert obs.message.startswith("Job demo-r1 cannot create its pod: ") and message in obs.message
    assert abandon_job(obs) is (phase == "Failed")
    assert observe(job_with(), [], None, 1, False).reason == "PodPending"  # no FailedCreate: just not yet


def test_transition_is_phase_reason_or_message():
    obs = Observation(Phase.PENDING, "SecretNotFound", "spec.x: Secret 's' not found")
    assert transition({}, obs)
    assert not transition({"phase": "Pending", "reason": "SecretNotFound", "message": obs.message}, obs)
