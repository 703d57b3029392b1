"""The sparsity target of a job: a ratio and an optional N:M pattern, validated once at the edge."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SparsitySpec"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
TIES = ("stable", "topk")


@dataclass(frozen=True)
class SparsitySpec:
    """What to prune in every linear layer.

    Attributes:
        ratio: fraction of weights set to zero, 0 <= ratio < 1.
        n: weights KEPT per group of ``m`` consecutive inputs ("2:4" keeps 2 of 4, the hardware
            convention); 0 for unstructured sparsity.
        m: group size; 0 for unstructured sparsity.
        ties: how N:M breaks exact ties of scores within a group: "stable" (the lower column index is pruned
            first: deterministic on every device) or "topk" (``torch.topk(largest=False)`` as the Wanda,
            SparseGPT, RIA and Pruner-Zero reference code calls it: their masks exactly, on the same device;
            its tie order is unspecified and differs between CPU and CUDA). Unstructured selection is stable.
    """

    ratio: float
    n: int = 0
    m: int = 0
    ties: str = "stable"

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def prune_n(self) -> int:
        """Weights zeroed per group (the Wanda/SparseGPT ``prune_n``)."""
        return self.m - self.n

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:g} unstructured"

    @classmethod
    def from_config(cls, cfg) -> SparsitySpec:
        """From a job config's ``sparsity``, ``pattern`` and ``nm_ties`` (``stable`` where absent)."""
        return cls.parse(cfg.sparsity, cfg.pattern, cfg.get("nm_ties", "stable"))

    @classmethod
    def parse(cls, ratio: float, pattern: object, ties: object = "stable") -> SparsitySpec:
        """Validate ``sparsity``, ``pattern`` and ``nm_ties`` from the config.

        Args:
            ratio: the ``sparsity`` key.
            pattern: ``"unstructured"`` or ``"N:M"``.
            ties: the ``nm_ties`` key, one of :data:`TIES`.

        Raises:
            ValueError: naming the bad value and what is allowed.
        """
        if ties not in TIES:
            raise ValueError(
                f"nm_ties={ties!r}; allowed: 'stable' (lower index pruned first on ties) or 'topk' "
                "(torch.topk's order, as the reference code: its masks exactly on the same device)"
            )
        if isinstance(pattern, int) and not isinstance(pattern, bool):
            # YAML 1.1 reads an unquoted 2:4 as the sexagesimal integer 2*60+4 = 124.
            hint = f"{pattern // 60}:{pattern % 60}" if pattern >= 60 else "N:M"
            raise ValueError(
                f"pattern={pattern} is an integer: an unquoted N:M in YAML is read as a base-60 number "
                f"(2:4 -> 124). Quote it: pattern: \"{hint}\". Allowed: 'unstructured' or a quoted 'N:M'."
            )
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity={ratio!r} is not a number; allowed: a float in [0, 1)") from None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"sparsity={ratio} is outside [0, 1); it is the fraction of weights zeroed")
        if not isinstance(pattern, str):
            raise ValueError(f"pattern={pattern!r} is not a string; allowed: 'unstructured' or 'N:M'")
        if pattern.strip().lower() == "unstructured":
            return cls(ratio=ratio, ties=ties)
        match = _NM.match(pattern)
        if match is None:
            raise ValueError(f"pattern={pattern!r} is not understood; allowed: 'unstructured' or 'N:M' (e.g. '2:4')")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern={pattern!r}: N:M needs 0 < N < M (N weights kept of every M)")
        implied = 1.0 - n / m
        if abs(implied - ratio) > 1e-6:
            raise ValueError(
                f"pattern={pattern!r} keeps {n} of {m} weights, i.e. sparsity {implied:g}, but sparsity={ratio:g}; "
                f"set sparsity={implied:g} or pattern=unstructured"
            )
        return cls(ratio=implied, n=n, m=m, ties=ties)
