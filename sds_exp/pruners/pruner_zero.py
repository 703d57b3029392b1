"""Pruner-Zero (Dong et al., ICML 2024): the released symbolic metric score_ij = |W_ij * W_ij| * mms(G)_ij.

``G`` is the per-weight l2 norm over calibration windows of the loss gradient (``gradients.py``) and
``mms(G) = (G - min G) / (max G - min G)`` is min-max scaling over the whole matrix. The tree is
``data/best_tree.json`` of pprp/Pruner-Zero @ db70134 (``mul(abs(mul(W, W)), mms(G))``), evaluated by
``GPTree.compute_tree`` (``lib/gptree.py``) in ``prune_pruner_zero`` (``lib/prune.py``) on fp32 ``|W|`` and
``G``; it does not read the activations X. Masks as the reference: per output row, the
``int(in_features * sparsity)`` lowest scores in stable order, or the N lowest of every M consecutive inputs;
no weight update. Differences (docs/pruner_zero.md): G is recomputed in fp32 on the model of each prune
round from the job's calibration windows in eval mode, where the reference loads a file computed once
on the dense fp16 model from 128 WikiText2 windows with the model in train mode.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sds_exp.pruners.base import PruneResult
from sds_exp.pruners.gradients import GRAD_NORMS, gradient_stats
from sds_exp.pruners.masks import select_mask
from sds_exp.spec import SparsitySpec

__all__ = ["PrunerZero", "pruner_zero_scores", "min_max_scale"]

log = logging.getLogger(__name__)


def min_max_scale(x: Tensor, name: str = "") -> Tensor:
    """(x - min x) / (max x - min x) over the whole tensor: the tree's ``mms`` operator.

    Raises:
        ValueError: when x is constant (the scaling is 0/0) or not finite.
    """
    lo, hi = x.min(), x.max()
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError(f"layer {name or '?'}: the gradient statistic is not finite (min {lo}, max {hi})")
    if not hi > lo:
        raise ValueError(
            f"layer {name or '?'}: the gradient statistic is constant ({lo.item():g}), so min-max scaling is "
            "undefined; the layer received no gradient from the calibration loss"
        )
    return (x - lo) / (hi - lo)


def pruner_zero_scores(weight: Tensor, grad: Tensor, name: str = "") -> Tensor:
    """|W * W| * mms(G): (out, in) scores from (out, in) weights and the (out, in) gradient statistic.

    A constant G (a layer the loss does not reach, e.g. behind an all-zero re-activated layer) carries no
    ranking: mms is 0/0 there (NaN scores in the reference), so the score falls back to |W * W|, with a warning.
    """
    w = weight.float()
    g = grad.float()
    if bool(torch.isfinite(g).all()) and not g.max() > g.min():
        log.warning("layer %s: constant gradient statistic (%g); Pruner-Zero falls back to |W|^2", name, g.max())
        return (w * w).abs()
    return (w * w).abs() * min_max_scale(g, name)


class NoStats:
    """The collector of a score that reads no activations: the block pass still runs, nothing is kept."""

    nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        pass


@functools.cache
def _autograd_error(dtype: torch.dtype, device: str) -> str | None:
    """None if a tiny LM-shaped forward and backward run in ``dtype`` on ``device``, else the error text."""
    try:
        g = torch.Generator().manual_seed(0)
        table = torch.randn(16, 8, generator=g).to(device, dtype)
        w = torch.randn(8, 8, generator=g).to(device, dtype)
        ids = torch.tensor([[1, 2, 3, 4]], device=device)
        h = F.embedding(ids, table).detach().requires_grad_()  # (1, 4, 8)
        q = F.linear(F.layer_norm(h, (8,)), w)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        a = F.silu(a) * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1)  # RMSNorm-like
        F.cross_entropy(F.linear(a, table)[0].float(), ids[0]).backward()
        return None if h.grad is not None and bool(torch.isfinite(h.grad).all()) else "no finite gradient"
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass
class PrunerZero:
    """Pruner-Zero pruner with its released metric.

    Args:
        group: comparison group for unstructured sparsity: "row" (the reference) or "matrix".
        grad_norm: "l2" (the released G: sqrt of the sum over windows of squared gradients) or "l1".
        grad_batch_size: calibration windows per backward; None = the job's ``calib_batch_size``. Speed and
            memory only: the statistic is per window either way.
        grad_nsamples: the first this many calibration windows feed the gradients; None = all (reference: 128).
    """

    group: str = "row"
    grad_norm: str = "l2"
    grad_batch_size: int | None = None
    grad_nsamples: int | None = None
    needs_calibration: ClassVar[bool] = True  # the gradients need calibration windows
    display_name: ClassVar[str] = "Pruner-Zero"  # how tables name it

    def __post_init__(self) -> None:
        if self.group not in ("row", "matrix"):
            raise ValueError(f"pruner_zero group={self.group!r}; allowed: 'row', 'matrix'")
        if self.grad_norm not in GRAD_NORMS:
            raise ValueError(f"pruner_zero grad_norm={self.grad_norm!r}; allowed: {', '.join(GRAD_NORMS)}")
        for key in ("grad_batch_size", "grad_nsamples"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"pruner_zero {key}={value!r}; allowed: null or a positive integer")

    @staticmethod
    def check_config(node: dict, cfg, key: str) -> None:
        """The job's dtype must support a backward pass on the job's device (Pruner-Zero's gradients)."""
        if cfg is None or cfg.get("dtype") is None:
            return
        from sds_exp.models.loading import resolve_dtype

        dtype_name, device = cfg.get("dtype"), str(cfg.get("device", "cpu"))
        target = node.get("_target_")
        try:
            dtype = resolve_dtype(dtype_name)
        except ValueError:
            dtype = None
        if dtype is None or not dtype.is_floating_point:
            raise ValueError(
                f"{key}._target_={target} computes gradients in the model's dtype, but dtype={dtype_name!r} is not a "
                "floating-point dtype with autograd; allowed: float32, bfloat16, float16"
            )
        if device.startswith("cuda") and not torch.cuda.is_available():
            return  # the device check reports it
        error = _autograd_error(dtype, device)
        if error is not None:
            raise ValueError(
                f"{key}._target_={target} computes gradients in the model's dtype, but dtype={dtype_name} has no "
                f"working backward on device={device} ({error}); allowed: float32, or another dtype this device "
                "supports"
            )

    def collector(self, in_features: int, device: torch.device) -> NoStats:
        return NoStats()  # the released metric reads W and G only

    def prepare(
        self, model: nn.Module, calib: Tensor, layers: dict[str, nn.Linear], *, device, batch_size: int
    ) -> dict[str, Tensor]:
        """G for every layer from backward passes of the model as it is now (dense, or re-activated)."""
        windows = calib if self.grad_nsamples is None else calib[: self.grad_nsamples]
        log.info("Pruner-Zero: gradients of %d layers from %d calibration windows", len(layers), windows.shape[0])
        return gradient_stats(
            model,
            windows,
            layers,
            device=device,
            batch_size=self.grad_batch_size or batch_size,
            norm=self.grad_norm,
        )

    def prune(
        self, weight: Tensor, stats: object, spec: SparsitySpec, name: str = "", extra: Tensor | None = None
    ) -> PruneResult:
        if extra is None:
            raise ValueError(
                f"Pruner-Zero needs gradients from prepare() for layer {name or '?'} (prune(..., extra=G)); got none"
            )
        w = weight.detach().float()
        if extra.shape != w.shape:
            raise ValueError(f"layer {name or '?'}: gradient statistic {tuple(extra.shape)} != weight {tuple(w.shape)}")
        mask = select_mask(pruner_zero_scores(w, extra.to(w.device), name), spec, self.group)
        return PruneResult(weight=w * mask, mask=mask)
