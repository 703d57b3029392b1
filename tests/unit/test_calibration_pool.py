"""data.pool=all: the reference C4 sampler over all 2,000 mirror documents (SparseGPT/Wanda ``get_c4`` draw
from their whole pool; by default the mirror keeps documents 1000-1999 for C4 perplexity)."""

import logging
import random

import pytest
import torch

from sds_exp.data.calibration import c4
from sds_exp.models.loading import _gpt2_bpe_tokenizer

NSAMPLES, SEQLEN = 4, 128


@pytest.fixture(scope="module")
def gpt2(data_dir):
    return _gpt2_bpe_tokenizer(data_dir)  # fast (Rust) and in the mirror: SmolLM2's takes ~30 s to load


def reference_get_c4(texts, tokenizer, nsamples, seed, seqlen):
    """The loop of ``get_c4`` (locuslab/wanda lib/data.py, IST-DASLab/sparsegpt datautils.py), written out:
    the global ``random`` seeded once, one document tokenized per draw."""
    random.seed(seed)
    windows, drawn = [], []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            enc = tokenizer(texts[i], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        start = random.randint(0, enc.shape[1] - seqlen - 1)
        windows.append(enc[:, start : start + seqlen])
        drawn.append(i)
    return torch.cat(windows), drawn


def mirror_texts(data_dir):
    import pyarrow.parquet as pq

    return pq.read_table(data_dir / "c4" / "c4_validation_2k.parquet", columns=["text"]).column("text").to_pylist()


def test_pool_all_is_the_reference_sampler_over_all_documents(gpt2, data_dir, caplog):
    texts = mirror_texts(data_dir)
    assert len(texts) == 2000
    want, drawn = reference_get_c4(texts, gpt2, NSAMPLES, 0, SEQLEN)
    assert max(drawn) >= 1000  # seed 0 draws from the second half: the pool matters
    with caplog.at_level(logging.WARNING, logger="sds_exp.data.calibration"):
        got = c4(gpt2, data_dir, seed=0, nsamples=NSAMPLES, seqlen=SEQLEN, pool="all")
    assert torch.equal(got, want)
    assert any("C4 perplexity now overlaps calibration" in r.getMessage() for r in caplog.records)


def test_default_pool_is_the_first_thousand_documents(gpt2, data_dir, caplog):
    texts = mirror_texts(data_dir)
    want, drawn = reference_get_c4(texts[:1000], gpt2, NSAMPLES, 0, SEQLEN)
    with caplog.at_level(logging.WARNING, logger="sds_exp.data.calibration"):
        got = c4(gpt2, data_dir, seed=0, nsamples=NSAMPLES, seqlen=SEQLEN)
    assert torch.equal(got, want) and max(drawn) < 1000
    assert not any("overlaps" in r.getMessage() for r in caplog.records)
    assert not torch.equal(got, c4(gpt2, data_dir, seed=0, nsamples=NSAMPLES, seqlen=SEQLEN, pool="all"))


def test_unknown_pool_is_refused(gpt2, data_dir):
    with pytest.raises(ValueError, match=r"data.pool='train'; allowed: calibration, all"):
        c4(gpt2, data_dir, nsamples=NSAMPLES, seqlen=SEQLEN, pool="train")


def test_config_default_is_the_calibration_pool(compose):
    assert compose([]).data.pool == "calibration"
    assert compose(["data.pool=all"]).data.pool == "all"
