"""Fault injection: a tiny SDS job killed (SIGKILL inside stages and inside checkpoint writes, SIGTERM)
and resumed ends with the same metrics and masks as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JOB = ["debug=tiny", "pattern=2:4"]


def run(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sds_exp", *JOB, f"hydra.run.dir={run_dir}", f"paths.cache_dir={run_dir}.cache"]
    env = {k: v for k, v in os.environ.items() if k != "SDS_EXP_FAULT"}
    env.update({"TQDM_DISABLE": "1", **({"SDS_EXP_FAULT": fault} if fault else {})})
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def results(run_dir: Path) -> tuple[dict, dict, dict]:
    state = json.loads((run_dir / "metrics.json").read_text())
    numbers = {
        k: v
        for k, v in state["metrics"].items()
        if not k.startswith("time/") and not k.endswith(("/cached", "_per_s", "/seconds"))
    }
    final = run_dir / "checkpoint" / "adjust"
    return numbers, load_file(final / "masks.safetensors"), load_file(final / "weights.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict, dict]:
    run_dir = tmp_path_factory.mktemp("crash") / "reference"
    proc = run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results(run_dir)


@pytest.mark.parametrize(
    "fault, code, status",
    [
        ("block:reactivate:1", -9, "running"),  # inside a stage, after a checkpoint
        ("checkpoint:prune:weights", -9, "running"),  # inside the first checkpoint write: nothing committed
        ("checkpoint:reactivate:before_commit", -9, "running"),  # files written and synced, not committed
        ("checkpoint:adjust:after_commit", -9, "running"),  # committed, the older stage not yet cleaned up
        ("block:reprune:1:SIGTERM", 128 + 15, "killed"),  # what SLURM and `timeout` send
    ],
)
def test_killed_job_resumes_to_the_same_result(tmp_path, reference, fault, code, status):
    run_dir = tmp_path / "job"
    proc = run(run_dir, fault)
    assert proc.returncode == code, proc.stderr[-3000:]
    state = json.loads((run_dir / "metrics.json").read_text())
    assert state["status"] == status
    if status == "killed":
        assert state["error"] == "killed by SIGTERM" and (run_dir / "failure.txt").is_file()
    proc = run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers, masks, weights = results(run_dir)
    ref_numbers, ref_masks, ref_weights = reference
    assert numbers == ref_numbers
    assert masks.keys() == ref_masks.keys() and all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    state = json.loads((run_dir / "metrics.json").read_text())
    assert state["status"] == "completed" and [a["status"] for a in state["attempts"]] == [status, "completed"]
    assert not list((run_dir / "checkpoint").glob(".*.tmp"))  # no half-written stage left behind
