import copy
from functools import partial

import pytest
import torch
from torch import nn

from sds_exp.models.blocks import NoDecoderBlocksError, capture_block_inputs, decoder_blocks, run_block
from sds_exp.pruners.magnitude import Magnitude
from sds_exp.pruners.masks import check_nm
from sds_exp.pruners.sparsegpt import SparseGPT
from sds_exp.pruners.wanda import Wanda
from sds_exp.regularizers.norms import L1, L2, RegularizerSum
from sds_exp.sds.pipeline import SDSConfig, mask_overlap, run_sds
from sds_exp.sds.reconstruct import ReconstructSettings
from sds_exp.sds.stages import prunable_layers, prune_model, reactivate_model, snapshot_weights
from sds_exp.spec import SparsitySpec

NM = SparsitySpec.parse(0.5, "2:4")


def _calib(tok, n=8, seqlen=32):
    return torch.randint(0, len(tok), (n, seqlen), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt"])
def test_capture_and_block_stream_reproduce_the_model(family, request):
    lm = request.getfixturevalue(family)
    calib = _calib(lm.tokenizer, n=3)
    stream = capture_block_inputs(lm.model, calib, "cpu", batch_size=2)
    _, blocks = decoder_blocks(lm.model)
    for block in blocks:
        stream.hidden = run_block(block, stream)
    with torch.no_grad():
        ref = lm.model(calib, output_hidden_states=True).hidden_states[-1]
    # the last hidden state includes the final norm; compare after applying it
    final_norm = lm.model.model.norm if family == "tiny_llama" else lm.model.model.decoder.final_layer_norm
    torch.testing.assert_close(final_norm(stream.hidden), ref, rtol=1e-4, atol=1e-4)


def test_no_decoder_blocks_error():
    with pytest.raises(NoDecoderBlocksError, match="Sequential has no recognisable decoder blocks"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


@pytest.mark.parametrize("pruner", [Magnitude(), Wanda(), SparseGPT(blocksize=16)])
@pytest.mark.parametrize("spec", [SparsitySpec(0.5), NM])
def test_prune_model_masks_exact(tiny_llama, pruner, spec):
    model = tiny_llama.model
    masks = prune_model(model, _calib(tiny_llama.tokenizer), pruner, spec, batch_size=4)
    layers = prunable_layers(model)
    assert set(masks) == set(layers) and len(layers) == 14
    for name, mask in masks.items():
        w = layers[name].weight
        assert ((w != 0) <= mask).all()  # pruned entries are zero
        if spec.structured:
            assert check_nm(mask, 2, 4), name
        elif isinstance(pruner, Wanda):
            assert (~mask).sum(1).eq(int(mask.shape[1] * 0.5)).all()
        elif isinstance(pruner, Magnitude):
            assert int((~mask).sum()) == int(mask.numel() * 0.5)
    assert model.lm_head.weight.ne(0).all() and model.model.embed_tokens.weight.ne(0).all()


def test_ignore_and_nm_width_check(tiny_llama):
    model = tiny_llama.model
    masks = prune_model(model, _calib(tiny_llama.tokenizer), Wanda(), NM, ignore=["*.mlp.down_proj"])
    assert not any(n.endswith("down_proj") for n in masks)
    bad = SparsitySpec.parse(1 - 2 / 3, "2:3")
    with pytest.raises(
        ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj has in_features=32, not divisible by M=3"
    ):
        prune_model(model, _calib(tiny_llama.tokenizer), Wanda(), bad)


def test_prune_only_equals_plain_pruner(tiny_opt):
    a, b = tiny_opt.model, copy.deepcopy(tiny_opt.model)
    calib = _calib(tiny_opt.tokenizer)
    masks = prune_model(a, calib, SparseGPT(blocksize=16), NM, batch_size=4)
    result = run_sds(b, calib, SparseGPT(blocksize=16), NM, SDSConfig(redense=False), batch_size=4)
    for name, layer in prunable_layers(a).items():
        assert torch.equal(layer.weight, prunable_layers(b)[name].weight)
        assert torch.equal(masks[name], result.masks[name])


def test_reactivation_regrows_zeros_and_lowers_loss(tiny_llama):
    model = tiny_llama.model
    calib = _calib(tiny_llama.tokenizer)
    dense = snapshot_weights(prunable_layers(model))
    masks = prune_model(model, calib, Wanda(), NM, batch_size=4)
    pruned = copy.deepcopy(model)
    report = reactivate_model(model, calib, dense, ReconstructSettings(steps=30), None, batch_size=4)
    for name, layer in prunable_layers(model).items():
        regrown = layer.weight[~masks[name]]
        assert (regrown != 0).float().mean() > 0.9, name
        assert report[name]["loss_after"] < report[name]["loss_before"], name
    # with a penalty the optimised objective (reconstruction + penalty) goes down
    report = reactivate_model(
        pruned, calib, dense, ReconstructSettings(steps=30), RegularizerSum({"l1": L1(0.1)}), batch_size=4
    )
    assert all(r["objective_after"] < r["objective_before"] for r in report.values())


@pytest.mark.parametrize("spec", [SparsitySpec(0.5), NM])
def test_full_sds_meets_spec_and_reports(tiny_llama, spec):
    model = tiny_llama.model
    stages = []
    config = SDSConfig(
        reactivate=ReconstructSettings(steps=20),
        adjust="true",
        adjustment=ReconstructSettings(steps=20, optimizer=partial(torch.optim.Adam, lr=1e-3)),
    )
    result = run_sds(
        model,
        _calib(tiny_llama.tokenizer),
        Wanda(),
        spec,
        config,
        RegularizerSum({"l1": L1(0.1), "l2": L2(0.1)}),
        batch_size=4,
        on_stage=lambda name, m: stages.append(
            (name, float(prunable_layers(m)["model.layers.0.mlp.up_proj"].weight.eq(0).float().mean()))
        ),
    )
    assert [s for s, _ in stages] == ["dense", "prune", "reactivate", "reprune", "adjust"]
    zero_frac = dict(stages)
    assert zero_frac["dense"] == 0 and zero_frac["reactivate"] < 0.1
    assert zero_frac["prune"] == zero_frac["reprune"] == zero_frac["adjust"] == 0.5
    for name, layer in prunable_layers(model).items():
        mask = result.masks[name]
        if spec.structured:
            assert check_nm(mask, 2, 4)
        else:
            assert (~mask).sum(1).eq(mask.shape[1] // 2).all()  # row projection keeps per-row counts
        assert ((layer.weight != 0) <= mask).all()
    assert set(result.reports) == {"reactivate", "reprune"}
    assert all("loss_adjusted" in r for r in result.reports["reprune"].values())
    assert set(result.reprune_masks) == set(result.masks)  # the re-prune's own masks, before adjust moved them
    for mask in result.reprune_masks.values():
        assert check_nm(mask, 2, 4) if spec.structured else mask.float().mean() == 0.5


def test_no_redense_reprunes_the_first_mask(tiny_llama):
    # reactivate.steps=0 (the "prune -> adjust" ablation): the re-prune sees the pruned weights, keeps the
    # first mask exactly, and only the adjustment moves it
    config = SDSConfig(reactivate=ReconstructSettings(steps=0), adjust="true", adjustment=ReconstructSettings(steps=20))
    result = run_sds(tiny_llama.model, _calib(tiny_llama.tokenizer), Magnitude(), NM, config, batch_size=4)
    assert mask_overlap(result.first_masks, result.reprune_masks) == 1.0
    assert all(torch.equal(result.first_masks[n], m) for n, m in result.reprune_masks.items())
    assert 0.5 <= mask_overlap(result.first_masks, result.masks) < 1.0


def test_adjust_with_wanda_score_projection(tiny_llama):
    """adjust_score=wanda: the final masks still meet the pattern; bad values are refused by name."""
    config = SDSConfig(
        reactivate=ReconstructSettings(steps=5),
        adjust="true",
        adjust_score="wanda",
        adjustment=ReconstructSettings(steps=10, damp=0.1),
    )
    result = run_sds(tiny_llama.model, _calib(tiny_llama.tokenizer), Wanda(), NM, config, None, batch_size=4)
    for name, layer in prunable_layers(tiny_llama.model).items():
        assert check_nm(result.masks[name], 2, 4), name
        assert ((layer.weight != 0) <= result.masks[name]).all()
    assert all(r["loss_adjusted"] < r["loss_plain"] for r in result.reports["reprune"].values())
    with pytest.raises(ValueError, match="adjust_score='norm'.*magnitude, wanda"):
        SDSConfig(adjust_score="norm")


@pytest.mark.parametrize(
    "family, dtype", [("tiny_llama", torch.float32), ("tiny_opt", torch.float32), ("tiny_llama", torch.bfloat16)]
)
def test_paired_pass_per_group_equals_token_level_problem(family, dtype, request):
    """The group passes stop the forwards early and read c0 from the teacher's outputs (minus bias);
    A, P and c0 must still be those of the layer's own inputs over every calibration token."""
    from sds_exp.models.blocks import find_linears
    from sds_exp.sds.gram import GramStats
    from sds_exp.sds.sequential import dense_copy, layer_groups, paired_pass

    lm = request.getfixturevalue(family)
    lm.model.to(dtype)  # bf16: c0 must still be exact for the bf16 inputs (not from rounded outputs)
    calib = _calib(lm.tokenizer, n=5)
    xd = capture_block_inputs(lm.model, calib, "cpu", batch_size=2)
    path, blocks = decoder_blocks(lm.model)
    block, prefix = blocks[0], f"{path}.0"
    dense = {n: lin.weight.detach().clone() for n, lin in find_linears(block, prefix).items()}
    teacher = dense_copy(block, prefix, dense)
    prune_model(lm.model, calib, Magnitude(), NM)  # the student: pruned weights, perturbed inputs
    xs = xd.clone()
    xs.hidden = xs.hidden + 0.1 * torch.randn_like(xs.hidden)

    def layer_inputs(module):
        ins: dict[str, list] = {}

        def keep(name, x):
            ins.setdefault(name, []).append(x)

        hooks = [
            lin.register_forward_hook(lambda m, a, o, _n=n: keep(_n, a[0]))
            for n, lin in find_linears(module, prefix).items()
        ]
        run_block(module, xs if module is block else xd)
        for h in hooks:
            h.remove()
        return {n: torch.cat(v) for n, v in ins.items()}

    s_in, d_in = layer_inputs(block), layer_inputs(teacher)
    for group in layer_groups(block, prefix, xs):
        grams, _ = paired_pass(block, teacher, prefix, xs, xd, only=set(group))
        for name in group:
            ref = GramStats(s_in[name].shape[-1], cross=True, teacher_gram=True, dtype=torch.float64)
            ref.add(s_in[name].double(), d_in[name].double())
            want, got = ref.problem(dense[name].double()), grams.problem(name, dense[name])
            torch.testing.assert_close(got.A.double(), want.A, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.P.double(), want.P, rtol=1e-4, atol=1e-5)
            assert got.c0 == pytest.approx(want.c0, rel=1e-4)
