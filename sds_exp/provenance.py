"""The one list of which settings change which results.

Every top-level config key is in exactly one class (``tests/config`` checks that the composed config has
no unclassified key):

* :data:`STAGE_KEYS`: settings that change the weights, by the first pipeline stage they act on. A stage
  checkpoint at stage S depends only on the keys whose stage is at or before S: fixing the re-activation
  learning rate may resume from the ``prune`` checkpoint, never from the ``reactivate`` one.
* :data:`EVALUATION_KEYS`: change measured numbers but no weight (what is evaluated, on how many windows).
* :data:`WARN_KEYS`: may move results at rounding level (the device); a resume across them is allowed
  with a warning, and recorded.
* :data:`BOOKKEEPING_KEYS`: nothing measured depends on them (where files go, tracking, tags).

A key of the config that is in none of them (a user's ``+foo=1``) counts as acting on the first stage.
A ``data_dir`` anywhere is a location, not a result: the files read from it are checksummed instead
(``data_provenance``), so a moved mirror resumes and a resume without it does not.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "STAGE_ORDER",
    "STAGE_KEYS",
    "EVALUATION_KEYS",
    "WARN_KEYS",
    "BOOKKEEPING_KEYS",
    "first_stage_of",
    "fingerprint",
    "resume_differences",
    "is_bookkeeping",
    "ADDED_DEFAULTS",
]

STAGE_ORDER = ("dense", "prune", "reactivate", "reprune", "adjust")

STAGE_KEYS: dict[str, str] = {
    "model": "prune",
    "data": "prune",
    "seed": "prune",
    "sparsity": "prune",
    "pattern": "prune",
    "nm_ties": "prune",
    "dtype": "prune",
    "allow_tf32": "prune",
    "pruner": "prune",
    "allocation": "prune",  # the per-layer ratios of the first prune
    "allocation.reprune": "reprune",  # whether the re-prune reuses them or recomputes them
    "ignore": "prune",
    # batched statistics sum in a different order: measured, 6 mask entries of a tiny LLaMA differ (8 vs 2)
    "calib_batch_size": "prune",
    "sds._target_": "prune",
    "sds.redense": "reactivate",
    "sds.inputs": "reactivate",
    "sds.reactivate": "reactivate",
    "regularizer": "reactivate",
    "sds.adjust": "reprune",
    "sds.adjustment": "reprune",
    "sds.adjust_group": "reprune",
    "sds.adjust_score": "reprune",
    "data_provenance": "prune",  # not a config key: the calibration files' checksums (or hub revision)
    "model_files": "prune",  # not a config key: the model files' identity
    "allocation_file": "prune",  # not a config key: the checksum of allocation=file's ratio file
}
EVALUATION_KEYS = ("benchmark",)
WARN_KEYS = ("device",)
BOOKKEEPING_KEYS = (
    "paths",
    "hydra",
    "logger",
    "resume",
    "tags",
    "save_model",
    "keep_checkpoint",
    "optimized_metric",
    "hist_layer",
    "experiment",
    "debug",
    "local",
    "allocation.cache_dir",  # OWL's outlier ratios cached: the same numbers, keyed by the model's tensors
    "sds.cache_teacher",  # memory for speed: the same numbers with and without (test_cached_teacher_alone_is_exact)
)

# Keys added after checkpoints were first written, with the value that does what those older jobs did: a
# checkpoint without the key resumes when the job has this value.
ADDED_DEFAULTS: dict[str, Any] = {
    "allocation._target_": "sds_exp.allocation.uniform.Uniform",
    # the cost work: the iterative re-activation and a fixed number of adjustment steps
    **{f"sds.{phase}.solver": "iterative" for phase in ("reactivate", "adjustment")},
    **{f"sds.{phase}.prox_steps": 0 for phase in ("reactivate", "adjustment")},
    **{f"sds.{phase}.tol": 0.0 for phase in ("reactivate", "adjustment")},
    **{f"sds.{phase}.patience": 2 for phase in ("reactivate", "adjustment")},
}


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def is_bookkeeping(key: str) -> bool:
    """True for keys that change no measured number at all (run directory, tracking, tags)."""
    return any(_matches(key, p) for p in BOOKKEEPING_KEYS)


def first_stage_of(key: str) -> str | None:
    """The first stage a dotted key acts on; None when it acts on no weight."""
    if key.rsplit(".", 1)[-1] == "data_dir":  # where the mirror is (model.data_dir...): its files are checksummed
        return None
    best = None
    for prefix, stage in STAGE_KEYS.items():  # the longest matching prefix decides (sds.reactivate vs sds)
        if _matches(key, prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, stage)
    if best is not None:
        return best[1]
    if any(_matches(key, p) for p in (*EVALUATION_KEYS, *WARN_KEYS, *BOOKKEEPING_KEYS)):
        return None
    return "prune"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def fingerprint(resolved: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What a checkpoint depends on: the flat result-relevant settings, plus ``extra`` (provenance)."""
    flat = _flatten({**resolved, **extra})
    return {k: v for k, v in flat.items() if first_stage_of(k) is not None or any(_matches(k, w) for w in WARN_KEYS)}


def resume_differences(saved: dict[str, Any], current: dict[str, Any], stage: str) -> tuple[list[str], list[str]]:
    """(refusing, warning) differences between two fingerprints for a checkpoint taken after ``stage``.

    A key refuses when it acts on ``stage`` or an earlier one; keys that act later are free to change.
    """
    limit = STAGE_ORDER.index(stage)
    refuse, warn = [], []
    for key in sorted(set(saved) | set(current)):
        a = saved.get(key, ADDED_DEFAULTS.get(key, "<missing>"))
        b = current.get(key, "<missing>")
        if a == b:
            continue
        line = f"{key}: {a!r} -> {b!r}"
        first = first_stage_of(key)
        if first is None:
            warn.append(line)
        elif STAGE_ORDER.index(first) <= limit:
            refuse.append(line)
    return refuse, warn
