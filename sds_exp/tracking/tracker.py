"""Trackers: where a job's metrics, histograms, figures are mirrored; metrics.json is the record.

``conf/logger/*.yaml`` picks one; the app builds it with the node's keys plus ``config=<resolved
config>, dir=<run dir>, name=<job name>`` and runs the job inside ``with tracker:``. Build it with
``get_class(node._target_)(**node, config=...)``, not ``instantiate(node, config=...)``: ``config``
is the name of ``instantiate``'s own first parameter ("got multiple values for argument 'config'").
``NullTracker`` is the default, so nothing below the app ever branches on whether W&B is on.

``WandbTracker`` opens one W&B run per ``with`` block (``reinit="create_new"``) and always finishes
it on the way out, with exit code 1 when the block raised; Hydra multirun jobs that share one
process therefore never merge into one run (wandb#1314, #2877). ``mode="offline"`` needs no network
and no account; the runs are written to ``<dir>/wandb/offline-run-*`` and uploaded later with
``wandb sync`` (docs/zeroshot.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from sds_exp.extras import require

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

__all__ = ["Tracker", "NullTracker", "WandbTracker", "weight_histogram", "stage_free", "WANDB_MODES"]

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
HISTOGRAM_BINS = 64  # wandb's default bin count


class Tracker(Protocol):
    """What the app calls on a tracker; used as ``with tracker: ...``."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def summary(self, metrics: Mapping[str, float]) -> None: ...

    def log_images(self, images: Mapping[str, str | Path], step: int | None = None) -> None: ...

    def log_histograms(self, tensors: Mapping[str, torch.Tensor], step: int | None = None) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...


class NullTracker:
    """Accepts everything and records nothing (``logger=none``)."""

    run_id: str | None = None

    def __init__(self, **kwargs: Any) -> None:
        del kwargs  # config, dir, name ... are accepted so the app builds every tracker alike

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return False

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Ignore ``metrics``."""

    def summary(self, metrics: Mapping[str, float]) -> None:
        """Ignore ``metrics``."""

    def log_images(self, images: Mapping[str, str | Path], step: int | None = None) -> None:
        """Ignore ``images``."""

    def log_histograms(self, tensors: Mapping[str, torch.Tensor], step: int | None = None) -> None:
        """Ignore ``tensors``."""

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Ignore the table."""


def stage_free(metrics: Mapping[str, float], stage: str) -> dict[str, float]:
    """``prune/wikitext2/ppl`` -> ``wikitext2/ppl``: one key over the stages, so a tracker's default panel of a
    key logged at step = stage index is the metric-vs-stage line (``metrics.json`` keeps the flat names)."""
    prefix = f"{stage}/"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def weight_histogram(tensor: torch.Tensor, bins: int = HISTOGRAM_BINS) -> tuple[list[float], list[float]]:
    """Histogram of a tensor's values, computed where the tensor lives.

    Args:
        tensor: any shape; a CUDA weight is binned on the GPU, so only ``bins`` counts are copied.
        bins: number of equal-width bins between the min and the max.

    Returns:
        ``(counts, edges)`` with ``len(edges) == bins + 1``: wandb's ``np_histogram`` layout.
    """
    import torch

    values = tensor.detach().flatten().float()
    low, high = values.min().item(), values.max().item()
    if high <= low:  # a constant tensor: one populated bin around the value
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(values, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    return counts.cpu().tolist(), edges.tolist()


class WandbTracker:
    """One W&B run per ``with`` block.

    Args:
        mode: ``offline`` (written under ``dir``, uploaded later with ``wandb sync``),
            ``online`` or ``disabled`` (no files, no network).
        project: W&B project.
        entity: W&B user or team; None = the account's default.
        group: groups runs in the UI, e.g. one sweep.
        tags: run tags (``cfg.tags``).
        job_type: optional W&B job type.
        config: the resolved job config, stored as the W&B run config.
        dir: the job's run directory; the run lands in ``<dir>/wandb/``.
        name: run display name (the Hydra job name).
        run_id: the id of a run to continue (a resumed job continues its run; steps go on from the record).
    """

    def __init__(
        self,
        mode: str = "offline",
        project: str = "sds_exp",
        entity: str | None = None,
        group: str | None = None,
        tags: Iterable[str] = (),
        job_type: str | None = None,
        config: Mapping[str, Any] | None = None,
        dir: str | Path | None = None,  # wandb.init's own name for it (shadows the builtin)
        name: str | None = None,
        run_id: str | None = None,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
        self.mode = mode
        self.project = project
        self.entity = entity
        self.group = group
        self.tags = [str(t) for t in tags]
        self.job_type = job_type
        self.config = dict(config) if config is not None else {}
        self.dir = Path(dir) if dir is not None else None
        self.name = name
        self.run_id = run_id
        self._run: Any = None

    @property
    def run(self) -> Any:
        """The open ``wandb.Run``; raises outside ``with``."""
        if self._run is None:
            raise RuntimeError("WandbTracker is used outside its `with` block")
        return self._run

    def __enter__(self) -> Self:
        wandb = require("wandb", "tracking")

        if self._run is not None:
            raise RuntimeError("WandbTracker is already open; use one tracker per job")
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            mode=self.mode,
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=self.tags,
            job_type=self.job_type,
            config=self.config,
            dir=str(self.dir) if self.dir is not None else None,
            name=self.name,
            id=self.run_id,
            resume="allow" if self.run_id else None,
            reinit="create_new",  # a new run even if another one is still open in this process
        )
        self.run_id = self._run.id
        log.info("W&B run %s (%s) in %s", self._run.id, self.mode, getattr(self._run, "dir", "-"))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        run, self._run = self._run, None
        if run is None:
            return False
        if exc_type is None:
            run.finish(exit_code=0)
            return False
        try:
            run.finish(exit_code=1)
        except Exception:  # the job's own exception is the one to propagate
            log.exception("could not finish the W&B run after the job failed")
        return False

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalars at ``step`` (steps must not decrease: W&B drops earlier ones)."""
        self.run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, float]) -> None:
        """Set final numbers in the run summary."""
        self.run.summary.update(dict(metrics))

    def log_images(self, images: Mapping[str, str | Path], step: int | None = None) -> None:
        """Log image files (the stage PNGs) as ``wandb.Image`` media."""
        wandb = require("wandb", "tracking")

        self.run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def log_histograms(self, tensors: Mapping[str, torch.Tensor], step: int | None = None) -> None:
        """Log value histograms of tensors (e.g. weights) as ``wandb.Histogram`` media."""
        wandb = require("wandb", "tracking")

        self.run.log(
            {key: wandb.Histogram(np_histogram=weight_histogram(tensor)) for key, tensor in tensors.items()},
            step=step,
        )

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A ``wandb.Table`` in the run summary (e.g. stage x metric)."""
        wandb = require("wandb", "tracking")

        self.run.summary[key] = wandb.Table(columns=columns, data=rows)
