"""Paper-layout tables from collected jobs (Markdown, CSV, LaTeX), published numbers beside ours.

Layout (as the SDS/SparseGPT/Wanda tables): one column group per model, one row per method within
each sparsity pattern, the dense model on top. Each model group has our number, the paper's, and
Δ = ours - paper, for WikiText2 perplexity and, where any job evaluated it, the zero-shot suite
average (accuracy in %). Cells aggregate the seeds of a configuration: mean ± sample std.

Where the rows come from:
- Baseline rows (SparseGPT, Wanda): the ``sds=prune_only`` jobs; when a pruner has no such job for
  a model and pattern, the ``prune`` stage of its SDS jobs (same calibration), marked †.
- SDS rows: the final stage of SDS jobs, labelled ``SDS-<pruner>`` (``(no_adjust)`` etc. for other
  sds options) and suffixed with the job's variant (``[regularizer=none]``) in ablations.
- Failed, incomplete (``running``: killed or still going) and missing jobs print as FAILED /
  INCOMPLETE / MISSING in their cells, and are listed under the table with their error and
  directory.
- Superseded jobs: a job without a result whose configuration (model, pattern, pruner, allocation,
  sds, seed, variant) has a completed job in the same collection, e.g. a killed job rerun in another
  sweep directory. It leaves its cell to the completed job and is listed under the table with the
  directory that replaced it, instead of marking the cell ``[1/2 ok, KILLED]``.

Every table states its protocol (:class:`Protocol`): the perplexity dataset, the evaluation window
length and number of windows, the calibration set (source, nsamples x seqlen), the dtype and, for
zero-shot columns, the tasks, shots and example limit, read from each job's resolved config and
``metrics.json``. Settings shared by all jobs are stated once (Markdown notes, LaTeX caption); a
setting that differs only between models (the window count of another tokenizer) is stated per
model; one that differs within a model gets a ``Protocol`` column, per row, so rows measured
differently are never silently set side by side. Markdown and LaTeX leave out columns without a
single number (paper and Δ where the paper gives nothing, a metric a model never measured); the
CSV keeps every column, for scripts.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sds_exp.reporting.collect import JobLabel, JobRecord, acts_after_prune, describe_jobs, optimization_results
from sds_exp.reporting.paper import PaperNumber, find_paper_number

__all__ = [
    "Metric",
    "Cell",
    "Row",
    "Protocol",
    "PROTOCOL_FIELDS",
    "job_protocol",
    "dataset_name",
    "Table",
    "build_table",
    "supersessions",
    "to_markdown",
    "to_csv",
    "to_latex",
    "write_table",
]

log = logging.getLogger(__name__)

# Worst first: the word a cell shows when none of its jobs gave a number.
_STATUS_WORDS = {"failed": "FAILED", "killed": "KILLED", "running": "INCOMPLETE", "missing": "MISSING"}
# Printed cells that carry no number and no status: a column of only these is left out.
_EMPTY_TEXTS = {"n/a", "—", "not run", ""}
# The protocol settings a table states, in this order (see job_protocol).
PROTOCOL_FIELDS = ("eval seqlen", "windows", "calibration", "dtype", "0-shot tasks", "0-shot shots", "0-shot limit")


def dataset_name(dataset: str) -> str:
    """How a perplexity dataset is named in captions and axis labels (``WikiText2 test``)."""
    from sds_exp.evaluation.perplexity import DATASET_NAMES

    return DATASET_NAMES.get(dataset, dataset)


def _proto_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def job_protocol(job: JobRecord, key: str, dense: bool = False) -> dict[str, str]:
    """How the number ``job.metrics[key]`` (``final/wikitext2/ppl``) was measured: field -> text.

    Fields (:data:`PROTOCOL_FIELDS`; unknown ones are left out): for perplexity ``eval seqlen``
    (``benchmark.ppl.seqlen``) and ``windows`` (``<stage>/<dataset>/windows`` in metrics.json, so
    ``max_windows`` and per-stage limits show); for zero-shot the tasks, shots and example limit;
    ``calibration`` (``<data option> <nsamples> × <seqlen>``; not for ``dense``, which uses none) and
    ``dtype``.
    """
    stage, _, name = key.partition("/")
    raw: dict[str, Any] = {}
    if name.endswith("/ppl"):
        raw["eval seqlen"] = job.value("benchmark.ppl.seqlen")
        raw["windows"] = job.metrics.get(f"{stage}/{name[: -len('/ppl')]}/windows")
    elif name.startswith("zeroshot/"):
        tasks = job.value("benchmark.zeroshot.tasks")
        raw["0-shot tasks"] = tasks
        raw["0-shot shots"] = job.value("benchmark.zeroshot.num_fewshot")
        if tasks is not None:
            raw["0-shot limit"] = job.value("benchmark.zeroshot.limit") or "all examples"
    if not dense:
        source, nsamples, seqlen = job.choices.get("data"), job.value("data.nsamples"), job.value("data.seqlen")
        if nsamples is not None or seqlen is not None:
            raw["calibration"] = f"{source or '?'} {_proto_text(nsamples) or '?'} × {_proto_text(seqlen) or '?'}"
        elif source is not None:
            path = job.value("data.path")
            raw["calibration"] = f"{source} ({Path(str(path)).name})" if path else source
    raw["dtype"] = job.value("dtype")
    return {k: t for k, v in raw.items() if (t := _proto_text(v)) is not None}


@dataclass(frozen=True)
class Metric:
    """A table metric: the metrics.json name without its stage, and how to print it."""

    name: str  # e.g. "wikitext2/ppl", "zeroshot/average/acc"
    label: str  # column header
    scale: float = 1.0  # printed value = stored value * scale (accuracies in %)


@dataclass
class Cell:
    """One model x row x metric: our number over seeds, the jobs behind it, the paper's number."""

    values: list[float] = field(default_factory=list)  # one per seed
    jobs: list[JobRecord] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)  # statuses of the jobs that gave nothing
    paper: PaperNumber | None = None
    scale: float = 1.0
    derived: bool = False  # a baseline read from the prune stage of SDS jobs
    spread: tuple[float, float] | None = None  # dense only: (min, max) when jobs disagree
    protocols: list[dict[str, str]] = field(default_factory=list)  # job_protocol of each job behind a value

    @property
    def ok(self) -> int:
        """Jobs that gave a number (or finished without measuring this metric)."""
        return len(self.jobs) - len(self.unusable)

    @property
    def n(self) -> int:
        """Seeds with a number."""
        return len(self.values)

    @property
    def mean(self) -> float | None:
        """Mean over seeds, printed units."""
        return statistics.fmean(self.values) * self.scale if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None for fewer than two)."""
        return statistics.stdev(self.values) * self.scale if len(self.values) > 1 else None

    @property
    def delta(self) -> float | None:
        """Ours - paper, printed units."""
        return self.mean - self.paper.value if self.mean is not None and self.paper is not None else None

    @property
    def problem(self) -> str | None:
        """FAILED / INCOMPLETE / MISSING for the worst job that gave nothing, None if all did."""
        if not self.unusable:
            return None
        return next((_STATUS_WORDS[s] for s in _STATUS_WORDS if s in self.unusable), "MISSING")


@dataclass
class Row:
    """A method (with its variant) at one pattern; ``kind`` is dense | baseline | sds."""

    pattern: str
    sparsity: float | None
    structured: bool
    method: str
    variant: tuple[tuple[str, str], ...]
    kind: str
    # (model, metric name) -> cell
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    @property
    def derived(self) -> bool:
        """Some cell is a baseline read from the prune stage of SDS jobs."""
        return any(c.derived for c in self.cells.values())

    @property
    def label(self) -> str:
        """Method plus variant, as printed."""
        return self.method + (" [" + ", ".join(f"{k}={v}" for k, v in self.variant) + "]" if self.variant else "")


@dataclass
class Table:
    """Everything the writers need; build it with :func:`build_table`."""

    models: list[str]
    model_names: dict[str, str]
    metrics: list[Metric]
    rows: list[Row]
    jobs: list[JobRecord]
    stage: str
    notes: list[str] = field(default_factory=list)
    dataset: str = "wikitext2"
    protocol: Protocol | None = None

    # (job without a result, the completed job with the same configuration that replaces it)
    superseded: list[tuple[JobRecord, JobRecord]] = field(default_factory=list)

    @property
    def problems(self) -> list[JobRecord]:
        """Jobs without a complete result that no completed job replaces."""
        replaced = {id(old) for old, _ in self.superseded}
        return [j for j in self.jobs if j.status != "completed" and id(j) not in replaced]


def _distinct(protocols: list[dict[str, str]], name: str) -> list[str]:
    return list(dict.fromkeys(p[name] for p in protocols if name in p))


@dataclass
class Protocol:
    """How the table's numbers were measured, decided over all its cells (see the module docstring).

    Attributes:
        dataset: the perplexity dataset (``wikitext2``, ``wikitext2_val``, ``c4``).
        common: field -> the one value of every job that reports it.
        per_model: field -> {model: value}: one value per model, not the same for all.
        per_row: fields whose value differs within a model: printed per row (``Protocol`` column).
        unknown: fields no job recorded.
    """

    dataset: str
    common: dict[str, str] = field(default_factory=dict)
    per_model: dict[str, dict[str, str]] = field(default_factory=dict)
    per_row: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, rows: list[Row], models: list[str], dataset: str, fields: tuple[str, ...]) -> Protocol:
        by_model: dict[str, list[dict[str, str]]] = {m: [] for m in models}
        for row in rows:
            for (model, _), cell in row.cells.items():
                by_model.setdefault(model, []).extend(cell.protocols)
        every = [p for ps in by_model.values() for p in ps]
        proto = cls(dataset)
        for name in fields:
            values = _distinct(every, name)
            if not values:
                proto.unknown.append(name)
            elif len(values) == 1:
                proto.common[name] = values[0]
            elif all(len(_distinct(ps, name)) <= 1 for ps in by_model.values()):
                proto.per_model[name] = {m: v[0] for m, ps in by_model.items() if (v := _distinct(ps, name))}
            else:
                proto.per_row.append(name)
        return proto

    def sentence(self, model_names: dict[str, str] | None = None) -> str:
        """``Protocol: perplexity on WikiText2 test (`wikitext2`), windows of 2048 tokens, 148 windows; ...``."""
        names = model_names or {}
        head = f"perplexity on {dataset_name(self.dataset)} (`{self.dataset}`)"
        done: set[str] = set()
        if "eval seqlen" in self.common and "windows" in self.common:
            head += f", {self.common['windows']} non-overlapping windows of {self.common['eval seqlen']} tokens"
            done = {"eval seqlen", "windows"}
        elif "eval seqlen" in self.common:
            head += f", non-overlapping windows of {self.common['eval seqlen']} tokens"
            done = {"eval seqlen"}
        else:
            head += ", non-overlapping windows"
        parts = [head]
        for name in PROTOCOL_FIELDS:
            if name in done:
                continue
            if name in self.common:
                parts.append(_field_text(name, self.common[name]))
            elif name in self.per_model:
                parts.append(
                    ", ".join(f"{_field_text(name, v)} ({names.get(m, m)})" for m, v in self.per_model[name].items())
                )
        if self.per_row:
            parts.append(f"differing between rows, see the Protocol column: {', '.join(self.per_row)}")
        if self.unknown:
            parts.append(f"not recorded: {', '.join(self.unknown)}")
        return "Protocol: " + "; ".join(parts) + "."

    def row_text(self, row: Row) -> str:
        """The row's values of the :attr:`per_row` fields (``eval seqlen 256; 2 windows``)."""
        protocols = [p for c in row.cells.values() for p in c.protocols]
        parts = []
        for name in self.per_row:
            values = _distinct(protocols, name)
            if values:
                parts.append(_field_text(name, "/".join(values)))
        return "; ".join(parts)


def _field_text(name: str, value: str) -> str:
    return {
        "eval seqlen": f"windows of {value} tokens",
        "windows": f"{value} windows",
        "calibration": f"calibration {value}",
        "dtype": f"dtype {value}",
        "0-shot tasks": f"0-shot tasks {value}",
        "0-shot shots": f"{value} few-shot examples",
        "0-shot limit": f"0-shot: {value} of each task" if value == "all examples" else f"0-shot limit {value}",
    }.get(name, f"{name} {value}")


def _display_names(jobs: list[JobRecord], key: str, fallback: Callable[[JobRecord], str | None]) -> dict[str, str]:
    names: dict[str, str] = {}
    for job in jobs:
        choice = job.choices.get(key)
        if choice is not None and choice not in names and (name := fallback(job)):
            names[choice] = name
    return names


def _class_display_name(target: object) -> str:
    """A pruner class's ``display_name`` ("Pruner-Zero"), else its class name; importable or not."""
    from hydra.utils import get_class

    name = str(target).rsplit(".", 1)[-1]
    try:
        return getattr(get_class(str(target)), "display_name", name)
    except Exception:  # a record from another checkout: its class name is the best we have
        return name


def _pruner_name(job: JobRecord) -> str | None:
    target = job.value("pruner._target_")
    if not target:
        return None
    name = _class_display_name(target)
    base = job.value("pruner.base._target_")  # a wrapper (DSnoT) is named with what it wraps: "DSnoT(Wanda)"
    return f"{name}({_class_display_name(base)})" if base else name


def _allocation_name(job: JobRecord) -> str | None:
    target = job.value("allocation._target_")
    return _class_display_name(target) if target else None


def _model_name(job: JobRecord) -> str | None:
    path = job.value("model.name_or_path")
    return str(path).rstrip("/").rsplit("/", 1)[-1] if path else None


def _fill(
    cell: Cell,
    members: list[tuple[JobRecord, JobLabel, bool]],
    key: str,
    usable: Callable[[JobRecord], bool],
) -> None:
    """Average the metric per seed over the usable jobs (repeats of a seed are averaged first)."""
    by_seed: dict[str, list[float]] = {}
    for job, lab, _ in members:
        cell.jobs.append(job)
        if not usable(job):
            cell.unusable.append(job.status)
            continue
        if key in job.metrics and math.isfinite(job.metrics[key]):
            by_seed.setdefault(str(lab.seed), []).append(job.metrics[key])
            cell.protocols.append(job_protocol(job, key))
    for seed, vals in by_seed.items():
        if len(vals) > 1:
            log.warning("%s: %d jobs with seed %s; averaging them as one sample", key, len(vals), seed)
    cell.values = [statistics.fmean(v) for v in by_seed.values()]


def supersessions(jobs: list[JobRecord], labels: list[JobLabel]) -> list[tuple[JobRecord, JobRecord]]:
    """Each job without a result paired with the first completed job of the same label, if any."""
    done: dict[JobLabel, JobRecord] = {}
    for job, lab in zip(jobs, labels, strict=True):
        if job.status == "completed":
            done.setdefault(lab, job)
    return [
        (job, done[lab]) for job, lab in zip(jobs, labels, strict=True) if job.status != "completed" and lab in done
    ]


def build_table(
    jobs: list[JobRecord],
    paper: list[PaperNumber],
    ppl_dataset: str = "wikitext2",
    zeroshot_metric: str = "acc",
    stage: str = "final",
) -> Table:
    """Group jobs into paper-layout rows and cells and attach the published numbers.

    Args:
        jobs: from :func:`sds_exp.reporting.collect.collect_jobs`.
        paper: from :func:`sds_exp.reporting.paper.load_paper_numbers` ([] for none).
        ppl_dataset: which perplexity (``wikitext2``, ``wikitext2_val`` or ``c4``).
        zeroshot_metric: the suite average of ``acc`` or ``acc_norm``.
        stage: the stage read for baseline and SDS rows (``final`` = the last stage each job ran).

    Returns:
        The table; the writers only format it.
    """
    labels = describe_jobs(jobs)
    superseded = supersessions(jobs, labels)
    replaced = {id(old) for old, _ in superseded}
    pairs = [(j, lab) for j, lab in zip(jobs, labels, strict=True) if id(j) not in replaced]
    metrics = [Metric(f"{ppl_dataset}/ppl", "ppl" if ppl_dataset == "wikitext2" else f"{ppl_dataset} ppl")]
    zs_name = f"zeroshot/average/{zeroshot_metric}"
    if any(k.endswith("/" + zs_name) for j in jobs for k in j.metrics) or any(
        j.value("benchmark.zeroshot") not in (None, "None") for j in jobs
    ):
        metrics.append(Metric(zs_name, f"0-shot {zeroshot_metric} %", 100.0))

    models = list(dict.fromkeys(lab.model for lab in labels))
    model_names = _display_names(jobs, "model", _model_name)
    model_names.update({n.model: n.model_name for n in paper if n.model in models})
    pruner_names = _display_names(jobs, "pruner", _pruner_name)
    allocation_names = _display_names(jobs, "allocation", _allocation_name)
    patterns = list(dict.fromkeys(lab.pattern for lab in labels))
    pruners = list(dict.fromkeys(lab.pruner for lab in labels))

    def base_name(lab: JobLabel) -> str:  # "Wanda", or with its layer-wise allocation "OWL-Wanda"
        name = pruner_names.get(lab.pruner, lab.pruner)
        if lab.allocation != "uniform":
            name = f"{allocation_names.get(lab.allocation, lab.allocation)}-{name}"
        return name

    def method(lab: JobLabel) -> str:
        name = base_name(lab)
        if lab.baseline:
            return name
        return f"SDS-{name}" + ("" if lab.sds == "default" else f" ({lab.sds})")

    # A row per (pattern, pruner, baseline/SDS, method, variant). A pruner with no prune_only job
    # for a model and pattern gets its baseline cell from the prune stage of that model's SDS jobs.
    has_baseline = {(lab.model, lab.pattern, lab.pruner, lab.allocation) for lab in labels if lab.baseline}
    members: dict[tuple, list[tuple[JobRecord, JobLabel, bool]]] = {}
    for job, lab in pairs:
        members.setdefault((lab.pattern, lab.pruner, not lab.baseline, method(lab), lab.variant), []).append(
            (job, lab, False)
        )
        if not lab.baseline and (lab.model, lab.pattern, lab.pruner, lab.allocation) not in has_baseline:
            variant = tuple((k, v) for k, v in lab.variant if not acts_after_prune(k))
            key = (
                lab.pattern,
                lab.pruner,
                False,
                base_name(lab),
                variant,
            )
            members.setdefault(key, []).append((job, lab, True))
    appearance = list(members)
    keys = sorted(
        members,
        key=lambda k: (patterns.index(k[0]), pruners.index(k[1]), k[2], appearance.index(k)),
    )

    rows = [_dense_row(pairs, models, metrics, paper)]
    for key in keys:
        pattern, _, is_sds, label, variant = key
        first = members[key][0][1]
        row = Row(
            pattern,
            first.sparsity,
            first.structured,
            label,
            variant,
            "sds" if is_sds else "baseline",
        )
        for model in models:
            in_model = [(j, lab, d) for j, lab, d in members[key] if lab.model == model]
            if not in_model:
                continue
            derived = in_model[0][2]
            for metric in metrics:
                cell = Cell(scale=metric.scale, derived=derived)
                if derived:
                    _fill(cell, in_model, f"prune/{metric.name}", lambda j: "prune" in j.stages_done)
                else:
                    _fill(cell, in_model, f"{stage}/{metric.name}", lambda j: j.status == "completed")
                cell.paper = find_paper_number(
                    paper, model, pattern, label, metric.name, [j.value for j, _, _ in in_model]
                )
                row.cells[(model, metric.name)] = cell
        rows.append(row)

    table = Table(models, model_names, metrics, rows, jobs, stage, dataset=ppl_dataset, superseded=superseded)
    fields = tuple(f for f in PROTOCOL_FIELDS if len(metrics) > 1 or not f.startswith("0-shot"))
    table.protocol = Protocol.of(rows, models, ppl_dataset, fields)
    table.notes = _notes(table)
    return table


def _dense_row(pairs, models, metrics, paper) -> Row:
    """The dense model, from the ``dense`` stage of any job of each model."""
    row = Row("", None, False, "Dense", (), "dense")
    for model in models:
        in_model = [(j, lab) for j, lab in pairs if lab.model == model]
        for metric in metrics:
            cell = Cell(scale=metric.scale)
            cell.jobs = [j for j, _ in in_model]
            key = f"dense/{metric.name}"
            given = [j for j, _ in in_model if "dense" in j.stages_done and key in j.metrics]
            vals = [j.metrics[key] for j in given]
            cell.protocols = [job_protocol(j, key, dense=True) for j in given]
            if vals:  # one number, not a spread: the dense evaluation is deterministic
                cell.values = [statistics.median(vals)]
                if max(vals) - min(vals) > 1e-6 * max(abs(v) for v in vals):
                    cell.spread = (min(vals) * metric.scale, max(vals) * metric.scale)
            elif not any("dense" in j.stages_done for j in cell.jobs):
                cell.unusable = [j.status for j in cell.jobs]
            cell.paper = find_paper_number(paper, model, "", "Dense", metric.name, [j.value for j in cell.jobs])
            row.cells[(model, metric.name)] = cell
    return row


def _notes(table: Table) -> list[str]:
    notes = [table.protocol.sentence(table.model_names)] if table.protocol is not None else []
    notes.append(f"Rows: the `{table.stage}` stage of each job; Dense: the `dense` stage.")
    if any(r.derived for r in table.rows):
        notes.append(
            "†: a baseline read from the `prune` stage of the SDS jobs (the same one-shot prune, "
            "same calibration); other baseline values are `sds=prune_only` jobs."
        )
    else:
        notes.append("Baseline rows are `sds=prune_only` jobs.")
    for (model, metric), cell in table.rows[0].cells.items():
        if cell.spread is not None:
            notes.append(
                f"Dense {metric} of {table.model_names.get(model, model)} differs between jobs "
                f"({cell.spread[0]:.2f} to {cell.spread[1]:.2f}): they did not evaluate alike "
                "(see jobs.csv); the median is shown."
            )
    header, body, owner = _columns(table)
    if any(m.scale != 1.0 for m in table.metrics):
        notes.append("0-shot: the suite's unweighted task average, in %" + ("; Δ in points." if "Δ" in header else "."))
    seeds = {c.n for r in table.rows for c in r.cells.values()}
    if max(seeds, default=0) > 1:
        notes.append(f"Mean ± sample std over seeds where a configuration ran several (up to {max(seeds)}).")
    if "paper" in header:
        notes.append(
            "paper: published numbers (sds_exp/reporting/paper_numbers.csv); `*` = transcription "
            "confidence below high; n/a = not given by the paper; Δ = ours - paper; paper and Δ columns "
            "only where the paper gives a number."
        )
    if any(t == "—" for line in body for t, o in zip(line, owner, strict=True) if o is not None):
        notes.append("— = no number although the job(s) finished: not measured at that stage.")
    for sweep in dict.fromkeys(j.sweep for j in table.jobs if j.sweep is not None):
        best = optimization_results(sweep)
        if best and isinstance(best.get("best_value"), (int, float)):
            params = ", ".join(f"{k}={v}" for k, v in (best.get("best_params") or {}).items())
            notes.append(f"Optuna best of {sweep.name}: {best['best_value']:.6g} at {params or '?'}.")
    counts = {
        s: sum(j.status == s for j in table.jobs) for s in ("completed", "failed", "killed", "running", "missing")
    }
    tail = f"; {len(table.superseded)} of them superseded by a completed rerun" if table.superseded else ""
    notes.append(f"Jobs: {len(table.jobs)} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}{tail}).")
    return notes


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _texts(cell: Cell | None) -> tuple[str, str, str]:
    """(ours, paper, delta) as printed."""
    if cell is None:  # no job of this model in this row
        return "not run", "n/a", "n/a"
    paper = (
        "n/a" if cell.paper is None else f"{cell.paper.value:.2f}" + ("" if cell.paper.confidence == "high" else "*")
    )
    problem = cell.problem
    if cell.mean is None:
        ours = problem or "—"
        return ours, paper, ("n/a" if cell.paper is None else "—")
    ours = _num(cell.mean) + ("†" if cell.derived else "") + (f" ± {_num(cell.std)}" if cell.std is not None else "")
    if problem:
        ours += f" [{cell.ok}/{len(cell.jobs)} ok, {problem}]"
    return ours, paper, ("n/a" if cell.paper is None else _num(cell.delta, signed=True))


def _columns(table: Table) -> tuple[list[str], list[list[str]], list[str | None]]:
    """Header, body and each column's model (None for the leading label columns), all-empty columns dropped.

    A column none of whose cells holds a number or a status word (only n/a, — or "not run": a paper
    column the paper never fills, a metric a model never measured) is left out.
    """
    protocol = table.protocol
    lead = ["Sparsity", "Method"] + (["Protocol"] if protocol is not None and protocol.per_row else [])
    header, owner = list(lead), [None] * len(lead)
    for model in table.models:
        name = table.model_names.get(model, model)
        for metric in table.metrics:
            header += [f"{name} {metric.label}", "paper", "Δ"]
            owner += [model] * 3
    body = []
    for row in table.rows:
        line = [row.pattern or "0%", row.label] + ([protocol.row_text(row)] if len(lead) > 2 else [])
        for model in table.models:
            for metric in table.metrics:
                line += list(_texts(row.cells.get((model, metric.name))))
        body.append(line)
    keep = [i < len(lead) or any(line[i] not in _EMPTY_TEXTS for line in body) for i in range(len(header))]
    pick = lambda xs: [x for x, k in zip(xs, keep, strict=True) if k]  # noqa: E731
    return pick(header), [pick(line) for line in body], pick(owner)


def _grid(table: Table) -> tuple[list[str], list[list[str]]]:
    header, body, _ = _columns(table)
    return header, body


def _problem_lines(table: Table) -> list[list[str]]:
    return [
        [
            j.name,
            {"running": "INCOMPLETE"}.get(j.status, j.status.upper()),
            " ".join(j.overrides),
            j.error or "",
            str(j.directory) if j.directory else "(no directory)",
        ]
        for j in table.problems
    ]


def to_markdown(table: Table, title: str | None = None) -> str:
    """The table, its notes, and the list of failed/incomplete/missing jobs, as Markdown."""
    header, body, owner = _columns(table)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if o is None else "---:" for o in owner) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in body]
    lines += [""] + [f"- {n}" for n in table.notes]
    if table.problems:
        lines += [
            "",
            "Jobs without a result:",
            "",
            "| job | status | overrides | error | directory |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in _problem_lines(table)]
    if table.superseded:
        lines += [
            "",
            "Superseded jobs (a completed job with the same configuration gives their cell):",
            "",
            "| job | status | directory | replaced by |",
            "|---|---|---|---|",
        ]
        lines += [
            "| "
            + " | ".join(
                esc(c)
                for c in (
                    old.name,
                    {"running": "INCOMPLETE"}.get(old.status, old.status.upper()),
                    str(old.directory) if old.directory else "(no directory)",
                    str(new.directory),
                )
            )
            + " |"
            for old, new in table.superseded
        ]
    return "\n".join(lines) + "\n"


def to_csv(table: Table, path: str | Path) -> Path:
    """The Markdown's rows, one column per quantity (mean, std, n, status, paper, delta)."""
    path = Path(path)
    header = ["pattern", "method", "variant", "baseline_source"]
    for model in table.models:
        for metric in table.metrics:
            header += [f"{model}:{metric.name}:{q}" for q in ("mean", "std", "n", "status", "paper", "delta")]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in table.rows:
            flags = {c.derived for c in row.cells.values()}
            source = ""
            if row.kind == "baseline":
                source = "prune_only jobs" if flags == {False} else "prune stage of SDS jobs"
                source = "mixed" if len(flags) > 1 else source
            variant = ";".join(f"{k}={v}" for k, v in row.variant)
            line: list[Any] = [row.pattern or "0%", row.method, variant, source]
            for model in table.models:
                for metric in table.metrics:
                    cell = row.cells.get((model, metric.name))
                    if cell is None:
                        line += ["", "", 0, "not run", "n/a", ""]
                        continue
                    status = "ok" if cell.mean is not None else "not measured"
                    if cell.problem:
                        status = (
                            cell.problem
                            if cell.mean is None
                            else (f"partial ({cell.ok}/{len(cell.jobs)} ok, {cell.problem})")
                        )
                    line += [
                        _raw(cell.mean),
                        _raw(cell.std),
                        cell.n,
                        status,
                        "n/a" if cell.paper is None else cell.paper.value,
                        _raw(cell.delta),
                    ]
            writer.writerow(line)
    return path


def _raw(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex(text: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    return (
        out.replace("±", r"$\pm$")
        .replace("†", r"$^\dagger$")
        .replace("Δ", r"$\Delta$")
        .replace("—", "--")
        .replace("*", r"$^*$")
        .replace("×", r"$\times$")
    )


def to_latex(table: Table, caption: str | None = None, label: str | None = None) -> str:
    r"""A booktabs table: no vertical rules, no ``\resizebox``; one column group per model.

    Needs ``\usepackage{booktabs}`` only. The caption (above the table) is ``caption``, the protocol
    sentence and the notes; the jobs without a result follow ``\end{table}`` as ``%`` comments.
    """
    header, body, owner = _columns(table)
    lead = owner.count(None)
    groups = [(m, owner.count(m)) for m in table.models if owner.count(m)]
    cols = "l" * lead + "r" * (len(header) - lead)
    caption_text = (caption + ". " if caption else "") + " ".join(table.notes)
    lines = [
        r"% needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{_latex(caption_text.replace('`', ''))}}}",
    ]
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{cols}}}", r"\toprule"]
    lines.append(
        " & " * lead
        + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{_latex(table.model_names.get(m, m))}}}" for m, n in groups)
        + r" \\"
    )
    rules, start = [], lead + 1
    for _, n in groups:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    name_of = {table.model_names.get(m, m) + " " for m in table.models}
    sub = [next((h[len(p) :] for p in name_of if h.startswith(p)), h) for h in header[lead:]]
    lines.append(" & ".join([*header[:lead], *map(_latex, sub)]) + r" \\")
    lines.append(r"\midrule")
    previous = None
    for row, line in zip(table.rows, body, strict=True):
        if previous is not None and row.pattern != previous:
            lines.append(r"\midrule")
        first = line[0] if row.pattern != previous else ""
        previous = row.pattern
        lines.append(" & ".join(_latex(c) for c in [first, *line[1:]]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    for job in _problem_lines(table):  # kept out of the typeset table, but in the file
        lines.append("% " + " | ".join(job))
    for old, new in table.superseded:
        lines.append(f"% superseded: {old.name} ({old.status}) {old.directory or '(no directory)'} -> {new.directory}")
    return "\n".join(lines) + "\n"


def write_table(table: Table, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv``, ``table.tex`` and ``jobs.csv`` (one line per job)."""
    from sds_exp.reporting.collect import write_jobs_csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": out / "table.md",
        "csv": out / "table.csv",
        "tex": out / "table.tex",
        "jobs": out / "jobs.csv",
    }
    paths["md"].write_text(to_markdown(table, title), encoding="utf-8")
    to_csv(table, paths["csv"])
    paths["tex"].write_text(to_latex(table, title), encoding="utf-8")
    stage_metrics = [f"{s}/{m.name}" for s in ("dense", "prune", table.stage) for m in table.metrics]
    stage_metrics += [f"{s}/{table.dataset}/windows" for s in ("dense", "prune", table.stage)]
    replaced_by = {id(old): new.directory for old, new in table.superseded}
    write_jobs_csv(table.jobs, paths["jobs"], list(dict.fromkeys(stage_metrics)), replaced_by)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
