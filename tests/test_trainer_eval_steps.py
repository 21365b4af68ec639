"""training.evalEverySteps on the tiny Gemma 3 (CPU): the recipe computes the validation loss every N
steps and after training, reports each with its step, and leaves training exactly as it was (the model
goes back to train mode: with LoRA dropout on, a model left in eval mode would train a different curve)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from finetune_api.spec import DatasetSpec, TrainingSpec
from finetune_trainer.data import chat_templates
from finetune_trainer.data.prepare import prepare
from finetune_trainer.paths import Workdir
from finetune_trainer.reporting.progress import Reporter
from finetune_trainer.train import recipe
from finetune_trainer.train.checkpoints import Checkpoints
from finetune_trainer.train.model_loading import BaseModel, load_tokenizer
from tests.trainer_fixtures import ALPACA_ROWS, tiny_gemma, write_jsonl

STEPS = 5


class RecordingReporter(Reporter):
    """Keeps every step's metrics and every eval loss the recipe hands over (no status to patch)."""

    def __init__(self):
        super().__init__(interval=1000)
        self.steps: list[dict] = []
        self.final: list[tuple[int, float | None]] = []

    def train_step(self, step, total_steps, metrics):
        self.steps.append({"step": step, **metrics})
        super().train_step(step, total_steps, metrics)

    def eval_loss(self, step, loss):
        self.final.append((step, loss))
        super().eval_loss(step, loss)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-steps")
    data = write_jsonl(root / "data.jsonl", ALPACA_ROWS * 5)
    base = BaseModel(str(tiny_gemma()))
    tokenizer = load_tokenizer(base)
    dataset = DatasetSpec(source=str(data), validation_split=0.2)
    # A high learning rate and LoRA dropout: the eval loss moves between evals, and train mode matters.
    training = TrainingSpec(max_steps=STEPS, batch_size=4, max_seq_length=64, learning_rate=5e-3,
                            lora={"dropout": 0.1})
    prepare(dataset, training, tokenizer, chat_templates.resolve("auto", tokenizer), root / "dataset",
            parity_samples=4)
    return SimpleNamespace(root=root, base=base, dataset=root / "dataset", training=training)


def train(prepared, name: str, **update):
    wd = Workdir(prepared.root / name).ensure()
    reporter = RecordingReporter()
    result = recipe.train(prepared.base, prepared.training.model_copy(update=update), prepared.dataset, wd,
                          reporter, Checkpoints(wd.checkpoints))
    return result, reporter


@pytest.fixture(scope="module")
def runs(prepared):
    return SimpleNamespace(plain=train(prepared, "plain"), every2=train(prepared, "every2", eval_every_steps=2))


def test_the_validation_loss_is_computed_every_n_steps_and_after_training(runs):
    result, reporter = runs.every2
    evals = [(s["step"], s["evalLoss"]) for s in reporter.steps if "evalLoss" in s]
    assert [step for step, _ in evals] == [2, 4]  # step 5 is the last: the evaluation after training covers it
    assert reporter.final == [(STEPS, result.eval_loss)]
    losses = [loss for _, loss in evals] + [result.eval_loss]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert len(set(losses)) == 3  # each evaluated the weights of its step
    progress = reporter.progress
    assert (progress.eval_step, progress.eval_loss) == (STEPS, round(result.eval_loss, 5))


def test_evaluating_leaves_training_as_it_was(runs):
    """The same seed with and without evalEverySteps: the same training losses step by step and the same
    final validation loss, so the periodic evaluation put the model back in train mode (dropout on)."""
    (plain, plain_reporter), (every2, every2_reporter) = runs.plain, runs.every2
    assert not [s for s in plain_reporter.steps if "evalLoss" in s]  # unset: only after training
    assert [s["loss"] for s in every2_reporter.steps] == pytest.approx([s["loss"] for s in plain_reporter.steps],
                                                                       rel=1e-5)
    assert every2.eval_loss == pytest.approx(plain.eval_loss, rel=1e-5)
    assert plain_reporter.final == [(STEPS, plain.eval_loss)]


def test_a_model_left_in_eval_mode_would_train_differently(prepared, runs, monkeypatch):
    """The check above can fail: an evaluation that forgot model.train() changes the curve after step 2."""
    evaluate = recipe.evaluate

    def stays_in_eval_mode(model, batches, device, head=None):
        loss = evaluate(model, batches, device, head)
        model.eval()
        return loss

    monkeypatch.setattr(recipe, "evaluate", stays_in_eval_mode)
    _, broken = train(prepared, "broken", eval_every_steps=2)
    plain = [s["loss"] for s in runs.plain[1].steps]
    assert [s["loss"] for s in broken.steps][:2] == pytest.approx(plain[:2], rel=1e-5)
    assert [s["loss"] for s in broken.steps][2:] != pytest.approx(plain[2:], rel=1e-5)
