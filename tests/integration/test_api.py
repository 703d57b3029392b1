"""The Python API on a user's own model object gives exactly what the CLI job computes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import sds_exp
from sds_exp import app
from sds_exp.evaluation.perplexity import eval_token_ids, perplexity
from sds_exp.models.loading import build_tiny

pytestmark = pytest.mark.integration


def test_api_equals_the_job(compose, tmp_path, data_dir):
    metrics = app.run(compose(["debug=tiny", "pattern=2:4", "pruner=sparsegpt"]))
    job_masks = load_file(tmp_path / "run" / "checkpoint" / "adjust" / "masks.safetensors")

    lm = build_tiny("llama", data_dir=data_dir, num_key_value_heads=2)  # "your own" model object
    calib = sds_exp.calibration("c4", lm.tokenizer, nsamples=4, seqlen=64, data_dir=str(data_dir))
    recipe = sds_exp.Recipe.compose(
        pruner="sparsegpt", pattern="2:4", overrides=["sds.reactivate.steps=5", "sds.adjustment.steps=5"]
    )
    report = sds_exp.prune(lm.model, calib, recipe)
    assert report.masks.keys() == job_masks.keys()
    assert all(torch.equal(report.masks[k], job_masks[k]) for k in job_masks)
    assert report.summary["final/sparsity/mask"] == metrics["final/sparsity/mask"] == pytest.approx(0.5)
    assert report.summary["reprune/mask_overlap"] == metrics["reprune/mask_overlap"]
    ids = eval_token_ids("wikitext2", lm.tokenizer, data_dir, 256)
    assert perplexity(lm.model, ids, 256, max_windows=2).ppl == metrics["final/wikitext2/ppl"]


def test_api_inputs_are_checked(tiny_llama):
    with pytest.raises(ValueError, match="integer tensor"):
        sds_exp.calibration(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="source='pile'; allowed: c4, wikitext2"):
        sds_exp.calibration("pile", tiny_llama.tokenizer)
    ids = sds_exp.calibration(["a short text " * 200], tiny_llama.tokenizer, nsamples=2, seqlen=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
