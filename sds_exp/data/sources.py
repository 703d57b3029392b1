"""Raw text sources, read from the local data mirror when it is configured and from the HF hub otherwise.

The mirror (``paths.data_dir``, from ``$SDS_DATA_DIR`` or ``../shared/data`` beside the checkout) holds:
  wikitext-2-raw-v1/test.jsonl                       the 4,358 test rows, exact
  wikitext-2-raw-v1/train.first1MB_nonempty_rows.txt the first 1 MB of non-empty train rows
  wikitext-2-raw-v1/validation.first100KB_nonempty_rows.txt
  c4/c4_validation_2k.parquet                        2,000 C4-en documents
C4 split (documented, non-overlapping): documents [0, 1000) are the CALIBRATION pool and documents
[1000, 2000) the EVALUATION set for C4 perplexity. The hub path uses the references' shards instead
(c4-train.00000-of-01024 for calibration, the first 1,100 documents of c4-validation.00000-of-00008).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = [
    "DataUnavailableError", "mirror_dir", "wikitext2_rows", "c4_documents", "C4_CALIB_DOCS", "C4_EVAL_DOCS",
]

log = logging.getLogger(__name__)

C4_CALIB_DOCS = slice(0, 1000)
C4_EVAL_DOCS = slice(1000, 2000)
_WIKI = "wikitext-2-raw-v1"


class DataUnavailableError(FileNotFoundError):
    """Neither the data mirror nor the hub can provide a dataset."""


def mirror_dir(data_dir: str | Path | None) -> Path | None:
    """The data mirror folder if it exists, else None."""
    if data_dir in (None, "", "null"):
        return None
    path = Path(data_dir).expanduser()
    return path if path.is_dir() else None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "", "false")


def _from_hub(what: str, data_dir, loader):
    if _hub_offline():
        raise DataUnavailableError(
            f"{what}: no data mirror at paths.data_dir={data_dir!r} and the hub is disabled (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE). Set SDS_DATA_DIR (or paths.data_dir=...) to the data mirror, e.g. ../shared/data"
        )
    try:
        return loader()
    except Exception as exc:  # network errors come in many types
        raise DataUnavailableError(
            f"{what}: no data mirror at paths.data_dir={data_dir!r} and the hub failed ({type(exc).__name__}: {exc}). "
            "Set SDS_DATA_DIR (or paths.data_dir=...) to the data mirror, e.g. ../shared/data"
        ) from exc


def wikitext2_rows(split: str, data_dir: str | Path | None) -> list[str]:
    """Rows of WikiText-2 raw. ``test`` is exact from the mirror; ``train``/``validation`` from the mirror
    are its first 1 MB / 100 KB of non-empty rows (each keeping its trailing newline)."""
    root = mirror_dir(data_dir)
    if root is not None:
        folder = root / _WIKI
        if split == "test":
            path = folder / "test.jsonl"
            with path.open(encoding="utf-8") as fh:
                return [json.loads(line)["text"] for line in fh]
        names = {"train": "train.first1MB_nonempty_rows.txt", "validation": "validation.first100KB_nonempty_rows.txt"}
        if split not in names:
            raise ValueError(f"wikitext2 split={split!r}; allowed: test, train, validation")
        text = (folder / names[split]).read_text(encoding="utf-8")
        return text.splitlines(keepends=True)

    def load():
        from datasets import load_dataset

        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])

    return _from_hub(f"wikitext2/{split}", data_dir, load)


def c4_documents(part: str, data_dir: str | Path | None) -> list[str]:
    """C4 documents: ``part`` = "calibration" or "evaluation" (see the module docstring for the split)."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"c4 part={part!r}; allowed: calibration, evaluation")
    root = mirror_dir(data_dir)
    if root is not None:
        import pyarrow.parquet as pq

        texts = pq.read_table(root / "c4" / "c4_validation_2k.parquet", columns=["text"]).column("text").to_pylist()
        return texts[C4_CALIB_DOCS if part == "calibration" else C4_EVAL_DOCS]

    def load():
        from datasets import load_dataset

        if part == "calibration":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
            return list(load_dataset("allenai/c4", data_files=files, split="train")["text"])
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        return list(load_dataset("allenai/c4", data_files=files, split="validation")["text"][:1100])

    return _from_hub(f"c4/{part}", data_dir, load)
