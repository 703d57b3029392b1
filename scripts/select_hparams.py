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

Model, pruner, calibration data, SDS settings and regulariser come from the job's config (``conf/``, composed
with :func:`sds_exp.compose.compose_config`): ``--model X`` is ``model=X``, ``--pruner X`` is ``pruner=X`` (any
option, also one added later as a YAML file), and trailing ``key=value`` arguments (or ``-o key=value``) are Hydra
overrides, e.g. ``data=wikitext2 pruner.percdamp=0.1 sds.reactivate.damp=0.1 regularizer=l1``. The grid's lambda
is the ``lam`` of every regulariser term; each adjustment variant is ``sds.adjustment`` with its damping replaced.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from sds_exp.compose import add_override_arguments, choices, compose_for_command, options
from sds_exp.data.sources import wikitext2_rows
from sds_exp.evaluation.perplexity import perplexity
from sds_exp.models.blocks import decoder_blocks
from sds_exp.models.loading import DTYPES, resolve_dtype
from sds_exp.regularizers.norms import RegularizerSum
from sds_exp.sds.pipeline import swapped_weights
from sds_exp.sds.reconstruct import ADJUST_SCORES
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


def hydra_overrides(args) -> list[str]:
    """The Hydra overrides the flags stand for (the script's defaults included), then the passthrough ones."""
    o = []
    if args.model:
        o.append(f"model={args.model}")
    if args.pruner:
        o.append(f"pruner={args.pruner}")
    if args.device:
        o.append(f"device={args.device}")
    if args.data_dir is not None:
        o.append(f"paths.data_dir={args.data_dir}")
    if args.batch_size is not None:
        o.append(f"calib_batch_size={args.batch_size}")
    o += [
        f"dtype={args.dtype}",
        f"pattern='{args.pattern}'",
        f"sparsity={args.sparsity}",
        f"data.nsamples={args.nsamples}",
        f"data.seqlen={args.seqlen}",
        f"sds.adjust={args.adjust}",
        f"sds.reactivate.steps={args.steps}",
        f"sds.adjustment.steps={args.steps}",
    ]
    return o + list(args.overrides) + list(args.extra_overrides)


def regularizer(cfg, lam: float) -> RegularizerSum | None:
    """The configured regulariser's terms, each with strength ``lam`` (L1 = L2 = lambda for l1_l2); None for 0."""
    if lam <= 0:
        return None
    reg = RegularizerSum({k: instantiate(v, lam=lam) for k, v in (cfg.regularizer or {}).items()})
    return reg or None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/select_hparams.py",
        description=__doc__.splitlines()[0],
        epilog="Flags without a default here take the config's value (conf/config.yaml and its groups, "
        "conf/local/ where present).",
    )
    p.add_argument(
        "--model",
        help="a conf/model option, i.e. model=X (default: the config's, smollm2_135m); "
        f"options: {', '.join(options('model'))}",
    )
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--lams", default="0.001", type=floats, help="regulariser strengths (L1 = L2)")
    p.add_argument("--adjust-damps", default="0.01", type=floats, help="preconditioner damping of the adjustment")
    p.add_argument("--adjust-scores", default="magnitude", type=scores, help="projection scores of the adjustment")
    p.add_argument("--adjust", default="auto", choices=["true", "auto"], help="sds.adjust=X")
    p.add_argument(
        "--pruner",
        help="a conf/pruner option, i.e. pruner=X (default: the config's, wanda); "
        f"options: {', '.join(options('pruner'))}",
    )
    p.add_argument("--pattern", default="2:4", help="pattern=X")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity=X")
    p.add_argument("--nsamples", type=int, default=16, help="data.nsamples=N")
    p.add_argument("--seqlen", type=int, default=512, help="data.seqlen=N, also the perplexity window")
    p.add_argument("--val-windows", type=int, default=8)
    p.add_argument("--steps", type=int, default=200, help="sds.reactivate.steps and sds.adjustment.steps")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype=X")
    p.add_argument("--device", help="device=X (default: the config's, cpu)")
    p.add_argument("--batch-size", type=int, help="calib_batch_size=N (default: the config's, 8)")
    p.add_argument("--data-dir", help="paths.data_dir=X (default: the config's: $SDS_DATA_DIR, else ../shared/data)")
    p.add_argument("--out", default="outputs/select_hparams")
    add_override_arguments(p)
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_intermixed_args(argv)
    overrides = hydra_overrides(args)
    cfg = compose_for_command(p, overrides, output_dir=args.out)
    chosen = choices()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device, seqlen = cfg.device, int(cfg.data.seqlen)
    spec = SparsitySpec.parse(cfg.sparsity, cfg.pattern)
    resolve_dtype(cfg.dtype)
    pruner = instantiate(cfg.pruner)
    sds = instantiate(cfg.sds)
    ignore = list(cfg.ignore)
    settings = {
        **vars(args),
        "model": chosen["model"],
        "pruner": chosen["pruner"],
        "overrides": overrides,
        "choices": chosen,
        "device": device,
        "dtype": cfg.dtype,
        "pattern": str(spec),
        "sparsity": cfg.sparsity,
        "nsamples": cfg.data.nsamples,
        "seqlen": seqlen,
        "adjust": sds.adjust,
        "data_dir": cfg.paths.data_dir,
    }

    lm = instantiate(cfg.model)
    full = lm.model.to(resolve_dtype(cfg.dtype))
    base = truncate(copy.deepcopy(full), args.blocks)
    calib = instantiate(cfg.data)(tokenizer=lm.tokenizer, data_dir=cfg.paths.data_dir, seed=cfg.seed)
    text = "\n\n".join(wikitext2_rows("validation", cfg.paths.data_dir))
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[0]
    nwin = min(args.val_windows, ids.numel() // seqlen)
    val = ids[: nwin * seqlen].reshape(nwin, seqlen)
    log.info(
        "%s, pruner %s %s; validation: %d windows of %d tokens (WikiText2 validation slice); calibration %s",
        lm.name,
        chosen["pruner"],
        spec,
        nwin,
        seqlen,
        tuple(calib.shape),
    )
    data = {"validation": val, "calibration": calib}

    def errors(model) -> dict[str, float]:
        """Perplexity of the whole model with the first blocks' linear weights taken from ``model``."""
        weights = {n: layer.weight.detach() for n, layer in prunable_layers(model).items()}
        with swapped_weights(full, weights):
            return {k: perplexity(full, x.reshape(-1), seqlen, device, desc=k).ppl for k, x in data.items()}

    dense_ppl = errors(base)
    log.info("dense: %s", dense_ppl)

    common = {"device": device, "batch_size": cfg.calib_batch_size, "ignore": ignore}
    dense = snapshot_weights(prunable_layers(base, ignore))
    pruned = copy.deepcopy(base)
    t = time.perf_counter()
    prune_model(pruned, calib, pruner, spec, **common)
    prune_seconds = time.perf_counter() - t
    prune_errors = errors(pruned)
    rows = []
    for lam in args.lams:
        model = copy.deepcopy(pruned)
        t = time.perf_counter()
        reactivate_model(model, calib, dense, sds.reactivate, regularizer(cfg, lam), inputs=sds.inputs, **common)
        react_seconds, react_errors = time.perf_counter() - t, errors(model)
        for damp in args.adjust_damps:
            for score in args.adjust_scores:
                variant = copy.deepcopy(model)
                t = time.perf_counter()
                outcome = reprune_model(
                    variant,
                    calib,
                    dense,
                    pruner,
                    spec,
                    sds.adjust,
                    dataclasses.replace(sds.adjustment, damp=damp),
                    adjust_group=sds.adjust_group,
                    adjust_score=score,
                    **common,
                )
                seconds = time.perf_counter() - t
                adjusted = errors(variant)
                growth = max(
                    float(variant.get_submodule(n).weight.float().abs().max() / w.float().abs().max())
                    for n, w in dense.items()
                )  # largest weight vs the dense layer's: blow-ups
                for name, (weight, _) in outcome.plain.items():  # back to the plain re-prune
                    variant.get_submodule(name).weight.data.copy_(weight.to(variant.get_submodule(name).weight.dtype))
                kept = sum(r.get("adjust_kept", 0.0) for r in outcome.report.values())
                row = {
                    "lam": lam,
                    "damp": damp,
                    "score": score,
                    "kept": f"{kept:.0f}/{len(outcome.report)}",
                    "max_weight_growth": growth,
                    "seconds": {"prune": prune_seconds, "reactivate": react_seconds, "reprune+adjust": seconds},
                    "errors": {
                        "prune": prune_errors,
                        "reactivate": react_errors,
                        "reprune": errors(variant),
                        "adjust": adjusted,
                    },
                }
                rows.append(row)
                log.info("lam %g damp %g score %s: %s", lam, damp, score, json.dumps(row["errors"]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select_hparams.json").write_text(
        json.dumps({"settings": settings, "dense": dense_ppl, "rows": rows}, indent=2)
    )
    stages = list(rows[0]["errors"])
    lines = [
        f"# SDS hyperparameters: {chosen['model']}, first {args.blocks} blocks, {chosen['pruner']} {spec}, "
        f"{chosen['data']} {cfg.data.nsamples} x {seqlen}, {sds.reactivate.steps} steps, adjust {sds.adjust}, "
        f"{cfg.dtype}",
        "",
        f"Perplexity of the whole model, first {args.blocks} blocks after each stage, the rest dense: WikiText2 "
        f"validation (calibration windows). Dense: {dense_ppl['validation']:.4g} ({dense_ppl['calibration']:.4g}).",
        "",
        "| lambda | adjust damp | adjust score | adjusted layers kept | max |W| / dense max |W| | "
        + " | ".join(stages)
        + " |",
        "|---|---|---|---|---:|" + "---:|" * len(stages),
    ]
    for r in rows:
        cells = [f"{r['errors'][s]['validation']:.4g} ({r['errors'][s]['calibration']:.4g})" for s in stages]
        lines.append(
            f"| {r['lam']:g} | {r['damp']:g} | {r['score']} | {r['kept']} | {r['max_weight_growth']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    best = min(rows, key=lambda r: r["errors"][stages[-1]]["validation"])
    lines += [
        "",
        f"Lowest final validation perplexity: lambda = {best['lam']:g}, adjust damp = {best['damp']:g}, "
        f"adjust score = {best['score']}.",
    ]
    (out / "select_hparams.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
