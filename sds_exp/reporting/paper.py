"""The SDS paper's published numbers (``paper_numbers.csv``) and how a cell finds its own.

One CSV line per published number: ``model`` (our config option), ``model_name`` (as the paper
writes it), ``pattern`` ("2:4", "50%"; empty = any, for the dense model), ``method`` ("Dense",
"SparseGPT", "SDS-Wanda", ...), ``condition`` (``key=value[|value];...``: the settings under which
the number is comparable, checked against each job's choices and resolved config), ``metric``,
``value``, ``unit`` (``ppl`` or ``%``), ``confidence`` of the transcription, ``source`` and
``note``. Anything the paper does not give is simply absent, and the table prints "n/a" for it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PAPER_NUMBERS", "PaperNumber", "load_paper_numbers", "find_paper_number"]

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.csv")


@dataclass(frozen=True)
class PaperNumber:
    """One published number and the conditions under which ours compares to it."""

    model: str
    model_name: str
    pattern: str
    method: str
    conditions: tuple[tuple[str, tuple[str, ...]], ...]
    metric: str
    value: float
    unit: str
    confidence: str
    source: str
    note: str = ""

    def holds_for(self, lookup: Callable[[str], Any]) -> bool:
        """False only if a condition is known to fail (unknown settings pass)."""
        for key, allowed in self.conditions:
            value = lookup(key)
            if value is None:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if text not in allowed:
                return False
        return True


def _conditions(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep:
            raise ValueError(f"condition {part!r} is not key=value[|value]")
        out.append((key.strip(), tuple(v.strip() for v in values.split("|"))))
    return tuple(out)


def load_paper_numbers(path: str | Path | None = None) -> list[PaperNumber]:
    """Read the published numbers (default: the CSV shipped beside this module).

    Raises:
        ValueError: a line lacks a column or has a non-numeric value.
    """
    path = Path(path) if path is not None else PAPER_NUMBERS
    numbers = []
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            try:
                numbers.append(
                    PaperNumber(
                        model=row["model"],
                        model_name=row["model_name"],
                        pattern=row["pattern"],
                        method=row["method"],
                        conditions=_conditions(row["condition"] or ""),
                        metric=row["metric"],
                        value=float(row["value"]),
                        unit=row["unit"],
                        confidence=row["confidence"],
                        source=row["source"],
                        note=row.get("note") or "",
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
    return numbers


def find_paper_number(
    numbers: list[PaperNumber],
    model: str,
    pattern: str,
    method: str,
    metric: str,
    lookups: list[Callable[[str], Any]],
) -> PaperNumber | None:
    """The most specific published number whose conditions hold for every job of a cell.

    Args:
        numbers: from :func:`load_paper_numbers`.
        model: model choice.
        pattern: "2:4" / "50%"; "" matches only pattern-free lines (Dense).
        method: "SDS-SparseGPT" etc. (without the variant).
        metric: "wikitext2/ppl" or "zeroshot/average/acc".
        lookups: one ``key -> value`` function per job of the cell (``JobRecord.value``).
    """
    candidates = [
        n
        for n in numbers
        if n.model == model
        and n.method == method
        and n.metric == metric
        and n.pattern in ("", pattern)
        and all(n.holds_for(lookup) for lookup in lookups)
    ]
    return max(candidates, key=lambda n: len(n.conditions), default=None)
