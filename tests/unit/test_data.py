import random

import numpy as np
import pytest
import torch

from sds_exp.data.calibration import from_ids, sample_document_windows, sample_stream_windows
from sds_exp.data.sources import DataUnavailableError, c4_documents, wikitext2_rows


def test_document_sampler_reproduces_reference_draws():
    docs = [list(range(i * 100, i * 100 + n)) for i, n in enumerate([5, 40, 12, 80, 33, 9])]
    seqlen, nsamples = 10, 6
    got = sample_document_windows(docs, nsamples, seqlen, random.Random(0))
    random.seed(0)  # the references' global-RNG loop, verbatim in spirit
    ref = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            if len(docs[i]) > seqlen:
                break
        start = random.randint(0, len(docs[i]) - seqlen - 1)
        ref.append(docs[i][start : start + seqlen])
    assert got.tolist() == ref
    assert got.shape == (nsamples, seqlen)


def test_document_sampler_falls_back_when_no_document_is_long_enough(caplog):
    docs = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    out = sample_document_windows(docs, 4, 5, random.Random(0))
    assert out.shape == (4, 5)
    assert "falling back" in caplog.text
    with pytest.raises(ValueError, match="too short"):
        sample_stream_windows(torch.arange(4), 1, 5, random.Random(0))


def test_ids_source(tmp_path):
    ids = np.random.default_rng(0).integers(0, 100, size=(3, 16))
    np.save(tmp_path / "w.npy", ids)
    torch.save(torch.from_numpy(ids), tmp_path / "w.pt")
    np.savez(tmp_path / "w.npz", windows=ids)
    for name in ("w.npy", "w.pt", "w.npz"):
        assert from_ids(tmp_path / name, nsamples=3, seqlen=16).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="holds 3 windows but data.nsamples=4"):
        from_ids(tmp_path / "w.npy", nsamples=4)
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "w.txt").write_text("1 2")
        from_ids(tmp_path / "w.txt")
    np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="integer array"):
        from_ids(tmp_path / "f.npy")


def test_mirror_sources(data_dir):
    rows = wikitext2_rows("test", data_dir)
    assert len(rows) == 4358
    calib, evaluation = c4_documents("calibration", data_dir), c4_documents("evaluation", data_dir)
    assert len(calib) == len(evaluation) == 1000
    assert not set(calib) & set(evaluation)


def test_no_mirror_and_no_hub_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match="SDS_DATA_DIR"):
        wikitext2_rows("test", tmp_path / "missing")
    with pytest.raises(DataUnavailableError, match="paths.data_dir"):
        c4_documents("calibration", None)
