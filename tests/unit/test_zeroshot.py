"""Zero-shot plumbing without a model: suites, shipped task configs, flattening, data checks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sds_exp.evaluation import zeroshot as zs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: zeroshot_helpers
from zeroshot_helpers import REPO_ROOT, offline, require_mirror  # noqa: E402

SDS7 = ["copa", "lambada_openai", "openbookqa", "piqa", "rte", "storycloze_2016", "winogrande"]
WANDA7 = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
ZEROSHOT_KEYS = {"tasks", "stages", "limit", "batch_size", "num_fewshot", "seed"}
ZEROSHOT_KEYS |= {"bootstrap_iters"}


# --------------------------------------------------------------------------- suites


def benchmark(option: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        cfg = compose(config_name="config", overrides=[f"benchmark={option}"])
    return cfg.benchmark


@pytest.mark.parametrize(
    ("option", "tasks", "has_ppl"),
    [("zeroshot_sds7", SDS7, False), ("zeroshot_wanda7", WANDA7, False), ("paper", SDS7, True)],
)
def test_suites_compose(option: str, tasks: list[str], has_ppl: bool) -> None:
    bench = benchmark(option)
    assert set(bench) == {"ppl", "zeroshot"}
    assert (bench.ppl is not None) == has_ppl
    assert set(bench.zeroshot) == ZEROSHOT_KEYS
    assert list(bench.zeroshot.tasks) == tasks
    assert list(bench.zeroshot.stages) == ["dense", "final"]
    assert bench.zeroshot.num_fewshot == 0 and bench.zeroshot.limit is None
    assert set(tasks) <= set(zs.mirrored_tasks())  # every suite task has an offline config


def test_paper_is_ppl_plus_sds7() -> None:
    paper = OmegaConf.load(REPO_ROOT / "conf/benchmark/paper.yaml")
    ppl = OmegaConf.load(REPO_ROOT / "conf/benchmark/ppl.yaml")
    sds7 = OmegaConf.load(REPO_ROOT / "conf/benchmark/zeroshot_sds7.yaml")
    assert paper.ppl == ppl.ppl
    assert paper.zeroshot == sds7.zeroshot


# --------------------------------------------------------------------------- shipped task configs


@pytest.mark.parametrize("task", zs.mirrored_tasks())
def test_template_includes_the_stock_task_of_its_name(task: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    template = yaml.safe_load((zs._TEMPLATE_DIR / f"{task}.yaml").read_text())
    stock_path = zs._lm_eval_tasks_dir() / template["include"]
    assert stock_path.is_file()
    stock = load_yaml(stock_path, resolve_func=False)
    assert stock["task"] == task
    assert "task" not in template  # the name comes from the stock file
    # Only the data source, unavailable splits and (HellaSwag) the mirror's preprocessing differ:
    allowed = {"include", "dataset_path", "dataset_name", "dataset_kwargs", "training_split"}
    if "test" in template["dataset_kwargs"]["data_files"]:
        allowed.add("validation_split")
    if task == "hellaswag":
        allowed |= {"process_docs", "doc_to_target", "metadata"}
    assert set(template) <= allowed
    for split in template["dataset_kwargs"]["data_files"]:  # the splits lm-eval will ask for exist
        assert split in {stock.get("validation_split"), stock.get("test_split")}
    evaluated = stock.get("test_split") or stock.get("validation_split")
    assert evaluated in template["dataset_kwargs"]["data_files"]


def test_mirror_has_every_shipped_task() -> None:
    root = require_mirror()
    for task in zs.mirrored_tasks():
        files = zs.mirror_files(task, root)
        assert files and all(p.is_file() for p in files.values()), task


def test_written_configs_are_absolute(tmp_path: Path) -> None:
    root = require_mirror()
    written = zs.write_task_configs(["piqa", "storycloze_2016"], root, tmp_path / "cfg")
    piqa = yaml.safe_load(written["piqa"].read_text())
    assert Path(piqa["include"]).is_absolute() and Path(piqa["include"]).is_file()
    assert piqa["dataset_kwargs"]["data_files"] == {"validation": str(root / "lm-eval-tasks/piqa/validation.hf.jsonl")}
    story = yaml.safe_load(written["storycloze_2016"].read_text())
    assert set(story["dataset_kwargs"]["data_files"]) == {"validation", "test"}


def test_resolve_sources(tmp_path: Path) -> None:
    root = require_mirror()
    assert {s.kind for s in zs.resolve_sources(SDS7, root).values()} == {"mirror"}
    assert {s.kind for s in zs.resolve_sources(SDS7, None).values()} == {"hub"}
    assert zs.resolve_sources(["piqa"], tmp_path)["piqa"].kind == "hub"  # no files there


# --------------------------------------------------------------------------- data checks


def test_missing_task_names_task_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)
    with pytest.raises(zs.ZeroShotDataError) as err:
        zs.check_tasks(["piqa", "copa"], tmp_path)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "'piqa'" in message and "'copa'" in message
    assert str(tmp_path / "lm-eval-tasks" / "piqa" / "validation.hf.jsonl") in message
    assert str(tmp_path / "lm-eval-tasks" / "copa" / "validation.hf.jsonl") in message
    assert "baber/piqa" in message  # the hub dataset it also tried


def test_mirror_passes_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)
    zs.check_tasks(zs.mirrored_tasks(), require_mirror())  # raises if anything is missing


def test_fewshot_needs_the_stock_fewshot_split(monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)
    root = require_mirror()
    with pytest.raises(zs.ZeroShotDataError, match=r"'piqa'.*'train'"):
        zs.check_tasks(["piqa"], root, num_fewshot=5)
    zs.check_tasks(["storycloze_2016"], root, num_fewshot=2)  # stock draws from validation


# --------------------------------------------------------------------------- results


def lm_eval_output() -> dict:
    """The shape ``lm_eval.simple_evaluate`` returns (0.4.13), trimmed."""
    return {
        "results": {
            "piqa": {
                "alias": "piqa",
                "acc,none": 0.75,
                "acc_stderr,none": "N/A",
                "acc_norm,none": 0.5,
                "acc_norm_stderr,none": 0.1,
            },
            "copa": {"alias": "copa", "acc,none": 0.25, "acc_stderr,none": "N/A"},
            "lambada_openai": {
                "alias": "lambada_openai",
                "perplexity,none": 12.5,
                "acc,none": 0.5,
            },
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.125},
        },
        "versions": {"piqa": 1.0, "copa": 1.0},
        "n-samples": {"piqa": {"original": 1838, "effective": 4}},
        "configs": {"piqa": {}, "copa": {}, "lambada_openai": {}},
    }


def test_flatten_results() -> None:
    assert zs.flatten_results(lm_eval_output()) == {
        "copa/acc": 0.25,
        "gsm8k/exact_match_strict-match": 0.125,
        "lambada_openai/acc": 0.5,
        "lambada_openai/perplexity": 12.5,
        "piqa/acc": 0.75,
        "piqa/acc_norm": 0.5,
        "piqa/acc_norm_stderr": 0.1,
        "piqa/n_samples": 4.0,
    }
    assert zs.flatten_results({}) == {}


def test_suite_average_over_tasks_that_report_the_metric() -> None:
    flat = zs.flatten_results(lm_eval_output())
    averages = zs.suite_average(flat, ["piqa", "copa", "lambada_openai"])
    assert math.isclose(averages["average/acc"], (0.75 + 0.25 + 0.5) / 3)
    assert averages["average/acc_norm"] == 0.5  # piqa only
    # a group's own entry is not a task: averaging over leaves never counts it twice
    assert zs.suite_average({"grp/acc": 1.0, "a/acc": 0.0}, ["a"]) == {"average/acc": 0.0}
    assert zs.suite_average({"copa/acc": 0.5}, ["copa"], names=("acc_norm",)) == {}
