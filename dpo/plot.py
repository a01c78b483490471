"""Training curves from metrics.jsonl records, drawn with matplotlib: `training_figure` builds the figure (a grid of
loss, reward and learning-rate panels, plus the win rate against the reference when evaluation generated one) and
`plot_training_curves` writes it to a PNG atomically. The figure is drawn on its own Agg canvas and pyplot is never
imported, so importing this module selects no backend, changes no global state and needs no display.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from dpo.errors import UserError
from dpo.files import write_atomically

FIGSIZE = (15.0, 8.0)  # inches: a 1500 x 800 pixel PNG at DPI
DPI = 100
SPLITS = ("train", "eval")  # records of any other split ("alert", "samples", ...) are not curves
SPLIT_COLORS = {"train": "tab:blue", "eval": "tab:orange"}
CHOSEN_COLOR, REJECTED_COLOR = "tab:green", "tab:red"
X_LABEL = "optimizer step"


class PlotInputError(UserError):
    """Metrics records that cannot be plotted: none of split "train", or a malformed step or value."""


@dataclass(frozen=True)
class Panel:
    """One panel of the training curves: its title, axis label, the metrics it draws and how."""

    title: str
    ylabel: str
    # (metric key, name in the legend, colour); a panel of one metric names and colours its lines by split instead
    metrics: tuple[tuple[str, str, str | None], ...]
    splits: tuple[str, ...] = SPLITS
    ylim: tuple[float, float] | None = None
    scientific: bool = False
    band: tuple[str, str] | None = None    # keys of the interval shaded around the (single) metric
    reference: float | None = None          # a dashed horizontal line at this value


PANELS = (
    Panel("loss", "DPO loss", (("loss", "", None),)),
    Panel("reward accuracy", "accuracy", (("rewards/accuracies", "", None),), ylim=(0.0, 1.0)),
    Panel("reward margin", "chosen - rejected reward", (("rewards/margins", "", None),)),
    Panel("rewards", "implicit reward",
          (("rewards/chosen", "chosen", CHOSEN_COLOR), ("rewards/rejected", "rejected", REJECTED_COLOR))),
    Panel("policy log-probs", "log-prob",
          (("logps/chosen", "chosen", CHOSEN_COLOR), ("logps/rejected", "rejected", REJECTED_COLOR))),
    Panel("learning rate", "lr", (("lr", "", None),), splits=("train",), scientific=True),
)
WIN_RATE_PANEL = Panel("win rate against the reference", "win rate", (("generate/win_rate", "", None),),
                       splits=("eval",), ylim=(0.0, 1.0), band=("generate/win_rate_low", "generate/win_rate_high"),
                       reference=0.5)
# Shown beside the win rate when present: a win rate that rises with the length of the answers is length bias.
LENGTH_PANEL = Panel("generated length", "mean length (tokens)",
                     (("generate/mean_length", "policy", "tab:purple"),
                      ("generate/reference_mean_length", "reference", "0.45")), splits=("eval",))


def _records_by_split(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """{split: [(index in records, record)]} for the train and eval records, each list sorted by step."""
    by_split: dict[str, list[tuple[int, dict[str, Any]]]] = {split: [] for split in SPLITS}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise PlotInputError(f"metrics record {index}: expected a JSON object, got {type(record).__name__}")
        if record.get("split") not in by_split:
            continue
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, Integral):
            raise PlotInputError(f"metrics record {index}: field 'step' must be an integer, got {step!r}")
        by_split[record["split"]].append((index, record))
    if not by_split["train"]:
        raise PlotInputError(f"no training curves to plot: none of the {len(records)} metrics records has "
                             f"split 'train'")
    for entries in by_split.values():
        entries.sort(key=lambda entry: entry[1]["step"])
    return by_split


def _series(entries: list[tuple[int, dict[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of metric `key` over the records that have it; None and non-finite values become NaN, which
    matplotlib draws as a gap in the line."""
    steps, values = [], []
    for index, record in entries:
        if key not in record:
            continue
        value = record[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise PlotInputError(f"metrics record {index}: field {key!r} must be a number or null, got {value!r}")
        steps.append(record["step"])
        values.append(np.nan if value is None else float(value))
    values_array = np.array(values, dtype=np.float64)
    values_array[~np.isfinite(values_array)] = np.nan
    return np.array(steps, dtype=np.float64), values_array


def _scientific(value: float, _position: Any = None) -> str:
    """Tick label like '2e-5' or '1.25e-5' (the mantissa without trailing zeros), '0' for zero."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _draw_panel(ax: Axes, panel: Panel, by_split: dict[str, list[tuple[int, dict[str, Any]]]]) -> None:
    ax.set_title(panel.title, fontsize=12)
    ax.set_xlabel(X_LABEL, fontsize=10)
    ax.set_ylabel(panel.ylabel, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    # In a fixed range the values sit on its edges (accuracy 1.0): unclipped, their markers stay whole.
    clip = panel.ylim is None
    has_data = False
    for key, name, color in panel.metrics:
        for split in panel.splits:
            steps, values = _series(by_split[split], key)
            if not steps.size:
                continue
            has_data |= bool(np.isfinite(values).any())
            label = f"{name} ({split})" if name else split
            line_color = color or SPLIT_COLORS[split]
            if split == "train":
                # a finite point between two missing ones (a single step, or --on-nan skip's gaps) is on no segment:
                # it gets a marker
                finite = np.isfinite(values)
                lone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
                ax.plot(steps, values, color=line_color, linewidth=1.6, label=label, clip_on=clip,
                        marker="o" if lone.any() else None, markevery=lone.tolist() if lone.any() else None,
                        markersize=4)
            else:
                ax.plot(steps, values, color=line_color, linewidth=1.0, linestyle="--", marker="o", markersize=5,
                        label=label, clip_on=clip, zorder=3)
            if panel.band is not None:
                low, high = (_series(by_split[split], band_key)[1] for band_key in panel.band)
                ax.fill_between(steps, low, high, color=line_color, alpha=0.2, linewidth=0, label="95% interval")
                # a band has no width at a point without a finite neighbour (a run evaluated once): a bar there
                whole = np.isfinite(low) & np.isfinite(high)
                lone = whole & ~np.r_[False, whole[:-1]] & ~np.r_[whole[1:], False]
                if lone.any():
                    ax.vlines(steps[lone], low[lone], high[lone], color=line_color, alpha=0.35, linewidth=6)
    if panel.reference is not None:
        ax.axhline(panel.reference, color="0.4", linestyle="--", linewidth=1.0, label=f"tie ({panel.reference:g})")
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    if panel.scientific:
        ax.yaxis.set_major_formatter(FuncFormatter(_scientific))
    if not has_data:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.5")
    elif len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(fontsize=8, framealpha=0.8)


def training_figure(records: list[dict[str, Any]], title: str = "") -> Figure:
    """The training curves of metrics.jsonl `records` as a figure (FIGSIZE at DPI, on an Agg canvas).

    Panels, all against the optimizer step: loss, reward accuracy, reward margin, chosen and rejected rewards,
    chosen and rejected log-probs, learning rate, and, when an eval record has them, the win rate against the
    reference (with its 95% interval) and the mean generated length of the policy and the reference. Train is a
    line, eval markers joined by a dashed line; a metric with no value leaves its panel empty with a "no data" note.
    """
    by_split = _records_by_split(records)
    panels = list(PANELS)
    for extra in (WIN_RATE_PANEL, LENGTH_PANEL):
        if any(extra.metrics[0][0] in record for _, record in by_split["eval"]):
            panels.append(extra)
    columns = 3 if len(panels) <= 6 else 4
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, columns)
    first: Axes | None = None
    for position, panel in enumerate(panels):
        ax = figure.add_subplot(grid[position // columns, position % columns], sharex=first)
        first = first or ax
        _draw_panel(ax, panel, by_split)
    steps = [record["step"] for entries in by_split.values() for _, record in entries]
    if max(steps) - min(steps) < 2 and first is not None:
        # too short a range for integer ticks (one step): widen it to the neighbouring steps
        middle = (max(steps) + min(steps)) / 2
        first.set_xlim(middle - 1, middle + 1)
    if title:
        figure.suptitle(title, fontsize=14)
    return figure


def plot_training_curves(records: list[dict[str, Any]], path: Path | str, title: str = "") -> Path:
    """Write `training_figure(records, title)` as a PNG at `path` and return it. The PNG goes to a temporary file
    beside `path` first and is renamed over it, so a crash never leaves a half-written image."""
    path = Path(path)
    figure = training_figure(records, title)
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=DPI))
    return path
