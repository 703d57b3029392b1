"""The job: the only place that reads the Hydra config. A straight line, each step logged.

Outputs in the run directory: resolved_config.yaml, env.json, metrics.json (flat ``stage/benchmark/metric``
names, rewritten after every stage and marked ``failed`` with the reason if the job dies), layers.json
(per-layer sparsity and reconstruction losses), plots/, job.log, and a checkpoint when ``save_model``.
"""

from __future__ import annotations

import fnmatch
import gc
import logging
import random
import time
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from sds_exp.checkpoint import StageStore, config_differences, save_checkpoint
from sds_exp.evaluation.sparsity import sparsity_report
from sds_exp.evaluation.stage_eval import HIST_FILE, PplSettings, StageEvaluator, load_histograms, plot_histograms
from sds_exp.models.loading import resolve_dtype
from sds_exp.regularizers.norms import RegularizerSum
from sds_exp.sds.pipeline import SDSResult, mask_overlap, run_sds
from sds_exp.sds.timing import PhaseTimer
from sds_exp.sds.stages import prunable_layers
from sds_exp.spec import SparsitySpec
from sds_exp.tracking.results import atomic_write_text, environment, read_json, write_json

__all__ = ["run"]

log = logging.getLogger(__name__)


def _choices() -> dict:
    try:
        hc = HydraConfig.get()
        return {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}, list(hc.overrides.task)
    except ValueError:  # called without Hydra (tests, notebooks)
        return {}, []


def _hist_layer(names: list[str], pattern: str | None) -> str | None:
    if pattern in (None, "auto"):  # the first linear layer of the middle block
        return names[len(names) // 2] if names else None
    matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matches:
        raise ValueError(f"hist_layer={pattern!r} matches no prunable layer; e.g. {names[0] if names else '-'}")
    return matches[0]


def _check_resumable(state_dir: Path, resolved: dict, state: dict) -> None:
    """Refuse a resume whose config differs in anything that changes results; carry the old metrics over."""
    import yaml

    saved = yaml.safe_load((state_dir / "resolved_config.yaml").read_text(encoding="utf-8"))
    diffs = config_differences(saved, resolved)
    if diffs:
        raise ValueError(f"cannot resume from {state_dir}: the config differs in\n  " + "\n  ".join(diffs))
    old = read_json(state_dir / "metrics.json") if (state_dir / "metrics.json").is_file() else {}
    state["metrics"].update(old.get("metrics", {}))
    state["stages_done"] = list(old.get("stages_done", []))
    state["resumed_from"] = str(state_dir)
    log.info("resuming from %s (stages done: %s)", state_dir, ", ".join(state["stages_done"]) or "none")


def _copy_store(store: StageStore, out_dir: Path) -> StageStore:
    """Resuming from another directory: continue its checkpoint in this job's directory."""
    import shutil

    target = out_dir / "checkpoint"
    if target.resolve() != store.dir.resolve():
        shutil.copytree(store.dir, target, dirs_exist_ok=True)
    return StageStore(target)


def summarise(result: SDSResult, layers: dict, spec: SparsitySpec, timer: PhaseTimer) -> tuple[dict, dict]:
    """Job-level numbers (stage times, mask sparsity and overlap, mean layer losses) and the per-layer report."""
    m = {f"time/{k}_s": v for k, v in result.seconds.items()}
    m.update({f"time/phase/{k}_s": v for k, v in timer.seconds.items()})
    sp = sparsity_report(layers, result.masks)
    m["final/sparsity/mask"] = sp["mask"]
    m["sparsity/target"] = spec.ratio
    if result.reprune_masks is not None:  # how much of the first mask the re-prune chose again
        m["reprune/mask_overlap"] = mask_overlap(result.first_masks, result.reprune_masks)
    if result.first_masks is not result.masks:  # ... and what is left of it after adjust moved the mask
        m["final/mask_overlap"] = mask_overlap(result.first_masks, result.masks)
    for stage, rep in result.reports.items():
        for key in ("loss_before", "loss_after", "loss_plain", "loss_adjusted", "adjust_kept"):
            vals = [r[key] for r in rep.values() if key in r]
            if vals:
                m[f"{stage}/recon/{key}_mean"] = sum(vals) / len(vals)
    layer_report = {"sparsity": {k: v for k, v in sp.items() if k.startswith("layer/")}, "reports": result.reports}
    return m, layer_report


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one job; returns its flat metrics."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    choices, overrides = _choices()
    state = {"status": "running", "error": None, "choices": choices, "overrides": overrides, "metrics": {},
             "stages_done": []}
    t_job = time.perf_counter()

    def save() -> None:
        write_json(out_dir / "metrics.json", state)

    tracker = None
    exc_info = (None, None, None)
    try:
        # 1. validate what can be validated before any heavy work
        spec = SparsitySpec.parse(cfg.sparsity, cfg.pattern)
        dtype = resolve_dtype(cfg.dtype)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.allow_tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)
        pruner = instantiate(cfg.pruner)
        regularizer = RegularizerSum({k: instantiate(v) for k, v in (cfg.regularizer or {}).items()})
        sds_config = instantiate(cfg.sds)
        bench = cfg.benchmark
        ppl = PplSettings(**OmegaConf.to_container(bench.ppl, resolve=True)) if bench.get("ppl") else None
        zs_cfg = bench.get("zeroshot")
        if zs_cfg is not None:
            from sds_exp.evaluation.zeroshot import check_tasks

            check_tasks(list(zs_cfg.tasks), cfg.paths.data_dir, num_fewshot=zs_cfg.num_fewshot)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        state_dir = Path(cfg.resume) if cfg.resume else out_dir
        store = StageStore(state_dir / "checkpoint")
        if store.last_stage() is not None:
            _check_resumable(state_dir, resolved, state)
        atomic_write_text(out_dir / "resolved_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json(out_dir / "env.json", environment(cfg.paths.root_dir, cfg.device))
        save()
        logger_args = OmegaConf.to_container(cfg.logger, resolve=True)  # `config` clashes with instantiate's
        tracker = get_class(logger_args.pop("_target_"))(
            **logger_args, config=resolved, dir=str(out_dir), name=out_dir.name
        )
        tracker.__enter__()

        # 2. model and calibration data
        t = time.perf_counter()
        loaded = instantiate(cfg.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        calib = instantiate(cfg.data)(tokenizer=tokenizer, data_dir=cfg.paths.data_dir, seed=cfg.seed)
        state["metrics"]["time/load_s"] = time.perf_counter() - t
        log.info("model %s (%s), calibration %s, %s, pruner %s", loaded.name, dtype, tuple(calib.shape), spec, pruner)

        # 3. the pipeline, evaluated after every stage
        ignore = list(cfg.ignore)
        names = list(prunable_layers(model, ignore))
        hist_layer = _hist_layer(names, cfg.get("hist_layer"))
        step = {"i": 0}
        timer = PhaseTimer()

        def record(metrics: dict, stage: str) -> None:
            state["metrics"].update(metrics)
            # phase times so far, on disk after every stage (a killed job keeps them)
            state["metrics"].update({f"time/phase/{k}_s": v for k, v in timer.seconds.items()})
            state["stages_done"].append(stage)
            save()
            tracker.log(metrics, step=step["i"])
            step["i"] += 1

        zeroshot = None
        if zs_cfg is not None:
            from sds_exp.evaluation.zeroshot import evaluate_zeroshot

            def zeroshot(stage, m):
                m.to(cfg.device)
                res = evaluate_zeroshot(m, tokenizer, list(zs_cfg.tasks), data_dir=cfg.paths.data_dir,
                                        limit=zs_cfg.limit, batch_size=zs_cfg.batch_size,
                                        num_fewshot=zs_cfg.num_fewshot, seed=zs_cfg.seed,
                                        bootstrap_iters=zs_cfg.bootstrap_iters, device=cfg.device)
                state["lm_eval_versions"] = res.versions
                return res.metrics, res.versions

        # a resumed job keeps the histograms of the stages it will not run again
        old_hist = (load_histograms(state_dir / "plots" / HIST_FILE, hist_layer)
                    if hist_layer is not None and store.last_stage() is not None else {})
        evaluator = StageEvaluator(
            tokenizer=tokenizer, data_dir=cfg.paths.data_dir, device=cfg.device, ppl=ppl, zeroshot=zeroshot,
            zeroshot_stages=(zs_cfg.stages if zs_cfg is not None else []), final_stage=sds_config.stages[-1],
            layers=lambda m: prunable_layers(m, ignore), hist_layer=hist_layer, record=record,
            cache_file=Path(cfg.paths.cache_dir) / "dense_ppl.json",
            cache_key=f"{loaded.name}|{cfg.dtype}|{len(tokenizer)}",
            histograms=old_hist, hist_file=out_dir / "plots" / HIST_FILE if hist_layer is not None else None,
        )
        store = StageStore(out_dir / "checkpoint") if state_dir == out_dir else _copy_store(store, out_dir)
        result = run_sds(model, calib, pruner, spec, sds_config, regularizer or None, device=cfg.device,
                         batch_size=cfg.calib_batch_size, ignore=ignore, on_stage=evaluator, store=store,
                         timer=timer)

        # 4. summary numbers
        m = state["metrics"]
        summary, layer_report = summarise(result, prunable_layers(model, ignore), spec, timer)
        m.update(summary)
        write_json(out_dir / "layers.json", layer_report)
        if hist_layer is not None:
            pngs = plot_histograms(evaluator.histograms, hist_layer, out_dir / "plots")
            tracker.log_images({f"hist/{k}": str(v) for k, v in pngs.items()})
            tracker.log_histograms({f"weights/{k}": w for k, w in evaluator.histograms.items()})
        if cfg.save_model:
            save_checkpoint(model, tokenizer, result.masks, OmegaConf.to_yaml(cfg, resolve=True), out_dir / "model")
        m["time/job_s"] = time.perf_counter() - t_job
        state["status"] = "completed"
        save()
        tracker.summary(m)
        log.info("done: %s", {k: round(v, 4) for k, v in m.items() if k.endswith("/ppl")})
        return m
    except BaseException as exc:
        exc_info = (type(exc), exc, exc.__traceback__)
        state["status"] = "failed"
        state["error"] = f"{type(exc).__name__}: {exc}"
        state["metrics"]["time/job_s"] = time.perf_counter() - t_job
        save()
        atomic_write_text(out_dir / "failure.txt", traceback.format_exc())
        log.error("job failed: %s (partial results in %s)", state["error"], out_dir / "metrics.json")
        raise
    finally:
        if tracker is not None:
            tracker.__exit__(*exc_info)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
