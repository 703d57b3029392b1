"""Zero-shot accuracy through lm-eval 0.4's Python API, on the in-memory model.

The model object is wrapped in ``lm_eval.models.huggingface.HFLM`` and scored with
``lm_eval.simple_evaluate``: no reload from disk and no forked harness (the Wanda repo's lm-eval
fork is what this replaces).

Where the data comes from, per task:

* **mirror**: ``<data_dir>/lm-eval-tasks/<task>/...`` holds the task's rows. The project ships one
  task-config template per mirrored task (``lm_eval_tasks/<task>.yaml`` next to this module). Each
  ``include``s the stock lm-eval YAML (so prompt, choices, target, metrics and version are
  lm-eval's own and cannot drift) and swaps only the data source to local JSON files. The templates
  are made absolute into a temporary directory and handed to lm-eval's
  ``TaskManager(include_path=...)``, which works from any working directory. The task keeps its
  stock name, so results read ``piqa/acc`` whichever source was used;
  ``ZeroShotResult.versions["data_source"]`` records which one it was.
* **hub**: otherwise the stock task is used, and lm-eval downloads its dataset.

``check_tasks`` runs before any model work and fails with a message naming each task whose data is
in neither place, and the mirror file it looked for.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from sds_exp.extras import require

__all__ = [
    "MIRROR_SUBDIR",
    "AVERAGED_METRICS",
    "ZeroShotDataError",
    "ZeroShotResult",
    "TaskSource",
    "mirrored_tasks",
    "mirror_files",
    "resolve_sources",
    "write_task_configs",
    "check_tasks",
    "flatten_results",
    "suite_average",
    "evaluate_zeroshot",
]

log = logging.getLogger(__name__)

MIRROR_SUBDIR = "lm-eval-tasks"  # <data_dir>/lm-eval-tasks/<task>/<file>
AVERAGED_METRICS = ("acc", "acc_norm")  # the suite average is taken over these
_TEMPLATE_DIR = Path(__file__).with_name("lm_eval_tasks")


class ZeroShotDataError(ValueError):
    """A zero-shot task whose data neither the mirror nor the hub can provide."""


@dataclass(frozen=True)
class TaskSource:
    """Where one task's rows come from.

    Attributes:
        task: lm-eval task name.
        kind: ``"mirror"`` (the project's task config over local files) or ``"hub"`` (stock task).
        location: the mirror files (comma-separated absolute paths) or ``"hub"``.
    """

    task: str
    kind: Literal["mirror", "hub"]
    location: str


@dataclass
class ZeroShotResult:
    """Flat zero-shot metrics of one evaluation.

    Attributes:
        metrics: ``"<task>/<metric>"`` (e.g. ``"piqa/acc_norm"``, ``"lambada_openai/perplexity"``,
            ``"piqa/n_samples"``) plus ``"average/acc"`` and ``"average/acc_norm"``: the suite mean
            over the tasks that report the metric.
        versions: lm-eval's per-task versions (``results["versions"]``), ``"lm_eval"``: the package
            version, and ``"data_source"``: ``{task: mirror files or "hub"}``.
        seconds: wall time of the evaluation.
        raw: lm-eval's own results dict (results, configs, versions, n-shot, task hashes...), JSON-safe,
            without per-sample logs: what the job writes to ``zeroshot/<stage>.json``.
    """

    metrics: dict[str, float]
    versions: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- task configs


def _lm_eval_tasks_dir() -> Path:
    return Path(require("lm_eval.tasks", "zeroshot").__file__).parent


def mirrored_tasks() -> list[str]:
    """Names of the tasks the project ships a data-mirror config for."""
    return sorted(p.stem for p in _TEMPLATE_DIR.glob("*.yaml"))


def _template(task: str) -> dict[str, Any] | None:
    path = _TEMPLATE_DIR / f"{task}.yaml"
    if not path.is_file():
        return None
    with path.open() as fh:
        return yaml.safe_load(fh)


def mirror_files(task: str, data_dir: str | Path | None) -> dict[str, Path]:
    """The mirror files a task's shipped config reads, by split (absolute; they may not exist).

    Args:
        task: lm-eval task name.
        data_dir: the data mirror root (holds ``lm-eval-tasks/``), or None.

    Returns:
        ``{split: path}``; empty when no config is shipped for ``task`` or ``data_dir`` is None.
    """
    template = _template(task)
    if template is None or data_dir is None:
        return {}
    root = Path(data_dir).expanduser().resolve() / MIRROR_SUBDIR
    data_files = template["dataset_kwargs"]["data_files"]
    return {split: root / rel for split, rel in data_files.items()}


def _resolved_config(task: str, data_dir: str | Path) -> dict[str, Any]:
    """The task's template with ``include`` and ``data_files`` made absolute."""
    config = copy.deepcopy(_template(task))
    if config is None:
        raise KeyError(f"no data-mirror config is shipped for task {task!r}")
    config["include"] = str(_lm_eval_tasks_dir() / config["include"])
    files = mirror_files(task, data_dir)
    config["dataset_kwargs"]["data_files"] = {split: str(p) for split, p in files.items()}
    return config


def write_task_configs(tasks: Iterable[str], data_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the resolved mirror configs of ``tasks`` into ``out_dir``.

    The directory can be passed to ``lm_eval --include_path`` (the tasks keep their stock names and
    take precedence over the stock ones) or to ``TaskManager(include_path=...)``.

    Args:
        tasks: mirrored task names (see :func:`mirrored_tasks`).
        data_dir: the data mirror root.
        out_dir: directory to write ``<task>.yaml`` files into (created if needed).

    Returns:
        ``{task: written path}``.

    Raises:
        ZeroShotDataError: a task has no shipped config or a mirror file is missing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in dict.fromkeys(tasks):
        if _template(task) is None:
            raise ZeroShotDataError(
                f"zero-shot task {task!r}: no data-mirror config is shipped for it "
                f"(mirrored: {', '.join(mirrored_tasks())})"
            )
        missing = [p for p in mirror_files(task, data_dir).values() if not p.is_file()]
        if missing:
            raise ZeroShotDataError(f"zero-shot task {task!r}: mirror file not found: {', '.join(map(str, missing))}")
        path = out / f"{task}.yaml"
        path.write_text(yaml.safe_dump(_resolved_config(task, data_dir), sort_keys=False))
        written[task] = path
    return written


# --------------------------------------------------------------------------- data sources


def resolve_sources(tasks: Sequence[str], data_dir: str | Path | None) -> dict[str, TaskSource]:
    """Pick each task's source: the mirror when all its files exist, else the hub.

    Args:
        tasks: lm-eval task names (duplicates are dropped).
        data_dir: the data mirror root, or None for hub only.

    Returns:
        ``{task: TaskSource}``. Only files are looked at; :func:`check_tasks` also asks the hub.
    """
    sources = {}
    for task in dict.fromkeys(tasks):
        files = mirror_files(task, data_dir)
        if files and all(p.is_file() for p in files.values()):
            sources[task] = TaskSource(task, "mirror", ",".join(str(p) for p in files.values()))
        else:
            sources[task] = TaskSource(task, "hub", "hub")
    return sources


@functools.lru_cache(maxsize=1)
def _stock_index() -> Mapping[str, Any]:
    """lm-eval's task index (name -> Entry); building it reads every stock YAML (~7 s)."""
    TaskManager = require("lm_eval.tasks", "zeroshot").TaskManager  # noqa: N806

    return TaskManager().task_index


def _stock_config(task: str) -> dict[str, Any] | None:
    """The stock task's YAML (includes resolved, functions not imported), or None if unknown."""
    load_yaml = require("lm_eval.tasks._yaml_loader", "zeroshot").load_yaml

    template = _template(task)
    if template is not None:
        return load_yaml(_lm_eval_tasks_dir() / template["include"], resolve_func=False)
    entry = _stock_index().get(task)
    if entry is None:
        return None
    return dict(entry.cfg or {})  # groups and tags have no dataset of their own


def _fewshot_split(stock: Mapping[str, Any]) -> str | None:
    """The split lm-eval draws few-shot examples from (``ConfigurableTask.fewshot_docs`` order)."""
    fewshot_config = stock.get("fewshot_config") or {}
    for split in (
        fewshot_config.get("split"),
        stock.get("fewshot_split"),
        stock.get("training_split"),
        stock.get("validation_split"),
        stock.get("test_split"),
    ):
        if split:
            return split
    return None


def _hub_problem(stock: Mapping[str, Any]) -> str | None:
    """Why neither the hub nor the local HF datasets cache can provide the stock dataset, or None.

    Uses ``datasets.load_dataset_builder``, which honours ``HF_HUB_OFFLINE`` and
    ``HF_DATASETS_OFFLINE`` (then only the local cache counts) and otherwise asks the hub (about
    20 s of retries when the network is down).
    """
    path = stock.get("dataset_path")
    if not path:
        return None  # a group, tag or Python task: lm-eval resolves it itself
    import datasets

    try:
        datasets.load_dataset_builder(path, stock.get("dataset_name"))
    except Exception as err:  # any failure means "not available"; the message says why
        name = f" (config {stock['dataset_name']!r})" if stock.get("dataset_name") else ""
        return f"hub dataset {path!r}{name} unavailable: {type(err).__name__}: {err}"
    return None


def check_tasks(tasks: Sequence[str], data_dir: str | Path | None, *, num_fewshot: int = 0) -> None:
    """Fail early when a task's data is available neither from the mirror nor from the hub.

    Called before any model work. A task is served by the mirror when the project ships its config
    and all its files exist under ``<data_dir>/lm-eval-tasks/``; otherwise by the hub, which is
    checked with ``datasets.load_dataset_builder``.

    Args:
        tasks: lm-eval task names.
        data_dir: the data mirror root, or None for hub only.
        num_fewshot: few-shot examples per prompt; the mirror has no train splits, so for most
            mirrored tasks only 0 keeps the stock protocol.

    Raises:
        ZeroShotDataError: one line per unavailable task, naming it and the files it looked for.
    """
    problems = []
    for task, source in resolve_sources(tasks, data_dir).items():
        stock = _stock_config(task)
        if source.kind == "mirror":
            split = _fewshot_split(stock)
            if num_fewshot > 0 and split not in mirror_files(task, data_dir):
                problems.append(
                    f"zero-shot task {task!r}: num_fewshot={num_fewshot} draws examples from the "
                    f"{split!r} split, which the data mirror lacks (it has: "
                    f"{', '.join(mirror_files(task, data_dir))}); use num_fewshot=0"
                )
            continue
        if stock is None:
            problems.append(f"zero-shot task {task!r}: not a task of the installed lm-eval")
            continue
        hub_problem = _hub_problem(stock)
        if hub_problem is None:
            continue
        files = mirror_files(task, data_dir)
        if files:
            looked = "looked for " + ", ".join(str(p) for p in files.values() if not p.is_file())
        elif data_dir is None:
            looked = "no data mirror given (data_dir is None)"
        else:
            looked = (
                f"no data-mirror config is shipped for it (looked for {_TEMPLATE_DIR / task}.yaml;"
                f" mirrored: {', '.join(mirrored_tasks())})"
            )
        problems.append(f"zero-shot task {task!r}: not in the data mirror ({looked}); {hub_problem}")
    if problems:
        raise ZeroShotDataError("\n".join(problems))


# --------------------------------------------------------------------------- results


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten_results(results: Mapping[str, Any]) -> dict[str, float]:
    """Flatten lm-eval's output into ``"<task>/<metric>"`` floats.

    ``"acc,none"`` becomes ``"<task>/acc"``; another filter ``f`` gives ``"<task>/<metric>_<f>"``.
    Non-numeric entries (``alias``, stderr ``"N/A"`` when bootstrapping is off) are dropped. The
    number of evaluated examples becomes ``"<task>/n_samples"``.

    Args:
        results: the dict returned by ``lm_eval.simple_evaluate``.

    Returns:
        Flat metrics, sorted by name.
    """
    flat: dict[str, float] = {}
    for task, task_metrics in results.get("results", {}).items():
        for key, value in task_metrics.items():
            if "," not in key or not _is_number(value):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            flat[f"{task}/{name}"] = float(value)
    for task, counts in results.get("n-samples", {}).items():
        if _is_number(counts.get("effective")):
            flat[f"{task}/n_samples"] = float(counts["effective"])
    return dict(sorted(flat.items()))


def suite_average(
    metrics: Mapping[str, float],
    tasks: Iterable[str],
    names: Sequence[str] = AVERAGED_METRICS,
) -> dict[str, float]:
    """Unweighted mean of each metric over the tasks that report it.

    Args:
        metrics: flat metrics from :func:`flatten_results`.
        tasks: the leaf tasks of the suite (groups excluded, so nothing is counted twice).
        names: metrics to average.

    Returns:
        ``{"average/<name>": mean}`` for each name at least one task reports.
    """
    tasks = list(tasks)
    averages = {}
    for name in names:
        values = [metrics[f"{t}/{name}"] for t in tasks if f"{t}/{name}" in metrics]
        if values:
            averages[f"average/{name}"] = math.fsum(values) / len(values)
    return averages


# --------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore the global random/numpy/torch RNG states that ``simple_evaluate`` reseeds."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _evaluating_on(model: torch.nn.Module, device: str | torch.device | None) -> Iterator[None]:
    """Put ``model`` on ``device`` in eval mode, and back where and how it was afterwards.

    Models dispatched with a ``device_map`` (accelerate hooks) are left where they are.
    """
    was_training = model.training
    origin = next(model.parameters()).device
    move = device is not None and torch.device(device) != origin and not getattr(model, "hf_device_map", None)
    if move:
        model.to(device)
    try:
        yield
    finally:
        if move:
            model.to(origin)
        model.train(was_training)


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | Path | None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    seed: int = 0,
    bootstrap_iters: int = 0,
    device: str | torch.device | None = "cpu",
) -> ZeroShotResult:
    """Score the in-memory ``model`` on lm-eval ``tasks``.

    The model is neither copied nor reloaded; it is moved to ``device`` for the evaluation and back
    afterwards, and its train/eval mode and the global RNG states are restored. The tokenizer is
    copied, because lm-eval sets a pad token on the object it is given.

    Args:
        model: a causal LM (``transformers.PreTrainedModel``).
        tokenizer: its tokenizer.
        tasks: lm-eval task names.
        data_dir: the data mirror root; tasks whose mirror files exist are read from it.
        limit: examples per task (int) or fraction of each task (float < 1); None = all.
        batch_size: sequences per forward pass.
        num_fewshot: examples in each prompt's context.
        seed: lm-eval's python, numpy, torch and few-shot seeds.
        bootstrap_iters: bootstrap resamples for stderr; 0 = none.
        device: where to run the model (None = where it is).

    Returns:
        Flat metrics with the suite average, versions and data sources, and the wall time.
    """
    lm_eval = require("lm_eval", "zeroshot")
    HFLM = require("lm_eval.models.huggingface", "zeroshot").HFLM  # noqa: N806
    TaskManager = require("lm_eval.tasks", "zeroshot").TaskManager  # noqa: N806

    start = time.perf_counter()
    tasks = list(dict.fromkeys(tasks))
    sources = resolve_sources(tasks, data_dir)
    mirrored = [t for t, s in sources.items() if s.kind == "mirror"]
    log.info(
        "zero-shot: %s (mirror: %s; hub: %s), limit=%s, num_fewshot=%d",
        ", ".join(tasks),
        ", ".join(mirrored) or "-",
        ", ".join(t for t in tasks if t not in mirrored) or "-",
        limit,
        num_fewshot,
    )
    with (
        tempfile.TemporaryDirectory(prefix="sds_lm_eval_tasks_") as config_dir,
        _preserved_rng(),
        _evaluating_on(model, device),
    ):
        if mirrored:
            write_task_configs(mirrored, data_dir, config_dir)
        task_manager = TaskManager(
            include_path=config_dir if mirrored else None,
            # the stock index is only needed for hub tasks; skipping it saves ~7 s
            include_defaults=len(mirrored) < len(tasks),
        )
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            task_manager=task_manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    metrics = flatten_results(results)
    metrics.update(suite_average(metrics, results.get("configs", {}).keys()))
    versions: dict[str, Any] = dict(results.get("versions", {}))
    versions["lm_eval"] = lm_eval.__version__
    versions["data_source"] = {t: s.location for t, s in sources.items()}
    seconds = time.perf_counter() - start
    log.info("zero-shot done in %.1f s: %s", seconds, _summary_line(metrics))
    raw = json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=str))
    return ZeroShotResult(metrics=metrics, versions=versions, seconds=seconds, raw=raw)


def _summary_line(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.rsplit("/", 1)[-1] in AVERAGED_METRICS)
