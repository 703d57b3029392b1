"""Run a reference's own pruning function on our model and windows (patches applied in this process only)."""

import sys
import time
import types
from types import SimpleNamespace

import torch
from common import REPOS, dense_zeros, finish, layer_masks, load_model, parser

p = parser()
p.add_argument("--method", required=True, choices=["ria", "dsnot", "pz", "sparsegpt", "wanda"])
args = p.parse_args()
sys.path.insert(0, REPOS["wanda" if args.method == "sparsegpt" else args.method])

# fidelity patch: transformers 5 LLaMA layers need position_embeddings; the references pass position_ids only.
from transformers.models.llama import modeling_llama as ml  # noqa: E402

ROTARY = {}
_orig = ml.LlamaDecoderLayer.forward


def _forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kw):
    if position_embeddings is None:
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1]).unsqueeze(0)
        position_embeddings = ROTARY["fn"](hidden_states, position_ids)
    return _orig(
        self,
        hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
        **kw,
    )


ml.LlamaDecoderLayer.forward = _forward
# fidelity patch: the references hard-code .cuda() for a sort and torch.cuda.synchronize; CPU here.
torch.Tensor.cuda = lambda self, *a, **k: self
torch.cuda.synchronize = lambda *a, **k: None
if args.method == "pz":
    sys.modules["lib.ablate"] = types.SimpleNamespace(AblateGPT=None)  # missing from the repository
    import transformers

    transformers.AdamW = torch.optim.AdamW  # removed in transformers 5; only used to clear gradients

model, tok = load_model(args.tiny)
ROTARY["fn"] = model.model.rotary_emb
zeros = dense_zeros(model)
ids = torch.load(args.calib)
nsamples, seqlen = ids.shape
model.seqlen = seqlen
model.hf_device_map = {}


def loader(*a, **k):  # fidelity patch: the file's windows in the references' (input, target) form
    assert k.get("nsamples", nsamples) == nsamples, k
    return [(ids[i : i + 1], ids[i : i + 1].clone()) for i in range(nsamples)], None


import lib.prune as P  # noqa: E402

P.get_loaders = loader
prune_n, prune_m = (0, 0) if args.pattern == "unstructured" else map(int, args.pattern.split(":"))
dev = torch.device("cpu")
torch.random.manual_seed(0)
t = time.time()
extra = {}
if args.method == "ria":  # main.py argparse defaults
    a = SimpleNamespace(
        model="llama",
        seed=0,
        calib_dataset="c4",
        nsamples=nsamples,
        seqlen=seqlen,
        sparsity_ratio=args.sparsity,
        sparsity_type=args.pattern,
        prune_method="ria",
        a=0.5,
        reconstruction=False,
        reallocation=False,
        lsa=False,
        importance_score="sum",
        gptq=False,
        per_outneuron=False,
        semi_sparse_acc=False,
        use_cusparselt=False,
        fast=False,
    )
    with torch.no_grad():
        P.prune_ria(a, model, tok, dev, prune_n=prune_n, prune_m=prune_m)
elif args.method == "dsnot":  # main.py defaults, README's --initial_method wanda
    a = SimpleNamespace(
        model="llama",
        model_type="llama",
        seed=0,
        nsamples=nsamples,
        sparsity_ratio=args.sparsity,
        sparsity_type=args.pattern,
        prune_method="DSnoT",
        initial_method="wanda",
        max_cycle_time=50,
        without_DSnoT=False,
        update_threshold=0.1,
        pow_of_var_regrowing=1.0,
        pow_of_var_pruning=1.0,
        skip_layer="mlp",
        skip_sub_layer="no_skip",
        without_same_sign=True,
        get_time_overhead=False,
    )
    with torch.no_grad():
        P.prune_DSnoT(a, model, tok, dev, prune_n=prune_n, prune_m=prune_m)
elif args.method in ("sparsegpt", "wanda"):  # locuslab/wanda main.py defaults
    a = SimpleNamespace(
        seed=0,
        nsamples=nsamples,
        sparsity_ratio=args.sparsity,
        sparsity_type=args.pattern,
        prune_method=args.method,
        use_variant=False,
    )
    with torch.no_grad():
        fn = P.prune_sparsegpt if args.method == "sparsegpt" else P.prune_wanda
        fn(a, model, tok, dev, prune_n=prune_n, prune_m=prune_m)
else:  # Pruner-Zero: its gradient script's driver loop on the same windows, then prune_pruner_zero
    from lib.gptree import GPTree
    from lib.gradient_computation import GradientComputation

    computer = GradientComputation(model, 100)
    model.train()
    for n in range(nsamples):
        out = model(input_ids=ids[n : n + 1], labels=ids[n : n + 1])
        out.loss.backward()
        computer.update_gradient(model, n + 1)
        model.zero_grad()
    model.eval()
    grads = {k: torch.sqrt(v).to(torch.float16) for k, v in computer.gradients_l2.items()}
    gpath = args.out.rstrip("/") + "_grad.pt"
    torch.save(grads, gpath)
    extra["grad_s"] = time.time() - t
    engine = GPTree.load_tree(REPOS["pz"] + "/data/best_tree.json")
    a = SimpleNamespace(
        model="llama",
        seed=0,
        nsamples=nsamples,
        sparsity_ratio=args.sparsity,
        sparsity_type=args.pattern,
        prune_method="pruner-zero",
        use_variant=False,
        gradient_path=gpath,
    )
    for prm in model.parameters():
        prm.requires_grad_(False)
    with torch.no_grad():
        P.prune_pruner_zero(a, model, tok, dev, prune_n=prune_n, prune_m=prune_m, engine=engine)
extra.update(side="reference", method=args.method, prune_s=time.time() - t, dense_zeros=zeros)
finish(model, tok, args, layer_masks(model), extra)
