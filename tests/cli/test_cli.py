"""The command line, in subprocesses: tiny models end to end, and the bad inputs with their messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["benchmark=smoke", "data.nsamples=4", "data.seqlen=64", "sds.reactivate.steps=5", "sds.adjustment.steps=5"]


def run_cli(tmp_path, *overrides, env=None):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sds_exp", *overrides, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache"]
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=600)
    return proc, run_dir


@pytest.mark.integration
@pytest.mark.parametrize("model, pruner, pattern", [("tiny_opt", "sparsegpt", "2:4"), ("tiny_llama", "wanda", "unstructured")])
def test_end_to_end(tmp_path, model, pruner, pattern):
    proc, run_dir = run_cli(tmp_path, f"model={model}", f"pruner={pruner}", f"pattern={pattern}", *SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run_dir / "metrics.json").read_text())
    assert state["status"] == "completed" and state["choices"]["model"] == model
    m = state["metrics"]
    for stage in ("dense", "prune", "reactivate", "reprune", "adjust", "final"):
        assert f"{stage}/wikitext2/ppl" in m, stage
    assert m["prune/sparsity/actual"] == pytest.approx(0.5) and m["final/sparsity/mask"] == pytest.approx(0.5)
    assert m["dense/wikitext2/windows"] == 2
    for name in ("resolved_config.yaml", "env.json", "layers.json", "job.log", "plots/hist_stages.png"):
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "env.json").read_text())
    assert env["versions"]["torch"] and env["device"] == "cpu"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pruner=obs"], "Available options in 'pruner'"),
        (["sparsity=1.5"], "sparsity=1.5 is outside [0, 1)"),
        (["sparsity=0.6", "pattern=2:4"], "keeps 2 of 4 weights, i.e. sparsity 0.5, but sparsity=0.6"),
        (["pattern=2:3", "sparsity=0.3333333333"], "not divisible by M=3"),
        (["dtype=float8"], "dtype='float8' is not supported"),
        (["sds.adjust=maybe"], "sds.adjust='maybe'"),
    ],
)
def test_bad_inputs(tmp_path, overrides, message):
    proc, run_dir = run_cli(tmp_path, "model=tiny_llama", *SMOKE, *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, proc.stderr[-2000:]
    if (run_dir / "metrics.json").is_file():  # a failed job leaves its reason on disk
        state = json.loads((run_dir / "metrics.json").read_text())
        assert state["status"] == "failed" and message.split(" ")[0] in state["error"]


def test_no_data_mirror_and_no_hub(tmp_path):
    proc, run_dir = run_cli(tmp_path, "model=tiny_llama", *SMOKE, f"paths.data_dir={tmp_path}/none",
                            "model.data_dir=" + str(Path(os.environ["SDS_DATA_DIR"])),
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "Set SDS_DATA_DIR (or paths.data_dir=...)" in proc.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
