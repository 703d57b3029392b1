"""The three SDS stages as sequential passes over the decoder blocks.

Each stage walks the blocks in order; a block's calibration inputs come from the blocks before it as
they are after this stage's own changes (the references' sequential protocol):

* :func:`prune_model`      step 1: statistics on the stream, prune, forward the pruned block.
* :func:`reactivate_model` step 2: teacher = dense block on dense inputs; student inputs = the stream of
  the model being re-activated, which starts sparse and whose earlier blocks are already re-activated
  ("SD-data", ``inputs="sparse"``), or the dense stream (``inputs="dense"``, "DD-data"); every entry of
  each linear is trainable again, starting from the pruned weight. (Feeding the *pruned* blocks' outputs
  forward instead trains each layer to correct errors the re-activated model no longer makes: measured on
  SmolLM2, that re-dense model is worse than the pruned one.)
* :func:`reprune_model`    step 3: statistics recomputed on the re-activated model, prune again with
  the same pruner, then (optionally) adjust the weights by projected gradient descent towards the
  dense outputs, with the top-|W| mask re-selected under the pattern after every step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sds_exp.models.blocks import capture_block_inputs, decoder_blocks, find_linears, run_block
from sds_exp.pruners.base import Pruner
from sds_exp.sds.gram import GramStats
from sds_exp.sds.reconstruct import ADJUST_SCORES, ReconstructSettings, magnitude_projector, reconstruct
from sds_exp.sds.sequential import (
    LayerGrams,
    TeacherCache,
    collect_stats,
    dense_copy,
    layer_groups,
    paired_pass,
    walk_blocks,
)
from sds_exp.sds.timing import PhaseTimer
from sds_exp.spec import SparsitySpec

__all__ = [
    "prunable_layers",
    "validate_layers",
    "snapshot_weights",
    "prune_model",
    "reactivate_model",
    "reprune_model",
    "RepruneOutcome",
    "ADJUST_MODES",
    "SpecLike",
    "spec_of",
    "model_extras",
]

log = logging.getLogger(__name__)

ADJUST_MODES = ("true", "false", "auto")


def prunable_layers(model: nn.Module, ignore: list[str] | tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The linear layers of all decoder blocks (never embeddings or the LM head), minus ``ignore``."""
    path, blocks = decoder_blocks(model)
    return find_linears(blocks, path, ignore)


SpecLike = SparsitySpec | Mapping[str, SparsitySpec]  # one target, or one per layer (a non-uniform allocation)


def spec_of(spec: SpecLike, name: str) -> SparsitySpec:
    """The layer's target: the single spec, or its entry in the per-layer mapping."""
    if isinstance(spec, SparsitySpec):
        return spec
    if name not in spec:
        raise KeyError(f"no sparsity target for layer {name} in the per-layer allocation ({len(spec)} layers)")
    return spec[name]


def model_extras(
    pruner: Pruner, model: nn.Module, calib: Tensor, layers: dict[str, nn.Linear], device, batch_size, timer, phase
) -> dict[str, Tensor] | None:
    """A pruner's model-level statistics (Pruner-Zero's gradients) for this round, or None without the hook.

    Called on the model as it is at the start of the round: dense, or re-activated for the re-prune.
    """
    prepare = getattr(pruner, "prepare", None)
    if prepare is None:
        return None
    with timer(phase):
        return prepare(model, calib, layers, device=device, batch_size=batch_size)


def _prune_layer(pruner: Pruner, layer: nn.Linear, stats, spec: SparsitySpec, name: str, extras):
    if extras is None:
        return pruner.prune(layer.weight, stats, spec, name)
    return pruner.prune(layer.weight, stats, spec, name, extra=extras.get(name))


def validate_layers(layers: dict[str, nn.Linear], spec: SpecLike) -> None:
    """N:M needs every pruned layer's input width divisible by M; names the first that is not."""
    for name, layer in layers.items():
        target = spec_of(spec, name)
        if target.structured and layer.in_features % target.m:
            raise ValueError(
                f"layer {name} has in_features={layer.in_features}, not divisible by M={target.m} of pattern "
                f"{target}; leave it dense with ignore=['{name}'] or choose another M"
            )


def snapshot_weights(layers: dict[str, nn.Linear]) -> dict[str, Tensor]:
    """CPU copies of the layers' weights (the teacher of steps 2 and 3)."""
    return {name: layer.weight.detach().to("cpu", copy=True) for name, layer in layers.items()}


def _write(layer: nn.Linear, weight: Tensor) -> None:
    layer.weight.data.copy_(weight.to(layer.weight.dtype))


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calib: Tensor,
    pruner: Pruner,
    spec: SpecLike,
    *,
    device="cpu",
    batch_size: int = 8,
    ignore: list[str] | tuple[str, ...] = (),
    desc: str = "prune",
    timer: PhaseTimer | None = None,
) -> dict[str, Tensor]:
    """Prune every block's linear layers in place; returns the keep-masks by layer name (CPU, bool).

    ``spec`` is one target for every layer or a per-layer mapping (a non-uniform allocation).
    """
    timer = timer or PhaseTimer()
    all_layers = prunable_layers(model, ignore)
    validate_layers(all_layers, spec)
    masks: dict[str, Tensor] = {}
    extras = model_extras(pruner, model, calib, all_layers, device, batch_size, timer, "prune/model_stats")
    if not pruner.needs_calibration:
        with timer("prune/mask"):
            for name, layer in all_layers.items():
                result = _prune_layer(pruner, layer, None, spec_of(spec, name), name, extras)
                _write(layer, result.weight)
                masks[name] = result.mask.cpu()
        return masks
    with timer("prune/capture"):
        stream = capture_block_inputs(model, calib, device, batch_size)
    out = torch.empty_like(stream.hidden)
    for _, block, prefix in walk_blocks(model, device, desc):
        layers = find_linears(block, prefix, ignore)
        with timer("prune/stats_forward"):
            stats = collect_stats(block, layers, stream, lambda lin: pruner.collector(lin.in_features, device))
        with timer("prune/mask"):
            for name, layer in layers.items():
                result = _prune_layer(pruner, layer, stats[name], spec_of(spec, name), name, extras)
                _write(layer, result.weight)
                masks[name] = result.mask.cpu()
        del stats
        with timer("prune/forward"):
            stream.hidden, out = run_block(block, stream, out), stream.hidden
    return masks


@torch.no_grad()
def reactivate_model(
    model: nn.Module,
    calib: Tensor,
    dense_weights: dict[str, Tensor],
    settings: ReconstructSettings,
    regularizer=None,
    *,
    inputs: str = "sparse",
    device="cpu",
    batch_size: int = 8,
    ignore: list[str] | tuple[str, ...] = (),
    timer: PhaseTimer | None = None,
    cache_teacher: bool = True,
) -> dict[str, dict[str, float]]:
    """SDS step 2 in place: every linear becomes dense again; returns per-layer loss reports.

    ``cache_teacher`` keeps the teacher's layer inputs of a block from its first group pass for the others
    (:class:`~sds_exp.sds.sequential.TeacherCache`: memory for speed, same numbers).
    """
    if inputs not in ("sparse", "dense"):
        raise ValueError(f"reactivate inputs={inputs!r}; allowed: 'sparse' (SD-data), 'dense' (DD-data)")
    timer = timer or PhaseTimer()
    with timer("reactivate/capture"):
        xd = capture_block_inputs(model, calib, device, batch_size)
    xs = xd.clone() if inputs == "sparse" else None  # embeddings are never pruned: same start
    xd_out = torch.empty_like(xd.hidden)
    xs_out = torch.empty_like(xd.hidden) if xs is not None else None
    report: dict[str, dict[str, float]] = {}
    for _, block, prefix in walk_blocks(model, device, "reactivate"):
        teacher = dense_copy(block, prefix, dense_weights)
        groups = layer_groups(block, prefix, xs if xs is not None else xd, ignore)
        grams = None  # a block left dense by `ignore` has no groups
        cache = TeacherCache() if cache_teacher else None
        for g, group in enumerate(groups):  # in forward order, with fresh statistics for each group
            with timer("reactivate/gram_forward"):
                if xs is not None:
                    grams, _ = paired_pass(
                        block,
                        teacher,
                        prefix,
                        xs,
                        xd,
                        ignore,
                        only=set(group),
                        teacher_out=xd_out if g == 0 else None,
                        cache=cache,
                    )
                else:
                    t_layers = {n: lin for n, lin in find_linears(teacher, prefix, ignore).items() if n in group}
                    grams = LayerGrams(
                        collect_stats(teacher, t_layers, xd, _plain_gram(device), out=xd_out if g == 0 else None)
                    )
            layers = find_linears(block, prefix, ignore)
            with timer("reactivate/optimise"):
                for name in group:
                    problem = grams.problem(name, dense_weights[name])
                    W, _, info = reconstruct(layers[name].weight, problem, settings, regularizer, name=name)
                    _write(layers[name], W)
                    report[name] = info
        del teacher, grams, cache
        if xs is not None:
            with timer("reactivate/forward"):
                run_block(block, xs, xs_out)  # through the re-activated block
            xs.hidden, xs_out = xs_out, xs.hidden
        xd.hidden, xd_out = xd_out, xd.hidden
    return report


class _PlainGram(GramStats):
    def add_batch(self, x: Tensor) -> None:
        self.add(x)


def _plain_gram(device):
    return lambda lin: _PlainGram(lin.in_features, device, cross=False)


@dataclass
class RepruneOutcome:
    masks: dict[str, Tensor]  # final keep-masks
    plain: dict[str, tuple[Tensor, Tensor]] = field(
        default_factory=dict
    )  # name -> (weight, mask) before adjust, where adjusted
    reprune_masks: dict[str, Tensor] = field(default_factory=dict)  # the re-prune's masks before adjust, every layer
    report: dict[str, dict[str, float]] = field(default_factory=dict)


@torch.no_grad()
def reprune_model(
    model: nn.Module,
    calib: Tensor,
    dense_weights: dict[str, Tensor],
    pruner: Pruner,
    spec: SpecLike,
    adjust: str = "auto",
    settings: ReconstructSettings | None = None,
    *,
    adjust_group: str = "row",
    adjust_score: str = "magnitude",
    device="cpu",
    batch_size: int = 8,
    ignore: list[str] | tuple[str, ...] = (),
    timer: PhaseTimer | None = None,
    cache_teacher: bool = True,
) -> RepruneOutcome:
    """SDS step 3 in place: prune the re-activated model again and adjust its weights.

    Args:
        adjust: "true" (always keep the adjusted weights), "false" (plain re-prune), "auto" (per layer,
            keep the adjusted weights only if they lower the calibration reconstruction loss).
        settings: optimisation settings of the adjustment.
        adjust_group: comparison group of the top-|W| projection for unstructured sparsity ("row" or "matrix").
        adjust_score: score of that projection: "magnitude" (|W|, the paper) or "wanda" (|W| * ||x_j||, with the
            student's input norms of the layer's own Gram statistics).
    """
    adjust = str(adjust).lower()
    if adjust not in ADJUST_MODES:
        raise ValueError(f"adjust={adjust!r}; allowed: true, false, auto")
    if adjust != "false" and settings is None:
        raise ValueError("adjust needs ReconstructSettings")
    if adjust_score not in ADJUST_SCORES:
        raise ValueError(f"adjust_score={adjust_score!r}; allowed: {', '.join(ADJUST_SCORES)}")
    timer = timer or PhaseTimer()
    all_layers = prunable_layers(model, ignore)
    validate_layers(all_layers, spec)
    extras = model_extras(pruner, model, calib, all_layers, device, batch_size, timer, "reprune/model_stats")
    with timer("reprune/capture"):
        xr = capture_block_inputs(model, calib, device, batch_size)
    xd = xr.clone()
    xd_out = torch.empty_like(xd.hidden)
    xr_out = torch.empty_like(xr.hidden)
    outcome = RepruneOutcome(masks={})
    make = (lambda lin: pruner.collector(lin.in_features, device)) if pruner.needs_calibration else None
    for _, block, prefix in walk_blocks(model, device, "reprune"):
        teacher = dense_copy(block, prefix, dense_weights)
        groups = layer_groups(block, prefix, xr, ignore)
        cache = TeacherCache() if cache_teacher and adjust != "false" else None
        with timer("reprune/stats_forward"):  # the references' order: all layers from one pre-pruning pass
            grams, stats = paired_pass(
                block,
                teacher,
                prefix,
                xr,
                xd,
                ignore,
                make_extra=make,
                teacher_out=xd_out,
                grams_needed=adjust == "false",
                cache=cache,
            )
        layers = find_linears(block, prefix, ignore)
        plains = {}
        with timer("reprune/mask"):
            for name, layer in layers.items():
                plains[name] = _prune_layer(pruner, layer, stats.get(name), spec_of(spec, name), name, extras)
                _write(layer, plains[name].weight)
        for group in groups:  # adjust in forward order: each group sees the adjusted groups before it
            if adjust != "false":
                with timer("adjust/gram_forward"):
                    grams, _ = paired_pass(block, teacher, prefix, xr, xd, ignore, only=set(group), cache=cache)
            for name in group:
                plain = plains[name]
                problem = grams.problem(name, dense_weights[name])
                info = {"loss_plain": problem.loss(plain.weight.to(problem.A.device))}
                weight, mask = plain.weight, plain.mask
                if adjust != "false":
                    scale = problem.A.diagonal().clamp_min(0).sqrt() if adjust_score == "wanda" else None
                    project = magnitude_projector(spec_of(spec, name), adjust_group, scale)
                    with timer("adjust/optimise"):
                        W, M, adj = reconstruct(plain.weight, problem, settings, None, project=project, name=name)
                    info["loss_adjusted"] = adj["loss_after"]
                    info["adjust_steps"] = adj["steps"]
                    keep = adjust == "true" or adj["loss_after"] < info["loss_plain"]
                    info["adjust_kept"] = float(keep)
                    if keep:
                        outcome.plain[name] = (plain.weight.cpu(), plain.mask.cpu())
                        weight, mask = W, M
                _write(layers[name], weight)
                outcome.masks[name] = mask.cpu()
                outcome.reprune_masks[name] = plain.mask.cpu()
                outcome.report[name] = info
        del teacher, grams, stats, cache
        with timer("reprune/forward"):
            run_block(block, xr, xr_out)
        xr.hidden, xr_out = xr_out, xr.hidden
        xd.hidden, xd_out = xd_out, xd.hidden
    return outcome
