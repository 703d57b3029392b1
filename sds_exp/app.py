"""The job: the only place that reads the Hydra config. A straight line, each step logged.

Outputs in the run directory: resolved_config.yaml, env.json, metrics.json (the record,
:class:`sds_exp.tracking.record.RunRecord`, rewritten after every stage), layers.json (per-layer sparsity
and reconstruction losses), plots/, checkpoint/ (stage checkpoints for resume), job.log, failure.txt when
the job failed or was killed, history/ and attempts/ when reruns replaced or were refused, and model/ when
``save_model``. :class:`sds_exp.job.Job` owns the record; this module builds the parts from the config.
"""

from __future__ import annotations

import fnmatch
import logging
import random
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from sds_exp.api import Recipe, prune
from sds_exp.checkpoint import save_checkpoint
from sds_exp.data.tokens import tokenizer_fingerprint
from sds_exp.evaluation.stage_eval import (
    HIST_FILE,
    PplSettings,
    StageEvaluator,
    ZeroShotSettings,
    load_histograms,
    plot_histograms,
)
from sds_exp.job import Job
from sds_exp.model_card import model_card
from sds_exp.models.blocks import check_unprunable_params
from sds_exp.models.loading import resolve_dtype
from sds_exp.provenance import STAGE_ORDER
from sds_exp.sds.stages import prunable_layers
from sds_exp.tracking.results import environment, sha256_file, write_json
from sds_exp.validation import validate_config, validate_loaded

__all__ = ["run", "build", "Parts"]

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything the config builds before the model loads (so a bad value costs no model load)."""

    recipe: Recipe  # what the API's `prune` takes: pruner, sparsity spec, SDS settings, regulariser, ignore
    ppl: PplSettings | None
    zeroshot: ZeroShotSettings | None
    resolved: dict[str, Any]
    provenance: dict[str, Any]


def build(cfg: DictConfig) -> Parts:
    """Validate the config and build the components; raises naming the key, the value and what is allowed."""
    validate_config(cfg)
    resolve_dtype(cfg.dtype)
    bench = cfg.benchmark
    zs = OmegaConf.to_container(bench.zeroshot, resolve=True) if bench.get("zeroshot") else None
    if zs is not None:
        from sds_exp.evaluation.zeroshot import check_tasks

        check_tasks(list(zs["tasks"]), cfg.paths.data_dir, num_fewshot=zs["num_fewshot"])
    return Parts(
        recipe=Recipe.from_config(cfg),
        ppl=PplSettings(**OmegaConf.to_container(bench.ppl, resolve=True)) if bench.get("ppl") else None,
        zeroshot=ZeroShotSettings(**zs) if zs is not None else None,
        resolved=OmegaConf.to_container(cfg, resolve=True),
        provenance=_provenance(cfg),
    )


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one job; returns its flat metrics."""
    out_dir = Path(cfg.paths.output_dir)
    hydra = _hydra_job()
    with Job(out_dir, choices=hydra.get("choices"), overrides=hydra.get("overrides")) as job:
        job.set_tracker(partial(_tracker, cfg))
        parts = build(cfg)  # 1. validate and build everything but the model
        store = job.begin(
            resolved=parts.resolved,
            provenance=parts.provenance,
            final_stage=parts.recipe.sds.stages[-1],
            resume=cfg.resume,
            environment=environment(cfg.paths.root_dir, cfg.device),
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        )
        _seed(cfg)
        with job.timer("load"):  # 2. model and calibration data
            loaded = instantiate(cfg.model)
            names = list(prunable_layers(loaded.model, parts.recipe.ignore))
            validate_loaded(cfg, loaded.model, names)
            check_unprunable_params(loaded.model, parts.recipe.ignore)  # fused MoE experts: refused by name
            calib = instantiate(cfg.data)(tokenizer=loaded.tokenizer, data_dir=cfg.paths.data_dir, seed=cfg.seed)
        job.add_metrics({"time/load_s": job.timer.seconds.pop("load")})
        log.info(
            "model %s (%s), calibration %s, %s, pruner %s",
            loaded.name,
            cfg.dtype,
            tuple(calib.shape),
            parts.recipe.spec,
            parts.recipe.pruner,
        )
        hist_layer = _hist_layer(names, cfg.get("hist_layer"))
        evaluator = _evaluator(cfg, parts, loaded, hist_layer, job, resumed=store.last_stage() is not None)
        report = prune(  # 3. the pipeline, through the Python API
            loaded.model,
            calib,
            parts.recipe,
            device=cfg.device,
            batch_size=cfg.calib_batch_size,
            on_stage=evaluator,
            store=store,
            timer=job.timer,
        )
        job.add_metrics(report.summary)  # 4. summary numbers and outputs
        write_json(out_dir / "layers.json", report.layers)
        if hist_layer is not None:
            with job.optional("histogram plots and media"):
                title = f"{loaded.name}: {run_name(cfg, job.choices)}"
                pngs = plot_histograms(evaluator.histograms, hist_layer, out_dir / "plots", title=title)
                final_step = STAGE_ORDER.index(parts.recipe.sds.stages[-1])  # the stage histograms went per stage
                job.tracker.log_images({f"hist/{k}": str(v) for k, v in pngs.items()}, step=final_step)
        if cfg.save_model:
            card = model_card(parts.resolved, job.record.metrics, job.choices)
            yaml_text = OmegaConf.to_yaml(cfg, resolve=True)
            save_checkpoint(loaded.model, loaded.tokenizer, report.masks, yaml_text, out_dir / "model", card=card)
        metrics = job.complete()
        if cfg.save_model and not cfg.get("keep_checkpoint", True):  # the saved model holds the same weights
            shutil.rmtree(store.dir, ignore_errors=True)
        log.info("done: %s", {k: round(v, 4) for k, v in metrics.items() if k.endswith("/ppl")})
        return metrics


def _hydra_job() -> dict[str, Any]:
    try:
        hc = HydraConfig.get()
    except ValueError:  # called without Hydra (tests, notebooks)
        return {}
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    sweep = Path(hc.runtime.output_dir).parent.name if str(hc.mode) == "RunMode.MULTIRUN" else None
    return {"choices": choices, "overrides": list(hc.overrides.task), "sweep": sweep}


def _seed(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.allow_tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)


def _provenance(cfg: DictConfig) -> dict[str, Any]:
    """What the checkpoints depend on beyond the config: the calibration data and the model files."""
    from sds_exp.data.mirror import configure_cache, mirror_provenance
    from sds_exp.data.sources import dataset_files
    from sds_exp.models.loading import model_files_identity

    configure_cache(Path(cfg.paths.cache_dir) / "mirror_sha256.json")  # each mirror file is hashed once
    target = str(cfg.data.get("_target_", ""))
    if target.endswith("from_ids"):
        path = Path(cfg.data.path)
        data = {"source": "file", "path": str(path), "sha256": sha256_file(path)}
    else:
        name = {"c4": "c4_calibration", "wikitext2": "wikitext2_train"}.get(target.rsplit(".", 1)[-1])
        data = mirror_provenance(cfg.paths.data_dir, dataset_files(name)) if name else {"source": target}
    out = {
        "data_provenance": data,
        "model_files": model_files_identity(OmegaConf.to_container(cfg.model, resolve=True)),
    }
    allocation = cfg.get("allocation")
    if allocation is not None and allocation.get("path") and Path(allocation.path).is_file():
        out["allocation_file"] = sha256_file(Path(allocation.path))  # an edited ratio file under the same path
    return out


def _tracker(cfg: DictConfig, previous: dict[str, Any]):
    """The tracker of this job: named from its choices, grouped by its sweep, continuing a resumed run."""
    args = OmegaConf.to_container(cfg.logger, resolve=True)  # `config` clashes with instantiate's own
    if previous.get("id"):
        args["run_id"] = previous["id"]
    hydra = _hydra_job()
    if args.get("group", "absent") is None and hydra.get("sweep"):
        args["group"] = hydra["sweep"]
    config = {**OmegaConf.to_container(cfg, resolve=True), "choices": hydra.get("choices", {})}
    return get_class(args.pop("_target_"))(
        **args, config=config, dir=str(cfg.paths.output_dir), name=run_name(cfg, hydra.get("choices", {}))
    )


def run_name(cfg: DictConfig, choices: dict[str, str]) -> str:
    """``sds-wanda-2:4-s0``, ``oneshot-sparsegpt-50%-s1``: what the job is, at a glance."""
    method = "sds" if cfg.sds.get("redense", True) else "oneshot"
    pruner = choices.get("pruner") or str(cfg.pruner.get("_target_", "?")).rsplit(".", 1)[-1].lower()
    pattern = str(cfg.pattern) if str(cfg.pattern) != "unstructured" else f"{float(cfg.sparsity) * 100:g}%"
    return f"{method}-{pruner}-{pattern}-s{cfg.seed}"


def _dense_cache_key(cfg: DictConfig, parts: Parts, tokenizer) -> dict[str, Any]:
    """Everything the dense perplexity depends on besides the evaluation data and protocol."""
    return {
        "model": parts.resolved["model"],
        "model_files": parts.provenance["model_files"],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": cfg.dtype,
        "device": str(cfg.device),
    }


def _evaluator(cfg: DictConfig, parts: Parts, loaded, hist_layer: str | None, job: Job, resumed: bool):
    state_dir = Path(cfg.resume) if cfg.resume else Path(cfg.paths.output_dir)
    # a resumed job keeps the histograms of the stages it will not run again
    old = load_histograms(state_dir / "plots" / HIST_FILE, hist_layer) if hist_layer and resumed else {}
    return StageEvaluator(
        tokenizer=loaded.tokenizer,
        data_dir=cfg.paths.data_dir,
        device=cfg.device,
        ppl=parts.ppl,
        zeroshot=parts.zeroshot,
        final_stage=parts.recipe.sds.stages[-1],
        layers=lambda m: prunable_layers(m, parts.recipe.ignore),
        hist_layer=hist_layer,
        record=job.record_stage,
        cache_file=Path(cfg.paths.cache_dir) / "dense_ppl.json",
        cache_key=_dense_cache_key(cfg, parts, loaded.tokenizer),
        histograms=old,
        hist_file=Path(cfg.paths.output_dir) / "plots" / HIST_FILE if hist_layer is not None else None,
        optional=job.optional,
        results_dir=Path(cfg.paths.output_dir) / "zeroshot",
    )


def _hist_layer(names: list[str], pattern: str | None) -> str | None:
    if pattern in (None, "auto"):  # the first linear layer of the middle block
        return names[len(names) // 2] if names else None
    matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matches:
        raise ValueError(f"hist_layer={pattern!r} matches no prunable layer; e.g. {names[0] if names else '-'}")
    return matches[0]
