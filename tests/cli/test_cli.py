"""The command line, in subprocesses: tiny models end to end, and the bad inputs with their messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["debug=tiny"]  # conf/debug/tiny.yaml: tiny_llama, smoke benchmark, 4 x 64 calibration, 5 steps


def run_cli(tmp_path, *overrides, env=None):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sds_exp", *overrides, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache"]
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=600)
    return proc, run_dir


@pytest.mark.integration
@pytest.mark.parametrize(
    "model, pruner, pattern", [("tiny_opt", "sparsegpt", "2:4"), ("tiny_llama", "wanda", "unstructured")]
)
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
    proc, run_dir = run_cli(tmp_path, *SMOKE, *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, proc.stderr[-2000:]
    if (run_dir / "metrics.json").is_file():  # a failed job leaves its reason on disk
        state = json.loads((run_dir / "metrics.json").read_text())
        assert state["status"] == "failed" and message.split(" ")[0] in state["error"]


def test_no_data_mirror_and_no_hub(tmp_path):
    proc, run_dir = run_cli(
        tmp_path,
        *SMOKE,
        f"paths.data_dir={tmp_path}/none",
        "model.data_dir=" + str(Path(os.environ["SDS_DATA_DIR"])),
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    assert "Set SDS_DATA_DIR (or paths.data_dir=...)" in proc.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.integration
def test_select_hparams_script(tmp_path, data_dir):
    """The hyperparameter-selection script on a truncated tiny model: one row per (lambda, adjust damp,
    adjust score), every stage measured on the validation slice and the calibration windows, the choice
    written out."""
    out = tmp_path / "sel"
    cmd = [
        sys.executable,
        "scripts/select_hparams.py",
        "--model",
        "tiny_llama",
        "--blocks",
        "2",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--val-windows",
        "3",
        "--steps",
        "5",
        "--lams",
        "0,0.1",
        "--adjust-damps",
        "0.01,1",
        "--adjust-scores",
        "magnitude,wanda",
        "--dtype",
        "float32",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "pruner.group=row",
    ]  # a Hydra override passed through (Wanda's default)
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "select_hparams.json").read_text())
    settings = result["settings"]
    assert settings["choices"]["model"] == "tiny_llama" and settings["choices"]["pruner"] == "wanda"
    assert settings["overrides"][-1] == "pruner.group=row" and settings["data_dir"] == str(data_dir)
    assert [(r["lam"], r["damp"], r["score"]) for r in result["rows"]] == [
        (lam, damp, score) for lam in (0.0, 0.1) for damp in (0.01, 1.0) for score in ("magnitude", "wanda")
    ]
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
    bad = subprocess.run(
        cmd[:-3] + ["--adjust-scores", "norm", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert bad.returncode != 0 and "adjust score 'norm'; allowed: magnitude, wanda" in bad.stderr


@pytest.mark.integration
def test_bench_command_writes_numbers_and_ratios(tmp_path, data_dir):
    """``python -m sds_exp.bench`` on a tiny model at two calibration sizes: JSON and Markdown with every
    phase, the ratios of issue 6, and the SDS pass's own working set. Model, seqlen and the two sizes come
    from ``debug=tiny`` passed through to Hydra (tiny_llama, data.nsamples=4 and half of it, seqlen 64)."""
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "sds_exp.bench",
        "debug=tiny",
        "--steps",
        "3",
        "--eval-windows",
        "2",
        "--dtype",
        "float32",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "bench.json").read_text())
    assert r["settings"]["choices"]["model"] == "tiny_llama" and r["settings"]["seqlen"] == 64
    assert r["settings"]["steps"] == {"reactivate": 3, "adjustment": 3}  # the flag beats debug=tiny's 5
    assert set(r["sizes"]) == {"4", "2"}
    for size in r["sizes"].values():
        assert {"magnitude", "wanda", "sparsegpt", "sds_wanda"} <= set(size)
        assert size["sds_wanda"]["reactivate/optimise"] > 0 and size["sds_wanda"]["adjust/optimise"] > 0
    assert r["memory"]["sds_pass_gib"] is None or r["memory"]["sds_pass_gib"] >= 0
    big = r["sizes"]["4"]  # the pre-cost-work path, side by side in the same process, at the largest size
    assert big["sds_wanda_legacy"]["adjust_steps_mean"] == 3 and "sds_wanda_legacy" not in r["sizes"]["2"]
    assert big["sds_vs_legacy_weight_rel_diff"] < 1e-2
    assert "sds_vs_legacy_final_val_ppl_rel_diff" in r["ratios"]
    assert r["ppl"]["plain_loop"]["ppl"] == pytest.approx(r["ppl"]["job"]["ppl"], rel=1e-4)
    for key in (
        "sds_over_oneshot",
        "legacy_sds_over_oneshot",
        "eval_over_plain_loop",
        "eval_fraction_of_peak",
        "wanda_mask_over_calib_forward",
        "sds_extra_over_plain_prune",
        "ppl_bf16_fraction_of_peak",
        "reactivate_optimise_ratio_4_vs_2_samples",
    ):
        assert key in r["ratios"] and key in proc.stdout
    assert "SDS pass working set" in (out / "bench.md").read_text() or r["memory"]["sds_pass_gib"] is None


def test_sparse_kernel_mode_on_cpu_says_it_measured_nothing(tmp_path):
    out = tmp_path / "sk"
    proc = subprocess.run(
        [sys.executable, "-m", "sds_exp.bench", "--sparse-kernels", "debug=tiny", "device=cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((out / "sparse_kernels.json").read_text())
    assert r["kernels"]["available"] is False and "CPU" in r["kernels"]["reason"]
    assert set(r) == {"kernels"}  # no timings
    assert "Not measured" in proc.stdout


def test_pass_memory_sees_an_allocation_inside_the_pass():
    import torch

    from sds_exp.bench import PassMemory

    with PassMemory() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    if mem.gib is None:
        pytest.skip("/proc/self/clear_refs not available")
    assert 0.05 < mem.gib < 2


@pytest.fixture
def restore_hydra_config():
    """compose_config sets the global HydraConfig (as a job would): put back what was there."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


def _select_hparams_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("select_hparams", ROOT / "scripts" / "select_hparams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_compose_the_job_config(monkeypatch, tmp_path, restore_hydra_config):
    """bench and select_hparams build their model/pruner/data from conf/ (sds_exp.compose): flags map to
    overrides, trailing key=value and -o pass through (and win), the data mirror follows $SDS_DATA_DIR."""
    from sds_exp import bench
    from sds_exp.compose import choices, compose_config

    monkeypatch.setenv("SDS_DATA_DIR", str(tmp_path / "mirror"))
    args = bench.parser().parse_intermixed_args(
        [
            "--model",
            "tiny_opt",
            "seed=3",
            "--pruner",
            "sparsegpt",
            "pruner.percdamp=0.1",
            "-o",
            "dtype=bfloat16",
            "--dtype",
            "float32",
            "--steps",
            "7",
            "--device",
            "cpu",
        ]
    )
    cfg = compose_config(bench.bench_overrides(args), output_dir=tmp_path / "out")
    assert choices()["model"] == "tiny_opt" and choices()["pruner"] == "sparsegpt"
    assert cfg.seed == 3 and cfg.pruner.percdamp == 0.1 and cfg.dtype == "bfloat16"  # passthrough wins
    assert cfg.pattern == "2:4" and cfg.sds.reactivate.steps == 7 and cfg.sds.adjustment.steps == 7
    assert cfg.paths.data_dir == str(tmp_path / "mirror") and cfg.model.data_dir == str(tmp_path / "mirror")
    assert cfg.paths.output_dir == str(tmp_path / "out") and "hydra" not in cfg
    # a pruner timed besides the chosen one: composed afresh without the chosen one's pruner.* overrides
    node = bench.pruner_config(cfg, bench.bench_overrides(args), "magnitude", "sparsegpt")
    assert node._target_.endswith("Magnitude") and choices()["pruner"] == "sparsegpt"

    sel = _select_hparams_module()
    args = sel.parser().parse_intermixed_args(
        [
            "--model",
            "tiny_llama",
            "--nsamples",
            "4",
            "data=wikitext2",
            "--data-dir",
            str(tmp_path / "d"),
            "regularizer=l1",
        ]
    )
    cfg = compose_config(sel.hydra_overrides(args))
    assert choices()["data"] == "wikitext2" and cfg.data.nsamples == 4 and cfg.dtype == "bfloat16"
    assert cfg.paths.data_dir == str(tmp_path / "d")
    reg = sel.regularizer(cfg, 0.01)
    assert set(reg.terms) == {"l1"} and reg.terms["l1"].lam == 0.01 and sel.regularizer(cfg, 0.0) is None


def test_debug_tiny_and_its_precedence(restore_hydra_config):
    from sds_exp.compose import choices, compose_config

    cfg = compose_config(["debug=tiny"])
    assert choices()["model"] == "tiny_llama" and choices()["benchmark"] == "smoke"
    assert (cfg.data.nsamples, cfg.data.seqlen, cfg.sds.reactivate.steps, cfg.sds.adjustment.steps) == (4, 64, 5, 5)
    cfg = compose_config(["experiment=table_smollm2", "debug=tiny"])  # debug is last in the defaults: it wins
    assert choices()["model"] == "tiny_llama" and cfg.data.nsamples == 4
    cfg = compose_config(["debug=tiny", "model=tiny_opt", "data.nsamples=8"])  # the command line beats it
    assert choices()["model"] == "tiny_opt" and cfg.data.nsamples == 8


@pytest.mark.parametrize("cmd", [["-m", "sds_exp.bench"], ["scripts/select_hparams.py"]])
def test_script_help(cmd):
    proc = subprocess.run([sys.executable, *cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "key=value" in proc.stdout and "--model" in proc.stdout


@pytest.mark.integration
def test_multirun_with_the_default_sweep_dir(tmp_path, data_dir):
    """``-m`` as the README writes it, no ``hydra.sweep.dir``: Hydra's sweeper resolves the sweep dir before
    HydraConfig is set, so an ``${hydra:...}`` there fails every sweep; the jobs land under the cwd."""
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    env.update(TQDM_DISABLE="1", SDS_DATA_DIR=str(data_dir))
    cmd = [sys.executable, "-m", "sds_exp", "-m", *SMOKE, "sds=prune_only", "sparsity=0.5,0.75"]
    proc = subprocess.run(
        cmd + [f"paths.cache_dir={tmp_path}/cache"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    for num, sparsity in enumerate((0.5, 0.75)):
        state = json.loads((sweep / str(num) / "metrics.json").read_text())
        assert state["status"] == "completed"
        assert state["metrics"]["final/sparsity/mask"] == pytest.approx(sparsity, abs=0.01)
