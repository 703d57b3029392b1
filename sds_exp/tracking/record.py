"""The job's record, ``metrics.json``: one schema that the job writes and ``sds_exp.reporting`` reads.

The record says what the run directory holds *now*: the metrics of every finished stage, whether the
run completed, and the history of attempts that wrote into the directory (an attempt refused before it
started leaves the record's numbers as they were and only adds itself to ``attempts``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sds_exp.tracking.results import write_json

__all__ = ["RunRecord", "Attempt", "RecordError", "STATUSES", "SCHEMA_VERSION", "now"]

SCHEMA_VERSION = 2
# running: started and not finished (still running, or killed by SIGKILL / a node failure)
STATUSES = ("running", "completed", "failed", "killed")


class RecordError(ValueError):
    """A metrics.json that cannot be read; the message names the file."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Attempt:
    """One process that ran (or tried to run) the job in this directory."""

    started: str
    status: str = "running"
    ended: str | None = None
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    resumed_after: str | None = None  # the checkpoint stage it continued from
    git_sha: str | None = None


@dataclass
class RunRecord:
    """The content of ``metrics.json``.

    Attributes:
        status: one of :data:`STATUSES`.
        error: why the run failed or was killed ("ExcType: message"), else None.
        choices: config-group choices (``model``, ``pruner``, ...).
        overrides: the command-line overrides of the attempt that produced the metrics.
        metrics: flat ``stage/benchmark/metric`` numbers.
        stages_done: stages evaluated (and checkpointed), in order.
        resumed_from: the run directory whose checkpoint the metrics continue, if any.
        lm_eval_versions: task versions of the zero-shot evaluation.
        tracker: the experiment tracker's run id and next step, so a resumed job continues its run.
        warnings: optional outputs that could not be written (cache, plots, media).
        attempts: every attempt in this directory, oldest first.
    """

    status: str = "running"
    error: str | None = None
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    stages_done: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    lm_eval_versions: dict[str, Any] | None = None
    tracker: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "metrics.json") -> RunRecord:
        """Build from parsed JSON; schema-1 files (before attempts existed) read as one attempt-less record."""
        if not isinstance(raw, dict):
            raise RecordError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        status = raw.get("status")
        if status not in STATUSES:
            raise RecordError(f"{source}: status={status!r}; allowed: {', '.join(STATUSES)}")
        metrics = raw.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise RecordError(f"{source}: 'metrics' must be an object")
        attempts = [Attempt(**a) for a in raw.get("attempts") or []]
        return cls(
            status=status,
            error=raw.get("error"),
            choices={k: str(v) for k, v in (raw.get("choices") or {}).items() if v is not None},
            overrides=[str(o) for o in raw.get("overrides") or []],
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            stages_done=list(raw.get("stages_done") or []),
            resumed_from=raw.get("resumed_from"),
            lm_eval_versions=raw.get("lm_eval_versions"),
            tracker=dict(raw.get("tracker") or {}),
            warnings=list(raw.get("warnings") or []),
            attempts=attempts,
            schema=int(raw.get("schema", 1)),
        )

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        except OSError as exc:
            raise RecordError(f"{path}: cannot be read ({exc})") from exc
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())
