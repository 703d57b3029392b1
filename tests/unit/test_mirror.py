"""Data mirror integrity: SHA256SUMS checks (cached per file state) and parse errors naming file and line."""

import json
import logging
import os
import re
import shutil

import pytest

from sds_exp.data import mirror
from sds_exp.data.mirror import MirrorError, mirror_provenance, read_sums, verify_mirror_files
from sds_exp.data.sources import MIRROR_FILES, c4_documents, dataset_files, wikitext2_rows

TEST = MIRROR_FILES["wikitext2/test"]
C4 = MIRROR_FILES["c4/calibration"]


@pytest.fixture
def mirror_copy(tmp_path, data_dir):
    """A copy of the mirror's WikiText2 test and C4 files with the matching SHA256SUMS lines."""
    root = tmp_path / "mirror"
    sums = read_sums(data_dir)
    lines = []
    for rel in (TEST, C4):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, root / rel)
        lines.append(f"{sums[rel]}  ./{rel}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return root


def _set_sum(root, rel, sha):
    path = root / "SHA256SUMS"
    kept = [ln for ln in path.read_text().splitlines() if not ln.endswith(f"./{rel}")]
    path.write_text("\n".join(kept + ([f"{sha}  ./{rel}"] if sha else [])) + "\n")


def test_every_dataset_file_is_listed_in_the_mirror_sums(data_dir):
    sums = read_sums(data_dir)
    assert set(MIRROR_FILES.values()) <= set(sums)
    assert dataset_files("wikitext2") == [TEST] and dataset_files("c4_evaluation") == [C4]
    with pytest.raises(ValueError, match="dataset='ptb' is not known; allowed: wikitext2"):
        dataset_files("ptb")


def test_verify_returns_the_listed_checksums(mirror_copy, data_dir):
    got = verify_mirror_files(mirror_copy, [TEST, C4])
    sums = read_sums(data_dir)
    assert got == {TEST: sums[TEST], C4: sums[C4]}
    assert mirror_provenance(mirror_copy, [TEST]) == {"source": "mirror", "files": {TEST: sums[TEST]}}
    hub = mirror_provenance(mirror_copy / "absent", [TEST])
    assert hub["source"] == "hub" and hub["files"] == {}


def test_truncated_test_jsonl(mirror_copy, data_dir):
    path = mirror_copy / TEST
    data = path.read_bytes()
    cut = data[: len(data) // 2]
    path.write_bytes(cut)
    expected = read_sums(data_dir)[TEST]
    actual = mirror.sha256_file(path)
    msg = rf"{re.escape(str(path))}: sha256 {actual} but SHA256SUMS expects {expected}; .*damaged or truncated"
    with pytest.raises(MirrorError, match=msg):
        verify_mirror_files(mirror_copy, [TEST])
    with pytest.raises(MirrorError, match=msg):
        wikitext2_rows("test", mirror_copy)
    # the SHA entry updated: the parse error names the file and the line
    line = cut.count(b"\n") + 1
    _set_sum(mirror_copy, TEST, actual)
    with pytest.raises(MirrorError, match=rf"{re.escape(str(path))} line {line}: Unterminated string"):
        wikitext2_rows("test", mirror_copy)


def test_unlisted_file_warns_and_still_returns_its_checksum(mirror_copy, caplog):
    _set_sum(mirror_copy, TEST, None)
    with caplog.at_level(logging.WARNING, logger="sds_exp.data.mirror"):
        got = verify_mirror_files(mirror_copy, [TEST])
    assert got[TEST] == mirror.sha256_file(mirror_copy / TEST)
    assert "not listed in" in caplog.text and "test.jsonl" in caplog.text
    assert len(wikitext2_rows("test", mirror_copy)) == 4358


def test_bad_parquet_names_the_file(mirror_copy):
    path = mirror_copy / C4
    path.write_bytes(b"PAR1 not really parquet PAR1")
    _set_sum(mirror_copy, C4, mirror.sha256_file(path))
    with pytest.raises(MirrorError, match=rf"{re.escape(str(path))}: not a readable parquet file"):
        c4_documents("calibration", mirror_copy)


def test_missing_file_is_named(mirror_copy):
    (mirror_copy / C4).unlink()
    with pytest.raises(FileNotFoundError, match=r"c4/c4_validation_2k.parquet is missing from the data mirror"):
        verify_mirror_files(mirror_copy, [C4])


def test_each_file_state_is_hashed_once(mirror_copy, tmp_path, monkeypatch):
    calls = []
    real = mirror.sha256_file
    monkeypatch.setattr(mirror, "sha256_file", lambda p: calls.append(str(p)) or real(p))
    monkeypatch.setattr(mirror, "_MEMORY", {})
    cache = tmp_path / "cache" / "mirror_sha256.json"
    first = verify_mirror_files(mirror_copy, [TEST, C4, C4], cache_file=cache)
    assert len(calls) == 2
    assert verify_mirror_files(mirror_copy, [TEST, C4], cache_file=cache) == first
    assert len(calls) == 2  # memory
    monkeypatch.setattr(mirror, "_MEMORY", {})  # a later job: only the JSON cache is left
    assert verify_mirror_files(mirror_copy, [TEST, C4], cache_file=cache) == first
    assert len(calls) == 2
    entry = json.loads(cache.read_text())["files"][str((mirror_copy / TEST).resolve())]
    assert entry["sha256"] == first[TEST]
    st = (mirror_copy / TEST).stat()  # a new file state is hashed again
    os.utime(mirror_copy / TEST, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    verify_mirror_files(mirror_copy, [TEST], cache_file=cache)
    assert len(calls) == 3


def test_unwritable_cache_only_warns(mirror_copy, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(mirror, "_MEMORY", {})
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="sds_exp.data.mirror"):
        got = verify_mirror_files(mirror_copy, [TEST], cache_file=blocker / "cache.json")
    assert TEST in got
    assert "could not be written" in caplog.text
