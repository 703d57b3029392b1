"""Stage checkpoints for resuming a job, and saved sparse models as standard HF checkpoints.

Stage checkpoints (``<run dir>/checkpoint/``): after a stage is computed AND evaluated, the weights of the
prunable layers (in the model dtype) and the masks go to ``<stage>/`` (written in ``.<stage>.tmp/``, every
file and the directory fsynced, then renamed), the files are read back and hashed, and only then is the
stage committed in ``state.json`` (written atomically, the previous version kept as ``state.prev.json``).
The state lists the committed stages with each file's size and SHA-256 and the config fingerprint the
stage depends on (:mod:`sds_exp.provenance`). The previous stage is kept until a newer one is committed;
a damaged stage is found on load (size or checksum), named in a warning, and the store falls back to
the stage before it. ``state.json`` also carries what the finished stages measured (stage and phase
seconds, per-layer loss reports), so a resumed job reports them as if it had run straight through.
Everything else (embeddings, norms, head) is never modified and comes from the model loader; the dense
teacher weights are re-read from the freshly loaded model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sds_exp.faults import fault_point
from sds_exp.tracking.results import fsync_dir, sha256_file, write_json

__all__ = ["StageStore", "Restored", "CheckpointError", "save_checkpoint", "load_saved"]

log = logging.getLogger(__name__)

FORMAT = 2
OPTIONAL_FILES = ("masks", "reprune_masks")  # written by the final stage only
KEEP = 2  # committed stages kept on disk: the newest and the one to fall back to


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def _save_synced(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _save_synced(tensors, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class Restored:
    stage: str
    weights: dict[str, Tensor]
    first_masks: dict[str, Tensor]
    masks: dict[str, Tensor]
    reprune_masks: dict[str, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds of the finished stages
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds (PhaseTimer) up to this stage
    reports: dict[str, dict] = field(default_factory=dict)  # stage -> layer -> loss numbers
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the settings this stage depends on

    def apply(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name, w in self.weights.items():
            modules[name].weight.data.copy_(w.to(modules[name].weight.dtype))


class StageStore:
    """Reads and writes the stage checkpoint of one run directory.

    Args:
        directory: ``<run dir>/checkpoint``.
        fingerprint: stored with every stage committed by this store (what the stage depends on).
    """

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any] | None = None) -> None:
        self.dir = Path(directory)
        self.fingerprint = dict(fingerprint or {})
        self._state_cache: dict[str, Any] | None = None
        self._verified: tuple[dict[str, Any] | None] | None = None  # the newest good entry, hashed once

    # -- writing -------------------------------------------------------------------------------------
    def save(
        self,
        stage: str,
        layers: dict[str, nn.Linear],
        first_masks: dict[str, Tensor],
        masks: dict[str, Tensor] | None = None,
        *,
        reprune_masks: dict[str, Tensor] | None = None,
        seconds: dict[str, float] | None = None,
        phases: dict[str, float] | None = None,
        reports: dict[str, dict] | None = None,
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp, final = self.dir / f".{stage}.tmp", self.dir / stage
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {"weights": {n: lin.weight for n, lin in layers.items()}, "first_masks": first_masks}
        if masks is not None:
            files["masks"] = masks
        if reprune_masks is not None:  # the re-prune's own masks: its overlap is reported after a resume too
            files["reprune_masks"] = reprune_masks
        for kind, tensors in files.items():
            _save_synced(tensors, tmp / f"{kind}.safetensors")
            fault_point(f"checkpoint:{stage}:{kind}")
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a stage from an earlier attempt that is no longer committed
        os.replace(tmp, final)
        fsync_dir(self.dir)
        manifest = {
            f"{stage}/{kind}.safetensors": {
                "size": (final / f"{kind}.safetensors").stat().st_size,
                "sha256": sha256_file(final / f"{kind}.safetensors"),
            }
            for kind in files
        }  # hashed as read back from disk: what a resume will find
        fault_point(f"checkpoint:{stage}:before_commit")
        state = self._read_state() or {"format": FORMAT, "committed": []}
        committed = [e for e in state.get("committed", []) if e["stage"] != stage]
        committed.append(
            {
                "stage": stage,
                "files": manifest,
                "seconds": dict(seconds or {}),
                "phases": dict(phases or {}),
                "reports": reports or {},
                "fingerprint": self.fingerprint,
            }
        )
        self._commit({"format": FORMAT, "committed": committed})
        fault_point(f"checkpoint:{stage}:after_commit")
        keep = {e["stage"] for e in committed[-KEEP:]}
        for entry in committed[:-KEEP]:
            shutil.rmtree(self.dir / entry["stage"], ignore_errors=True)
        self._commit({"format": FORMAT, "committed": [e for e in committed if e["stage"] in keep]})
        for legacy in self.dir.glob("weights_*.safetensors"):  # a format-1 checkpoint continued here
            legacy.unlink(missing_ok=True)
        log.info("checkpoint: stage %s saved in %s", stage, self.dir)

    def _commit(self, state: dict[str, Any]) -> None:
        path = self.dir / "state.json"
        if path.is_file():
            os.replace(path, self.dir / "state.prev.json")  # the fallback if state.json is ever damaged
        write_json(path, state)
        fsync_dir(self.dir)
        self._state_cache = state
        self._verified = None

    # -- reading -------------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any] | None:
        """The committed state: state.json, else (damaged or missing) state.prev.json, else None."""
        if self._state_cache is not None:
            return self._state_cache
        for name in ("state.json", "state.prev.json"):
            path = self.dir / name
            if not path.is_file():
                continue
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(state, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, OSError) as exc:
                log.warning("checkpoint state %s is damaged (%s); trying the previous one", path, exc)
                continue
            if "committed" not in state and "stage" in state:  # format 1: one stage, no checksums
                stage = state["stage"]
                state = {
                    "format": 1,
                    "committed": [
                        {
                            "stage": stage,
                            "files": {},
                            "seconds": state.get("seconds", {}),
                            "phases": state.get("phases", {}),
                            "reports": state.get("reports", {}),
                            "fingerprint": {},
                        }
                    ],
                }
            self._state_cache = state
            return state
        return None

    def _damage(self, entry: dict[str, Any]) -> str | None:
        """Why a committed stage cannot be used (naming the file), or None when it verifies."""
        for rel, meta in entry["files"].items():
            path = self.dir / rel
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != meta["size"]:
                return f"{path} has {path.stat().st_size} bytes, {meta['size']} were committed (truncated?)"
            if sha256_file(path) != meta["sha256"]:
                return f"{path} does not match its committed SHA-256"
        return None

    def _good_entry(self) -> dict[str, Any] | None:
        if self._verified is None:
            self._verified = (self._find_good_entry(),)
        return self._verified[0]

    def _find_good_entry(self) -> dict[str, Any] | None:
        state = self._read_state()
        for entry in reversed((state or {}).get("committed", [])):
            why = self._damage(entry)
            if why is None:
                return entry
            log.warning("checkpoint stage %s is damaged: %s; falling back to the stage before it", entry["stage"], why)
        return None

    def last_stage(self) -> str | None:
        """The newest committed stage that verifies."""
        entry = self._good_entry()
        return entry["stage"] if entry is not None else None

    def committed_fingerprint(self) -> tuple[str, dict[str, Any]] | None:
        entry = self._good_entry()
        return (entry["stage"], entry.get("fingerprint", {})) if entry is not None else None

    def _paths(self, entry: dict[str, Any]) -> dict[str, Path]:
        stage = entry["stage"]
        if entry["files"]:
            return {
                kind: self.dir / stage / f"{kind}.safetensors" for kind in OPTIONAL_FILES + ("weights", "first_masks")
            }
        return {
            "weights": self.dir / f"weights_{stage}.safetensors",  # format 1
            "first_masks": self.dir / "first_masks.safetensors",
            "masks": self.dir / "masks.safetensors",
        }

    def load(self) -> Restored | None:
        entry = self._good_entry()
        if entry is None:
            return None
        paths = self._paths(entry)
        tensors = {}
        for kind, path in paths.items():
            if not path.is_file():
                if kind in OPTIONAL_FILES:
                    tensors[kind] = {}
                    continue
                raise CheckpointError(f"checkpoint file {path} is missing")
            try:
                tensors[kind] = load_file(str(path))
            except Exception as exc:  # safetensors raises its own error type, naming no file
                raise CheckpointError(f"checkpoint file {path} cannot be read ({exc})") from exc
        return Restored(
            stage=entry["stage"],
            seconds=entry.get("seconds", {}),
            phases=entry.get("phases", {}),
            reports=entry.get("reports", {}),
            fingerprint=entry.get("fingerprint", {}),
            **tensors,
        )

    def copy_to(self, directory: str | Path) -> StageStore:
        """Resuming from another directory: continue this checkpoint in ``directory``."""
        target = Path(directory)
        if target.resolve() != self.dir.resolve():
            shutil.copytree(self.dir, target, dirs_exist_ok=True)
            fsync_dir(target)
        return StageStore(target, self.fingerprint)


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    masks: dict[str, Tensor],
    resolved_config_yaml: str,
    path: str | Path,
    card: str | None = None,
) -> Path:
    """A standard Hugging Face checkpoint (safetensors) + ``masks.safetensors`` + ``resolved_config.yaml``
    (+ ``README.md``, the model card). ``use_cache`` is saved as the model had it before pruning turned it off."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True  # the pipeline turns it off for its full-sequence passes; generation wants it
    try:
        model.to("cpu").save_pretrained(path, safe_serialization=True)
    finally:
        if config is not None:
            config.use_cache = cached
    tokenizer.save_pretrained(path)
    if card is not None:
        (path / "README.md").write_text(card, encoding="utf-8")
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
