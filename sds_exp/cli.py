"""Console scripts (``[project.scripts]`` in pyproject.toml).

* ``sds-exp``: the Hydra job, the same as ``python -m sds_exp`` (``sds-exp --help``, ``sds-exp --hydra-help``;
  tab completion: ``eval "$(sds-exp -sc install=bash)"``);
* ``sds-table``: the paper-layout table of sweeps (``scripts/make_table.py``);
* ``sds-plot``: perplexity vs sparsity of a sweep (``scripts/plot_sweep.py``).

The configs are found through :func:`sds_exp.resources.conf_dir`, in a checkout and in an installed wheel alike.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from sds_exp.resources import conf_dir

__all__ = ["main", "plot", "run", "table"]

# launcher options (conf/hydra/launcher/ and the plugin's own) that need the [slurm] extra
_SUBMITIT_LAUNCHER = re.compile(r"^hydra/launcher=(slurm|local_parallel|submitit_local|submitit_slurm)$")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """The Hydra task: one job (``sds_exp.app.run``); returns ``cfg.optimized_metric`` for sweeper plugins."""
    from sds_exp import app

    metrics = app.run(cfg)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


def check_launcher(argv: Sequence[str]) -> None:
    """Fail before composing when a submitit launcher is asked for and the ``[slurm]`` extra is missing (Hydra would
    only say that ``hydra/launcher/submitit_slurm`` cannot be found)."""
    if any(_SUBMITIT_LAUNCHER.match(arg) for arg in argv):
        from sds_exp.extras import require

        require("hydra_plugins.hydra_submitit_launcher", "slurm")


def run() -> None:
    """``sds-exp`` / ``python -m sds_exp``: the job; a job killed by a signal exits as a process killed by it.

    Nothing heavy (torch) is imported before Hydra parses the command line: ``--help``, ``--cfg job`` and the tab
    completion queries (``-sc query=bash``, one per Tab press) stay fast."""
    try:
        check_launcher(sys.argv[1:])
    except ImportError as err:
        sys.exit(f"error: {err}")
    try:
        main()
    except BrokenPipeError:  # `sds-exp --help | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except BaseException as exc:
        job = sys.modules.get("sds_exp.job")  # not imported: the exception cannot be its JobKilled
        if job is not None and isinstance(exc, job.JobKilled):  # the record says "killed"; exit as a process
            sys.exit(128 + exc.signum)  # killed by that signal would
        raise


def table(argv: Sequence[str] | None = None) -> int:
    """``sds-table``: the same as ``python scripts/make_table.py``."""
    from sds_exp.reporting.table_cli import main as table_main

    return table_main(list(argv) if argv is not None else None)


def plot(argv: Sequence[str] | None = None) -> int:
    """``sds-plot``: the same as ``python scripts/plot_sweep.py``."""
    from sds_exp.reporting.plot_cli import main as plot_main

    return plot_main(list(argv) if argv is not None else None)
