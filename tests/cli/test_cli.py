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
def test_select_hparams_script(tmp_path, data_dir):
    """The hyperparameter-selection script on a truncated tiny model: one row per (lambda, adjust damp,
    adjust score), every stage measured on the validation slice and the calibration windows, the choice
    written out."""
    out = tmp_path / "sel"
    cmd = [sys.executable, "scripts/select_hparams.py", "--model", "tiny_llama", "--blocks", "2", "--nsamples", "4",
           "--seqlen", "64", "--val-windows", "3", "--steps", "5", "--lams", "0,0.1", "--adjust-damps", "0.01,1",
           "--adjust-scores", "magnitude,wanda", "--dtype", "float32", "--data-dir", str(data_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "select_hparams.json").read_text())
    assert [(r["lam"], r["damp"], r["score"]) for r in result["rows"]] == [
        (lam, damp, score) for lam in (0.0, 0.1) for damp in (0.01, 1.0) for score in ("magnitude", "wanda")]
    for row in result["rows"]:
        assert list(row["errors"]) == ["prune", "reactivate", "reprune", "adjust"]
        assert all(1 < e["validation"] < 1e6 and 1 < e["calibration"] < 1e6 for e in row["errors"].values())
        assert row["max_weight_growth"] > 0
    rows = result["rows"]
    # lambda acts after the first prune only; the adjustment settings after the re-activation only
    assert len({json.dumps(r["errors"]["prune"]) for r in rows}) == 1
    assert rows[0]["errors"]["reactivate"] == rows[3]["errors"]["reactivate"] != rows[4]["errors"]["reactivate"]
    # (the re-prune stage may differ between variants: block k is re-pruned on blocks < k as adjusted)
    assert rows[0]["errors"]["adjust"] != rows[2]["errors"]["adjust"]  # damping changes the adjustment
    assert "Lowest final validation perplexity: lambda =" in (out / "select_hparams.md").read_text()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(cmd[:3] + ["--blocks", "99"] + cmd[5:], cwd=ROOT, check=True, capture_output=True, timeout=600)
    bad = subprocess.run(cmd[:-2] + ["--adjust-scores", "norm", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "adjust score 'norm'; allowed: magnitude, wanda" in bad.stderr



@pytest.mark.integration
def test_bench_command_writes_numbers_and_ratios(tmp_path, data_dir):
    """``python -m sds_exp.bench`` on a tiny model at two calibration sizes: JSON and Markdown with every
    phase, the ratios of issue 6, and the SDS pass's own working set."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "sds_exp.bench", "--model", "tiny_llama", "--sizes", "4,2", "--seqlen", "64",
           "--steps", "3", "--eval-windows", "2", "--dtype", "float32", "--data-dir", str(data_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "bench.json").read_text())
    assert set(r["sizes"]) == {"4", "2"}
    for size in r["sizes"].values():
        assert {"magnitude", "wanda", "sparsegpt", "sds_wanda"} <= set(size)
        assert size["sds_wanda"]["reactivate/optimise"] > 0 and size["sds_wanda"]["adjust/optimise"] > 0
    assert r["memory"]["sds_pass_gib"] is None or r["memory"]["sds_pass_gib"] >= 0
    for key in ("wanda_mask_over_calib_forward", "sds_extra_over_plain_prune", "ppl_bf16_fraction_of_peak",
                "reactivate_optimise_ratio_4_vs_2_samples"):
        assert key in r["ratios"] and key in proc.stdout
    assert "SDS pass working set" in (out / "bench.md").read_text() or r["memory"]["sds_pass_gib"] is None


def test_pass_memory_sees_an_allocation_inside_the_pass():
    import torch

    from sds_exp.bench import PassMemory

    with PassMemory() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    if mem.gib is None:
        pytest.skip("/proc/self/clear_refs not available")
    assert 0.05 < mem.gib < 2
