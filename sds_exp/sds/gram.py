"""Gram-form layer reconstruction objective.

For one linear layer with teacher ``Y = W_d X_d`` and student ``W X_s`` (X: in x T tokens), the loss is a
mean over tokens and output features:

    L(W) = ||W_d X_d - W X_s||_F^2 / (T * out)
         = [ tr(W A W^T) - 2 <W, P> + c0 ] / out,
    A = X_s X_s^T / T,   P = W_d (X_s X_d^T / T)^T,   c0 = tr(W_d (X_d X_d^T / T) W_d^T),
    dL/dW = 2 (W A - P) / out.

So "epochs over 128 x 2048 tokens" of full-batch gradient descent cost one (out x in x in) product per
step, independent of the number of tokens. Biases are left as they are: with the same bias in teacher
and student they cancel from the residual.

``c0`` is a constant of the optimisation (it only makes reported losses absolute). It is read from the
teacher's layer outputs when the caller has them (``||W_d X_d||^2``, T x out work) instead of from
X_d X_d^T (T x in x in work, as much as a Gram): ``GramStats(teacher_gram=False)`` and
``problem(dense_weight, out_sq=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GramStats", "LayerProblem"]


class GramStats:
    """Running sums of X_s X_s^T, X_s X_d^T and X_d X_d^T over calibration tokens (fp32).

    With ``cross=False`` the student sees the teacher's inputs (X_s = X_d) and only one Gram is kept.
    With ``teacher_gram=False`` X_d X_d^T is not kept; :meth:`problem` then needs ``out_sq``.
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str = "cpu",
        cross: bool = True,
        dtype: torch.dtype = torch.float32,
        teacher_gram: bool = True,
    ) -> None:
        shape = (in_features, in_features)
        self.ss = torch.zeros(shape, dtype=dtype, device=device)
        self.sd = torch.zeros(shape, dtype=dtype, device=device) if cross else None
        self.dd = torch.zeros(shape, dtype=dtype, device=device) if cross and teacher_gram else None
        self.tokens = 0
        self.nsamples = 0
        self.cache: dict = {}  # per-input derived quantities (the spectrum of A), shared by the layers reading it

    @property
    def cross(self) -> bool:
        return self.sd is not None

    def add(self, xs: Tensor, xd: Tensor | None = None) -> None:
        """Add one batch: ``xs``/``xd`` (batch, tokens, in) student/teacher inputs of the same tokens."""
        self.cache.clear()
        self.nsamples += xs.shape[0] if xs.dim() == 3 else 1
        s = xs.reshape(-1, xs.shape[-1]).to(self.ss.dtype)
        self.tokens += s.shape[0]
        self.ss.addmm_(s.t(), s)
        if self.cross:
            if xd is None:
                raise ValueError("GramStats(cross=True) needs the teacher inputs too")
            d = xd.reshape(-1, xd.shape[-1]).to(self.ss.dtype)
            self.sd.addmm_(s.t(), d)
            if self.dd is not None:
                self.dd.addmm_(d.t(), d)

    def problem(self, dense_weight: Tensor, out_sq: float | None = None) -> LayerProblem:
        """The normalised quadratic problem for a layer whose dense (teacher) weight is ``dense_weight``.

        Args:
            out_sq: sum over the calibration tokens of ||W_d x_d||^2 (teacher outputs without bias); needed
                when X_d X_d^T was not kept.
        """
        if self.tokens == 0:
            raise ValueError("no calibration tokens were collected")
        Wd = dense_weight.to(self.ss.device, self.ss.dtype)
        A = self.ss / self.tokens
        if self.cross:
            P = Wd @ (self.sd / self.tokens).t()
            if out_sq is not None:
                c0 = out_sq / self.tokens
            elif self.dd is not None:
                c0 = float((Wd * (Wd @ (self.dd / self.tokens))).sum())
            else:
                raise ValueError("GramStats(teacher_gram=False).problem needs out_sq (the teacher's output energy)")
        else:
            P = Wd @ A
            c0 = float((Wd * P).sum())
        return LayerProblem(A=A, P=P, c0=c0, cache=self.cache)


@dataclass
class LayerProblem:
    """min_W [tr(W A W^T) - 2 <W, P> + c0] / out  (see the module docstring)."""

    A: Tensor  # (in, in), symmetric PSD
    P: Tensor  # (out, in)
    c0: float
    cache: dict | None = None  # shared by the problems of one input (q/k/v): the spectrum of A, computed once

    def loss(self, W: Tensor, WA: Tensor | None = None) -> float:
        WA = W @ self.A if WA is None else WA
        return float(((W * WA).sum() - 2 * (W * self.P).sum() + self.c0) / W.shape[0])

    def grad(self, W: Tensor, WA: Tensor | None = None) -> Tensor:
        WA = W @ self.A if WA is None else WA
        return (WA - self.P) * (2.0 / W.shape[0])
