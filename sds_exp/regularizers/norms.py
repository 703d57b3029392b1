"""L1 and L2 penalties, normalised as MEANS over the weight entries.

The reconstruction loss is a mean over tokens and output features, so both sides are intensive
quantities: ``lam`` means the same thing for a 576x576 and a 1536x576 layer. The paper's
lambda1 = lambda2 = 0.1 does not state its normalisation. With means, lam is size-free but not scale-free:
at 0.1 the penalty (~0.1 * mean|W| = 0.02 on SmolLM2) outweighs the reconstruction error of early layers
(1e-3..1e-2), re-activation then *raises* their loss and the re-activated model drifts (measured: ppl 85.8
vs dense 20.4). The config default, 0.001, was chosen on the WikiText2 validation slice
(``scripts/select_lambda.py``, ``docs/results.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Regularizer", "L1", "L2", "RegularizerSum"]


@runtime_checkable
class Regularizer(Protocol):
    """A penalty term of the re-activation: its value and its proximal map (how the optimiser applies it)."""

    def __call__(self, weight: Tensor) -> Tensor: ...

    def prox(self, weight: Tensor, step: float) -> Tensor: ...


def _check_lam(name: str, lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0 or lam > 1e3:
        raise ValueError(f"{name} lam={lam}; allowed: a finite value in [0, 1000]")
    return lam


@dataclass
class L1:
    """lam * mean(|W|)."""

    lam: float = 0.001

    def __post_init__(self) -> None:
        self.lam = _check_lam("L1", self.lam)

    def __call__(self, weight: Tensor) -> Tensor:
        return self.lam * weight.abs().mean()

    def prox(self, weight: Tensor, step: float) -> Tensor:
        """argmin_V ||V - W||^2 / (2 step) + lam * mean|V|: soft-thresholding by step * lam / numel."""
        t = step * self.lam / weight.numel()
        return weight.sign() * (weight.abs() - t).clamp_min(0)


@dataclass
class L2:
    """lam * mean(W^2)."""

    lam: float = 0.001

    def __post_init__(self) -> None:
        self.lam = _check_lam("L2", self.lam)

    def __call__(self, weight: Tensor) -> Tensor:
        return self.lam * weight.pow(2).mean()

    def prox(self, weight: Tensor, step: float) -> Tensor:
        """argmin_V ||V - W||^2 / (2 step) + lam * mean(V^2): a shrink by 1 / (1 + 2 step lam / numel)."""
        return weight * self.shrink(weight.numel(), step)

    def shrink(self, numel: int, step: float) -> float:
        """The factor of the proximal map: linear, so the closed-form re-activation path includes it."""
        return 1.0 / (1 + 2 * step * self.lam / numel)


class RegularizerSum:
    """The sum of named terms; empty means no regularisation."""

    def __init__(self, terms: Mapping[str, Regularizer] | None = None) -> None:
        self.terms = dict(terms or {})
        for name, term in self.terms.items():  # checked when the config is built, not after the prune stage
            if not isinstance(term, Regularizer):
                raise TypeError(
                    f"regularizer.{name}: {type(term).__module__}.{type(term).__qualname__} is not a "
                    "regularizer; allowed: an object with __call__(weight) and prox(weight, step) "
                    "(sds_exp.regularizers.norms.Regularizer)"
                )

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, weight: Tensor) -> Tensor:
        return sum(term(weight) for term in self.terms.values())  # type: ignore[return-value]

    def prox(self, weight: Tensor, step: float) -> Tensor:
        """The terms' proximal maps in turn (exact for L1 followed by L2: the elastic-net prox)."""
        for term in sorted(self.terms.values(), key=lambda t: not isinstance(t, L1)):
            weight = term.prox(weight, step)
        return weight

    def parts(self, weight: Tensor) -> dict[str, float]:
        return {name: float(term(weight)) for name, term in self.terms.items()}
