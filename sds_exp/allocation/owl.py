"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024, arXiv 2310.05175).

One calibration pass over the DENSE model, block by block (blocks are forwarded unpruned):

    S_b      = { |W_ij| * ||X_j||_2 : every prunable linear of block b }      (Wanda scores, all layers at once)
    D_b      = 100 * #{ s in S_b : s > M * mean(S_b) } / |S_b|                (the block's outlier ratio, %)
    scaled_b = (D_b - min D) / (max D - min D) * 2 * lamda                    (min-max scaled into [0, 2 lamda])
    sparsity_b = target - (scaled_b - mean(scaled))                           (more outliers, fewer weights pruned)

and every layer of block b gets ``sparsity_b``. Matches ``prune_wanda_outlier`` (and the identical outlier
pass of ``prune_sparsegpt_outlier`` / ``prune_mag_outlier``) with ``check_outlier_mean`` in luuyin/OWL
``lib/prune_all.py`` at dddb7a4bffe27c73e4c8cf692b3a5e36401532c8, which computes the density
``scaled - mean(scaled) + (1 - target)``. Differences: the mean over blocks is weighted by each block's
prunable parameter count (the same as the reference's plain mean when the blocks are alike, as in every
decoder); a block pushed outside [0, 1) raises instead of being clamped to 0.01; equal outlier ratios give
the uniform allocation instead of a division by zero; ``rounding="target"`` rounds to whole weights per row
(:func:`sds_exp.allocation.base.snap_to_rows`).

The outlier ratios do not depend on the target sparsity, so a sweep over sparsity (or pruners) repeats the same
dense pass: with ``cache_dir`` they are kept in ``<cache_dir>/owl_outliers.json``, keyed by a hash of every
model tensor, the calibration ids and the settings that can change a rounding (:func:`outlier_cache_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sds_exp.allocation.base import REPRUNE_MODES, ROUNDING_MODES, build_from_node, job_spec, snap_to_rows
from sds_exp.models.blocks import capture_block_inputs, find_linears, run_block
from sds_exp.pruners.base import RowNormStats
from sds_exp.pruners.wanda import wanda_scores
from sds_exp.sds.sequential import collect_stats, walk_blocks
from sds_exp.spec import SparsitySpec
from sds_exp.tracking.results import read_cache, write_json

__all__ = ["OWL", "outlier_ratio", "owl_block_ratios", "block_outlier_ratios", "outlier_cache_key"]
CACHE_FILE = "owl_outliers.json"

log = logging.getLogger(__name__)


def outlier_ratio(scores: Sequence[Tensor], hyper_m: float) -> float:
    """Percent of all the scores (pooled over the given tensors) above ``hyper_m`` times their mean.

    The reference's ``check_outlier_mean`` on the concatenated scores; counted tensor by tensor here, with
    the mean accumulated in fp64, so a block's scores are never copied into one tensor.
    """
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    count = sum(int((s > hyper_m * mean).sum()) for s in scores)
    return 100.0 * count / total


def owl_block_ratios(
    outliers: Sequence[float], target: float, lamda: float, weights: Sequence[float] | None = None
) -> list[float]:
    """Per-block sparsity from per-block outlier ratios: min-max scaled into [0, 2 lamda], shifted by the mean.

    Args:
        outliers: the blocks' outlier ratios (any scale: only their order and spacing matter).
        target: the job's sparsity.
        lamda: OWL's lambda (the reference's ``--Lamda``).
        weights: the blocks' prunable parameter counts for the mean (default: a plain mean, the reference's).
    """
    lo, hi = min(outliers), max(outliers)
    if hi == lo:  # the reference divides by zero here
        return [float(target)] * len(outliers)
    scaled = [(d - lo) / (hi - lo) * 2 * lamda for d in outliers]
    w = list(weights) if weights is not None else [1.0] * len(outliers)
    mean = sum(s * wi for s, wi in zip(scaled, w, strict=True)) / sum(w)
    return [float(target) - (s - mean) for s in scaled]


@torch.no_grad()
def block_outlier_ratios(
    model: nn.Module,
    calib: Tensor,
    layers: dict[str, nn.Linear],
    hyper_m: float,
    *,
    device="cpu",
    batch_size: int = 8,
) -> list[tuple[str, list[str], float]]:
    """(block prefix, its prunable layers, outlier ratio %) for every block holding a layer of ``layers``.

    The Wanda statistics of each block come from the dense stream: the block is forwarded unpruned to make
    the next block's inputs, in the same pass that collects them.
    """
    stream = capture_block_inputs(model, calib, device, batch_size)
    out = torch.empty_like(stream.hidden)
    found = []
    for _, block, prefix in walk_blocks(model, device, "allocation"):
        mine = {n: lin for n, lin in find_linears(block, prefix).items() if n in layers}
        if mine:
            stats = collect_stats(block, mine, stream, lambda lin: RowNormStats(lin.in_features, device), out=out)
            scores = [wanda_scores(lin.weight.detach().float(), stats[n].scaler_row) for n, lin in mine.items()]
            found.append((prefix, list(mine), outlier_ratio(scores, hyper_m)))
            del stats, scores
        else:
            run_block(block, stream, out)
        stream.hidden, out = out, stream.hidden
    return found


def outlier_cache_key(model: nn.Module, calib: Tensor, **settings: Any) -> str:
    """sha256 of every tensor of ``model`` (weights and buffers, by name), the calibration ids and ``settings``.

    The weights, not the model's name: the re-prune's ``reprune: recompute`` sees re-activated weights, and an
    edited checkpoint under the same path is a different model. The torch version and thread count go in with
    the settings because they can change a matmul's rounding.
    """
    h = hashlib.sha256()
    meta = {**settings, "torch": torch.__version__, "threads": torch.get_num_threads()}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in [("calib", calib), *sorted(model.state_dict().items())]:
        t = t.detach().reshape(-1).contiguous()
        h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
        h.update(t.cpu().view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


@dataclass
class OWL:
    """OWL's per-block sparsity from the dense model's Wanda-score outliers.

    Args:
        hyper_m: outlier threshold M: a score is an outlier above M times its block's mean score
            (the reference's ``--Hyper_m``; README scripts 5, argparse default 3).
        lamda: lambda, the spread of the block sparsities: scaled into a range 2*lamda wide around the target
            (the reference's ``--Lamda``, 0.08; spelled so because ``lambda`` is a Python keyword).
        reprune: "reuse" (the re-prune keeps the first round's ratios) or "recompute" (OWL again on the
            re-activated model).
        rounding: "target" (whole weights per row, summing to the target) or "floor" (the reference's
            ``int(in_features * ratio)`` per row: the model ends slightly below the target).
        cache_dir: where the dense pass's outlier ratios are kept for the next job with the same model,
            calibration and M (``None``: no cache; the job's config sets ``${paths.cache_dir}``).
    """

    hyper_m: float = 5.0
    lamda: float = 0.08
    reprune: str = "reuse"
    rounding: str = "target"
    cache_dir: str | None = None
    needs_calibration: ClassVar[bool] = True
    display_name: ClassVar[str] = "OWL"  # tables: "OWL-Wanda", "SDS-OWL-Wanda"

    def __post_init__(self) -> None:
        for key in ("hyper_m", "lamda"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"allocation.{key}={value!r} is not a number")
        if not self.hyper_m > 0:
            raise ValueError(f"allocation.hyper_m={self.hyper_m!r}: must be > 0 (the reference uses 3 to 10)")
        if not 0 <= self.lamda < 0.5:
            raise ValueError(
                f"allocation.lamda={self.lamda!r}: must be in [0, 0.5) (the spread of the block sparsities "
                "around the target; the reference uses 0.02 to 0.2)"
            )
        if self.reprune not in REPRUNE_MODES:
            raise ValueError(f"allocation.reprune={self.reprune!r}; allowed: {', '.join(REPRUNE_MODES)}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"allocation.rounding={self.rounding!r}; allowed: {', '.join(ROUNDING_MODES)}")

    def check_spec(self, spec: SparsitySpec, key: str = "allocation") -> None:
        """The checks against the job's target that need no model: N:M, and lamda's room around the target."""
        if spec.structured:
            raise ValueError(
                f"{key}=owl with pattern='{spec.n}:{spec.m}': OWL gives every block its own sparsity, N:M the "
                "same in every layer (OWL's mixed-N:M variant is not implemented). Use pattern=unstructured "
                "or allocation=uniform"
            )
        s = spec.ratio
        if s - self.lamda < 0 or s + self.lamda >= 1:
            raise ValueError(
                f"{key}.lamda={self.lamda:g} with sparsity={s:g}: the block sparsities would reach "
                f"[{s - self.lamda:g}, {s + self.lamda:g}], outside [0, 1); allowed: lamda <= {s:g} and "
                f"lamda < {1 - s:g}"
            )

    @classmethod
    def check_config(cls, node: dict[str, Any], cfg, key: str) -> None:
        """Before the model loads: the settings, and against ``cfg``'s sparsity and pattern."""
        owl = build_from_node(cls, node, key)
        spec = job_spec(cfg)
        if spec is not None:
            owl.check_spec(spec, key)

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
        self.check_spec(spec)
        blocks = self._outliers(model, calib, layers, device=device, batch_size=batch_size)
        sizes = [sum(layers[n].weight.numel() for n in names) for _, names, _ in blocks]
        per_block = owl_block_ratios([d for *_, d in blocks], spec.ratio, self.lamda, weights=sizes)
        for (prefix, _, d), r in zip(blocks, per_block, strict=True):
            if not 0 <= r < 1:
                raise ValueError(
                    f"allocation.lamda={self.lamda:g}: block {prefix} (outlier ratio {d:.3f}%) gets sparsity "
                    f"{r:.4f}, outside [0, 1) (the released code spreads the blocks over 2*lamda, placed by "
                    "their mean); lower allocation.lamda"
                )
        log.info(
            "OWL (M=%g, lamda=%g): outlier ratios %% %s -> block sparsities %s",
            self.hyper_m,
            self.lamda,
            [round(d, 4) for *_, d in blocks],
            [round(r, 4) for r in per_block],
        )
        ratios = {n: r for (_, names, _), r in zip(blocks, per_block, strict=True) for n in names}
        return snap_to_rows(ratios, layers) if self.rounding == "target" else ratios

    def _outliers(self, model, calib, layers, *, device, batch_size) -> list[tuple[str, list[str], float]]:
        """:func:`block_outlier_ratios`, through ``cache_dir`` when it is set."""
        if self.cache_dir is None:
            return block_outlier_ratios(model, calib, layers, self.hyper_m, device=device, batch_size=batch_size)
        path = Path(self.cache_dir) / CACHE_FILE
        key = outlier_cache_key(
            model, calib, hyper_m=float(self.hyper_m), layers=sorted(layers), device=str(device), batch_size=batch_size
        )
        cache = read_cache(path, "OWL outlier cache")
        if key in cache:
            log.info("OWL outlier ratios from cache %s (key %s...)", path, key[:12])
            return [(prefix, list(names), float(d)) for prefix, names, d in cache[key]]
        blocks = block_outlier_ratios(model, calib, layers, self.hyper_m, device=device, batch_size=batch_size)
        try:
            cache = read_cache(path, "OWL outlier cache")  # another job may have written meanwhile
            cache[key] = [[prefix, names, d] for prefix, names, d in blocks]
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, cache)
        except OSError as exc:  # a cache that cannot be written costs time, not results
            log.warning("OWL outlier cache %s not written (%s)", path, exc)
        return blocks
