"""The equations of DPBERT's stage 3 as small pure functions (see ``method.md``).

Shapes: ``B`` examples in a batch, ``L`` layers.
"""

from __future__ import annotations

from typing import Optional

import torch

BASELINES = ("none", "batch-mean", "self-critical")


def returns_to_go(actions: torch.Tensor, task_loss: torch.Tensor, cost: float = 1.0, lam: float = 5.0) -> torch.Tensor:
    """Eq. (9): ``R_i = sum_{j=i..L} (-c a_j) - lambda * ell``.

    :param actions: ``(B, L)`` 0/1, 1 = executed.
    :param task_loss: ``(B,)`` the task loss of each example's executed path.
    :return: ``(B, L)``; no gradient flows through it.
    """
    actions = actions.detach().to(torch.float32)
    cost_to_go = torch.flip(torch.cumsum(torch.flip(actions, [1]), 1), [1])  # sum_{j>=i} a_j
    return -cost * cost_to_go - lam * task_loss.detach().to(torch.float32)[:, None]


def skip_rate(probs: torch.Tensor) -> torch.Tensor:
    """Eq. (10): ``S = 1/(|B| L) sum_x sum_i (1 - p_i(x))``, the expected fraction skipped."""
    return (1.0 - probs).mean()


def skip_penalty(probs: torch.Tensor, target_rate: float) -> torch.Tensor:
    """Eq. (11): ``P = (S - r)^2`` for the target skip rate ``r`` in [0, 1]."""
    check_rate(target_rate)
    return (skip_rate(probs) - target_rate) ** 2


def check_rate(target_rate: float) -> None:
    if not 0.0 <= float(target_rate) <= 1.0:
        raise ValueError(f"target skip rate must lie in [0, 1]; got {target_rate}")


def advantages(
    returns: torch.Tensor, baseline: str = "batch-mean", greedy_returns: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``R_i - b_i`` for the baselines of eq. (12).

    * ``none``: ``b_i = 0``;
    * ``batch-mean``: ``b_i`` = mean of ``R_i`` over the batch;
    * ``self-critical``: ``b_i`` = ``R_i`` of the same input's greedy path (``greedy_returns``).
    """
    if baseline == "none":
        return returns
    if baseline == "batch-mean":
        return returns - returns.mean(0, keepdim=True)
    if baseline == "self-critical":
        if greedy_returns is None:
            raise ValueError("baseline 'self-critical' needs the greedy path's returns")
        return returns - greedy_returns
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")


def reinforce_loss(log_probs: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """The REINFORCE term of eq. (12): ``-sum_i (R_i - b_i) log pi(a_i|h_{i-1})``, batch mean."""
    return -(advantage.detach() * log_probs).sum(1).mean()


def dpbert_objective(
    task_loss: torch.Tensor,
    log_probs: torch.Tensor,
    probs: torch.Tensor,
    actions: torch.Tensor,
    per_example_loss: torch.Tensor,
    cost: float = 1.0,
    lam: float = 5.0,
    beta: float = 0.5,
    target_rate: Optional[float] = None,
    baseline: str = "batch-mean",
    greedy_returns: Optional[torch.Tensor] = None,
) -> dict:
    """Eq. (12): ``J = ell - sum_i (R_i - b_i) log pi + beta P``, and its parts for logging.

    :param task_loss: scalar mean task loss (carries the gradient to backbone and head).
    :param per_example_loss: ``(B,)``, enters the reward (detached).
    :param target_rate: ``r``; with None the penalty term is left out.
    :return: dict with ``loss`` (J), ``policy_loss``, ``penalty``, ``returns`` ``(B, L)``.
    """
    returns = returns_to_go(actions, per_example_loss, cost, lam)
    pg = reinforce_loss(log_probs, advantages(returns, baseline, greedy_returns))
    penalty = skip_penalty(probs, target_rate) if target_rate is not None else probs.new_zeros(())
    return {"loss": task_loss + pg + beta * penalty, "policy_loss": pg, "penalty": penalty, "returns": returns}
