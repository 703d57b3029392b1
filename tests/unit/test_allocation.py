"""Layer-wise sparsity allocation: OWL against a hand computation of the reference formula, ratio files,
rounding to whole weights, and the config checks before and after the model loads."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from sds_exp import provenance
from sds_exp.allocation import OWL, FileAllocation, Uniform, layer_specs, snap_to_rows, weighted_mean
from sds_exp.allocation.owl import outlier_ratio, owl_block_ratios
from sds_exp.api import Recipe, prune
from sds_exp.pruners.masks import sparsity_of
from sds_exp.pruners.wanda import Wanda
from sds_exp.sds.pipeline import SDSConfig, run_sds
from sds_exp.sds.reconstruct import ReconstructSettings
from sds_exp.sds.stages import prunable_layers
from sds_exp.spec import SparsitySpec
from sds_exp.validation import ConfigError, validate_config, validate_loaded

HALF = SparsitySpec(0.5)


@pytest.fixture
def llama4(data_dir):
    """A seeded tiny LLaMA with 4 blocks (q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64)."""
    from sds_exp.models.loading import build_tiny

    return build_tiny(
        "llama",
        data_dir=data_dir,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        seed=0,
    )


def _calib(tok, n=8, seqlen=32, seed=1):
    return torch.randint(0, len(tok), (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _write(tmp_path, entries, name="ratios.yaml"):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(entries))
    else:
        path.write_text("".join(f"{json.dumps(k)}: {v}\n" for k, v in entries.items()))
    return path


# ---------------------------------------------------------------- OWL against the reference formula, by hand


def _hand_owl(model, calib, M, lamda, target):
    """OWL's block sparsities, written from luuyin/OWL prune_wanda_outlier: one full dense forward with hooks."""
    inputs: dict[str, list[torch.Tensor]] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, _n=n: inputs.setdefault(_n, []).append(a[0].detach()))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    outliers = []
    for b in range(model.config.num_hidden_layers):
        scores = []
        for n, m in linears.items():
            if n.startswith(f"model.layers.{b}."):
                x = torch.cat(inputs[n]).float()  # (nseq, tokens, in)
                scaler_row = x.pow(2).sum(dim=(0, 1)) / x.shape[0]  # ||X_j||^2 summed over tokens, mean over sequences
                scores.append((m.weight.abs() * scaler_row.sqrt()).flatten())
        s = torch.cat(scores)
        outliers.append((s > M * s.mean()).sum().item() / s.numel() * 100)  # check_outlier_mean
    lo, hi = min(outliers), max(outliers)
    scaled = [(d - lo) / (hi - lo) * lamda * 2 for d in outliers]
    density = [v - sum(scaled) / len(scaled) + (1 - target) for v in scaled]
    return outliers, [1 - d for d in density]


def test_owl_ratios_equal_the_reference_formula_by_hand(llama4):
    model, calib = llama4.model, _calib(llama4.tokenizer)
    layers = prunable_layers(model)
    outliers, expected = _hand_owl(model, calib, M=3, lamda=0.08, target=0.6)
    assert len(set(outliers)) > 2  # a spread the min-max scaling has to place
    got = OWL(hyper_m=3, lamda=0.08, rounding="floor").ratios(model, calib, layers, SparsitySpec(0.6), batch_size=8)
    for b, r in enumerate(expected):
        block = {n: v for n, v in got.items() if n.startswith(f"model.layers.{b}.")}
        assert len(block) == 7 and all(v == pytest.approx(r, abs=1e-9) for v in block.values())
    assert sum(expected) / 4 == pytest.approx(0.6)
    assert max(expected) - min(expected) == pytest.approx(0.16)  # 2 * lamda wide
    assert expected.index(min(expected)) == outliers.index(max(outliers))  # most outliers: fewest pruned
    # rounding="target": whole weights per row, each layer within 1/in of its block's ratio, total on target
    snapped = OWL(hyper_m=3, lamda=0.08).ratios(model, calib, layers, SparsitySpec(0.6), batch_size=8)
    total = sum(lin.weight.numel() for lin in layers.values())
    pruned = 0
    for name, lin in layers.items():
        rows, cols = lin.weight.shape
        assert abs(snapped[name] - got[name]) < 1 / cols
        pruned += rows * int(cols * snapped[name])
    assert abs(pruned - 0.6 * total) <= 32  # half the largest row count (64) at most


def test_owl_leaves_the_model_as_it_found_it(llama4):
    model = llama4.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    OWL(hyper_m=3).ratios(model, _calib(llama4.tokenizer), prunable_layers(model), HALF, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_owl_outlier_cache_reuses_the_dense_pass_for_the_same_model_only(llama4, tmp_path, monkeypatch):
    import sds_exp.allocation.owl as owl_mod

    model, calib = llama4.model, _calib(llama4.tokenizer)
    layers = prunable_layers(model)
    fresh = OWL(hyper_m=3).ratios(model, calib, layers, SparsitySpec(0.6), batch_size=4)
    cached = OWL(hyper_m=3, cache_dir=str(tmp_path))
    assert cached.ratios(model, calib, layers, SparsitySpec(0.6), batch_size=4) == fresh  # miss: computed, stored
    passes = []
    real = owl_mod.block_outlier_ratios
    monkeypatch.setattr(owl_mod, "block_outlier_ratios", lambda *a, **k: passes.append(1) or real(*a, **k))
    # another target reuses the dense pass: the outlier ratios do not depend on it
    other = cached.ratios(model, calib, layers, SparsitySpec(0.7), batch_size=4)
    assert other == OWL(hyper_m=3).ratios(model, calib, layers, SparsitySpec(0.7), batch_size=4)
    assert len(passes) == 1  # only the uncached OWL ran the pass
    # a different M, other calibration ids, or one changed weight: a new pass, not the stored ratios
    OWL(hyper_m=4, cache_dir=str(tmp_path)).ratios(model, calib, layers, HALF, batch_size=4)
    cached.ratios(model, _calib(llama4.tokenizer, seed=2), layers, HALF, batch_size=4)
    with torch.no_grad():
        layers["model.layers.1.mlp.up_proj"].weight[0, 0] += 1e-3
    cached.ratios(model, calib, layers, HALF, batch_size=4)
    assert len(passes) == 4
    assert len(json.loads((tmp_path / owl_mod.CACHE_FILE).read_text())) == 4


def test_owl_block_ratios_and_outlier_ratio_by_hand():
    # outliers 1,2,3,5 -> min-max scaled into [0, 2*0.1]: 0, .05, .1, .2; mean .0875; sparsity = .5 - (s - mean)
    assert owl_block_ratios([1, 2, 3, 5], 0.5, 0.1) == pytest.approx([0.5875, 0.5375, 0.4875, 0.3875])
    assert owl_block_ratios([4, 4, 4], 0.7, 0.08) == [0.7, 0.7, 0.7]  # no spread: uniform
    # weighted by block size: the parameter-weighted mean stays on the target
    r = owl_block_ratios([1, 3], 0.5, 0.1, weights=[3, 1])
    assert r == pytest.approx([0.55, 0.35]) and (3 * r[0] + r[1]) / 4 == pytest.approx(0.5)  # mean .05, not .1
    # pooled over tensors: mean of (1,1,1,1,10) is 2.8, 3 x 2.8 = 8.4, one of five above
    assert outlier_ratio([torch.ones(2, 2), torch.tensor([10.0])], 3) == pytest.approx(20.0)
    assert outlier_ratio([torch.ones(2, 2), torch.tensor([10.0])], 4) == 0.0  # 10 > 11.2 is false


def test_owl_raises_when_a_block_would_leave_0_1(llama4, monkeypatch):
    # the released code scales into [0, 2 lamda] and shifts by the mean: outliers 0, 1, 1, 1 -> scaled 0, .88, .88,
    # .88 (mean .66) -> block 0 at 0.45 + 0.66 >= 1, although 0.45 +- 0.44 passes the check before loading
    layers = prunable_layers(llama4.model)
    blocks = [(f"model.layers.{b}", [n for n in layers if f".{b}." in n], d) for b, d in enumerate([0, 1, 1, 1])]
    monkeypatch.setattr("sds_exp.allocation.owl.block_outlier_ratios", lambda *a, **k: blocks)
    OWL(lamda=0.44).check_spec(SparsitySpec(0.45))
    with pytest.raises(
        ValueError, match=r"allocation\.lamda=0\.44: block model\.layers\.0 .* 1\.1100, outside \[0, 1\)"
    ):
        OWL(lamda=0.44).ratios(llama4.model, None, layers, SparsitySpec(0.45))


# ---------------------------------------------------------------- overall sparsity through the pipeline


@pytest.mark.parametrize("kind", ["owl", "file"])
def test_overall_sparsity_hits_the_target(kind, llama4, tmp_path):
    model, calib = llama4.model, _calib(llama4.tokenizer)
    if kind == "owl":
        allocation = OWL(hyper_m=3, lamda=0.1)
    else:  # ratios the pruners would floor: 0.63 * 32 = 20.16 per row
        path = _write(tmp_path, {"model.layers.0": 0.37, "model.layers.3": 0.63})
        allocation = FileAllocation(str(path))
    recipe = Recipe(pruner=Wanda(), spec=HALF, sds=SDSConfig(redense=False), allocation=allocation)
    report = prune(model, calib, recipe, batch_size=4)
    layers = prunable_layers(model)
    total = sum(lin.weight.numel() for lin in layers.values())
    pruned = sum(int((~m).sum()) for m in report.masks.values())
    assert report.summary["sparsity/overall"] == pytest.approx(pruned / total)
    assert abs(report.summary["sparsity/overall"] - 0.5) <= 1e-3
    assert report.summary["sparsity/target"] == 0.5
    assert report.summary["sparsity/allocation/max"] > report.summary["sparsity/allocation/min"]
    targets = report.layers["target"]
    assert set(targets) == {f"layer/{n}" for n in layers}
    for name, lin in layers.items():  # every layer within one weight per row of its target
        assert abs(report.layers["sparsity"][f"layer/{name}"] - targets[f"layer/{name}"]) < 1 / lin.in_features


def test_floor_rounding_is_the_references_int(llama4, tmp_path):
    path = _write(tmp_path, {"model.layers.0": 0.37, "model.layers.3": 0.63})
    allocation = FileAllocation(str(path), rounding="floor")
    recipe = Recipe(pruner=Wanda(), spec=SparsitySpec(0.5), sds=SDSConfig(redense=False), allocation=allocation)
    report = prune(llama4.model, _calib(llama4.tokenizer), recipe, batch_size=4)
    for name, mask in report.masks.items():
        ratio = 0.37 if ".layers.0." in name else 0.63 if ".layers.3." in name else 0.5
        assert int((~mask[0]).sum()) == int(mask.shape[1] * ratio)  # per row, as Wanda's reference prunes
    assert report.summary["sparsity/overall"] < 0.5


def test_sds_reuses_or_recomputes_the_ratios(tiny_llama):
    model, calib = tiny_llama.model, _calib(tiny_llama.tokenizer)
    config = SDSConfig(reactivate=ReconstructSettings(steps=2), adjust="false")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_sds(model, calib, Wanda(), HALF, config, batch_size=4, allocation=OWL(hyper_m=3, lamda=0.1))
    ratios = {n: e["ratio"] for n, e in result.reports["allocation"].items()}
    assert "allocation_reprune" not in result.reports
    for name, mask in result.reprune_masks.items():  # the re-prune at the first round's ratio, layer by layer
        assert sparsity_of(mask) == sparsity_of(result.first_masks[name])
        assert abs(sparsity_of(mask) - ratios[name]) < 1 / mask.shape[1]
    model.load_state_dict(dense)
    result = run_sds(
        model, calib, Wanda(), HALF, config, batch_size=4, allocation=OWL(hyper_m=3, lamda=0.1, reprune="recompute")
    )
    assert set(result.reports["allocation_reprune"]) == set(ratios)


# ---------------------------------------------------------------- ratio files


def test_file_first_match_wins_and_default(tiny_llama, tmp_path):
    layers = prunable_layers(tiny_llama.model)
    # block 0: mlp (6144 weights) at 0.625, attention (3072) at 0.25 -> 0.5 on average; block 1 at the default
    entries = {"model.layers.0.mlp.*": 0.625, "model.layers.0": 0.25}
    for name in ("ratios.yaml", "ratios.json"):
        got = FileAllocation(str(_write(tmp_path, entries, name)), rounding="floor").resolve(layers, HALF)
        for n in layers:
            assert got[n] == (0.625 if ".layers.0.mlp." in n else 0.25 if ".layers.0." in n else 0.5), n
    # a default off the target: the file must balance it
    entries = {"model.layers.0": 0.25}
    got = FileAllocation(str(_write(tmp_path, entries)), default=0.75, rounding="floor").resolve(layers, HALF)
    assert {n: got[n] for n in layers} == {n: 0.25 if ".layers.0." in n else 0.75 for n in layers}


def test_file_allocation_prunes_exactly_the_named_layers(tiny_llama, tmp_path):
    entries = {"model.layers.0.mlp.*": 0.625, "model.layers.0": 0.25}
    recipe = Recipe(
        pruner=Wanda(),
        spec=HALF,
        sds=SDSConfig(redense=False),
        allocation=FileAllocation(str(_write(tmp_path, entries))),
    )
    report = prune(tiny_llama.model, _calib(tiny_llama.tokenizer), recipe, batch_size=4)
    for name, mask in report.masks.items():
        want = 0.625 if ".layers.0.mlp." in name else 0.25 if ".layers.0." in name else 0.5
        assert sparsity_of(mask) == want, name  # all multiples of 1/32: exact
    assert report.summary["sparsity/overall"] == 0.5


def test_renormalize_scales_every_ratio(tiny_llama, tmp_path):
    layers = prunable_layers(tiny_llama.model)
    path = _write(tmp_path, {"model.layers.0": 0.6, "model.layers.1": 0.9})  # averages 0.75
    with pytest.raises(ValueError, match=r"average 0\.7500 .* not sparsity=0\.5 .*renormalize=true"):
        FileAllocation(str(path)).resolve(layers, HALF)
    got = FileAllocation(str(path), renormalize=True, rounding="floor").resolve(layers, HALF)
    assert all(got[n] == pytest.approx(0.4 if ".layers.0." in n else 0.6) for n in layers)
    assert weighted_mean(got, layers) == pytest.approx(0.5)
    path = _write(tmp_path, {"model.layers.0": 0.1, "model.layers.1": 0.9})  # x 0.7 / 0.5: 0.9 -> 1.26
    with pytest.raises(ValueError, match=r"pushes entry 'model\.layers\.1' .* >= 1"):
        FileAllocation(str(path), renormalize=True).resolve(layers, SparsitySpec(0.7))


# ---------------------------------------------------------------- rounding and per-layer specs


def test_snap_to_rows_by_hand():
    layers = {"a": torch.nn.Linear(10, 4, bias=False), "b": torch.nn.Linear(10, 2, bias=False)}
    # 3.3 weights per row each: floors 3 + 3 -> 12 + 6 = 18 of round(0.33 * 60) = 20; two missing.
    # equal fractions: "a" first, but one more per row of its 4 rows overshoots (2*2 > 4 is false); "b" takes it
    got = snap_to_rows({"a": 0.33, "b": 0.33}, layers)
    assert got == {"a": (12 + 0.5) / 40, "b": (8 + 0.5) / 20}
    for name, count in (("a", 3), ("b", 4)):
        rows, cols = layers[name].weight.shape
        assert int(cols * got[name]) == count and int(rows * cols * got[name]) == rows * count
    # ratios already whole per row stay (up to the half weight)
    assert snap_to_rows({"a": 0.5, "b": 0.5}, layers) == {"a": 20.5 / 40, "b": 10.5 / 20}
    # float products that fall a hair below a whole count (0.29 * 100 = 28.999...) are not floored away
    wide = {"w": torch.nn.Linear(100, 1, bias=False)}
    assert int(100 * snap_to_rows({"w": 0.29}, wide)["w"]) == 29


def test_layer_specs():
    specs = layer_specs({"a": 0.5, "b": 0.25}, HALF)
    assert specs["a"] is HALF and specs["b"] == SparsitySpec(0.25)
    nm = SparsitySpec.parse(0.5, "2:4")
    assert layer_specs({"a": 0.5, "b": 0.5}, nm) == {"a": nm, "b": nm}
    with pytest.raises(ValueError, match=r"pattern='2:4' with a non-uniform allocation: 1 layers .* b: 0\.25"):
        layer_specs({"a": 0.5, "b": 0.25}, nm)
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"sparsity of layer b="):
            layer_specs({"a": 0.5, "b": bad}, HALF)


def test_uniform_is_the_jobs_spec(tiny_llama):
    layers = prunable_layers(tiny_llama.model)
    assert Uniform().ratios(tiny_llama.model, None, layers, HALF) == dict.fromkeys(layers, 0.5)
    assert not Uniform.needs_calibration and OWL.needs_calibration and not FileAllocation.needs_calibration


# ---------------------------------------------------------------- config: compose, build, validate


def test_configs_compose_and_build(compose, tmp_path):
    cfg = compose([])
    assert cfg.allocation._target_.endswith("Uniform")
    validate_config(cfg)
    assert isinstance(Recipe.from_config(cfg).allocation, Uniform)
    with open_dict(cfg):
        del cfg["allocation"]  # a config without the group: uniform
    assert isinstance(Recipe.from_config(cfg).allocation, Uniform)
    owl = Recipe.from_config(compose(["allocation=owl"])).allocation
    assert isinstance(owl, OWL) and (owl.hyper_m, owl.lamda, owl.reprune) == (5, 0.08, "reuse")
    assert owl.cache_dir == compose([]).paths.cache_dir  # jobs share the dense pass's outlier ratios
    path = _write(tmp_path, {"model.layers.0": 0.5})
    alloc = instantiate(compose(["allocation=file", f"allocation.path={path}"]).allocation)
    assert isinstance(alloc, FileAllocation) and alloc.entries == {"model.layers.0": 0.5}


def _bad_file(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["allocation=file"], "allocation.path is not set"),
        (["allocation=file", "allocation.path=/no/such/ratios.yaml"], "allocation.path='/no/such/ratios.yaml': "),
        (["allocation=file", "allocation.path={f1}"], "entry 'model.layers.0': 1.0 is outside [0, 1)"),
        (["allocation=file", "allocation.path={fneg}"], "entry 'model.layers.0': -0.1 is outside [0, 1)"),
        (["allocation=file", "allocation.path={fstr}"], "entry 'model.layers.0': 'half' is not a number"),
        (["allocation=file", "allocation.path={falias}"], "quote patterns that start with *"),
        (["allocation=file", "allocation.path={ftxt}"], "unknown file type '.txt'"),
        (["allocation=file", "allocation.path={flist}"], "must hold a non-empty mapping"),
        (["allocation=file", "allocation.path={fok}", "allocation.default=1.5"], "allocation.default=1.5"),
        (["allocation=file", "allocation.path={fok}", "pattern='2:4'"], "allocation=file with pattern='2:4'"),
        (["allocation=owl", "pattern='2:4'"], "allocation=owl with pattern='2:4': "),
        (["allocation=owl", "sparsity=0.95"], "allocation.lamda=0.08 with sparsity=0.95: "),
        (["allocation=owl", "sparsity=0.05"], "allocation.lamda=0.08 with sparsity=0.05: "),
        (["allocation=owl", "allocation.lamda=0.6"], "allocation.lamda=0.6: must be in [0, 0.5)"),
        (["allocation=owl", "allocation.hyper_m=0"], "allocation.hyper_m=0: must be > 0"),
        (["allocation=owl", "allocation.reprune=again"], "allocation.reprune='again'; allowed: reuse, recompute"),
        (["allocation=owl", "+allocation.lambda=0.1"], "allocation.lambda=0.1: not a setting of OWL"),
        (["allocation=owl", "allocation._target_=no.such.Thing"], "allocation._target_='no.such.Thing'"),
    ],
)
def test_bad_allocation_fails_before_the_model_loads(compose, tmp_path, overrides, message):
    files = {
        "f1": _bad_file(tmp_path, '"model.layers.0": 1.0\n'),
        "fneg": _bad_file(tmp_path, '"model.layers.0": -0.1\n', "neg.yaml"),
        "fstr": _bad_file(tmp_path, '{"model.layers.0": "half"}', "str.json"),
        "falias": _bad_file(tmp_path, "*.mlp.down_proj: 0.5\n", "alias.yaml"),
        "ftxt": _bad_file(tmp_path, "model.layers.0 0.5\n", "ratios.txt"),
        "flist": _bad_file(tmp_path, "- 0.5\n", "list.yaml"),
        "fok": _bad_file(tmp_path, '"model.layers.0": 0.5\n', "ok.yaml"),
    }
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose([o.format(**files) for o in overrides]))


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"model.layers.9.self_attn.q_proj": 0.5}, "entry 'model.layers.9.self_attn.q_proj' matches no prunable layer"),
        ({"*.fc1": 0.5}, "entry '*.fc1' matches no prunable layer"),
        ({"*.mlp.down_proj": 0.5}, "entry '*.mlp.down_proj' matches no prunable layer (layers left dense by `ignore`"),
        ({"model.layers.0": 0.5, "model.layers.0.mlp.up_proj": 0.4}, "matches only layers that earlier entries"),
        ({"model.layers.0": 0.7}, "the ratios average 0.6000 over the prunable weights"),
    ],
)
def test_bad_file_fails_once_the_layers_are_known(compose, tiny_llama, tmp_path, entries, message):
    path = _write(tmp_path, entries)
    cfg = compose(["allocation=file", f"allocation.path={path}", "ignore=[*.mlp.down_proj]"])
    validate_config(cfg)  # nothing wrong before the layers are known
    names = list(prunable_layers(tiny_llama.model, ["*.mlp.down_proj"]))
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        validate_loaded(cfg, tiny_llama.model, names)
    if "matches no" in message:  # a few real names to copy from
        assert "model.layers.0.self_attn.q_proj" in str(err.value)


def test_good_file_passes_validation(compose, tiny_llama, tmp_path):
    path = _write(tmp_path, {"model.layers.0.mlp.*": 0.625, "model.layers.0": 0.25})
    cfg = compose(["allocation=file", f"allocation.path={path}"])
    validate_config(cfg)
    validate_loaded(cfg, tiny_llama.model, list(prunable_layers(tiny_llama.model)))
    validate_loaded(compose(["allocation=owl"]), tiny_llama.model, list(prunable_layers(tiny_llama.model)))


def test_provenance_of_the_allocation_keys():
    assert provenance.first_stage_of("allocation._target_") == "prune"
    assert provenance.first_stage_of("allocation.lamda") == "prune"
    assert provenance.first_stage_of("allocation.reprune") == "reprune"
    # a checkpoint from before the group existed was uniform: it resumes under uniform, not under OWL
    old = provenance.fingerprint({"seed": 0})
    uniform = provenance.fingerprint({"seed": 0, "allocation": {"_target_": "sds_exp.allocation.uniform.Uniform"}})
    owl = provenance.fingerprint({"seed": 0, "allocation": {"_target_": "sds_exp.allocation.owl.OWL", "lamda": 0.08}})
    assert provenance.resume_differences(old, uniform, "prune") == ([], [])
    refuse, _ = provenance.resume_differences(old, owl, "prune")
    assert any(line.startswith("allocation._target_") for line in refuse)
