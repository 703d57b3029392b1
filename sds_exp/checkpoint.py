"""Stage checkpoints for resuming a job, and saved sparse models as standard HF checkpoints.

Stage checkpoints (``<run dir>/checkpoint/``): after a stage is computed AND evaluated, the weights of the
prunable layers (in the model dtype) and the masks are written, each file atomically (temporary file +
rename), and ``state.json`` last: it is the commit marker, so a job killed mid-write leaves the previous
state intact. ``state.json`` also carries what the finished stages measured (stage and phase seconds,
per-layer loss reports), so a resumed job reports them as if it had run straight through. Everything else (embeddings, norms, head) is never modified and comes from the model loader;
the dense teacher weights are re-read from the freshly loaded model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sds_exp.tracking.results import read_json, write_json

__all__ = ["StageStore", "Restored", "save_checkpoint", "load_saved", "config_differences", "RESULT_IRRELEVANT"]

log = logging.getLogger(__name__)

# Top-level config keys that cannot change a job's numbers (everything else must match to resume).
RESULT_IRRELEVANT = ("paths", "hydra", "logger", "resume", "device", "tags", "save_model", "optimized_metric",
                     "calib_batch_size", "hist_layer")


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@dataclass
class Restored:
    stage: str
    weights: dict[str, Tensor]
    first_masks: dict[str, Tensor]
    masks: dict[str, Tensor]
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds of the finished stages
    phases: dict[str, float] = field(default_factory=dict)   # phase -> seconds (PhaseTimer) up to this stage
    reports: dict[str, dict] = field(default_factory=dict)   # stage -> layer -> loss numbers

    def apply(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name, w in self.weights.items():
            modules[name].weight.data.copy_(w.to(modules[name].weight.dtype))


class StageStore:
    """Reads and writes the stage checkpoint of one run directory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def save(self, stage: str, layers: dict[str, nn.Linear], first_masks: dict[str, Tensor],
             masks: dict[str, Tensor] | None = None, *, seconds: dict[str, float] | None = None,
             phases: dict[str, float] | None = None, reports: dict[str, dict] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_save({n: l.weight for n, l in layers.items()}, self.dir / f"weights_{stage}.safetensors")
        _atomic_save(first_masks, self.dir / "first_masks.safetensors")
        if masks is not None:
            _atomic_save(masks, self.dir / "masks.safetensors")
        previous = self.last_stage()
        write_json(self.dir / "state.json", {"stage": stage, "seconds": dict(seconds or {}),
                                             "phases": dict(phases or {}), "reports": reports or {}})
        if previous and previous != stage:
            (self.dir / f"weights_{previous}.safetensors").unlink(missing_ok=True)
        log.info("checkpoint: stage %s saved in %s", stage, self.dir)

    def last_stage(self) -> str | None:
        state = self.dir / "state.json"
        return read_json(state)["stage"] if state.is_file() else None

    def load(self) -> Restored | None:
        stage = self.last_stage()
        if stage is None:
            return None
        state = read_json(self.dir / "state.json")
        masks_file = self.dir / "masks.safetensors"
        return Restored(
            stage=stage,
            seconds=state.get("seconds", {}), phases=state.get("phases", {}), reports=state.get("reports", {}),
            weights=load_file(str(self.dir / f"weights_{stage}.safetensors")),
            first_masks=load_file(str(self.dir / "first_masks.safetensors")),
            masks=load_file(str(masks_file)) if masks_file.is_file() else {},
        )


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Result-relevant differences between two resolved configs, as 'key: saved -> current' lines."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESULT_IRRELEVANT:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def save_checkpoint(model: nn.Module, tokenizer, masks: dict[str, Tensor], resolved_config_yaml: str,
                    path: str | Path) -> Path:
    """A standard Hugging Face checkpoint (safetensors) + ``masks.safetensors`` + ``resolved_config.yaml``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _atomic_save(masks, path / "masks.safetensors")
    (path / "resolved_config.yaml").write_text(resolved_config_yaml, encoding="utf-8")
    log.info("saved the sparse model to %s", path)
    return path


def load_saved(path: str | Path, dtype: str = "float32"):
    """Load a model saved by :func:`save_checkpoint` (a ``model`` option: ``model=saved model.path=...``)."""
    from sds_exp.models.loading import load_pretrained

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved checkpoint (no config.json)")
    loaded = load_pretrained(str(path), dtype)
    masks_file = path / "masks.safetensors"
    loaded.masks = load_file(str(masks_file)) if masks_file.is_file() else None  # type: ignore[attr-defined]
    return loaded
