"""Config validation: every bad value fails fast with the key, the value and what is allowed."""

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sds_exp.data.calibration import from_ids
from sds_exp.models.blocks import decoder_blocks, find_linears
from sds_exp.models.loading import model_files_identity
from sds_exp.validation import ConfigError, normalize_ignore, validate_config, validate_loaded


def _layer_names(model, ignore):
    path, blocks = decoder_blocks(model)
    return list(find_linears(blocks, path, ignore))


def test_normalize_ignore():
    assert normalize_ignore("*.mlp.down_proj") == ["*.mlp.down_proj"]
    assert normalize_ignore(None) == []
    assert normalize_ignore(OmegaConf.create({"i": ["a*", "b"]}).i) == ["a*", "b"]
    for bad in (5, {"a": 1}, ["ok", 3]):
        with pytest.raises(ConfigError, match=r"^ignore="):
            normalize_ignore(bad)


def test_string_ignore_from_the_cli_is_one_pattern(compose, tiny_llama):
    cfg = compose(["ignore=*.mlp.down_proj"])
    assert cfg.ignore == "*.mlp.down_proj"  # what Hydra hands the app
    validate_config(cfg)
    ignore = normalize_ignore(cfg.ignore)
    assert ignore == ["*.mlp.down_proj"]
    names = _layer_names(tiny_llama.model, ignore)
    assert names and not any(n.endswith("mlp.down_proj") for n in names)
    assert any(n.endswith("self_attn.q_proj") for n in names)
    validate_loaded(cfg, tiny_llama.model, names)


def test_default_config_is_valid(compose):
    validate_config(compose())
    validate_config(compose(["model=tiny_opt", "benchmark=smoke", "pruner=magnitude"]))


BAD = [
    (["calib_batch_size=0"], "calib_batch_size=0: must be a positive integer"),
    (["calib_batch_size=abc"], "calib_batch_size='abc': must be a positive integer"),
    (["device=foo"], "device='foo': not a torch device; allowed: cpu, cuda, cuda:N, mps"),
    (["device=meta"], "device='meta': device type 'meta' is not supported"),
    (["dtype=float8"], "dtype='float8' is not supported"),
    (["pattern=124"], "pattern=124 is an integer"),
    (["nm_ties=first"], "nm_ties='first'; allowed: 'stable'"),
    (["benchmark.ppl.max_windows=0"], "benchmark.ppl.max_windows=0: must be null (all windows) or a positive"),
    (["benchmark.ppl.seqlen=1"], "benchmark.ppl.seqlen=1: must be an integer > 1"),
    (["benchmark.ppl.batch_size=0"], "benchmark.ppl.batch_size=0: must be a positive integer"),
    (["benchmark.ppl.stage_max_windows.prune=0"], "benchmark.ppl.stage_max_windows.prune=0: must be null"),
    (["benchmark.ppl.datasets=[ptb]"], "benchmark.ppl.datasets=['ptb']: 'ptb' is not known; allowed: wikitext2, c4"),
    (["benchmark.ppl.datasets=c4"], "benchmark.ppl.datasets='c4': must be a list"),
    (["data.nsamples=0"], "data.nsamples=0: must be a positive integer"),
    (["data.seqlen=1"], "data.seqlen=1: must be an integer > 1"),
    (["data=ids"], "data.path is not set"),
    (["data=ids", "data.path=/no/such/w.pt"], "data.path='/no/such/w.pt': "),
    (["resume=/no/such/run"], "resume='/no/such/run': "),
    (["model=opt125m", "model.name_or_path=./no/such/model"], "model.name_or_path='./no/such/model': "),
    (["model=saved"], "model.path is not set"),
    (["ignore=5"], "ignore=5: must be an fnmatch pattern"),
    (["+pruner.needs_calibration=false"], "pruner.needs_calibration=False: not a setting"),
    (["hist_layer=5"], "hist_layer=5: must be null, 'auto' or an fnmatch pattern"),
    (["data.pool=everything"], "data.pool='everything'; allowed: calibration, all"),
    (["pruner=ria", "pruner.a=0"], "pruner.a=0"),
    (["pruner=ria", "pruner.a=2.5"], "pruner.a=2.5"),
    (["pruner=admm", "pruner.iterations=0"], "pruner.iterations=0"),
    (["pruner=dsnot", "pruner.base._target_=sds_exp.pruners.nosuch.Pruner"], "pruner.base._target_="),
    (["pruner=dsnot", "pruner.base._target_=sds_exp.pruners.dsnot.DSnoT"], "pruner.base._target_="),
    (["pruner=wanda", "pruner._target_=sds_exp.pruners.nosuch.X"], "pruner._target_='sds_exp.pruners.nosuch.X'"),
    (["sds.reactivate.solver=newton"], "solver='newton'; allowed: iterative, closed_form"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_name_key_and_value(compose, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose(overrides))


def test_cuda_and_mps_availability(compose, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda': CUDA is not available"):
        validate_config(compose(["device=cuda"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    validate_config(compose(["device=cuda:1"]))
    with pytest.raises(ConfigError, match=r"device='cuda:2': only 2 CUDA device\(s\) are visible"):
        validate_config(compose(["device=cuda:2"]))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='mps': MPS is not available"):
        validate_config(compose(["device=mps"]))


def test_resume_needs_a_run_directory(compose, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"resume='{re.escape(str(empty))}': .*neither checkpoint/ nor metrics"):
        validate_config(compose([f"resume={empty}"]))
    (empty / "metrics.json").write_text("{}")
    validate_config(compose([f"resume={empty}"]))


def test_local_model_directory_needs_config_json(compose, tmp_path):
    folder = tmp_path / "opt"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model.name_or_path='.*opt': .* has no config.json"):
        validate_config(compose(["model=opt125m", f"model.name_or_path={folder}"]))
    (folder / "config.json").write_text("{}")
    validate_config(compose(["model=opt125m", f"model.name_or_path={folder}"]))
    validate_config(compose(["model=opt125m"]))  # a hub id is left to the hub


def test_ids_file_with_negative_ids(compose, tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.array([[1, 2, -7, 3], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"data.path='.*w.npy': smallest token id is -7; ids must be in \[0, vocab\)"):
        from_ids(path)
    with pytest.raises(ConfigError, match=r"data.path='.*w.npy': smallest token id is -7"):
        validate_config(compose(["data=ids", f"data.path={path}"]))
    with pytest.raises(ConfigError, match=r"data.path=.*holds 2 windows but data.nsamples=3"):
        validate_config(compose(["data=ids", f"data.path={path}", "data.nsamples=3"]))
    np.save(path, np.array([[1, 2, 7, 3], [0, 1, 2, 3]]))
    validate_config(compose(["data=ids", f"data.path={path}", "data.nsamples=2", "data.seqlen=4"]))


def test_validate_loaded_context_and_ignore(compose, tiny_opt):
    model = tiny_opt.model
    limit = model.config.max_position_embeddings
    names = _layer_names(model, [])
    validate_loaded(compose(), model, names)
    with pytest.raises(
        ConfigError,
        match=rf"data.seqlen={2 * limit}: longer than the model's context "
        rf"\(max_position_embeddings={limit}\)",
    ):
        validate_loaded(compose([f"data.seqlen={2 * limit}"]), model, names)
    with pytest.raises(ConfigError, match=rf"benchmark.ppl.seqlen={limit + 1}: .*{limit}"):
        validate_loaded(compose([f"benchmark.ppl.seqlen={limit + 1}"]), model, names)
    cfg = compose(["ignore=[*proj,*fc?]"])
    with pytest.raises(ConfigError, match=r"ignore=\['\*proj', '\*fc\?'\]: leaves no prunable layer"):
        validate_loaded(cfg, model, _layer_names(model, normalize_ignore(cfg.ignore)))


def test_model_files_identity(tmp_path):
    assert model_files_identity({"_target_": "sds_exp.models.loading.build_tiny", "family": "opt"}) == {}
    hub = model_files_identity(
        {"_target_": "sds_exp.models.loading.load_pretrained", "name_or_path": "facebook/opt-125m", "revision": "abc"}
    )
    assert hub == {"kind": "hub", "name_or_path": "facebook/opt-125m", "revision": "abc", "gguf_file": None}
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    node = {"_target_": "sds_exp.models.loading.load_pretrained", "name_or_path": str(folder)}
    first = model_files_identity(node)
    assert first["kind"] == "local" and [row[0] for row in first["files"]] == ["config.json"]
    (folder / "config.json").write_text('{"a": 1}')
    assert model_files_identity(node) != first
    with pytest.raises(ValueError, match="no file identity known"):
        model_files_identity({"_target_": "my.loader"})
