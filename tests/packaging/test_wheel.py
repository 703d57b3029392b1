"""The wheel: it carries conf/ as sds_exp/conf (never conf/local/), the console scripts and the extras; installed into
a fresh virtual environment (slow), ``sds-exp debug=tiny`` runs from a directory outside the checkout."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IGNORED = (".git", ".venv", "outputs", "multirun", "wandb", "build", "dist", "tests", "__pycache__", "*.egg-info")
IGNORED += (".pytest_cache", ".ruff_cache", "*.pyc")
OPTIONAL = ("wandb", "lm-eval", "gguf", "submitit", "hydra-submitit-launcher")
TORCH = "torch==2.13.0"  # as scripts/install.sh: the CPU build first


def _setuptools_ok() -> bool:
    try:
        return int(md.version("setuptools").split(".")[0]) >= 68
    except md.PackageNotFoundError:
        return False


def build_wheel(dest: Path, *, isolated: bool) -> Path:
    """Build the wheel of a copy of the checkout (so that no build/ or egg-info lands in it), with a git-ignored
    conf/local/default.yaml in the copy that must stay out of the wheel."""
    src = dest / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*IGNORED))
    (src / "conf" / "local").mkdir(exist_ok=True)
    (src / "conf" / "local" / "default.yaml").write_text("# @package _global_\ndevice: cuda:7\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest / "dist"), f"{src}/"]
    if not isolated:
        cmd.insert(4, "--no-build-isolation")  # the running environment's setuptools: offline and fast
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = (dest / "dist").glob("sds_exp-*.whl")
    return wheel


def conf_files() -> set[str]:
    conf = ROOT / "conf"
    return {str(p.relative_to(conf)) for p in conf.rglob("*.yaml") if p.relative_to(conf).parts[0] != "local"}


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    packaged = {n.removeprefix("sds_exp/conf/") for n in names if n.startswith("sds_exp/conf/")}
    assert packaged == conf_files()  # all of conf/, nothing else, no conf/local/
    assert "config.yaml" in packaged and "hydra/help/sds_exp.yaml" in packaged
    assert not any(n.startswith(("conf/", "tests/", "scripts/")) for n in names)
    assert {"sds_exp/cli.py", "sds_exp/resources.py", "sds_exp/extras.py", "sds_exp/reporting/table_cli.py"} <= names
    assert "sds_exp/reporting/paper_numbers.csv" in names and "sds_exp/evaluation/lm_eval_tasks/rte.yaml" in names
    for line in ("sds-exp = sds_exp.cli:run", "sds-table = sds_exp.cli:table", "sds-plot = sds_exp.cli:plot"):
        assert line in entry_points, entry_points
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    hard = [r for r in requires if "extra ==" not in r]
    assert not [r for r in hard if r.split("<")[0].split(">")[0].split("=")[0].strip() in OPTIONAL], hard
    for extra in ("tracking", "zeroshot", "slurm", "gguf", "all"):
        assert f"Provides-Extra: {extra}" in metadata


@pytest.mark.skipif(not _setuptools_ok(), reason="setuptools>=68 not in this environment (pip install setuptools)")
def test_wheel_contents(tmp_path):
    start = time.monotonic()
    check_wheel(build_wheel(tmp_path, isolated=False))
    assert time.monotonic() - start < 120
    # the sdist carries conf/ (MANIFEST.in), so a wheel built from it (python -m build, pip install sdist) has it too
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "sdist")], cwd=tmp_path / "src", capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = tmp_path / "sdist" / proc.stdout.strip().splitlines()[-1]
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w"]
    proc = subprocess.run([*cmd, str(tmp_path / "from_sdist"), str(sdist)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "from_sdist").glob("sds_exp-*.whl")
    check_wheel(wheel)


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / "python"


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path, data_dir):
    """A non-editable install (PEP 517 build in isolation, fresh venv, no extras) runs the tiny job from another
    directory with the wheel's own configs; optional features say what to install."""
    timings = {}
    start = time.monotonic()
    wheel = build_wheel(tmp_path / "build", isolated=True)
    check_wheel(wheel)
    timings["build"] = time.monotonic() - start

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = _venv_python(venv)
    # the test environment's versions as constraints: the same resolution, from the local wheel cache
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(x for x in freeze.splitlines() if "==" in x and not x.startswith("sds_exp")))
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for args in ([TORCH], ["-c", str(constraints), str(wheel)]):
        t0 = time.monotonic()
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        timings[args[-1].rsplit("/", 1)[-1]] = time.monotonic() - t0
    listing = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    installed = {line.split()[0].lower() for line in listing.splitlines()[2:]}
    assert not installed & set(OPTIONAL), installed & set(OPTIONAL)  # no extra asked for, none installed

    work = tmp_path / "elsewhere"  # not the checkout: the configs must come from the wheel
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PROJECT_ROOT", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(SDS_DATA_DIR=str(data_dir), WANDB_MODE="disabled")
    sds_exp = python.parent / "sds-exp"
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(sds_exp), "debug=tiny", f"hydra.run.dir={run_dir}", f"paths.root_dir={work}"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    timings["job"] = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and "final/wikitext2/ppl" in record["metrics"]
    site = str(venv)
    hydra_cfg = (run_dir / ".hydra" / "hydra.yaml").read_text()
    assert f"{site}/lib" in hydra_cfg and "sds_exp/conf" in hydra_cfg and str(ROOT / "conf") not in hydra_cfg
    assert (work / "outputs" / "cache").is_dir()  # paths.cache_dir under the chosen root, not site-packages

    help_page = subprocess.run([str(sds_exp), "--help"], cwd=work, capture_output=True, text=True, env=env)
    assert (
        help_page.stdout.startswith("sds-exp (python -m sds_exp)") and "experiment: ablation_inputs" in help_page.stdout
    )
    for name in ("sds-table", "sds-plot"):
        assert subprocess.run([str(python.parent / name), "--help"], capture_output=True, env=env).returncode == 0
    missing = subprocess.run(
        [str(python), "-c", "from sds_exp.extras import require; require('wandb', 'tracking')"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode != 0 and "pip install 'sds_exp[tracking]'" in missing.stderr
    slurm = subprocess.run(
        [str(sds_exp), "-m", "hydra/launcher=slurm", "debug=tiny"], cwd=work, capture_output=True, text=True, env=env
    )
    assert slurm.returncode != 0 and "pip install 'sds_exp[slurm]'" in slurm.stderr, slurm.stderr[-2000:]
    print({k: round(v, 1) for k, v in timings.items()})  # noqa: T201 (-s shows where the time went)
