import logging
import math

import pytest
import torch

from sds_exp.pruners.base import HessianStats, RowNormStats
from sds_exp.pruners.magnitude import Magnitude
from sds_exp.pruners.masks import check_nm
from sds_exp.pruners.sparsegpt import SparseGPT, inverse_cholesky_upper
from sds_exp.pruners.wanda import Wanda
from sds_exp.spec import SparsitySpec

HALF = SparsitySpec(0.5)
NM = SparsitySpec.parse(0.5, "2:4")


def _data(out=8, inp=16, tokens=64, seqs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(seqs, tokens, inp, generator=g) * torch.linspace(0.1, 3, inp)  # uneven channel scales
    return W, X


def test_row_norm_stats_is_mean_over_sequences():
    _, X = _data()
    stats = RowNormStats(X.shape[-1])
    for x in X.split(1):  # one sequence per call, as the references' hooks
        stats.add_batch(x)
    expected = X.pow(2).sum(1).mean(0)  # sum over tokens, mean over sequences
    torch.testing.assert_close(stats.scaler_row, expected)
    batched = RowNormStats(X.shape[-1])
    batched.add_batch(X[:3])
    batched.add_batch(X[3:])
    torch.testing.assert_close(batched.scaler_row, expected)


def test_hessian_stats():
    _, X = _data()
    stats = HessianStats(X.shape[-1])
    for x in X.split(2):
        stats.add_batch(x)
    flat = X.reshape(-1, X.shape[-1])
    torch.testing.assert_close(stats.H, 2 * flat.t() @ flat / X.shape[0], rtol=1e-4, atol=1e-4)


def test_hessian_stats_one_sequence_per_call_is_the_references_running_mean_bit_for_bit():
    """SparseGPT's add_batch (IST-DASLab/sparsegpt): rescale, then H += inp @ inp^T with inp (in, tokens); the
    fused addmm_ rounds differently at 512 tokens, and SparseGPT's masks amplify such differences."""
    _, X = _data(inp=96, tokens=512, seqs=6)
    ref = torch.zeros(96, 96)
    for seen, x in enumerate(X):  # the reference's loop, written out
        ref *= seen / (seen + 1)
        inp = math.sqrt(2 / (seen + 1)) * x.t().float()  # (in, tokens)
        ref += inp.matmul(inp.t())
    for calls in (X.split(1), X.split(4)):  # any calibration batch size: one sequence per step inside
        stats = HessianStats(96)
        for x in calls:
            stats.add_batch(x)
        assert torch.equal(stats.H, ref)


def test_row_norm_stats_is_the_references_running_mean_bit_for_bit_at_any_batch_size():
    """Wanda's add_batch (locuslab/wanda lib/layerwrapper.py): rescale, then += torch.norm(inp, dim=1)**2 / n with
    inp (in, tokens); x.pow(2).sum(0) rounds differently, and RIA's and Wanda's masks see the last bit."""
    _, X = _data(inp=96, tokens=512, seqs=6)
    ref = torch.zeros(96)
    for seen, x in enumerate(X):  # the reference's loop, written out
        ref *= seen / (seen + 1)
        ref += torch.norm(x.t().float(), p=2, dim=1) ** 2 / (seen + 1)
    for calls in (X.split(1), X.split(4), [X]):
        stats = RowNormStats(96)
        for x in calls:
            stats.add_batch(x)
        assert torch.equal(stats.scaler_row, ref) and stats.nsamples == 6


def test_wanda_hand_computation_4x8():
    W = torch.tensor([[1.0, -2, 3, -4, 5, -6, 7, -8]] * 2 + [[8.0, 7, 6, 5, 4, 3, 2, 1]] * 2)
    norms_sq = torch.tensor([64.0, 16, 4, 1, 1, 4, 16, 64])  # ||X_j||^2 -> ||X_j|| = 8,4,2,1,1,2,4,8
    stats = RowNormStats(8)
    stats.scaler_row, stats.nsamples = norms_sq, 1
    res = Wanda().prune(W, stats, HALF)
    # row 0 scores: 8,8,6,4,5,12,28,64 -> prune the 4 lowest: cols 3 (4), 4 (5), 2 (6),
    # then 0 (8, tie with 1: lower index)
    assert (~res.mask[0]).nonzero().flatten().tolist() == [0, 2, 3, 4]
    # row 2 scores: 64,28,12,5,4,6,8,8 -> prune cols 4,3,5,6
    assert (~res.mask[2]).nonzero().flatten().tolist() == [3, 4, 5, 6]
    torch.testing.assert_close(res.weight, W * res.mask)
    nm = Wanda().prune(W, stats, NM)
    assert check_nm(nm.mask, 2, 4)
    # row 0 groups: [8,8,6,4] keep 8,8 (cols 0,1); [5,12,28,64] keep cols 6,7
    assert nm.mask[0].nonzero().flatten().tolist() == [0, 1, 6, 7]


def test_wanda_matches_reference_rule_on_random_layer():
    W, X = _data(out=12, inp=32)
    stats = RowNormStats(32)
    stats.add_batch(X)
    res = Wanda().prune(W, stats, SparsitySpec(0.6))
    metric = W.abs() * stats.scaler_row.sqrt()
    idx = torch.sort(metric, dim=-1, stable=True).indices[:, : int(32 * 0.6)]
    ref = torch.ones_like(W, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(res.mask, ref)
    assert (~res.mask).sum(1).eq(int(32 * 0.6)).all()


def test_magnitude_per_matrix_and_no_mutation():
    W, _ = _data()
    before = W.clone()
    res = Magnitude().prune(W, None, SparsitySpec(0.4))
    assert torch.equal(W, before)
    k = int(W.numel() * 0.4)
    assert int((~res.mask).sum()) == k
    assert res.weight.abs()[~res.mask].max() <= res.weight.abs()[res.mask].min()
    assert check_nm(Magnitude().prune(W, None, NM).mask, 2, 4)


def _naive_sparsegpt(W, H, spec, blocksize=128, percdamp=0.01):
    """Column-by-column OBS without lazy batching, written from the paper (Alg. 1)."""
    W = W.clone().double()
    H = H.clone().double()
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.ones_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if spec.structured and i % spec.m == 0:
            score = W[:, i : i + spec.m] ** 2 / torch.diag(U)[i : i + spec.m] ** 2
            idx = torch.sort(score, dim=1, stable=True).indices[:, : spec.prune_n]
            mask[:, i : i + spec.m] = torch.ones_like(score, dtype=torch.bool).scatter_(1, idx, False)
        if not spec.structured and i % blocksize == 0:
            j = min(i + blocksize, W.shape[1])
            score = W[:, i:j] ** 2 / torch.diag(U)[i:j] ** 2
            k = int(score.numel() * spec.ratio)
            flat = torch.ones(score.numel(), dtype=torch.bool)
            flat[torch.sort(score.flatten(), stable=True).indices[:k]] = False
            mask[:, i:j] = flat.view_as(score)
        err = (W[:, i] * ~mask[:, i]) / U[i, i]
        W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
    return W * mask, mask


@pytest.mark.parametrize("spec", [SparsitySpec(0.5), NM, SparsitySpec.parse(0.5, "4:8")])
def test_sparsegpt_matches_naive_obs(spec):
    W, X = _data(out=16, inp=48, tokens=128, seqs=4)
    stats = HessianStats(48)
    stats.add_batch(X)
    res = SparseGPT(blocksize=16).prune(W, stats, spec)
    ref_w, ref_mask = _naive_sparsegpt(W, stats.H, spec, blocksize=16)
    assert torch.equal(res.mask, ref_mask)
    torch.testing.assert_close(res.weight, ref_w.float(), rtol=1e-4, atol=1e-4)
    if spec.structured:
        assert check_nm(res.mask, spec.n, spec.m)
    else:  # exactly int(numel * s) per 16-column block
        for i in range(0, 48, 16):
            assert int((~res.mask[:, i : i + 16]).sum()) == int(16 * 16 * 0.5)


def _recon_error(W, Wp, X):
    x = X.reshape(-1, X.shape[-1])
    return float(((x @ W.t() - x @ Wp.t()) ** 2).mean())


def test_sparsegpt_zero_sparsity_keeps_output_and_beats_magnitude_at_half():
    W, X = _data(out=32, inp=64, tokens=256, seqs=4)
    stats = HessianStats(64)
    stats.add_batch(X)
    zero = SparseGPT().prune(W, stats, SparsitySpec(0.0))
    assert zero.mask.all()
    assert _recon_error(W, zero.weight, X) < 1e-10
    sgpt = SparseGPT().prune(W, stats, HALF)
    mag = Magnitude().prune(W, None, HALF)
    assert _recon_error(W, sgpt.weight, X) < 0.5 * _recon_error(W, mag.weight, X)


def test_sparsegpt_dead_inputs_and_blocksize_check():
    W, X = _data(out=8, inp=16)
    X[..., 3] = 0
    stats = HessianStats(16)
    stats.add_batch(X)
    res = SparseGPT(blocksize=8).prune(W, stats, HALF)
    assert (res.weight[:, 3] == 0).all()
    with pytest.raises(ValueError, match="multiple of M=8"):
        SparseGPT(blocksize=12).prune(W, stats, SparsitySpec.parse(0.5, "4:8"))


def test_cholesky_failure_retries_with_more_damping(caplog):
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues -1 and 3: fails until damping exceeds 1
    with caplog.at_level(logging.WARNING):
        U = inverse_cholesky_upper(H, 0.01, name="blk.q_proj")
    assert torch.isfinite(U).all()
    assert "Cholesky failed with percdamp=0.01" in caplog.text and "blk.q_proj" in caplog.text
    with pytest.raises(torch.linalg.LinAlgError, match="blk.q_proj"):
        inverse_cholesky_upper(-torch.eye(3), 0.01, name="blk.q_proj", max_tries=3)


def test_pruners_need_stats_and_validate_settings():
    W, _ = _data()
    with pytest.raises(ValueError, match="calibration statistics for layer L"):
        Wanda().prune(W, None, HALF, name="L")
    with pytest.raises(ValueError, match="percdamp"):
        SparseGPT(percdamp=-1)
    with pytest.raises(ValueError, match="group"):
        Wanda(group="column")
