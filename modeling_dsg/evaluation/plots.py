"""The evaluation's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state,
safe in threads and without a display). Each `plot_*` function writes one PNG and returns its path.

    plot_rho_histograms  rho per sequence, one histogram per data set (forget, retain, text), with the tau line
    plot_trigger_rates   horizontal bars: a guardrail's trigger rate per subject, one colour per data set
    plot_tradeoff        forget metric (y) against retain metric (x) for labelled points and curves, so a
                         sweep can draw its dynamic and static curves on the same axes as base and DSG
    plot_curves          labelled curves over one x axis (`dsg results`' relearning attack)
    plot_attack_success  a grid of panels of dilution-attack success against the filler's size, a line per
                         guardrail (`dsg results`' dilution attack)

A figure these do not cover starts with `new_figure` and ends with `save_figure` (tight layout, PNG), so it
has the same size in dots and the same canvas.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

DPI = 120
COLORS = ["#d62728", "#1f77b4", "#7f7f7f", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def new_figure(width: float, height: float):
    """An empty matplotlib `Figure` of `width` x `height` inches at `DPI`, on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> Path:
    """`fig` with a tight layout, as a PNG at `path`; returns the path."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_rho_histograms(
    rho: Mapping[str, Sequence[float]], tau: float, path, *, title: str | None = None, bins: int = 30
) -> Path:
    """Histograms of rho in [0, 1] for each labelled data set (as fractions of that set), and a dashed
    vertical line at tau: sequences to its right fire."""
    import numpy as np

    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    top = max((float(np.max(np.asarray(v, dtype=float))) for v in rho.values() if len(v)), default=1.0)
    if top < 0.5:  # most rho values are small: zoom in so the bars are not squeezed into one bin
        edges = np.linspace(0.0, max(top, tau) * 1.1 + 1e-9, bins + 1)
    for i, (label, values) in enumerate(rho.items()):
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        ax.hist(
            v,
            bins=edges,
            weights=np.full(v.size, 1.0 / v.size),
            alpha=0.55,
            color=COLORS[i % len(COLORS)],
            label=f"{label} (n = {v.size})",
        )
    ax.axvline(tau, color="black", linestyle="--", linewidth=1.2, label=f"tau = {tau:.3f}")
    ax.set_xlabel("rho (fraction of tokens with a selected feature active)")
    ax.set_ylabel("fraction of sequences")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_trigger_rates(rates: Mapping[str, Mapping[str, tuple]], path, *, title: str | None = None) -> Path:
    """Horizontal bars: for each data set (colour) and subject (row), the trigger rate; `rates` is
    {dataset: {subject: (rate, n)}}. Each bar is labelled with its percentage and n."""
    rows = [(dataset, subject, rate, n) for dataset, per in rates.items() for subject, (rate, n) in per.items()]
    fig = new_figure(8.0, max(2.2, 0.28 * len(rows) + 1.2))
    ax = fig.add_subplot()
    colors = {d: COLORS[i % len(COLORS)] for i, d in enumerate(rates)}
    y = list(range(len(rows)))[::-1]
    for yi, (dataset, _, rate, n) in zip(y, rows):
        value = 0.0 if rate is None else float(rate)
        ax.barh(yi, value, color=colors[dataset], label=dataset)
        ax.text(
            min(value, 1.0) + 0.01,
            yi,
            f"{100 * value:.0f}% of {n}" if rate is not None else "n/a",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(y)
    ax.set_yticklabels([subject.replace("_", " ") for _, subject, _, _ in rows], fontsize=7)
    for label, (dataset, *_) in zip(ax.get_yticklabels(), rows):
        label.set_color(colors[dataset])  # zero-rate bars are invisible: the label says whose subject it is
    ax.set_xlim(0, 1.2)
    ax.set_xlabel("trigger rate (fraction of questions on which the guardrail fired)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_tradeoff(
    series: Sequence[Mapping],
    path,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    vlines: Sequence[tuple] = (),
    hlines: Sequence[tuple] = (),
    directions: bool = True,
) -> Path:
    """Forget metric (y) against retain metric (x); with `directions=False` any two metrics, the axis labels as
    given (e.g. `dsg sweep`'s forget score against the fired answers' NLL, where lower x is better).

    `series` is a list of {"label": str, "x": number or list, "y": number or list, optional "annotations":
    [str per point] (e.g. the sweep's N or c), "marker", "color", "scatter": bool}. A series with one point
    (or "scatter": True) is drawn as markers, a longer one as a line through its points (in the given
    order). `vlines` / `hlines` are (value, label) reference lines, e.g. (0.99 * base retain accuracy,
    "99% of base").
    """
    import numpy as np

    fig = new_figure(6.0, 4.8)
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        x = np.atleast_1d(np.asarray(s["x"], dtype=float))
        y = np.atleast_1d(np.asarray(s["y"], dtype=float))
        if x.shape != y.shape:
            raise ValueError(f"series {s.get('label')!r}: x and y have different lengths")
        color = s.get("color", COLORS[i % len(COLORS)])
        marker = s.get("marker", "o")
        if s.get("scatter") and x.size > 1:
            ax.scatter(x, y, s=14, color=color, marker=marker, label=s.get("label"), alpha=0.45, zorder=2)
        elif x.size == 1:
            ax.scatter(x, y, s=60, color=color, marker=marker, label=s.get("label"), zorder=3)
            if not s.get("annotations"):  # a lone point shows its values
                ax.annotate(
                    f"({x[0]:.3g}, {y[0]:.3g})",
                    (x[0], y[0]),
                    textcoords="offset points",
                    xytext=(6, -10),
                    fontsize=7,
                    color=color,
                )
        else:
            ax.plot(x, y, color=color, marker=marker, markersize=4, label=s.get("label"))
        for xi, yi, text in zip(x, y, s.get("annotations") or []):
            ax.annotate(str(text), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for value, label in vlines:
        ax.axvline(value, color="gray", linestyle=":", linewidth=1, label=label)
    for value, label in hlines:
        ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=label)
    if directions:
        xlabel, ylabel = f"{xlabel} (higher: utility kept)", f"{ylabel} (lower: more forgotten)"
    ax.set_xlabel(textwrap.fill(xlabel, 60), fontsize=9)
    ax.set_ylabel(textwrap.fill(ylabel, 45), fontsize=9)
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_curves(
    x: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    path,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
) -> Path:
    """One line with markers per labelled curve, all over the same `x` (e.g. fine-tuning steps)."""
    fig = new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    for label, ys in curves.items():
        ax.plot(x, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_attack_success(
    panels: Sequence[Sequence[Mapping]],
    factors: Sequence[int],
    path,
    *,
    title: str | None = None,
    threshold: float = 0.05,
) -> Path:
    """Dilution-attack success against the filler's size: a grid of panels, `panels[row][column]` =
    {"title": str, "lines": {label: [attack success (or None) per factor]}}. Each line starts at (0, 0)
    (no filler, nothing evaded); x is the filler in times the prompt's length (`factors`, symlog scale);
    a dotted line marks `threshold`. The panels share their axes; the legend is in the first one."""
    factors = list(factors)
    rows, columns = len(panels), len(panels[0])
    fig = new_figure(3.4 * columns, 3.0 * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for row_axes, row in zip(axes, panels):
        for ax, panel in zip(row_axes, row):
            for label, ys in panel["lines"].items():
                ax.plot([0] + factors, [0.0] + [float("nan") if y is None else y for y in ys], marker="o", label=label)
            ax.axhline(threshold, color="gray", linestyle=":", label=f"{100 * threshold:g}%")
            ax.set_title(panel["title"], fontsize=9)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks([0] + factors, [str(f) for f in [0] + factors])
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("filler, times the prompt's length")
    for ax in axes[:, 0]:
        ax.set_ylabel("attack success")
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
