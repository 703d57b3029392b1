"""Calibration windows: ``nsamples`` windows of ``seqlen`` tokens, as the SparseGPT/Wanda loader samples them.

Reference protocol (``get_c4`` in both repos), with a local ``random.Random(seed)`` that reproduces the
global-``random`` draws of the references: repeatedly pick a random document until its tokenization is
LONGER than ``seqlen``, then a random offset ``randint(0, len - seqlen - 1)``. Documents are tokenized once,
so the draw sequence is the same and no loop can run forever: when no document is long enough the
sampler falls back (with a warning) to windows of the concatenated documents.

C4 pool (``data.pool``): the mirror's 2,000 documents are split, [0, 1000) for calibration and [1000, 2000)
for C4 perplexity, so by default (``calibration``) the windows are drawn from 1,000 documents where the
references draw from their whole pool. ``all`` draws from all 2,000 in file order, the reference sampler on
the mirror's whole file; C4 perplexity then overlaps calibration (a WARNING says so). From the hub both
are the references' c4-train shard, disjoint from the C4 perplexity documents (c4-validation).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sds_exp.data.sources import c4_documents, mirror_dir, wikitext2_rows
from sds_exp.data.tokens import dataset_identity, memoised, tokenizer_fingerprint

__all__ = ["sample_document_windows", "sample_stream_windows", "c4", "C4_POOLS", "wikitext2", "from_ids"]

log = logging.getLogger(__name__)

C4_POOLS = ("calibration", "all")


def _check(nsamples: int, seqlen: int) -> None:
    if nsamples <= 0:
        raise ValueError(f"nsamples={nsamples}; must be a positive integer")
    if seqlen <= 1:
        raise ValueError(f"seqlen={seqlen}; must be > 1 (an explicit calibration length, e.g. 2048)")


def sample_stream_windows(ids: Tensor, nsamples: int, seqlen: int, rng: random.Random) -> Tensor:
    """Random windows of one long token stream (the WikiText2 variant): (nsamples, seqlen)."""
    if ids.numel() <= seqlen + 1:
        raise ValueError(f"token stream of {ids.numel()} tokens is too short for seqlen={seqlen}")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def sample_document_windows(docs: list[list[int]], nsamples: int, seqlen: int, rng: random.Random) -> Tensor:
    """The reference document sampler over pre-tokenized documents: (nsamples, seqlen)."""
    _check(nsamples, seqlen)
    long_docs = [i for i, d in enumerate(docs) if len(d) > seqlen]
    if not long_docs:
        log.warning(
            "no calibration document is longer than seqlen=%d tokens (longest: %d); falling back to windows "
            "of the concatenated documents",
            seqlen,
            max((len(d) for d in docs), default=0),
        )
        stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        return sample_stream_windows(stream, nsamples, seqlen, rng)
    windows, used = [], Counter()
    for _ in range(nsamples):
        while True:  # terminates: at least one document qualifies
            i = rng.randint(0, len(docs) - 1)
            if len(docs[i]) > seqlen:
                break
        start = rng.randint(0, len(docs[i]) - seqlen - 1)
        windows.append(torch.tensor(docs[i][start : start + seqlen], dtype=torch.long))
        used[i] += 1
    repeats = nsamples - len(used)
    log.info(
        "calibration: %d windows of %d tokens from %d distinct documents (%d of %d documents are longer than "
        "seqlen; %d windows repeat a document)",
        nsamples,
        seqlen,
        len(used),
        len(long_docs),
        len(docs),
        repeats,
    )
    return torch.stack(windows)


def c4(
    tokenizer,
    data_dir: str | Path | None,
    seed: int = 0,
    nsamples: int = 128,
    seqlen: int = 2048,
    pool: str = "calibration",
) -> Tensor:
    """C4 calibration windows (mirror: its calibration half, or all 2,000 documents with ``pool="all"``;
    hub: c4-train.00000-of-01024 for either pool).

    Raises:
        ValueError: ``pool`` is not one of :data:`C4_POOLS`.
    """
    if pool not in C4_POOLS:
        raise ValueError(f"data.pool={pool!r}; allowed: {', '.join(C4_POOLS)}")
    _check(nsamples, seqlen)
    parts = ["calibration"]
    if pool == "all" and mirror_dir(data_dir) is not None:
        parts.append("evaluation")  # [0, 1000) + [1000, 2000): the file's order
        log.warning(
            "data.pool=all: calibration windows are drawn from all 2,000 mirror C4 documents, as the references "
            "draw from their whole pool; the C4 perplexity documents [1000, 2000) are among them, so C4 "
            "perplexity now overlaps calibration (WikiText2 is unaffected)"
        )
    elif pool == "all":
        log.info("data.pool=all from the hub: the references' c4-train shard, as for pool=calibration")
    docs: list[list[int]] = []
    for part in parts:  # each half tokenized once per process (sweeps, tests), not once per job
        docs += memoised(
            [f"c4/{part}", tokenizer_fingerprint(tokenizer), dataset_identity(data_dir, "c4_calibration")],
            lambda part=part: tokenizer(c4_documents(part, data_dir), add_special_tokens=True)["input_ids"],
        )
    return sample_document_windows(docs, nsamples, seqlen, random.Random(seed))


def wikitext2(tokenizer, data_dir: str | Path | None, seed: int = 0, nsamples: int = 128, seqlen: int = 2048) -> Tensor:
    """WikiText2-train calibration windows from ``" ".join(rows)`` (mirror: the first 1 MB of train rows)."""
    _check(nsamples, seqlen)
    ids = memoised(
        ["wikitext2/train", tokenizer_fingerprint(tokenizer), dataset_identity(data_dir, "wikitext2_train")],
        lambda: tokenizer(" ".join(wikitext2_rows("train", data_dir)), return_tensors="pt").input_ids[0],
    )
    return sample_stream_windows(ids, nsamples, seqlen, random.Random(seed))


def from_ids(
    path: str | Path,
    tokenizer=None,
    data_dir=None,
    seed: int = 0,
    nsamples: int | None = None,
    seqlen: int | None = None,
) -> Tensor:
    """Pre-tokenized windows from a ``.pt``/``.npy``/``.npz`` file of shape (nsamples, seqlen).

    ``nsamples``/``seqlen``, when given, must match the file (they are checked, not used to resample).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration ids file {path} does not exist (data.path)")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        ids = obj if isinstance(obj, Tensor) else torch.as_tensor(obj)
    elif suffix == ".npy":
        ids = torch.from_numpy(np.load(path))
    elif suffix == ".npz":
        with np.load(path) as z:
            if len(z.files) != 1:
                raise ValueError(f"{path}: .npz must hold exactly one array, found {z.files}")
            ids = torch.from_numpy(z[z.files[0]])
    else:
        raise ValueError(f"calibration ids file {path}: suffix {suffix!r} not supported; allowed: .pt, .npy, .npz")
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(
            f"{path}: expected an integer array of shape (nsamples, seqlen), got {tuple(ids.shape)} {ids.dtype}"
        )
    if nsamples is not None and ids.shape[0] != nsamples:
        raise ValueError(f"{path}: holds {ids.shape[0]} windows but data.nsamples={nsamples}")
    if seqlen is not None and ids.shape[1] != seqlen:
        raise ValueError(f"{path}: windows are {ids.shape[1]} tokens but data.seqlen={seqlen}")
    if ids.numel() and int(ids.min()) < 0:
        vocab = f"[0, {len(tokenizer)})" if tokenizer is not None else "[0, vocab)"
        raise ValueError(f"data.path={str(path)!r}: smallest token id is {int(ids.min())}; ids must be in {vocab}")
    if tokenizer is not None and int(ids.max()) >= len(tokenizer):
        raise ValueError(f"{path}: token id {int(ids.max())} is outside the tokenizer's vocabulary ({len(tokenizer)})")
    log.info("calibration: %d x %d windows loaded from %s", ids.shape[0], ids.shape[1], path)
    return ids.long()
