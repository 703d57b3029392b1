"""WikiText2 ppl of a run's saved block weights (the same eval as finish())."""

import json
import os
import sys
import time
from pathlib import Path

import torch
from common import DATA, eval_token_ids, load_model, perplexity, say
from safetensors.torch import load_file

d, windows = sys.argv[1], int(sys.argv[2])
model, tok = load_model(False)
w = load_file(os.path.join(d, "weights.safetensors"))
with torch.no_grad():
    for n, m in model.named_modules():
        if n in w:
            m.weight.copy_(w[n])
ids = eval_token_ids("wikitext2", tok, DATA, 2048)
t = time.time()
r = perplexity(model, ids, 2048, "cpu", 1, windows)
res = json.loads(Path(os.path.join(d, "result.json")).read_text())
res.update(ppl=r.ppl, windows=r.nwindows, eval_s=time.time() - t)
Path(d, "result.json").write_text(json.dumps(res, indent=1))
say(json.dumps(res))
