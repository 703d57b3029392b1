"""Wanda (Sun et al., 2023): score_ij = |W_ij| * ||X_j||_2, pruned per output row or per N:M group.

Matches ``prune_wanda`` in locuslab/wanda ``lib/prune.py`` with ``use_variant=False``: per row, the
``int(in_features * sparsity)`` lowest scores in stable-sort order are zeroed; no weight update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sds_exp.pruners.base import PruneResult, RowNormStats
from sds_exp.pruners.masks import select_mask
from sds_exp.spec import SparsitySpec

__all__ = ["Wanda", "wanda_scores"]


def wanda_scores(weight: Tensor, scaler_row: Tensor) -> Tensor:
    """|W| * sqrt(scaler_row): (out, in) scores from (out, in) weights and (in,) mean squared norms."""
    return weight.abs() * scaler_row.sqrt().reshape(1, -1)


@dataclass
class Wanda:
    """Wanda pruner.

    Args:
        group: comparison group for unstructured sparsity: "row" (the reference) or "matrix".
    """

    group: str = "row"
    needs_calibration: ClassVar[bool] = True  # a property of the method, not a setting

    def __post_init__(self) -> None:
        if self.group not in ("matrix", "row"):
            raise ValueError(f"wanda group={self.group!r}; allowed: 'row', 'matrix'")

    def collector(self, in_features: int, device: torch.device) -> RowNormStats:
        return RowNormStats(in_features, device)

    def scores(self, weight: Tensor, stats: RowNormStats) -> Tensor:
        """|W| * ||X_j||_2 (fp32): the score a mask-refining wrapper (DSnoT) ranks by."""
        w = weight.detach().float()
        return wanda_scores(w, stats.scaler_row.to(w.device))

    def prune(self, weight: Tensor, stats: RowNormStats | None, spec: SparsitySpec, name: str = "") -> PruneResult:
        if stats is None or stats.nsamples == 0:
            raise ValueError(f"Wanda needs calibration statistics for layer {name or '?'}, got none")
        w = weight.detach().float()
        mask = select_mask(self.scores(w, stats), spec, self.group)
        return PruneResult(weight=w * mask, mask=mask)
