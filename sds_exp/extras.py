"""Optional dependencies, by extra: ``require("wandb", "tracking")`` imports ``wandb`` or says what to install.

The core install (``pip install sds_exp``) runs pruning, SDS and perplexity. Features that need heavier packages
are extras (``pyproject.toml``), all of them in ``[all]``, which ``scripts/install.sh`` installs:

=========== ============================================ ==============================================
extra       packages                                     needed for
=========== ============================================ ==============================================
tracking    wandb                                        ``logger=wandb``
zeroshot    lm-eval                                      ``benchmark=zeroshot_sds7|zeroshot_wanda7|paper``
slurm       hydra-submitit-launcher, submitit            ``hydra/launcher=slurm|local_parallel``
gguf        gguf                                         GGUF models: the default ``model=smollm2_135m``
=========== ============================================ ==============================================

Import such a package only where the feature runs, through :func:`require`, so that a job without the feature
never imports it and a job with it fails at once with the command to type; :func:`check_installed` checks the same
without importing anything (config validation, before the model loads).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXTRAS", "check_installed", "install_command", "require"]

EXTRAS: dict[str, str] = {
    "tracking": "Weights & Biases tracking (logger=wandb)",
    "zeroshot": "zero-shot evaluation with lm-eval (benchmark=zeroshot_sds7, zeroshot_wanda7, paper)",
    "slurm": "the submitit launchers (hydra/launcher=slurm, hydra/launcher=local_parallel)",
    "gguf": "loading GGUF model files (the default model=smollm2_135m)",
}


def install_command(extra: str) -> str:
    """The command that installs an extra: ``pip install 'sds_exp[tracking]'``."""
    if extra not in EXTRAS and extra != "all":
        raise ValueError(f"unknown extra {extra!r}; the extras are: {', '.join([*EXTRAS, 'all'])}")
    return f"pip install 'sds_exp[{extra}]'"


def _missing(module: str, extra: str, what: str) -> ImportError:
    feature = EXTRAS.get(extra, "the optional features")
    message = f"{what}; it is needed for {feature}. Install the optional dependencies with: {install_command(extra)}"
    return ImportError(message, name=module)


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (e.g. ``"wandb"``, ``"lm_eval.tasks"``), which the extra ``extra`` installs.

    Returns:
        The imported module.

    Raises:
        ImportError: the module (or a package it needs) is missing; the message names the feature and ends with
            the exact command, e.g. ``... pip install 'sds_exp[tracking]'`` (in a checkout the same extra installs
            with ``pip install -e '.[tracking]'``).
        ValueError: ``extra`` is not one of :data:`EXTRAS` or ``all`` (a bug at the call site).
    """
    install_command(extra)  # an unknown extra is a bug, even when the module is there
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = err.name or module
        root = module.split(".", 1)[0]
        what = f"{module!r} is not installed" if missing.split(".", 1)[0] == root else f"{module!r} needs {missing!r}"
        raise _missing(module, extra, what) from err


def check_installed(module: str, extra: str) -> None:
    """Raise :func:`require`'s ImportError if ``module``'s top-level package cannot be found, without importing it
    (``importlib.util.find_spec``: cheap, for refusing a config before the model loads)."""
    install_command(extra)
    root = module.split(".", 1)[0]
    try:
        found = importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[root] is None or has no __spec__
        found = False
    if not found:
        raise _missing(module, extra, f"{module!r} is not installed")
