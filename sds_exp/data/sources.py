"""Raw text sources, read from the local data mirror when it is configured and from the HF hub otherwise.

The mirror (``paths.data_dir``, from ``$SDS_DATA_DIR`` or ``../shared/data`` beside the checkout) holds:
  wikitext-2-raw-v1/test.jsonl                       the 4,358 test rows, exact
  wikitext-2-raw-v1/train.first1MB_nonempty_rows.txt the first 1 MB of non-empty train rows
  wikitext-2-raw-v1/validation.first100KB_nonempty_rows.txt
  c4/c4_validation_2k.parquet                        2,000 C4-en documents
C4 split (documented, non-overlapping): documents [0, 1000) are the CALIBRATION pool and documents
[1000, 2000) the EVALUATION set for C4 perplexity. The hub path uses the references' shards instead
(c4-train.00000-of-01024 for calibration, the first 1,100 documents of c4-validation.00000-of-00008).
Every mirror file is checked against the mirror's SHA256SUMS before it is parsed (once per file state, see
:mod:`sds_exp.data.mirror`); a damaged file or a parse error raises :class:`MirrorError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sds_exp.data.mirror import MirrorError, default_cache_file, mirror_dir, verify_mirror_files

__all__ = [
    "DataUnavailableError",
    "MirrorError",
    "mirror_dir",
    "wikitext2_rows",
    "c4_documents",
    "C4_CALIB_DOCS",
    "C4_EVAL_DOCS",
    "MIRROR_FILES",
    "dataset_files",
]

log = logging.getLogger(__name__)

C4_CALIB_DOCS = slice(0, 1000)
C4_EVAL_DOCS = slice(1000, 2000)
_WIKI = "wikitext-2-raw-v1"

# dataset/split -> the mirror file it is read from (relative to paths.data_dir)
MIRROR_FILES: dict[str, str] = {
    "wikitext2/test": f"{_WIKI}/test.jsonl",
    "wikitext2/train": f"{_WIKI}/train.first1MB_nonempty_rows.txt",
    "wikitext2/validation": f"{_WIKI}/validation.first100KB_nonempty_rows.txt",
    "c4/calibration": "c4/c4_validation_2k.parquet",
    "c4/evaluation": "c4/c4_validation_2k.parquet",
}
_DATASET_KEYS = {
    "wikitext2": "wikitext2/test",
    "wikitext2_train": "wikitext2/train",
    "wikitext2_validation": "wikitext2/validation",
    "wikitext2_val": "wikitext2/validation",  # the perplexity dataset name (sds_exp.evaluation.perplexity)
    "c4_calibration": "c4/calibration",
    "c4_evaluation": "c4/evaluation",
    "c4": "c4/evaluation",
}


class DataUnavailableError(FileNotFoundError):
    """Neither the data mirror nor the hub can provide a dataset."""


def dataset_files(name: str) -> list[str]:
    """Mirror files (relpaths) behind a dataset name: ``wikitext2`` (test), ``wikitext2_train``,
    ``wikitext2_validation`` (= ``wikitext2_val``, the validation perplexity set), ``c4_calibration``,
    ``c4_evaluation`` (= ``c4``, the perplexity set). Every perplexity dataset name is accepted."""
    if name not in _DATASET_KEYS:
        raise ValueError(f"dataset={name!r} is not known; allowed: {', '.join(_DATASET_KEYS)}")
    return [MIRROR_FILES[_DATASET_KEYS[name]]]


def _verified(root: Path, key: str) -> Path:
    """The mirror file of ``key`` (see MIRROR_FILES), checked against SHA256SUMS."""
    rel = MIRROR_FILES[key]
    verify_mirror_files(root, [rel], cache_file=default_cache_file())
    return root / rel


def _jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every line of a JSONL file; errors name the file and line."""
    rows = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise MirrorError(f"{path} line {n}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
            except json.JSONDecodeError as exc:
                raise MirrorError(
                    f"{path} line {n}: {exc.msg} (column {exc.colno}); the file is damaged or truncated"
                ) from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise MirrorError(
                    f"{path} line {n}: expected an object with a string 'text' field, got {str(row)[:80]!r}"
                )
            rows.append(row["text"])
    return rows


def _text_rows(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MirrorError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); the file is damaged") from exc
    return text.splitlines(keepends=True)


def _parquet_texts(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text"])
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise MirrorError(
            f"{path}: not a readable parquet file with a 'text' column ({type(exc).__name__}: "
            f"{exc}); the file is damaged or truncated"
        ) from exc
    return table.column("text").to_pylist()


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
        if f"wikitext2/{split}" not in MIRROR_FILES:
            raise ValueError(f"wikitext2 split={split!r}; allowed: test, train, validation")
        path = _verified(root, f"wikitext2/{split}")
        return _jsonl_texts(path) if split == "test" else _text_rows(path)

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
        texts = _parquet_texts(_verified(root, f"c4/{part}"))
        return texts[C4_CALIB_DOCS if part == "calibration" else C4_EVAL_DOCS]

    def load():
        from datasets import load_dataset

        if part == "calibration":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
            return list(load_dataset("allenai/c4", data_files=files, split="train")["text"])
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        return list(load_dataset("allenai/c4", data_files=files, split="validation")["text"][:1100])

    return _from_hub(f"c4/{part}", data_dir, load)
