"""The model card (README.md) of a saved sparse model: what it is, where it came from, what it measured."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sds_exp.provenance import STAGE_ORDER

__all__ = ["model_card", "base_model"]


def base_model(model_node: Mapping[str, Any]) -> tuple[str, str]:
    """(hub id or path, how it was obtained) from the resolved ``model`` config node."""
    name = str(model_node.get("name_or_path") or model_node.get("path") or model_node.get("family") or "?")
    if model_node.get("gguf_file"):
        where = f"the GGUF file {model_node['gguf_file']}"
        if model_node.get("gguf_package"):
            where += f" of the PyPI package {model_node['gguf_package']}"
        return name, where + ", dequantized by transformers"
    if str(model_node.get("_target_", "")).endswith("build_tiny"):
        return f"tiny_{model_node.get('family')}", "a random model built from config (tests)"
    revision = model_node.get("revision")
    return name, f"the Hugging Face checkpoint{f' at revision {revision}' if revision else ''}"


def model_card(resolved: Mapping[str, Any], metrics: Mapping[str, float], choices: Mapping[str, str]) -> str:
    """Markdown with a YAML header the Hub reads (base_model, tags, library)."""
    model = resolved.get("model", {})
    name, where = base_model(model)
    sds = resolved.get("sds", {})
    method = "SDS (prune, dense re-activation, re-prune)" if sds.get("redense", True) else "one-shot pruning"
    pruner = choices.get("pruner") or str(resolved.get("pruner", {}).get("_target_", "?")).rsplit(".", 1)[-1]
    pattern = resolved.get("pattern")
    data = resolved.get("data", {})
    calib = (
        f"{choices.get('data', str(data.get('_target_', '?')).rsplit('.', 1)[-1])}, {data.get('nsamples')} x "
        f"{data.get('seqlen')} tokens, seed {resolved.get('seed')}"
    )
    ppl_keys = sorted({k.split("/", 1)[1] for k in metrics if k.endswith("/ppl") and k.split("/")[0] in STAGE_ORDER})
    rows = []
    for stage in STAGE_ORDER:
        values = [metrics.get(f"{stage}/{k}") for k in ppl_keys]
        if any(v is not None for v in values):
            rows.append(f"| {stage} | " + " | ".join(f"{v:.2f}" if v is not None else "-" for v in values) + " |")
    bench = resolved.get("benchmark", {}).get("ppl") or {}
    windows = bench.get("max_windows") or "all"
    header = "| stage | " + " | ".join(k.removesuffix("/ppl") for k in ppl_keys) + " |"
    base_line = f"base_model: {name}\n" if "/" in name and not name.startswith(("/", ".")) else ""
    return f"""---
{base_line}library_name: transformers
tags: [sparse, pruning, sds, {pruner}]
---

# {name}, {resolved.get("sparsity")} sparse ({pattern}), {method}

* Base model: `{name}`, from {where}.
* Method: {method} with the `{pruner}` pruner (sds_exp, arXiv 2408.10473); pattern `{pattern}`, sparsity
  {resolved.get("sparsity")} per linear layer of the decoder blocks (embeddings and the LM head are dense).
* Calibration: {calib}.
* dtype {resolved.get("dtype")}; the weights are plain safetensors (the zeros are stored, no sparse format,
  no compressed-tensors metadata).

## Perplexity after every stage

Protocol: seqlen {bench.get("seqlen")}, windows {windows}.

{header}
|---|{"---:|" * len(ppl_keys)}
{chr(10).join(rows)}

## Loading

```python
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file

model = AutoModelForCausalLM.from_pretrained("<this folder>")
masks = load_file("<this folder>/masks.safetensors")   # bool keep-masks by layer name
```

Or as a job's model: `python -m sds_exp model=saved model.path=<this folder>`. `resolved_config.yaml` holds
the whole job config.
"""
