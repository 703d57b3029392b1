"""Paper-ready figures: the sparsity sweep (sds_exp.reporting.plots) and the weight histograms (stage_eval)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sds_exp.evaluation.stage_eval import histogram_figure, plot_histograms, zero_share
from sds_exp.reporting import build_table, collect_jobs
from sds_exp.reporting.plots import plot_sparsity_sweep, sweep_figure, use_log_scale

STAGES = ["dense", "prune", "reactivate", "reprune", "adjust"]


def write_run(path: Path, pruner: str, sparsity: float, ppl: dict[str, float], windows: int = 140) -> None:
    """A completed SDS job directory as sds_exp.app writes it (metrics.json, resolved config, .hydra/)."""
    overrides = [f"pruner={pruner}", f"sparsity={sparsity}"]
    choices = {"model": "opt125m", "pruner": pruner, "sds": "default", "data": "c4", "benchmark": "ppl"}
    config = {
        "seed": 0,
        "sparsity": sparsity,
        "pattern": "unstructured",
        "dtype": "float32",
        "model": {"name_or_path": "facebook/opt-125m"},
        "pruner": {"_target_": f"sds_exp.pruners.{pruner}.{pruner.capitalize()}"},
        "data": {"nsamples": 128, "seqlen": 2048},
        "sds": {"redense": True},
        "benchmark": {"ppl": {"datasets": ["wikitext2"], "seqlen": 2048}, "zeroshot": None},
    }
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create(config), path / "resolved_config.yaml")
    metrics = {f"{st}/wikitext2/ppl": v for st, v in ppl.items()}
    metrics |= {f"{st}/wikitext2/windows": float(windows) for st in ppl}
    metrics |= {"final/wikitext2/ppl": ppl["adjust"], "final/wikitext2/windows": float(windows)}
    record = {"status": "completed", "error": None, "choices": choices, "overrides": overrides}
    record |= {"stages_done": STAGES, "metrics": metrics}
    (path / "metrics.json").write_text(json.dumps(record))


def sweep_table(tmp_path: Path, final: dict[float, float], dense: float = 27.66):
    for i, (sparsity, value) in enumerate(sorted(final.items())):
        ppl = {"dense": dense, "prune": value * 1.2, "adjust": value}
        write_run(tmp_path / "runs" / f"{i:02d}", "wanda", sparsity, ppl)
    return build_table(collect_jobs(tmp_path / "runs"), [])


def drawn(fig):
    fig.savefig(io.BytesIO(), format="png")  # lays out and draws the tick labels
    return fig


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels if t.get_text()]


def test_sweep_over_decades_has_log_y_with_plain_ticks_and_protocol_labels(tmp_path):
    table = sweep_table(tmp_path, {0.5: 32.0, 0.6: 90.0, 0.7: 800.0, 0.8: 5000.0})
    fig = drawn(sweep_figure(table))
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "sparsity (share of weights zeroed per linear layer)"
    assert ax.get_ylabel() == "WikiText2 test perplexity (final stage)\n140 windows of 2048 tokens"
    assert "calibration c4 128 × 2048, float32" in ax.get_title()
    assert tick_texts(ax.get_xticklabels()) == ["50%", "60%", "70%", "80%"]
    ys = tick_texts(ax.get_yticklabels())
    assert "100" in ys and "1,000" in ys
    assert all("e" not in t and "^" not in t and "$" not in t for t in ys), ys
    assert tick_texts(ax.get_yticklabels(minor=True)) == []


def test_sweep_within_a_decade_is_linear_without_offset(tmp_path):
    """Close values near 50,000: matplotlib's default would print an offset (+5.066e4) or 5.0665x10^4."""
    table = sweep_table(tmp_path, {0.5: 50665.0, 0.6: 50667.5, 0.7: 50670.0}, dense=50664.0)
    fig = drawn(sweep_figure(table, log_y=True))
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"  # less than a decade, dense line included
    ys = tick_texts(ax.get_yticklabels())
    assert ys and all("e" not in t and "^" not in t for t in ys), ys
    assert ax.yaxis.get_offset_text().get_text() == ""


def test_log_scale_rule():
    assert use_log_scale([20.0, 250.0]) and not use_log_scale([20.0, 150.0], log_y=False)
    assert not use_log_scale([20.0, 199.0 / 10]) and not use_log_scale([20.0, 180.0])
    assert not use_log_scale([0.0, 500.0])  # a non-positive value: never log


def test_linear_when_asked_and_the_png_is_written(tmp_path):
    table = sweep_table(tmp_path, {0.5: 32.0, 0.7: 800.0})
    assert sweep_figure(table, log_y=False).axes[0].get_yscale() == "linear"
    out = plot_sparsity_sweep(table, tmp_path / "fig" / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def histograms() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4000, generator=g) * 0.02
    pruned = dense * (torch.arange(4000) % 4 >= 2)  # half exact zeros
    return {"dense": dense, "prune": pruned, "reactivate": dense + 1e-3}


def test_histogram_panels_state_the_share_of_zeros_and_the_job():
    hist = histograms()
    assert zero_share(hist["prune"]) == pytest.approx(0.5)
    fig = histogram_figure(hist, "model.layers.1.self_attn.q_proj", title="SmolLM2-135M, SDS-Wanda, 50%")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["dense: 0.0% zeros", "prune: 50.0% zeros", "reactivate: 0.0% zeros"]
    assert fig.get_suptitle() == "SmolLM2-135M, SDS-Wanda, 50%: model.layers.1.self_attn.q_proj"
    assert all(ax.get_xlabel() == "weight value" for ax in fig.axes)
    assert fig.axes[0].get_ylabel() == "count (log scale)" and fig.axes[0].get_yscale() == "log"
    counts = tick_texts(drawn(fig).axes[0].get_yticklabels())
    assert "1,000" in counts and all("^" not in t for t in counts), counts  # plain, not 10^3
    assert histogram_figure(hist, "layer").get_suptitle() == "layer"  # title optional


def test_plot_histograms_keeps_its_call_and_writes_every_stage(tmp_path):
    hist = histograms()
    paths = plot_histograms(hist, "layer", tmp_path / "plots")  # the call sds_exp.app makes
    assert set(paths) == {"dense", "prune", "reactivate", "all"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths.values())
    titled = plot_histograms(hist, "layer", tmp_path / "t", title="tiny_llama, Wanda, 2:4")
    assert titled["all"].name == "hist_stages.png" and titled["prune"].name == "hist_prune.png"
    assert plot_histograms({}, "layer", tmp_path / "empty") == {}
