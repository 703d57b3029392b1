"""Our side: sds_exp.api.prune with the one-shot recipe on the same model and windows."""

import time

import torch
from common import dense_zeros, finish, layer_masks, load_model, parser

from sds_exp.api import Recipe, prune

p = parser()
p.add_argument("--pruner", required=True)
p.add_argument("--override", action="append", default=[])
p.add_argument("--batch-size", type=int, default=8)
args = p.parse_args()
model, tok = load_model(args.tiny)
zeros = dense_zeros(model)
ids = torch.load(args.calib)
recipe = Recipe.compose(
    pruner=args.pruner, sparsity=args.sparsity, pattern=args.pattern, sds="prune_only", overrides=args.override
)
t = time.time()
rep = prune(model, ids, recipe, batch_size=args.batch_size)
finish(
    model,
    tok,
    args,
    layer_masks(model, rep.masks),
    {"side": "ours", "pruner": args.pruner, "prune_s": time.time() - t, "dense_zeros": zeros},
)
