"""Calibration windows as the project samples them: export_calib.py NSAMPLES SEQLEN OUT.pt [POOL]

POOL: calibration (default: the mirror's documents 0-999) or all (the 2,000 documents the references draw from:
their own windows, ``data.pool=all``)."""

import sys

import torch
from common import DATA, load_model, say

from sds_exp.data.calibration import c4

n, L, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
_, tok = load_model(False)
pool = sys.argv[4] if len(sys.argv) > 4 else "calibration"
ids = c4(tok, DATA, seed=0, nsamples=n, seqlen=L, pool=pool)
torch.save(ids, out)
say(out, tuple(ids.shape), int(ids.sum()))
