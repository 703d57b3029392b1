"""Contracts around the job: one classification of config keys, the record schema, component protocols."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sds_exp import provenance
from sds_exp.tracking.record import RecordError, RunRecord


def test_every_config_key_is_classified(compose):
    cfg = OmegaConf.to_container(compose([]), resolve=False)
    classes = {**{k.split(".")[0]: "stage" for k in provenance.STAGE_KEYS}}
    known = (
        set(classes) | set(provenance.EVALUATION_KEYS) | set(provenance.WARN_KEYS) | set(provenance.BOOKKEEPING_KEYS)
    )
    assert set(cfg) - known == set(), "new top-level keys must be classified in sds_exp/provenance.py"


@pytest.mark.parametrize(
    "key, stage",
    [
        ("calib_batch_size", "prune"),
        ("pruner.group", "prune"),
        ("sds.reactivate.optimizer.lr", "reactivate"),
        ("regularizer.l1.lam", "reactivate"),
        ("sds.adjustment.damp", "reprune"),
        ("sds._target_", "prune"),
        ("benchmark.ppl.max_windows", None),
        ("paths.data_dir", None),
        ("model.data_dir", None),
        ("logger.mode", None),
        ("device", None),
        ("some_user_key", "prune"),
    ],
)
def test_first_stage_of(key, stage):
    assert provenance.first_stage_of(key) == stage


def test_resume_differences_are_scoped_by_stage():
    saved = provenance.fingerprint(
        {"seed": 0, "sds": {"reactivate": {"steps": 200}}, "device": "cpu", "benchmark": {"ppl": {"max_windows": 2}}}
    )
    current = provenance.fingerprint(
        {"seed": 0, "sds": {"reactivate": {"steps": 50}}, "device": "cuda", "benchmark": {"ppl": {"max_windows": 8}}}
    )
    refuse, warn = provenance.resume_differences(saved, current, "prune")
    assert refuse == [] and warn == ["device: 'cpu' -> 'cuda'"]
    refuse, _ = provenance.resume_differences(saved, current, "reactivate")
    assert refuse == ["sds.reactivate.steps: 200 -> 50"]


def test_record_reads_schema_1_and_names_a_damaged_file(tmp_path):
    old = {
        "status": "completed",
        "error": None,
        "choices": {"model": "tiny_llama"},
        "overrides": ["a=1"],
        "metrics": {"dense/wikitext2/ppl": 3.5},
        "stages_done": ["dense"],
    }
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    rec = RunRecord.read(tmp_path / "metrics.json")
    assert rec.metrics == {"dense/wikitext2/ppl": 3.5} and rec.schema == 1 and rec.attempts == []
    rec.write(tmp_path / "again.json")
    assert RunRecord.read(tmp_path / "again.json").to_dict() == {**rec.to_dict()}
    (tmp_path / "bad.json").write_text('{"status": "completed", "metr')
    with pytest.raises(RecordError, match=r"bad.json: not valid JSON \(line 1"):
        RunRecord.read(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text('{"status": "done"}')
    with pytest.raises(RecordError, match="status='done'; allowed"):
        RunRecord.read(tmp_path / "odd.json")


def test_regularizer_without_prox_is_refused_when_built():
    from sds_exp.regularizers.norms import L1, RegularizerSum

    class OnlyValue:
        def __call__(self, weight):
            return weight.abs().mean()

    RegularizerSum({"l1": L1(0.1)})
    with pytest.raises(TypeError, match="regularizer.mine: .*OnlyValue is not a regularizer"):
        RegularizerSum({"mine": OnlyValue()})


def test_needs_calibration_is_not_a_setting():
    from sds_exp.pruners.wanda import Wanda

    assert Wanda.needs_calibration is True
    node = OmegaConf.create({"_target_": "sds_exp.pruners.wanda.Wanda", "needs_calibration": False})
    with pytest.raises(Exception, match="needs_calibration"):
        instantiate(node)


def test_divergence_guard_has_an_absolute_floor():
    """An objective that starts at -1.9e-9 (rounding) and wobbles around 0 has not exploded."""
    from sds_exp.sds.gram import LayerProblem
    from sds_exp.sds.reconstruct import ReconstructionDivergedError, ReconstructSettings, reconstruct

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    w = torch.randn(4, 8)
    A = x.t() @ x / 256
    P = w @ A  # the optimum is w itself
    c0 = float((w * (w @ A)).sum()) - 1.9e-9 * 4  # loss(w) = -1.9e-9
    problem = LayerProblem(A=A, P=P, c0=c0)
    _, _, info = reconstruct(w, problem, ReconstructSettings(steps=30, check_every=1))
    assert abs(info["loss_after"]) < 1e-4
    with pytest.raises(ReconstructionDivergedError, match="lower the learning rate"):  # a real explosion
        reconstruct(w * 100, problem, ReconstructSettings(steps=1, explode_factor=1e-3, precondition=False))
