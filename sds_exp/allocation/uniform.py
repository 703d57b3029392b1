"""Uniform allocation: every layer at the job's sparsity (what Wanda and SparseGPT do)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from sds_exp.spec import SparsitySpec

__all__ = ["Uniform"]


@dataclass
class Uniform:
    """Every prunable layer at ``spec.ratio`` (N:M included); the pipeline then uses the job's own spec."""

    needs_calibration: ClassVar[bool] = False
    reprune: ClassVar[str] = "reuse"

    def ratios(
        self,
        model: nn.Module,
        calib: Tensor,
        layers: dict[str, nn.Linear],
        spec: SparsitySpec,
        *,
        device="cpu",
        batch_size: int = 8,
    ) -> dict[str, float]:
        return dict.fromkeys(layers, spec.ratio)
