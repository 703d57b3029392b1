"""Entry point: ``python -m sds_exp [group=option ...] [key=value ...]`` (Hydra); the console script ``sds-exp``
is the same (``sds_exp.cli``)."""

from __future__ import annotations

from sds_exp.cli import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
