"""Helpers for the zero-shot and W&B tests: the data mirror, a GPT-2 BPE tokenizer, a tiny model.

Kept out of ``conftest.py`` (owned by the core); test modules import from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"


def data_dir() -> Path:
    """The data mirror: ``$SDS_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("SDS_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


def require_mirror() -> Path:
    """The mirror root, or skip the test when it is absent."""
    root = data_dir()
    if not (root / "lm-eval-tasks").is_dir():
        pytest.skip(f"data mirror not found at {root} (set SDS_DATA_DIR)")
    return root


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access, no progress bars, no W&B chatter.

    ``datasets`` reads the offline flag once at import, so its constant is patched as well.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def gpt2_tokenizer():
    """GPT-2 BPE from the mirror's vocab/merges, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    files = require_mirror() / "tokenizers" / "gpt2-bpe"
    bpe = Tokenizer(models.BPE.from_file(str(files / "vocab.json"), str(files / "merges.txt")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


def tiny_llama(vocab_size: int, seed: int = 0):
    """A seeded 2-layer Llama with hidden size 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval()
