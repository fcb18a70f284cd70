"""Eq. (9)-(12) against values computed by hand."""

import math

import pytest
import torch

from dpbert_rl.model.objectives import (advantages, dpbert_objective, reinforce_loss, returns_to_go, skip_penalty,
                                  skip_rate)


def test_returns_to_go_by_hand():
    actions = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    loss = torch.tensor([0.5, 2.0])
    R = returns_to_go(actions, loss, cost=1.0, lam=5.0)
    # row 0: sum_{j>=i} a_j = [2, 1, 1]; -lam*loss = -2.5
    # row 1: no layers executed;            -lam*loss = -10
    assert torch.allclose(R, torch.tensor([[-4.5, -3.5, -3.5], [-10.0, -10.0, -10.0]]))
    R2 = returns_to_go(actions, loss, cost=0.5, lam=2.0)
    assert torch.allclose(R2[0], torch.tensor([-1.0 - 1.0, -0.5 - 1.0, -0.5 - 1.0]))


def test_returns_carry_no_gradient():
    loss = torch.tensor([1.0], requires_grad=True)
    assert not returns_to_go(torch.ones(1, 2), loss).requires_grad


def test_skip_rate_and_penalty_by_hand():
    probs = torch.tensor([[1.0, 0.5, 0.0], [0.25, 0.75, 1.0]])
    # 1 - p = [0, .5, 1, .75, .25, 0] -> mean 2.5 / 6
    assert skip_rate(probs).item() == pytest.approx(2.5 / 6)
    assert skip_penalty(probs, 0.25).item() == pytest.approx((2.5 / 6 - 0.25) ** 2)
    assert skip_penalty(probs, 2.5 / 6).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan])
def test_target_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        skip_penalty(torch.rand(2, 3), rate)


def test_baselines_by_hand():
    R = torch.tensor([[-3.0, -1.0], [-5.0, -3.0]])
    assert torch.equal(advantages(R, "none"), R)
    assert torch.allclose(advantages(R, "batch-mean"), torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    greedy = torch.tensor([[-4.0, -2.0], [-4.0, -2.0]])
    assert torch.allclose(advantages(R, "self-critical", greedy), torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    with pytest.raises(ValueError, match="greedy"):
        advantages(R, "self-critical")
    with pytest.raises(ValueError, match="unknown baseline"):
        advantages(R, "moving-average")


def test_reinforce_loss_and_gradient_by_hand():
    logp = torch.tensor([[-0.1, -2.0], [-0.5, -0.3]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    loss = reinforce_loss(logp, adv)
    # -mean_b sum_i adv*logp = -((-0.1 + 2.0) + (-1.0 + 0)) / 2 = -0.45
    assert loss.item() == pytest.approx(-0.45)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 2)


def test_objective_combines_the_three_terms():
    actions = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    per_ex = torch.tensor([0.2, 1.0])
    logp = torch.log(torch.tensor([[0.9, 0.8], [0.3, 0.6]]))
    probs = torch.tensor([[0.9, 0.8], [0.7, 0.6]])
    out = dpbert_objective(per_ex.mean(), logp, probs, actions, per_ex, cost=1.0, lam=5.0, beta=2.0,
                           target_rate=0.5, baseline="none")
    R = torch.tensor([[-2.0 - 1.0, -1.0 - 1.0], [-1.0 - 5.0, -1.0 - 5.0]])
    pg = -(R * logp).sum(1).mean()
    S = (1 - probs).mean()
    expected = per_ex.mean() + pg + 2.0 * (S - 0.5) ** 2
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(out["returns"], R)
    no_pen = dpbert_objective(per_ex.mean(), logp, probs, actions, per_ex, target_rate=None, baseline="none")
    assert no_pen["penalty"].item() == 0.0
