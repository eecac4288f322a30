"""The run report's plots: per-step series faint under their moving average; KL on a symlog axis."""
import math

import pytest

from megatron_opd.pipeline.report import series_figure, smooth, smoothing_window


def test_smooth_is_a_centred_moving_average_shrinking_at_the_ends():
    assert smooth([1, 2, 3, 4, 5], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert smooth([2.0, 4.0], 1) == [2.0, 4.0]
    assert smooth([0, 0, 10, 0, 0], 5) == [10 / 3, 2.5, 2.0, 2.5, 10 / 3]
    assert [smoothing_window(n) for n in (5, 9, 19, 100, 500)] == [1, 1, 1, 5, 25]


def test_a_reverse_kl_that_goes_slightly_negative_stays_on_a_symlog_plot():
    # the shape of the main job's MOPD stage: ~1 nat/token falling to about -0.001 once the student matches
    steps = 200
    rows = [{"step": s, "teacher/strings/reverse_kl": math.exp(-s / 20) - 0.0012 + 0.0004 * (-1) ** s}
            for s in range(1, steps + 1)]
    rows += [{"step": s, "teacher/format/reverse_kl": 0.5 * math.exp(-s / 30)} for s in range(1, steps + 1)]
    fig = series_figure([("mopd", rows)], ["teacher/*/reverse_kl"], "reverse KL", "nats / token", yscale="symlog")
    (ax,) = fig.axes
    assert ax.get_yscale() == "symlog"
    lo, hi = ax.get_ylim()
    values = [r["teacher/strings/reverse_kl"] for r in rows if "teacher/strings/reverse_kl" in r]
    assert min(values) < 0 and lo < min(values) and hi > max(values)  # the negative points are on the plot
    faint = [line for line in ax.lines if line.get_alpha() == 0.25]
    smoothed = [line for line in ax.lines if line.get_alpha() is None and len(line.get_xdata()) == steps]
    assert len(faint) == len(smoothed) == 2  # each teacher: every step faint, its moving average over it
    for raw, mean in zip(faint, smoothed):
        assert raw.get_color() == mean.get_color()
        assert list(mean.get_ydata()) == pytest.approx(smooth(list(raw.get_ydata()), smoothing_window(steps)))
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["teacher/format/reverse_kl",
                                                                           "teacher/strings/reverse_kl"]


def test_short_series_are_drawn_as_they_are_and_stages_are_laid_end_to_end():
    a = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 6)]
    b = [{"step": s, "train/loss": 0.1 * s} for s in range(1, 4)]
    fig = series_figure([("sft", a), ("opd", b)], ["train/loss"], "loss", "loss")
    (ax,) = fig.axes
    lines = [line for line in ax.lines if len(line.get_xdata()) > 2]
    assert [list(line.get_xdata()) for line in lines] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert list(lines[0].get_ydata()) == [r["train/loss"] for r in a]  # under 10 points: not smoothed
    assert ax.get_yscale() == "linear" and len(ax.get_legend().get_texts()) == 1
    assert series_figure([("x", a)], ["absent/key"], "t", "y") is None
