from functools import partial

import pytest
import torch

from sds_exp.pruners.masks import check_nm, select_mask
from sds_exp.regularizers.norms import L1, L2, RegularizerSum
from sds_exp.sds.gram import GramStats
from sds_exp.sds.reconstruct import ReconstructionDivergedError, ReconstructSettings, magnitude_projector, reconstruct
from sds_exp.sds.sequential import output_energy
from sds_exp.spec import SparsitySpec


def _streams(out=12, inp=20, tokens=50, seqs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Wd = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Xd = torch.randn(seqs, tokens, inp, generator=g, dtype=torch.float64)
    Xs = Xd + 0.3 * torch.randn(seqs, tokens, inp, generator=g, dtype=torch.float64)
    W = Wd * (torch.rand(out, inp, generator=g, dtype=torch.float64) > 0.5)
    return Wd, Xd, Xs, W


def _gram(Xs, Xd, cross=True):
    stats = GramStats(Xs.shape[-1], cross=cross, dtype=Xs.dtype)
    for s, d in zip(Xs.split(1), Xd.split(1), strict=True):
        stats.add(s, d if cross else None)
    return stats


def _token_loss(W, Wd, Xs, Xd):
    xs, xd = Xs.reshape(-1, Xs.shape[-1]), Xd.reshape(-1, Xd.shape[-1])
    return ((xd @ Wd.t() - xs @ W.t()) ** 2).mean()  # mean over tokens and output features


@pytest.mark.parametrize("cross", [True, False])
def test_gram_loss_and_grad_equal_token_level(cross):
    Wd, Xd, Xs, W = _streams()
    if not cross:
        Xs = Xd
    problem = _gram(Xs, Xd, cross).problem(Wd)
    Wg = W.clone().requires_grad_(True)
    ref = _token_loss(Wg, Wd, Xs, Xd)
    ref.backward()
    assert problem.loss(W) == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(problem.grad(W), Wg.grad, rtol=1e-9, atol=1e-12)


def test_output_energy_is_exact_on_large_batches():
    """c0 comes from the teacher's outputs of a whole batch (16k tokens x 1536 features in a real job): the
    fp32 vector norm lost ~1e-3 of it on CPU, enough to make every reported layer loss negative."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(8_000_000, generator=g) * (1 + 50 * (torch.rand(8_000_000, generator=g) < 1e-3))
    exact = float(y.double().square().sum())
    assert output_energy(y.reshape(-1, 1000)) == pytest.approx(exact, rel=1e-9)


def test_optimizer_steps_in_gram_and_token_form_agree():
    Wd, Xd, Xs, W = _streams()
    problem = _gram(Xs, Xd).problem(Wd)
    settings = ReconstructSettings(steps=5, optimizer=partial(torch.optim.Adam, lr=1e-2), precondition=False)
    reg = RegularizerSum({"l1": L1(0.1), "l2": L2(0.1)})
    Wg, _, info = reconstruct(W, problem, settings, reg)
    Wt = W.clone().requires_grad_(True)
    opt = torch.optim.Adam([Wt], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (_token_loss(Wt, Wd, Xs, Xd) + reg(Wt)).backward()
        opt.step()
    torch.testing.assert_close(Wg, Wt.detach(), rtol=1e-9, atol=1e-10)
    assert info["loss_after"] < info["loss_before"]


def test_regularizer_values_and_gradients():
    W = torch.tensor([[1.0, -2.0], [0.5, -0.25]], requires_grad=True)
    l1, l2 = L1(0.1), L2(0.2)
    assert float(l1(W.detach())) == pytest.approx(0.1 * (1 + 2 + 0.5 + 0.25) / 4)
    assert float(l2(W.detach())) == pytest.approx(0.2 * (1 + 4 + 0.25 + 0.0625) / 4)
    (l1(W) + l2(W)).backward()
    expected = 0.1 * torch.sign(W.detach()) / 4 + 0.2 * 2 * W.detach() / 4
    torch.testing.assert_close(W.grad, expected)
    Wd = W.detach()
    assert float(RegularizerSum({"a": l1, "b": l2})(Wd)) == pytest.approx(float(l1(Wd) + l2(Wd)))
    assert not RegularizerSum({})
    for bad in (-0.1, float("nan"), 1e9):
        with pytest.raises(ValueError, match="lam="):
            L1(bad)


def test_projected_adjustment_keeps_pattern_every_step():
    Wd, Xd, Xs, W = _streams(out=8, inp=16)
    problem = _gram(Xs.float(), Xd.float()).problem(Wd.float())
    spec = SparsitySpec.parse(0.5, "2:4")
    project = magnitude_projector(spec)
    seen = []

    def spy(W):
        mask = project(W)
        seen.append(mask)
        return mask

    Wa, mask, info = reconstruct(W.float(), problem, ReconstructSettings(steps=20), project=spy)
    assert len(seen) == 21 and all(check_nm(m, 2, 4) for m in seen)
    assert check_nm(Wa != 0, 2, 4) or check_nm(mask, 2, 4)
    assert ((Wa != 0) <= mask).all()
    assert info["loss_after"] < info["loss_before"]


def test_wanda_score_projection_weighs_columns_by_input_norm():
    """adjust_score=wanda ranks |W| * sqrt(diag A) (= |W| * ||x_j|| / sqrt(T)); a large weight on a
    nearly silent input column loses to a smaller one on an active column, unlike the |W| projection."""
    spec = SparsitySpec.parse(0.5, "2:4")
    W = torch.tensor([[4.0, 1.0, 2.0, 3.0]])
    scale = torch.tensor([0.01, 1.0, 1.0, 1.0])  # column 0 almost never active on the calibration data
    assert magnitude_projector(spec)(W).tolist() == [[True, False, False, True]]
    assert magnitude_projector(spec, column_scale=scale)(W).tolist() == [[False, False, True, True]]
    Wr = torch.randn(6, 16)
    s = torch.rand(16) + 0.1
    torch.testing.assert_close(
        magnitude_projector(SparsitySpec(0.5), "row", s)(Wr), select_mask(Wr.abs() * s, SparsitySpec(0.5), "row")
    )


def test_learning_rate_range_and_divergence_message():
    with pytest.raises(ValueError, match="lr=-1"):
        ReconstructSettings(optimizer=partial(torch.optim.Adam, lr=-1))
    with pytest.raises(ValueError, match="steps"):
        ReconstructSettings(steps=-3)
    Wd, Xd, Xs, W = _streams()
    problem = _gram(Xs.float(), Xd.float()).problem(Wd.float())
    with pytest.raises(ValueError, match="fraction of a Newton step"):
        ReconstructSettings(optimizer=partial(torch.optim.SGD, lr=2.5))
    settings = ReconstructSettings(steps=50, optimizer=partial(torch.optim.SGD, lr=10.0), precondition=False)
    with pytest.raises(ReconstructionDivergedError, match=r"layer blk\.q_proj.*lr=10"):
        reconstruct(W.float(), problem, settings, name="blk.q_proj")


def test_preconditioned_step_is_a_fraction_of_the_newton_step():
    Wd, Xd, Xs, W = _streams(out=6, inp=10, tokens=80)
    problem = _gram(Xs, Xd).problem(Wd)
    optimum = problem.P @ torch.linalg.inv(problem.A)  # the least-squares solution (damping ~ 0 below)
    full = ReconstructSettings(steps=1, optimizer=partial(torch.optim.SGD, lr=1.0), damp=1e-9)
    W1, _, _ = reconstruct(W, problem, full)
    torch.testing.assert_close(W1, optimum, rtol=1e-5, atol=1e-6)
    tenth = ReconstructSettings(steps=1, optimizer=partial(torch.optim.SGD, lr=0.1), damp=1e-9)
    W2, _, _ = reconstruct(W, problem, tenth)
    torch.testing.assert_close(W2, W + 0.1 * (optimum - W), rtol=1e-5, atol=1e-6)


def test_proximal_maps():
    W = torch.tensor([[0.5, -0.01], [0.02, -2.0]])
    soft = L1(0.4).prox(W, step=0.1)  # threshold 0.1 * 0.4 / 4 = 0.01
    torch.testing.assert_close(soft, torch.tensor([[0.49, 0.0], [0.01, -1.99]]))
    torch.testing.assert_close(L2(0.4).prox(W, step=0.1), W / (1 + 2 * 0.1 * 0.4 / 4))
    both = RegularizerSum({"l2": L2(0.4), "l1": L1(0.4)}).prox(W, 0.1)  # L1 first, whatever the order given
    torch.testing.assert_close(both, soft / (1 + 2 * 0.1 * 0.4 / 4))
