#!/usr/bin/env python
"""Perplexity vs sparsity per method, from a sweep.

For a sweep such as ``python -m sds_exp -m sparsity=0.5,0.6,0.7,0.8 pruner=wanda,sparsegpt``:

    python scripts/plot_sweep.py outputs/multiruns/<timestamp> [--out plot.png]

The points are the cells of scripts/make_table.py (same seeds averaging and baseline rule).

The same as the console script ``sds-plot``; the code is ``sds_exp.reporting.plot_cli``.
"""

from __future__ import annotations

import sys

from sds_exp.reporting.plot_cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
