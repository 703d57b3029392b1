"""The WikiText2 validation perplexity set (``wikitext2_val``): what searches optimise, never the test split."""

from __future__ import annotations

import pytest
import torch

from sds_exp.data.sources import MIRROR_FILES, dataset_files, wikitext2_rows
from sds_exp.evaluation.perplexity import DATASET_NAMES, DATASETS, eval_token_ids
from sds_exp.models.loading import _gpt2_bpe_tokenizer

VAL = "wikitext-2-raw-v1/validation.first100KB_nonempty_rows.txt"


@pytest.fixture(scope="module")
def gpt2_bpe(data_dir):
    return _gpt2_bpe_tokenizer(data_dir)


def test_validation_tokens_and_windows_on_the_gpt2_bpe(gpt2_bpe, data_dir):
    """The mirror's 100 KB of validation rows, "\\n\\n"-joined as the test split: 22,176 GPT-2 BPE tokens."""
    val = eval_token_ids("wikitext2_val", gpt2_bpe, data_dir, 2048)
    assert val.dtype == torch.long and val.ndim == 1
    assert val.numel() == 22_176
    assert (val.numel() // 2048, val.numel() // 256) == (10, 86)  # the windows stated in docs/optuna.md
    text = "\n\n".join(wikitext2_rows("validation", data_dir))
    assert text.startswith(" = Homarus gammarus = \n\n\n")
    assert torch.equal(val, gpt2_bpe(text, return_tensors="pt").input_ids[0])
    # the test split is another text: never what a search sees
    test = eval_token_ids("wikitext2", gpt2_bpe, data_dir, 2048)
    assert test.numel() == 287_644 and test.numel() // 2048 == 140
    assert not torch.equal(val[:512], test[:512])


def test_every_ppl_dataset_has_its_mirror_files():
    """The dense-ppl cache and the run's provenance call dataset_files(name) for every ppl dataset."""
    assert dataset_files("wikitext2_val") == [VAL] == [MIRROR_FILES["wikitext2/validation"]]
    assert dataset_files("wikitext2_val") == dataset_files("wikitext2_validation")
    for name in DATASETS:
        assert dataset_files(name), name
        assert name in DATASET_NAMES
    assert dataset_files("wikitext2") != dataset_files("wikitext2_val")


def test_stage_evaluator_measures_and_caches_validation_ppl(tiny_opt, data_dir, tmp_path):
    from sds_exp.evaluation.stage_eval import PplSettings, StageEvaluator

    records = []
    evaluator = StageEvaluator(
        tokenizer=tiny_opt.tokenizer,
        data_dir=data_dir,
        device="cpu",
        ppl=PplSettings(datasets=["wikitext2_val"], seqlen=256, max_windows=2),
        zeroshot=None,
        final_stage="prune",
        layers=lambda model: {},
        hist_layer=None,
        record=lambda metrics, stage, **extra: records.append(metrics),
        cache_file=tmp_path / "cache.json",
        cache_key={"model": "tiny_opt"},
    )
    evaluator("dense", tiny_opt.model)
    ids = evaluator.token_ids("wikitext2_val")
    assert ids.numel() == 22_176  # the tiny models' GPT-2 BPE: 86 windows of 256
    assert records[-1]["dense/wikitext2_val/windows"] == 2
    ppl = records[-1]["dense/wikitext2_val/ppl"]
    assert ppl > 1 and "dense/wikitext2/ppl" not in records[-1]
    evaluator("dense", tiny_opt.model)  # the second dense evaluation comes from the cache
    assert records[-1]["dense/wikitext2_val/cached"] == 1.0
    assert records[-1]["dense/wikitext2_val/ppl"] == ppl


def test_config_accepts_the_validation_set(compose):
    from sds_exp.validation import validate_config

    validate_config(compose(["benchmark.ppl.datasets=[wikitext2_val]", "optimized_metric=final/wikitext2_val/ppl"]))
