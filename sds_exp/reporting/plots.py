"""Perplexity vs sparsity, one line per method, from a sweep (``-m sparsity=0.5,0.6 ...``).

The points are the cells of :func:`sds_exp.reporting.tables.build_table` (same grouping, seed
averaging and baseline rule), so the plot and the table of a sweep always agree. One panel per
model; N:M rows are their own series (markers without lines); the dense model is a dashed line;
configurations whose jobs gave no number are drawn as red crosses at the top of the panel and
counted in the title. Axes are labelled with what was measured (dataset, stage, windows x window
length), the calibration set and dtype head each panel, the sparsity ticks are percentages, and the
y ticks plain numbers; the y axis is logarithmic only where the values span more than a decade.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sds_exp.reporting.tables import Table, dataset_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Panel", "sparsity_series", "sweep_figure", "plot_sparsity_sweep", "use_log_scale", "y_label"]

log = logging.getLogger(__name__)


@dataclass
class Panel:
    """What one model's panel shows.

    Attributes:
        series: name -> sorted ``(sparsity, mean, std)`` points (std 0 for a single seed).
        structured: names of N:M series (drawn as markers only).
        failed: ``(series name, sparsity, FAILED|INCOMPLETE|MISSING)`` for points without a number.
        dense: the dense model's value, if measured.
    """

    series: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    structured: set[str] = field(default_factory=set)
    failed: list[tuple[str, float, str]] = field(default_factory=list)
    dense: float | None = None


def sparsity_series(table: Table, metric: str | None = None) -> dict[str, Panel]:
    """The plot's data: one :class:`Panel` per model (table order).

    Args:
        table: from ``build_table(collect_jobs(sweep_dir), ...)``.
        metric: a metric name of the table (``wikitext2/ppl``); default its first.

    Raises:
        ValueError: the table has no such metric, or no row with a known sparsity.
    """
    names = [m.name for m in table.metrics]
    metric = metric or names[0]
    if metric not in names:
        raise ValueError(f"metric {metric!r} not in the table; available: {names}")
    rows = [r for r in table.rows if r.kind != "dense" and r.sparsity is not None]
    if not rows:
        raise ValueError("no baseline or SDS row with a known sparsity to plot")
    dense = next(r for r in table.rows if r.kind == "dense")
    panels = {}
    for model in table.models:
        panel = Panel()
        for row in rows:
            cell = row.cells.get((model, metric))
            if cell is None:
                continue
            name = (
                row.label
                + (f" ({row.pattern})" if row.structured else "")
                + (" (prune stage of SDS)" if cell.derived else "")
            )
            if row.structured:
                panel.structured.add(name)
            if cell.mean is None:
                if cell.problem:
                    panel.failed.append((name, row.sparsity, cell.problem))
                continue
            panel.series.setdefault(name, []).append((row.sparsity, cell.mean, cell.std or 0.0))
        for points in panel.series.values():
            points.sort()
        dense_cell = dense.cells.get((model, metric))
        panel.dense = dense_cell.mean if dense_cell is not None else None
        panels[model] = panel
    return panels


def _plain(value: float, _pos: object = None) -> str:
    """A tick label without offset or scientific notation: ``50,665``, ``27.5``, ``0.5``."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.6g}"


def _percent(value: float, _pos: object = None) -> str:
    return f"{100 * value:.4g}%"


def _panel_protocol(table: Table, model: str, metric: str) -> dict[str, str]:
    """The protocol fields of one panel's cells, field -> value (several values joined by "/")."""
    values: dict[str, list[str]] = {}
    for row in table.rows:
        cell = row.cells.get((model, metric))
        for proto in cell.protocols if cell is not None else []:
            for name, value in proto.items():
                if value not in values.setdefault(name, []):
                    values[name].append(value)
    return {name: "/".join(vals) for name, vals in values.items()}


def use_log_scale(values: list[float], log_y: bool = True) -> bool:
    """Log y only when asked for and the (positive) values span more than a decade."""
    positive = [v for v in values if v > 0]
    return bool(log_y and positive and len(positive) == len(values) and max(positive) > 10 * min(positive))


def y_label(table: Table, metric: str, protocol: dict[str, str]) -> str:
    """``WikiText2 test perplexity (final stage)`` and, below, ``148 windows of 2048 tokens``."""
    label = next(m.label for m in table.metrics if m.name == metric)
    if metric.endswith("/ppl"):
        text = f"{dataset_name(metric[: -len('/ppl')])} perplexity ({table.stage} stage)"
        if "eval seqlen" in protocol:
            windows = f"{protocol['windows']} windows" if "windows" in protocol else "windows"
            text += f"\n{windows} of {protocol['eval seqlen']} tokens"
        return text
    return f"{label} (suite average, {table.stage} stage)"


def sweep_figure(table: Table, metric: str | None = None, log_y: bool = True) -> Figure:
    """The figure of :func:`plot_sparsity_sweep`, not saved (inspect it, or save it in any format).

    One panel per model: ``metric`` against the target sparsity (x ticks at the swept sparsities, in
    percent), the protocol in the y label (dataset, stage, windows x window length) and the
    calibration set and dtype in the title; tick labels are plain numbers (no offset, no
    ``x10^4``). The y axis is logarithmic only when ``log_y`` and the panel's values span more than a
    decade.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    metric = metric or table.metrics[0].name
    panels = sparsity_series(table, metric)
    fig = Figure(figsize=(5.5 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (model, panel) in zip(axes, panels.items(), strict=True):
        protocol = _panel_protocol(table, model, metric)
        values: list[float] = []
        for name, points in panel.series.items():
            xs, ys, es = zip(*points, strict=True)
            values += list(ys)
            ax.errorbar(
                xs,
                ys,
                yerr=es if any(es) else None,
                fmt="o" if name in panel.structured else "o-",
                capsize=3,
                label=name,
            )
        if panel.dense is not None:
            values.append(panel.dense)
            ax.axhline(panel.dense, color="gray", linestyle="--", label="Dense")
        if panel.failed:
            ax.plot(
                [x for _, x, _ in panel.failed],
                [0.97] * len(panel.failed),
                "x",
                color="red",
                markersize=9,
                transform=ax.get_xaxis_transform(),
                label="failed / missing",
                clip_on=False,
            )
        sparsities = sorted({x for pts in panel.series.values() for x, _, _ in pts} | {x for _, x, _ in panel.failed})
        ax.xaxis.set_major_locator(FixedLocator(sparsities))
        ax.xaxis.set_major_formatter(FuncFormatter(_percent))
        if use_log_scale(values, log_y):
            ax.set_yscale("log")
            decades = math.log10(max(values) / min(values))
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.set_xlabel("sparsity (share of weights zeroed per linear layer)")
        ax.set_ylabel(y_label(table, metric, protocol))
        title = table.model_names.get(model, model)
        if panel.failed:
            title += f"  ({len(panel.failed)} without result)"
        setup = [f"calibration {protocol['calibration']}"] if "calibration" in protocol else []
        setup += [protocol["dtype"]] if "dtype" in protocol else []
        ax.set_title(title + ("\n" + ", ".join(setup) if setup else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sparsity_sweep(table: Table, path: str | Path, metric: str | None = None, log_y: bool = True) -> Path:
    """Plot ``metric`` (default: the table's perplexity) against the target sparsity.

    Args:
        table: from ``build_table(collect_jobs(sweep_dir), ...)``.
        path: output image (``.png``, ``.pdf``, ``.svg``).
        metric: a metric name of the table (``wikitext2/ppl``); default its first.
        log_y: allow a logarithmic y axis, used where a panel's values span more than a decade
            (perplexity grows by orders of magnitude at high sparsity); False: always linear.

    Returns:
        The written path. :func:`sweep_figure` builds the same figure without writing it.
    """
    fig = sweep_figure(table, metric, log_y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    log.info("wrote %s", path)
    return path
