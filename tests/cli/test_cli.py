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


@pytest.mark.integration
def test_select_lambda_script(tmp_path, data_dir):
    """The lambda-selection script on a truncated tiny model: one row per lambda, every stage measured on
    the validation slice and the calibration windows, the choice written out."""
    out = tmp_path / "sel"
    cmd = [sys.executable, "scripts/select_lambda.py", "--model", "tiny_llama", "--blocks", "2", "--nsamples", "4",
           "--seqlen", "64", "--val-windows", "3", "--steps", "5", "--lams", "0,0.1", "--dtype", "float32",
           "--data-dir", str(data_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "select_lambda.json").read_text())
    assert [r["lam"] for r in result["rows"]] == [0.0, 0.1]
    for row in result["rows"]:
        assert list(row["errors"]) == ["prune", "reactivate", "reprune", "adjust"]
        assert all(0 <= e["validation"] < 10 and 0 <= e["calibration"] < 10 for e in row["errors"].values())
    # lambda acts after the first prune only: the prune stage is the same for both
    assert result["rows"][0]["errors"]["prune"] == result["rows"][1]["errors"]["prune"]
    assert "Lowest final validation error: lambda =" in (out / "select_lambda.md").read_text()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(cmd[:3] + ["--blocks", "99"] + cmd[5:], cwd=ROOT, check=True, capture_output=True, timeout=600)
