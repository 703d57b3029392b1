"""Entry point: ``python -m sds_exp [group=option ...] [key=value ...]`` (Hydra)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from sds_exp import app

    metrics = app.run(cfg)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    from sds_exp.job import JobKilled

    try:
        main()
    except JobKilled as killed:  # the record says "killed"; exit as a process killed by that signal would
        sys.exit(128 + killed.signum)
