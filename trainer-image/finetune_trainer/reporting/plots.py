"""The loss-curve PNG artifact, drawn from the training log (train-log.jsonl)."""

from __future__ import annotations

import json
import logging
from pathlib import Path


def read_log(path: Path) -> dict[int, dict]:
    """Step → metrics; a step logged twice (re-done after a resume) keeps its latest entry."""
    steps: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                steps[int(entry["step"])] = entry
    return dict(sorted(steps.items()))


def loss_curve(log_file: Path, out_file: Path, eval_loss: float | None = None, title: str = "") -> Path | None:
    try:
        import matplotlib
    except ImportError:  # a plot is a nicety: a minimal environment still trains and exports
        logging.getLogger(__name__).warning("matplotlib is not installed: no loss-curve PNG")
        return None

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    steps = read_log(log_file)
    if not steps:
        return None
    x = list(steps)
    y = [steps[s]["loss"] for s in x]
    window = max(1, len(y) // 20)
    smooth = [sum(y[max(0, i - window + 1): i + 1]) / len(y[max(0, i - window + 1): i + 1]) for i in range(len(y))]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(x, y, color="#9ecae1", linewidth=1, label="loss")
    ax.plot(x, smooth, color="#08519c", linewidth=2, label=f"loss (mean of {window})")
    if eval_loss is not None:
        ax.axhline(eval_loss, color="#e6550d", linestyle="--", label=f"validation loss {eval_loss:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file)
    plt.close(fig)
    return out_file
