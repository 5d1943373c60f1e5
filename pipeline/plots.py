"""Pictures and counts that several stages draw the same way.

- The loss curve of a training run's `metrics.jsonl` rows: `finetune` saves it as `loss.png`,
  `inspect --run` puts the same picture in its HTML report.
- A preference run's loss and reward accuracy: `dpo` saves it as `loss.png`.
- The histogram of highest ROUGE-L scores (the Self-Instruct paper's Figure 3): `filter`
  writes its counts into the report, `inspect` prints and draws them, all with the same bins.

matplotlib is imported inside the functions that draw: counting needs no plotting library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Ten 0.1-wide bins over [0, 1], as the Self-Instruct paper's Figure 3 draws ROUGE-L.
ROUGE_L_BINS = 10
LOSS_FIGURE_SIZE = (7, 4)  # inches
LOSS_FIGURE_DPI = 100


def histogram(values: list[float], bins: int = ROUGE_L_BINS) -> list[tuple[float, float, int]]:
    """(low, high, count) for equal-width bins over [0, 1]; 1.0 falls in the last bin."""
    # int() truncates toward zero, as astype does; then clipped into the bins.
    index = np.clip((np.asarray(values, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins).tolist()
    return [(round(i / bins, 10), round((i + 1) / bins, 10), count) for i, count in enumerate(counts)]


def draw_histogram(ax, values: list[float], bins: int = ROUGE_L_BINS, **style) -> None:
    """The same bins as `histogram`, as bars on `ax`."""
    rows = histogram(values, bins)
    ax.bar([low for low, _, _ in rows], [count for _, _, count in rows], width=1 / bins, align="edge", **style)
    ax.set_xlim(0, 1)


def draw_loss(ax, history: list[dict]) -> bool:
    """Train and validation loss of `metrics.jsonl` rows on `ax`; False when there is none to draw."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h and "step" in h]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on response tokens")
    if train or val:
        ax.legend()
    ax.grid(alpha=0.3)
    return bool(train or val)


def plot_loss(history: list[dict], path: Path) -> None:
    """`draw_loss` saved as a PNG file (finetune's `loss.png`)."""
    save_run_plot(draw_loss, history, path)


def save_run_plot(draw, history: list[dict], path: Path) -> None:
    """A run's metrics drawn by `draw(ax, history)` and saved as one PNG figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=LOSS_FIGURE_SIZE)
    draw(ax, history)
    fig.tight_layout()
    fig.savefig(path, dpi=LOSS_FIGURE_DPI)
    plt.close(fig)


def draw_preference(ax, history: list[dict]) -> bool:
    """A preference run's `metrics.jsonl` rows: the loss on `ax`, reward accuracy on a second y axis."""
    loss = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    accuracy = [(h["step"], h["reward_accuracy"]) for h in history if "reward_accuracy" in h and "step" in h]
    if loss:
        ax.plot(*zip(*loss), label="loss", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("preference loss")
    ax.grid(alpha=0.3)
    if accuracy:
        right = ax.twinx()
        right.plot(*zip(*accuracy), color="tab:orange", label="reward accuracy", linewidth=1)
        right.set_ylim(0, 1)
        right.set_ylabel("reward accuracy (chosen rewarded above rejected)")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    return bool(loss or accuracy)


def plot_preference(history: list[dict], path: Path) -> None:
    """`draw_preference` saved as a PNG file (dpo's `loss.png`)."""
    save_run_plot(draw_preference, history, path)
