"""Optional dependencies: the extras in pyproject.toml, sds_exp.extras.require and its message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sds_exp.extras import EXTRAS, install_command, require

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("wandb", "lm-eval", "lm_eval", "gguf", "submitit", "hydra-submitit-launcher")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower()


def test_optional_packages_are_extras_not_dependencies():
    project = _pyproject()["project"]
    hard = {_name(r) for r in project["dependencies"]}
    assert not hard & set(OPTIONAL), hard & set(OPTIONAL)
    extras = project["optional-dependencies"]
    assert set(extras) == {"test", "all", "optuna", *EXTRAS}  # optuna: a sweeper plugin, not part of `all`
    assert {_name(r) for r in extras["tracking"]} == {"wandb"}
    assert {_name(r) for r in extras["zeroshot"]} == {"lm-eval"}
    assert {_name(r) for r in extras["slurm"]} == {"hydra-submitit-launcher", "submitit"}
    assert {_name(r) for r in extras["gguf"]} == {"gguf"}
    (everything,) = extras["all"]
    assert everything.startswith("sds_exp[") and sorted(everything[8:-1].split(",")) == sorted(EXTRAS)
    assert '".[test,all]"' in (ROOT / "scripts" / "install.sh").read_text()


def test_require_returns_the_module():
    assert require("json", "tracking") is json
    assert require("os.path", "tracking") is sys.modules["os.path"]


@pytest.mark.parametrize("module, extra", [("wandb", "tracking"), ("lm_eval.tasks", "zeroshot"), ("gguf", "gguf")])
def test_require_names_the_pip_command(monkeypatch, module, extra):
    for name in {module.split(".")[0], module}:  # import of it fails, as if not installed (even if cached)
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError) as info:
        require(module, extra)
    message = str(info.value)
    assert message.endswith(f"Install the optional dependencies with: pip install 'sds_exp[{extra}]'"), message
    assert f"{module!r} is not installed" in message and EXTRAS[extra] in message
    assert info.value.name == module and isinstance(info.value.__cause__, ImportError)


def test_require_a_missing_dependency_of_the_extra(tmp_path, monkeypatch):
    """The extra's package is there but one of its own imports is not: the message says which, same command."""
    (tmp_path / "fake_extra_pkg.py").write_text("import not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ImportError, match=r"'fake_extra_pkg' needs 'not_a_real_module_xyz'.*pip install 'sds_exp\[slurm\]'"
    ):
        require("fake_extra_pkg", "slurm")


def test_unknown_extra_is_a_bug():
    with pytest.raises(ValueError, match="unknown extra 'wandb'; the extras are: tracking, zeroshot, slurm, gguf, all"):
        require("json", "wandb")
    assert install_command("all") == "pip install 'sds_exp[all]'"


def test_launcher_needs_the_slurm_extra(monkeypatch):
    from sds_exp.cli import check_launcher

    check_launcher(["debug=tiny", "hydra.launcher.partition=gpu"])  # no submitit launcher asked for: no import
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    check_launcher(["-m", "sparsity=0.5,0.6"])
    for launcher in ("slurm", "local_parallel"):
        with pytest.raises(ImportError, match=r"pip install 'sds_exp\[slurm\]'"):
            check_launcher(["-m", f"hydra/launcher={launcher}", "sparsity=0.5,0.6"])


def test_check_installed_imports_nothing(monkeypatch):
    from sds_exp.extras import check_installed

    check_installed("json", "tracking")
    monkeypatch.delitem(sys.modules, "fake_never_imported_pkg", raising=False)
    with pytest.raises(
        ImportError, match=r"^'fake_never_imported_pkg' is not installed; .*pip install 'sds_exp\[gguf\]'$"
    ):
        check_installed("fake_never_imported_pkg", "gguf")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'sds_exp\[tracking\]'$"):
        check_installed("wandb", "tracking")
    with pytest.raises(ValueError, match="unknown extra"):
        check_installed("json", "wandb")
