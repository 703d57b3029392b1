"""Per-layer weight reconstruction: SDS step 2 (dense re-activation with sparse regularisation) and the
step-3 weight adjustment (projected gradient descent under a moving top-|W| mask).

Both minimise the Gram-form loss of :mod:`sds_exp.sds.gram` with a torch optimizer for a fixed number of
full-batch steps. By default the gradient is preconditioned with the inverse of the damped quadratic term,
``g <- g (2A/out + damp)^-1``, and the optimizer is plain SGD: a step of ``lr`` then moves W the fraction
``lr`` of the way to the (damped) least-squares optimum, whatever the layer's size or activation scale,
so the paper's "lr 0.1, 200 epochs" has a meaning that transfers across layers and models. Unpreconditioned
optimisers (Adam, SGD) stall on these problems: LLM activations have outlier channels that make A very
ill-conditioned (measured on SmolLM2: 200 Adam steps at lr 1e-3 left most layers 2-8x above their
starting loss floor, and the re-activated model at ppl > 10^4). ``precondition: false`` gives the plain
optimiser.
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
from sds_exp.sds.closed_form import closed_form_path, spectrum
from sds_exp.sds.gram import LayerProblem
from sds_exp.spec import SparsitySpec

__all__ = [
    "ReconstructSettings",
    "ReconstructionDivergedError",
    "reconstruct",
    "magnitude_projector",
    "ADJUST_SCORES",
    "SOLVERS",
]

log = logging.getLogger(__name__)


class ReconstructionDivergedError(RuntimeError):
    """The loss of a layer became NaN/inf or exploded."""


SOLVERS = ("iterative", "closed_form")


def _default_optimizer():
    return partial(torch.optim.SGD, lr=0.1)


@dataclass
class ReconstructSettings:
    """Optimisation settings of one reconstruction phase.

    Args:
        steps: full-batch steps per linear layer (paper: 200 epochs).
        optimizer: a partial torch optimizer taking the parameter list (``_partial_: true`` in config).
        precondition: multiply the gradient by the inverse damped Hessian of the reconstruction term,
            making ``lr`` the fraction of a Newton step (then 0 < lr < 2 with SGD).
        damp: damping of that inverse, as a fraction of mean(diag(A)) (SparseGPT's percdamp).
        explode_factor: stop when the loss exceeds this multiple of its starting value ...
        explode_floor: ... or of this absolute value, whichever is larger (an objective that starts at
            ~0, e.g. -1.9e-9 from rounding, would otherwise "explode" at +1.9e-9).
        check_every: evaluate the objective for that check every this many steps (and after the last).
        solver: "iterative" (run the steps) or "closed_form" (the same k-step path of the quadratic and any
            L2 term through one eigendecomposition per input, :mod:`sds_exp.sds.closed_form`; needs plain SGD
            with ``precondition`` and no projection).
        prox_steps: with ``closed_form`` and a penalty without a closed form (L1), the last this many of the
            ``steps`` (all of them if fewer) run iteratively with every term (0: the L1 term is not applied).
        tol: stop early once, for ``patience`` consecutive checks, the mask (if projected) moved in at most
            ``mask_tol`` of its entries and the objective fell by less than this fraction of itself between
            checks; 0 runs every step.
        patience: checks in a row that must meet ``tol``.
        mask_tol: fraction of mask entries that may still flip between two checks of a converged run (0: none).
    """

    steps: int = 200
    optimizer: Callable = field(default_factory=_default_optimizer)
    precondition: bool = True
    damp: float = 0.01
    explode_factor: float = 100.0
    explode_floor: float = 1e-6
    check_every: int = 10
    solver: str = "iterative"
    prox_steps: int = 0
    tol: float = 0.0
    patience: int = 2
    mask_tol: float = 0.0

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps={self.steps}; must be a non-negative integer")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r}; allowed: {', '.join(SOLVERS)}")
        if int(self.prox_steps) != self.prox_steps or self.prox_steps < 0:
            raise ValueError(f"prox_steps={self.prox_steps}; allowed: a non-negative integer (at most `steps` run)")
        if not (math.isfinite(self.tol) and 0 <= self.tol < 1):
            raise ValueError(f"tol={self.tol}; allowed: 0 <= tol < 1 (0: no early stop)")
        if not (math.isfinite(self.mask_tol) and 0 <= self.mask_tol < 1):
            raise ValueError(f"mask_tol={self.mask_tol}; allowed: 0 <= mask_tol < 1 (a fraction of the mask's entries)")
        if int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"patience={self.patience}; must be a positive integer (checks in a row)")
        if self.solver == "closed_form":
            func = getattr(self.optimizer, "func", self.optimizer)
            kw = getattr(self.optimizer, "keywords", {})
            plain = func is torch.optim.SGD and not any(kw.get(k) for k in ("momentum", "weight_decay", "nesterov"))
            if not (self.precondition and plain):
                raise ValueError(
                    "solver=closed_form is the path of preconditioned plain SGD; it needs precondition=true and "
                    f"optimizer torch.optim.SGD without momentum/weight_decay (got {func} {kw}, "
                    f"precondition={self.precondition}); use solver=iterative for other optimisers"
                )
        lr = getattr(self.optimizer, "keywords", {}).get("lr")
        ok = (0 < lr < 2) if self.precondition else (0 < lr <= 10) if lr is not None else True
        if lr is not None and (not math.isfinite(lr) or not ok):
            raise ValueError(
                f"learning rate lr={lr}; allowed: "
                + ("0 < lr < 2" if self.precondition else "0 < lr <= 10")
                + (" (a fraction of a Newton step with precondition=true)" if self.precondition else "")
            )
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"check_every={self.check_every}; must be a positive integer")
        if not 0 < self.damp < 10:
            raise ValueError(f"damp={self.damp}; allowed: 0 < damp < 10")

    @property
    def lr(self) -> float | None:
        return getattr(self.optimizer, "keywords", {}).get("lr")


ADJUST_SCORES = ("magnitude", "wanda")


def magnitude_projector(
    spec: SparsitySpec, group: str = "row", column_scale: Tensor | None = None
) -> Callable[[Tensor], Tensor]:
    """Top-score keep-mask under ``spec`` (per row, or per N:M group), re-selected after every step.

    The score is |W| (the paper's projection), or ``|W| * column_scale`` with ``column_scale = sqrt(diag A)``
    (proportional to ||x_j||: Wanda's score, the first-order cost of zeroing an entry under the layer loss).
    """
    if column_scale is None:
        return lambda W: select_mask(W.abs(), spec, group)
    scale = column_scale.reshape(1, -1)
    return lambda W: select_mask(W.abs() * scale, spec, group)


def _damped_inverse(A: Tensor, damp: float, name: str) -> tuple[Tensor, float]:
    """(B, delta) with B = (A + delta I)^-1, delta = damp * mean(diag(A)) (10x more on a failed Cholesky).

    The inverse Hessian of the reconstruction term per row is (2A/out + damp mean(diag(2A/out)) I)^-1
    = (out/2) B, so the preconditioned gradient is (WA - P) B = W - delta W B - P B: one (out x in x in)
    product per step once P B is computed.
    """
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    mean_diag = float(torch.diag(A).mean().clamp_min(1e-12))
    for attempt in range(6):
        delta = damp * 10**attempt * mean_diag
        L, info = torch.linalg.cholesky_ex(A + delta * eye)
        if info == 0:
            if attempt:
                log.warning("layer %s: preconditioner needed damp=%g", name, damp * 10**attempt)
            return torch.cholesky_inverse(L), delta
    raise torch.linalg.LinAlgError(f"layer {name}: the damped Gram matrix is not positive definite")


def _check(value: float, limit: float, step: int, start: float, settings: ReconstructSettings, name: str) -> None:
    """Stop on a NaN/inf or exploding objective, naming the layer and the settings."""
    if not math.isfinite(value) or value > limit:
        raise ReconstructionDivergedError(
            f"layer {name}: objective {value:.4g} at step {step} (started at {start:.4g}) "
            f"with optimizer {getattr(settings.optimizer, 'func', settings.optimizer)} lr={settings.lr}, "
            f"steps={settings.steps}; lower the learning rate"
        )


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
        (final weight, final mask or None, losses): reconstruction ``loss_*``, penalty ``reg_*`` and their
        sum ``objective_*``, before and after.

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
    start = loss_before + reg_before
    limit = settings.explode_factor * max(start, settings.explode_floor)
    steps = int(settings.steps)
    use_prox = settings.precondition and regularizer is not None and hasattr(regularizer, "prox")
    # the penalty is applied by its proximal map with step lr / (mean curvature of the quadratic term):
    # a Newton-scaled subgradient of L1 has no curvature to bound it and oscillates or diverges
    reg_scale = 1.0 / float((torch.diag(problem.A) * (2.0 / W.shape[0])).mean().clamp_min(1e-12))
    closed = 0
    if settings.solver == "closed_form" and steps:
        if project is not None:
            raise ValueError(f"layer {name}: solver=closed_form cannot follow a projection (the adjustment)")
        shrink, nonlinear = _linear_part(regularizer if use_prox else None, W.numel(), settings.lr * reg_scale)
        closed = max(steps - int(settings.prox_steps), 0) if nonlinear else steps
        if closed:
            W = closed_form_path(
                W, problem.P, spectrum(problem.A, problem.cache), settings.damp, settings.lr, closed, shrink
            )
        steps -= closed
    B = None
    if settings.precondition and steps:
        B, delta = _damped_inverse(problem.A, settings.damp, name)
        PB = problem.P @ B
    W.requires_grad_(True)
    opt = settings.optimizer([W])
    taken, last, calm = steps, None, 0  # early stop: objective and mask at the last check, checks in a row met
    for step in range(steps):
        with torch.no_grad():
            if B is not None:  # preconditioned gradient (WA - P) B without forming WA (see _damped_inverse)
                WA = None
                grad = W - PB
                grad.addmm_(W, B, alpha=-delta)
            else:
                WA = W @ problem.A
                grad = problem.grad(W, WA)
            if step % settings.check_every == 0:  # divergence check (the loss costs one more product)
                reg = float(regularizer(W)) if regularizer is not None else 0.0
                value = problem.loss(W, WA) + reg
                _check(value, limit, step, start, settings, name)
                if settings.tol and last is not None:
                    calm = calm + 1 if _converged(last, value, mask, settings) else 0
                    if calm >= settings.patience:
                        taken = step
                        break
                last = (value, None if mask is None else mask.clone())
        W.grad = grad
        if regularizer is not None and not use_prox:
            with torch.enable_grad():
                regularizer(W).backward()  # adds the penalty's gradient to W.grad
        opt.step()
        W.grad = None
        with torch.no_grad():
            if use_prox:
                W.copy_(regularizer.prox(W, settings.lr * reg_scale))
            if project is not None:
                mask = project(W)
                W.mul_(mask)
    W = W.detach()
    loss_after = problem.loss(W)
    reg_after = float(regularizer(W)) if regularizer is not None else 0.0
    _check(loss_after + reg_after, limit, closed + taken, start, settings, name)
    return (
        W,
        mask,
        {
            "loss_before": loss_before,
            "loss_after": loss_after,
            "reg_before": reg_before,
            "reg_after": reg_after,
            "objective_before": loss_before + reg_before,
            "objective_after": loss_after + reg_after,
            "steps": float(closed + taken),
        },
    )


def _converged(last: tuple, value: float, mask: Tensor | None, settings: ReconstructSettings) -> bool:
    """Since the last check at most ``mask_tol`` of the mask flipped and the objective fell by less than ``tol``
    of itself."""
    prev, prev_mask = last
    if mask is not None:
        if prev_mask is None:
            return False
        flipped = int((mask != prev_mask).sum())
        if flipped > settings.mask_tol * mask.numel():
            return False
    return prev - value < settings.tol * max(abs(value), settings.explode_floor)


def _linear_part(regularizer, numel: int, step: float) -> tuple[float, bool]:
    """(shrink, nonlinear): the product of the linear proximal maps' factors (L2: 1 / (1 + 2 step lam / numel)),
    and whether a term without one (L1) is left."""
    if regularizer is None:
        return 1.0, False
    terms = getattr(regularizer, "terms", None)
    terms = list(terms.values()) if terms is not None else [regularizer]
    shrink, nonlinear = 1.0, False
    for term in terms:
        factor = getattr(term, "shrink", None)
        if factor is None:
            nonlinear = True
        else:
            shrink *= factor(numel, step)
    return shrink, nonlinear
