"""The k-step path of preconditioned gradient descent on the layer quadratic, in closed form.

One preconditioned SGD step of :func:`sds_exp.sds.reconstruct.reconstruct` on ``[tr(W A W^T) - 2<W, P>] / out``
with ``B = (A + delta I)^-1``, followed by the L2 proximal map (a shrink by ``c <= 1``), is linear in W:

    W <- c [W - lr (W A - P) B] = W (c (I - lr A B)) + c lr P B.

A and B share the eigenvectors U of A (eigenvalues lam_i), so in the basis ``V = W U``, ``Q = P U`` every
column evolves on its own with ratio ``r_i = c (1 - lr lam_i / (lam_i + delta))`` and offset
``b_i Q_i``, ``b_i = c lr / (lam_i + delta)``. After k steps

    V_k = r^k V_0 + b (1 - r^k) / (1 - r) Q,        W_k = V_k U^T,

with ``(1 - r^k) / (1 - r) -> k`` where ``r = 1`` (c = 1 and lam_i = 0: a direction the calibration data
never excites keeps its pruned start plus k offsets of size 0, since P has no component there). This is
not the least-squares optimum: directions of small curvature stay near the start (the pruned weights), an
implicit regulariser towards the first prune. One eigendecomposition per distinct input (shared by q/k/v,
by gate/up) replaces ``k`` (out x in x in) products per layer with three.

The L1 term's proximal map (soft-thresholding) is not linear; it has no closed form here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Spectrum", "spectrum", "closed_form_path"]


class Spectrum:
    """Eigen-decomposition of a Gram matrix A (fp64): ``A = U diag(lam) U^T``, lam clamped at 0."""

    def __init__(self, A: Tensor) -> None:
        lam, U = torch.linalg.eigh(A.detach().double())
        self.lam = lam.clamp_min(0)  # A is PSD; rounding leaves tiny negative eigenvalues
        self.U = U
        self.mean_diag = float(torch.diag(A).double().mean().clamp_min(1e-12))


def spectrum(A: Tensor, cache: dict | None = None) -> Spectrum:
    """The spectrum of A, computed once per ``cache`` (the layers that read the same input share one)."""
    if cache is None:
        return Spectrum(A)
    if "spectrum" not in cache:
        cache["spectrum"] = Spectrum(A)
    return cache["spectrum"]


def _path_coefficients(lam: Tensor, delta: float, lr: float, steps: int, shrink: float) -> tuple[Tensor, Tensor]:
    """(f, g) with ``V_k = f * V_0 + g * Q`` per eigen-direction (fp64)."""
    x = lr * lam / (lam + delta)  # in [0, lr)
    one_minus_r = (1.0 - shrink) + shrink * x  # 1 - r >= 0, formed without the cancellation of 1 - r
    r = 1.0 - one_minus_r
    b = shrink * lr / (lam + delta)
    positive = r > 0
    # 1 - r^k: through log1p/expm1 where r is close to 1 (small curvature), directly where r <= 0 (lr > 1)
    safe = torch.where(positive, one_minus_r, torch.zeros_like(one_minus_r))
    one_minus_f = torch.where(positive, -torch.expm1(steps * torch.log1p(-safe)), 1.0 - r.pow(steps))
    f = 1.0 - one_minus_f
    g = torch.where(one_minus_r > 0, b * one_minus_f / one_minus_r.clamp_min(1e-300), b * steps)
    return f, g


def closed_form_path(
    weight: Tensor, P: Tensor, spec: Spectrum, damp: float, lr: float, steps: int, shrink: float = 1.0
) -> Tensor:
    """W after ``steps`` preconditioned SGD steps (learning rate ``lr``, damping ``damp * mean(diag A)``,
    each followed by a shrink by ``shrink``) from ``weight``, without running them. fp64 inside, fp32 out.

    Args:
        weight: (out, in) start (the pruned weight).
        P: (out, in) linear term of the quadratic.
        spec: the spectrum of A.
    """
    delta = damp * spec.mean_diag
    f, g = _path_coefficients(spec.lam, delta, lr, int(steps), float(shrink))
    U = spec.U
    V = (weight.double() @ U) * f + (P.double() @ U) * g
    return (V @ U.t()).float()
