"""Perplexity vs sparsity, one line per method, from a sweep (``-m sparsity=0.5,0.6 ...``).

The points are the cells of :func:`sds_exp.reporting.tables.build_table` (same grouping, seed
averaging and baseline rule), so the plot and the table of a sweep always agree. One panel per
model; N:M rows are their own series (markers without lines); the dense model is a dashed line;
configurations whose jobs gave no number are drawn as red crosses at the top of the panel and
counted in the title.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sds_exp.reporting.tables import Table

__all__ = ["Panel", "sparsity_series", "plot_sparsity_sweep"]

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


def plot_sparsity_sweep(
    table: Table, path: str | Path, metric: str | None = None, log_y: bool = True
) -> Path:
    """Plot ``metric`` (default: the table's perplexity) against the target sparsity.

    Args:
        table: from ``build_table(collect_jobs(sweep_dir), ...)``.
        path: output image (``.png``, ``.pdf``, ``.svg``).
        metric: a metric name of the table (``wikitext2/ppl``); default its first.
        log_y: logarithmic y axis (perplexity grows by orders of magnitude at high sparsity).

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    metric = metric or table.metrics[0].name
    panels = sparsity_series(table, metric)
    label = next(m.label for m in table.metrics if m.name == metric)
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (model, panel) in zip(axes, panels.items(), strict=True):
        for name, points in panel.series.items():
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(
                xs,
                ys,
                yerr=es if any(es) else None,
                fmt="o" if name in panel.structured else "o-",
                capsize=3,
                label=name,
            )
        if panel.dense is not None:
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
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("sparsity (fraction of weights zeroed)")
        ax.set_ylabel(f"{table.stage} {metric.split('/')[0]} {label}")
        title = table.model_names.get(model, model)
        ax.set_title(title + (f"  ({len(panel.failed)} without result)" if panel.failed else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log.info("wrote %s", path)
    return path
