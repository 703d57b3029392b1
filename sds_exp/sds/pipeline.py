"""SDS: Sparse-Dense-Sparse pruning (Li et al., arXiv 2408.10473), the one-screen story.

    dense ──prune──▶ sparse ──reactivate──▶ dense' ──reprune──▶ sparse' ──adjust──▶ sparse''

``on_stage(name, model)`` is called after every stage, so evaluation, tracking and checkpoints plug in
without the pipeline importing them. Stage names are the constants in :data:`STAGES`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sds_exp.checkpoint import StageStore
from sds_exp.pruners.base import Pruner
from sds_exp.sds.reconstruct import ADJUST_SCORES, ReconstructSettings
from sds_exp.sds.stages import (
    SpecLike,
    prunable_layers,
    prune_model,
    reactivate_model,
    reprune_model,
    snapshot_weights,
)
from sds_exp.sds.timing import PhaseTimer
from sds_exp.spec import SparsitySpec

__all__ = ["STAGES", "SDSConfig", "SDSResult", "run_sds", "mask_overlap"]

log = logging.getLogger(__name__)

STAGES = ("dense", "prune", "reactivate", "reprune", "adjust")


@dataclass
class SDSConfig:
    """Which stages run and how (``conf/sds/*.yaml``).

    Args:
        redense: run steps 2 and 3 (False: the one-shot baseline, ``sds=prune_only``).
        inputs: student inputs of step 2: "sparse" (the pruned model's, SD-data) or "dense" (DD-data).
        reactivate: optimisation settings of step 2.
        adjust: "true" | "false" | "auto" weight adjustment after the re-prune.
        adjustment: optimisation settings of the adjustment.
        adjust_group: comparison group of the top-|W| projection for unstructured sparsity.
        adjust_score: score of that projection: "magnitude" (|W|, the paper) or "wanda" (|W| * ||x_j||).
        cache_teacher: keep each block's teacher layer inputs for its group passes (memory for speed, same
            numbers; see :class:`sds_exp.sds.sequential.TeacherCache`).
    """

    redense: bool = True
    inputs: str = "sparse"
    reactivate: ReconstructSettings = field(default_factory=ReconstructSettings)
    adjust: str = "auto"
    adjustment: ReconstructSettings = field(default_factory=ReconstructSettings)
    adjust_group: str = "row"
    adjust_score: str = "magnitude"
    cache_teacher: bool = True

    def __post_init__(self) -> None:
        self.adjust = str(self.adjust).lower()
        if self.adjust not in ("true", "false", "auto"):
            raise ValueError(f"sds.adjust={self.adjust!r}; allowed: true, false, auto")
        if self.inputs not in ("sparse", "dense"):
            raise ValueError(f"sds.inputs={self.inputs!r}; allowed: sparse, dense")
        if self.adjust_group not in ("row", "matrix"):
            raise ValueError(f"sds.adjust_group={self.adjust_group!r}; allowed: row, matrix")
        if self.adjust_score not in ADJUST_SCORES:
            raise ValueError(f"sds.adjust_score={self.adjust_score!r}; allowed: {', '.join(ADJUST_SCORES)}")

    @property
    def stages(self) -> tuple[str, ...]:
        if not self.redense:
            return STAGES[:2]
        return STAGES if self.adjust != "false" else STAGES[:4]


@dataclass
class SDSResult:
    masks: dict[str, Tensor]  # final keep-masks, by layer
    first_masks: dict[str, Tensor]  # masks of the first prune
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (reprune includes adjust)
    reports: dict[str, dict] = field(default_factory=dict)  # stage -> layer -> loss numbers
    reprune_masks: dict[str, Tensor] | None = None  # the re-prune's masks before adjustment (None: no re-prune)


def mask_overlap(first: dict[str, Tensor], second: dict[str, Tensor]) -> float:
    """Fraction of the second mask's kept weights that the first mask kept too."""
    both = sum(int((first[n] & second[n]).sum()) for n in second)
    kept = sum(int(second[n].sum()) for n in second)
    return both / max(kept, 1)


@contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, Tensor]):
    """Temporarily load ``weights`` (by layer name) into the model."""
    layers = dict(model.named_modules())
    saved = {n: layers[n].weight.detach().clone() for n in weights}
    try:
        for n, w in weights.items():
            layers[n].weight.data.copy_(w.to(layers[n].weight.dtype))
        yield model
    finally:
        for n, w in saved.items():
            layers[n].weight.data.copy_(w)


def run_sds(
    model: nn.Module,
    calib: Tensor,
    pruner: Pruner,
    spec: SparsitySpec,
    config: SDSConfig,
    regularizer: Callable[[Tensor], Tensor] | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    ignore: list[str] | tuple[str, ...] = (),
    on_stage: Callable[[str, nn.Module], None] = lambda name, model: None,
    store: StageStore | None = None,
    timer: PhaseTimer | None = None,
    allocation=None,
) -> SDSResult:
    """Run SDS (or the one-shot baseline when ``config.redense`` is False) on ``model`` in place.

    With a ``store``, the state after each stage is checkpointed, and a job that finds a checkpoint
    continues after its last finished stage (the dense teacher weights come from the freshly loaded model).
    ``allocation`` (``sds_exp.allocation``) gives each layer its own ratio, computed on the dense model before
    the first prune and reused by the re-prune and adjustment, or recomputed on the re-activated model when
    its ``reprune`` is "recompute"; the ratios go into the checkpoint's reports for resume.
    """
    timer = timer or PhaseTimer()
    common = {"device": device, "batch_size": batch_size, "ignore": ignore, "timer": timer}
    seconds: dict[str, float] = {}
    clock = time.perf_counter
    layers = prunable_layers(model, ignore)
    resumed = store.load() if store is not None else None
    done = STAGES.index(resumed.stage) if resumed is not None else -1
    reports: dict[str, dict] = {}

    def checkpoint(
        stage: str, masks: dict[str, Tensor] | None = None, reprune_masks: dict[str, Tensor] | None = None
    ) -> None:
        if store is not None:
            store.save(
                stage,
                layers,
                first,
                masks,
                reprune_masks=reprune_masks,
                seconds=seconds,
                phases=dict(timer.seconds),
                reports=reports,
            )

    if done < 0:
        on_stage("dense", model)
    dense = snapshot_weights(layers) if config.redense else {}
    if resumed is not None:
        log.info("resuming after stage %r from %s", resumed.stage, store.dir)
        resumed.apply(model)
        first = resumed.first_masks
        seconds.update(resumed.seconds)
        reports.update(resumed.reports)
        for phase, value in resumed.phases.items():
            timer.seconds[phase] += value

    def allocate(key: str) -> SpecLike:
        if allocation is None:
            return spec
        if key in reports:  # computed before a resume
            ratios = {name: entry["ratio"] for name, entry in reports[key].items()}
        else:
            with timer(f"{'prune' if key == 'allocation' else 'reprune'}/allocation"):
                ratios = allocation.ratios(model, calib, layers, spec, device=device, batch_size=batch_size)
            if all(r == spec.ratio for r in ratios.values()) and set(ratios) == set(layers):
                return spec  # uniform: the job's own target, N:M included; nothing to keep
            reports[key] = {name: {"ratio": float(r)} for name, r in ratios.items()}
        from sds_exp.allocation.base import layer_specs

        return layer_specs(ratios, spec)

    if done < STAGES.index("prune"):  # step 1: one-shot prune
        t = clock()
        specs = allocate("allocation")
        first = prune_model(model, calib, pruner, specs, **common)
        seconds["prune"] = clock() - t
        on_stage("prune", model)
        checkpoint("prune")
    if not config.redense:
        return SDSResult(masks=first, first_masks=first, seconds=seconds, reports=reports)

    if done < STAGES.index("reactivate"):  # step 2: dense re-activation with sparse regularisation
        t = clock()
        reports["reactivate"] = reactivate_model(
            model,
            calib,
            dense,
            config.reactivate,
            regularizer,
            inputs=config.inputs,
            cache_teacher=config.cache_teacher,
            **common,
        )
        seconds["reactivate"] = clock() - t
        on_stage("reactivate", model)
        checkpoint("reactivate")

    last = config.stages[-1]
    if done >= STAGES.index(last):
        return SDSResult(
            masks=resumed.masks,
            first_masks=first,
            seconds=seconds,
            reports=reports,
            reprune_masks=resumed.reprune_masks or None,
        )
    t = clock()  # step 3: re-prune with fresh statistics, then adjust under a moving mask
    recompute = allocation is not None and getattr(allocation, "reprune", "reuse") == "recompute"
    specs = allocate("allocation_reprune" if recompute else "allocation")
    second = reprune_model(
        model,
        calib,
        dense,
        pruner,
        specs,
        config.adjust,
        config.adjustment,
        adjust_group=config.adjust_group,
        adjust_score=config.adjust_score,
        cache_teacher=config.cache_teacher,
        **common,
    )
    seconds["reprune"] = clock() - t
    reports["reprune"] = second.report
    if config.adjust == "false":
        on_stage("reprune", model)
    else:
        with swapped_weights(model, {n: w for n, (w, _) in second.plain.items()}):
            on_stage("reprune", model)  # the plain re-prune, before adjustment
        on_stage("adjust", model)
    checkpoint(last, second.masks, second.reprune_masks)
    return SDSResult(
        masks=second.masks, first_masks=first, seconds=seconds, reports=reports, reprune_masks=second.reprune_masks
    )
