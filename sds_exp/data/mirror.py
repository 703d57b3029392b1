"""Integrity of the local data mirror: each file read is checked against the mirror's ``SHA256SUMS``.

``SHA256SUMS`` has ``sha256sum`` lines, ``<sha256>  ./<relpath>``. A file is hashed once per state: the
digest is cached in memory, and in a small JSON file when ``cache_file`` is given (see
:func:`configure_cache`), keyed on (absolute path, size, mtime_ns), so later jobs skip re-hashing. A file
whose digest differs from its entry raises :class:`MirrorError` (the mirror copy is damaged or truncated);
a file the list does not name only logs a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from sds_exp.tracking.results import sha256_file  # re-exported: the readers hash through this name

__all__ = [
    "MirrorError",
    "SUMS_FILE",
    "mirror_dir",
    "sha256_file",
    "read_sums",
    "verify_mirror_files",
    "mirror_provenance",
    "configure_cache",
    "default_cache_file",
]

log = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"

# (absolute path, size, mtime_ns) -> sha256 hex digest, for this process
_MEMORY: dict[tuple[str, int, int], str] = {}
_WARNED: set[str] = set()  # unlisted files already warned about
_CACHE_FILE: Path | None = None


class MirrorError(ValueError):
    """A data mirror file is damaged: wrong checksum or unparseable content."""


def mirror_dir(data_dir: str | Path | None) -> Path | None:
    """The data mirror folder if it exists, else None."""
    if data_dir in (None, "", "null"):
        return None
    path = Path(data_dir).expanduser()
    return path if path.is_dir() else None


def configure_cache(path: str | Path | None) -> None:
    """Set the JSON checksum cache used by the dataset readers (e.g. ``<paths.cache_dir>/mirror_sha256.json``);
    None: memory only."""
    global _CACHE_FILE
    _CACHE_FILE = Path(path).expanduser() if path not in (None, "") else None


def default_cache_file() -> Path | None:
    """The cache file set by :func:`configure_cache` (None: memory only)."""
    return _CACHE_FILE


def read_sums(data_dir: str | Path) -> dict[str, str] | None:
    """``SHA256SUMS`` of the mirror as {relpath: sha256} (relpaths without ``./``); None when it is absent."""
    path = Path(data_dir) / SUMS_FILE
    if not path.is_file():
        return None
    sums = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise MirrorError(f"{path} line {n}: not a '<sha256>  <path>' line: {line[:80]!r}")
        rel = parts[1].strip().lstrip("*")  # '*' marks binary mode in sha256sum output
        sums[rel[2:] if rel.startswith("./") else rel] = parts[0].lower()
    return sums


def _state_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _read_cache(cache_file: Path | None) -> dict[str, dict]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        files = json.loads(cache_file.read_text(encoding="utf-8")).get("files", {})
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("checksum cache %s is unreadable (%s); re-hashing", cache_file, exc)
        return {}


def _write_cache(cache_file: Path, files: dict[str, dict]) -> None:
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError as exc:
        log.warning("checksum cache %s could not be written (%s); files will be re-hashed next job", cache_file, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _digests(paths: list[Path], cache_file: Path | None) -> list[str]:
    """The sha256 of each file, from the memory cache, the JSON cache, or hashing (cached afterwards)."""
    keys = [_state_key(p) for p in paths]
    missing = list(dict.fromkeys(k for k in keys if k not in _MEMORY))
    if missing and cache_file is not None:
        disk = _read_cache(cache_file)
        for key in missing:
            entry = disk.get(key[0])
            if isinstance(entry, dict) and entry.get("size") == key[1] and entry.get("mtime_ns") == key[2]:
                _MEMORY[key] = str(entry.get("sha256"))
        hashed = [k for k in missing if k not in _MEMORY]
    else:
        disk, hashed = {}, missing
    for key in hashed:
        log.info("verifying %s (sha256)", key[0])
        _MEMORY[key] = sha256_file(key[0])
    if hashed and cache_file is not None:
        disk.update({k[0]: {"size": k[1], "mtime_ns": k[2], "sha256": _MEMORY[k]} for k in hashed})
        _write_cache(cache_file, disk)
    return [_MEMORY[k] for k in keys]


def verify_mirror_files(data_dir: str | Path, relpaths: list[str], cache_file: Path | None = None) -> dict[str, str]:
    """Check mirror files against ``SHA256SUMS``; returns {relpath: sha256}.

    Raises:
        FileNotFoundError: a file is missing from the mirror.
        MirrorError: a file's checksum differs from its ``SHA256SUMS`` entry.
    """
    root = Path(data_dir).expanduser()
    paths = []
    for rel in relpaths:
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"{rel} is missing from the data mirror {root} (paths.data_dir); "
                f"restore it, or point SDS_DATA_DIR at a complete mirror"
            )
        paths.append(path)
    sums = read_sums(root)
    if sums is None:
        log.warning("data mirror %s has no %s; its files cannot be verified", root, SUMS_FILE)
        sums = {}
    out = {}
    for rel, path, actual in zip(relpaths, paths, _digests(paths, cache_file), strict=True):
        expected = sums.get(rel)
        if expected is None:
            if str(path) not in _WARNED:
                _WARNED.add(str(path))
                log.warning("%s is not listed in %s; using it unverified (sha256 %s)", path, root / SUMS_FILE, actual)
        elif actual != expected:
            raise MirrorError(
                f"{path}: sha256 {actual} but {SUMS_FILE} expects {expected}; the mirror copy is damaged or "
                f"truncated (size {path.stat().st_size} bytes). Restore it from the original mirror"
            )
        out[rel] = actual
    return out


def mirror_provenance(data_dir: str | Path | None, relpaths: list[str], cache_file: Path | None = None) -> dict:
    """Where a dataset's files come from: {"source": "mirror", "files": {relpath: sha256}} when the mirror
    exists (files verified), else {"source": "hub", "files": {}, "requested": relpaths}."""
    root = mirror_dir(data_dir)
    if root is None:
        return {"source": "hub", "files": {}, "requested": list(relpaths)}
    return {"source": "mirror", "files": verify_mirror_files(root, list(relpaths), cache_file=cache_file)}
