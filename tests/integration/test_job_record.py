"""The job's record: reruns never lose numbers, signals end a job as killed, resume is checked per stage,
caches cannot answer for another model, and optional outputs never fail a computed job."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
from omegaconf import open_dict
from safetensors.torch import load_file

from sds_exp import app
from sds_exp.job import JobKilled, ResumeRefused
from sds_exp.tracking.record import RunRecord

pytestmark = pytest.mark.integration

TINY = ["debug=tiny"]


@pytest.fixture
def job(compose, tmp_path):
    """job(overrides, run="run", **cfg_updates) -> (cfg, run_dir): a composed config writing to tmp_path/<run>."""

    def make(overrides=(), run="run", **updates):
        cfg = compose([*TINY, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / run)
            for key, value in updates.items():
                cfg[key] = value
        return cfg, tmp_path / run

    return make


def record(run_dir: Path) -> RunRecord:
    return RunRecord.read(run_dir / "metrics.json")


def ppls(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.endswith("/ppl")}


def test_refused_rerun_keeps_a_completed_record(job):
    cfg, run_dir = job()
    first = app.run(cfg)
    bad, _ = job(["sds.reactivate.optimizer.lr=0.2", "calib_batch_size=2"])  # changes the prune checkpoint
    with pytest.raises(ResumeRefused, match="calib_batch_size: 8 -> 2"):
        app.run(bad)
    rec = record(run_dir)
    assert rec.status == "completed" and ppls(rec.metrics) == ppls(first)
    assert [a.status for a in rec.attempts] == ["completed", "failed"]
    assert "calib_batch_size" in rec.attempts[-1].error and not (run_dir / "failure.txt").exists()
    typo, _ = job(["calib_batch_size=0"])  # a bad value: refused before anything else
    with pytest.raises(ValueError, match="calib_batch_size=0"):
        app.run(typo)
    again = app.run(job()[0])  # the correct rerun: nothing to do, every number still there
    assert ppls(again) == ppls(first) and record(run_dir).status == "completed"


def test_half_done_run_keeps_its_numbers_through_a_refused_rerun(job, monkeypatch):
    from sds_exp.sds import pipeline

    cfg, run_dir = job()
    monkeypatch.setattr(pipeline, "reactivate_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        app.run(cfg)
    monkeypatch.undo()
    half = record(run_dir)
    assert half.status == "failed" and "prune/wikitext2/ppl" in half.metrics
    with pytest.raises(ResumeRefused):
        app.run(job(["seed=1"])[0])
    after = record(run_dir)
    assert after.status == "failed" and after.metrics == half.metrics and len(after.attempts) == 2
    done = app.run(job()[0])
    assert done["dense/wikitext2/ppl"] == half.metrics["dense/wikitext2/ppl"]
    assert done["prune/wikitext2/ppl"] == half.metrics["prune/wikitext2/ppl"]
    assert (run_dir / "attempts").is_dir() and not (run_dir / "failure.txt").exists()


def test_sigterm_ends_the_job_as_killed(job, monkeypatch):
    monkeypatch.setenv("SDS_EXP_FAULT", "block:reactivate:1:SIGTERM")
    cfg, run_dir = job()
    with pytest.raises(JobKilled):
        app.run(cfg)
    rec = record(run_dir)
    assert rec.status == "killed" and rec.error == "killed by SIGTERM"
    assert "JobKilled" in (run_dir / "failure.txt").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.delenv("SDS_EXP_FAULT")
    assert app.run(job()[0])["final/wikitext2/ppl"] > 0 and record(run_dir).status == "completed"


def test_resume_is_scoped_by_stage(job, monkeypatch):
    from sds_exp.sds import pipeline

    cfg, run_dir = job()
    monkeypatch.setattr(pipeline, "reactivate_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("lr")))
    with pytest.raises(RuntimeError):
        app.run(cfg)
    monkeypatch.undo()
    calls = []
    real = pipeline.prune_model
    monkeypatch.setattr(pipeline, "prune_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    # the re-activation lr and the benchmark do not act on the prune checkpoint: resumed, not refused
    fixed, _ = job(["sds.reactivate.optimizer.lr=0.05", "benchmark.ppl.stage_max_windows.reactivate=1"])
    metrics = app.run(fixed)
    assert calls == [] and record(run_dir).attempts[-1].resumed_after == "prune"
    assert metrics["reactivate/wikitext2/windows"] == 1
    # ... but they do act on the final checkpoint
    with pytest.raises(ResumeRefused, match=r"sds.reactivate.optimizer.lr: 0.05 -> 0.1"):
        app.run(job()[0])


def test_resume_refuses_other_data(job, tmp_path):
    cfg, run_dir = job(["sds=prune_only"])
    app.run(cfg)
    moved = tmp_path / "mirror"  # the same files elsewhere: same checksums, resumable
    moved.symlink_to(Path(cfg.paths.data_dir))
    again, _ = job(["sds=prune_only"])
    with open_dict(again):
        again.paths.data_dir = str(moved)
    app.run(again)
    hub, _ = job(["sds=prune_only"])
    with open_dict(hub):
        hub.paths.data_dir = str(tmp_path / "nowhere")
        hub.model.data_dir = str(moved)  # the tiny model's tokenizer still comes from the mirror
    with pytest.raises(ResumeRefused, match="data_provenance"):
        app.run(hub)


def test_damaged_checkpoint_falls_back(job, caplog):
    from sds_exp.checkpoint import StageStore

    cfg, run_dir = job()
    app.run(cfg)
    store = StageStore(run_dir / "checkpoint")
    assert store.last_stage() == "adjust"
    weights = run_dir / "checkpoint" / "adjust" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    store = StageStore(run_dir / "checkpoint")
    assert store.last_stage() == "reactivate"
    assert str(weights) in caplog.text and "truncated" in caplog.text
    (run_dir / "checkpoint" / "state.json").write_text("")  # empty: the previous state is used
    assert StageStore(run_dir / "checkpoint").load() is not None
    metrics = app.run(job()[0])  # re-runs the final stage from the good one
    assert metrics["final/wikitext2/ppl"] > 0 and StageStore(run_dir / "checkpoint").last_stage() == "adjust"


def test_ignore_string_and_dense_block(job):
    cfg, run_dir = job(["ignore=*.mlp.down_proj", "sds=prune_only"], run="one")
    metrics = app.run(cfg)
    layers = json.loads((run_dir / "layers.json").read_text())["sparsity"]
    assert not any("down_proj" in k for k in layers) and 0.45 < metrics["final/sparsity/mask"] < 0.55
    cfg, run_dir = job(['ignore=["model.layers.0.*"]'], run="block")  # a whole block left dense
    metrics = app.run(cfg)
    layers = json.loads((run_dir / "layers.json").read_text())["sparsity"]
    assert layers and all(".layers.1." in k for k in layers) and metrics["final/wikitext2/ppl"] > 0
    with pytest.raises(ValueError, match="ignore"):
        app.run(job(["ignore=*"], run="all")[0])


def test_dense_cache_follows_the_model(job):
    a = app.run(job(["sds=prune_only"], run="a")[0])
    b = app.run(job(["sds=prune_only", "model.hidden_size=64"], run="b")[0])
    c = app.run(job(["sds=prune_only"], run="c")[0])
    assert "dense/wikitext2/cached" not in b and b["dense/wikitext2/ppl"] != a["dense/wikitext2/ppl"]
    assert c["dense/wikitext2/cached"] == 1.0 and c["dense/wikitext2/ppl"] == a["dense/wikitext2/ppl"]


def test_optional_outputs_never_fail_a_job(job, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    cfg, run_dir = job(["sds=prune_only"])
    with open_dict(cfg):
        cfg.paths.cache_dir = str(blocker / "cache")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app, "plot_histograms", no_space)
    metrics = app.run(cfg)
    rec = record(run_dir)
    assert rec.status == "completed" and "final/wikitext2/ppl" in metrics
    assert any("cache" in w for w in rec.warnings) and any("histogram plots" in w for w in rec.warnings)


def test_result_files_follow_the_umask(job):
    cfg, run_dir = job(["sds=prune_only"])
    app.run(cfg)
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    for name in ("metrics.json", "env.json", "resolved_config.yaml", "layers.json", "checkpoint/state.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == expected, name


def test_resume_from_another_directory(job, tmp_path):
    cfg, src = job(["sds=prune_only"], run="src")
    first = app.run(cfg)
    cont, dst = job([f"resume={src}"], run="dst")  # SDS continues the one-shot job's prune checkpoint
    metrics = app.run(cont)
    rec = record(dst)
    assert rec.resumed_from == str(src) and metrics["prune/wikitext2/ppl"] == first["prune/wikitext2/ppl"]
    assert "adjust/wikitext2/ppl" in metrics and set(load_file(dst / "checkpoint" / "adjust" / "masks.safetensors"))
    assert record(src).status == "completed" and "adjust/wikitext2/ppl" not in record(src).metrics


def test_zeroshot_through_the_job(job):
    cfg, run_dir = job(
        [
            "sds=prune_only",
            "benchmark.zeroshot={tasks: [copa], stages: [final], limit: 4, "
            "batch_size: 4, num_fewshot: 0, seed: 0, bootstrap_iters: 0}",
        ]
    )
    metrics = app.run(cfg)
    assert 0 <= metrics["final/zeroshot/copa/acc"] <= 1 and "dense/zeroshot/copa/acc" not in metrics
    assert record(run_dir).lm_eval_versions
    raw = json.loads((run_dir / "zeroshot" / "prune.json").read_text())  # lm-eval's own results, per stage
    assert raw["results"]["copa"]["acc,none"] == metrics["final/zeroshot/copa/acc"] and "configs" in raw


def test_lm_eval_task_configs_command(tmp_path, data_dir):
    from sds_exp.evaluation.lm_eval_configs import main

    assert main(["--tasks", "copa,rte", "--out", str(tmp_path / "tasks"), "--data-dir", str(data_dir)]) == 0
    text = (tmp_path / "tasks" / "copa.yaml").read_text()
    assert "include:" in text and str(data_dir) in text  # absolute paths: runnable from anywhere


def test_saved_model_has_a_card_and_loads_in_plain_transformers(job):
    from transformers import AutoModelForCausalLM

    cfg, run_dir = job(["pattern=2:4", "save_model=true", "keep_checkpoint=false"])
    metrics = app.run(cfg)
    saved = run_dir / "model"
    card = (saved / "README.md").read_text()
    assert "tiny_llama" in card and "`wanda` pruner" in card and "pattern `2:4`" in card
    assert "4 x 64 tokens" in card and f"| adjust | {metrics['adjust/wikitext2/ppl']:.2f} |" in card
    config = json.loads((saved / "config.json").read_text())
    assert config["use_cache"] is True and "quantization_config" not in config and "sparsity_config" not in config
    assert not (run_dir / "checkpoint").exists() and record(run_dir).status == "completed"
    model = AutoModelForCausalLM.from_pretrained(saved)
    masks = load_file(saved / "masks.safetensors")
    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all(), name
