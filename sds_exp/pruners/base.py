"""Interfaces shared by the pruners and the statistics they collect from calibration activations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from sds_exp.spec import SparsitySpec

__all__ = [
    "PruneResult",
    "StatsCollector",
    "Pruner",
    "RowNormStats",
    "HessianStats",
    "InputMomentStats",
    "CombinedStats",
]


@dataclass
class PruneResult:
    """What a pruner returns for one linear layer; the layer itself is not modified.

    Attributes:
        weight: the new weight (fp32); SparseGPT also updates the surviving weights.
        mask: bool, same shape as ``weight``, True = kept.
    """

    weight: Tensor
    mask: Tensor


class StatsCollector(Protocol):
    def add_batch(self, inp: Tensor) -> None:
        """Accumulate ``inp``: (batch, tokens, in_features), the input of one ``nn.Linear``."""


class Pruner(Protocol):
    needs_calibration: ClassVar[bool]  # False: prune() gets stats=None and no calibration pass runs

    def collector(self, in_features: int, device: torch.device) -> StatsCollector | None: ...

    def prune(
        self, weight: Tensor, stats: StatsCollector | None, spec: SparsitySpec, name: str = ""
    ) -> PruneResult: ...


def _as_3d(inp: Tensor) -> Tensor:
    return inp if inp.dim() == 3 else inp.reshape(1, -1, inp.shape[-1])


def _sequences(inp: Tensor):
    """Each sequence of ``inp`` as the references' hooks see it: fp32, (in_features, tokens), a transposed view."""
    for seq in _as_3d(inp):
        yield seq.float().t()


class RowNormStats:
    """Wanda's ``scaler_row``: running mean over sequences of ||X_j||^2 (sum over tokens), fp32.

    Matches ``WrappedGPT.add_batch`` in locuslab/wanda ``lib/layerwrapper.py`` bit for bit: its hook sees one
    sequence per call and adds ``torch.norm(inp, dim=1) ** 2 / nsamples`` with ``inp`` (in, tokens), so a batch
    is taken one sequence at a time in that form (a fused ``x.pow(2).sum`` rounds differently, and RIA's and
    Wanda's 2:4 masks amplify the last bit).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.scaler_row = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        for seq in _sequences(inp):
            self._add_sequence(seq)

    def _add_sequence(self, seq: Tensor) -> None:
        """One sequence, (in, tokens) fp32; the running count is advanced here."""
        self.scaler_row *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        self.scaler_row += torch.norm(seq, p=2, dim=1) ** 2 / self.nsamples


class HessianStats:
    """SparseGPT's H = (2/N) sum_samples X X^T as a running mean over sequences, fp32.

    Matches ``SparseGPT.add_batch`` in IST-DASLab/sparsegpt ``sparsegpt.py``.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        for seq in _sequences(inp):  # one sequence per step, as the reference's hook: its H bit for bit
            self.H *= self.nsamples / (self.nsamples + 1)
            self.nsamples += 1
            x = math.sqrt(2 / self.nsamples) * seq  # (in, tokens)
            # The product rounded, then added, as the reference does: a fused addmm_ rounds differently (~1e-7)
            # and SparseGPT's masks amplify that.
            self.H += x.matmul(x.t())


class InputMomentStats(RowNormStats):
    """DSnoT's per-channel input statistics, fp32: Wanda's ``scaler_row``, the running mean over sequences of
    sum_tokens x_j (``sum_metric_row``) and the token-weighted mean of each sequence's variance (``var``).

    Matches ``WrappedGPT.add_batch`` in zyxxmu/DSnoT ``lib/layerwrapper.py`` (4c029df), whose hook sees one
    sequence per call: ``var`` is the mean of within-sequence variances (``unbiased=False``), not the pooled
    variance over all tokens. A batch is taken one sequence at a time in the reference's form and order, so the
    numbers are the reference's bit for bit whatever the calibration batch size.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)  # scaler_row, nsamples (sequences)
        self.sum_metric_row = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.var = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.ntokens = 0

    def _add_sequence(self, seq: Tensor) -> None:  # the reference's formulas in its order
        tokens = seq.shape[1]
        seq_var = torch.var(seq, dim=1, unbiased=False)
        self.var = (
            seq_var if self.ntokens == 0 else (self.var * self.ntokens + seq_var * tokens) / (self.ntokens + tokens)
        )
        self.ntokens += tokens
        self.sum_metric_row *= self.nsamples / (self.nsamples + 1)
        self.sum_metric_row += torch.sum(seq, dim=1) / (self.nsamples + 1)
        super()._add_sequence(seq)


class CombinedStats:
    """Two collectors fed by the same inputs: a wrapped pruner's (``base``, None when it needs none) and
    the wrapping pruner's own (``own``)."""

    def __init__(self, base: StatsCollector | None, own: StatsCollector) -> None:
        self.base, self.own = base, own

    @property
    def nsamples(self) -> int:
        return getattr(self.own, "nsamples", 0)

    def add_batch(self, inp: Tensor) -> None:
        if self.base is not None:
            self.base.add_batch(inp)
        self.own.add_batch(inp)
