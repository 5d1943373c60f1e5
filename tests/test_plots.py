"""The shared pictures: one ROUGE-L histogram (filter's report, inspect's text and plot) and the loss curve."""

from __future__ import annotations

import pytest

from pipeline.plots import ROUGE_L_BINS, draw_histogram, draw_loss, histogram, plot_loss


def test_histogram_bins_are_equal_and_one_falls_in_the_last():
    rows = histogram([0.0, 0.05, 0.1, 0.55, 0.999, 1.0])
    assert len(rows) == ROUGE_L_BINS == 10
    assert rows[0] == (0.0, 0.1, 2) and rows[1] == (0.1, 0.2, 1) and rows[5] == (0.5, 0.6, 1) and rows[-1] == (0.9, 1.0, 2)
    assert sum(count for _, _, count in rows) == 6
    assert histogram([0.0, 0.05, 0.5, 1.0], bins=2) == [(0.0, 0.5, 2), (0.5, 1.0, 2)]


def test_filter_report_and_inspect_count_the_same_bins():
    from pipeline import filter as filter_stage
    from pipeline import inspect as inspect_stage

    scores = [0.12, 0.34, 0.35, 0.71, 1.0]
    report = filter_stage._histogram(scores)
    printed = inspect_stage.histogram(scores)
    assert report["counts"] == [count for _, _, count in printed]
    assert report["edges"] == [low for low, _, _ in printed] + [1.0]


@pytest.fixture
def axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_draw_histogram_draws_one_bar_per_bin(axes):
    draw_histogram(axes, [0.05, 0.95, 0.96])
    heights = [patch.get_height() for patch in axes.patches]
    assert len(heights) == ROUGE_L_BINS and heights[0] == 1 and heights[-1] == 2


def test_draw_loss_says_whether_there_was_anything(axes):
    assert draw_loss(axes, [{"step": 1, "lr": 0.1}]) is False
    assert draw_loss(axes, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}]) is True
    assert [line.get_label() for line in axes.get_lines()] == ["train loss", "validation loss"]


def test_plot_loss_writes_a_png(tmp_path):
    path = tmp_path / "loss.png"
    plot_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
