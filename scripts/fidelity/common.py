"""Shared pieces of the fidelity kit: model, keep-masks, saved weights, the perplexity of a run.

The references' code is never copied here: ``setup.sh`` checks each one out at its pinned commit into
``$FIDELITY_DIR/<name>/repo`` (default ``/tmp/fidelity``), and ``run_ref.py`` imports it from there.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sds_exp.evaluation.perplexity import eval_token_ids, perplexity  # noqa: E402

DATA = os.environ.get("SDS_DATA_DIR", str(Path(__file__).resolve().parents[3] / "shared" / "data"))
ROOT = Path(os.environ.get("FIDELITY_DIR", "/tmp/fidelity"))
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def say(*parts) -> None:
    """The kit's one output line (logging, so that the runs' logs hold it with the libraries' messages)."""
    logging.getLogger("fidelity").info(" ".join(map(str, parts)))


REPOS = {name: str(ROOT / name / "repo") for name in ("ria", "dsnot", "pz", "wanda")}


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--calib", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--tiny", action="store_true")
    return p


def load_model(tiny: bool):
    from hydra.utils import instantiate

    from sds_exp.compose import compose_config

    lm = instantiate(compose_config(["model=smollm2_135m", "dtype=float32"]).model)  # the job's own model node
    model, tok = lm.model, lm.tokenizer
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).float()
    model.eval()
    model.config.use_cache = False
    return model, tok


def layer_masks(model, explicit=None):
    """Keep-masks of every linear layer inside the decoder blocks (explicit ones where given, else weight != 0)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            out[name] = explicit[name].bool() if explicit is not None and name in explicit else mod.weight.ne(0)
    return out


def dense_zeros(model):
    return int(
        sum(
            int(m.weight.eq(0).sum())
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
        )
    )


def finish(model, tok, args, masks, extra):
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in masks.items()}, os.path.join(args.out, "masks.safetensors"))
    weights = {
        n: m.weight.detach().contiguous()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    }
    save_file(weights, os.path.join(args.out, "weights.safetensors"))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    res = {"sparsity": 1 - kept / total, **extra}
    if args.windows > 0:
        ids = eval_token_ids("wikitext2", tok, DATA, args.eval_seqlen)
        t = time.time()
        r = perplexity(model, ids, args.eval_seqlen, "cpu", 1, args.windows, desc="ppl")
        res.update(ppl=r.ppl, windows=r.nwindows, eval_s=time.time() - t)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    say(json.dumps(res))
