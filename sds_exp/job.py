"""The job context: owns the run directory's record from the job's first line to its last.

``with Job(run_dir) as job:`` reads the directory's previous record before anything is written; until
:meth:`Job.begin` accepts the attempt (its config validated, its resume checked), a failure only adds
the attempt, with its reason, to the previous record, so a rerun with a typo never costs a number. After
``begin`` the record is this attempt's: per-stage metrics on disk after every stage, phase timing, the
tracker's lifecycle, and on the way out ``completed``, ``failed`` or ``killed`` (SIGTERM/SIGINT are turned
into :class:`JobKilled`) with ``failure.txt``. Metrics that a new attempt does not carry over (a fresh
start, or stages after the checkpoint it resumes from) are archived in ``history/`` first.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from torch import Tensor

from sds_exp.checkpoint import StageStore
from sds_exp.provenance import STAGE_ORDER, resume_differences
from sds_exp.provenance import fingerprint as config_fingerprint
from sds_exp.sds.timing import PhaseTimer
from sds_exp.tracking.record import Attempt, RecordError, RunRecord, now
from sds_exp.tracking.results import atomic_write_text, read_json, write_json
from sds_exp.tracking.tracker import NullTracker, Tracker, stage_free

__all__ = ["Job", "JobKilled", "ResumeRefused"]

log = logging.getLogger(__name__)

RECORD = "metrics.json"
STAGE_PREFIXES = (*STAGE_ORDER, "final")


class JobKilled(BaseException):
    """SIGTERM or SIGINT arrived; the job ends as ``killed``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"killed by {signal.Signals(signum).name}")


class ResumeRefused(ValueError):
    """The checkpoint was made under settings that change what it holds."""


def _stage_of_metric(key: str) -> str | None:
    """The stage a flat metric belongs to (``prune/...``, ``time/prune_s``, ``time/phase/prune/...``)."""
    parts = key.split("/")
    if parts[0] in STAGE_PREFIXES:
        return parts[0]
    if parts[0] == "time" and len(parts) > 1:
        head = parts[2] if parts[1] == "phase" and len(parts) > 2 else parts[1].removesuffix("_s")
        return head if head in STAGE_PREFIXES else None
    return None


class Job:
    """One attempt at a job in ``out_dir``; see the module docstring."""

    def __init__(
        self, out_dir: str | Path, *, choices: Mapping[str, str] | None = None, overrides: list[str] | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.choices, self.overrides = dict(choices or {}), list(overrides or [])
        self.record: RunRecord | None = None  # None until begin(): the attempt does not own the record yet
        self.previous: RunRecord | None = None
        self.attempt = Attempt(started=now(), overrides=self.overrides)
        self.timer = PhaseTimer()
        self.tracker: Tracker = NullTracker()
        self._tracker_factory: Callable[[dict[str, Any]], Tracker] | None = None
        self._tracker_open = False
        self._signals: dict[int, Any] = {}
        self._t0 = time.perf_counter()

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> Job:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.previous = self._read_previous(self.out_dir)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._signals[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        raise JobKilled(signum)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            if exc is not None:
                self._fail(exc)
        finally:
            for sig, handler in self._signals.items():
                signal.signal(sig, handler)
            if self._tracker_open:
                self._tracker_open = False
                self.tracker.__exit__(exc_type, exc, tb)
        return False

    def set_tracker(self, factory: Callable[[dict[str, Any]], Tracker]) -> None:
        """``fn(previous tracker state) -> Tracker``; opened by :meth:`begin`, or to report a refused new job."""
        self._tracker_factory = factory

    def _open_tracker(self, state: dict[str, Any]) -> None:
        self.tracker = self._tracker_factory(dict(state))
        self.tracker.__enter__()
        self._tracker_open = True

    def _read_previous(self, directory: Path) -> RunRecord | None:
        path = directory / RECORD
        if not path.is_file():
            return None
        try:
            return RunRecord.read(path)
        except RecordError as exc:  # keep the damaged file for a human, start a new record
            damaged = path.with_name(f"metrics.damaged-{time.strftime('%Y%m%d-%H%M%S')}.json")
            path.replace(damaged)
            log.warning("%s; moved to %s", exc, damaged)
            return None

    def _fail(self, exc: BaseException) -> None:
        # SystemExit: e.g. submitit's SLURM timeout handler, which requeues the job and exits it
        killed = isinstance(exc, (JobKilled, KeyboardInterrupt, SystemExit))
        status = "killed" if killed else "failed"
        error = str(exc) if isinstance(exc, JobKilled) else f"{type(exc).__name__}: {exc}"
        self.attempt.status, self.attempt.error, self.attempt.ended = status, error, now()
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if self.record is None:  # refused before it started: the previous record stays as it was
            record = self.previous or RunRecord(
                status=status, error=error, choices=self.choices, overrides=self.overrides
            )
            record.attempts.append(self.attempt)
            record.write(self.out_dir / RECORD)
            if self.previous is None and self._tracker_factory is not None:  # a new job: its failure is visible
                with self.optional("tracker of the refused job"):  # in a sweep's W&B project as well
                    self._open_tracker({})
                    self.tracker.summary({"status": status, "error": error})
            name = "failure.txt" if self.previous is None else f"attempts/{len(record.attempts)}-failure.txt"
            atomic_write_text(self.out_dir / name, text)
            log.error("job refused: %s (%s kept as it was)", error, self.out_dir / RECORD)
            return
        self.record.status, self.record.error = status, error
        self.record.metrics["time/job_s"] = time.perf_counter() - self._t0
        self.save()
        atomic_write_text(self.out_dir / "failure.txt", text)
        log.error("job %s: %s (partial results in %s)", status, error, self.out_dir / RECORD)

    # -- the attempt takes over --------------------------------------------------------------------
    def begin(
        self,
        *,
        resolved: dict[str, Any],
        provenance: dict[str, Any],
        environment: dict[str, Any],
        final_stage: str,
        resume: str | Path | None = None,
        config_yaml: str | None = None,
    ) -> StageStore:
        """Check the resume, take over the record, write config/env, open the tracker; returns the stage store.

        Args:
            resolved: the resolved config.
            provenance: what the checkpoints depend on beyond the config (data checksums, model files).
            environment: env.json content for this attempt.
            final_stage: the job's last stage (``final/*`` metrics are carried only from a checkpoint of it).
            resume: another run directory to continue from (None: this one).
            config_yaml: resolved_config.yaml text.
        """
        state_dir = Path(resume) if resume else self.out_dir
        current = config_fingerprint(resolved, **provenance)
        store = StageStore(state_dir / "checkpoint", current)
        committed = store.committed_fingerprint()
        carried: RunRecord | None = None
        if committed is not None:
            stage, saved = committed
            if not saved and (state_dir / "resolved_config.yaml").is_file():  # format-1 checkpoint
                saved = config_fingerprint(yaml.safe_load((state_dir / "resolved_config.yaml").read_text()))
                current = {k: v for k, v in current.items() if k.split(".")[0] not in provenance}
            refuse, warn = resume_differences(saved, current, stage)
            if refuse:
                raise ResumeRefused(
                    f"cannot resume from {state_dir} (checkpoint after stage {stage!r}): "
                    "settings that act on it differ:\n  " + "\n  ".join(refuse)
                )
            for line in warn:
                log.warning("resuming with a different %s (results may differ at rounding level)", line)
            carried = self.previous if state_dir == self.out_dir else self._read_previous(state_dir)
            self.attempt.resumed_after = stage
            log.info("resuming from %s after stage %r", state_dir, stage)
        self.record = self._new_record(carried, committed[0] if committed else None, state_dir, final_stage)
        self.attempt.git_sha = environment.get("git_sha")
        if config_yaml is not None:
            atomic_write_text(self.out_dir / "resolved_config.yaml", config_yaml)
        self._write_env(environment)
        if state_dir != self.out_dir:
            store = store.copy_to(self.out_dir / "checkpoint")
        self.save()
        if self._tracker_factory is not None:  # a resumed job continues its tracker run and its steps
            self._open_tracker(self.record.tracker)
            self.record.tracker["id"] = getattr(self.tracker, "run_id", None)
            self.record.tracker.setdefault("step", 0)
            self.save()
        return store

    def _new_record(self, carried: RunRecord | None, stage: str | None, state_dir: Path, final_stage: str) -> RunRecord:
        record = RunRecord(status="running", choices=self.choices, overrides=self.overrides)
        previous = self.previous
        record.attempts = [*(previous.attempts if previous else []), self.attempt]
        dropped = bool(previous and previous.metrics)
        if carried is not None and stage is not None:
            limit = STAGE_ORDER.index(stage)

            def keep(s: str | None) -> bool:
                if s == "final":
                    return stage == final_stage
                return s is None or STAGE_ORDER.index(s) <= limit

            record.metrics = {k: v for k, v in carried.metrics.items() if keep(_stage_of_metric(k))}
            record.stages_done = [s for s in carried.stages_done if keep(s)]
            record.lm_eval_versions = carried.lm_eval_versions
            record.tracker = dict(carried.tracker) if state_dir == self.out_dir else {}
            record.resumed_from = str(state_dir)
            dropped = bool(previous) and (state_dir != self.out_dir or set(previous.metrics) != set(record.metrics))
        if dropped:  # numbers this attempt does not carry over are archived, never lost
            archive = self.out_dir / "history" / f"metrics.{len(record.attempts) - 1}.json"
            previous.write(archive)
            log.info("the previous record is kept in %s", archive)
        return record

    def _write_env(self, environment: dict[str, Any]) -> None:
        path = self.out_dir / "env.json"
        env = dict(environment)
        if path.is_file():
            try:
                old = read_json(path)
            except ValueError:
                old = {}
            earlier = old.pop("previous", []) if isinstance(old, dict) else []
            if old:
                env["previous"] = [*earlier, old]
                if old.get("git_sha") != env.get("git_sha") or old.get("git_dirty") or env.get("git_dirty"):
                    log.warning(
                        "code version differs from the earlier attempt (%s%s -> %s%s); both are in %s",
                        old.get("git_sha"),
                        "+dirty" if old.get("git_dirty") else "",
                        env.get("git_sha"),
                        "+dirty" if env.get("git_dirty") else "",
                        path,
                    )
        write_json(path, env)

    # -- during the job ------------------------------------------------------------------------------
    def save(self) -> None:
        if self.record is not None:
            self.record.write(self.out_dir / RECORD)

    def record_stage(
        self, metrics: Mapping[str, float], stage: str, *, histogram: tuple[str, Tensor] | None = None, **extra: Any
    ) -> None:
        """A stage's metrics: into the record (with the phase times so far) and the tracker.

        The tracker gets stage-free keys (``wikitext2/ppl``) at step = the stage's index, plus a ``stage``
        field and the histogram layer's weights under one key, so its default panels plot over the stages.
        """
        assert self.record is not None, "record_stage before begin()"
        self.record.metrics.update(metrics)
        self.record.metrics.update({f"time/phase/{k}_s": v for k, v in self.timer.seconds.items()})
        for key, value in extra.items():
            setattr(self.record, key, value)
        if stage not in self.record.stages_done:
            self.record.stages_done.append(stage)
        step = STAGE_ORDER.index(stage)
        with self.optional(f"tracker log of stage {stage}"):
            self.tracker.log({**stage_free(metrics, stage), "stage": step}, step=step)
            if histogram is not None:
                self.tracker.log_histograms({f"weights/{histogram[0]}": histogram[1]}, step=step)
        self.record.tracker["step"] = step + 1
        self.save()

    def add_metrics(self, metrics: Mapping[str, float]) -> None:
        assert self.record is not None
        self.record.metrics.update(metrics)
        self.save()

    @contextmanager
    def optional(self, what: str) -> Iterator[None]:
        """An output the job's numbers do not depend on: a failure is a logged, recorded warning."""
        try:
            yield
        except Exception as exc:
            message = f"{what} failed: {type(exc).__name__}: {exc}"
            log.warning("%s (the job continues)", message)
            if self.record is not None:
                self.record.warnings.append(message)

    def complete(self) -> dict[str, float]:
        assert self.record is not None
        self.record.metrics["time/job_s"] = time.perf_counter() - self._t0
        self.record.status, self.record.error = "completed", None
        self.attempt.status, self.attempt.ended = "completed", now()
        stale = self.out_dir / "failure.txt"
        if stale.is_file():  # an earlier attempt's reason, kept beside its entry in `attempts`
            target = self.out_dir / "attempts" / f"{len(self.record.attempts) - 1}-failure.txt"
            target.parent.mkdir(exist_ok=True)
            stale.replace(target)
        self.save()
        with self.optional("tracker summary"):
            self.tracker.summary(self.record.metrics)
            self.tracker.log_table("stages", *self.stage_table())
        return dict(self.record.metrics)

    def stage_table(self) -> tuple[list[str], list[list[Any]]]:
        """(columns, rows): one row per finished stage, one column per stage-free metric."""
        assert self.record is not None
        rows = {s: stage_free(self.record.metrics, s) for s in self.record.stages_done}
        keys = sorted({k for r in rows.values() for k in r if not k.endswith(("/seconds", "/tokens_per_s"))})
        return ["stage", *keys], [[s, *(r.get(k) for k in keys)] for s, r in rows.items()]
