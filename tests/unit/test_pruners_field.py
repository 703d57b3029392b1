"""RIA, ADMM and DSnoT: exact counts and N:M, hand computations, reconstruction, bad settings, tiny SDS runs."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sds_exp.pruners.admm import ADMM
from sds_exp.pruners.base import CombinedStats, HessianStats, InputMomentStats, PruneResult, RowNormStats
from sds_exp.pruners.dsnot import DSnoT
from sds_exp.pruners.magnitude import Magnitude
from sds_exp.pruners.masks import check_nm
from sds_exp.pruners.ria import RIA, ria_scores
from sds_exp.pruners.sparsegpt import SparseGPT
from sds_exp.pruners.wanda import Wanda
from sds_exp.spec import SparsitySpec
from sds_exp.validation import ConfigError, check_component

HALF = SparsitySpec(0.5)
NM24 = SparsitySpec.parse(0.5, "2:4")
NM48 = SparsitySpec.parse(0.5, "4:8")
ATTN = "model.layers.0.self_attn.q_proj"  # a layer DSnoT refines under its default skip_layer=mlp


def _mean_dominated(out=16, inp=64, seqs=4, tokens=64, seed=0, mean=2.0, spread=0.5):
    """Weights and inputs whose channels have a sizeable mean next to their spread (DSnoT's premise)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    mu = torch.randn(inp, generator=g) * mean
    sigma = (torch.rand(inp, generator=g) + 0.2) * spread
    return W, torch.randn(seqs, tokens, inp, generator=g) * sigma + mu


def _correlated(out=16, inp=64, seqs=4, tokens=64, seed=0):
    """Inputs from 8 latent factors plus a little noise: strongly correlated channels (ADMM's premise)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(seqs, tokens, 8, generator=g) @ torch.randn(8, inp, generator=g)
    return W, X + 0.1 * torch.randn(seqs, tokens, inp, generator=g)


def _stats(pruner, X):
    stats = pruner.collector(X.shape[-1], torch.device("cpu"))
    if stats is not None:
        for x in X.split(2):
            stats.add_batch(x)
    return stats


def _recon(W, new, X):
    x = X.reshape(-1, X.shape[-1]).double()
    return float((x @ (W.double() - new.double()).t()).pow(2).sum())


def _snapshot(stats):
    if stats is None:
        return {}
    parts = [stats.base, stats.own] if isinstance(stats, CombinedStats) else [stats]
    return {
        f"{i}.{k}": v.clone()
        for i, p in enumerate(parts)
        if p is not None
        for k, v in vars(p).items()
        if torch.is_tensor(v)
    }


PRUNERS = {
    "ria": (RIA, "matrix"),
    "ria_row": (partial(RIA, group="row"), "row"),
    "admm": (ADMM, "matrix"),
    "admm_row": (partial(ADMM, group="row"), "row"),
    "admm_cubic": (partial(ADMM, matrix_schedule="cubic"), "matrix"),
    "admm_fixed_mask": (partial(ADMM, iterative_prune=0), "matrix"),
    "dsnot_wanda": (partial(DSnoT, base=Wanda()), "row"),
    "dsnot_magnitude": (partial(DSnoT, base=Magnitude()), "matrix"),
    "dsnot_sparsegpt": (partial(DSnoT, base=SparseGPT(blocksize=16)), "matrix"),
}


@pytest.mark.parametrize("spec", [HALF, NM24, NM48], ids=str)
@pytest.mark.parametrize("key", list(PRUNERS))
def test_exact_counts_nm_dtype_and_no_mutation(key, spec):
    make, group = PRUNERS[key]
    pruner = make()
    W, X = _mean_dominated()
    W_before = W.clone()
    stats = _stats(pruner, X)
    before = _snapshot(stats)
    res = pruner.prune(W, stats, spec, ATTN)
    assert isinstance(res, PruneResult) and res.weight.dtype == torch.float32 and res.mask.dtype == torch.bool
    assert res.weight.shape == res.mask.shape == W.shape
    assert torch.equal(W, W_before)
    assert all(torch.equal(v, _snapshot(stats)[k]) for k, v in before.items())
    assert (res.weight[~res.mask] == 0).all()
    pruned = ~res.mask
    if spec.structured:
        assert check_nm(res.mask, spec.n, spec.m)
    elif group == "row":
        assert pruned.sum(1).eq(int(W.shape[1] * 0.5)).all()
    else:  # matrix; SparseGPT's per-block counts add up to the same (DSnoT's swaps keep only the row counts)
        assert int(pruned.sum()) == int(W.numel() * 0.5)
    if isinstance(pruner, DSnoT):  # the refinement moved weights, and only swapped them
        base = pruner.base.prune(W, stats.base, spec, ATTN)
        assert (res.mask != base.mask).any()
        assert torch.equal(res.mask.sum(1), base.mask.sum(1))
        torch.testing.assert_close(res.weight[res.mask & base.mask], base.weight[res.mask & base.mask])
        torch.testing.assert_close(res.weight[res.mask & ~base.mask], W[res.mask & ~base.mask])


def test_ria_score_by_hand_2x2():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    scaler_row = torch.tensor([4.0, 16.0])  # ||X_j|| = 2, 4
    # column sums 4, 6; row sums 3, 7; a = 1: (|w|/col + |w|/row) * ||X_j||
    want = torch.tensor([[(1 / 4 + 1 / 3) * 2, (2 / 6 + 2 / 3) * 4], [(3 / 4 + 3 / 7) * 2, (4 / 6 + 4 / 7) * 4]])
    torch.testing.assert_close(ria_scores(W, scaler_row, a=1.0), want)
    torch.testing.assert_close(ria_scores(-W, scaler_row, a=0.5)[0, 0], torch.tensor((1 / 4 + 1 / 3) * 2**0.5))


@pytest.mark.parametrize("a", [0.5, 1.3])
def test_ria_matches_hand_computation_8x16(a):
    W, X = _mean_dominated(out=8, inp=16, seed=3)
    stats = RowNormStats(16)
    for x in X.split(1):
        stats.add_batch(x)
    norms = [float(X[:, :, j].pow(2).sum() / X.shape[0]) ** 0.5 for j in range(16)]  # sqrt of the mean over seqs
    col = [sum(abs(float(W[i, j])) for i in range(8)) for j in range(16)]
    row = [sum(abs(float(W[i, j])) for j in range(16)) for i in range(8)]
    hand = torch.tensor(
        [
            [(abs(float(W[i, j])) / col[j] + abs(float(W[i, j])) / row[i]) * norms[j] ** a for j in range(16)]
            for i in range(8)
        ]
    )
    pruner = RIA(a=a)
    torch.testing.assert_close(pruner.scores(W, stats), hand.float(), rtol=1e-5, atol=1e-7)
    flat = hand.flatten()
    order = sorted(range(128), key=lambda k: (float(flat[k]), k))  # ascending, ties to the lower index
    want = torch.ones(128, dtype=torch.bool)
    want[order[:64]] = False
    res = pruner.prune(W, stats, HALF)
    assert torch.equal(res.mask, want.reshape(8, 16))
    torch.testing.assert_close(res.weight, W * want.reshape(8, 16))
    row_mask = RIA(a=a, group="row").prune(W, stats, HALF).mask
    for i in range(8):
        pruned = sorted(range(16), key=lambda j, i=i: (float(hand[i, j]), j))[:8]
        assert sorted((~row_mask[i]).nonzero().flatten().tolist()) == sorted(pruned)
    nm = pruner.prune(W, stats, NM24).mask
    for i in range(8):
        for g in range(0, 16, 4):
            top = sorted(range(g, g + 4), key=lambda j, i=i: (-float(hand[i, j]), j))[:2]
            assert nm[i, g : g + 4].nonzero().flatten().add(g).tolist() == sorted(top)


def test_admm_zero_sparsity_leaves_layer_unchanged():
    W, X = _correlated()
    for spec_group in ("matrix", "row"):
        res = ADMM(group=spec_group).prune(W, _stats(ADMM(), X), SparsitySpec(0.0))
        assert res.mask.all()
        torch.testing.assert_close(res.weight, W, rtol=1e-4, atol=1e-4)  # fp32 inverse, 20 iterations


@pytest.mark.parametrize("spec", [HALF, NM24], ids=str)
def test_admm_reconstructs_better_than_magnitude(spec):
    W, X = _correlated(seed=1)
    admm = ADMM().prune(W, _stats(ADMM(), X), spec)
    mag = Magnitude().prune(W, None, spec)
    wanda = Wanda().prune(W, _stats(Wanda(), X), spec)
    assert _recon(W, admm.weight, X) < 0.5 * _recon(W, mag.weight, X)
    assert _recon(W, admm.weight, X) < _recon(W, wanda.weight, X)


def test_admm_follows_the_papers_iteration():
    """A plain loop from the paper's equations with the released defaults (the target at every re-selection of the
    first 15 of 20 iterations, whole matrix, percdamp 0.1, rho 1) gives the same weights."""
    W, X = _correlated(out=8, inp=32, seed=2)
    x = X.reshape(-1, 32).double()
    XX = x.t() @ x
    d = XX.diagonal().sqrt() + 1e-8
    G = XX / torch.outer(d, d)
    G = G + 0.1 * G.diagonal().mean() * torch.eye(32, dtype=G.dtype)
    V = (W.double() * d).t()
    XY = G @ V
    Ginv = torch.linalg.inv(G + torch.eye(32, dtype=G.dtype))
    U = torch.zeros_like(V)
    for t in range(20):
        if t < 15:
            score = (V + U).abs().flatten()
            keep = torch.ones(score.numel(), dtype=torch.bool)
            keep[sorted(range(score.numel()), key=lambda k: (float(score[k]), k))[: score.numel() // 2]] = False
            keep = keep.reshape(V.shape)
        Z = (V + U) * keep
        U = U + V - Z
        V = Ginv @ (XY + (Z - U))
    want = ((V + U) * keep).t() / d
    res = ADMM().prune(W, _stats(ADMM(), X), HALF)
    assert torch.equal(res.mask, keep.t())
    torch.testing.assert_close(res.weight.double(), want, rtol=1e-3, atol=1e-4)


def test_admm_uses_the_plain_gram_sum():
    """HessianStats' 2/N normalisation is undone: the result equals the one from sum X X^T."""
    from sds_exp.pruners.admm import admm_prune

    W, X = _correlated(seed=4)
    x = X.reshape(-1, X.shape[-1])
    want = admm_prune(W, x.t() @ x, NM24)
    got = ADMM().prune(W, _stats(ADMM(), X), NM24)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.weight, want.weight, rtol=1e-4, atol=1e-5)


def test_input_moment_stats_by_hand():
    _, X = _mean_dominated(seqs=5, tokens=16, inp=8)
    one = InputMomentStats(8)
    for x in X.split(1):  # the reference's hook: one sequence per call
        one.add_batch(x)
    torch.testing.assert_close(one.sum_metric_row, X.sum(1).mean(0))  # sum over tokens, mean over sequences
    torch.testing.assert_close(one.scaler_row, X.pow(2).sum(1).mean(0))
    per_seq_var = ((X - X.mean(1, keepdim=True)) ** 2).mean(1)  # each sequence's own (biased) variance
    torch.testing.assert_close(one.var, per_seq_var.mean(0))
    batched = InputMomentStats(8)
    batched.add_batch(X[:3])
    batched.add_batch(X[3:])
    for key in ("sum_metric_row", "scaler_row", "var"):
        assert torch.equal(getattr(batched, key), getattr(one, key)), key  # one sequence per step inside
    assert (batched.nsamples, batched.ntokens) == (5, 80)


def test_input_moment_stats_are_the_references_bit_for_bit():
    """DSnoT's add_batch (zyxxmu/DSnoT 4c029df lib/layerwrapper.py), one sequence per call, written out."""
    _, X = _mean_dominated(seqs=5, tokens=64, inp=32)
    var = scaler = metric = None
    ntokens = 0
    for seen, x in enumerate(X):
        inp = x.t().float()  # (in, tokens)
        v = torch.var(inp, dim=1, unbiased=False)
        var = v if ntokens == 0 else (var * ntokens + v * inp.shape[1]) / (ntokens + inp.shape[1])
        ntokens += inp.shape[1]
        scaler = torch.zeros(32) if scaler is None else scaler * (seen / (seen + 1))
        metric = torch.zeros(32) if metric is None else metric * (seen / (seen + 1))
        scaler = scaler + torch.norm(inp, p=2, dim=1) ** 2 / (seen + 1)
        metric = metric + torch.sum(inp, dim=1) / (seen + 1)
    stats = InputMomentStats(32)
    stats.add_batch(X[:2])
    stats.add_batch(X[2:])
    assert torch.equal(stats.var, var) and torch.equal(stats.scaler_row, scaler)
    assert torch.equal(stats.sum_metric_row, metric)


def _dsnot_by_hand(W, kept, own, spec, cycles=50, threshold=0.1, same_sign=False):
    """DSnoT's rule written out row by row (lists, two pointers, one swap per cycle) for a base without update."""
    xbar, var, wanda = own.sum_metric_row, own.var, W.abs() * own.scaler_row.sqrt()
    contrib = W * xbar  # float32, as the pruner
    regrow_key = contrib / var
    errors = ((W - W * kept) * xbar).sum(1)  # dense minus pruned mean output, per row
    start, kept = kept, kept.clone()
    for i in range(W.shape[0]):
        c, err = contrib[i], errors[i]
        sign0 = err.sign()
        regrow = sorted((~kept[i]).nonzero().flatten().tolist(), key=lambda j, i=i: (float(regrow_key[i, j]), j))
        ranked = sorted(kept[i].nonzero().flatten().tolist(), key=lambda j, i=i: (float(wanda[i, j]), j))
        prune = [j for j in ranked if c[j] < 0] + [j for j in ranked if c[j] > 0][::-1]
        rlo, rhi, plo, phi = 0, len(regrow) - 1, 0, len(prune) - 1
        used = set()
        for _ in range(cycles):
            if err > 0:
                r, rhi = regrow[rhi], rhi - 1
            else:
                r, rlo = regrow[rlo], rlo + 1
            if spec.structured:  # the kept weight of r's group with the lowest score, never one touched before
                g = r - r % spec.m
                group = [j for j in range(g, g + spec.m) if start[i, j] and j not in used]
                if not group:
                    break
                q = min(group, key=lambda j, i=i: (float(wanda[i, j]), j))
                used.add(q)
            elif err < 0:
                q, phi = prune[phi], phi - 1
            else:
                q, plo = prune[plo], plo + 1
            after = err + c[q] - c[r]
            if not err.abs() > threshold or ((same_sign or spec.structured) and after.sign() != sign0):
                break
            kept[i, q], kept[i, r], err = False, True, after
    return kept


@pytest.mark.parametrize("spec", [HALF, NM24, NM48], ids=str)
@pytest.mark.parametrize("same_sign", [False, True])
def test_dsnot_matches_the_rule_by_hand(spec, same_sign):
    W, X = _mean_dominated(out=12, inp=256, seed=5)
    pruner = DSnoT(base=Wanda(), without_same_sign=not same_sign)
    stats = _stats(pruner, X)
    base = Wanda().prune(W, stats.base, spec)
    want = _dsnot_by_hand(W, base.mask, stats.own, spec, same_sign=same_sign)
    got = pruner.prune(W, stats, spec, ATTN)
    assert (got.mask != base.mask).sum() > 20
    assert torch.equal(got.mask, want)


@pytest.mark.parametrize("spec", [HALF, NM24, NM48], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_dsnot_lowers_its_base_reconstruction_error(spec, seed):
    W, X = _mean_dominated(out=32, inp=256, tokens=128, seed=seed)
    for base in (Wanda(), Magnitude(group="row")):
        pruner = DSnoT(base=base)
        stats = _stats(pruner, X)
        res, plain = pruner.prune(W, stats, spec, ATTN), base.prune(W, stats.base, spec)
        assert torch.equal(res.mask.sum(1), plain.mask.sum(1))
        assert not spec.structured or check_nm(res.mask, spec.n, spec.m)
        assert _recon(W, res.weight, X) < 0.8 * _recon(W, plain.weight, X)


def test_dsnot_skip_layer_rules():
    W, X = _mean_dominated()
    pruner = DSnoT(base=Wanda())
    stats = _stats(pruner, X)
    base = Wanda().prune(W, stats.base, HALF)
    assert torch.equal(pruner.prune(W, stats, HALF, "model.layers.0.mlp.down_proj").mask, base.mask)
    assert not torch.equal(pruner.prune(W, stats, HALF, ATTN).mask, base.mask)
    names = {  # name: skipped under skip_layer = mlp (the reference), self_attn, no_skip
        "model.layers.0.self_attn.q_proj": (False, True, False),
        "model.layers.0.mlp.gate_proj": (True, False, False),
        "model.decoder.layers.1.self_attn.out_proj": (False, True, False),
        "model.decoder.layers.1.fc1": (True, False, False),
    }
    for name, expected in names.items():
        got = tuple(DSnoT(base=Wanda(), skip_layer=s).skipped(name) for s in ("mlp", "self_attn", "no_skip"))
        assert got == expected, name
        by_name = DSnoT(base=Wanda(), skip_layer="no_skip", skip_sub_layer="q_proj").skipped(name)
        assert by_name is name.endswith("q_proj"), name
    assert not DSnoT(base=Wanda()).skipped("")
    assert torch.equal(DSnoT(base=Wanda(), max_cycle_time=0).prune(W, stats, HALF, ATTN).mask, base.mask)


class _WithPrepare:
    """A base pruner with the model-level hook: its ``prune`` records the ``extra`` it got."""

    needs_calibration = False

    def __init__(self):
        self.seen = []

    def collector(self, in_features, device):
        return None

    def prepare(self, model, calib, layers, *, device, batch_size):
        return {name: torch.full((1,), 7.0) for name in layers}

    def prune(self, weight, stats, spec, name="", extra=None):
        self.seen.append(extra)
        return Magnitude(group="row").prune(weight, stats, spec, name)


def test_dsnot_forwards_prepare_and_extra():
    base = _WithPrepare()
    pruner = DSnoT(base=base)
    assert pruner.prepare == base.prepare
    assert set(pruner.prepare(None, None, {"a": None}, device="cpu", batch_size=1)) == {"a"}
    W, X = _mean_dominated()
    stats = _stats(pruner, X)
    assert stats.base is None  # the base needs no statistics; DSnoT's own are still collected
    extra = torch.ones(3)
    pruner.prune(W, stats, HALF, ATTN, extra=extra)
    assert base.seen == [extra]
    assert getattr(DSnoT(base=Wanda()), "prepare", None) is None  # the hook exists only where the base has one
    assert not hasattr(DSnoT(base=Wanda()), "prepare")


def test_dsnot_base_from_a_config_mapping():
    pruner = DSnoT(base={"_target_": "sds_exp.pruners.wanda.Wanda", "group": "row"})
    assert isinstance(pruner.base, Wanda)


def test_bad_settings_name_the_key():
    for a in (0, 2.5, -1):
        with pytest.raises(ValueError, match=rf"pruner\.a={a}: .*\(0, 2\]"):
            RIA(a=a)
    RIA(a=2)
    with pytest.raises(ValueError, match=r"pruner\.group='block'"):
        RIA(group="block")
    with pytest.raises(ValueError, match=r"pruner\.iterations=0: must be an integer >= 1"):
        ADMM(iterations=0)
    with pytest.raises(ValueError, match=r"pruner\.iterative_prune=30: .*0 \.\. pruner\.iterations=20"):
        ADMM(iterative_prune=30)
    with pytest.raises(ValueError, match=r"pruner\.matrix_schedule='linear'"):
        ADMM(matrix_schedule="linear")
    with pytest.raises(
        ValueError, match=r"pruner\.base\._target_ is not set.*wanda \(sds_exp\.pruners\.wanda\.Wanda\)"
    ):
        DSnoT()
    with pytest.raises(ValueError, match=r"pruner\.skip_layer='attn'"):
        DSnoT(base=Wanda(), skip_layer="attn")
    with pytest.raises(ValueError, match="pruner.max_cycle_time=-1"):
        DSnoT(base=Wanda(), max_cycle_time=-1)
    for pruner in (RIA(), ADMM(), DSnoT(base=Wanda())):
        with pytest.raises(ValueError, match="needs .*calibration statistics"):
            pruner.prune(torch.ones(4, 8), None, HALF, "x")


def test_dsnot_check_config_through_validation():
    target = "sds_exp.pruners.dsnot.DSnoT"
    check_component("pruner", {"_target_": target, "base": {"_target_": "sds_exp.pruners.wanda.Wanda", "group": "row"}})
    listed = r"allowed: .*admm \(sds_exp\.pruners\.admm\.ADMM\).*ria \(sds_exp\.pruners\.ria\.RIA\).*wanda"
    bad = {
        "missing": {"_target_": target},
        "no target": {"_target_": target, "base": {"group": "row"}},
        "unknown": {"_target_": target, "base": {"_target_": "sds_exp.pruners.nope.Nope"}},
        "nested": {
            "_target_": target,
            "base": {"_target_": target, "base": {"_target_": "sds_exp.pruners.wanda.Wanda"}},
        },
    }
    for why, node in bad.items():
        with pytest.raises(ConfigError, match=r"pruner\.base\._target_") as info:
            check_component("pruner", node, None)
        assert "dsnot (" not in str(info.value), why  # DSnoT is not offered as its own base
        with pytest.raises(ConfigError, match=listed):
            check_component("pruner", node, None)
    with pytest.raises(ConfigError, match=r"pruner\.base\._target_='sds_exp\.pruners\.nope\.Nope' cannot be imported"):
        check_component("pruner", bad["unknown"], None)


@pytest.mark.parametrize("name", ["ria", "admm", "dsnot"])
def test_configs_compose_and_instantiate(compose, name):
    from hydra.utils import instantiate

    cfg = compose([f"pruner={name}"])
    check_component("pruner", cfg.pruner, cfg)
    pruner = instantiate(cfg.pruner)
    expected = {"ria": RIA(), "admm": ADMM(), "dsnot": DSnoT(base=Wanda())}[name]
    assert pruner == expected  # the YAML holds the reference defaults


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize(
    "make",
    [RIA, ADMM, partial(DSnoT, base=Wanda()), partial(DSnoT, base=SparseGPT(blocksize=16))],
    ids=["ria", "admm", "dsnot", "dsnot_sgpt"],
)
def test_tiny_sds_run_completes(family, make, request):
    from sds_exp.sds.pipeline import SDSConfig, run_sds
    from sds_exp.sds.reconstruct import ReconstructSettings
    from sds_exp.sds.stages import prunable_layers

    lm = request.getfixturevalue(family)
    calib = torch.randint(0, len(lm.tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    config = SDSConfig(reactivate=ReconstructSettings(steps=3), adjust="true", adjustment=ReconstructSettings(steps=3))
    stages = []
    result = run_sds(lm.model, calib, make(), NM24, config, batch_size=2, on_stage=lambda s, m: stages.append(s))
    assert stages == ["dense", "prune", "reactivate", "reprune", "adjust"]
    layers = prunable_layers(lm.model)
    assert set(result.masks) == set(layers)
    for name, layer in layers.items():
        assert check_nm(result.first_masks[name], 2, 4) and check_nm(result.reprune_masks[name], 2, 4), name
        assert ((layer.weight != 0) <= result.masks[name]).all()
        assert torch.isfinite(layer.weight).all()


def test_hessian_stats_unchanged_by_admm():
    W, X = _correlated()
    stats = _stats(ADMM(), X)
    assert isinstance(stats, HessianStats)
    H = stats.H.clone()
    ADMM().prune(W, stats, HALF)
    assert torch.equal(stats.H, H)
