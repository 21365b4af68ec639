"""Bad inputs end in a clear one-line reason and the exit code the operator acts on: 42 for
configuration errors (never retried), 75 for transient ones (retried, resuming). Credentials never
appear in the output."""

from __future__ import annotations

import http.server
import json
import threading
import uuid

import pytest

from finetune_api.spec import S3Spec
from finetune_trainer.cli import main
from finetune_trainer.errors import ConfigError, TransientError
from finetune_trainer.storage.s3 import S3Store
from tests.trainer_fixtures import ALPACA_ROWS, run_job, tiny_gemma, trainer_env, write_jsonl

WRONG_SECRET = "wrong-secret-" + uuid.uuid4().hex


@pytest.fixture
def run(tmp_path, monkeypatch, s3, capsys):
    """Runs `finetune run` on a FinetuneJob built from overrides; returns (exit code, termination JSON, output)."""
    term = tmp_path / "termination-log"
    for k, v in trainer_env(s3, term).items():
        monkeypatch.setenv(k, v)

    def go(bucket: str, *, spec: dict | None = None, command: str = "run"):
        job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "bad"},
               "spec": {"baseModel": {"uri": str(tiny_gemma())},
                        "dataset": {"source": str(write_jsonl(tmp_path / "ok.jsonl", ALPACA_ROWS * 3))},
                        "training": {"maxSteps": 1, "batchSize": 2, "maxSeqLength": 32},
                        "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True}}}}
        for key, value in (spec or {}).items():
            job["spec"][key] = {**job["spec"].get(key, {}), **value}
        code, _, _ = run_job(job, tmp_path, command)
        out = capsys.readouterr()
        lines = term.read_text().splitlines() if term.exists() else []
        assert len(lines) <= 1
        return code, (json.loads(lines[0]) if lines else None), out.out + out.err

    return go


def test_malformed_rows(run, bucket, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"instruction": "a", "output": "b"}', "{not json", '{"instruction": "x"}'])
    code, term, _ = run(bucket, spec={"dataset": {"source": str(bad)}})
    assert code == 42
    assert term["reason"] == "InvalidDataset"
    assert "2 of 3 rows are malformed" in term["message"] and "row 2: not valid JSON" in term["message"]


def test_unknown_quantization_type(run, bucket):
    code, term, _ = run(bucket, spec={"export": {"gguf": ["q4_k_m", "q9_z"]}})
    assert code == 42 and term["reason"] == "UnknownQuantization"
    assert "export.gguf" in term["message"] and "q9_z" in term["message"]


def test_unknown_quantization_type_on_the_export_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "t"))
    code = main(["export-gguf", "--checkpoint-dir", str(tiny_gemma()), "--quantization", "q9_z",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 42
    assert json.loads((tmp_path / "t").read_text())["reason"] == "UnknownQuantization"


def test_missing_bucket_fails_before_any_work(run, tmp_path):
    code, term, _ = run("no-such-bucket-" + uuid.uuid4().hex[:8])
    assert code == 42 and term["reason"] == "BucketNotFound"
    assert not (tmp_path / "work" / "dataset").exists()  # the preflight check came first


def test_wrong_credentials_and_the_secret_never_shows(run, bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    code, term, output = run(bucket)
    assert code == 42 and term["reason"] == "InvalidCredentials"
    assert "SignatureDoesNotMatch" in term["message"]
    assert WRONG_SECRET not in output and WRONG_SECRET not in json.dumps(term)


def test_model_not_found_offline(run, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    code, term, _ = run(bucket, spec={"baseModel": {"name": "nobody/no-such-model", "uri": None}})
    assert code == 42 and term["reason"] == "ModelNotFound"
    assert "nobody/no-such-model" in term["message"] and "offline" in term["message"]


def test_qlora_without_unsloth_and_cuda(run, bucket, monkeypatch):
    monkeypatch.setenv("FINETUNE_BACKEND", "transformers")
    code, term, _ = run(bucket, spec={"training": {"method": "qlora"}, "resources": {"gpus": 1}})
    assert code == 42 and term["reason"] == "UnsupportedMethod"


def test_invalid_spec_and_missing_config(run, bucket, tmp_path, monkeypatch):
    code, term, _ = run(bucket, spec={"training": {"epochs": 1}})  # maxSteps is set too
    assert code == 42 and term["reason"] == "InvalidSpec"
    assert "only one of epochs and maxSteps" in term["message"]
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", "/proc/not-writable")  # ignored, not fatal
    assert main(["run", "--config", str(tmp_path / "absent.yaml")]) == 42


def test_a_compilation_failure_fails_at_once_with_its_reason(run, bucket, monkeypatch):
    """torch.compile failing (as Inductor did on Gemma 2 under Unsloth on an H100) repeats on every try:
    reason CompileFailed, exit 42 (no retry), Inductor's own message kept."""
    from torch._inductor.exc import InductorError

    from finetune_trainer.train import recipe

    def fails(*args, **kwargs):
        raise InductorError(AssertionError("graph node count changed"), None)

    monkeypatch.setattr(recipe, "train", fails)
    code, term, _ = run(bucket)
    assert code == 42 and term["reason"] == "CompileFailed"
    assert term["message"].startswith("torch.compile failed compiling the model (InductorError: AssertionError: "
                                      "graph node count changed)")


def test_a_dataset_server_that_keeps_failing_is_transient(run, bucket, monkeypatch):
    from finetune_trainer.data import sources

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(503)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(sources, "RETRY_BACKOFF_SECONDS", 0.0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.jsonl"
        code, term, _ = run(bucket, spec={"dataset": {"source": url}})
    finally:
        server.shutdown()
    assert code == 75 and term["reason"] == "DatasetUnavailable"


def test_s3_failures_are_classified(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    unreachable = S3Store(S3Spec(bucket="models", endpoint="http://127.0.0.1:9", force_path_style=True),
                          attempts=2, backoff_seconds=0, request_attempts=1)
    with pytest.raises(TransientError) as err:
        unreachable.check_access("s3://models/x/")
    assert err.value.reason == "StorageUnavailable" and err.value.exit_code == 75
    with pytest.raises(ConfigError) as err:
        unreachable.check_access("gs://models/x/")
    assert err.value.reason == "InvalidURI"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError) as err:
        S3Store(S3Spec(bucket="models", endpoint="http://127.0.0.1:9"), request_attempts=1).check_access("s3://models/")
    assert err.value.reason == "MissingCredentials"


def test_an_object_key_that_climbs_out_of_the_prefix_is_refused(tmp_path):
    store = S3Store.__new__(S3Store)  # no client: the listing is the only input
    store.list_keys = lambda uri: ["models/m/config.json", "models/m/../../../escape.txt"]
    fetched = []
    store.download_file = lambda uri, path: fetched.append(path) or path
    with pytest.raises(ConfigError) as err:
        store.download_prefix("s3://b/models/m", tmp_path / "dest")
    assert err.value.reason == "PathNotAllowed" and "escape.txt" in err.value.message
    assert fetched == [tmp_path / "dest" / "config.json"]


def test_an_unknown_eval_task_fails_before_any_work(run, bucket, tmp_path):
    code, term, _ = run(bucket, spec={"evaluation": {"tasks": ["no_such_task_xyz"]}})
    assert code == 42 and term["reason"] == "UnknownTask"
    assert "spec.evaluation.tasks" in term["message"] and "no_such_task_xyz" in term["message"]
    assert not (tmp_path / "work" / "dataset").exists()  # before the data, long before the GPU hours


def test_lora_targets_the_model_lacks_fail_before_any_work(run, bucket, tmp_path):
    code, term, _ = run(bucket, spec={"training": {"lora": {"targetModules": ["q_proj", "qkv_proj"]}}})
    assert code == 42 and term["reason"] == "InvalidSpec"
    assert "spec.training.lora.targetModules" in term["message"] and "qkv_proj" in term["message"]
    assert "q_proj" in term["message"].split("projections:")[1]  # it says what the model has
    assert not (tmp_path / "work" / "dataset").exists()


def test_the_operators_egress_rule_refuses_a_name_resolving_inside(tmp_path, monkeypatch, s3, bucket):
    """With the operator's egress rule in its run config, a dataset URL whose host the operator could
    not judge (0x7f.1) is refused where it resolves, to 127.0.0.1: nothing is fetched."""
    import yaml

    from finetune_api import RunConfig, RunRef
    from finetune_api.egress import EgressPolicy
    from finetune_api.spec import FinetuneJobSpec
    from finetune_trainer.paths import cache_dir
    from finetune_trainer.storage import egress_guard

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    term = tmp_path / "termination-log"
    for k, v in trainer_env(s3, term).items():
        monkeypatch.setenv(k, v)
    s3_port = s3.endpoint.rsplit(":", 1)[1].rstrip("/")
    spec = FinetuneJobSpec.model_validate({
        "baseModel": {"uri": str(tiny_gemma())},
        "dataset": {"source": f"http://0x7f.1:{server.server_address[1]}/latest/meta-data/creds.jsonl"},
        "training": {"maxSteps": 1, "batchSize": 2, "maxSeqLength": 32},
        "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True}}})
    egress = EgressPolicy(allow_http=True, allowed_hosts=[f"127.0.0.1:{s3_port}"],
                          local_path_roots=[f"{cache_dir()}/", f"{tmp_path}/"])
    config = tmp_path / "run.yaml"
    config.write_text(RunConfig.build(spec, RunRef(name="ssrf"), egress).to_yaml())
    assert yaml.safe_load(config.read_text())["egress"]["allowHttp"] is True
    try:
        code = main(["run", "--config", str(config), "--workdir", str(tmp_path / "work")])
    finally:
        egress_guard.uninstall()
        egress_guard.last_denial = None
        server.shutdown()
    doc = json.loads(term.read_text())
    assert code == 42 and doc["reason"] == "EgressDenied", doc
    assert "127.0.0.1" in doc["message"] and hits == []


def test_every_reason_the_code_can_give_is_a_documented_constant():
    """A reason written as a string literal (the trainer's errors, the operator's observations and
    events) must be one of finetune_api.status.Reason, each of which docs/api.md explains."""
    import ast
    from pathlib import Path

    from finetune_api.status import Reason

    root = Path(__file__).resolve().parents[1]
    givers = {"ConfigError", "TransientError", "TrainerError", "_fail", "Observation"}
    found: dict[str, str] = {}
    for path in [*root.glob("trainer-image/finetune_trainer/**/*.py"), *root.glob("operator/finetune_operator/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            args = node.args[1:2] if name == "Observation" else node.args[:1] if name in givers else []
            args += [k.value for k in node.keywords if k.arg == "reason"]
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found[arg.value] = f"{path.relative_to(root)}:{node.lineno}"
    assert len(found) > 20  # the scan sees the trainer's reasons
    unknown = {reason: where for reason, where in found.items() if reason not in set(Reason)}
    assert not unknown, f"reasons missing from finetune_api.status.Reason: {unknown}"
    docs = (root / "docs" / "api.md").read_text()
    assert all(f"| `{r.value}` | {r.doc} |" in docs for r in Reason)


def test_a_run_config_changed_after_the_job_was_made_is_refused(tmp_path, monkeypatch):
    """The Job's pod template carries the SHA-256 of the run config the operator wrote; a ConfigMap
    edited since (here: its egress rule dropped, so nothing would be checked at connect time) is
    refused before anything runs, typed and never retried."""
    import hashlib

    import yaml

    from finetune_api import RunConfig, RunRef, contract
    from finetune_api.egress import EgressPolicy
    from finetune_api.spec import FinetuneJobSpec
    from finetune_trainer.cli import check_config_digest

    spec = FinetuneJobSpec.model_validate({"baseModel": {"name": "tiny/model"}, "dataset": {"source": "tiny/data"},
                                           "output": {"s3": {"bucket": "models"}}})
    written = RunConfig.build(spec, RunRef(name="tampered"), EgressPolicy()).to_yaml()
    config = tmp_path / "run.yaml"
    config.write_text(written)
    term = tmp_path / "termination-log"
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(term))
    monkeypatch.setenv(contract.ENV_CONFIG_SHA256, hashlib.sha256(written.encode()).hexdigest())
    check_config_digest(config)  # the operator's own config passes

    doc = yaml.safe_load(written)
    del doc["egress"]
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    code = main(["run", "--config", str(config), "--workdir", str(tmp_path / "work")])
    term_doc = json.loads(term.read_text().splitlines()[-1])
    assert code == 42 and term_doc["reason"] == "ConfigTampered", term_doc
    assert str(config) in term_doc["message"]
    assert not (tmp_path / "work" / "dataset").exists()
