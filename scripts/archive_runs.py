#!/usr/bin/env python
"""Copy the record files of sweeps (no weights) where they outlive outputs/, e.g. docs/runs/<name>.

    python scripts/archive_runs.py outputs/multiruns/<sweep> [...] --to docs/runs/<name>

make_table.py and plot_sweep.py read the archive as they read the sweep. The code is
``sds_exp.reporting.archive``.
"""

from __future__ import annotations

import sys

from sds_exp.reporting.archive import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
