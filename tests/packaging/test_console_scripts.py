"""The command line as installed: the help page, the job name, the console scripts, tab completion, and the optional
packages a default job never imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin/: where pip put the console scripts
OPTIONAL_MODULES = ("wandb", "lm_eval", "submitit", "gguf")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", **extra}


def _run(args: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=_env(**env), timeout=300)


def _script(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"console script {name} not installed next to {sys.executable} (pip install -e .)")
    return path


def test_help_page():
    proc = _run([sys.executable, "-m", "sds_exp", "--help"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not out.startswith("__main__ is powered by Hydra") and "powered by Hydra." not in out.splitlines()[0]
    assert out.startswith("sds-exp (python -m sds_exp): Sparse-Dense-Sparse (SDS) pruning")
    for line in (
        "pruner: admm, dsnot, magnitude, pruner_zero, ria, sparsegpt, wanda",
        "sds: default, no_adjust, prune_only",
        "debug: tiny",
        "sds-exp debug=tiny ",
        "sds-exp pruner=sparsegpt pattern=2:4 sds=default ",
        "sds-exp pruner=wanda sds=prune_only ",
        "sds-exp -m sparsity=0.5,0.6,0.7 pruner=wanda,sparsegpt ",
        'eval "$(sds-exp -sc install=bash)"',  # $$ in the template is one $
        "sparsity: 0.5",  # the composed config
    ):
        assert line in out, line
    assert "hydra/launcher" not in out  # Hydra's own groups are on --hydra-help
    proc = _run([sys.executable, "-m", "sds_exp", "hydra/help=default", "--help"])
    assert proc.stdout.startswith("sds_exp is powered by Hydra.")  # the stock page, with the job's name


def test_job_name_and_help_imports_nothing_heavy():
    proc = _run([sys.executable, "-m", "sds_exp", "--cfg", "hydra", "-p", "hydra.job.name"])
    assert proc.returncode == 0 and proc.stdout.strip() == "sds_exp", proc.stderr
    code = (
        "import sys; sys.argv = ['sds-exp', '--help']\n"
        "from sds_exp.cli import run\n"
        "try:\n    run()\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'wandb', 'lm_eval'}))"
    )
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:] + proc.stderr


def test_console_scripts():
    proc = _run([str(_script("sds-exp")), "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("sds-exp (python -m sds_exp)"), proc.stderr
    proc = _run([str(_script("sds-exp")), "--hydra-help"])
    assert proc.returncode == 0 and "hydra/launcher:" in proc.stdout and "local_parallel" in proc.stdout
    for name, words in (("sds-table", "Paper-layout table"), ("sds-plot", "Perplexity vs sparsity")):
        proc = _run([str(_script(name)), "--help"])
        assert proc.returncode == 0 and words in proc.stdout and "sweep_dirs" in proc.stdout, proc.stderr
    proc = _run([str(_script("sds-table")), "/nonexistent/sweep"])
    assert proc.returncode != 0


def test_tab_completion():
    sds_exp = _script("sds-exp")
    proc = _run([str(sds_exp), "-sc", "install=bash"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("complete -o nospace -o default -F hydra_bash_completion sds-exp")
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = _run([str(sds_exp), "-sc", "query=bash"], PATH=path, COMP_LINE="sds-exp pruner=sp", COMP_POINT="17")
    assert proc.stdout.split() == ["pruner=sparsegpt"], proc.stdout + proc.stderr
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = (
        'eval "$(sds-exp -sc install=bash)"\n'
        'COMP_LINE="sds-exp debug=t"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(sds-exp debug=t); COMP_CWORD=1\n'
        'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = _run([bash, "-c", script], PATH=path)
    assert proc.stdout.split() == ["debug=tiny"], proc.stdout + proc.stderr


@pytest.mark.integration
def test_default_job_imports_no_optional_package(tmp_path, data_dir):
    """debug=tiny (logger=none, perplexity only) runs without importing wandb, lm_eval, submitit or gguf."""
    report = tmp_path / "modules.json"
    code = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(report)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
        "sys.argv = ['sds-exp', *sys.argv[1:]]\n"
        "from sds_exp.cli import run\n"
        "run()\n"
    )
    run_dir = tmp_path / "run"
    args = ["debug=tiny", "logger=none", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache"]
    proc = _run([sys.executable, "-c", code, *args], SDS_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    loaded = {name.split(".")[0] for name in json.loads(report.read_text())}
    assert "torch" in loaded and not loaded & set(OPTIONAL_MODULES), sorted(loaded & set(OPTIONAL_MODULES))
