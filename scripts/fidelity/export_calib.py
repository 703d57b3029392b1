"""Calibration windows as the project samples them: export_calib.py NSAMPLES SEQLEN OUT.pt"""

import sys

import torch
from common import DATA, load_model, say

from sds_exp.api import calibration

n, L, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
_, tok = load_model(False)
ids = calibration("c4", tok, nsamples=n, seqlen=L, seed=0, data_dir=DATA)
torch.save(ids, out)
say(out, tuple(ids.shape), int(ids.sum()))
