"""Per-layer sparsity from a file: ``{pattern: ratio}`` in YAML or JSON (EvoPress-style "module: level").

Patterns are fnmatch patterns matched against each prunable layer's full name or any of its dotted
prefixes, so ``model.layers.3`` sets every layer of block 3 and ``"*.mlp.down_proj"`` every down
projection. The FIRST matching entry in file order wins (put specific entries above broad ones); an
entry that matches no prunable layer, or only layers an earlier entry already set, is an error. Layers
no entry matches get ``default`` (null: the job's ``sparsity``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from sds_exp.allocation.base import (
    ROUNDING_MODES,
    TOLERANCE,
    build_from_node,
    check_ratio,
    job_spec,
    ratio_problem,
    snap_to_rows,
    weighted_mean,
)
from sds_exp.spec import SparsitySpec

__all__ = ["FileAllocation", "read_ratio_file", "matches"]

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")


def read_ratio_file(path: object, key: str = "allocation.path") -> dict[str, float]:
    """The ``{pattern: ratio}`` entries of a YAML or JSON file, in file order, each ratio checked.

    Raises:
        ValueError: naming ``key``, the path and what is wrong (missing, unreadable, not a mapping of
            patterns to ratios in [0, 1)).
    """
    if path is None or path == "???" or path == "":
        raise ValueError(f"{key} is not set; allocation=file needs {key}=/path/ratios.yaml (or .json)")
    if not isinstance(path, (str, Path)):
        raise ValueError(f"{key}={path!r}: must be the path of a YAML or JSON file")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{key}={str(path)!r}: {file.resolve()} does not exist or is not a file")
    if file.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"{key}={str(path)!r}: unknown file type {file.suffix!r}; allowed: {', '.join(_SUFFIXES)}")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json and yaml raise their own error classes
        hint = " (quote patterns that start with *: YAML reads *x as an alias)" if "alias" in str(exc) else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{key}={str(path)!r}: not valid {file.suffix[1:].upper()}: {first}{hint}") from None
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            f"{key}={str(path)!r}: must hold a non-empty mapping of layer-name patterns to sparsities, "
            f"e.g. {{'model.layers.0': 0.4, '*.mlp.down_proj': 0.6}}; got {type(data).__name__}"
        )
    entries: dict[str, float] = {}
    for pattern, ratio in data.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{key}={str(path)!r}: entry {pattern!r}: {ratio!r}: the key must be a layer-name pattern")
        problem = ratio_problem(ratio)
        if problem is not None:
            raise ValueError(f"{key}={str(path)!r}: entry {pattern!r}: {ratio!r} {problem}")
        entries[pattern] = float(ratio)
    return entries


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the layer's full name or one of its dotted prefixes (a block, a sub-module)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _examples(names: Sequence[str], count: int = 7) -> str:
    """The first ``count`` names (a block's worth in a LLaMA) and the last one."""
    if len(names) <= count + 1:
        return ", ".join(names)
    return f"{', '.join(names[:count])}, ..., {names[-1]} ({len(names)} prunable layers)"


@dataclass
class FileAllocation:
    """Per-layer ratios from ``path``.

    Args:
        path: a YAML or JSON file ``{pattern: ratio}`` (first match wins, see the module docstring).
        default: ratio of the layers no entry matches; None: the job's ``sparsity``.
        renormalize: False: ratios whose parameter-weighted mean is off the job's ``sparsity`` by more than
            0.1% are an error; True: they are scaled by ``sparsity / mean`` (logged).
        rounding: "target" (whole weights per row, summing to the file's total) or "floor" (the pruners' own
            ``int(in_features * ratio)``).
    """

    path: str
    default: float | None = None
    renormalize: bool = False
    rounding: str = "target"
    needs_calibration: ClassVar[bool] = False
    display_name: ClassVar[str] = "File"  # tables: "File-Wanda"
    reprune: ClassVar[str] = "reuse"  # the ratios do not depend on the weights
    entries: dict[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.entries = read_ratio_file(self.path)
        if self.default is not None:
            self.default = check_ratio("allocation.default", self.default)
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"allocation.renormalize={self.renormalize!r}: must be true or false")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"allocation.rounding={self.rounding!r}; allowed: {', '.join(ROUNDING_MODES)}")

    @staticmethod
    def check_spec(spec: SparsitySpec, key: str = "allocation") -> None:
        if spec.structured:
            raise ValueError(
                f"{key}=file with pattern='{spec.n}:{spec.m}': N:M keeps the same {spec.n} of every {spec.m} "
                "weights in every layer, so per-layer ratios cannot apply (mixed N:M is not implemented). "
                "Use pattern=unstructured or allocation=uniform"
            )

    @classmethod
    def check_config(cls, node: dict[str, Any], cfg, key: str) -> None:
        """Before the model loads: the file exists and parses, its ratios and ``default`` are in [0, 1)."""
        build_from_node(cls, node, key)
        spec = job_spec(cfg)
        if spec is not None:
            cls.check_spec(spec, key)

    @classmethod
    def check_loaded(cls, node: dict[str, Any], cfg, key: str, layers: dict[str, nn.Linear]) -> None:
        """With the model's layers: every entry matches a layer, and the ratios average to the target."""
        spec = job_spec(cfg)
        if spec is not None and layers:
            build_from_node(cls, node, key).resolve(layers, spec)

    def resolve(self, layers: Mapping[str, nn.Linear], spec: SparsitySpec) -> dict[str, float]:
        """Each prunable layer's ratio; raises ValueError for an entry matching nothing or an off-target mean."""
        self.check_spec(spec)
        names = list(layers)
        owner: dict[str, str] = {}  # layer -> the entry that set it
        for pattern in self.entries:
            hit = [n for n in names if matches(n, pattern)]
            if not hit:
                raise ValueError(
                    f"allocation.path={self.path!r}: entry {pattern!r} matches no prunable layer (layers left "
                    f"dense by `ignore` do not count); the layers are e.g. {_examples(names)}"
                )
            new = [n for n in hit if n not in owner]
            if not new:
                raise ValueError(
                    f"allocation.path={self.path!r}: entry {pattern!r} matches only layers that earlier entries "
                    f"already set (the first match wins; {hit[0]} is set by {owner[hit[0]]!r}); move it above them"
                )
            owner.update(dict.fromkeys(new, pattern))
        base = spec.ratio if self.default is None else self.default
        ratios = {n: self.entries[owner[n]] if n in owner else base for n in names}
        mean = weighted_mean(ratios, layers)
        if abs(mean - spec.ratio) > TOLERANCE:
            if not self.renormalize:
                raise ValueError(
                    f"allocation.path={self.path!r}: the ratios average {mean:.4f} over the prunable weights "
                    f"(weighted by parameter count; {len(owner)} of {len(names)} layers set by the file, the rest "
                    f"at default={base:g}), not sparsity={spec.ratio:g} (tolerance {TOLERANCE:g}); fix the file "
                    "or set allocation.renormalize=true to scale them"
                )
            if mean == 0:
                raise ValueError(f"allocation.path={self.path!r}: every ratio is 0; nothing to scale to {spec.ratio:g}")
            scale = spec.ratio / mean
            log.warning(
                "allocation file %s averages %.4f: every ratio scaled by %.4f to %g", self.path, mean, scale, spec.ratio
            )
            ratios = {n: r * scale for n, r in ratios.items()}
            worst = max(ratios, key=ratios.get)
            if ratios[worst] >= 1:
                entry = owner.get(worst, "default")
                raise ValueError(
                    f"allocation.path={self.path!r}: renormalising to sparsity={spec.ratio:g} pushes entry "
                    f"{entry!r} ({worst}) to {ratios[worst]:.4f} >= 1"
                )
        log.info(
            "allocation file %s: %d of %d layers set by %d entries, mean %.4f",
            self.path,
            len(owner),
            len(names),
            len(self.entries),
            weighted_mean(ratios, layers),
        )
        return snap_to_rows(ratios, layers) if self.rounding == "target" else ratios

    def ratios(
        self,
        model: nn.Module,
        calib: Tensor,
        layers: dict[str, nn.Linear],
        spec: SparsitySpec,
        *,
        device="cpu",
        batch_size: int = 8,
    ) -> dict[str, float]:
        return self.resolve(layers, spec)
