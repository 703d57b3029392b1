"""Magnitude pruning: score |W|, ranked over the whole matrix (unstructured) or per N:M group.

Matches ``prune_magnitude`` in locuslab/wanda ``lib/prune.py``, except that selection is by stable index
order rather than ``|W| <= threshold``, so ties at the threshold never over-prune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sds_exp.pruners.base import PruneResult
from sds_exp.pruners.masks import select_mask
from sds_exp.spec import SparsitySpec

__all__ = ["Magnitude"]


@dataclass
class Magnitude:
    """Magnitude pruner (no calibration data).

    Args:
        group: comparison group for unstructured sparsity, "matrix" (the reference) or "row".
    """

    group: str = "matrix"
    needs_calibration: ClassVar[bool] = False  # a property of the method, not a setting

    def __post_init__(self) -> None:
        if self.group not in ("matrix", "row"):
            raise ValueError(f"magnitude group={self.group!r}; allowed: 'matrix', 'row'")

    def collector(self, in_features: int, device: torch.device) -> None:
        return None

    def scores(self, weight: Tensor, stats: object = None) -> Tensor:
        """|W| (fp32): the score a mask-refining wrapper (DSnoT) ranks by."""
        return weight.detach().abs().float()

    def prune(self, weight: Tensor, stats: object, spec: SparsitySpec, name: str = "") -> PruneResult:
        w = weight.detach().float()
        mask = select_mask(self.scores(w), spec, self.group)
        return PruneResult(weight=w * mask, mask=mask)
