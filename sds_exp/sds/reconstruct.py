"""Per-layer weight reconstruction: SDS step 2 (dense re-activation with sparse regularisation) and the
step-3 weight adjustment (projected gradient descent under a moving top-|W| mask).

Both minimise the Gram-form loss of :mod:`sds_exp.sds.gram` with a torch optimizer for a fixed number of
full-batch steps. The optimizer default is Adam: its steps are invariant to the scale of the gradient,
which differs by orders of magnitude between layers (q_proj vs down_proj inputs) and models, so one
``lr`` works for every layer; the paper's "lr 0.1" does not state its optimizer or loss normalisation
and is not transferable. SGD is available through config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from sds_exp.pruners.masks import select_mask
from sds_exp.sds.gram import LayerProblem
from sds_exp.spec import SparsitySpec

__all__ = ["ReconstructSettings", "ReconstructionDivergedError", "reconstruct", "magnitude_projector"]

log = logging.getLogger(__name__)


class ReconstructionDivergedError(RuntimeError):
    """The loss of a layer became NaN/inf or exploded."""


def _default_optimizer():
    return partial(torch.optim.Adam, lr=1e-3)


@dataclass
class ReconstructSettings:
    """Optimisation settings of one reconstruction phase.

    Args:
        steps: full-batch steps per linear layer (paper: 200 epochs).
        optimizer: a partial torch optimizer taking the parameter list (``_partial_: true`` in config).
        explode_factor: stop when the loss exceeds this multiple of its starting value.
    """

    steps: int = 200
    optimizer: Callable = field(default_factory=_default_optimizer)
    explode_factor: float = 100.0

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps={self.steps}; must be a non-negative integer")
        lr = getattr(self.optimizer, "keywords", {}).get("lr")
        if lr is not None and (not math.isfinite(lr) or not 0 < lr <= 10):
            raise ValueError(f"learning rate lr={lr}; allowed: 0 < lr <= 10")

    @property
    def lr(self) -> float | None:
        return getattr(self.optimizer, "keywords", {}).get("lr")


def magnitude_projector(spec: SparsitySpec, group: str = "row") -> Callable[[Tensor], Tensor]:
    """Top-|W| keep-mask under ``spec`` (per row, or per N:M group), re-selected after every step."""
    return lambda W: select_mask(W.abs(), spec, group)


def reconstruct(
    weight: Tensor,
    problem: LayerProblem,
    settings: ReconstructSettings,
    regularizer: Callable[[Tensor], Tensor] | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
    name: str = "",
) -> tuple[Tensor, Tensor | None, dict[str, float]]:
    """Minimise ``problem.loss(W) + regularizer(W)`` from ``weight``.

    Args:
        weight: starting weight (out, in); not modified.
        problem: the Gram-form objective.
        settings: steps and optimizer.
        regularizer: differentiable penalty of W (None: none).
        project: if given, W is multiplied by ``project(W)`` (a keep-mask) after every step and at the start.

    Returns:
        (final weight, final mask or None, losses: reconstruction ``loss_*``, penalty ``reg_*`` and their sum ``objective_*``, before and after).

    Raises:
        ReconstructionDivergedError: naming the layer and the settings.
    """
    W = weight.detach().to(problem.A.device, problem.A.dtype).clone()
    mask = None
    if project is not None:
        mask = project(W)
        W.mul_(mask)
    loss_before = problem.loss(W)
    reg_before = float(regularizer(W)) if regularizer is not None else 0.0
    W.requires_grad_(True)
    opt = settings.optimizer([W])
    limit = settings.explode_factor * max(loss_before, 1e-12)
    loss = loss_before
    for step in range(int(settings.steps)):
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            WA = W @ problem.A
            loss = problem.loss(W, WA)
            if not math.isfinite(loss) or loss > limit:
                raise ReconstructionDivergedError(
                    f"layer {name}: reconstruction loss {loss:.4g} at step {step} (started at {loss_before:.4g}) "
                    f"with optimizer {getattr(settings.optimizer, 'func', settings.optimizer)} lr={settings.lr}, "
                    f"steps={settings.steps}; lower the learning rate"
                )
            grad = problem.grad(W, WA)
        if regularizer is not None:
            with torch.enable_grad():
                regularizer(W).backward()
        if W.grad is None:
            W.grad = grad
        else:
            W.grad.add_(grad)
        opt.step()
        if project is not None:
            with torch.no_grad():
                mask = project(W)
                W.mul_(mask)
    W = W.detach()
    loss_after = problem.loss(W)
    if not math.isfinite(loss_after):
        raise ReconstructionDivergedError(f"layer {name}: final reconstruction loss is {loss_after}")
    reg_after = float(regularizer(W)) if regularizer is not None else 0.0
    return W, mask, {"loss_before": loss_before, "loss_after": loss_after, "reg_before": reg_before,
                     "reg_after": reg_after, "objective_before": loss_before + reg_before,
                     "objective_after": loss_after + reg_after}
