"""Several GPUs and pods: the API rule, the Job and Service builders, the ranks' share of a step, torchrun's
exit code, and the dev pod runner's headless-Service names. Pure functions: no cluster, no torch.distributed."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from devstack.podspec import ServiceHosts
from finetune_api import contract as c
from finetune_api.crd import build_crd
from finetune_api.spec import FinetuneJobSpec
from finetune_operator import builders
from finetune_operator.config import OperatorConfig
from finetune_trainer.launch import exit_code
from finetune_trainer.train.distributed import World

OWNER = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
         "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 1}}
CFG = OperatorConfig(trainer_image="trainer:test", default_s3_bucket="models")


def spec(gpus: int = 1, nodes: int = 1, accum: int | None = None) -> dict:
    out = {"dataset": {"source": "yahma/alpaca-cleaned"}, "resources": {"gpus": gpus, "nodes": nodes}}
    if accum is not None:
        out["training"] = {"gradientAccumulationSteps": accum}
    return out


def build(raw: dict, run: int = 1) -> dict:
    resolved = builders.resolve_spec(copy.deepcopy(raw), CFG)
    return builders.build_job(resolved, OWNER, run, CFG, service_account="demo-trainer",
                              raw_spec_hash=builders.spec_hash(raw))


def test_one_process_runs_the_trainer_as_before():
    job = build(spec(gpus=1))
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["finetune", "run"]
    assert "completionMode" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"]


def test_several_gpus_run_one_pod_under_torchrun():
    job = build(spec(gpus=4, accum=8))
    container = job["spec"]["template"]["spec"]["containers"][0]
    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "finetune_trainer.launch"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert "--standalone" in cmd and "--nnodes" not in cmd
    assert cmd[cmd.index("-m", 3):] == ["-m", "finetune_trainer", "run", "--config", f"{c.CONFIG_MOUNT}/{c.CONFIG_FILE}",
                                        "--workdir", c.WORKDIR_MOUNT, "--resume"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert "completionMode" not in job["spec"]


def test_several_nodes_are_an_indexed_job_rendezvousing_on_pod_zero():
    raw = spec(gpus=2, nodes=3, accum=6)
    job = build(raw, run=2)
    pod = job["spec"]["template"]["spec"]
    assert {k: job["spec"][k] for k in ("completionMode", "completions", "parallelism")} == \
        {"completionMode": "Indexed", "completions": 3, "parallelism": 3}
    assert job["spec"]["backoffLimit"] == 2 * 3  # an attempt fails every pod: runPolicy.backoffLimit attempts
    assert pod["subdomain"] == "demo-r2"
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--nnodes") + 1] == "3"
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    # Indexed Job pods are named <job>-<index> under the headless Service: index 0 serves the store.
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == f"demo-r2-0.demo-r2:{builders.RENDEZVOUS_PORT}"
    assert "--standalone" not in cmd

    service = builders.build_service(builders.resolve_spec(copy.deepcopy(raw), CFG), OWNER, 2)
    assert service["metadata"]["name"] == pod["subdomain"]
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # The selector matches the Job's pods (and only this run's).
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"][c.LABEL_RUN] == "2"


def test_cpu_nodes_run_one_process_each():
    cmd = build(spec(gpus=0, nodes=2, accum=2))["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "1"
    assert cmd[cmd.index("--nnodes") + 1] == "2"


@pytest.mark.parametrize(("gpus", "nodes", "accum", "ok"), [
    (1, 1, 1, True), (2, 1, 2, True), (2, 2, 8, True), (0, 2, 2, True), (0, 3, 6, True),
    (2, 1, 1, False), (4, 1, 6, False), (0, 2, 3, False), (2, 3, 3, False),
])
def test_accumulation_must_be_shared_evenly_by_the_processes(gpus, nodes, accum, ok):
    raw = spec(gpus, nodes, accum)
    if ok:
        assert FinetuneJobSpec.model_validate(raw).resources.world_size == max(gpus, 1) * nodes
        return
    with pytest.raises(ValidationError, match="spec.training.gradientAccumulationSteps"):
        FinetuneJobSpec.model_validate(raw)


def test_crd_checks_the_rule_and_bounds_and_shows_gpus():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert any("gradientAccumulationSteps" in r and "self.resources.nodes" in r for r in rules)
    nodes = schema["properties"]["resources"]["properties"]["nodes"]
    assert (nodes["minimum"], nodes["maximum"]) == (1, 64)
    columns = {col["name"]: col["jsonPath"] for col in version["additionalPrinterColumns"]}
    assert columns["GPUs"] == ".status.gpus"


@pytest.mark.parametrize(("world", "shares"), [
    (World(0, 0, 1), {0: [8, 9, 10, 11]}),
    (World(0, 0, 2), {0: [8, 10], 1: [9, 11]}),
    (World(0, 0, 4), {0: [8], 1: [9], 2: [10], 3: [11]}),
])
def test_ranks_deal_out_the_steps_micro_batches(world, shares):
    got = {r: World(r, r, world.size).micro_batches(step=2, accum=4) for r in range(world.size)}
    assert got == shares
    # Together they are exactly the micro-batches one process would run, each once.
    assert sorted(m for ms in got.values() for m in ms) == [8, 9, 10, 11]


@pytest.mark.parametrize(("codes", "code"), [
    ([c.EXIT_TRANSIENT, c.EXIT_CONFIG_ERROR], c.EXIT_CONFIG_ERROR),  # a configuration error wins
    ([1, c.EXIT_TRANSIENT], 1),
    ([-9], 137),  # killed: as a container reports it
    ([], 1),
])
def test_launch_passes_on_the_exit_code_that_matters(codes, code):
    assert exit_code(codes) == code


def test_pod_runner_maps_the_headless_service_to_this_host():
    ports = {}
    hosts = ServiceHosts("demo-r2", "team-a", lambda svc, port: ports.setdefault((svc, port), 40000 + len(ports)))
    assert hosts("demo-r2-0.demo-r2:29500") == "127.0.0.1:40000"
    assert hosts("demo-r2-1.demo-r2.team-a.svc.cluster.local") == "127.0.0.1"
    assert hosts("demo-r2-0.demo-r20:29500") == "demo-r2-0.demo-r20:29500"  # another Service: untouched
    assert ServiceHosts(None, "team-a", lambda s, p: p)("demo-r2-0.demo-r2:29500") == "demo-r2-0.demo-r2:29500"
