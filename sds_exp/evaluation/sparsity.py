"""Measured sparsity: counted on the weights (exact zeros) and on the kept masks, per layer and in total."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["sparsity_report"]


def sparsity_report(layers: dict[str, nn.Linear], masks: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Per-layer and total sparsity.

    Returns flat metrics: ``actual`` (fraction of exact zeros over the given layers' weights, the
    references' ``check_sparsity``), ``mask`` (fraction pruned by the masks, if given) and
    ``layer/<name>`` (per-layer zero fraction).
    """
    zeros = total = pruned = 0
    report: dict[str, float] = {}
    for name, layer in layers.items():
        w = layer.weight
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        report[f"layer/{name}"] = z / w.numel()
        if masks is not None and name in masks:
            pruned += int((~masks[name]).sum())
    report["actual"] = zeros / max(total, 1)
    if masks is not None:
        report["mask"] = pruned / max(total, 1)
    return report
