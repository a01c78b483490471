"""Tests for dpo/plot.py: the panels and line data of the training figure, and the PNG written from it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from dpo.errors import UserError
from dpo.plot import DPI, FIGSIZE, PlotInputError, _scientific, plot_training_curves, training_figure

REPO = Path(__file__).resolve().parents[1]
BASE_TITLES = ["loss", "reward accuracy", "reward margin", "rewards", "policy log-probs", "learning rate"]
WIN_RATE_TITLE = "win rate against the reference"


def _records(n_steps: int = 20, eval_every: int = 5, win_rate: bool = False) -> list[dict]:
    records = []
    for step in range(1, n_steps + 1):
        records.append({"split": "train", "step": step, "loss": 0.7 * math.exp(-step / 10),
                        "rewards/chosen": 0.05 * step, "rewards/rejected": -0.1 * step,
                        "rewards/accuracies": 0.5 + 0.02 * step, "rewards/margins": 0.15 * step,
                        "logps/chosen": -200.0 - step, "logps/rejected": -210.0 - 2 * step,
                        "lr": 1e-6 * step / n_steps, "grad_norm": 1.0})
        if step % eval_every == 0:
            record = {"split": "eval", "step": step, "loss": 0.8 * math.exp(-step / 15),
                      "rewards/accuracies": 0.5 + 0.01 * step, "rewards/margins": 0.1 * step}
            if win_rate:
                record.update({"generate/win_rate": 0.5 + 0.01 * step, "generate/win_rate_low": 0.4 + 0.01 * step,
                               "generate/win_rate_high": 0.6 + 0.01 * step, "generate/mean_length": 100.0 + step,
                               "generate/reference_mean_length": 90.0})
            records.append(record)
    return records


def _panels(figure) -> dict:
    return {ax.get_title(): ax for ax in figure.axes}


def _line(ax, label: str):
    matches = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(matches) == 1, [line.get_label() for line in ax.get_lines()]
    return matches[0]


def _column(records: list[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    chosen = [r for r in records if r["split"] == split and key in r]
    return [r["step"] for r in chosen], [math.nan if r[key] is None else r[key] for r in chosen]


# ----------------------------------------------------------------------------- the figure


def test_panels_have_titles_axis_labels_and_a_grid():
    figure = training_figure(_records(), title="DPO sigmoid beta 0.1")
    assert [ax.get_title() for ax in figure.axes] == BASE_TITLES
    assert figure.get_suptitle() == "DPO sigmoid beta 0.1"
    assert tuple(figure.get_size_inches()) == FIGSIZE and figure.dpi == DPI
    for ax in figure.axes:
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
        assert any(line.get_visible() for line in ax.get_xgridlines())
    assert training_figure(_records()).get_suptitle() == ""


def test_loss_panel_lines_are_the_train_and_eval_records():
    records = _records()
    loss = _panels(training_figure(records))["loss"]
    train, evals = _line(loss, "train"), _line(loss, "eval")
    steps, values = _column(records, "train", "loss")
    np.testing.assert_array_equal(train.get_xdata(), steps)
    np.testing.assert_allclose(train.get_ydata(), values)
    assert train.get_marker() in (None, "None", "")  # a plain line: 20 points
    eval_steps, eval_values = _column(records, "eval", "loss")
    assert eval_steps == [5, 10, 15, 20]
    np.testing.assert_array_equal(evals.get_xdata(), eval_steps)
    np.testing.assert_allclose(evals.get_ydata(), eval_values)
    assert evals.get_marker() == "o" and evals.get_linestyle() != "None"
    assert loss.get_legend() is not None
    assert {text.get_text() for text in loss.get_legend().get_texts()} == {"train", "eval"}


def test_a_single_eval_point_is_a_visible_marker():
    records = _records(n_steps=6, eval_every=6)
    evals = _line(_panels(training_figure(records))["reward margin"], "eval")
    np.testing.assert_allclose(evals.get_ydata(), [0.6])
    assert evals.get_marker() == "o" and evals.get_markersize() >= 4


def test_records_out_of_order_are_sorted_by_step():
    records = _records()
    loss = _panels(training_figure(list(reversed(records))))["loss"]
    np.testing.assert_array_equal(_line(loss, "train").get_xdata(), range(1, 21))


def test_none_and_non_finite_values_become_gaps():
    records = _records()
    records[3]["loss"] = None                  # train step 4
    records[4]["rewards/margins"] = math.inf   # train step 5 (not JSON, but from a caller it must not break the axis)
    records[5]["loss"] = None                  # the first eval record (step 5)
    figure = training_figure(records)
    panels = _panels(figure)
    train_loss = _line(panels["loss"], "train").get_ydata()
    assert np.isnan(train_loss[3]) and np.isfinite(np.delete(train_loss, 3)).all()
    eval_loss = _line(panels["loss"], "eval").get_ydata()
    assert np.isnan(eval_loss[0]) and np.isfinite(eval_loss[1:]).all()
    margins = _line(panels["reward margin"], "train").get_ydata()
    assert np.isnan(margins[4]) and np.isfinite(np.delete(margins, 4)).all()
    figure.canvas.draw()  # renders without error
    low, high = panels["reward margin"].get_ylim()
    assert math.isfinite(low) and math.isfinite(high) and high < 10


def test_a_finite_train_point_between_gaps_gets_a_marker_and_the_others_none():
    """--on-nan skip leaves the loss missing at every other step: each finite point is on no segment."""
    records = [{"split": "train", "step": s, "loss": None if s % 2 else 0.7 - 0.01 * s} for s in range(1, 9)]
    records += [{"split": "train", "step": 9, "loss": 0.6}]  # step 8 and 9: a segment, no markers
    line = _line(_panels(training_figure(records))["loss"], "train")
    assert line.get_marker() == "o"
    assert line.get_markevery() == [False, True, False, True, False, True, False, False, False]
    whole = _line(_panels(training_figure(_records()))["loss"], "train")
    assert whole.get_marker() in ("None", None, "")  # a line without gaps has no markers


def test_two_metric_panels_show_chosen_and_rejected():
    records = _records()
    panels = _panels(training_figure(records))
    for title, prefix in (("rewards", "rewards"), ("policy log-probs", "logps")):
        for name in ("chosen", "rejected"):
            line = _line(panels[title], f"{name} (train)")
            np.testing.assert_allclose(line.get_ydata(), _column(records, "train", f"{prefix}/{name}")[1])
        assert panels[title].get_legend() is not None


def test_accuracy_axis_is_zero_to_one():
    records = [{"split": "train", "step": s, "rewards/accuracies": 0.5} for s in range(1, 5)]
    assert _panels(training_figure(records))["reward accuracy"].get_ylim() == (0.0, 1.0)


def test_learning_rate_panel_has_the_lr_values_and_scientific_ticks():
    records = _records()
    lr_panel = _panels(training_figure(records))["learning rate"]
    lines = lr_panel.get_lines()
    assert len(lines) == 1 and lines[0].get_label() == "train"  # lr is train-only
    np.testing.assert_allclose(lines[0].get_ydata(), _column(records, "train", "lr")[1])
    assert lr_panel.get_legend() is None  # one line needs no legend
    formatter = lr_panel.yaxis.get_major_formatter()
    assert formatter(2e-5, 0) == "2e-5" and formatter(1.25e-6, 0) == "1.25e-6" and formatter(0.0, 0) == "0"


@pytest.mark.parametrize("value, text", [(5e-7, "5e-7"), (1.5e-5, "1.5e-5"), (3e-4, "3e-4"), (-2e-6, "-2e-6"),
                                         (1.0, "1e0"), (0.0, "0")])
def test_scientific_labels(value, text):
    assert _scientific(value) == text


def test_win_rate_panel_only_with_win_rates_and_its_band_covers_the_interval():
    assert WIN_RATE_TITLE not in _panels(training_figure(_records()))
    records = _records(win_rate=True)
    figure = training_figure(records)
    assert [ax.get_title() for ax in figure.axes] == BASE_TITLES + [WIN_RATE_TITLE, "generated length"]
    panel = _panels(figure)[WIN_RATE_TITLE]
    assert panel.get_ylim() == (0.0, 1.0)
    evals = _line(panel, "eval")
    np.testing.assert_allclose(evals.get_ydata(), _column(records, "eval", "generate/win_rate")[1])
    tie = _line(panel, "tie (0.5)")
    assert tie.get_linestyle() == "--" and set(tie.get_ydata()) == {0.5}
    (band,) = panel.collections
    vertices = np.concatenate([path.vertices for path in band.get_paths()])
    low = _column(records, "eval", "generate/win_rate_low")[1]
    high = _column(records, "eval", "generate/win_rate_high")[1]
    assert vertices[:, 1].min() == pytest.approx(min(low)) and vertices[:, 1].max() == pytest.approx(max(high))
    assert vertices[:, 0].min() == 5 and vertices[:, 0].max() == 20
    # at every eval step, the band spans that step's interval exactly
    for step, lo, hi in zip([5, 10, 15, 20], low, high):
        at_step = vertices[np.isclose(vertices[:, 0], step), 1]
        assert at_step.min() == pytest.approx(lo) and at_step.max() == pytest.approx(hi)
    length = _panels(figure)["generated length"]
    np.testing.assert_allclose(_line(length, "policy (eval)").get_ydata(), [105, 110, 115, 120])
    np.testing.assert_allclose(_line(length, "reference (eval)").get_ydata(), [90] * 4)


def test_a_win_rate_evaluated_once_shows_its_interval_as_a_bar():
    """A band between eval points has no width at a lone point (a run evaluated once, at its end): a bar spans its
    interval there; points with a neighbour keep the band alone."""
    records = _records(n_steps=5, eval_every=5, win_rate=True)
    low = _column(records, "eval", "generate/win_rate_low")[1]
    high = _column(records, "eval", "generate/win_rate_high")[1]
    assert len(low) == 1
    panel = _panels(training_figure(records))[WIN_RATE_TITLE]
    band, bar = panel.collections
    (segment,) = bar.get_segments()
    np.testing.assert_allclose(segment, [[5, low[0]], [5, high[0]]])
    assert len(_panels(training_figure(_records(win_rate=True)))[WIN_RATE_TITLE].collections) == 1


def test_other_splits_are_ignored():
    records = _records()
    noisy = list(records)
    noisy.insert(3, {"split": "alert", "step": 3, "loss": 99.0, "message": "loss spike"})
    noisy.insert(8, {"split": "samples", "text": "no step here", "loss": "not a number"})
    noisy.append({"split": "samples", "step": 20, "rewards/margins": -50.0})
    expected, got = _panels(training_figure(records)), _panels(training_figure(noisy))
    assert list(got) == list(expected)
    for title in expected:
        assert [line.get_label() for line in got[title].get_lines()] == \
            [line.get_label() for line in expected[title].get_lines()]
        for want, have in zip(expected[title].get_lines(), got[title].get_lines()):
            np.testing.assert_array_equal(have.get_xdata(), want.get_xdata())
            np.testing.assert_allclose(have.get_ydata(), want.get_ydata())


def test_a_missing_metric_leaves_its_panel_empty_with_a_note():
    records = [{"split": "train", "step": s, "loss": 0.6} for s in range(1, 4)]
    panels = _panels(training_figure(records))
    assert [t.get_text() for t in panels["loss"].texts] == []
    for title in BASE_TITLES[1:]:
        assert not panels[title].get_lines() and [t.get_text() for t in panels[title].texts] == ["no data"]


def test_a_single_step_gets_integer_ticks_around_it():
    figure = training_figure([{"split": "train", "step": 1, "loss": 0.69}])
    loss = _panels(figure)["loss"]
    assert loss.get_xlim() == (0.0, 2.0)
    assert _line(loss, "train").get_marker() == "o"  # a lone train point is still visible


@pytest.mark.parametrize("records", [[], [{"split": "eval", "step": 1, "loss": 0.5}],
                                     [{"split": "alert", "step": 1}, {"split": "samples", "step": 1}]])
def test_no_train_records_is_a_one_line_user_error(tmp_path: Path, records):
    with pytest.raises(PlotInputError, match="no training curves to plot") as info:
        plot_training_curves(records, tmp_path / "curves.png")
    assert isinstance(info.value, UserError)
    assert "\n" not in str(info.value) and f"none of the {len(records)} metrics records" in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("records, message", [
    (["not a dict"], "metrics record 0: expected a JSON object, got str"),
    ([{"split": "train", "loss": 0.5}], "metrics record 0: field 'step' must be an integer, got None"),
    ([{"split": "train", "step": 1}, {"split": "eval", "step": 1.5}], "metrics record 1: field 'step'"),
    ([{"split": "train", "step": 1, "rewards/margins": "big"}], "metrics record 0: field 'rewards/margins'"),
])
def test_malformed_records_are_user_errors(records, message):
    with pytest.raises(PlotInputError, match=message) as info:
        training_figure(records)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the PNG


def test_png_is_written_at_the_figure_size_and_is_not_blank(tmp_path: Path):
    target = tmp_path / "sub" / "training_curves.png"
    path = plot_training_curves(_records(win_rate=True), str(target), title="run")
    assert path == target and isinstance(path, Path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI)) == (800, 1500)
    colours = np.unique((image[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20
    # the train (tab:blue) and eval (tab:orange) lines are both there
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(colours.astype(int) - rgb).sum(axis=1) <= 3).any(), rgb
    assert sorted(p.name for p in path.parent.iterdir()) == ["training_curves.png"]  # no temporary file left


def test_a_failed_save_keeps_the_previous_png_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch):
    path = plot_training_curves(_records(), tmp_path / "training_curves.png")
    before = path.read_bytes()

    def broken_print_png(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", broken_print_png)
    with pytest.raises(OSError, match="disk full"):
        plot_training_curves(_records(n_steps=40), path, title="second run")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_curves.png"]


def test_importing_and_plotting_leave_pyplot_and_the_backend_alone(tmp_path: Path):
    script = (
        "import sys, matplotlib\n"
        "before = matplotlib.rcParams._get('backend')\n"
        "import dpo.plot\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'importing dpo.plot imported pyplot'\n"
        f"dpo.plot.plot_training_curves([{{'split': 'train', 'step': 1, 'loss': 0.7}}], {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'plotting imported pyplot'\n"
        "assert matplotlib.rcParams._get('backend') == before, matplotlib.rcParams._get('backend')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY")}
    result = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok" and (tmp_path / "c.png").exists()
