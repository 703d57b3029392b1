"""Paper-layout table of one or more sweeps: Markdown (printed and written), CSV and LaTeX.

    python scripts/make_table.py outputs/multiruns/<timestamp> [more sweep dirs] [--out DIR]

Writes table.md, table.csv, table.tex and jobs.csv (one line per job, failures included) to --out
(default: <first sweep dir>/table/). Failed, incomplete and missing jobs show as such in the table.

Console script: ``sds-table`` (the same as ``python scripts/make_table.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sds_exp.reporting import (
    build_table,
    collect_jobs,
    load_paper_numbers,
    to_markdown,
    write_table,
)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write the table files, print the Markdown; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (multirun) or run directories")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <first>/table)")
    parser.add_argument("--title", default=None, help="table title / LaTeX caption")
    parser.add_argument("--ppl-dataset", default="wikitext2", help="perplexity set: wikitext2 | c4")
    parser.add_argument("--zeroshot-metric", default="acc", help="suite average of: acc | acc_norm")
    parser.add_argument("--stage", default="final", help="stage of the baseline/SDS rows (default: final)")
    parser.add_argument(
        "--paper",
        type=Path,
        default=None,
        help="published-numbers CSV (default: the packaged one)",
    )
    parser.add_argument("--no-paper", action="store_true", help="leave the paper columns n/a")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any job failed or is missing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    jobs = collect_jobs(*args.sweep_dirs)
    paper = [] if args.no_paper else load_paper_numbers(args.paper)
    table = build_table(
        jobs,
        paper,
        ppl_dataset=args.ppl_dataset,
        zeroshot_metric=args.zeroshot_metric,
        stage=args.stage,
    )
    write_table(table, args.out or args.sweep_dirs[0] / "table", title=args.title)
    sys.stdout.write(to_markdown(table, args.title) + "\n")  # the command's output (a pipeable table), not a log
    return 1 if args.strict and table.problems else 0


if __name__ == "__main__":
    sys.exit(main())
