"""W&B tracker: offline runs are real run directories, read back with ``wandb leet inspect``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from sds_exp.tracking.tracker import NullTracker, WandbTracker, weight_histogram

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: zeroshot_helpers
from zeroshot_helpers import REPO_ROOT, offline  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)


def run_dirs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def inspect_records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb transaction log, via ``wandb leet inspect --json``."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def inspect_summary(run_dir: Path) -> dict:
    """State, exit code, config and summary, via ``wandb leet inspect --summary --json``."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(out)


def history(records: list[dict]) -> dict[int, dict]:
    """Logged rows by step."""
    rows = (r["history"] for r in records if r["type"] == "history")
    return {row["step"]["num"]: row["item"] for row in rows}


def png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_offline_run_reads_back_with_wandb_tools(tmp_path: Path) -> None:
    config = {"seed": 0, "sparsity": 0.5, "model": {"name": "tiny_llama"}}
    image = png(tmp_path / "masks.png")
    tracker = WandbTracker(
        mode="offline",
        project="sds_exp_test",
        group="g1",
        tags=["t1", "2:4"],
        config=config,
        dir=tmp_path,
        name="job0",
    )
    with tracker:
        tracker.log({"dense/wikitext2/ppl": 12.5, "dense/zeroshot/piqa/acc": 0.625}, step=0)
        tracker.log({"prune/wikitext2/ppl": 20.25, "prune/sparsity/actual": 0.5}, step=1)
        tracker.log_histograms({"prune/weights/layer0": torch.arange(8.0)}, step=1)
        tracker.log_images({"prune/masks": image}, step=1)
        tracker.summary({"final/wikitext2/ppl": 20.25})

    (run_dir,) = run_dirs(tmp_path)
    assert list(run_dir.glob("run-*.wandb"))
    rows = history(inspect_records(run_dir))
    assert rows[0]["dense/wikitext2/ppl"] == 12.5
    assert rows[0]["dense/zeroshot/piqa/acc"] == 0.625
    assert rows[1]["prune/wikitext2/ppl"] == 20.25
    assert rows[1]["prune/sparsity/actual"] == 0.5
    assert rows[1]["prune/weights/layer0._type"] == "histogram"
    expected = [0.0] * 64  # 0..7 in 64 equal bins over [0, 7]: value k lands in bin k*64//7
    for k in range(8):
        expected[min(63, k * 64 // 7)] = 1.0
    assert rows[1]["prune/weights/layer0.values"] == expected
    assert rows[1]["prune/masks._type"] == "image-file"
    assert (run_dir / "files" / rows[1]["prune/masks.path"]).is_file()

    summary = inspect_summary(run_dir)
    assert summary["state"] == "finished"
    assert summary["exit_code"] == 0
    assert summary["name"] == "job0"
    assert summary["project"] == "sds_exp_test"
    assert summary["tags"] == ["t1", "2:4"]
    assert summary["config"] == config
    assert summary["summary"]["final/wikitext2/ppl"] == 20.25
    assert summary["summary"]["prune/wikitext2/ppl"] == 20.25


def test_each_tracker_is_its_own_run(tmp_path: Path) -> None:
    """Two jobs in one process (Hydra's basic launcher) give two finished runs, never one."""
    for job, value in enumerate((1.0, 2.0)):
        with WandbTracker(mode="offline", dir=tmp_path, name=f"job{job}") as tracker:
            tracker.log({f"job{job}/metric": value}, step=0)

    first, second = run_dirs(tmp_path)
    summaries = [inspect_summary(first), inspect_summary(second)]
    assert {s["name"] for s in summaries} == {"job0", "job1"}
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    for s in summaries:
        assert s["state"] == "finished"
        job = s["name"]
        assert [k for k in s["summary"] if not k.startswith("_")] == [f"{job}/metric"]


def test_failing_job_still_finishes_its_run(tmp_path: Path) -> None:
    tracker = WandbTracker(mode="offline", dir=tmp_path, name="boom")
    with pytest.raises(ZeroDivisionError), tracker:
        tracker.log({"dense/wikitext2/ppl": 3.0}, step=0)
        1 / 0  # noqa: B018
    (run_dir,) = run_dirs(tmp_path)
    summary = inspect_summary(run_dir)
    assert summary["exit_code"] == 1
    assert summary["state"] == "failed"
    assert summary["summary"]["dense/wikitext2/ppl"] == 3.0
    with pytest.raises(RuntimeError, match="outside"):
        tracker.log({"late": 1.0})


def test_disabled_mode_writes_nothing(tmp_path: Path) -> None:
    with WandbTracker(mode="disabled", dir=tmp_path / "job") as tracker:
        tracker.log({"a": 1.0}, step=0)
        tracker.summary({"a": 1.0})
        tracker.log_histograms({"w": torch.zeros(3)}, step=0)
    assert not (tmp_path / "job" / "wandb").exists()


def test_bad_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        WandbTracker(mode="shared")


def test_null_tracker_accepts_and_propagates() -> None:
    tracker = NullTracker(config={"a": 1}, dir="/nonexistent", name="x")
    with pytest.raises(KeyError), tracker:
        tracker.log({"a": 1.0}, step=0)
        tracker.summary({"a": 1.0})
        tracker.log_images({"x": "missing.png"})
        tracker.log_histograms({"w": torch.zeros(2)})
        raise KeyError("propagates")


def test_weight_histogram_counts_every_value() -> None:
    weight = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 4.0]])
    counts, edges = weight_histogram(weight, bins=4)
    assert counts == [3.0, 1.0, 1.0, 1.0]  # bins [0,1) [1,2) [2,3) [3,4]; the max joins the last
    assert edges == [0.0, 1.0, 2.0, 3.0, 4.0]
    const_counts, const_edges = weight_histogram(torch.full((5,), 2.0), bins=2)
    assert sum(const_counts) == 5 and const_edges[0] < 2.0 < const_edges[-1]


def test_logger_config_instantiates(tmp_path: Path) -> None:
    logger = OmegaConf.load(REPO_ROOT / "conf" / "logger" / "wandb.yaml")
    cfg = OmegaConf.create({"tags": ["dev", "table2"], "logger": logger})
    node = OmegaConf.to_container(cfg.logger, resolve=True)  # what the app does
    tracker = get_class(node.pop("_target_"))(**node, config={"seed": 0}, dir=str(tmp_path), name="job")
    assert isinstance(tracker, WandbTracker)
    assert (tracker.mode, tracker.project, tracker.entity, tracker.group) == (
        "offline",
        "sds_exp",
        None,
        None,
    )
    assert tracker.tags == ["dev", "table2"]
    assert tracker.dir == tmp_path and tracker.name == "job"
    assert tracker.config == {"seed": 0}
    with pytest.raises(TypeError, match="multiple values for argument 'config'"):
        instantiate(cfg.logger, config={"seed": 0})  # why the app uses get_class


def test_resumed_job_continues_its_run(compose, tmp_path: Path) -> None:
    """A job resumed in its run directory logs to the same W&B run id, steps going on from the record."""
    from sds_exp import app
    from sds_exp.sds import pipeline
    from sds_exp.tracking.record import RunRecord

    def boom(*args, **kwargs):
        raise RuntimeError("killed during re-activation")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "reactivate_model", boom)
        with pytest.raises(RuntimeError):
            app.run(compose(["debug=tiny", "logger=wandb", "sds=no_adjust"]))
    first = RunRecord.read(tmp_path / "run" / "metrics.json").tracker
    assert first["id"] and first["step"] == 2  # dense, prune
    app.run(compose(["debug=tiny", "logger=wandb", "sds=no_adjust"]))
    record = RunRecord.read(tmp_path / "run" / "metrics.json")
    assert record.tracker == {"id": first["id"], "step": 4}
    dirs = run_dirs(tmp_path / "run")
    assert len(dirs) == 2 and {inspect_summary(d)["run_id"] for d in dirs} == {first["id"]}
    steps = sorted(history(inspect_records(dirs[-1])))
    assert steps[:2] == [2, 3]  # reactivate, reprune (then the histogram media)


def test_refused_new_job_is_visible_as_a_failed_run(compose, tmp_path: Path) -> None:
    from sds_exp import app

    with pytest.raises(ValueError, match="calib_batch_size=0"):
        app.run(compose(["debug=tiny", "logger=wandb", "calib_batch_size=0"]))
    (run_dir,) = run_dirs(tmp_path / "run")
    summary = inspect_summary(run_dir)
    assert summary["exit_code"] == 1 and "calib_batch_size=0" in summary["summary"]["error"]


def test_job_plots_itself_over_the_stages(compose, tmp_path: Path) -> None:
    """Stage-free keys at step = stage index: the default panel of `wikitext2/ppl` is a line over 5 stages."""
    from sds_exp import app

    app.run(compose(["debug=tiny", "logger=wandb", "pattern=2:4"]))
    (run_dir,) = run_dirs(tmp_path / "run")
    rows = history(inspect_records(run_dir))
    assert sorted(s for s, row in rows.items() if "wikitext2/ppl" in row) == [0, 1, 2, 3, 4]
    assert [rows[s]["stage"] for s in range(5)] == [0, 1, 2, 3, 4]
    hist_keys = {k for row in rows.values() for k in row if k.startswith("weights/") and k.endswith("._type")}
    assert len(hist_keys) == 1 and all(any(k in rows[s] for k in hist_keys) for s in range(5))
    summary = inspect_summary(run_dir)
    assert summary["name"] == "sds-wanda-2:4-s0"
    assert summary["config"]["choices"]["pruner"] == "wanda"
    assert summary["summary"]["final/wikitext2/ppl"] > 0 and summary["summary"]["stages"]["_type"] == "table-file"
