"""Where the package's data lives, in a checkout and in an installed wheel.

The Hydra configs are one directory, ``conf/`` at the top of the repository. An editable install
(``pip install -e .``) reads it there; a wheel carries a copy as ``sds_exp/conf`` (``setup.py`` copies it in at
build time, without the git-ignored ``conf/local/``). :func:`conf_dir` is the one place that knows both.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PACKAGE_DIR", "conf_dir"]

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The directory of ``config.yaml`` and the config groups: ``<package>/conf`` in an installed wheel, else the
    checkout's ``conf/`` beside the package (editable install, or ``python -m sds_exp`` run from the checkout)."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"the sds_exp configs were not found: neither {PACKAGE_DIR / 'conf'} (installed wheel) nor "
        f"{PACKAGE_DIR.parent / 'conf'} (checkout) holds config.yaml; reinstall the package"
    )
