"""Pruner-Zero: the released score, its masks, the gradient statistic and the prepare hook in the stages."""

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import sds_exp.pruners.pruner_zero as pz
from sds_exp.pruners.base import RowNormStats
from sds_exp.pruners.gradients import gradient_stats
from sds_exp.pruners.masks import check_nm
from sds_exp.pruners.pruner_zero import PrunerZero, pruner_zero_scores
from sds_exp.sds.pipeline import SDSConfig, run_sds
from sds_exp.sds.reconstruct import ReconstructSettings
from sds_exp.sds.stages import prunable_layers, prune_model
from sds_exp.spec import SparsitySpec

HALF = SparsitySpec(0.5)
NM24 = SparsitySpec.parse(0.5, "2:4")
NM48 = SparsitySpec.parse(0.5, "4:8")


def _layer(out=8, inp=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    G = torch.rand(out, inp, generator=g) * 3 + 0.5  # a positive gradient norm, min 0.5 -> mms hits 0 once
    X = torch.rand(inp, generator=g) * 10  # activation norms^2 (the score must not read them)
    return W, G, X


def _stats(scaler_row):
    stats = RowNormStats(scaler_row.numel())
    stats.scaler_row, stats.nsamples = scaler_row, 1
    return stats


def _calib(tok, n=8, seqlen=32, seed=1):
    return torch.randint(0, len(tok), (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_score_is_the_released_tree_by_hand_on_8x16():
    W, G, _ = _layer()
    w, g = W.tolist(), G.tolist()
    lo, hi = min(min(r) for r in g), max(max(r) for r in g)
    # mul(abs(mul(W, W)), mms(G)); the reference feeds |W| to the tree, which changes nothing here
    hand = torch.tensor([[abs(w[i][j] * w[i][j]) * (g[i][j] - lo) / (hi - lo) for j in range(16)] for i in range(8)])
    torch.testing.assert_close(pruner_zero_scores(W, G), hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(pruner_zero_scores(W.abs(), G), hand, rtol=1e-6, atol=0)
    # the reference's unstructured rule: per row, the first int(16 * 0.5) indices of a stable ascending sort
    idx = torch.sort(hand, dim=-1, stable=True).indices[:, :8]
    ref = torch.ones(8, 16, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(PrunerZero().prune(W, None, HALF, extra=G).mask, ref)


def test_gradient_changes_the_choice_and_activations_do_not():
    W = torch.tensor([[1.0, -2, 3, -4]])
    G = torch.tensor([[3.0, 2, 1, 0]])  # mms -> 1, 2/3, 1/3, 0: scores 1, 8/3, 3, 0
    torch.testing.assert_close(pruner_zero_scores(W, G), torch.tensor([[1.0, 8 / 3, 3, 0]]))
    res = PrunerZero().prune(W, None, HALF, extra=G)
    assert (~res.mask[0]).nonzero().flatten().tolist() == [0, 3]  # magnitude alone would prune 0, 1
    torch.testing.assert_close(res.weight, torch.tensor([[0.0, -2, 3, 0]]))
    W, G, X = _layer()
    a = PrunerZero().prune(W, _stats(X), HALF, extra=G).mask
    b = PrunerZero().prune(W, _stats(X.flip(0) * 100), HALF, extra=G).mask
    assert torch.equal(a, b)


@pytest.mark.parametrize("group", ["row", "matrix"])
def test_unstructured_counts_and_no_mutation(group):
    W, G, _ = _layer()
    W_before, G_before = W.clone(), G.clone()
    res = PrunerZero(group=group).prune(W, None, HALF, extra=G)
    assert torch.equal(W, W_before) and torch.equal(G, G_before)
    assert res.weight.dtype == torch.float32 and res.mask.dtype == torch.bool
    torch.testing.assert_close(res.weight, W * res.mask)
    if group == "row":
        assert (~res.mask).sum(1).eq(8).all()
    else:
        assert int((~res.mask).sum()) == 64
        scores = pruner_zero_scores(W, G)
        assert scores[~res.mask].max() <= scores[res.mask].min()  # the 64 globally lowest


@pytest.mark.parametrize("spec, n, m", [(NM24, 2, 4), (NM48, 4, 8)])
def test_nm_holds_in_every_group(spec, n, m):
    W, G, _ = _layer()
    res = PrunerZero().prune(W, None, spec, extra=G)
    assert check_nm(res.mask, n, m)
    scores = pruner_zero_scores(W, G).reshape(8, 16 // m, m)
    kept = res.mask.reshape(8, 16 // m, m)
    # in every group the kept scores are the n largest
    assert (scores.masked_fill(~kept, math.inf).amin(-1) >= scores.masked_fill(kept, -math.inf).amax(-1)).all()


def test_prune_without_gradients_raises_and_a_constant_one_falls_back_to_magnitude(caplog):
    W, G, _ = _layer()
    with pytest.raises(ValueError, match=r"Pruner-Zero needs gradients from prepare\(\) for layer L"):
        PrunerZero().prune(W, None, HALF, name="L")
    with pytest.raises(ValueError, match="layer L: the gradient statistic is not finite"):
        PrunerZero().prune(W, None, HALF, name="L", extra=G.masked_fill(G > 3, math.nan))
    with caplog.at_level("WARNING"):
        res = PrunerZero().prune(W, None, HALF, name="L", extra=torch.zeros_like(G))
    assert "layer L: constant gradient statistic" in caplog.text
    idx = torch.sort(W.square(), dim=-1, stable=True).indices[:, :8]
    assert torch.equal(res.mask, torch.ones(8, 16, dtype=torch.bool).scatter_(1, idx, False))
    with pytest.raises(ValueError, match="the gradient statistic is constant"):
        pz.min_max_scale(torch.ones(3))
    with pytest.raises(ValueError, match="gradient statistic \\(4, 4\\) != weight \\(8, 16\\)"):
        PrunerZero().prune(W, None, HALF, extra=torch.ones(4, 4))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="pruner_zero group='col'; allowed: 'row', 'matrix'"):
        PrunerZero(group="col")
    with pytest.raises(ValueError, match="pruner_zero grad_norm='l3'; allowed: l2, l1"):
        PrunerZero(grad_norm="l3")
    with pytest.raises(ValueError, match="pruner_zero grad_batch_size=0; allowed"):
        PrunerZero(grad_batch_size=0)


def _hand_gradients(model, calib, norm="l2"):
    """The reference loop: one window per backward with transformers' own loss, squares summed in fp32."""
    ref = copy.deepcopy(model).eval()
    layers = prunable_layers(ref)
    acc = {name: torch.zeros(lin.weight.shape) for name, lin in layers.items()}
    for i in range(calib.shape[0]):
        ref.zero_grad(set_to_none=True)
        ref(input_ids=calib[i : i + 1], labels=calib[i : i + 1]).loss.backward()
        for name, lin in layers.items():
            g = lin.weight.grad.float()
            acc[name] += g.square() if norm == "l2" else g.abs()
    return {name: a.sqrt() if norm == "l2" else a for name, a in acc.items()}


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_gradients_equal_a_hand_written_autograd_loop(family, norm, request):
    lm = request.getfixturevalue(family)
    model = lm.model
    calib = _calib(lm.tokenizer, n=5, seqlen=12)
    expected = _hand_gradients(model, calib, norm)
    # a state to leave untouched: mixed requires_grad flags, one stale .grad, train mode
    params = dict(model.named_parameters())
    for i, p in enumerate(params.values()):
        p.requires_grad_(i % 2 == 0)
    stale_name = next(n for n, p in params.items() if p.requires_grad)
    stale = torch.ones_like(params[stale_name])
    params[stale_name].grad = stale
    flags = {n: p.requires_grad for n, p in params.items()}
    weights = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    layers = prunable_layers(model)
    with torch.no_grad():  # as inside prune_model
        got = gradient_stats(model, calib, layers, batch_size=2, norm=norm)  # 2 + 2 + 1 windows
    assert set(got) == set(layers)
    for name, g in got.items():
        assert g.dtype == torch.float32 and g.device.type == "cpu" and g.shape == layers[name].weight.shape
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-5 * float(expected[name].abs().max()))
        assert g.gt(0).float().mean() > 0.5, name
    assert model.training and all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
        assert p.requires_grad == flags[name], name
        assert (p.grad is stale) if name == stale_name else p.grad is None, name


def test_integer_parameter_is_refused_before_any_forward(tiny_llama):
    model = tiny_llama.model
    up = model.model.layers[0].mlp.up_proj
    up.register_parameter("qzeros", nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.qzeros \(torch\.int8\).*Allowed: floating"):
        PrunerZero().prepare(
            model, _calib(tiny_llama.tokenizer, n=2), prunable_layers(model), device="cpu", batch_size=1
        )
    assert calls == []


def test_check_config_dtype(monkeypatch):
    node = {"_target_": "sds_exp.pruners.pruner_zero.PrunerZero"}
    for dtype in ("float32", "bfloat16", "float16"):  # float16 backward works on CPU in torch >= 2.1
        PrunerZero.check_config(node, OmegaConf.create({"dtype": dtype, "device": "cpu"}), "pruner")
    PrunerZero.check_config(node, None, "pruner")
    with pytest.raises(ValueError, match=r"pruner\._target_=sds_exp.*dtype='int8' is not a floating-point"):
        PrunerZero.check_config(node, OmegaConf.create({"dtype": "int8", "device": "cpu"}), "pruner")
    monkeypatch.setattr(pz, "_autograd_error", lambda dtype, device: "RuntimeError: not implemented for 'Half'")
    with pytest.raises(ValueError, match=r"dtype=float16 has no working backward on device=cpu \(RuntimeError"):
        PrunerZero.check_config(node, OmegaConf.create({"dtype": "float16", "device": "cpu"}), "pruner")


def test_yaml_instantiates_with_reference_defaults(compose):
    from hydra.utils import instantiate

    from sds_exp.validation import check_component

    cfg = compose(["pruner=pruner_zero", "dtype=float16"])
    check_component("pruner", cfg.pruner, cfg)
    pruner = instantiate(cfg.pruner)
    assert pruner == PrunerZero(group="row", grad_norm="l2", grad_batch_size=None, grad_nsamples=None)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("spec", [HALF, NM24])
def test_prune_model_uses_gradients_of_the_dense_model(family, spec, request):
    lm = request.getfixturevalue(family)
    model, calib = lm.model, _calib(lm.tokenizer)
    dense = copy.deepcopy(model)
    expected_G = gradient_stats(dense, calib, prunable_layers(dense), batch_size=8)
    masks = prune_model(model, calib, PrunerZero(grad_batch_size=3), spec, batch_size=4)
    layers, dense_layers = prunable_layers(model), prunable_layers(dense)
    assert set(masks) == set(layers)
    for name, mask in masks.items():
        ref = PrunerZero().prune(dense_layers[name].weight, None, spec, name, extra=expected_G[name]).mask
        assert torch.equal(mask, ref), name  # each layer got its own G, from the dense model
        assert check_nm(mask, 2, 4) if spec.structured else (~mask).sum(1).eq(mask.shape[1] // 2).all()
        assert ((layers[name].weight != 0) <= mask).all()


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt"])
def test_run_sds_recomputes_gradients_on_the_reactivated_model(family, request, monkeypatch):
    lm = request.getfixturevalue(family)
    model = lm.model
    seen = []
    original = PrunerZero.prepare

    def spy(self, model, calib, layers, **kw):
        seen.append(float(torch.cat([lin.weight.eq(0).flatten() for lin in layers.values()]).float().mean()))
        return original(self, model, calib, layers, **kw)

    monkeypatch.setattr(PrunerZero, "prepare", spy)
    config = SDSConfig(reactivate=ReconstructSettings(steps=3), adjust="false")
    result = run_sds(model, _calib(lm.tokenizer), PrunerZero(), NM24, config, batch_size=4)
    assert len(seen) == 2 and seen[0] == 0.0 and seen[1] < 0.1  # dense, then re-activated (not the pruned model)
    for name, layer in prunable_layers(model).items():
        assert check_nm(result.masks[name], 2, 4), name
        assert ((layer.weight != 0) <= result.masks[name]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_track_fp32(tiny_llama, dtype):
    """fp16 (the reference's dtype) and bf16 backward passes run on CPU and give nearly the fp32 statistic."""
    calib = _calib(tiny_llama.tokenizer, n=4, seqlen=16)
    fp32 = gradient_stats(tiny_llama.model, calib, prunable_layers(tiny_llama.model), batch_size=2)
    half = copy.deepcopy(tiny_llama.model).to(dtype)
    got = gradient_stats(half, calib, prunable_layers(half), batch_size=2)
    for name, g in got.items():
        assert torch.isfinite(g).all() and g.dtype == torch.float32, name
        corr = torch.corrcoef(torch.stack([g.flatten(), fp32[name].flatten()]))[0, 1]
        assert corr > 0.99, (name, float(corr))
