"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy column-block updates.

For each column block [i1, i2) of width ``blocksize`` with ``U = chol_upper(H^-1)``:
  unstructured: mask chosen once per block on w^2 / U_jj^2 (uniform sparsity per block, all rows);
  N:M: chosen lazily at every group start on the already-updated weights;
  then column by column: err = (w - q) / U_ii,  W[:, i:] -= err * U[i, i:],  and after the block
  W[:, i2:] -= Err @ U[i1:i2, i2:].
Matches ``SparseGPT.fasterprune`` in IST-DASLab/sparsegpt ``sparsegpt.py`` with two documented
differences: (1) the unstructured block mask prunes exactly ``int(numel * sparsity)`` entries in
stable-sort order, where the reference's ``tmp <= thresh`` prunes one more (and more on ties);
(2) a failed Cholesky factorisation is retried with 10x more damping and logged, never replaced by
an identity Hessian.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sds_exp.pruners.base import HessianStats, PruneResult
from sds_exp.pruners.masks import nm_mask, prune_lowest
from sds_exp.spec import SparsitySpec

__all__ = ["SparseGPT", "inverse_cholesky_upper", "sparsegpt_prune"]

log = logging.getLogger(__name__)


def inverse_cholesky_upper(H: Tensor, percdamp: float, name: str = "", max_tries: int = 6) -> Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, damp = percdamp * mean(diag(H)).

    Raises:
        torch.linalg.LinAlgError: when even ``percdamp * 10**(max_tries-1)`` fails.
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = torch.diag(H).mean()
    damp = percdamp
    for attempt in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if attempt:
                    log.warning("layer %s: Cholesky succeeded with percdamp=%g", name, damp)
                return U
        log.warning("layer %s: Cholesky failed with percdamp=%g; retrying with %g", name, damp, damp * 10)
        damp *= 10
    raise torch.linalg.LinAlgError(
        f"layer {name}: Cholesky of the damped Hessian failed up to percdamp={damp / 10:g}; "
        "the calibration activations may be degenerate (too few samples?)"
    )


def sparsegpt_prune(
    weight: Tensor, H: Tensor, spec: SparsitySpec, blocksize: int = 128, percdamp: float = 0.01, name: str = ""
) -> PruneResult:
    """Prune ``weight`` (out, in) given the Hessian ``H`` (in, in); both are copied, fp32."""
    W = weight.detach().float().clone()
    H = H.detach().float().clone().to(W.device)
    rows, cols = W.shape
    if spec.structured and blocksize % spec.m:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M={spec.m} for pattern {spec}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_cholesky_upper(H, percdamp, name)
    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (count,)
        if spec.structured:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            mask1 = prune_lowest(W1.pow(2) / d.pow(2).reshape(1, -1), int(W1.numel() * spec.ratio))
        for i in range(i2 - i1):
            if spec.structured and i % spec.m == 0:
                tmp = W1[:, i : i + spec.m].pow(2) / d[i : i + spec.m].pow(2).reshape(1, -1)
                mask1[:, i : i + spec.m] = nm_mask(tmp, spec.n, spec.m, spec.ties)
            w = W1[:, i]
            err = (w - w * mask1[:, i]) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = W1 * mask1  # column i of W1 equals q after its own update; the product fixes round-off
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    return PruneResult(weight=W, mask=mask)


@dataclass
class SparseGPT:
    """SparseGPT pruner.

    Args:
        blocksize: columns per lazy-update block (reference: 128).
        percdamp: Hessian dampening as a fraction of mean(diag(H)) (reference: 0.01).
    """

    blocksize: int = 128
    percdamp: float = 0.01
    needs_calibration: ClassVar[bool] = True  # a property of the method, not a setting

    def __post_init__(self) -> None:
        if self.blocksize <= 0:
            raise ValueError(f"sparsegpt blocksize={self.blocksize}; must be a positive integer")
        if not 0 < self.percdamp < 10:
            raise ValueError(f"sparsegpt percdamp={self.percdamp}; allowed: 0 < percdamp < 10")

    def collector(self, in_features: int, device: torch.device) -> HessianStats:
        return HessianStats(in_features, device)

    def prune(self, weight: Tensor, stats: HessianStats | None, spec: SparsitySpec, name: str = "") -> PruneResult:
        if stats is None or stats.nsamples == 0:
            raise ValueError(f"SparseGPT needs calibration statistics for layer {name or '?'}, got none")
        return sparsegpt_prune(weight, stats.H, spec, self.blocksize, self.percdamp, name)
