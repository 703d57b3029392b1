"""Perplexity vs sparsity per method, from a sweep.

For a sweep such as ``python -m sds_exp -m sparsity=0.5,0.6,0.7,0.8 pruner=wanda,sparsegpt``:

    python scripts/plot_sweep.py outputs/multiruns/<timestamp> [--out plot.png]

The points are the cells of scripts/make_table.py (same seeds averaging and baseline rule).

Console script: ``sds-plot`` (the same as ``python scripts/plot_sweep.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sds_exp.reporting import build_table, collect_jobs, plot_sparsity_sweep

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write the plot, print its path; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (multirun) or run directories")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="image path (default: <first>/table/ppl_vs_sparsity.png)",
    )
    parser.add_argument("--ppl-dataset", default="wikitext2", help="perplexity set: wikitext2 | c4")
    parser.add_argument("--stage", default="final", help="stage plotted (default: final)")
    parser.add_argument("--linear", action="store_true", help="linear instead of logarithmic y axis")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    table = build_table(collect_jobs(*args.sweep_dirs), [], ppl_dataset=args.ppl_dataset, stage=args.stage)
    out = args.out or args.sweep_dirs[0] / "table" / "ppl_vs_sparsity.png"
    log.info("wrote %s", plot_sparsity_sweep(table, out, log_y=not args.linear))
    return 0


if __name__ == "__main__":
    sys.exit(main())
