"""Read the job directories of Hydra sweeps, including the jobs that failed or never ran.

A sweep directory (``outputs/multiruns/<timestamp>/``, ``conf/hydra/default.yaml``) holds
``multirun.yaml`` and one directory per job with ``.hydra/`` and, once ``sds_exp.app.run`` started,
``metrics.json`` and ``resolved_config.yaml``. The expected grid is re-expanded from
``multirun.yaml`` with Hydra's own ``BasicSweeper.split_arguments`` (the same job numbering the
launcher used), so a job whose directory never appeared is reported as ``missing`` instead of
silently dropped. A directory of single runs (``outputs/runs/...``) works too; its jobs are simply
those found. So are the sweeps of sweepers without a grid (Optuna, Nevergrad, Ax: they write no
``multirun.yaml``, their trials are chosen as the search goes): the job directories found are the
jobs, numbered as the launcher numbered them, and ``optimization_results.yaml`` (Optuna's best trial)
is read by :func:`optimization_results`.

:func:`describe_jobs` then says what each job was, in table terms: model, pattern label ("2:4",
"50%"), base pruner, baseline or SDS, seed, and the *variant*: the overridden keys that differ
between the jobs of the collection (``regularizer=none``, ``sds.inputs=dense``...), so that
ablations and the trials of a search get their own rows. Float values are printed with the fewest
significant digits (3 or more) that keep the collection's values apart: an Optuna trial reads
``regularizer.l1.lam=0.00123``, not ``regularizer.l1.lam=0.0012345678901234567``.
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sds_exp import provenance
from sds_exp.tracking.record import STATUSES as RECORD_STATUSES
from sds_exp.tracking.record import RecordError, RunRecord

__all__ = [
    "JobRecord",
    "JobLabel",
    "collect_jobs",
    "read_job",
    "expected_overrides",
    "sweeper_of",
    "optimization_results",
    "parse_overrides",
    "pattern_label",
    "describe_jobs",
    "write_jobs_csv",
]

log = logging.getLogger(__name__)

STATUSES = (*RECORD_STATUSES, "missing")
# Overridden keys that are table coordinates (or bookkeeping), never a row variant.
COORDINATE_KEYS = {"model", "pruner", "allocation", "sds", "pattern", "sparsity", "seed", "experiment"}
BOOKKEEPING_PREFIXES = (
    *provenance.BOOKKEEPING_KEYS,
    # evaluation extras that leave the table's numbers as they are (a zero-shot suite
    # added, intermediate stages on fewer windows); max_windows/seqlen still vary rows
    "benchmark.zeroshot",
    "benchmark.ppl.stage_max_windows",
)
BOOKKEEPING_KEYS = {"benchmark"}  # the suite choice itself (ppl / paper): same perplexity protocol


def acts_after_prune(key: str) -> bool:
    """Keys that act after the first prune cannot change the `prune/` stage of an SDS job."""
    stage = provenance.first_stage_of(key)
    return stage is not None and provenance.STAGE_ORDER.index(stage) > provenance.STAGE_ORDER.index("prune")


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass
class JobRecord:
    """What is known about one job of a sweep.

    Attributes:
        directory: the job directory; None when it was never created.
        sweep: the sweep directory it was collected from.
        num: Hydra's job number (``hydra.job.num``); None for a single run.
        status: completed | failed | killed (SIGTERM/SIGINT) | running (started, never finished: still
            running, or killed by SIGKILL) |
            missing (no metrics.json, or no directory at all).
        error: the job's error message, or why it counts as missing.
        choices: config-group choices (``model``, ``pruner``, ``sds``, ``regularizer``, ...).
        overrides: the job's command-line overrides.
        config: the resolved config as a nested dict (what is known of it for a missing job).
        metrics: flat ``stage/benchmark/metric`` numbers.
        stages_done: stages that finished.
    """

    directory: Path | None
    sweep: Path | None
    num: int | None
    status: str
    error: str | None = None
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stages_done: list[str] = field(default_factory=list)

    def value(self, key: str) -> Any:
        """A group choice (``model``) or dotted config value (``sds.inputs``); None if unknown."""
        if key in self.choices:
            return self.choices[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def name(self) -> str:
        """A short name for messages: the job number, else the directory name."""
        if self.num is not None:
            return f"#{self.num}"
        return self.directory.name if self.directory is not None else "?"


def _load_yaml(path: Path) -> Any:
    """YAML through OmegaConf (as Hydra wrote it), interpolations left unresolved."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Command-line overrides as ``{key: value}`` (Hydra's parser; ``+``/``++`` prefixes dropped).

    Args:
        overrides: e.g. ``["pruner=wanda", 'pattern="2:4"', "sds.inputs=dense"]``.

    Returns:
        Typed values as Hydra parses them (``'"2:4"'`` -> ``"2:4"``, ``0.5`` -> float); sweeps and
        deletions (``~key``) are skipped.
    """
    parser = _parser()
    items: dict[str, Any] = {}
    for text in overrides:
        try:
            ov = parser.parse_override(text)
        except Exception:  # not Hydra syntax (hand-written file): plain key=value
            key, _, value = text.partition("=")
            items[key.lstrip("+")] = value
            continue
        if ov.is_delete() or ov.is_sweep_override():
            continue
        items[ov.key_or_group] = ov.value()
    return items


def sweeper_of(sweep_dir: str | Path) -> str | None:
    """The sweeper's ``_target_`` (from ``multirun.yaml``, else from the first job's ``.hydra/hydra.yaml``)."""
    sweep_dir = Path(sweep_dir)
    candidates = [sweep_dir / "multirun.yaml", *sorted(sweep_dir.glob("*/.hydra/hydra.yaml"))[:1]]
    for path in candidates:
        if path.is_file():
            try:
                target = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper._target_", default=None)
            except Exception:  # a damaged file: the caller lists what it finds
                continue
            if target:
                return str(target)
    return None


def optimization_results(sweep_dir: str | Path) -> dict[str, Any] | None:
    """Optuna's ``optimization_results.yaml`` of a sweep (``best_params``, ``best_value``, or
    ``solutions`` for several objectives); None when there is none or it cannot be read."""
    path = Path(sweep_dir) / "optimization_results.yaml"
    if not path.is_file():
        return None
    try:
        data = _load_yaml(path)
    except Exception as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None


def expected_overrides(sweep_dir: str | Path) -> list[list[str]] | None:
    """The override list of every job of a basic-sweeper multirun, indexed by job number.

    Re-expands ``hydra.sweeper.params`` followed by the command-line overrides of ``multirun.yaml``
    exactly as ``BasicSweeper.sweep`` does. Returns None when there is no expected grid: no
    ``multirun.yaml`` (single runs; sweepers such as Optuna's, which write none), a sweeper other than
    Hydra's basic one, or overrides that cannot be expanded offline (``glob(...)``). The caller then
    lists the job directories found.
    """
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        sweeper = sweeper_of(sweep_dir)
        if sweeper and not sweeper.endswith("BasicSweeper"):
            log.info("%s: sweeper %s has no expected grid; listing the job dirs found", sweep_dir, sweeper)
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    cfg = OmegaConf.load(path)
    sweeper = OmegaConf.select(cfg, "hydra.sweeper._target_", default="")
    if not str(sweeper).endswith("BasicSweeper"):
        log.info("%s: sweeper %s has no expected grid; listing the job dirs found", path, sweeper)
        return None
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items()]
    args += list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or [])
    try:
        parsed = _parser().parse_overrides(args)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception as exc:
        log.warning("%s: cannot expand the sweep (%s); listing the job dirs found", path, exc)
        return None
    return [list(job) for batch in batches for job in batch]


def read_job(directory: str | Path, sweep: Path | None = None) -> JobRecord:
    """Read one job directory (``metrics.json``, ``resolved_config.yaml``, ``.hydra/``).

    A directory without ``metrics.json`` is ``missing``: the job was queued or died before
    ``sds_exp.app.run`` wrote anything. Its config comes from ``.hydra/`` then.
    """
    directory = Path(directory)
    hydra_dir = directory / ".hydra"
    num, choices, overrides, config = None, {}, [], {}
    if (hydra_dir / "hydra.yaml").is_file():
        hcfg = OmegaConf.load(hydra_dir / "hydra.yaml")
        job_num = OmegaConf.select(hcfg, "hydra.job.num", default=None)
        num = int(job_num) if isinstance(job_num, int) else None
        raw = OmegaConf.select(hcfg, "hydra.runtime.choices", default=None)
        raw = OmegaConf.to_container(raw, resolve=False) if raw is not None else {}
        choices = {k: str(v) for k, v in raw.items() if not k.startswith("hydra/") and v is not None}
    if (hydra_dir / "overrides.yaml").is_file():
        overrides = [str(o) for o in _load_yaml(hydra_dir / "overrides.yaml") or []]
    for name in ("resolved_config.yaml", ".hydra/config.yaml"):
        if (directory / name).is_file():
            config = _load_yaml(directory / name) or {}
            break

    metrics_file = directory / "metrics.json"
    if not metrics_file.is_file():
        return JobRecord(
            directory,
            sweep,
            num,
            "missing",
            "no metrics.json: never started, or killed before it",
            choices,
            overrides,
            config,
        )
    try:
        record = RunRecord.read(metrics_file)
    except RecordError as exc:
        return JobRecord(directory, sweep, num, "failed", f"unreadable metrics.json: {exc}", choices, overrides, config)
    status, error = record.status, record.error
    if status == "running":
        error = (
            error or "metrics.json still says running: the job is running or was killed (SIGKILL, OOM, node failure)"
        )
    metrics = record.metrics
    return JobRecord(
        directory,
        sweep,
        num,
        status,
        error,
        choices={**choices, **record.choices},
        overrides=list(record.overrides or overrides),
        config=config,
        metrics=metrics,
        stages_done=list(record.stages_done),
    )


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _missing_job(sweep: Path, num: int, overrides: list[str], base: Any) -> JobRecord:
    """A job of the expected grid with no directory: the sweep's config with its overrides."""
    raw = OmegaConf.select(base, "hydra.runtime.choices", default=None)
    choices = {
        k: str(v)
        for k, v in (OmegaConf.to_container(raw) if raw is not None else {}).items()
        if not k.startswith("hydra/") and v is not None
    }
    config = {k: v for k, v in OmegaConf.to_container(base, resolve=False).items() if k != "hydra"}
    for key, value in parse_overrides(overrides).items():
        if key in choices or "/" in key:
            choices[key] = str(value)
            config.pop(key, None)  # the sweep's node is another option's: unknown, not wrong
        else:
            _set_dotted(config, key, value)
    return JobRecord(
        None,
        sweep,
        num,
        "missing",
        "no job directory: the job was never launched",
        choices,
        list(overrides),
        config,
    )


def _job_dirs(root: Path) -> list[Path]:
    found = {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in root.rglob("metrics.json")}
    return sorted(d for d in found if ".submitit" not in d.relative_to(root).parts)


def collect_jobs(*sweep_dirs: str | Path) -> list[JobRecord]:
    """All jobs of the given sweep (or run) directories, expected-but-absent ones included.

    Args:
        sweep_dirs: multirun sweep directories, single run directories, or directories of runs.

    Returns:
        Records ordered by sweep, then job number (the sweep's own order), then directory.

    Raises:
        FileNotFoundError: a directory does not exist or holds no job at all.
    """
    jobs: list[JobRecord] = []
    for sweep in map(Path, sweep_dirs):
        if not sweep.is_dir():
            raise FileNotFoundError(f"{sweep}: not a directory")
        found = [read_job(d, sweep) for d in _job_dirs(sweep)]
        expected = expected_overrides(sweep)
        if expected is not None:
            for job in found:  # a job re-run in place (hydra.mode=RUN) lost its num: the subdir has it
                if job.num is None and job.directory.parent == sweep and job.directory.name.isdigit():
                    job.num = int(job.directory.name)
            nums = {j.num for j in found}
            base = OmegaConf.load(sweep / "multirun.yaml")
            found += [_missing_job(sweep, i, ov, base) for i, ov in enumerate(expected) if i not in nums]
            for job in found:
                listed = job.num is not None and job.num < len(expected) and job.directory is not None
                if listed and parse_overrides(job.overrides) != parse_overrides(expected[job.num]):
                    log.warning(
                        "%s: overrides %s differ from the sweep's job %d %s",
                        job.directory,
                        job.overrides,
                        job.num,
                        expected[job.num],
                    )
        if not found:
            raise FileNotFoundError(f"{sweep}: no job directories (.hydra/ or metrics.json) and no multirun.yaml")
        found.sort(key=lambda j: (j.num is None, j.num if j.num is not None else 0, str(j.directory)))
        jobs += found
    counts = {s: sum(j.status == s for j in jobs) for s in STATUSES}
    log.info("collected %d jobs: %s", len(jobs), ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return jobs


def pattern_label(pattern: Any, sparsity: Any) -> str:
    """``"2:4"`` for N:M patterns, ``"50%"`` for unstructured 0.5, ``"?"`` when unknown."""
    if isinstance(pattern, str) and (m := _NM.match(pattern)):
        return f"{m.group(1)}:{m.group(2)}"
    if pattern == "unstructured" and isinstance(sparsity, (int, float)):
        return f"{100 * float(sparsity):.4g}%"
    if isinstance(pattern, int):  # YAML read an unquoted N:M as a base-60 number; app.run refuses it
        return f"{pattern} (unquoted N:M?)"
    return "?" if pattern is None else str(pattern)


@dataclass(frozen=True)
class JobLabel:
    """Where a job sits in a table.

    Attributes:
        model: the model choice (``opt125m``).
        pattern: ``"2:4"`` / ``"50%"``.
        sparsity: the target ratio (None if unknown).
        structured: True for N:M patterns.
        pruner: the pruner choice (``wanda``).
        sds: the sds choice (``default``, ``prune_only``, ``no_adjust``).
        baseline: True for a one-shot job (``sds.redense`` false).
        seed: the job's seed (None if unknown).
        variant: ``((key, value), ...)``: overridden keys whose values vary in the collection.
        allocation: the allocation choice (``uniform``, ``owl``, ``file``); uniform for records without one.
    """

    model: str
    pattern: str
    sparsity: float | None
    structured: bool
    pruner: str
    sds: str
    baseline: bool
    seed: Any
    variant: tuple[tuple[str, str], ...]
    allocation: str = "uniform"


def _is_variant_key(key: str) -> bool:
    return key not in COORDINATE_KEYS | BOOKKEEPING_KEYS and not key.startswith(BOOKKEEPING_PREFIXES)


def _text(value: Any) -> str:
    return "?" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _short_texts(values: list[Any]) -> dict[Any, str]:
    """Printed forms of one key's floats: as written when short (``0.5``, ``1e-05``), else with the
    fewest significant digits (>= 3) that keep the key's distinct values distinct."""
    floats = sorted({v for v in values if isinstance(v, float)})
    out: dict[Any, str] = {v: str(v) for v in floats}
    for digits in range(3, 18):
        texts = {v: str(v) if len(str(v)) <= 7 else f"{v:.{digits}g}" for v in floats}
        if len(set(texts.values())) == len(floats):
            out.update(texts)
            break
    return out


def describe_jobs(jobs: list[JobRecord]) -> list[JobLabel]:
    """Label every job (same order); the variant keys are decided over the whole collection."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in parse_overrides(job.overrides) if _is_variant_key(k) and k not in keys]
    varying = [k for k in keys if len({_text(j.value(k)) for j in jobs}) > 1]
    short = {k: _short_texts([j.value(k) for j in jobs]) for k in varying}

    def text(key: str, value: Any) -> str:
        return short[key].get(value, _text(value)) if isinstance(value, float) else _text(value)

    labels = []
    for job in jobs:
        sds = job.choices.get("sds", "?")
        redense = job.value("sds.redense")
        if isinstance(redense, str):
            redense = redense.strip().lower() in ("true", "1", "yes")
        if not isinstance(redense, bool):
            redense = sds != "prune_only"
        pattern, sparsity = job.value("pattern"), job.value("sparsity")
        labels.append(
            JobLabel(
                model=job.choices.get("model", "?"),
                pattern=pattern_label(pattern, sparsity),
                sparsity=float(sparsity) if isinstance(sparsity, (int, float)) else None,
                structured=bool(isinstance(pattern, str) and _NM.match(pattern)),
                pruner=job.choices.get("pruner", "?"),
                sds=sds,
                baseline=not redense,
                seed=job.value("seed"),
                variant=tuple((k, text(k, job.value(k))) for k in varying),
                allocation=job.choices.get("allocation") or "uniform",
            )
        )
    return labels


def _calibration(job: JobRecord) -> str:
    nsamples, seqlen = job.value("data.nsamples"), job.value("data.seqlen")
    return f"{job.choices.get('data', '?')} {_text(nsamples)}x{_text(seqlen)}"


def write_jobs_csv(
    jobs: list[JobRecord], path: str | Path, metrics: list[str], replaced_by: dict[int, Path | None] | None = None
) -> Path:
    """One line per job (status, error, labels, the given metrics): the audit trail of a table.

    ``replaced_by`` maps ``id(job)`` of a superseded job to the directory of the completed job that
    replaces it (its ``superseded_by`` column).
    """
    replaced_by = replaced_by or {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = describe_jobs(jobs)
    columns = [
        "sweep",
        "num",
        "directory",
        "status",
        "superseded_by",
        "error",
        "model",
        "pattern",
        "pruner",
        "sds",
        "seed",
        "variant",
        "overrides",
        "eval_seqlen",
        "calibration",
        "dtype",
        *metrics,
    ]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for job, lab in zip(jobs, labels, strict=True):
            writer.writerow(
                [
                    job.sweep,
                    job.num,
                    job.directory or "",
                    job.status,
                    replaced_by.get(id(job)) or "",
                    job.error or "",
                    lab.model,
                    lab.pattern,
                    lab.pruner,
                    lab.sds,
                    _text(lab.seed),
                    ";".join(f"{k}={v}" for k, v in lab.variant),
                    " ".join(job.overrides),
                    _text(job.value("benchmark.ppl.seqlen")),
                    _calibration(job),
                    _text(job.value("dtype")),
                    *(job.metrics.get(m, "") for m in metrics),
                ]
            )
    return path
