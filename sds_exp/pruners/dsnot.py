"""DSnoT (Zhang et al., ICLR 2024): training-free mask refinement on top of a base pruner.

Per output row i, with x̄_j = the mean over sequences of sum_tokens x_j and the row's mean output error
e_i = sum_j (W_ij - W'_ij) x̄_j (dense minus pruned), each cycle swaps one pruned weight in and one kept
weight out, in every row whose |e_i| > update_threshold:
  regrow: the pruned weight with the largest W_ij x̄_j / var_j^p if e_i > 0, the most negative if e_i <= 0;
  prune (unstructured): a kept weight whose contribution has the sign that moves e_i towards 0, the one with
      the smallest Wanda score |W_ij| ||X_j|| first;
  prune (N:M): the kept weight with the lowest base score in the regrown weight's own group of M
      (and only if the swap leaves e_i's sign unchanged);
until no row changes or ``max_cycle_time`` cycles. Every swap keeps each row's count (and each group's, N:M).
Matches ``prune_DSnoT`` in zyxxmu/DSnoT ``lib/prune.py`` at 4c029df (and the unstructured path of its OPT copy
``lib/prune_opt.py``, whose N:M path fails), with these differences: the initial mask is the base pruner's own
result (the reference recomputes a per-row mask from an ``initial_method`` score; its "sparsegpt" is the
saliency without the OBS update); kept weights keep the base's values and a regrown weight gets its dense value
(the same as the reference for a base without weight update); a row stops when its regrow or prune list is used
up (the reference's lists then run into kept entries and can change the row's count); a kept weight whose
contribution is exactly 0 sits between the negative and positive ones (the reference maps it to the first entry,
which is then visited twice).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sds_exp.pruners.base import CombinedStats, InputMomentStats, PruneResult
from sds_exp.spec import SparsitySpec

__all__ = ["DSnoT", "dsnot_refine", "allowed_base_pruners"]

log = logging.getLogger(__name__)

SKIP_LAYERS = ("no_skip", "mlp", "self_attn")


def _pick(order: Tensor, lo: Tensor, hi: Tensor, from_end: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Next entry of each row's list ``order`` from its start (``lo``) or end (``hi``): (index, available, lo, hi)."""
    ptr = torch.where(from_end, hi, lo).clamp(0, order.shape[1] - 1)
    idx = order.gather(1, ptr.unsqueeze(1)).squeeze(1)
    return idx, lo <= hi, lo + (~from_end).long(), hi - from_end.long()


def _regrow_order(contrib: Tensor, kept: Tensor, var: Tensor, pow_of_var: float) -> tuple[Tensor, Tensor]:
    """Each row's pruned entries, ascending by contribution / var^p (stable), and how many there are."""
    metric = contrib.masked_fill(kept, 0.0)
    if pow_of_var:
        metric = metric / var.clamp_min(torch.finfo(var.dtype).tiny).pow(pow_of_var).reshape(1, -1)
    order = torch.sort(metric, dim=1, stable=True).indices
    pruned_first = torch.sort(kept.gather(1, order).to(torch.int8), dim=1, stable=True).indices
    return order.gather(1, pruned_first), (~kept).sum(1)


def _prune_order(contrib: Tensor, kept: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's kept entries: negative contributions by ascending ``score``, then zeros, then positive ones by
    descending ``score`` (the reference's ``return_reorder_indice``), and how many there are."""
    cols = contrib.shape[1]
    ranked = torch.sort(score.masked_fill(~kept, float("inf")), dim=1, stable=True).indices
    val, kept_r = contrib.gather(1, ranked), kept.gather(1, ranked)
    pos = torch.arange(cols, device=contrib.device).expand_as(ranked)
    cls = torch.where(val < 0, 0, torch.where(val == 0, 1, 2)).masked_fill(~kept_r, 3)
    key = cls * (2 * cols) + torch.where(cls == 2, cols - 1 - pos, pos)  # unique per row: no ties
    return ranked.gather(1, key.argsort(dim=1)), kept.sum(1)


@torch.no_grad()
def dsnot_refine(
    dense: Tensor,
    weight: Tensor,
    mask: Tensor,
    sum_metric_row: Tensor,
    var: Tensor,
    scaler_row: Tensor,
    spec: SparsitySpec,
    *,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    without_same_sign: bool = True,
    prune_score: Tensor | None = None,
) -> Tensor:
    """DSnoT's refined keep-mask (out, in) of a base result; no argument is modified.

    Args:
        dense: the dense weight (out, in), fp32.
        weight: the base pruner's weight (zero where ``mask`` is False).
        mask: the base pruner's keep-mask.
        sum_metric_row, var, scaler_row: :class:`InputMomentStats` of the layer's input (in,).
        spec: N:M swaps stay inside a group of M; unstructured ones anywhere in the row.
        prune_score: N:M only: the base's score ranking a group's kept weights (default: the Wanda score).
    """
    rows = torch.arange(dense.shape[0], device=dense.device)
    kept = mask.clone()
    xbar = sum_metric_row.reshape(1, -1)
    contrib = torch.where(mask, weight, dense) * xbar  # removing a kept entry adds it to e, regrowing subtracts
    err = ((dense - weight) * xbar).sum(1)  # (out,) dense minus pruned mean output
    sign0 = err.sign()
    wanda = weight.abs() * scaler_row.sqrt().reshape(1, -1)
    reg_order, n_pruned = _regrow_order(contrib, mask, var, pow_of_var_regrowing)
    rlo, rhi = torch.zeros_like(n_pruned), n_pruned - 1
    if spec.structured:
        frozen = (wanda if prune_score is None else prune_score.float()).masked_fill(~mask, float("inf"))
        offsets = torch.arange(spec.m, device=dense.device)
    else:
        prune_order, n_kept = _prune_order(contrib, mask, wanda)
        plo, phi = torch.zeros_like(n_kept), n_kept - 1
    update = torch.ones_like(err, dtype=torch.bool)
    for _ in range(max_cycle_time):
        if not update.any():
            break
        r_idx, r_ok, rlo, rhi = _pick(reg_order, rlo, rhi, err > 0)
        if spec.structured:
            start = r_idx - r_idx % spec.m
            block = frozen.gather(1, start.unsqueeze(1) + offsets)  # (out, m); pruned and used entries are inf
            low, arg = block.min(dim=1)
            p_idx, p_ok = start + arg, torch.isfinite(low)
        else:
            p_idx, p_ok, plo, phi = _pick(prune_order, plo, phi, err < 0)
        after = err + contrib[rows, p_idx] - contrib[rows, r_idx]
        update = update & (err.abs() > update_threshold) & r_ok & p_ok
        if spec.structured or not without_same_sign:  # the reference's N:M path always checks the sign
            update = update & (after.sign() == sign0)
        if spec.structured:
            frozen[rows, p_idx] = float("inf")
        kept[rows[update], p_idx[update]] = False
        kept[rows[update], r_idx[update]] = True
        err = torch.where(update, after, err)
    return kept


def allowed_base_pruners() -> list[str]:
    """``name (target)`` for every pruner config in ``conf/pruner/`` that can be DSnoT's base."""
    from omegaconf import OmegaConf

    from sds_exp.resources import conf_dir

    out = []
    for path in sorted((conf_dir() / "pruner").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if isinstance(target, str) and target != f"{__name__}.DSnoT":
            out.append(f"{path.stem} ({target})")
    return out


def _relative_name(name: str) -> list[str]:
    """The components after the block index: model.layers.3.self_attn.q_proj -> [self_attn, q_proj]."""
    parts = name.split(".")
    block = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return parts[block + 1 :]


@dataclass
class DSnoT:
    """DSnoT mask refinement of a base pruner.

    Args:
        base: the base pruner (a pruner object; a config mapping with ``_target_`` is instantiated).
        max_cycle_time: most prune-and-regrow cycles per layer (reference 50).
        update_threshold: a row stops once |e_i| <= this (reference 0.1; e_i is a sum over the tokens of one
            calibration sequence, so its scale grows with ``data.seqlen``).
        pow_of_var_regrowing: exponent p of the input variance dividing the regrow criterion (reference 1; 0: none).
        skip_layer: layers left with the base mask: "mlp" (reference: every linear outside self-attention),
            "self_attn", or "no_skip".
        skip_sub_layer: one more layer kind left with the base mask, by its last name part (e.g. "q_proj",
            "fc1"), or "no_skip" (reference).
        without_same_sign: unstructured only: swap without requiring e_i's sign to stay (reference True; its
            N:M path always requires it).
    """

    base: Any = None
    max_cycle_time: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    skip_layer: str = "mlp"
    skip_sub_layer: str = "no_skip"
    without_same_sign: bool = True
    needs_calibration: ClassVar[bool] = True  # its own statistics, whatever the base needs

    def __post_init__(self) -> None:
        if isinstance(self.base, Mapping):
            from hydra.utils import instantiate

            self.base = instantiate(self.base)
        if self.base is None:
            raise ValueError(
                "pruner.base._target_ is not set: DSnoT refines a base pruner's mask; allowed: "
                + ", ".join(allowed_base_pruners())
            )
        if isinstance(self.base, DSnoT):
            raise ValueError("pruner.base._target_ is DSnoT: DSnoT cannot refine itself")
        if not all(hasattr(self.base, attr) for attr in ("prune", "collector", "needs_calibration")):
            raise ValueError(f"pruner.base={self.base!r} is not a pruner (needs prune, collector, needs_calibration)")
        if isinstance(self.max_cycle_time, bool) or not isinstance(self.max_cycle_time, int) or self.max_cycle_time < 0:
            raise ValueError(f"pruner.max_cycle_time={self.max_cycle_time!r}: must be an integer >= 0 (reference 50)")
        if not self.update_threshold >= 0:
            raise ValueError(f"pruner.update_threshold={self.update_threshold!r}: must be >= 0 (reference 0.1)")
        if not self.pow_of_var_regrowing >= 0:
            raise ValueError(f"pruner.pow_of_var_regrowing={self.pow_of_var_regrowing!r}: must be >= 0 (reference 1)")
        if self.skip_layer not in SKIP_LAYERS:
            raise ValueError(
                f"pruner.skip_layer={self.skip_layer!r}; allowed: {', '.join(SKIP_LAYERS)} (reference mlp)"
            )
        if not isinstance(self.skip_sub_layer, str) or not self.skip_sub_layer:
            raise ValueError(f"pruner.skip_sub_layer={self.skip_sub_layer!r}: a layer name such as q_proj, or no_skip")

    @classmethod
    def check_config(cls, node: dict, cfg: object, key: str) -> None:
        """Before anything loads: ``base`` names an importable pruner other than DSnoT (and passes its own check)."""
        from hydra.utils import get_class

        base = node.get("base")
        target = base.get("_target_") if isinstance(base, Mapping) else None
        allowed = "allowed: " + ", ".join(allowed_base_pruners())
        if not isinstance(target, str) or not target:
            raise ValueError(
                f"{key}.base._target_ is not set ({key}.base={base!r}): DSnoT needs a base pruner; {allowed}"
            )
        try:
            base_cls = get_class(target)
        except Exception as exc:  # hydra raises ImportError or ValueError depending on what is missing
            raise ValueError(
                f"{key}.base._target_={target!r} cannot be imported ({exc.__class__.__name__}); {allowed}"
            ) from None
        if isinstance(base_cls, type) and issubclass(base_cls, cls):
            raise ValueError(f"{key}.base._target_={target!r}: DSnoT cannot refine DSnoT; {allowed}")
        check = getattr(base_cls, "check_config", None)
        if check is not None:
            check(dict(base), cfg, f"{key}.base")

    @property
    def prepare(self):
        """The base pruner's ``prepare`` hook; absent (AttributeError) when the base has none."""
        hook = getattr(self.base, "prepare", None)
        if hook is None:
            raise AttributeError(f"DSnoT.prepare: the base {type(self.base).__name__} has no prepare hook")
        return hook

    def collector(self, in_features: int, device: torch.device) -> CombinedStats:
        base = self.base.collector(in_features, device) if self.base.needs_calibration else None
        return CombinedStats(base, InputMomentStats(in_features, device))

    def skipped(self, name: str) -> bool:
        """Whether layer ``name`` keeps the base mask (``skip_layer``/``skip_sub_layer``); an empty name never does."""
        rel = _relative_name(name) if name else []
        if not rel:
            return False
        attention = "attn" in rel[0] or rel[0] == "attention"
        if (self.skip_layer == "self_attn" and attention) or (self.skip_layer == "mlp" and not attention):
            return True
        return self.skip_sub_layer != "no_skip" and rel[-1] == self.skip_sub_layer

    def prune(
        self,
        weight: Tensor,
        stats: CombinedStats | None,
        spec: SparsitySpec,
        name: str = "",
        extra: Tensor | None = None,
    ) -> PruneResult:
        if not isinstance(stats, CombinedStats) or stats.own.nsamples == 0:
            raise ValueError(f"DSnoT needs its calibration statistics for layer {name or '?'}, got {type(stats)}")
        kwargs = {"extra": extra} if hasattr(self.base, "prepare") else {}
        result = self.base.prune(weight, stats.base, spec, name, **kwargs)
        if self.max_cycle_time == 0 or self.skipped(name):
            return result
        dense = weight.detach().float()
        own: InputMomentStats = stats.own
        score_fn = getattr(self.base, "scores", None) if spec.structured else None
        prune_score = score_fn(dense, stats.base) if score_fn is not None else None
        device = dense.device
        mask = dsnot_refine(
            dense,
            result.weight.float(),
            result.mask,
            own.sum_metric_row.to(device),
            own.var.to(device),
            own.scaler_row.to(device),
            spec,
            max_cycle_time=self.max_cycle_time,
            update_threshold=self.update_threshold,
            pow_of_var_regrowing=self.pow_of_var_regrowing,
            without_same_sign=self.without_same_sign,
            prune_score=prune_score,
        )
        swapped = int((mask & ~result.mask).sum())
        log.debug("DSnoT %s: %d weights swapped", name or "?", swapped)
        weight_out = torch.where(mask, torch.where(result.mask, result.weight.float(), dense), 0.0)
        return PruneResult(weight=weight_out, mask=mask)
