"""Masks of two runs layer by layer, weights block by block, ppl."""

import argparse
import json
import os
import re
from pathlib import Path

from common import say
from safetensors.torch import load_file

p = argparse.ArgumentParser()
p.add_argument("--ref", required=True)
p.add_argument("--ours", required=True)
p.add_argument("--name", required=True)
p.add_argument("--json")
p.add_argument("--md")
a = p.parse_args()
mr, mo = load_file(os.path.join(a.ref, "masks.safetensors")), load_file(os.path.join(a.ours, "masks.safetensors"))
wr, wo = load_file(os.path.join(a.ref, "weights.safetensors")), load_file(os.path.join(a.ours, "weights.safetensors"))
rr, ro = (json.loads(Path(os.path.join(d, "result.json")).read_text()) for d in (a.ref, a.ours))
diff = {k: float((mr[k] != mo[k]).float().mean()) for k in mr}
blk = lambda k: int(re.search(r"layers\.(\d+)\.", k).group(1))  # noqa: E731
nblocks = max(blk(k) for k in mr) + 1
wsame = [all(bool((wr[k] == wo[k]).all()) for k in wr if blk(k) == b) for b in range(nblocks)]
msame = [all(diff[k] == 0 for k in mr if blk(k) == b) for b in range(nblocks)]
first = next((b for b in range(nblocks) if not msame[b]), None)
firstw = next((b for b in range(nblocks) if not wsame[b]), None)
worst = max(diff, key=diff.get)
per_block = [max(diff[k] for k in mr if blk(k) == b) for b in range(nblocks)]
res = {
    "name": a.name,
    "identical_layers": sum(v == 0 for v in diff.values()),
    "layers": len(diff),
    "mean_diff": sum(diff.values()) / len(diff),
    "max_diff": diff[worst],
    "worst": worst,
    "blocks_identical_weights": sum(wsame),
    "blocks_identical_masks": sum(msame),
    "blocks": nblocks,
    "first_block_mask_diff": first,
    "first_block_weight_diff": firstw,
    "per_block_max_mask_diff": per_block,
    "first_block_layers": {k: diff[k] for k in mr if first is not None and blk(k) == first},
    "ppl_ref": rr.get("ppl"),
    "ppl_ours": ro.get("ppl"),
    "sparsity_ref": rr["sparsity"],
    "sparsity_ours": ro["sparsity"],
    "dense_zeros": rr.get("dense_zeros"),
}
if res["ppl_ref"] and res["ppl_ours"]:
    res["ppl_rel"] = res["ppl_ours"] / res["ppl_ref"] - 1
say(json.dumps(res, indent=1))
if a.json:
    Path(a.json).write_text(json.dumps(res, indent=1))
if a.md:
    with open(a.md, "a") as f:
        f.write(
            f"| {a.name} | {res['identical_layers']}/{res['layers']} | {100 * res['mean_diff']:.3f}% / "
            f"{100 * res['max_diff']:.3f}% | {sum(wsame)}/{nblocks} (masks {sum(msame)}) | first split block {first}"
            f" | {res['ppl_ref']} | {res['ppl_ours']} | {res.get('ppl_rel')} |\n"
        )
