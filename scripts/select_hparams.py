"""Choose SDS hyperparameters on held-out data: ``python scripts/select_hparams.py [options]``.

Runs SDS on the first ``--blocks`` decoder blocks of the model and measures, after every stage, the
perplexity of the whole model with those blocks as SDS left them (the later blocks dense):

* on the WikiText2 **validation** slice of the data mirror (never the test split), and
* on the calibration windows themselves (the gap between the two is the overfitting).

(The relative squared error of the last block's hidden state, the first criterion tried, is dominated by
the residual stream's few massive-activation features: on 12 blocks of SmolLM2 it said the adjustment cut
the validation error 9x, while it raised the model's test perplexity.)

The grid: for each regulariser strength lambda (L1 = L2 = lambda, as the paper's lambda1 = lambda2) the
model is pruned and re-activated once; every adjustment variant (preconditioner damping x projection
score) then re-prunes and adjusts a copy of that re-activated model. The truncated model keeps the
selection cheap: the reconstruction is block-local, so what a setting does to the first blocks is what it
does to every block (include the blocks where it matters: SmolLM2's adjustment blow-ups start at block 11).
Writes ``select_hparams.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

from sds_exp.bench import OFFLINE_MODELS, load_offline_model
from sds_exp.data.calibration import c4
from sds_exp.data.sources import wikitext2_rows
from sds_exp.evaluation.perplexity import perplexity
from sds_exp.models.blocks import decoder_blocks
from sds_exp.models.loading import resolve_dtype
from sds_exp.pruners.sparsegpt import SparseGPT
from sds_exp.pruners.wanda import Wanda
from sds_exp.regularizers.norms import L1, L2, RegularizerSum
from sds_exp.sds.pipeline import swapped_weights
from sds_exp.sds.reconstruct import ADJUST_SCORES, ReconstructSettings
from sds_exp.sds.stages import prunable_layers, prune_model, reactivate_model, reprune_model, snapshot_weights
from sds_exp.spec import SparsitySpec

log = logging.getLogger("select_hparams")


def truncate(model, blocks: int):
    """Keep the first ``blocks`` decoder blocks (in place)."""
    path, layers = decoder_blocks(model)
    if not 0 < blocks <= len(layers):
        raise ValueError(f"--blocks={blocks}; allowed: 1..{len(layers)}")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:blocks]))
    return model


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def scores(text: str) -> list[str]:
    names = text.split(",")
    for name in names:
        if name not in ADJUST_SCORES:
            raise argparse.ArgumentTypeError(f"adjust score {name!r}; allowed: {', '.join(ADJUST_SCORES)}")
    return names


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m", choices=OFFLINE_MODELS)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--lams", default="0.001", type=floats, help="regulariser strengths (L1 = L2)")
    p.add_argument("--adjust-damps", default="0.01", type=floats, help="preconditioner damping of the adjustment")
    p.add_argument("--adjust-scores", default="magnitude", type=scores, help="projection scores of the adjustment")
    p.add_argument("--adjust", default="auto", choices=["true", "auto"])
    p.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt"])
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--val-windows", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    p.add_argument("--out", default="outputs/select_hparams")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    lm = load_offline_model(args.model, args.data_dir)
    full = lm.model.to(resolve_dtype(args.dtype))
    base = truncate(copy.deepcopy(full), args.blocks)
    calib = c4(lm.tokenizer, args.data_dir, seed=0, nsamples=args.nsamples, seqlen=args.seqlen)
    text = "\n\n".join(wikitext2_rows("validation", args.data_dir))
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[0]
    nwin = min(args.val_windows, ids.numel() // args.seqlen)
    val = ids[: nwin * args.seqlen].reshape(nwin, args.seqlen)
    log.info("validation: %d windows of %d tokens (WikiText2 validation slice); calibration %s", nwin, args.seqlen,
             tuple(calib.shape))
    data = {"validation": val, "calibration": calib}

    def errors(model) -> dict[str, float]:
        """Perplexity of the whole model with the first blocks' linear weights taken from ``model``."""
        weights = {n: layer.weight.detach() for n, layer in prunable_layers(model).items()}
        with swapped_weights(full, weights):
            return {k: perplexity(full, x.reshape(-1), args.seqlen, "cpu", desc=k).ppl for k, x in data.items()}

    dense_ppl = errors(base)
    log.info("dense: %s", dense_ppl)

    spec = SparsitySpec.parse(args.sparsity, args.pattern)
    pruner = Wanda() if args.pruner == "wanda" else SparseGPT()
    common = {"batch_size": args.batch_size}
    dense = snapshot_weights(prunable_layers(base))
    pruned = copy.deepcopy(base)
    t = time.perf_counter()
    prune_model(pruned, calib, pruner, spec, **common)
    prune_seconds = time.perf_counter() - t
    prune_errors = errors(pruned)
    rows = []
    for lam in args.lams:
        model = copy.deepcopy(pruned)
        reg = RegularizerSum({"l1": L1(lam), "l2": L2(lam)}) if lam > 0 else None
        t = time.perf_counter()
        reactivate_model(model, calib, dense, ReconstructSettings(steps=args.steps), reg, **common)
        react_seconds, react_errors = time.perf_counter() - t, errors(model)
        for damp in args.adjust_damps:
            for score in args.adjust_scores:
                variant = copy.deepcopy(model)
                t = time.perf_counter()
                outcome = reprune_model(variant, calib, dense, pruner, spec, args.adjust,
                                        ReconstructSettings(steps=args.steps, damp=damp), adjust_score=score, **common)
                seconds = time.perf_counter() - t
                adjusted = errors(variant)
                growth = max(float(variant.get_submodule(n).weight.float().abs().max() / w.float().abs().max())
                             for n, w in dense.items())  # largest weight vs the dense layer's: blow-ups
                for name, (weight, _) in outcome.plain.items():  # back to the plain re-prune
                    variant.get_submodule(name).weight.data.copy_(weight.to(variant.get_submodule(name).weight.dtype))
                kept = sum(r.get("adjust_kept", 0.0) for r in outcome.report.values())
                row = {"lam": lam, "damp": damp, "score": score, "kept": f"{kept:.0f}/{len(outcome.report)}",
                       "max_weight_growth": growth,
                       "seconds": {"prune": prune_seconds, "reactivate": react_seconds, "reprune+adjust": seconds},
                       "errors": {"prune": prune_errors, "reactivate": react_errors, "reprune": errors(variant),
                                  "adjust": adjusted}}
                rows.append(row)
                log.info("lam %g damp %g score %s: %s", lam, damp, score, json.dumps(row["errors"]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select_hparams.json").write_text(json.dumps({"settings": vars(args), "dense": dense_ppl, "rows": rows},
                                                        indent=2))
    stages = list(rows[0]["errors"])
    lines = [f"# SDS hyperparameters: {args.model}, first {args.blocks} blocks, {args.pruner} {args.pattern}, "
             f"C4 {args.nsamples} x {args.seqlen}, {args.steps} steps, adjust {args.adjust}, {args.dtype}", "",
             f"Perplexity of the whole model, first {args.blocks} blocks after each stage, the rest dense: WikiText2 "
             f"validation (calibration windows). Dense: {dense_ppl['validation']:.4g} ({dense_ppl['calibration']:.4g}).",
             "",
             "| lambda | adjust damp | adjust score | adjusted layers kept | max |W| / dense max |W| | "
             + " | ".join(stages) + " |", "|---|---|---|---|---:|" + "---:|" * len(stages)]
    for r in rows:
        cells = [f"{r['errors'][s]['validation']:.4g} ({r['errors'][s]['calibration']:.4g})" for s in stages]
        lines.append(f"| {r['lam']:g} | {r['damp']:g} | {r['score']} | {r['kept']} | {r['max_weight_growth']:.2f} | "
                     + " | ".join(cells) + " |")
    best = min(rows, key=lambda r: r["errors"][stages[-1]]["validation"])
    lines += ["", f"Lowest final validation perplexity: lambda = {best['lam']:g}, adjust damp = {best['damp']:g}, "
                  f"adjust score = {best['score']}."]
    (out / "select_hparams.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
