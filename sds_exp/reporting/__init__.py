"""Tables and plots from sweep directories: collect (job dirs -> records), tables, plots."""

from __future__ import annotations

from sds_exp.reporting.collect import JobRecord, collect_jobs, describe_jobs
from sds_exp.reporting.paper import PAPER_NUMBERS, PaperNumber, load_paper_numbers
from sds_exp.reporting.plots import plot_sparsity_sweep, sparsity_series
from sds_exp.reporting.tables import Table, build_table, to_csv, to_latex, to_markdown, write_table

__all__ = [
    "JobRecord",
    "collect_jobs",
    "describe_jobs",
    "PAPER_NUMBERS",
    "PaperNumber",
    "load_paper_numbers",
    "Table",
    "build_table",
    "to_markdown",
    "to_csv",
    "to_latex",
    "write_table",
    "plot_sparsity_sweep",
    "sparsity_series",
]
