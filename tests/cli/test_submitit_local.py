"""Multiruns in subprocesses on the tiny model, then the table and plot commands on them.

One goes through submitit's local executor (the real hydra-submitit-launcher code path, each job in
its own process); one is an experiment file that runs its own grid without -m.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sds_exp.reporting import build_table, collect_jobs, sparsity_series

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["debug=tiny"]  # conf/debug/tiny.yaml: tiny_llama, smoke benchmark, 4 x 64 calibration, 5 steps


def run_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "sds_exp",
        *overrides,
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    return proc, sweep


def completed_jobs(sweep: Path) -> dict[str, dict]:
    out = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        state = json.loads((job / "metrics.json").read_text())
        assert state["status"] == "completed", (job, state.get("error"))
        out[job.name] = {
            "state": state,
            "config": OmegaConf.load(job / "resolved_config.yaml"),
            "hydra": OmegaConf.load(job / ".hydra" / "hydra.yaml"),
        }
    return out


@pytest.mark.integration
def test_two_job_multirun_through_submitit_local(tmp_path):
    proc, sweep = run_sweep(tmp_path, "-m", "hydra/launcher=local_parallel", *SMOKE, "sparsity=0.5,0.6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    for num in (0, 1):  # the launcher reports each job as it ends, with the job's own record
        assert (
            f"job #{num} ended" in proc.stdout + proc.stderr
            and "COMPLETED, metrics.json completed" in proc.stdout + proc.stderr
        )
    jobs = completed_jobs(sweep)
    assert sorted(jobs) == ["0", "1"]
    assert [jobs[n]["config"].sparsity for n in ("0", "1")] == [0.5, 0.6]
    for name, job in jobs.items():
        assert job["state"]["metrics"]["final/sparsity/mask"] == pytest.approx(
            job["config"].sparsity, abs=0.02
        )  # 32-wide rows
        # hydra.job.id comes from submitit.JobEnvironment: set only inside a submitit job process
        assert str(job["hydra"].hydra.job.id).split("_")[0].isdigit(), job["hydra"].hydra.job.id
        assert job["hydra"].hydra.job.num == int(name)
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one submitit job folder per Hydra job

    table = build_table(collect_jobs(sweep), [])
    assert [j.status for j in table.jobs] == ["completed", "completed"]
    panel = sparsity_series(table)["tiny_llama"]
    assert [x for x, _, _ in panel.series["SDS-Wanda"]] == [0.5, 0.6] and not panel.failed
    script = subprocess.run(
        [sys.executable, "scripts/plot_sweep.py", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    assert (sweep / "table" / "ppl_vs_sparsity.png").stat().st_size > 0


@pytest.mark.integration
def test_experiment_runs_its_grid_without_m(tmp_path):
    """table_smollm2 on the tiny model, one pruner, baseline only: its pattern sweep: two jobs,
    the N:M one with the string "2:4" from the quoted sweep value."""
    proc, sweep = run_sweep(tmp_path, "experiment=table_smollm2", *SMOKE, "pruner=wanda", "sds=prune_only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = completed_jobs(sweep)
    assert sorted(jobs) == ["0", "1"]
    assert [jobs[n]["config"].pattern for n in ("0", "1")] == ["2:4", "unstructured"]
    assert jobs["0"]["state"]["choices"]["experiment"] == "table_smollm2"

    make = subprocess.run(
        [sys.executable, "scripts/make_table.py", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert make.returncode == 0, make.stderr[-2000:]
    rows = [ln for ln in make.stdout.splitlines() if ln.startswith("| 2:4 ") or ln.startswith("| 50% ")]
    assert [r.split(" | ")[1] for r in rows] == ["Wanda", "Wanda"]
    assert "Jobs: 2 (2 completed)." in make.stdout
