"""The model families users bring, as tiny random models built from their transformers config classes:
block discovery, exact pruning, a short SDS run, and the families that cannot be pruned as they are (MoE)."""

import copy

import pytest
import torch
from torch import nn

from sds_exp.evaluation.sparsity import sparsity_report
from sds_exp.models.blocks import (
    NoDecoderBlocksError,
    UnprunableParametersError,
    capture_block_inputs,
    check_unprunable_params,
    decoder_blocks,
    find_linears,
    run_block,
    unprunable_params,
)
from sds_exp.models.loading import tiny_causal_lm
from sds_exp.pruners.masks import check_nm
from sds_exp.pruners.sparsegpt import SparseGPT
from sds_exp.pruners.wanda import Wanda
from sds_exp.sds.pipeline import SDSConfig, run_sds
from sds_exp.sds.reconstruct import ReconstructSettings
from sds_exp.sds.sequential import collect_stats
from sds_exp.sds.stages import prunable_layers, prune_model
from sds_exp.spec import SparsitySpec

VOCAB, HIDDEN, FFN, SEQLEN = 256, 64, 128, 32
NM = SparsitySpec.parse(0.5, "2:4")
HALF = SparsitySpec(0.5)
LLAMA_LIKE = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}
# family -> (blocks path, the linear layers of one block, written out by hand from the transformers modules)
FAMILIES = {
    "llama": ("model.layers", LLAMA_LIKE),
    "opt": (
        "model.decoder.layers",
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    ),
    "qwen2": ("model.layers", LLAMA_LIKE),
    "qwen3": ("model.layers", LLAMA_LIKE),
    "mistral": ("model.layers", LLAMA_LIKE),
    "gemma3": ("model.layers", LLAMA_LIKE),
    "phi3": ("model.layers", {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}),
}
MOE = ("qwen3_moe", "mixtral")
SDS_QUICK = SDSConfig(
    reactivate=ReconstructSettings(steps=3, check_every=3), adjust="true", adjustment=ReconstructSettings(steps=3)
)


def tiny(family, layers=2, **kw):
    torch.manual_seed(0)
    model = tiny_causal_lm(
        family, VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, intermediate_size=FFN, num_key_value_heads=2, **kw
    )
    return model.eval()


def calib(n=8):
    return torch.randint(0, VOCAB, (n, SEQLEN), generator=torch.Generator().manual_seed(1))


def final_norm(model):
    return model.model.decoder.final_layer_norm if hasattr(model.model, "decoder") else model.model.norm


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_linears_per_family(family):
    model = tiny(family)
    path, blocks = decoder_blocks(model)
    want_path, per_block = FAMILIES[family]
    assert path == want_path and len(blocks) == 2
    names = set(find_linears(blocks, path))
    assert names == {f"{path}.{i}.{n}" for i in range(2) for n in per_block}
    assert unprunable_params(model) == {}  # norms, biases, embeddings: nothing the generic rule flags
    check_unprunable_params(model)
    attn = blocks[0].self_attn
    if family == "qwen2":  # biases on q/k/v only
        assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
        assert attn.o_proj.bias is None
    if family in ("qwen3", "gemma3"):  # q/k norms: modules of the block that are not pruned
        assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    if family == "phi3":  # fused: q (64) + k, v (2 heads of 16 each) rows; gate and up rows
        assert attn.qkv_proj.weight.shape == (HIDDEN + 2 * 2 * 16, HIDDEN)
        assert blocks[0].mlp.gate_up_proj.weight.shape == (2 * FFN, HIDDEN)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_stream_reproduces_the_model(family):
    model = tiny(family, **({"sliding_window": 8} if family == "gemma3" else {}))
    ids = calib(3)
    stream = capture_block_inputs(model, ids, "cpu", batch_size=2)
    for block in decoder_blocks(model)[1]:
        stream.hidden = run_block(block, stream)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(final_norm(model)(stream.hidden), ref, rtol=1e-4, atol=1e-4)
    if family == "gemma3":  # layer 1 is a full-attention layer: its own mask and RoPE table
        assert set(stream.block_kwargs) == {1}
        own, first = stream.block_kwargs[1][2], stream.kwargs[2]
        assert own["attention_mask"] is not first["attention_mask"]
        assert not torch.equal(own["position_embeddings"][0], first["position_embeddings"][0])
    else:
        assert stream.block_kwargs == {}  # every block takes the first block's arguments


def test_gemma3_block_zero_arguments_for_every_block_would_be_wrong():
    """The reason for per-block arguments: with the sliding layer's mask and RoPE the full-attention layer
    computes something else (the seqlen, 32, is longer than the window, 8)."""
    model = tiny("gemma3", sliding_window=8)
    stream = capture_block_inputs(model, calib(2), "cpu", batch_size=2)
    block = decoder_blocks(model)[1][1]
    right = run_block(block, stream)
    sl, wrong_kwargs = next(iter(stream.batches()))  # no block given: the first block's arguments
    with torch.no_grad():
        wrong = block(stream.hidden[sl], **wrong_kwargs)
    assert (right - wrong).abs().max() > 1e-2
    stranger = tiny("gemma3", sliding_window=8).model.layers[1]  # never captured: its arguments are unknown
    with pytest.raises(ValueError, match="Gemma3DecoderLayer was not a block of the model when its inputs were"):
        run_block(stranger, stream)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prune_statistics_are_those_of_the_models_own_forward(family):
    """Wanda by hand, block by block on a copy pruned so far, with the inputs of the MODEL's own forward (each
    layer with its own mask and RoPE): the pipeline's masks must be the same."""
    model = tiny(family, sliding_window=8) if family == "gemma3" else tiny(family)
    ref, ids = copy.deepcopy(model), calib()
    masks = prune_model(model, ids, Wanda(), HALF, batch_size=4)
    path, blocks = decoder_blocks(ref)
    wrong, sq = [], {}

    def keep(name, x):
        sq[name] = sq.get(name, 0) + x.double().pow(2).sum((0, 1))  # ||X_j||^2 over all calibration tokens

    for i, block in enumerate(blocks):
        layers = find_linears(block, f"{path}.{i}")
        sq.clear()
        hooks = [lin.register_forward_hook(lambda m, a, o, n=n: keep(n, a[0])) for n, lin in layers.items()]
        with torch.no_grad():
            ref(ids)
        for h in hooks:
            h.remove()
        for name, lin in layers.items():
            score = lin.weight.detach().double().abs() * sq[name].sqrt()
            mask = torch.ones_like(score, dtype=torch.bool)
            mask.scatter_(1, score.argsort(dim=1, stable=True)[:, : score.shape[1] // 2], False)  # lowest half per row
            lin.weight.data *= mask
            if not torch.equal(mask, masks[name]):
                wrong.append(name)
    assert wrong == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruner", [Wanda(), SparseGPT(blocksize=32)], ids=["wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", [HALF, NM], ids=["50%", "2:4"])
def test_prune_gives_the_exact_sparsity(family, pruner, spec):
    model = tiny(family)
    masks = prune_model(model, calib(), pruner, spec, batch_size=4)
    layers = prunable_layers(model)
    assert set(masks) == set(layers)
    for name, layer in layers.items():
        mask, w = masks[name], layer.weight
        assert (w[~mask] == 0).all(), name
        assert int((~mask).sum()) == mask.numel() // 2, name
        if spec.structured:
            assert check_nm(mask, 2, 4), name
        elif isinstance(pruner, Wanda):  # per output row, as the reference
            assert (~mask).sum(1).eq(mask.shape[1] // 2).all(), name
    report = sparsity_report(layers, masks)
    assert report["actual"] == pytest.approx(0.5, abs=1e-6) and report["mask"] == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_short_sds_keeps_the_masks(family):
    model = tiny(family)
    result = run_sds(model, calib(), Wanda(), NM, SDS_QUICK, batch_size=4)
    layers = prunable_layers(model)
    assert set(result.masks) == set(layers)
    for name, layer in layers.items():
        assert check_nm(result.masks[name], 2, 4), name
        assert (layer.weight[~result.masks[name]] == 0).all(), name


def test_phi3_fused_layers_equal_their_parts():
    """N:M groups run along input columns and every output row is pruned on its own (Wanda; SparseGPT N:M),
    so pruning the fused qkv_proj equals pruning its q, k and v row blocks separately with the one shared
    input statistic; the fused layer has exactly one input, hence one statistics object."""
    model = tiny("phi3")
    path, blocks = decoder_blocks(model)
    prefix = f"{path}.0"
    layers = find_linears(blocks[0], prefix)
    stream = capture_block_inputs(model, calib(), "cpu", batch_size=4)
    wanda_stats = collect_stats(blocks[0], layers, stream, lambda lin: Wanda().collector(lin.in_features, "cpu"))
    hessians = collect_stats(blocks[0], layers, stream, lambda lin: SparseGPT().collector(lin.in_features, "cpu"))
    assert len({id(s) for s in wanda_stats.values()}) == 4  # qkv, o, gate_up, down: four inputs, four objects
    qkv = f"{prefix}.self_attn.qkv_proj"
    weight = layers[qkv].weight.detach()
    parts = (slice(0, HIDDEN), slice(HIDDEN, HIDDEN + 32), slice(HIDDEN + 32, HIDDEN + 64))  # q, k, v rows
    for pruner, stats, spec in [
        (Wanda(), wanda_stats, NM),
        (Wanda(), wanda_stats, HALF),
        (SparseGPT(blocksize=32), hessians, NM),
    ]:
        fused = pruner.prune(weight, stats[qkv], spec, qkv)
        split = [pruner.prune(weight[rows], stats[qkv], spec, qkv) for rows in parts]
        assert torch.equal(fused.mask, torch.cat([r.mask for r in split])), (pruner, spec)
        torch.testing.assert_close(fused.weight, torch.cat([r.weight for r in split]), rtol=1e-5, atol=1e-6)


def test_fused_layer_not_divisible_by_m_is_named():
    model = tiny("phi3")
    bad = SparsitySpec.parse(1 - 2 / 3, "2:3")  # in_features 64 is not a multiple of 3
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.qkv_proj has in_features=64, not divis"):
        prune_model(model, calib(), Wanda(), bad, ignore=["*.self_attn.o_proj"])


def test_no_decoder_blocks_names_the_class_and_the_tree_top():
    class Bespoke(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(8, 4)
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.head = nn.Linear(4, 8)

    with pytest.raises(NoDecoderBlocksError) as err:
        decoder_blocks(Bespoke())
    message = str(err.value)
    assert message.startswith("Bespoke has no recognisable decoder blocks")
    assert "Top of its module tree: embed: Embedding, body: Sequential {0: Linear, 1: ReLU}, head: Linear" in message


# --- MoE: fused 3-D experts and routers are not nn.Linear ---------------------------------------------------


@pytest.mark.parametrize("family", MOE)
def test_moe_fused_experts_are_refused_by_name(family):
    model = tiny(family)
    found = unprunable_params(model)
    experts = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert set(found) == set(experts + routers)
    expert_ffn = {"mixtral": FFN, "qwen3_moe": FFN // 2}[family]  # Qwen3-MoE: moe_intermediate_size
    assert tuple(found["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 2 * expert_ffn, HIDDEN)
    assert tuple(found["model.layers.0.mlp.gate.weight"].shape) == (4, HIDDEN)  # the router: not an nn.Linear
    cls = type(model).__name__
    with pytest.raises(UnprunableParametersError, match=rf"^{cls}: 6 parameters of the decoder blocks") as err:
        check_unprunable_params(model)
    message = str(err.value)
    assert "model.layers.0.mlp.experts.gate_up_proj (4, " in message and "(2 more)" in message
    assert 'ignore=["*.mlp.experts", "*.mlp.gate"]' in message
    assert "per-expert pruning is not implemented" in message
    with pytest.raises(UnprunableParametersError, match=rf"^{cls}: 2 parameters") as err:  # the routers remain
        check_unprunable_params(model, ["*.mlp.experts"])
    assert "model.layers.0.mlp.gate.weight (4, 64)" in str(err.value)
    assert 'ignore=["*.mlp.experts", "*.mlp.gate"]' in str(err.value)
    check_unprunable_params(model, ["*.mlp.experts", "*.mlp.gate"])
    check_unprunable_params(model, ["*.mlp.experts*", "*.mlp.gate.weight"])  # patterns on parameter names also


@pytest.mark.parametrize("family", MOE)
def test_moe_with_experts_ignored_prunes_the_rest_exactly(family):
    ignore = ["*.mlp.experts", "*.mlp.gate"]
    model = tiny(family)
    dense = copy.deepcopy(model)
    check_unprunable_params(model, ignore)
    masks = prune_model(model, calib(), Wanda(), HALF, batch_size=4, ignore=ignore)
    attention = {f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "qkvo"}
    assert set(masks) == attention  # nothing else is an nn.Linear of the blocks
    report = sparsity_report(prunable_layers(model, ignore), masks)
    assert report["actual"] == pytest.approx(0.5, abs=1e-6)  # over what was asked: the attention layers
    for name in unprunable_params(model):  # experts and routers untouched
        assert torch.equal(model.get_parameter(name), dense.get_parameter(name)), name
    result = run_sds(tiny(family), calib(), Wanda(), NM, SDS_QUICK, batch_size=4, ignore=ignore)
    assert set(result.masks) == attention
    assert all(check_nm(m, 2, 4) for m in result.masks.values())
