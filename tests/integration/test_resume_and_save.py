"""Resume after a killed stage, refuse a changed config, and reload a saved sparse model."""

import json

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from sds_exp import app
from sds_exp.checkpoint import load_saved
from sds_exp.evaluation.perplexity import eval_token_ids, perplexity
from sds_exp.evaluation.stage_eval import HIST_FILE
from sds_exp.sds import pipeline
from sds_exp.sds.stages import prunable_layers

SMOKE = ["debug=tiny", "pattern=2:4"]


class Killed(BaseException):
    pass


def test_killed_after_prune_resumes_without_repeating(compose, monkeypatch, tmp_path):
    cfg = compose(SMOKE)

    def killed(*args, **kwargs):
        raise Killed("simulated kill during re-activation")

    monkeypatch.setattr(pipeline, "reactivate_model", killed)
    with pytest.raises(Killed):
        app.run(cfg)
    run_dir = tmp_path / "run"
    state = json.loads((run_dir / "metrics.json").read_text())
    assert state["status"] == "failed" and "simulated kill" in state["error"]
    saved = json.loads((run_dir / "checkpoint" / "state.json").read_text())["committed"][-1]
    assert saved["stage"] == "prune" and saved["seconds"]["prune"] > 0
    assert state["metrics"]["time/phase/prune/stats_forward_s"] > 0  # phase times on disk after each stage
    prune_ppl = state["metrics"]["prune/wikitext2/ppl"]
    hist_file = run_dir / "plots" / HIST_FILE
    before = load_file(hist_file)
    assert set(before) == {"dense", "prune"}

    monkeypatch.undo()
    calls = []
    real_prune = pipeline.prune_model
    monkeypatch.setattr(pipeline, "prune_model", lambda *a, **k: calls.append(1) or real_prune(*a, **k))
    metrics = app.run(compose(SMOKE))  # same run dir: continues after "prune"
    assert calls == []
    assert metrics["prune/wikitext2/ppl"] == prune_ppl
    assert "final/wikitext2/ppl" in metrics and metrics["final/sparsity/mask"] == pytest.approx(0.5)
    assert metrics["time/prune_s"] == saved["seconds"]["prune"]  # the finished stage's time is not lost
    assert metrics["time/phase/prune/stats_forward_s"] == pytest.approx(saved["phases"]["prune/stats_forward"])
    state = json.loads((run_dir / "metrics.json").read_text())
    assert state["status"] == "completed" and state["resumed_from"] == str(run_dir)
    after = load_file(hist_file)  # the histograms of the stages before the kill are kept
    assert set(after) == {"dense", "prune", "reactivate", "reprune", "adjust"}
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_resume_keeps_the_layer_reports_of_finished_stages(compose, monkeypatch, tmp_path):
    def killed(*args, **kwargs):
        raise Killed("simulated kill during re-prune")

    monkeypatch.setattr(pipeline, "reprune_model", killed)
    with pytest.raises(Killed):
        app.run(compose(SMOKE))
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "checkpoint" / "state.json").read_text())["committed"][-1]
    assert saved["stage"] == "reactivate" and set(saved["reports"]) == {"reactivate"}
    monkeypatch.undo()
    metrics = app.run(compose(SMOKE))
    layers = json.loads((run_dir / "layers.json").read_text())["reports"]
    assert layers["reactivate"] == saved["reports"]["reactivate"] and set(layers) == {"reactivate", "reprune"}
    assert metrics["reactivate/recon/loss_after_mean"] > 0
    assert metrics["time/reactivate_s"] == saved["seconds"]["reactivate"] and metrics["time/reprune_s"] > 0


def test_resume_with_different_config_is_refused(compose, tmp_path):
    app.run(compose(SMOKE + ["sds=prune_only"]))
    cfg = compose(SMOKE + ["sds=prune_only", "sparsity=0.5", "pruner=sparsegpt", "seed=3"])
    with pytest.raises(ValueError, match=r"settings that act on it differ(.|\n)*pruner._target_(.|\n)*seed: 0 -> 3"):
        app.run(cfg)


def test_saved_model_reloads_identically(compose, tmp_path, data_dir):
    cfg = compose(SMOKE + ["save_model=true"])
    metrics = app.run(cfg)
    saved = tmp_path / "run" / "model"
    masks = load_file(str(tmp_path / "run" / "checkpoint" / "adjust" / "masks.safetensors"))
    loaded = load_saved(saved)
    assert set(loaded.masks) == set(masks) and all(torch.equal(loaded.masks[n], masks[n]) for n in masks)
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "adjust" / "weights.safetensors"))
    for name, layer in prunable_layers(loaded.model).items():
        assert torch.equal(layer.weight, weights[name]), name
    ids = eval_token_ids("wikitext2", loaded.tokenizer, data_dir, 256)
    assert perplexity(loaded.model, ids, 256, max_windows=2).ppl == pytest.approx(
        metrics["final/wikitext2/ppl"], rel=1e-6
    )
    # and as a model option of a new job
    cfg2 = compose(
        ["model=saved", f"model.path={saved}", "benchmark=smoke", "sds=prune_only", "data.nsamples=4", "data.seqlen=64"]
    )
    with open_dict(cfg2):
        cfg2.paths.output_dir = str(tmp_path / "run2")
    assert app.run(cfg2)["dense/wikitext2/ppl"] == pytest.approx(metrics["final/wikitext2/ppl"], rel=1e-6)
