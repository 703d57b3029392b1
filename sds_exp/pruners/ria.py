"""RIA (Zhang et al., ICLR 2024): relative importance times activation norm.

score_ij = (|W_ij| / sum_i' |W_i'j| + |W_ij| / sum_j' |W_ij'|) * (||X_j||_2)^a
(the weight's share of its input column plus its share of its output row, times the input norm to the power
``a``). Matches ``prune_ria`` in biomedical-cybernetics/Relative-importance-and-activation-pruning
``lib/prune.py`` at 7bc55b0 on its default path (``--prune_method ria``, no ``--reallocation``, ``--lsa``,
``--reconstruction``, ``--gptq``, ``--semi_sparse_acc``): unstructured pruning ranks the whole matrix
(``group="row"`` is ``--per_outneuron``), N:M ranks each group of M consecutive inputs of a row. Differences:
selection by stable index order (the reference's ``W_metric <= thresh`` prunes one more, and more on ties), a
column or row of all-zero weights scores 0 instead of 0/0 = nan, and the score is computed in fp32 (the
reference: in the model's dtype, times the fp32 norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sds_exp.pruners.base import PruneResult, RowNormStats
from sds_exp.pruners.masks import select_mask
from sds_exp.spec import SparsitySpec

__all__ = ["RIA", "ria_scores"]


def ria_scores(weight: Tensor, scaler_row: Tensor, a: float = 0.5) -> Tensor:
    """RIA scores (out, in) from weights (out, in) and Wanda's (in,) mean squared input norms."""
    w = weight.abs().float()
    tiny = torch.finfo(w.dtype).tiny  # an all-zero column/row has |W| = 0 everywhere: 0 / tiny = 0, not nan
    relative = w / w.sum(0, keepdim=True).clamp_min(tiny) + w / w.sum(1, keepdim=True).clamp_min(tiny)
    return relative * scaler_row.float().sqrt().pow(a).reshape(1, -1)


@dataclass
class RIA:
    """RIA pruner.

    Args:
        a: exponent of the input norm, in (0, 2] (the reference's ``--a``, default 0.5).
        group: comparison group for unstructured sparsity: "matrix" (the reference's default) or "row"
            (``--per_outneuron``, Wanda's group).
    """

    a: float = 0.5
    group: str = "matrix"
    needs_calibration: ClassVar[bool] = True  # a property of the method, not a setting

    def __post_init__(self) -> None:
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or not 0 < self.a <= 2:
            raise ValueError(f"pruner.a={self.a!r}: the exponent of the input norm must be in (0, 2] (reference 0.5)")
        if self.group not in ("matrix", "row"):
            raise ValueError(f"pruner.group={self.group!r}; allowed: 'matrix' (reference), 'row' (--per_outneuron)")

    def collector(self, in_features: int, device: torch.device) -> RowNormStats:
        return RowNormStats(in_features, device)

    def scores(self, weight: Tensor, stats: RowNormStats) -> Tensor:
        """The ranking score (out, in); DSnoT's N:M refinement ranks a group's kept weights by it."""
        return ria_scores(weight.detach(), stats.scaler_row.to(weight.device), self.a)

    def prune(self, weight: Tensor, stats: RowNormStats | None, spec: SparsitySpec, name: str = "") -> PruneResult:
        if stats is None or stats.nsamples == 0:
            raise ValueError(f"RIA needs calibration statistics for layer {name or '?'}, got none")
        w = weight.detach().float()
        mask = select_mask(self.scores(w, stats), spec, self.group)
        return PruneResult(weight=w * mask, mask=mask)
