"""What happens after every pipeline stage: perplexity, zero-shot, measured sparsity, weight histograms,
tracking, and a metrics file rewritten on disk (so a failed job keeps what it measured)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sds_exp.evaluation.perplexity import eval_token_ids, perplexity
from sds_exp.evaluation.sparsity import sparsity_report
from sds_exp.tracking.results import read_cache, write_json

__all__ = [
    "PplSettings",
    "ZeroShotSettings",
    "StageEvaluator",
    "plot_histograms",
    "histogram_figure",
    "zero_share",
    "HIST_FILE",
    "save_histograms",
    "load_histograms",
]

log = logging.getLogger(__name__)

HIST_FILE = "hist_weights.safetensors"  # in plots/: the histogram layer's weights after every stage so far


def save_histograms(histograms: dict[str, Tensor], layer: str, path: Path) -> None:
    """Write the per-stage weights of ``layer`` (bf16: enough for a histogram, half the bytes) atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in histograms.items()},
        str(tmp),
        metadata={"layer": layer, "stages": json.dumps(list(histograms))},
    )
    tmp.replace(path)


def load_histograms(path: Path, layer: str) -> dict[str, Tensor]:
    """The per-stage weights written by :func:`save_histograms`, in stage order; empty if the file is
    missing or holds another layer."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("layer") != layer:
            log.warning("%s holds histograms of %r, not %r: not restored", path, meta.get("layer"), layer)
            return {}
        return {k: f.get_tensor(k).float() for k in json.loads(meta["stages"])}


@dataclass
class PplSettings:
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    batch_size: int = 1
    max_windows: int | None = None
    stage_max_windows: dict[str, int] = field(default_factory=dict)


@dataclass
class ZeroShotSettings:
    """``benchmark.zeroshot``: lm-eval tasks and the stages to run them at ("final" = the job's last)."""

    tasks: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: ["dense", "final"])
    limit: int | float | None = None
    batch_size: int = 8
    num_fewshot: int = 0
    seed: int = 0
    bootstrap_iters: int = 0


@contextmanager
def _quietly(what: str) -> Iterator[None]:
    """Default guard of optional outputs: log and continue."""
    try:
        yield
    except Exception as exc:
        log.warning("%s failed: %s: %s (the job continues)", what, type(exc).__name__, exc)


class StageEvaluator:
    """The ``on_stage`` callback of :func:`sds_exp.sds.pipeline.run_sds`.

    Args:
        tokenizer, data_dir, device: for the evaluation data and forward passes.
        ppl: perplexity settings (None: no perplexity).
        zeroshot: lm-eval settings (None: no zero-shot evaluation).
        final_stage: the last stage of this job (evaluated on the full data).
        layers: ``fn(model) -> {name: nn.Linear}`` prunable layers, for measured sparsity.
        hist_layer: name of the layer whose weight histogram is kept per stage.
        histograms: per-stage weights of ``hist_layer`` from before a resume (stages that will not run again).
        hist_file: where the per-stage weights are rewritten after every stage (a resumed job reads them back).
        record: ``fn(metrics, stage, **extra)`` called with every stage's metrics (the job's record, tracker).
        cache_file: dense perplexity cache (JSON), keyed by ``cache_key`` + dataset + protocol.
        cache_key: everything the dense perplexity depends on (model node and files, tokenizer, dtype...).
        optional: ``fn(what) -> context manager`` guarding outputs the numbers do not depend on.
        results_dir: where lm-eval's own results of every zero-shot stage go (``<stage>.json``); None: nowhere.
    """

    def __init__(
        self,
        *,
        tokenizer,
        data_dir,
        device,
        ppl: PplSettings | None,
        zeroshot: ZeroShotSettings | None,
        final_stage: str,
        layers: Callable[[nn.Module], dict[str, nn.Linear]],
        hist_layer: str | None,
        record: Callable[..., None],
        cache_file: Path | None,
        cache_key: dict,
        histograms: dict[str, Tensor] | None = None,
        hist_file: Path | None = None,
        optional: Callable[[str], object] = _quietly,
        results_dir: Path | None = None,
    ):
        self.tokenizer, self.data_dir, self.device = tokenizer, data_dir, device
        self.ppl, self.zeroshot = ppl, zeroshot
        self.final_stage, self.layers, self.hist_layer = final_stage, layers, hist_layer
        self.record, self.cache_file, self.cache_key = record, cache_file, cache_key
        self.histograms: dict[str, Tensor] = dict(histograms or {})
        self.hist_file = hist_file
        self.optional = optional
        self.results_dir = results_dir
        self._ids: dict[str, Tensor] = {}

    def token_ids(self, dataset: str) -> Tensor:
        if dataset not in self._ids:
            from sds_exp.data.tokens import dataset_identity, memoised, tokenizer_fingerprint

            files = dataset_identity(self.data_dir, dataset)
            key = ["eval", dataset, self.ppl.seqlen, tokenizer_fingerprint(self.tokenizer), files]
            self._ids[dataset] = memoised(
                key, lambda: eval_token_ids(dataset, self.tokenizer, self.data_dir, self.ppl.seqlen)
            )
            log.info(
                "%s: %d evaluation tokens, %d windows of %d",
                dataset,
                self._ids[dataset].numel(),
                self._ids[dataset].numel() // self.ppl.seqlen,
                self.ppl.seqlen,
            )
        return self._ids[dataset]

    def _windows(self, stage: str) -> int | None:
        limits = [self.ppl.max_windows]
        if stage != self.final_stage:
            limits.append((self.ppl.stage_max_windows or {}).get(stage))
        limits = [int(x) for x in limits if x is not None]
        return min(limits) if limits else None

    def _cache_id(self, dataset: str, windows: int | None) -> str:
        from sds_exp.data.mirror import mirror_provenance
        from sds_exp.data.sources import dataset_files

        data = mirror_provenance(self.data_dir, dataset_files("c4_evaluation" if dataset == "c4" else dataset))
        raw = json.dumps(
            [self.cache_key, dataset, data, self.ppl.seqlen, self.ppl.batch_size, windows], sort_keys=True, default=str
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def _wants_zeroshot(self, stage: str) -> bool:
        stages = self.zeroshot.stages if self.zeroshot is not None else []
        return stage in stages or ("final" in stages and stage == self.final_stage)

    def __call__(self, stage: str, model: nn.Module) -> None:
        metrics: dict[str, float] = {}
        layers = self.layers(model)
        sp = sparsity_report(layers)
        metrics[f"{stage}/sparsity/actual"] = sp["actual"]
        extra = {}
        if self.hist_layer in layers:
            self.histograms[stage] = layers[self.hist_layer].weight.detach().float().cpu().flatten().clone()
            extra["histogram"] = (self.hist_layer, self.histograms[stage])
            if self.hist_file is not None:
                with self.optional(f"histogram weights {self.hist_file}"):
                    save_histograms(self.histograms, self.hist_layer, self.hist_file)
        if self.ppl is not None:
            for dataset in self.ppl.datasets:
                metrics.update(self._perplexity(stage, dataset, model))
        if self._wants_zeroshot(stage):
            from sds_exp.evaluation.zeroshot import evaluate_zeroshot

            zs = self.zeroshot
            res = evaluate_zeroshot(
                model,
                self.tokenizer,
                list(zs.tasks),
                data_dir=self.data_dir,
                limit=zs.limit,
                batch_size=zs.batch_size,
                num_fewshot=zs.num_fewshot,
                seed=zs.seed,
                bootstrap_iters=zs.bootstrap_iters,
                device=self.device,
            )
            metrics.update({f"{stage}/zeroshot/{k}": v for k, v in res.metrics.items()})
            extra["lm_eval_versions"] = res.versions
            if self.results_dir is not None:  # lm-eval's own record: configs, versions, hashes of this stage
                write_json(self.results_dir / f"{stage}.json", res.raw)
        if stage == self.final_stage:
            metrics.update({"final/" + k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(stage + "/")})
        model.to("cpu")
        self.record(metrics, stage, **extra)

    def _perplexity(self, stage: str, dataset: str, model: nn.Module) -> dict[str, float]:
        windows = self._windows(stage)
        prefix = f"{stage}/{dataset}"
        key = self._cache_id(dataset, windows)
        cache = self._read_cache() if stage == "dense" else {}
        if stage == "dense" and key in cache:
            log.info("dense %s ppl from cache %s: %.4f", dataset, self.cache_file, cache[key][f"{prefix}/ppl"])
            return {**cache[key], f"{prefix}/cached": 1.0}
        result = perplexity(
            model,
            self.token_ids(dataset),
            self.ppl.seqlen,
            self.device,
            self.ppl.batch_size,
            windows,
            desc=f"{stage} {dataset}",
        )
        metrics = result.as_metrics(prefix)
        if stage == "dense" and self.cache_file is not None:
            with self.optional(f"dense perplexity cache {self.cache_file}"):
                cache = self._read_cache()
                cache[key] = metrics
                write_json(self.cache_file, cache)
        return metrics

    def _read_cache(self) -> dict:
        return read_cache(self.cache_file, "dense perplexity cache")


def zero_share(w: Tensor) -> float:
    """The share of exact zeros in ``w`` (pruned weights are exact zeros)."""
    return float((w == 0).float().mean()) if w.numel() else 0.0


def _count_tick(value: float, _pos: object = None) -> str:
    """Plain count tick labels (``1,000``, not ``10^3``)."""
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _count_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(_count_tick))


def _zeros_text(share: float) -> str:
    if 0 < share < 0.001:
        return "<0.1% zeros"
    return f"{100 * share:.1f}% zeros"


def histogram_figure(histograms: dict[str, Tensor], layer: str, title: str | None = None):
    """The all-stages figure of :func:`plot_histograms` (a matplotlib ``Figure``, not saved).

    One panel per stage, titled with the stage and its share of exact zeros; shared log-count y axis;
    the suptitle is ``title`` (model / pruner / pattern) and the layer.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    lim = max(float(w.abs().quantile(0.999)) for w in histograms.values()) if histograms else 1.0
    bins = torch.linspace(-lim, lim, 201).numpy()
    fig = Figure(figsize=(3.2 * max(len(histograms), 1), 3.3))
    axes = fig.subplots(1, max(len(histograms), 1), sharey=True, squeeze=False)[0]
    for i, (ax, (stage, w)) in enumerate(zip(axes, histograms.items(), strict=False)):
        ax.hist(w.numpy(), bins=bins, color="C0", histtype="stepfilled")  # one patch, not 200 bars
        ax.set_yscale("log")
        _count_ticks(ax)
        ax.set_title(f"{stage}: {_zeros_text(zero_share(w))}", fontsize=9)
        ax.set_xlabel("weight value")
        if i == 0:
            ax.set_ylabel("count (log scale)")
    fig.suptitle(f"{title}: {layer}" if title else layer, fontsize=9)
    fig.tight_layout()
    return fig


def plot_histograms(
    histograms: dict[str, Tensor], layer: str, out_dir: Path, title: str | None = None
) -> dict[str, Path]:
    """One PNG per stage plus one with all stages side by side (the paper's Figure 1).

    Args:
        histograms: stage -> the flattened weights of ``layer`` after that stage (stage order).
        layer: the layer's module name.
        out_dir: where ``hist_<stage>.png`` and ``hist_stages.png`` are written.
        title: what the job was (e.g. ``SmolLM2-135M, SDS-Wanda, 2:4``), put before the layer in the titles.

    Returns:
        stage -> PNG path, plus ``all`` for the side-by-side figure (when there is any stage).
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    lim = max(float(w.abs().quantile(0.999)) for w in histograms.values()) if histograms else 1.0
    bins = torch.linspace(-lim, lim, 201).numpy()
    name = f"{title}: {layer}" if title else layer
    for stage, w in histograms.items():
        fig = Figure(figsize=(5, 3.4))
        ax = fig.subplots()
        ax.hist(w.numpy(), bins=bins, color="C0", histtype="stepfilled")  # one patch, not 200 bars
        ax.set_yscale("log")
        _count_ticks(ax)
        ax.set_title(f"{stage} ({_zeros_text(zero_share(w))})\n{name}", fontsize=8)
        ax.set_xlabel("weight value")
        ax.set_ylabel("count (log scale)")
        fig.tight_layout()
        paths[stage] = out_dir / f"hist_{stage}.png"
        fig.savefig(paths[stage], dpi=110)
    if histograms:
        paths["all"] = out_dir / "hist_stages.png"
        histogram_figure(histograms, layer, title).savefig(paths["all"], dpi=110)
    return paths
