"""Pruner-Zero in halves: (1) our PrunerZero.prune on the dense weights with the reference's own G must give the
reference's masks exactly (the released score reads W and G only, so no pruned stream enters); (2) our fp32 G
against the reference's fp16 G (x100)."""

import json
import re
import sys
from pathlib import Path

import torch
from common import load_model, say
from safetensors.torch import load_file

from sds_exp.pruners.pruner_zero import PrunerZero
from sds_exp.spec import SparsitySpec

ref_dir, calib = sys.argv[1], sys.argv[2]
model, tok = load_model(False)
G = torch.load(ref_dir.rstrip("/") + "_grad.pt")
ref_masks = load_file(ref_dir + "/masks.safetensors")
pz, spec = PrunerZero(), SparsitySpec.parse(0.5, "unstructured")
layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
same, ndiff, total = 0, 0, 0
for name, mod in layers.items():
    i, sub = re.match(r"model\.layers\.(\d+)\.(.*)", name).groups()
    g = G[f"{sub}_layer_{i}"].float()
    res = pz.prune(mod.weight, None, spec, name, extra=g)
    w = mod.weight.detach()
    ours = res.mask.bool() & w.ne(0)  # the reference's mask is read as weight != 0
    d = int((ours != ref_masks[name]).sum())
    same += d == 0
    ndiff += d
    total += w.numel()
say(f"masks with the reference's G: {same}/{len(layers)} layers identical, {ndiff} of {total} entries differ")
ids = torch.load(calib)
ours_g = pz.prepare(model, ids, layers, device="cpu", batch_size=8)
worst = 0.0
for name in layers:
    i, sub = re.match(r"model\.layers\.(\d+)\.(.*)", name).groups()
    g_ref = G[f"{sub}_layer_{i}"].float() / 100
    rel = float((ours_g[name].float() - g_ref).abs().max() / g_ref.abs().max())
    worst = max(worst, rel)
say(f"our fp32 G vs the reference's fp16 G/100: max |difference| / max |G_ref| over layers = {worst:.3g}")
summary = {"layers_identical_with_ref_G": same, "layers": len(layers), "entries_differ": ndiff, "g_max_rel_diff": worst}
Path(ref_dir.rstrip("/") + "_exact.json").write_text(json.dumps(summary, indent=1))
