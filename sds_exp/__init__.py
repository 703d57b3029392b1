"""sds_exp: Sparse-Dense-Sparse pruning of pre-trained language models (arXiv 2408.10473).

The Python API (``sds_exp.Recipe``, ``sds_exp.prune``, ``sds_exp.calibration``) lives in :mod:`sds_exp.api`;
``python -m sds_exp`` is the Hydra job built on it.
"""

__version__ = "0.1.0"
__all__ = ["Recipe", "Report", "prune", "calibration"]


def __getattr__(name: str):  # lazy: `import sds_exp` stays cheap (no torch) for the CLI's tab completion
    if name in __all__:
        from sds_exp import api

        return getattr(api, name)
    raise AttributeError(f"module 'sds_exp' has no attribute {name!r}")
