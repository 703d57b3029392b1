"""The Python API: prune your own model object with the same components the config groups build.

    import sds_exp
    recipe = sds_exp.Recipe.compose(pruner="sparsegpt", pattern="2:4", sds="default")
    calib = sds_exp.calibration("c4", tokenizer, nsamples=64, seqlen=2048)   # or your own (n, seqlen) ids
    report = sds_exp.prune(model, calib, recipe, device="cuda")
    report.masks["model.layers.0.self_attn.q_proj"]      # bool keep-masks, by layer
    report.summary["final/sparsity/mask"]                 # the job's summary numbers

``python -m sds_exp`` is built on this: :func:`sds_exp.app.build` makes a :class:`Recipe` from the job's
config, and the job calls :func:`prune` with its evaluator and stage checkpoint as hooks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sds_exp.allocation.base import Allocation
from sds_exp.allocation.uniform import Uniform
from sds_exp.checkpoint import StageStore
from sds_exp.evaluation.sparsity import sparsity_report
from sds_exp.models.blocks import check_unprunable_params
from sds_exp.pruners.base import Pruner
from sds_exp.regularizers.norms import RegularizerSum
from sds_exp.sds.pipeline import SDSConfig, SDSResult, mask_overlap, run_sds
from sds_exp.sds.stages import prunable_layers
from sds_exp.sds.timing import PhaseTimer
from sds_exp.spec import SparsitySpec

__all__ = ["Recipe", "Report", "prune", "calibration", "summarise", "layer_targets"]


@dataclass
class Recipe:
    """What is pruned and how: the objects the ``pruner``, ``allocation``, ``regularizer`` and ``sds`` config
    groups build.

    Args:
        pruner: a :class:`sds_exp.pruners.base.Pruner` (``Wanda()``, ``SparseGPT()``, ...).
        spec: sparsity ratio and pattern.
        sds: which SDS stages run and how (``SDSConfig(redense=False)`` is the one-shot baseline).
        regularizer: the re-activation's penalty (empty: none).
        ignore: fnmatch patterns of linear layers left dense.
        allocation: how ``spec.ratio`` is shared out among the layers (:mod:`sds_exp.allocation`: ``Uniform()``,
            ``OWL()``, ``FileAllocation(path)``).
    """

    pruner: Pruner
    spec: SparsitySpec
    sds: SDSConfig = field(default_factory=SDSConfig)
    regularizer: RegularizerSum = field(default_factory=RegularizerSum)
    ignore: list[str] = field(default_factory=list)
    allocation: Allocation = field(default_factory=Uniform)

    @classmethod
    def compose(
        cls,
        *,
        pruner: str = "wanda",
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        sds: str = "default",
        regularizer: str = "l1_l2",
        allocation: str = "uniform",
        overrides: Sequence[str] = (),
    ) -> Recipe:
        """Build from config-group options by name, exactly as ``python -m sds_exp pruner=... sds=...`` would.

        Args:
            overrides: further Hydra overrides, e.g. ``["sds.reactivate.steps=50", "pruner.group=matrix"]``.
        """
        from sds_exp.compose import compose_config

        cfg = compose_config(
            [
                f"pruner={pruner}",
                f"sparsity={sparsity}",
                f"pattern={pattern}",
                f"sds={sds}",
                f"regularizer={regularizer}",
                f"allocation={allocation}",
                *overrides,
            ]
        )
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg) -> Recipe:
        """From a composed job config (the nodes ``pruner``, ``sds``, ``regularizer``, ``sparsity``, ``pattern``,
        ``ignore``, ``allocation``: uniform when absent)."""
        from hydra.utils import instantiate

        from sds_exp.validation import normalize_ignore

        return cls(
            pruner=instantiate(cfg.pruner),
            spec=SparsitySpec.from_config(cfg),
            sds=instantiate(cfg.sds),
            regularizer=RegularizerSum({k: instantiate(v) for k, v in (cfg.regularizer or {}).items()}),
            ignore=normalize_ignore(cfg.get("ignore")),
            allocation=instantiate(cfg.allocation) if cfg.get("allocation") is not None else Uniform(),
        )


@dataclass
class Report:
    """What :func:`prune` returns: the masks, the per-stage details, and the job's summary numbers."""

    result: SDSResult
    summary: dict[str, float]
    layers: dict[str, Any]  # per-layer sparsity and reconstruction losses (the job's layers.json)

    @property
    def masks(self) -> dict[str, Tensor]:
        return self.result.masks


def calibration(
    source: str | Tensor | Sequence[str],
    tokenizer=None,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: str | None = None,
) -> Tensor:
    """Calibration windows (nsamples, seqlen) of token ids.

    Args:
        source: ``"c4"`` or ``"wikitext2"`` (the reference samplers over the data mirror or the hub), your own
            texts (random windows of their concatenation, as the WikiText2 sampler draws them), or a tensor of
            token ids (checked, returned as long).
        tokenizer: needed unless ``source`` is a tensor.
        data_dir: the data mirror; default ``$SDS_DATA_DIR``, else the hub.
    """
    import os

    from sds_exp.data import calibration as cal

    if isinstance(source, Tensor):
        if source.dim() != 2 or source.dtype.is_floating_point:
            raise ValueError(
                f"calibration ids must be an integer tensor (nsamples, seqlen), got "
                f"{tuple(source.shape)} {source.dtype}"
            )
        return source.long()
    if tokenizer is None:
        raise ValueError("calibration from text needs the model's tokenizer")
    data_dir = data_dir if data_dir is not None else os.environ.get("SDS_DATA_DIR")
    if isinstance(source, str):
        samplers = {"c4": cal.c4, "wikitext2": cal.wikitext2}
        if source not in samplers:
            raise ValueError(
                f"calibration source={source!r}; allowed: {', '.join(samplers)}, a list of texts, "
                "or a tensor of token ids"
            )
        return samplers[source](tokenizer, data_dir, seed=seed, nsamples=nsamples, seqlen=seqlen)
    ids = tokenizer(" ".join(source), return_tensors="pt").input_ids[0]
    return cal.sample_stream_windows(ids, nsamples, seqlen, random.Random(seed))


def prune(
    model: nn.Module,
    calib: Tensor,
    recipe: Recipe | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    on_stage: Callable[[str, nn.Module], None] | None = None,
    store: StageStore | None = None,
    timer: PhaseTimer | None = None,
    **compose: Any,
) -> Report:
    """Prune ``model`` in place (SDS, or the one-shot baseline when ``recipe.sds.redense`` is False).

    Args:
        model: a causal LM with decoder blocks (LLaMA, OPT, ... families: see ``sds_exp.models.blocks``).
        calib: calibration token ids (nsamples, seqlen), e.g. from :func:`calibration`.
        recipe: the components; default ``Recipe.compose(**compose)``.
        device: where blocks run (the model may stay on CPU; blocks are moved one at a time).
        on_stage: ``fn(stage, model)`` after every stage (evaluation); stages are ``sds_exp.sds.pipeline.STAGES``.
        store: stage checkpoints, to resume a killed call.
    """
    recipe = recipe if recipe is not None else Recipe.compose(**compose)
    check_unprunable_params(model, recipe.ignore)  # weights the pruners would skip silently: refused by name
    timer = timer or PhaseTimer()
    result = run_sds(
        model,
        calib,
        recipe.pruner,
        recipe.spec,
        recipe.sds,
        recipe.regularizer or None,
        device=device,
        batch_size=batch_size,
        ignore=recipe.ignore,
        on_stage=on_stage or (lambda name, m: None),
        store=store,
        timer=timer,
        allocation=recipe.allocation,
    )
    summary, layers = summarise(result, prunable_layers(model, recipe.ignore), recipe.spec, timer)
    return Report(result=result, summary=summary, layers=layers)


def layer_targets(result: SDSResult, layers: dict, spec: SparsitySpec) -> dict[str, float]:
    """Each layer's target ratio for the final masks: the allocation's (the re-prune's when it recomputed them)."""
    allocated = result.reports.get("allocation_reprune") or result.reports.get("allocation") or {}
    return {n: float(allocated[n]["ratio"]) if n in allocated else spec.ratio for n in layers}


def summarise(result: SDSResult, layers: dict, spec: SparsitySpec, timer: PhaseTimer) -> tuple[dict, dict]:
    """Job-level numbers (stage times, mask sparsity and overlap, mean layer losses) and the per-layer report.

    ``sparsity/overall`` is pruned / prunable weights over every layer asked to prune, counted on the final
    masks; with a non-uniform allocation it may differ from ``sparsity/target`` by the pruners' rounding to
    whole weights (docs/allocation.md). The per-layer report has each layer's measured ``sparsity`` (exact
    zeros) next to its ``target``.
    """
    m = {f"time/{k}_s": v for k, v in result.seconds.items()}
    m.update({f"time/phase/{k}_s": v for k, v in timer.seconds.items()})
    sp = sparsity_report(layers, result.masks)
    m["final/sparsity/mask"] = sp["mask"]
    m["sparsity/overall"] = sp["mask"]
    m["sparsity/target"] = spec.ratio
    targets = layer_targets(result, layers, spec)
    if targets and any(r != spec.ratio for r in targets.values()):
        m["sparsity/allocation/min"] = min(targets.values())
        m["sparsity/allocation/max"] = max(targets.values())
    if result.reprune_masks is not None:  # how much of the first mask the re-prune chose again
        m["reprune/mask_overlap"] = mask_overlap(result.first_masks, result.reprune_masks)
    if result.first_masks is not result.masks:  # ... and what is left of it after adjust moved it
        m["final/mask_overlap"] = mask_overlap(result.first_masks, result.masks)
    for stage, rep in result.reports.items():
        for key in ("loss_before", "loss_after", "loss_plain", "loss_adjusted", "adjust_kept", "adjust_steps", "steps"):
            vals = [r[key] for r in rep.values() if key in r]
            if vals:
                m[f"{stage}/recon/{key}_mean"] = sum(vals) / len(vals)
    layer_report = {
        "sparsity": {k: v for k, v in sp.items() if k.startswith("layer/")},
        "target": {f"layer/{n}": r for n, r in targets.items()},
        "reports": result.reports,
    }
    return m, layer_report
