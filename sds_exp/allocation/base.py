"""Layer-wise sparsity allocation: how one job target is shared out among the prunable linear layers.

An allocation maps every prunable layer to its own ratio; :func:`layer_specs` turns the ratios into the
per-layer :class:`~sds_exp.spec.SparsitySpec` mapping the stage functions take. ``run_sds`` asks for the
ratios once on the dense model before the first prune, and again on the re-activated model before the
re-prune when the allocation's ``reprune`` is ``"recompute"``.

Rounding: the pruners prune ``int(in_features * ratio)`` weights per row (``int(numel * ratio)`` per
matrix), so an arbitrary ratio is floored to whole weights. :func:`snap_to_rows` rounds each layer's ratio
to whole weights per row instead, up or down, so that the total pruned count matches what the ratios ask
for over all layers (see ``docs/allocation.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from sds_exp.spec import SparsitySpec

__all__ = [
    "Allocation",
    "REPRUNE_MODES",
    "ROUNDING_MODES",
    "TOLERANCE",
    "layer_specs",
    "snap_to_rows",
    "weighted_mean",
    "check_ratio",
    "ratio_problem",
    "job_spec",
    "build_from_node",
]

REPRUNE_MODES = ("reuse", "recompute")  # re-prune with the first round's ratios, or recompute them
ROUNDING_MODES = ("target", "floor")  # whole weights per row summing to the target, or the pruners' int()
TOLERANCE = 1e-3  # an allocation's weighted mean may differ from the job's sparsity by 0.1% of the weights


class Allocation(Protocol):
    """Per-layer sparsity ratios for the layers a job prunes.

    ``ratios`` may run calibration forwards (OWL) but must leave the model's weights as it found them; its
    result has one ratio in [0, 1) per entry of ``layers``, with the parameter-weighted mean ``spec.ratio``.
    """

    needs_calibration: ClassVar[bool]  # False: ``calib`` is not read
    reprune: str  # "reuse" (the first round's ratios) | "recompute" (on the re-activated model)

    def ratios(
        self,
        model: nn.Module,
        calib: Tensor,
        layers: dict[str, nn.Linear],
        spec: SparsitySpec,
        *,
        device,
        batch_size: int,
    ) -> dict[str, float]: ...


def ratio_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a sparsity in [0, 1), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number; allowed: a sparsity in [0, 1)"
    if math.isnan(value) or not 0.0 <= float(value) < 1.0:
        return "is outside [0, 1); it is the fraction of the layer's weights zeroed"
    return None


def check_ratio(what: str, value: object) -> float:
    """``value`` as a float sparsity in [0, 1); ValueError ``"<what>=<value> ..."`` otherwise."""
    problem = ratio_problem(value)
    if problem is not None:
        raise ValueError(f"{what}={value!r} {problem}")
    return float(value)


def layer_specs(ratios: Mapping[str, float], spec: SparsitySpec) -> dict[str, SparsitySpec]:
    """Per-layer targets from per-layer ratios, with the job's ``spec`` where a ratio equals its own.

    Raises:
        ValueError: a ratio outside [0, 1), or an N:M ``spec`` with ratios that are not all its own (N:M keeps
            the same N of every M in every layer; a mixed-N:M allocation is not supported).
    """
    if spec.structured:
        odd = {n: r for n, r in ratios.items() if r != spec.ratio}
        if odd:
            name, ratio = next(iter(odd.items()))
            raise ValueError(
                f"pattern='{spec.n}:{spec.m}' with a non-uniform allocation: {len(odd)} layers differ from "
                f"sparsity={spec.ratio:g} (e.g. {name}: {ratio:g}); N:M keeps {spec.n} of every {spec.m} weights "
                "in every layer. Use allocation=uniform or pattern=unstructured"
            )
        return dict.fromkeys(ratios, spec)
    out = {}
    for name, ratio in ratios.items():
        ratio = check_ratio(f"sparsity of layer {name}", ratio)
        out[name] = spec if ratio == spec.ratio else SparsitySpec(ratio=ratio)
    return out


def weighted_mean(ratios: Mapping[str, float], layers: Mapping[str, nn.Linear]) -> float:
    """The overall sparsity the ratios ask for: their mean weighted by each layer's parameter count."""
    total = sum(layers[n].weight.numel() for n in ratios)
    return sum(r * layers[n].weight.numel() for n, r in ratios.items()) / max(total, 1)


def snap_to_rows(ratios: Mapping[str, float], layers: Mapping[str, nn.Linear]) -> dict[str, float]:
    """Round each layer's ratio to a whole number of weights per row, so the total hits the asked-for count.

    Each layer first gets ``k = floor(in_features * ratio)`` weights per row (what the pruners' ``int()``
    would give). The count still missing against ``round(sum(ratio * numel))`` is made up by pruning one more
    weight per row in the layers with the largest fractional parts, while that brings the total closer. A
    layer's ratio moves by less than ``1 / in_features``; the total lands within half a layer's rows of the
    target.

    Returns:
        ``(out * k + 0.5) / numel`` per layer: half a weight above the count, so that both the per-row
        ``int(in * r)`` (= k) and the per-matrix ``int(numel * r)`` (= out * k) selections prune exactly it.
    """
    shape = {n: tuple(layers[n].weight.shape) for n in ratios}
    k, frac = {}, {}
    for name, ratio in ratios.items():
        rows, cols = shape[name]
        exact = ratio * cols
        k[name] = min(math.floor(exact + 1e-9), cols - 1)  # 1e-9: 0.5 * 34 may compute as 16.999...
        frac[name] = exact - k[name]
    wanted = round(sum(r * shape[n][0] * shape[n][1] for n, r in ratios.items()))
    missing = wanted - sum(k[n] * shape[n][0] for n in ratios)
    for name in sorted(ratios, key=lambda n: -frac[n]):  # stable: ties in the layers' order
        rows, cols = shape[name]
        if frac[name] > 1e-9 and 2 * missing > rows and k[name] + 1 < cols:
            k[name] += 1
            missing -= rows
    return {n: (k[n] * shape[n][0] + 0.5) / (shape[n][0] * shape[n][1]) for n in ratios}


def job_spec(cfg) -> SparsitySpec | None:
    """The job's sparsity target from a composed config (None when it has no ``sparsity``/``pattern``)."""
    if cfg is None or "sparsity" not in cfg or "pattern" not in cfg:
        return None
    return SparsitySpec.from_config(cfg)


def build_from_node(cls: type, node: Mapping[str, Any], key: str):
    """``cls(**settings)`` from a plain config node, with unknown keys named as a ValueError."""
    settings = {k: v for k, v in node.items() if k != "_target_"}
    allowed = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"{key}.{unknown[0]}={settings[unknown[0]]!r}: not a setting of {cls.__name__}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(**settings)
