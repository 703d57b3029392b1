"""Perplexity with the SparseGPT/Wanda protocol (``eval_ppl_wikitext`` in locuslab/wanda ``lib/eval.py``,
``opt_eval`` in IST-DASLab/sparsegpt ``opt.py``).

WikiText2: ``"\\n\\n".join`` of the raw test rows, tokenized once with the tokenizer's default special
tokens; ``nwindows = ntokens // seqlen`` non-overlapping windows (tail dropped), each evaluated without
context; loss = mean cross-entropy over the ``seqlen - 1`` predicted tokens; ppl = exp(mean window loss).
C4: ``" ".join`` of the evaluation documents, truncated to ``256 * seqlen`` tokens, same windows.
This is NOT lm-eval's ``wikitext`` task (word perplexity, rolling document windows).

``wikitext2_val`` is the same protocol on WikiText2 *validation* rows (``"\\n\\n".join``, as the test split and
``scripts/select_hparams.py``): what hyperparameter searches optimise, so that the test split is never tuned on.
From the mirror these are the first 100 KB of non-empty validation rows: 22,176 GPT-2 BPE tokens (10 windows of
2048, 86 of 256; OPT adds a BOS, same windows) and 24,838 SmolLM2 tokens (12 windows of 2048, 97 of 256), against
287,644 / 304,986 tokens of the test split. Without the mirror it is the whole HF validation split (a different,
larger text: numbers from the two sources do not compare; the dense-ppl cache keys on the source).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sds_exp.data.sources import c4_documents, wikitext2_rows

__all__ = ["PerplexityResult", "eval_token_ids", "window_losses", "perplexity", "DATASETS", "DATASET_NAMES"]

log = logging.getLogger(__name__)

DATASETS = ("wikitext2", "c4", "wikitext2_val")  # this order: error messages list "wikitext2, c4" first
# How tables and plots name each dataset (the protocol line of sds_exp.reporting).
DATASET_NAMES = {
    "wikitext2": "WikiText2 test",
    "wikitext2_val": "WikiText2 validation",
    "c4": "C4 evaluation documents",
}


@dataclass
class PerplexityResult:
    ppl: float
    nwindows: int
    ntokens: int  # tokens in the evaluated windows (nwindows * seqlen)
    seconds: float

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/ppl": self.ppl,
            f"{prefix}/windows": self.nwindows,
            f"{prefix}/seconds": self.seconds,
            f"{prefix}/tokens_per_s": self.ntokens / self.seconds if self.seconds > 0 else float("nan"),
        }


def eval_token_ids(dataset: str, tokenizer, data_dir: str | Path | None, seqlen: int) -> Tensor:
    """The evaluation token stream (1-D LongTensor) of ``dataset`` (one of :data:`DATASETS`).

    ``wikitext2``: the test split; ``wikitext2_val``: the validation rows (for searches: never tune on test);
    ``c4``: the C4 evaluation documents, cut to ``256 * seqlen`` tokens.
    """
    if dataset in ("wikitext2", "wikitext2_val"):
        split = "test" if dataset == "wikitext2" else "validation"
        text = "\n\n".join(wikitext2_rows(split, data_dir))
        return tokenizer(text, return_tensors="pt").input_ids[0]
    if dataset == "c4":
        text = " ".join(c4_documents("evaluation", data_dir))
        return tokenizer(text, return_tensors="pt").input_ids[0][: 256 * seqlen]
    raise ValueError(f"perplexity dataset {dataset!r} is not known; allowed: {', '.join(DATASETS)}")


@torch.no_grad()
def window_losses(
    model: nn.Module,
    ids: Tensor,
    seqlen: int,
    device: torch.device | str,
    batch_size: int = 1,
    max_windows: int | None = None,
    desc: str = "ppl",
) -> Tensor:
    """Mean next-token cross-entropy of each non-overlapping ``seqlen`` window of ``ids``: (nwindows,) fp32."""
    nwindows = ids.numel() // seqlen
    if max_windows is not None:
        nwindows = min(nwindows, int(max_windows))
    if nwindows == 0:
        raise ValueError(f"{ids.numel()} evaluation tokens give no window of seqlen={seqlen}")
    windows = ids[: nwindows * seqlen].view(nwindows, seqlen)
    losses = torch.empty(nwindows, dtype=torch.float32)
    for start in tqdm(range(0, nwindows, batch_size), desc=desc, leave=False, mininterval=10):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none")
        losses[start : start + batch.shape[0]] = loss.view(batch.shape[0], -1).mean(1).cpu()
    return losses


def perplexity(
    model: nn.Module,
    ids: Tensor,
    seqlen: int = 2048,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    max_windows: int | None = None,
    desc: str = "ppl",
) -> PerplexityResult:
    """exp(mean window loss) of ``model`` (moved to ``device``) on the token stream ``ids``."""
    if seqlen <= 1:
        raise ValueError(f"perplexity seqlen={seqlen}; must be > 1")
    model.to(device)
    start = time.perf_counter()
    losses = window_losses(model, ids, seqlen, device, batch_size, max_windows, desc)
    seconds = time.perf_counter() - start
    ppl = math.exp(losses.double().mean().item())
    log.info("%s: ppl %.4f over %d windows of %d tokens (%.1f s)", desc, ppl, losses.numel(), seqlen, seconds)
    return PerplexityResult(ppl=ppl, nwindows=losses.numel(), ntokens=losses.numel() * seqlen, seconds=seconds)
