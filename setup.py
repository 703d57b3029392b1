"""Build hook (everything else is in pyproject.toml): the wheel carries the top-level ``conf/`` as ``sds_exp/conf``.

``conf/`` stays where Hydra, the tests and the docs expect it, at the top of the checkout; an editable install reads
it there, and ``sds_exp.resources.conf_dir()`` finds the copy inside an installed wheel. The git-ignored
``conf/local/`` (one machine's settings) is never packaged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"
SKIP = ("local",)  # conf/local/: git-ignored, this machine's settings


def conf_files() -> list[Path]:
    """The YAML files of conf/, relative to it, without conf/local/."""
    return sorted(
        p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.relative_to(CONF).parts[0] not in SKIP and p.is_file()
    )


class BuildPyWithConf(build_py):
    """build_py, then copy conf/**.yaml to <build>/sds_exp/conf/ (not in editable mode: that reads conf/ itself)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "sds_exp" / "conf"
        if target.exists():
            shutil.rmtree(target)  # a stale copy would keep deleted configs
        for rel in conf_files():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CONF / rel, target / rel)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs += [str(Path(self.build_lib) / "sds_exp" / "conf" / rel) for rel in conf_files()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithConf})
