"""Keep a sweep's record files, without its weights, where they outlive ``outputs/``.

``outputs/`` is scratch: a cluster purge, a new machine or a fresh clone loses it, and with it every
number a table or figure was drawn from. :func:`archive_runs` copies the small text records of sweep or
run directories (``metrics.json``, ``.hydra/``, ``layers.json``, ``env.json``, ``multirun.yaml``, ...)
into a directory that can be committed, keeping the layout, so that ``make_table`` and ``plot_sweep``
read the archive exactly as they read the sweep. Checkpoints, saved models, plots and anything above a
size limit stay behind (the ``skipped`` list says which).

    python scripts/archive_runs.py outputs/multiruns/<sweep> [...] --to docs/runs/<name>
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ArchiveReport", "archive_runs", "main"]

log = logging.getLogger(__name__)

# What a job or a sweep writes that a table, a figure or a provenance question needs.
RECORD_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".csv", ".md", ".tex", ".log")
# Weights, checkpoints, stage histograms: large, and reproducible from the records' commands.
SKIP_DIRS = {"checkpoint", "model", "wandb", "__pycache__"}
MAX_BYTES = 1_000_000


@dataclass
class ArchiveReport:
    """What one call copied and left behind, as paths relative to the archive root."""

    copied: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _is_record(path: Path, max_bytes: int) -> str | None:
    """``None`` when ``path`` belongs in the archive, else the reason it does not."""
    if path.suffix not in RECORD_SUFFIXES:
        return f"not a record file ({path.suffix or 'no suffix'})"
    size = path.stat().st_size
    if size > max_bytes:
        return f"{size} bytes > {max_bytes}"
    return None


def archive_runs(sources: list[Path], dest: Path, *, max_bytes: int = MAX_BYTES) -> ArchiveReport:
    """Copy the record files of each source directory into ``dest/<source name>/``.

    Refuses a source that is not a directory or holds no ``metrics.json`` anywhere (nothing a table
    could read), and two sources with the same name (one would overwrite the other). Files already in
    the archive are replaced: rerunning after a resumed sweep brings the archive up to date.
    """
    names = [s.resolve().name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"archive: two sources share a directory name ({names}); archive them separately")
    for source in sources:
        if not source.is_dir():
            raise FileNotFoundError(f"archive: {source} is not a directory")
        if not any(source.rglob("metrics.json")):
            raise ValueError(f"archive: {source} holds no metrics.json: not a sweep or run directory")
    report = ArchiveReport()
    for source in sources:
        name = Path(source.resolve().name)
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if any(part in SKIP_DIRS for part in rel.parts) or not path.is_file():
                continue
            reason = _is_record(path, max_bytes)
            if reason is not None:
                report.skipped.append((name / rel, reason))
                continue
            target = dest / name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            report.copied.append(name / rel)
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, archive, log what was copied and skipped; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, help="sweep (multirun) or run directories")
    parser.add_argument("--to", type=Path, required=True, help="archive directory (e.g. docs/runs/<name>)")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="skip record files larger than this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        report = archive_runs(args.sources, args.to, max_bytes=args.max_bytes)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    for rel, reason in report.skipped:
        log.info("skipped %s: %s", rel, reason)
    log.info("archived %d files into %s (%d skipped)", len(report.copied), args.to, len(report.skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
