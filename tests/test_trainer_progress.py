"""Progress reporting: the throttled Reporter, and status patches against an HTTPS fake apiserver with
the trainer's real kubernetes client (token and CA from a service-account folder)."""

from __future__ import annotations

import json
import threading

import pytest

from finetune_trainer.reporting.kube_status import JSON_PATCH, BackgroundPatcher, StatusPatcher
from finetune_trainer.reporting.progress import JsonlLogger, Reporter, StatusLogger
from tests.trainer_fixtures import FakeApiServer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingPatcher:
    def __init__(self):
        self.patches: list[dict] = []

    def patch(self, **fields):
        self.patches.append(fields)
        return True


def step_metrics(loss: float) -> dict:
    return {"loss": loss, "learningRate": 1e-4, "epoch": 0.5, "tokensPerSecond": 1000.0, "etaSeconds": 12}


def test_reporter_throttles_steps_but_not_stage_changes_or_the_end(tmp_path):
    clock, patcher = FakeClock(), RecordingPatcher()
    log_file = tmp_path / "log.jsonl"
    reporter = Reporter(run=3, patcher=patcher, interval=5, metric_loggers=[JsonlLogger(log_file)], clock=clock)
    reporter.stage("Preparing")
    reporter.stage("Training")
    assert [p["progress"]["stage"] for p in patcher.patches] == ["Preparing", "Training"]

    for step in range(1, 11):  # one step a second: at most one patch per 5 s, plus the last step
        clock.now += 1
        reporter.train_step(step, 10, step_metrics(10.0 - step))
    steps = [p["progress"]["step"] for p in patcher.patches[2:]]
    assert steps == [5, 10]
    last = patcher.patches[-1]["progress"]
    assert last["totalSteps"] == 10 and last["percent"] == 100 and last["run"] == 3
    assert last["loss"] == pytest.approx(sum(10.0 - s for s in range(6, 11)) / 5)  # smoothed since the last report
    assert [json.loads(line)["step"] for line in log_file.read_text().splitlines()] == list(range(1, 11))

    from finetune_api.status import Artifact

    art = Artifact(name="manifest.json", kind="manifest", uri="s3://b/m.json", size_bytes=3, sha256="ab")
    reporter.finish({"trainLoss": 1.0}, [art])
    final = patcher.patches[-1]
    assert final["metrics"] == {"trainLoss": 1.0}
    assert final["artifacts"] == [{"name": "manifest.json", "kind": "manifest", "uri": "s3://b/m.json",
                                   "sizeBytes": 3, "sha256": "ab"}]


def test_a_resume_that_finds_every_step_done_still_reports_the_step():
    """A pod killed after the last checkpoint resumes with no step left to train: the status must still say
    step N of N (it once said nothing, and a finished run looked like it had never trained)."""
    patcher = RecordingPatcher()
    reporter = Reporter(run=2, patcher=patcher, interval=5, clock=FakeClock())
    reporter.stage("Training")
    reporter.start_training(8, 8, restarts=1, last_loss=0.75)
    reporter.stage("Exporting")
    progress = patcher.patches[-1]["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (8, 8, 100)
    assert progress["restarts"] == 1 and progress["loss"] == 0.75 and progress["stage"] == "Exporting"


def test_a_new_eval_loss_is_sent_at_once_with_its_step():
    """training.evalEverySteps: the steps that evaluated carry evalLoss; the reporter sends those at once
    (a sweep's median rule compares them), keeps the latest in every later report, and the loss after
    training is sent the same way."""
    clock, patcher = FakeClock(), RecordingPatcher()
    reporter = Reporter(run=1, patcher=patcher, interval=1000, clock=clock)
    reporter.stage("Training")
    for step in range(1, 6):
        clock.now += 1
        reporter.train_step(step, 6, step_metrics(3.0) | ({"evalLoss": 2.0 / step} if step % 2 == 0 else {}))
    sent = [p["progress"] for p in patcher.patches[1:]]
    assert [(p["step"], p["evalStep"], p["evalLoss"]) for p in sent] == [(2, 2, 1.0), (4, 4, 0.5)]
    assert sent[0]["loss"] == 3.0  # the training loss goes along, smoothed as ever
    clock.now += 1
    reporter.train_step(6, 6, step_metrics(3.0))  # the last step: sent, with the eval point of step 4
    assert (patcher.patches[-1]["progress"]["step"], patcher.patches[-1]["progress"]["evalStep"]) == (6, 4)
    reporter.eval_loss(6, None)  # no validation rows: nothing to send
    assert len(patcher.patches) == 4
    reporter.eval_loss(6, 0.4321)
    assert {k: patcher.patches[-1]["progress"][k] for k in ("step", "evalStep", "evalLoss")} == {
        "step": 6, "evalStep": 6, "evalLoss": 0.4321}


def test_every_step_goes_through_the_metric_loggers_and_a_failing_one_is_skipped():
    """The status is one metric logger among the others (torchtune's interface): each gets every step with
    its total; a logger that fails (a full disk) is skipped, and the others, the status included, go on."""
    class Recording:
        def __init__(self):
            self.seen = []

        def log(self, step, metrics):
            self.seen.append((step, metrics["totalSteps"], metrics["loss"]))

    class FullDisk:
        def log(self, step, metrics):
            if step == 2:
                raise OSError(28, "No space left on device")

    recording, patcher = Recording(), RecordingPatcher()
    reporter = Reporter(run=1, patcher=patcher, interval=0, metric_loggers=[FullDisk(), recording])
    for step in (1, 2, 3):
        reporter.train_step(step, 3, step_metrics(1.0 / step))
    assert recording.seen == [(1, 3, 1.0), (2, 3, 0.5), (3, 3, pytest.approx(1 / 3))]
    assert [p["progress"]["step"] for p in patcher.patches] == [1, 2, 3]


def test_the_status_logger_alone_throttles_like_any_metric_logger():
    clock, patcher = FakeClock(), RecordingPatcher()
    status = StatusLogger(run=5, patcher=patcher, interval=5, clock=clock)
    for step in range(1, 5):
        clock.now += 1
        status.log(step, step_metrics(2.0) | {"totalSteps": 4})
    assert [(p["progress"]["step"], p["progress"]["run"]) for p in patcher.patches] == [(1, 5), (4, 5)]
    assert patcher.patches[-1]["progress"]["percent"] == 100


@pytest.fixture
def apiserver(tmp_path):
    server = FakeApiServer(tmp_path).start()
    yield server
    server.stop()


def test_status_patch_is_a_guarded_json_patch_with_the_service_account_token(apiserver, monkeypatch):
    for k, v in apiserver.env("tiny", namespace="team-a", run=2).items():
        monkeypatch.setenv(k, v)
    patcher = StatusPatcher.from_env()
    assert patcher is not None
    assert patcher.patch(progress={"stage": "Training", "step": 1})
    (req,) = apiserver.requests
    assert req["path"] == "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tiny/status"
    assert req["headers"]["content-type"] == JSON_PATCH
    assert req["headers"]["authorization"] == "Bearer sa-token-1"
    assert req["body"][0] == {"op": "test", "path": "/status/run", "value": 2}
    assert req["body"][1] == {"op": "add", "path": "/status/progress", "value": {"stage": "Training", "step": 1}}

    # A rotated projected token is picked up on the next request.
    (apiserver.sa_dir / "token").write_text("sa-token-2")
    patcher.patch(progress={"step": 2})
    assert apiserver.requests[-1]["headers"]["authorization"] == "Bearer sa-token-2"


def test_a_newer_run_stops_reporting_and_errors_never_raise(apiserver, monkeypatch, caplog):
    for k, v in apiserver.env("tiny").items():
        monkeypatch.setenv(k, v)
    patcher = StatusPatcher.from_env()
    apiserver.responses = [500, 422]
    assert patcher.patch(progress={"step": 1}) is False  # a server error: logged, still enabled
    assert patcher.enabled
    assert patcher.patch(progress={"step": 2}) is False  # the test op failed: a newer run owns the status
    assert not patcher.enabled
    assert patcher.patch(progress={"step": 3}) is False
    assert len(apiserver.requests) == 2
    assert "belongs to another run" in caplog.text

    apiserver.stop()  # the apiserver goes away: reporting fails quietly
    down = StatusPatcher.from_env()
    down.timeout = 2
    assert down.patch(progress={"step": 4}) is False


def test_no_job_env_means_no_status_reporting(monkeypatch):
    for k in ("FINETUNE_JOB_NAME", "FINETUNE_JOB_NAMESPACE", "FINETUNE_RUN"):
        monkeypatch.delenv(k, raising=False)
    assert StatusPatcher.from_env() is None
    assert Reporter.from_env(run=1).patcher is None


class StuckPatcher(RecordingPatcher):
    """An apiserver that does not answer until released: each patch waits for the gate."""

    def __init__(self):
        super().__init__()
        self.run, self.enabled = 1, True
        self.gate, self.entered = threading.Event(), threading.Event()

    def patch(self, **fields):
        self.entered.set()
        assert self.gate.wait(30)
        if fields.get("progress", {}).get("message") == "step 3/8":
            raise RuntimeError("a bug in a patch must not stop the sender")
        return super().patch(**fields)


def run_with_deadline(fn, seconds=20.0):
    """Runs fn on a thread; True when it returned within the deadline (a stuck patch would block it)."""
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()


def test_a_stuck_apiserver_never_blocks_training_and_the_newest_progress_wins():
    inner = StuckPatcher()
    reporter = Reporter(run=1, patcher=BackgroundPatcher(inner), interval=0)
    reporter.stage("Training")
    assert inner.entered.wait(10)  # the first patch is in flight, and stuck

    def train():
        for step in range(1, 9):  # every step is due a patch (interval 0)
            reporter.train_step(step, 8, step_metrics(1.0 / step))

    assert run_with_deadline(train), "a training step waited for the apiserver"
    assert inner.patches == []  # nothing has got through yet
    inner.gate.set()
    assert reporter.patcher.flush(10)
    # The stuck stage patch, then only the newest progress: each patch carries the whole progress.
    assert [p["progress"].get("step") for p in inner.patches] == [None, 8]
    assert inner.patches[-1]["progress"]["percent"] == 100

    reporter.train_step(3, 8, step_metrics(1.0))  # this patch raises inside the sender ...
    assert reporter.patcher.flush(10)
    reporter.stage("Exporting")  # ... which keeps sending
    assert reporter.patcher.flush(10)
    assert inner.patches[-1]["progress"]["stage"] == "Exporting"


def test_stage_changes_behind_a_stuck_patch_all_arrive_in_order():
    """Step patches coalesce, milestones do not: a `kubectl get -w` sees every stage and its message (a
    cache hit's "reused the adapter of ..." is followed at once by the next stage) even when the apiserver
    was slow when they were made."""
    inner = StuckPatcher()
    reporter = Reporter(run=1, patcher=BackgroundPatcher(inner), interval=0)
    reporter.stage("Training")
    assert inner.entered.wait(10)
    reporter.stage("Training", "reused the adapter of cached run 2 (training cache hit)")
    reporter.message("checking the adapter")  # a plain update: the next milestone carries newer progress
    reporter.stage("Exporting")
    inner.gate.set()
    assert reporter.patcher.flush(10)
    assert [(p["progress"]["stage"], p["progress"]["message"]) for p in inner.patches] == [
        ("Training", "Training"), ("Training", "reused the adapter of cached run 2 (training cache hit)"),
        ("Exporting", "Exporting")]
    reporter.close()


def test_the_completion_report_goes_after_the_patch_in_flight_and_close_delivers_the_last():
    from finetune_api.status import Artifact

    inner = StuckPatcher()
    reporter = Reporter(run=1, patcher=BackgroundPatcher(inner), interval=0)
    reporter.stage("Uploading", "manifest.json")
    assert inner.entered.wait(10)
    reporter.message("uploading adapter")  # waits behind the stuck one; the report will supersede it
    art = Artifact(name="manifest.json", kind="manifest", uri="s3://b/m.json", size_bytes=3, sha256="ab")
    finished = threading.Thread(target=reporter.finish, args=({"trainLoss": 1.0}, [art]), daemon=True)
    finished.start()
    finished.join(0.5)
    assert finished.is_alive()  # the report waits for the patch in flight ...
    inner.gate.set()
    finished.join(10)
    assert not finished.is_alive()
    sent = [(p["progress"]["message"], "metrics" in p) for p in inner.patches]
    assert sent == [("manifest.json", False), ("done", True)]  # ... and the waiting one is dropped

    reporter.stage("Failed?")  # anything after: close() delivers it before the process goes
    reporter.close()
    assert inner.patches[-1]["progress"]["stage"] == "Failed?"
    assert not reporter.patcher.patch(progress={}) and not reporter.patcher._thread.is_alive()  # closed for good


def test_a_pod_reports_from_the_background_to_the_apiserver(apiserver, monkeypatch):
    for k, v in apiserver.env("tiny", namespace="team-a", run=4).items():
        monkeypatch.setenv(k, v)
    reporter = Reporter.from_env(interval=0)
    assert isinstance(reporter.patcher, BackgroundPatcher) and reporter.run == 4
    reporter.stage("Training", "lora")
    reporter.close()
    assert apiserver.requests[-1]["body"][1]["value"]["stage"] == "Training"
    assert apiserver.requests[-1]["body"][0] == {"op": "test", "path": "/status/run", "value": 4}
