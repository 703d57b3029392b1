"""Choose the SDS regulariser strength on held-out data: ``python scripts/select_lambda.py [options]``.

For each lambda (L1 = L2 = lambda, as the paper's lambda1 = lambda2), runs SDS on the first ``--blocks``
decoder blocks of the model and measures, after every stage, the relative squared error of the last
block's output against the dense model's:

* on the WikiText2 **validation** slice of the data mirror (never the test split), and
* on the calibration windows themselves.

The truncated model keeps the selection cheap (the reconstruction is block-local, so what a lambda does
to the first blocks is what it does to every block). Writes ``select_lambda.json`` and ``.md``.
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
from sds_exp.models.blocks import capture_block_inputs, decoder_blocks, run_block
from sds_exp.models.loading import resolve_dtype
from sds_exp.pruners.sparsegpt import SparseGPT
from sds_exp.pruners.wanda import Wanda
from sds_exp.regularizers.norms import L1, L2, RegularizerSum
from sds_exp.sds.pipeline import SDSConfig, run_sds
from sds_exp.sds.reconstruct import ReconstructSettings
from sds_exp.spec import SparsitySpec

log = logging.getLogger("select_lambda")


def truncate(model, blocks: int):
    """Keep the first ``blocks`` decoder blocks (in place)."""
    path, layers = decoder_blocks(model)
    if not 0 < blocks <= len(layers):
        raise ValueError(f"--blocks={blocks}; allowed: 1..{len(layers)}")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:blocks]))
    return model


@torch.no_grad()
def last_block_output(model, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    stream = capture_block_inputs(model, ids, "cpu", batch_size)
    for block in decoder_blocks(model)[1]:
        stream.hidden = run_block(block, stream)
    return stream.hidden.float()


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).pow(2).sum() / ref.pow(2).sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_135m", choices=OFFLINE_MODELS)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--lams", default="0,0.001,0.01,0.1", type=lambda s: [float(x) for x in s.split(",")])
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
    p.add_argument("--out", default="outputs/select_lambda")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    lm = load_offline_model(args.model, args.data_dir)
    base = truncate(lm.model.to(resolve_dtype(args.dtype)), args.blocks)
    calib = c4(lm.tokenizer, args.data_dir, seed=0, nsamples=args.nsamples, seqlen=args.seqlen)
    text = "\n\n".join(wikitext2_rows("validation", args.data_dir))
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[0]
    nwin = min(args.val_windows, ids.numel() // args.seqlen)
    val = ids[: nwin * args.seqlen].reshape(nwin, args.seqlen)
    log.info("validation: %d windows of %d tokens (WikiText2 validation slice); calibration %s", nwin, args.seqlen,
             tuple(calib.shape))
    ref = {"validation": last_block_output(base, val, args.batch_size),
           "calibration": last_block_output(base, calib, args.batch_size)}

    spec = SparsitySpec.parse(args.sparsity, args.pattern)
    pruner = Wanda() if args.pruner == "wanda" else SparseGPT()
    settings = ReconstructSettings(steps=args.steps)
    rows = []
    for lam in args.lams:
        model = copy.deepcopy(base)
        errors: dict[str, dict[str, float]] = {}

        def on_stage(stage, m, _errors=errors):
            if stage != "dense":
                _errors[stage] = {k: rel_error(last_block_output(m, x, args.batch_size), ref[k])
                                  for k, x in (("validation", val), ("calibration", calib))}

        reg = RegularizerSum({"l1": L1(lam), "l2": L2(lam)}) if lam > 0 else None
        t = time.perf_counter()
        run_sds(model, calib, pruner, spec, SDSConfig(reactivate=settings, adjustment=settings), reg,
                batch_size=args.batch_size, on_stage=on_stage)
        rows.append({"lam": lam, "seconds": time.perf_counter() - t, "errors": errors})
        log.info("lam %g: %s", lam, json.dumps(errors))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select_lambda.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    stages = list(rows[0]["errors"])
    lines = [f"# lambda selection: {args.model}, first {args.blocks} blocks, {args.pruner} {args.pattern}, "
             f"C4 {args.nsamples} x {args.seqlen}, {args.steps} steps, {args.dtype}", "",
             "Relative squared error of the last block's output vs dense, validation (calibration).", "",
             "| lambda | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for r in rows:
        cells = [f"{r['errors'][s]['validation']:.4g} ({r['errors'][s]['calibration']:.4g})" for s in stages]
        lines.append(f"| {r['lam']:g} | " + " | ".join(cells) + " |")
    best = min(rows, key=lambda r: r["errors"][stages[-1]]["validation"])
    lines += ["", f"Lowest final validation error: lambda = {best['lam']:g}."]
    (out / "select_lambda.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
