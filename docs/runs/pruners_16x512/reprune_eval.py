"""Diagnostic: WikiText2 ppl (first 40 windows) of an SDS job's re-pruned model before adjustment, for a
mask-only pruner (RIA): reactivated weights times the re-prune masks, from the job's own checkpoint.
A rerun does not need it: `benchmark.ppl.stage_max_windows=null` scores every stage on all 40 windows in the job.
Run from the repository root while the job directory still holds its checkpoint/:
    .venv/bin/python docs/runs/pruners_16x512/reprune_eval.py outputs/multiruns/pruners_16x512/1 out.json
"""

import json
import logging
import math
import sys

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sds_exp.evaluation.perplexity import eval_token_ids, window_losses

torch.manual_seed(0)
job = sys.argv[1]
cfg = OmegaConf.load("conf/model/smollm2_135m.yaml")
cfg.dtype = "float32"
loaded = instantiate(cfg)  # sds_exp.models.loading.LoadedModel
model, tok = loaded.model.eval(), loaded.tokenizer
w = load_file(f"{job}/checkpoint/reactivate/weights.safetensors")
m = load_file(f"{job}/checkpoint/adjust/reprune_masks.safetensors")
mods = dict(model.named_modules())
with torch.no_grad():
    for name, t in w.items():
        mods[name].weight.copy_(t * m[name].to(t.dtype) if name in m else t)
ids = eval_token_ids("wikitext2", tok, "../shared/data", 2048)
with torch.no_grad():
    losses = window_losses(model, ids, 2048, "cpu", max_windows=40)
out = {
    "job": job,
    "ppl40": math.exp(losses.double().mean().item()),
    "ppl8": math.exp(losses[:8].double().mean().item()),
    "losses": losses.tolist(),
}
logging.basicConfig(level=logging.INFO)
logging.getLogger("reprune_eval").info(json.dumps({k: v for k, v in out.items() if k != "losses"}))
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
