"""The job: the only place that reads the Hydra config. A straight line, each step logged.

Outputs in the run directory: resolved_config.yaml, env.json, metrics.json (the record,
:class:`sds_exp.tracking.record.RunRecord`, rewritten after every stage), layers.json (per-layer sparsity
and reconstruction losses), plots/, checkpoint/ (stage checkpoints for resume), job.log, failure.txt when
the job failed or was killed, history/ and attempts/ when reruns replaced or were refused, and model/ when
``save_model``. :class:`sds_exp.job.Job` owns the record; this module builds the parts from the config.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from sds_exp.checkpoint import save_checkpoint
from sds_exp.evaluation.sparsity import sparsity_report
from sds_exp.evaluation.stage_eval import (HIST_FILE, PplSettings, StageEvaluator, ZeroShotSettings,
                                           load_histograms, plot_histograms)
from sds_exp.job import Job
from sds_exp.models.loading import resolve_dtype
from sds_exp.regularizers.norms import RegularizerSum
from sds_exp.sds.pipeline import SDSConfig, SDSResult, mask_overlap, run_sds
from sds_exp.sds.stages import prunable_layers
from sds_exp.sds.timing import PhaseTimer
from sds_exp.spec import SparsitySpec
from sds_exp.tracking.results import environment, write_json
from sds_exp.validation import normalize_ignore, validate_config, validate_loaded

__all__ = ["run", "build", "Parts"]

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything the config builds before the model loads (so a bad value costs no model load)."""

    spec: SparsitySpec
    pruner: Any
    regularizer: RegularizerSum
    sds: SDSConfig
    ppl: PplSettings | None
    zeroshot: ZeroShotSettings | None
    ignore: list[str]
    resolved: dict[str, Any]
    provenance: dict[str, Any]


def build(cfg: DictConfig) -> Parts:
    """Validate the config and build the components; raises naming the key, the value and what is allowed."""
    validate_config(cfg)
    spec = SparsitySpec.parse(cfg.sparsity, cfg.pattern)
    resolve_dtype(cfg.dtype)
    bench = cfg.benchmark
    zs = OmegaConf.to_container(bench.zeroshot, resolve=True) if bench.get("zeroshot") else None
    if zs is not None:
        from sds_exp.evaluation.zeroshot import check_tasks

        check_tasks(list(zs["tasks"]), cfg.paths.data_dir, num_fewshot=zs["num_fewshot"])
    return Parts(
        spec=spec, pruner=instantiate(cfg.pruner),
        regularizer=RegularizerSum({k: instantiate(v) for k, v in (cfg.regularizer or {}).items()}),
        sds=instantiate(cfg.sds),
        ppl=PplSettings(**OmegaConf.to_container(bench.ppl, resolve=True)) if bench.get("ppl") else None,
        zeroshot=ZeroShotSettings(**zs) if zs is not None else None,
        ignore=normalize_ignore(cfg.ignore), resolved=OmegaConf.to_container(cfg, resolve=True),
        provenance=_provenance(cfg),
    )


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one job; returns its flat metrics."""
    out_dir = Path(cfg.paths.output_dir)
    with Job(out_dir, **_hydra_job()) as job:
        job.set_tracker(partial(_tracker, cfg))
        parts = build(cfg)  # 1. validate and build everything but the model
        store = job.begin(resolved=parts.resolved, provenance=parts.provenance, final_stage=parts.sds.stages[-1],
                          resume=cfg.resume, environment=environment(cfg.paths.root_dir, cfg.device),
                          config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
        _seed(cfg)
        with job.timer("load"):  # 2. model and calibration data
            loaded = instantiate(cfg.model)
            names = list(prunable_layers(loaded.model, parts.ignore))
            validate_loaded(cfg, loaded.model, names)
            calib = instantiate(cfg.data)(tokenizer=loaded.tokenizer, data_dir=cfg.paths.data_dir, seed=cfg.seed)
        job.add_metrics({"time/load_s": job.timer.seconds.pop("load")})
        log.info("model %s (%s), calibration %s, %s, pruner %s", loaded.name, cfg.dtype, tuple(calib.shape),
                 parts.spec, parts.pruner)
        hist_layer = _hist_layer(names, cfg.get("hist_layer"))
        evaluator = _evaluator(cfg, parts, loaded, hist_layer, job, resumed=store.last_stage() is not None)
        result = run_sds(loaded.model, calib, parts.pruner, parts.spec, parts.sds, parts.regularizer or None,
                         device=cfg.device, batch_size=cfg.calib_batch_size, ignore=parts.ignore,
                         on_stage=evaluator, store=store, timer=job.timer)  # 3. the pipeline
        summary, layer_report = summarise(result, prunable_layers(loaded.model, parts.ignore), parts.spec, job.timer)
        job.add_metrics(summary)  # 4. summary numbers and outputs
        write_json(out_dir / "layers.json", layer_report)
        if hist_layer is not None:
            with job.optional("histogram plots and media"):
                pngs = plot_histograms(evaluator.histograms, hist_layer, out_dir / "plots")
                job.tracker.log_images({f"hist/{k}": str(v) for k, v in pngs.items()})
                job.tracker.log_histograms({f"weights/{k}": w for k, w in evaluator.histograms.items()})
        if cfg.save_model:
            save_checkpoint(loaded.model, loaded.tokenizer, result.masks, OmegaConf.to_yaml(cfg, resolve=True),
                            out_dir / "model")
        metrics = job.complete()
        log.info("done: %s", {k: round(v, 4) for k, v in metrics.items() if k.endswith("/ppl")})
        return metrics


def _hydra_job() -> dict[str, Any]:
    try:
        hc = HydraConfig.get()
    except ValueError:  # called without Hydra (tests, notebooks)
        return {}
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    return {"choices": choices, "overrides": list(hc.overrides.task)}


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
        data = {"source": "file", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        name = {"c4": "c4_calibration", "wikitext2": "wikitext2_train"}.get(target.rsplit(".", 1)[-1])
        data = mirror_provenance(cfg.paths.data_dir, dataset_files(name)) if name else {"source": target}
    return {"data_provenance": data,
            "model_files": model_files_identity(OmegaConf.to_container(cfg.model, resolve=True))}


def _tracker(cfg: DictConfig, previous: dict[str, Any]):
    args = OmegaConf.to_container(cfg.logger, resolve=True)  # `config` clashes with instantiate's own
    if previous.get("id"):
        args["run_id"] = previous["id"]
    out_dir = Path(cfg.paths.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    return get_class(args.pop("_target_"))(**args, config=config, dir=str(out_dir), name=out_dir.name)


def _dense_cache_key(cfg: DictConfig, parts: Parts, tokenizer) -> dict[str, Any]:
    """Everything the dense perplexity depends on besides the evaluation data and protocol."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"model": parts.resolved["model"], "model_files": parts.provenance["model_files"],
            "tokenizer": [type(tokenizer).__name__, len(tokenizer), hashlib.sha256(vocab.encode()).hexdigest()],
            "dtype": cfg.dtype, "device": str(cfg.device)}


def _evaluator(cfg: DictConfig, parts: Parts, loaded, hist_layer: str | None, job: Job, resumed: bool):
    state_dir = Path(cfg.resume) if cfg.resume else Path(cfg.paths.output_dir)
    # a resumed job keeps the histograms of the stages it will not run again
    old = load_histograms(state_dir / "plots" / HIST_FILE, hist_layer) if hist_layer and resumed else {}
    return StageEvaluator(
        tokenizer=loaded.tokenizer, data_dir=cfg.paths.data_dir, device=cfg.device, ppl=parts.ppl,
        zeroshot=parts.zeroshot, final_stage=parts.sds.stages[-1],
        layers=lambda m: prunable_layers(m, parts.ignore), hist_layer=hist_layer, record=job.record_stage,
        cache_file=Path(cfg.paths.cache_dir) / "dense_ppl.json",
        cache_key=_dense_cache_key(cfg, parts, loaded.tokenizer), histograms=old,
        hist_file=Path(cfg.paths.output_dir) / "plots" / HIST_FILE if hist_layer is not None else None,
        optional=job.optional,
    )


def _hist_layer(names: list[str], pattern: str | None) -> str | None:
    if pattern in (None, "auto"):  # the first linear layer of the middle block
        return names[len(names) // 2] if names else None
    matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matches:
        raise ValueError(f"hist_layer={pattern!r} matches no prunable layer; e.g. {names[0] if names else '-'}")
    return matches[0]


def summarise(result: SDSResult, layers: dict, spec: SparsitySpec, timer: PhaseTimer) -> tuple[dict, dict]:
    """Job-level numbers (stage times, mask sparsity and overlap, mean layer losses) and the per-layer report."""
    m = {f"time/{k}_s": v for k, v in result.seconds.items()}
    m.update({f"time/phase/{k}_s": v for k, v in timer.seconds.items()})
    sp = sparsity_report(layers, result.masks)
    m["final/sparsity/mask"] = sp["mask"]
    m["sparsity/target"] = spec.ratio
    if result.reprune_masks is not None:  # how much of the first mask the re-prune chose again
        m["reprune/mask_overlap"] = mask_overlap(result.first_masks, result.reprune_masks)
    if result.first_masks is not result.masks:  # ... and what is left of it after adjust moved it
        m["final/mask_overlap"] = mask_overlap(result.first_masks, result.masks)
    for stage, rep in result.reports.items():
        for key in ("loss_before", "loss_after", "loss_plain", "loss_adjusted", "adjust_kept"):
            vals = [r[key] for r in rep.values() if key in r]
            if vals:
                m[f"{stage}/recon/{key}_mean"] = sum(vals) / len(vals)
    layer_report = {"sparsity": {k: v for k, v in sp.items() if k.startswith("layer/")}, "reports": result.reports}
    return m, layer_report
