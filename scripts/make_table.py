#!/usr/bin/env python
"""Paper-layout table of one or more sweeps: Markdown (printed and written), CSV and LaTeX.

    python scripts/make_table.py outputs/multiruns/<timestamp> [more sweep dirs] [--out DIR]

Writes table.md, table.csv, table.tex and jobs.csv (one line per job, failures included) to --out
(default: <first sweep dir>/table/). Failed, incomplete and missing jobs show as such in the table.

The same as the console script ``sds-table``; the code is ``sds_exp.reporting.table_cli``.
"""

from __future__ import annotations

import sys

from sds_exp.reporting.table_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
