"""The Evaluating phase's progress: requests done/total and an ETA reach the status like training's."""

from __future__ import annotations

from finetune_trainer.evaluation.runner import eta_seconds
from finetune_trainer.reporting.progress import Reporter


class RecordingPatcher:
    def __init__(self):
        self.patches: list[dict] = []

    def patch(self, **fields):
        self.patches.append(fields)
        return True


def test_eta_is_the_rest_of_this_pass_plus_one_pass_per_model_to_come():
    assert eta_seconds(30.0, 100, 400) == 90
    assert eta_seconds(30.0, 100, 400, models_after=2) == 90 + 2 * 120
    assert eta_seconds(5.0, 0, 400) is None and eta_seconds(5.0, 3, 0) is None


def test_work_progress_sets_percent_and_eta_in_the_status():
    now = [0.0]
    patcher = RecordingPatcher()
    reporter = Reporter(run=1, patcher=patcher, interval=5, clock=lambda: now[0])
    reporter.stage("Evaluating", "lm-eval: piqa")
    now[0] += 6
    reporter.work("evaluating q4_k_m: loglikelihood requests 1200/3676, ETA 2m10s", 32.6, 130)
    now[0] += 1
    reporter.work("evaluating q4_k_m: loglikelihood requests 1300/3676, ETA 2m00s", 35.4, 120)  # throttled
    now[0] += 1
    reporter.work("evaluation done in 190.0 s", 100.0, 0)  # the end is never throttled
    sent = [p["progress"] for p in patcher.patches]
    assert [p["stage"] for p in sent] == ["Evaluating"] * 3
    assert (sent[1]["percent"], sent[1]["etaSeconds"]) == (32, 130)
    assert sent[1]["message"].endswith("requests 1200/3676, ETA 2m10s")
    assert (sent[2]["percent"], sent[2]["etaSeconds"], sent[2]["message"]) == (100, 0, "evaluation done in 190.0 s")
