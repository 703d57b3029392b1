"""Named wall-clock accumulators for the phases inside the stages (forward, statistics, prune, optimise)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """``with timer("stats"): ...`` adds the elapsed seconds to ``timer.seconds["stats"]``.

    On CUDA the device is synchronised at both ends so asynchronous kernels are charged to their phase.
    """

    def __init__(self, sync_cuda: bool = True) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.sync = sync_cuda and torch.cuda.is_available()

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self.counts[name] += 1
