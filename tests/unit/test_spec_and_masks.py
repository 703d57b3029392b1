import re

import pytest
import torch
from omegaconf import OmegaConf

from sds_exp.pruners.masks import check_nm, nm_mask, prune_lowest, select_mask, sparsity_of
from sds_exp.spec import SparsitySpec


def test_parse_unstructured_and_nm():
    assert SparsitySpec.parse(0.5, "unstructured") == SparsitySpec(0.5)
    spec = SparsitySpec.parse(0.5, "2:4")
    assert (spec.n, spec.m, spec.prune_n, spec.ratio) == (2, 4, 2, 0.5)
    assert SparsitySpec.parse(0.25, "6:8").n == 6


@pytest.mark.parametrize(
    "ratio, pattern, message",
    [
        (1.0, "unstructured", "outside [0, 1)"),
        (-0.1, "unstructured", "outside [0, 1)"),
        (0.6, "2:4", "sparsity 0.5"),
        (0.5, "2-4", "not understood"),
        (0.5, "4:4", "0 < N < M"),
        ("abc", "unstructured", "not a number"),
    ],
)
def test_parse_rejects(ratio, pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SparsitySpec.parse(ratio, pattern)


def test_unquoted_yaml_pattern_is_detected():
    value = OmegaConf.create("pattern: 2:4").pattern  # YAML 1.1 sexagesimal
    assert value == 124
    with pytest.raises(ValueError, match=r'Quote it: pattern: "2:4"'):
        SparsitySpec.parse(0.5, value)


def test_prune_lowest_exact_count_with_ties():
    scores = torch.zeros(3, 8)  # all tied: index order decides
    mask = prune_lowest(scores, 3, dim=-1)
    assert (~mask).sum(1).tolist() == [3, 3, 3]
    assert (~mask[:, :3]).all() and mask[:, 3:].all()
    flat = prune_lowest(torch.ones(4, 4), 5)
    assert (~flat).sum() == 5 and (~flat.flatten()[:5]).all()


def test_nm_mask_every_group():
    torch.manual_seed(0)
    scores = torch.rand(16, 32)
    mask = nm_mask(scores, 2, 4)
    assert check_nm(mask, 2, 4)
    groups = scores.view(16, 8, 4)
    kept = mask.view(16, 8, 4)
    # the kept ones are the two largest of each group
    assert torch.equal(groups.topk(2, dim=-1).values.sort(-1).values, groups[kept].view(16, 8, 2).sort(-1).values)
    with pytest.raises(ValueError, match="not divisible by M=3"):
        nm_mask(scores, 1, 3)


def test_select_mask_groups():
    torch.manual_seed(0)
    s = torch.rand(6, 10)
    spec = SparsitySpec(0.3)
    assert (~select_mask(s, spec, "row")).sum(1).tolist() == [3] * 6
    assert int((~select_mask(s, spec, "matrix")).sum()) == 18
    assert sparsity_of(select_mask(torch.rand(6, 16), SparsitySpec.parse(0.5, "4:8"), "row")) == 0.5


def test_nm_ties_topk_is_the_references_per_group_topk_and_stable_is_lower_index_first():
    # tie-heavy scores (three levels), as 4-bit weights give: the two rules must differ somewhere
    scores = torch.randint(0, 3, (96, 64), generator=torch.Generator().manual_seed(0)).float()
    reference = torch.zeros_like(scores, dtype=torch.bool)  # pruned, as Wanda/SparseGPT/RIA select it
    for ii in range(0, scores.shape[1], 4):
        reference.scatter_(1, ii + torch.topk(scores[:, ii : ii + 4], 2, dim=1, largest=False)[1], True)
    topk = nm_mask(scores, 2, 4, ties="topk")
    assert torch.equal(topk, ~reference) and check_nm(topk, 2, 4)
    stable = nm_mask(scores, 2, 4)
    assert check_nm(stable, 2, 4) and not torch.equal(stable, topk)
    # stable: in a group of equal scores the first two columns are pruned
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[False, False, True, True]]
    spec = SparsitySpec.parse(0.5, "2:4", "topk")
    assert torch.equal(select_mask(scores, spec, "row"), topk)
    assert SparsitySpec.from_config(OmegaConf.create({"sparsity": 0.5, "pattern": "2:4"})).ties == "stable"
    with pytest.raises(ValueError, match=r"nm_ties='first'; allowed: 'stable'.*'topk'"):
        SparsitySpec.parse(0.5, "2:4", "first")
    with pytest.raises(ValueError, match="ties='x'"):
        nm_mask(scores, 2, 4, ties="x")
