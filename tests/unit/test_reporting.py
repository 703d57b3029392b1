"""Tables and plots from fabricated sweep dirs laid out as Hydra and sds_exp.app write them.

The layout (multirun.yaml, <num>/.hydra/{hydra,overrides,config}.yaml, resolved_config.yaml,
metrics.json) is checked against a real sweep in tests/cli/test_submitit_local.py.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sds_exp.reporting import (
    build_table,
    collect_jobs,
    load_paper_numbers,
    sparsity_series,
    to_latex,
    to_markdown,
)
from sds_exp.reporting.collect import expected_overrides, parse_overrides, pattern_label
from sds_exp.reporting.paper import PAPER_NUMBERS

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"opt125m": "facebook/opt-125m", "opt350m": "facebook/opt-350m"}
PRUNERS = {
    "sparsegpt": "sds_exp.pruners.sparsegpt.SparseGPT",
    "wanda": "sds_exp.pruners.wanda.Wanda",
    "admm": "sds_exp.pruners.admm.ADMM",
    "ria": "sds_exp.pruners.ria.RIA",
    "pruner_zero": "sds_exp.pruners.pruner_zero.PrunerZero",
    "dsnot": "sds_exp.pruners.dsnot.DSnoT",
}
ALLOCATIONS = {
    "uniform": "sds_exp.allocation.uniform.Uniform",
    "owl": "sds_exp.allocation.owl.OWL",
    "file": "sds_exp.allocation.file.FileAllocation",
}
BASE_CHOICES = {
    "model": "opt125m",
    "data": "c4",
    "pruner": "wanda",
    "regularizer": "l1_l2",
    "sds": "default",
    "benchmark": "ppl",
    "logger": "none",
    "paths": "default",
    "hydra": "default",
}


def job_settings(overrides: list[str]) -> dict:
    """The effective settings of a job: defaults, then its overrides."""
    s = {
        **BASE_CHOICES,
        "seed": 0,
        "sparsity": 0.5,
        "pattern": "unstructured",
        "sds.inputs": "sparse",
        "dtype": "float32",
        "data.nsamples": 128,
        "benchmark.ppl.seqlen": 2048,
    }
    s.update(parse_overrides(overrides))
    return s


def resolved_config(s: dict) -> dict:
    zeroshot = {"tasks": ["copa", "piqa"], "stages": ["dense", "final"]} if s["benchmark"] == "paper" else None
    return {
        "seed": s["seed"],
        "sparsity": s["sparsity"],
        "pattern": s["pattern"],
        "device": "cpu",
        "dtype": s["dtype"],
        "data": {"_target_": "sds_exp.data.calibration.c4", "nsamples": s["data.nsamples"], "seqlen": 2048},
        "model": {
            "_target_": "sds_exp.models.loading.load_pretrained",
            "name_or_path": MODELS[s["model"]],
        },
        "pruner": {"_target_": PRUNERS[s["pruner"]]}
        if s["pruner"] != "dsnot"
        else {"_target_": PRUNERS["dsnot"], "base": {"_target_": PRUNERS["wanda"]}},
        "allocation": {"_target_": ALLOCATIONS[s.get("allocation", "uniform")]},
        "regularizer": {} if s["regularizer"] == "none" else {"l1": {"lam": s.get("regularizer.l1.lam", 0.1)}},
        "sds": {
            "redense": s["sds"] != "prune_only",
            "inputs": s["sds.inputs"],
            "adjustment": {"damp": s.get("sds.adjustment.damp", 1.0)},
        },
        "benchmark": {"ppl": {"datasets": ["wikitext2"], "seqlen": s["benchmark.ppl.seqlen"]}, "zeroshot": zeroshot},
    }


def write_job(job: Path, num: int | None, overrides: list[str], result) -> None:
    """One job dir: .hydra/ always, metrics.json + resolved_config.yaml unless "nometrics"."""
    s = job_settings(overrides)
    (job / ".hydra").mkdir(parents=True)
    choices = {k: s[k] for k in BASE_CHOICES} | ({"allocation": s["allocation"]} if "allocation" in s else {})
    mode = "RUN" if num is None else "MULTIRUN"
    OmegaConf.save(
        OmegaConf.create(
            {
                "hydra": {
                    "mode": mode,
                    "job": {"num": "???" if num is None else num},
                    "runtime": {"choices": choices},
                }
            }
        ),
        job / ".hydra" / "hydra.yaml",
    )
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create(resolved_config(s)), job / ".hydra" / "config.yaml")
    if result == "nometrics":
        return
    OmegaConf.save(OmegaConf.create(resolved_config(s)), job / "resolved_config.yaml")
    state = {
        "status": "completed",
        "error": None,
        "choices": {**choices, "debug": None},
        "overrides": overrides,
        "stages_done": [],
        **result,
    }
    (job / "metrics.json").write_text(json.dumps(state))


def write_sweep(root: Path, params: dict[str, str], task: list[str], grid: list[list[str]], outcome) -> Path:
    """A sweep dir as Hydra writes it.

    ``outcome(num, settings)`` returns "nodir", "nometrics", or the metrics.json content.
    """
    root.mkdir(parents=True)
    base = {
        "seed": 0,
        "sparsity": 0.5,
        "pattern": "unstructured",
        **{k: v for k, v in resolved_config(job_settings([])).items() if k not in ("seed", "sparsity", "pattern")},
    }
    OmegaConf.save(
        OmegaConf.create(
            {
                **base,
                "hydra": {
                    "sweeper": {
                        "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                        "max_batch_size": None,
                        "params": params or None,
                    },
                    "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task},
                    "runtime": {"choices": {**BASE_CHOICES, "hydra/launcher": "basic"}},
                },
            }
        ),
        root / "multirun.yaml",
    )
    for num, overrides in enumerate(grid):
        result = outcome(num, job_settings(overrides))
        if result != "nodir":
            write_job(root / str(num), num, overrides, result)
    return root


def grid_of(*axes: tuple[str, list[str]]) -> list[list[str]]:
    """Job overrides in BasicSweeper order: the first axis varies slowest."""
    return [
        [f"{k}={v}" for (k, _), v in zip(axes, combo, strict=True)]
        for combo in itertools.product(*(vals for _, vals in axes))
    ]


def stage_metrics(
    stages: list[str], ppl: dict[str, float], zs: dict[str, float] | None = None, windows: int = 140
) -> dict:
    m = {f"{st}/wikitext2/ppl": ppl[st] for st in stages if st in ppl}
    m.update({f"{st}/wikitext2/windows": float(windows) for st in stages if st in ppl})
    m.update({f"{st}/zeroshot/average/acc": v for st, v in (zs or {}).items()})
    if stages:
        m["final/wikitext2/ppl"] = ppl[stages[-1]]
        m["final/wikitext2/windows"] = float(windows)
    return {"metrics": m, "stages_done": stages}


# ---- scenario A: the OPT 2:4 table, two seeds, with failed, killed and missing jobs ----------

# (model, pruner, sds) -> ppl and zero-shot per seed; zero-shot at "final" only, as benchmark=paper
PPL = {
    ("opt125m", "sparsegpt", "prune_only"): [60.0, 61.0],
    ("opt125m", "sparsegpt", "default"): [51.0, 51.5],
    ("opt125m", "wanda", "prune_only"): [82.0, 83.0],
    ("opt125m", "wanda", "default"): [59.0, 60.0],
    ("opt350m", "sparsegpt", "prune_only"): [35.0, 36.0],
    ("opt350m", "sparsegpt", "default"): [30.0, 31.0],
    ("opt350m", "wanda", "prune_only"): [40.0, 41.0],
    ("opt350m", "wanda", "default"): [33.0, 34.0],
}
ZS = {
    ("opt125m", "sparsegpt", "prune_only"): [0.47, 0.48],
    ("opt125m", "sparsegpt", "default"): [0.50, 0.51],
    ("opt125m", "wanda", "prune_only"): [0.44, 0.45],
    ("opt125m", "wanda", "default"): [0.46, 0.47],
    ("opt350m", "sparsegpt", "prune_only"): [0.50, 0.51],
    ("opt350m", "sparsegpt", "default"): [0.52, 0.53],
    ("opt350m", "wanda", "prune_only"): [0.40, 0.41],
    ("opt350m", "wanda", "default"): [0.49, 0.50],
}
DENSE = {"opt125m": (27.66, 0.52), "opt350m": (22.0, 0.55)}


def opt_outcome(num: int, s: dict):
    key, seed = (s["model"], s["pruner"], s["sds"]), s["seed"]
    if key == ("opt350m", "wanda", "prune_only"):
        return "nodir" if seed == 0 else "nometrics"  # never launched / died before app.run
    dense_ppl, dense_zs = DENSE[s["model"]]
    stages = ["dense", "prune"] if s["sds"] == "prune_only" else ["dense", "prune", "reactivate", "reprune", "adjust"]
    ppl = {"dense": dense_ppl, "prune": PPL[key][seed] + 9, stages[-1]: PPL[key][seed]}
    zs = {"dense": dense_zs, "final": ZS[key][seed]}
    if key == ("opt125m", "sparsegpt", "default") and seed == 1:  # killed in reactivate: no "final"
        out = stage_metrics(["dense", "prune"], {"dense": dense_ppl, "prune": 70.0}, {"dense": dense_zs})
        out["metrics"].pop("final/wikitext2/ppl")
        return {**out, "status": "running"}
    if key == ("opt350m", "wanda", "default") and seed == 1:
        out = stage_metrics(["dense", "prune"], {"dense": dense_ppl, "prune": 45.0}, {"dense": dense_zs})
        out["metrics"].pop("final/wikitext2/ppl")
        return {**out, "status": "failed", "error": "RuntimeError: CUDA out of memory"}
    return stage_metrics(stages, ppl, zs)


@pytest.fixture
def opt_sweep(tmp_path) -> Path:
    params = {"model": "opt125m,opt350m", "pruner": "sparsegpt,wanda", "sds": "prune_only,default"}
    task = ['pattern="2:4"', "benchmark=paper", "seed=0,1"]
    grid = grid_of(
        ("model", ["opt125m", "opt350m"]),
        ("pruner", ["sparsegpt", "wanda"]),
        ("sds", ["prune_only", "default"]),
        ("pattern", ['"2:4"']),
        ("benchmark", ["paper"]),
        ("seed", ["0", "1"]),
    )
    return write_sweep(tmp_path / "sweep", params, task, grid, opt_outcome)


def markdown_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    end = next((i for i, ln in enumerate(lines) if ln.startswith("| job |")), len(lines))
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[:end]]


# OPT-350M has no published number: its paper and Δ columns (all n/a) are left out.
# fmt: off
EXPECTED_OPT_TABLE = [
    ["Sparsity", "Method",
     "OPT-125M ppl", "paper", "Δ", "OPT-125M 0-shot acc %", "paper", "Δ",
     "OPT-350M ppl", "OPT-350M 0-shot acc %"],
    ["0%", "Dense",
     "27.66", "27.66", "+0.00", "52.00", "n/a", "n/a",
     "22.00", "55.00"],
    ["2:4", "SparseGPT",
     "60.50 ± 0.71", "60.43", "+0.07", "47.50 ± 0.71", "47.56*", "-0.06",
     "35.50 ± 0.71", "50.50 ± 0.71"],
    ["2:4", "SDS-SparseGPT",
     "51.00 [1/2 ok, INCOMPLETE]", "51.30", "-0.30",
     "50.00 [1/2 ok, INCOMPLETE]", "49.61*", "+0.39",
     "30.50 ± 0.71", "52.50 ± 0.71"],
    ["2:4", "Wanda",
     "82.50 ± 0.71", "82.47", "+0.03", "44.50 ± 0.71", "n/a", "n/a",
     "MISSING", "MISSING"],
    ["2:4", "SDS-Wanda",
     "59.50 ± 0.71", "59.17", "+0.33", "46.50 ± 0.71", "n/a", "n/a",
     "33.00 [1/2 ok, FAILED]", "49.00 [1/2 ok, FAILED]"],
]
# fmt: on


def test_opt_table_matches_expected(opt_sweep):
    jobs = collect_jobs(opt_sweep)
    assert len(jobs) == 16 and [j.num for j in jobs] == list(range(16))
    status = {j.num: j.status for j in jobs if j.status != "completed"}
    # job numbers in sweep order: model, pruner, sds, seed (seed fastest)
    assert status == {3: "running", 12: "missing", 13: "missing", 15: "failed"}
    assert next(j for j in jobs if j.num == 12).directory is None
    table = build_table(jobs, load_paper_numbers())
    md = to_markdown(table, title="OPT 2:4")
    rows = markdown_rows(md)
    assert rows[0] == EXPECTED_OPT_TABLE[0]
    assert rows[1:] == EXPECTED_OPT_TABLE[1:]
    # the jobs without a result are listed with their reason
    assert "| #15 | FAILED | model=opt350m pruner=wanda sds=default" in md
    assert "RuntimeError: CUDA out of memory" in md
    assert "| #12 | MISSING |" in md and "(no directory)" in md and "no job directory" in md
    assert "| #13 | MISSING |" in md and "no metrics.json" in md
    assert "| #3 | INCOMPLETE |" in md and "killed" in md
    assert "Jobs: 16 (12 completed, 1 failed, 1 running, 2 missing)." in md
    assert "Mean ± sample std over seeds" in md


def test_paper_cells_follow_conditions(tmp_path):
    """The w/o-L1/L2 number only for regularizer=none; zero-shot only for the SDS paper's suite."""
    params = {"regularizer": "none,l1,l1_l2"}
    task = ["model=opt125m", "pruner=sparsegpt", 'pattern="2:4"']
    grid = grid_of(
        ("regularizer", ["none", "l1", "l1_l2"]),
        ("model", ["opt125m"]),
        ("pruner", ["sparsegpt"]),
        ("pattern", ['"2:4"']),
    )
    final = {"none": 52.0, "l1": 51.5, "l1_l2": 51.2}
    sweep = write_sweep(
        tmp_path / "abl",
        params,
        task,
        grid,
        lambda n, s: stage_metrics(
            ["dense", "prune", "reactivate", "reprune", "adjust"],
            {"dense": 27.66, "prune": 60.0, "adjust": final[s["regularizer"]]},
        ),
    )
    table = build_table(collect_jobs(sweep), load_paper_numbers())
    rows = markdown_rows(to_markdown(table))
    assert rows[0] == [
        "Sparsity",
        "Method",
        "OPT-125M ppl",
        "paper",
        "Δ",
    ]  # no zero-shot anywhere: no columns
    assert rows[1:] == [
        ["0%", "Dense", "27.66", "27.66", "+0.00"],
        # one baseline row from the prune stage of the SDS jobs (the regulariser acts after it)
        ["2:4", "SparseGPT", "60.00†", "60.43", "-0.43"],
        ["2:4", "SDS-SparseGPT [regularizer=none]", "52.00", "51.96*", "+0.04"],
        ["2:4", "SDS-SparseGPT [regularizer=l1]", "51.50", "n/a", "n/a"],
        ["2:4", "SDS-SparseGPT [regularizer=l1_l2]", "51.20", "51.30", "-0.10"],
    ]
    # the zero-shot number needs the paper's suite
    paper = load_paper_numbers()
    zs = [n for n in paper if n.metric == "zeroshot/average/acc" and n.method == "SparseGPT"][0]
    assert zs.holds_for({"benchmark": "paper"}.get) and zs.holds_for({"benchmark": "zeroshot_sds7"}.get)
    assert not zs.holds_for({"benchmark": "zeroshot_wanda7"}.get)


def test_job_rerun_in_place_takes_its_slot(opt_sweep):
    """docs/experiments.md: re-run a failed job with hydra.mode=RUN hydra.run.dir=<sweep>/<num>."""
    import shutil

    failed = opt_sweep / "15"
    overrides = OmegaConf.to_container(OmegaConf.load(failed / ".hydra" / "overrides.yaml"))
    shutil.rmtree(failed)
    ppl = {"dense": 22.0, "prune": 45.0, "adjust": 34.0}
    write_job(failed, None, overrides, stage_metrics(["dense", "prune", "adjust"], ppl))
    jobs = collect_jobs(opt_sweep)
    assert len(jobs) == 16 and next(j for j in jobs if j.num == 15).status == "completed"
    assert (
        "| 2:4 | SDS-Wanda | 59.50 ± 0.71 | 59.17 | +0.33 | 46.50 ± 0.71 | n/a | n/a | "
        "33.50 ± 0.71 |" in to_markdown(build_table(jobs, load_paper_numbers()))
    )


def _split_sweeps(tmp_path, rerun_seeds: list[str]) -> tuple[Path, Path]:
    """Sweep A: SDS-Wanda 2:4 and 50%; its 2:4 job was killed, its 50% job never launched.
    Sweep B reruns both cells, with the seeds given, in its own directory (the docs' recipe)."""
    params = {"pattern": '"2:4",unstructured'}
    grid = grid_of(("pattern", ['"2:4"', "unstructured"]))
    killed = stage_metrics(["dense", "prune"], {"dense": 20.0, "prune": 150.0})
    killed["metrics"].pop("final/wikitext2/ppl")
    killed |= {"status": "killed", "error": "killed by SIGTERM"}
    first = write_sweep(tmp_path / "a", params, [], grid, lambda n, s: killed if n == 0 else "nodir")
    ppl = {"2:4": (150.0, 120.0), "unstructured": (53.0, 51.0)}

    def rerun(num: int, s: dict):
        pruned, final = ppl[s["pattern"]]
        return stage_metrics(["dense", "prune", "adjust"], {"dense": 20.0, "prune": pruned, "adjust": final})

    task = [f"seed={','.join(rerun_seeds)}"]
    grid_b = grid_of(("pattern", ['"2:4"', "unstructured"]), ("seed", rerun_seeds))
    return first, write_sweep(tmp_path / "b", params, task, grid_b, rerun)


def test_a_rerun_elsewhere_supersedes_the_killed_and_missing_jobs(tmp_path):
    """A completed job of the same configuration in another sweep fills the cell: no [1/2 ok, KILLED],
    and the killed / never-launched jobs are listed as superseded, with the directory that replaced them."""
    first, second = _split_sweeps(tmp_path, ["0"])
    jobs = collect_jobs(first, second)
    assert [j.status for j in jobs] == ["killed", "missing", "completed", "completed"]
    table = build_table(jobs, [])
    assert [(old.name, new.directory) for old, new in table.superseded] == [("#0", second / "0"), ("#1", second / "1")]
    assert table.problems == []
    md = to_markdown(table)
    assert markdown_rows(md)[1:] == [
        ["0%", "Dense", "20.00"],
        ["2:4", "Wanda", "150.00†"],
        ["2:4", "SDS-Wanda", "120.00"],
        ["50%", "Wanda", "53.00†"],
        ["50%", "SDS-Wanda", "51.00"],
    ]
    assert "Jobs: 4 (2 completed, 1 killed, 1 missing; 2 of them superseded by a completed rerun)." in md
    assert f"| #0 | KILLED | {first / '0'} | {second / '0'} |" in md
    assert f"| #1 | MISSING | (no directory) | {second / '1'} |" in md
    assert "Jobs without a result" not in md
    assert f"% superseded: #0 (killed) {first / '0'} -> {second / '0'}" in to_latex(table)
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "scripts" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(first), str(second), "--out", str(tmp_path / "t"), "--strict"]) == 0
    with (tmp_path / "t" / "jobs.csv").open() as fh:
        audit = {(r["sweep"], r["num"]): r["superseded_by"] for r in csv.DictReader(fh)}
    assert audit[(str(first), "0")] == str(second / "0") and audit[(str(second), "0")] == ""


def test_a_rerun_of_another_seed_does_not_supersede(tmp_path):
    """Only the same configuration replaces a job: a rerun with seed 1 leaves seed 0's cells partial."""
    first, second = _split_sweeps(tmp_path, ["1"])
    table = build_table(collect_jobs(first, second), [])
    assert table.superseded == [] and [j.status for j in table.problems] == ["killed", "missing"]
    rows = markdown_rows(to_markdown(table))
    assert ["2:4", "SDS-Wanda", "120.00 [1/2 ok, KILLED]"] in rows
    assert ["50%", "SDS-Wanda", "51.00 [1/2 ok, MISSING]"] in rows


def test_csv_and_latex(opt_sweep, tmp_path):
    from sds_exp.reporting import write_table

    table = build_table(collect_jobs(opt_sweep), load_paper_numbers())
    paths = write_table(table, tmp_path / "out", title="OPT 2:4")
    rows = {r["method"]: r for r in csv.DictReader(paths["csv"].open())}
    assert rows["SDS-Wanda"]["opt350m:wikitext2/ppl:status"] == "partial (1/2 ok, FAILED)"
    assert float(rows["SDS-Wanda"]["opt350m:wikitext2/ppl:mean"]) == 33.0
    assert rows["SDS-Wanda"]["opt350m:wikitext2/ppl:n"] == "1"
    assert rows["Wanda"]["opt350m:wikitext2/ppl:status"] == "MISSING"
    assert rows["Wanda"]["opt350m:wikitext2/ppl:paper"] == "n/a"
    assert float(rows["SparseGPT"]["opt125m:wikitext2/ppl:std"]) == pytest.approx(0.5**0.5, rel=1e-5)
    assert float(rows["SparseGPT"]["opt125m:wikitext2/ppl:delta"]) == pytest.approx(0.07)
    assert rows["SparseGPT"]["baseline_source"] == "prune_only jobs"
    jobs = list(csv.DictReader(paths["jobs"].open()))
    assert [j["status"] for j in jobs].count("failed") == 1 and len(jobs) == 16

    tex = paths["tex"].read_text()
    body = [ln for ln in tex.splitlines() if ln.endswith(r"\\") and ("Dense" in ln or "GPT &" in ln or "Wanda &" in ln)]
    assert len(body) == 5 and all(ln.count("&") == 9 for ln in body)  # 2 + OPT-125M 6 + OPT-350M 2 columns
    assert r"\multicolumn{6}{c}{OPT-125M}" in tex and r"\multicolumn{2}{c}{OPT-350M}" in tex
    assert r"\cmidrule(lr){3-8} \cmidrule(lr){9-10}" in tex
    assert r"0-shot acc \%" in tex and r"$\pm$" in tex
    assert r"\toprule" in tex and r"\end{tabular}" in tex
    assert "% #15 | FAILED" in tex  # the failure list is kept in the file as comments
    assert paths["md"].read_text() == to_markdown(table, "OPT 2:4")
    assert to_latex(table).count(r"\begin{tabular}") == 1


def test_make_table_script(opt_sweep, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "scripts" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(opt_sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 2:4 | SDS-Wanda | 59.50 ± 0.71 | 59.17 | +0.33 |" in out
    assert {p.name for p in (opt_sweep / "table").iterdir()} == {
        "table.md",
        "table.csv",
        "table.tex",
        "jobs.csv",
    }
    strict = module.main([str(opt_sweep), "--out", str(tmp_path / "t"), "--strict"])
    assert strict == 1  # failures present
    capsys.readouterr()
    assert module.main([str(opt_sweep), "--out", str(tmp_path / "t"), "--no-paper"]) == 0
    assert "60.43" not in capsys.readouterr().out


# ---- scenario C: a sparsity sweep for the plot ----------------------------------------------


def test_sparsity_sweep_plot(tmp_path):
    task = ["model=opt125m", "sparsity=0.5,0.6,0.7", "pruner=wanda,sparsegpt"]
    grid = grid_of(
        ("model", ["opt125m"]),
        ("sparsity", ["0.5", "0.6", "0.7"]),
        ("pruner", ["wanda", "sparsegpt"]),
    )

    def outcome(num, s):
        if s["sparsity"] == 0.7 and s["pruner"] == "sparsegpt":
            return {
                "status": "failed",
                "error": "ValueError: boom",
                "metrics": {},
                "stages_done": [],
            }
        base = {"wanda": 40.0, "sparsegpt": 30.0}[s["pruner"]] * (1 + 10 * (s["sparsity"] - 0.5))
        return stage_metrics(
            ["dense", "prune", "reactivate", "reprune", "adjust"],
            {"dense": 27.66, "prune": base, "adjust": base * 0.8},
        )

    sweep = write_sweep(tmp_path / "sp", {}, task, grid, outcome)
    table = build_table(collect_jobs(sweep), [])
    panel = sparsity_series(table)["opt125m"]
    assert panel.dense == pytest.approx(27.66)
    assert panel.series["SDS-Wanda"] == [
        (0.5, 32.0, 0.0),
        (0.6, pytest.approx(64.0), 0.0),
        (0.7, pytest.approx(96.0), 0.0),
    ]
    assert [x for x, _, _ in panel.series["Wanda (prune stage of SDS)"]] == [0.5, 0.6, 0.7]
    assert [x for x, _, _ in panel.series["SDS-SparseGPT"]] == [0.5, 0.6]
    assert ("SDS-SparseGPT", 0.7, "FAILED") in panel.failed
    assert ("SparseGPT (prune stage of SDS)", 0.7, "FAILED") in panel.failed

    spec = importlib.util.spec_from_file_location("plot_sweep", ROOT / "scripts" / "plot_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(sweep), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not in the table"):
        sparsity_series(table, "zeroshot/average/acc")


# ---- pieces ----------------------------------------------------------------------------------


def test_expected_grid_keeps_quoted_nm_patterns(tmp_path):
    """The sweep value '"2:4",unstructured' expands to the string 2:4, not the YAML int 124."""
    write_sweep(
        tmp_path / "s",
        {"pattern": '"2:4",unstructured', "sds": "prune_only,default"},
        ["seed=0"],
        [],
        lambda n, s: "nodir",
    )
    grid = expected_overrides(tmp_path / "s")
    assert [parse_overrides(g) for g in grid] == [
        {"pattern": "2:4", "sds": "prune_only", "seed": 0},
        {"pattern": "2:4", "sds": "default", "seed": 0},
        {"pattern": "unstructured", "sds": "prune_only", "seed": 0},
        {"pattern": "unstructured", "sds": "default", "seed": 0},
    ]
    jobs = collect_jobs(tmp_path / "s")  # nothing ran: four missing jobs, labelled from the sweep
    assert [j.status for j in jobs] == ["missing"] * 4
    table = build_table(jobs, [])
    assert [(r.pattern, r.method) for r in table.rows] == [
        ("", "Dense"),
        ("2:4", "Wanda"),
        ("2:4", "SDS-Wanda"),
        ("50%", "Wanda"),
        ("50%", "SDS-Wanda"),
    ]
    assert all(c.problem == "MISSING" for r in table.rows for c in r.cells.values())


def test_directory_of_single_runs(tmp_path):
    """Runs side by side (no multirun.yaml): named by directory; dense disagreement is flagged."""
    for name, pruner, dense in (("a_wanda", "wanda", 20.0), ("b_sparsegpt", "sparsegpt", 21.0)):
        ov = [f"pruner={pruner}", "sds=prune_only", 'pattern="2:4"']
        write_job(
            tmp_path / "runs" / name,
            None,
            ov,
            stage_metrics(["dense", "prune"], {"dense": dense, "prune": 50.0}),
        )
    jobs = collect_jobs(tmp_path / "runs")
    assert [(j.name, j.num, j.status) for j in jobs] == [
        ("a_wanda", None, "completed"),
        ("b_sparsegpt", None, "completed"),
    ]
    md = to_markdown(build_table(jobs, []))
    assert "| 2:4 | Wanda | 50.00 |" in md and "| 2:4 | SparseGPT | 50.00 |" in md
    assert "| 0% | Dense | 20.50 |" in md
    assert "Dense wikitext2/ppl of opt-125m differs between jobs (20.00 to 21.00)" in md


def test_rows_of_the_field_pruners_are_named_as_papers_name_them(tmp_path):
    for pruner in ("admm", "ria", "pruner_zero", "dsnot"):
        for sds, stages in (("prune_only", ["dense", "prune"]), ("default", ["dense", "prune", "adjust"])):
            write_job(
                tmp_path / "runs" / f"{pruner}_{sds}",
                None,
                [f"pruner={pruner}", f"sds={sds}", 'pattern="2:4"'],
                stage_metrics(stages, {"dense": 20.0, "prune": 50.0, "adjust": 40.0}),
            )
    md = to_markdown(build_table(collect_jobs(tmp_path / "runs"), []))
    for name in ("ADMM", "RIA", "Pruner-Zero", "DSnoT(Wanda)"):
        assert f"| 2:4 | {name} | 50.00 |" in md and f"| 2:4 | SDS-{name} | 40.00 |" in md, md


def test_rows_of_a_layerwise_allocation_are_named_with_it(tmp_path):
    """OWL jobs are their own rows ("OWL-Wanda", "SDS-OWL-Wanda"), never averaged with uniform ones."""
    ppl = {"uniform": (60.0, 45.0), "owl": (50.0, 35.0)}
    for alloc, (pruned, final) in ppl.items():
        for sds, stages in (("prune_only", ["dense", "prune"]), ("default", ["dense", "prune", "adjust"])):
            write_job(
                tmp_path / "runs" / f"{alloc}_{sds}",
                None,
                [f"allocation={alloc}", f"sds={sds}", "sparsity=0.7"],
                stage_metrics(stages, {"dense": 20.0, "prune": pruned, "adjust": final}),
            )
    md = to_markdown(build_table(collect_jobs(tmp_path / "runs"), []))
    for row in (
        "| 70% | Wanda | 60.00 |",
        "| 70% | SDS-Wanda | 45.00 |",
        "| 70% | OWL-Wanda | 50.00 |",
        "| 70% | SDS-OWL-Wanda | 35.00 |",
    ):
        assert row in md, md


def test_evaluation_only_overrides_do_not_split_rows(tmp_path):
    """A zero-shot suite or fewer windows on intermediate stages leave a job in its method's row."""
    runs = (
        ("sds_a", ["benchmark=paper", "benchmark.zeroshot.limit=100", "benchmark.ppl.max_windows=40"]),
        ("sds_b", ["benchmark.ppl.stage_max_windows={reactivate: 8}", "benchmark.ppl.max_windows=40"]),
    )
    for name, extra in runs:
        ov = ["pruner=wanda", "sds=default", 'pattern="2:4"', *extra]
        write_job(
            tmp_path / "runs" / name,
            None,
            ov,
            stage_metrics(["dense", "prune", "adjust"], {"dense": 20.0, "prune": 50.0, "adjust": 40.0}),
        )
    md = to_markdown(build_table(collect_jobs(tmp_path / "runs"), []))
    assert "| 2:4 | SDS-Wanda | 40.00 |" in md and "zeroshot" not in md.split("| job |")[0]


def test_pattern_labels_and_errors(tmp_path):
    assert pattern_label("2:4", 0.5) == "2:4" and pattern_label(" 4 : 8", 0.5) == "4:8"
    assert pattern_label("unstructured", 0.5) == "50%" and pattern_label("unstructured", 0.625) == "62.5%"
    assert "unquoted" in pattern_label(124, 0.5)
    with pytest.raises(FileNotFoundError):
        collect_jobs(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no job directories"):
        collect_jobs(tmp_path / "empty")


def test_paper_numbers_file():
    """Every line parses, names a model option of conf/model, and is unique for its conditions."""
    numbers = load_paper_numbers()
    options = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    assert {n.model for n in numbers} <= options
    keys = [(n.model, n.pattern, n.method, n.metric, n.conditions) for n in numbers]
    assert len(keys) == len(set(keys))
    assert all(n.source and n.confidence in ("high", "medium", "unstated") for n in numbers)
    assert all(n.unit == ("%" if n.metric.startswith("zeroshot") else "ppl") for n in numbers)
    header = PAPER_NUMBERS.read_text().splitlines()[0]
    assert header == "model,model_name,pattern,method,condition,metric,value,unit,confidence,source,note"


def test_stage_histograms_roundtrip_in_stage_order_and_only_for_their_layer(tmp_path):
    import torch

    from sds_exp.evaluation.stage_eval import load_histograms, save_histograms

    hist = {"dense": torch.randn(12), "prune": torch.randn(12) * torch.tensor([1.0, 0.0] * 6)}
    path = tmp_path / "plots" / "h.safetensors"
    save_histograms(hist, "model.layers.0.q", path)
    back = load_histograms(path, "model.layers.0.q")
    assert list(back) == ["dense", "prune"]
    assert torch.equal(back["prune"] == 0, hist["prune"] == 0)  # zeros stay exact zeros
    assert torch.allclose(back["dense"], hist["dense"], rtol=1e-2)  # bf16
    assert load_histograms(path, "model.layers.1.q") == {}
    assert load_histograms(tmp_path / "missing.safetensors", "model.layers.0.q") == {}


# ---- paper-ready tables: protocol, no empty columns, booktabs ------------------------------


def test_table_states_its_protocol(opt_sweep):
    table = build_table(collect_jobs(opt_sweep), load_paper_numbers())
    protocol = (
        "Protocol: perplexity on WikiText2 test (`wikitext2`), 140 non-overlapping windows of 2048 tokens; "
        "calibration c4 128 × 2048; dtype float32; 0-shot tasks copa, piqa"
    )
    assert table.notes[0].startswith(protocol)
    assert f"- {protocol}" in to_markdown(table)
    caption = next(ln for ln in to_latex(table, "OPT 2:4").splitlines() if ln.startswith(r"\caption{"))
    assert caption.startswith(
        r"\caption{OPT 2:4. Protocol: perplexity on WikiText2 test (wikitext2), 140 non-overlapping windows of "
        r"2048 tokens; calibration c4 128 $\times$ 2048; dtype float32;"
    )
    assert table.protocol.common["dtype"] == "float32" and not table.protocol.per_row


def test_protocol_differences_per_model_and_per_row(tmp_path):
    """Windows differ by tokenizer (per model: stated in the caption); a bf16 job differs within a model (per row)."""
    runs = (
        ("a", "opt125m", [], 140),
        ("b", "opt350m", [], 148),
        ("c", "opt125m", ["dtype=bfloat16"], 140),
        ("d", "opt350m", ["dtype=bfloat16", "data.nsamples=32"], 148),
    )
    for name, model, extra, windows in runs:
        ov = [f"model={model}", "pruner=wanda", "sds=prune_only", 'pattern="2:4"', *extra]
        write_job(
            tmp_path / "runs" / name,
            None,
            ov,
            stage_metrics(["dense", "prune"], {"dense": 20.0, "prune": 50.0}, windows=windows),
        )
    table = build_table(collect_jobs(tmp_path / "runs"), [])
    assert table.protocol.per_model == {"windows": {"opt125m": "140", "opt350m": "148"}}
    assert table.protocol.per_row == ["calibration", "dtype"]
    md = to_markdown(table)
    assert (
        "Protocol: perplexity on WikiText2 test (`wikitext2`), non-overlapping windows of 2048 tokens; "
        "140 windows (opt-125m), 148 windows (opt-350m); differing between rows, see the Protocol column: "
        "calibration, dtype." in md
    )
    rows = markdown_rows(md)
    assert rows[0][:3] == ["Sparsity", "Method", "Protocol"]
    assert rows[1][:3] == ["0%", "Dense", "dtype float32/bfloat16"]  # the dense row needs no calibration
    assert rows[2][1:3] == ["Wanda [dtype=float32, data.nsamples=128]", "calibration c4 128 × 2048; dtype float32"]
    assert rows[3][2] == "calibration c4 128 × 2048; dtype bfloat16"
    assert rows[4][1:3] == ["Wanda [dtype=bfloat16, data.nsamples=32]", "calibration c4 32 × 2048; dtype bfloat16"]


def _empty_columns(rows: list[list[str]]) -> list[str]:
    header, body = rows[0], rows[1:]
    return [h for i, h in enumerate(header) if all(line[i] in ("n/a", "—", "not run", "") for line in body)]


def test_no_column_without_a_number(opt_sweep, tmp_path, capsys):
    md = to_markdown(build_table(collect_jobs(opt_sweep), load_paper_numbers()))
    assert _empty_columns(markdown_rows(md)) == []
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "scripts" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(opt_sweep), "--out", str(tmp_path / "t"), "--no-paper"]) == 0
    capsys.readouterr()
    for text in ((tmp_path / "t" / "table.md").read_text(), (tmp_path / "t" / "table.tex").read_text()):
        assert "paper" not in text.split("Jobs:")[0].replace("paper_numbers", "") and "Δ" not in text
    rows = markdown_rows((tmp_path / "t" / "table.md").read_text())
    assert rows[0] == ["Sparsity", "Method", "opt-125m ppl", "opt-125m 0-shot acc %", "opt-350m ppl",
                       "opt-350m 0-shot acc %"]  # fmt: skip
    assert _empty_columns(rows) == []
    # the CSV keeps its full schema for scripts
    assert "opt350m:wikitext2/ppl:paper" in (tmp_path / "t" / "table.csv").read_text().splitlines()[0]


def test_latex_is_booktabs_without_vertical_rules_or_resizebox(opt_sweep):
    tex = to_latex(build_table(collect_jobs(opt_sweep), load_paper_numbers()), "OPT 2:4", label="tab:opt")
    table_part = tex.split(r"\end{table}")[0]
    assert "|" not in table_part.split(r"\begin{tabular}")[1]
    assert r"\begin{tabular}{llrrrrrrrr}" in tex and r"\resizebox" not in tex and "graphicx" not in tex
    assert tex.startswith(r"% needs \usepackage{booktabs}")
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 1 and r"\hline" not in tex
    assert tex.index(r"\caption{") < tex.index(r"\begin{tabular}") and r"\label{tab:opt}" in tex


# ---- sweeps without a grid (Optuna) --------------------------------------------------------

OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


def test_optuna_sweep_lists_its_trials_with_readable_labels(tmp_path, caplog):
    """No multirun.yaml (only the basic sweeper writes one): the trials found are the jobs."""
    sweep = tmp_path / "optuna"
    trials = [(0.0012345678901234567, 0.37211), (0.00045, 1.0), (0.0012399999, 0.37211)]
    fixed = ["benchmark.ppl.datasets=[wikitext2_val]", "optimized_metric=final/wikitext2_val/ppl"]
    for num, (lam, damp) in enumerate(trials):
        job = sweep / str(num)
        ov = [*fixed, f"regularizer.l1.lam={lam}", f"sds.adjustment.damp={damp}"]
        val = {"dense": 21.0, "prune": 50.0, "adjust": 40.0 + num}
        metrics = {f"{st}/wikitext2_val/ppl": v for st, v in val.items()}
        metrics |= {f"{st}/wikitext2_val/windows": 12.0 for st in val}
        metrics |= {"final/wikitext2_val/ppl": val["adjust"], "final/wikitext2_val/windows": 12.0}
        write_job(job, num, ov, {"metrics": metrics, "stages_done": ["dense", "prune", "reactivate", "adjust"]})
        hydra = OmegaConf.load(job / ".hydra" / "hydra.yaml")
        hydra.hydra.sweeper = {"_target_": OPTUNA, "direction": "minimize"}
        OmegaConf.save(hydra, job / ".hydra" / "hydra.yaml")
    best = {"name": "optuna", "best_params": {"regularizer.l1.lam": trials[0][0]}, "best_value": 40.0}
    OmegaConf.save(OmegaConf.create(best), sweep / "optimization_results.yaml")

    with caplog.at_level("INFO", logger="sds_exp.reporting.collect"):
        assert expected_overrides(sweep) is None
    assert "has no expected grid; listing the job dirs found" in caplog.text
    jobs = collect_jobs(sweep)
    assert [(j.num, j.status) for j in jobs] == [(0, "completed"), (1, "completed"), (2, "completed")]
    table = build_table(jobs, load_paper_numbers(), ppl_dataset="wikitext2_val")
    rows = markdown_rows(to_markdown(table))
    assert rows[0] == ["Sparsity", "Method", "OPT-125M wikitext2_val ppl"]  # no paper number for validation
    assert [r[1:] for r in rows[1:]] == [
        ["Dense", "21.00"],
        ["Wanda", "50.00†"],  # the prune stage: the searched keys act after it
        ["SDS-Wanda [regularizer.l1.lam=0.00123, sds.adjustment.damp=0.37211]", "40.00"],
        ["SDS-Wanda [regularizer.l1.lam=0.00045, sds.adjustment.damp=1.0]", "41.00"],
        ["SDS-Wanda [regularizer.l1.lam=0.00124, sds.adjustment.damp=0.37211]", "42.00"],
    ]
    assert table.notes[0].startswith(
        "Protocol: perplexity on WikiText2 validation (`wikitext2_val`), 12 non-overlapping windows of 2048 tokens"
    )
    assert "Optuna best of optuna: 40 at regularizer.l1.lam=0.0012345678901234567." in table.notes


# ---- the archive: records that outlive outputs/ ---------------------------------------------


def test_archive_keeps_the_records_and_the_table_but_no_weights(opt_sweep, tmp_path):
    from sds_exp.reporting.archive import archive_runs, main

    job = next(p for p in sorted(opt_sweep.iterdir()) if (p / "metrics.json").is_file())
    (job / "checkpoint" / "prune").mkdir(parents=True)
    (job / "checkpoint" / "prune" / "state.json").write_text("{}")  # inside checkpoint/: stays behind
    (job / "weights.safetensors").write_bytes(b"\0" * 16)
    (job / "big.json").write_text("[" + "0," * 3000 + "0]")

    report = archive_runs([opt_sweep], tmp_path / "archive", max_bytes=5000)
    root = tmp_path / "archive" / opt_sweep.name
    assert (root / "multirun.yaml").is_file()
    assert not (root / job.name / "checkpoint").exists()
    skipped = {str(p): why for p, why in report.skipped}
    assert skipped[f"{opt_sweep.name}/{job.name}/weights.safetensors"].startswith("not a record file")
    assert skipped[f"{opt_sweep.name}/{job.name}/big.json"] == "6003 bytes > 5000"
    original = to_markdown(build_table(collect_jobs(opt_sweep), load_paper_numbers()))
    archived = to_markdown(build_table(collect_jobs(root), load_paper_numbers()))
    assert archived.replace(str(root), str(opt_sweep)) == original  # the same table; job paths point into it

    # refused: a directory without records, a missing one, two sources of one name
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no metrics.json"):
        archive_runs([tmp_path / "empty"], tmp_path / "a2")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        archive_runs([tmp_path / "nowhere"], tmp_path / "a2")
    with pytest.raises(ValueError, match="share a directory name"):
        archive_runs([opt_sweep, opt_sweep], tmp_path / "a2")
    assert main([str(tmp_path / "empty"), "--to", str(tmp_path / "a3")]) == 2
    assert not (tmp_path / "a3").exists()
