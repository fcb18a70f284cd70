"""The equations of DPBERT's stage 3 as small pure functions (see ``method.md``).

Shapes: ``B`` examples in a batch, ``L`` layers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

BASELINES = ("none", "batch-mean", "self-critical", "loo")
REWARDS = ("loss", "correct")
RATE_CONTROLS = ("penalty", "dual", "none")


def final_reward(reward: str, task_loss: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor,
                 regression: bool) -> torch.Tensor:
    """The outcome term ``q`` of the reward, ``(B,)``, which enters the return as ``+ lambda * q``.

    * ``loss`` (the paper's eq. 9): ``q = -ell``. Unbounded: on a backbone whose loss varies a lot
      between inputs, the spread of ``lambda * ell`` can exceed the whole range of layer costs.
    * ``correct`` (bounded, in [0, 1]): ``q = 1[prediction == label]`` for classification, and
      ``q = 1 - tanh(|prediction - label|)`` for regression (BERxiT's regression target).
    """
    if reward == "loss":
        return -task_loss.detach().to(torch.float32)
    if reward == "correct":
        if regression:
            return 1.0 - torch.tanh((predictions.detach().float() - labels.float()).abs())
        return (predictions.detach() == labels.long()).to(torch.float32)
    raise ValueError(f"unknown reward {reward!r}; expected one of {REWARDS}")


def fit_path_calibration(predictions: torch.Tensor, labels: torch.Tensor, min_std: float = 1e-6) -> torch.Tensor:
    """A regression head's per-path affine recalibration, ``(P, 2)`` of ``(scale, shift)``: for each path
    ``p`` (a column of ``predictions``, ``(N, P)``), the least-squares fit ``y ~ scale_p * pred_p + shift_p``
    over the ``N`` inputs (:func:`apply_path_calibration`).

    Why: STS-B is scored by correlation over the whole split, and every path of a frozen backbone predicts on
    its own scale (a path without layer 1 compresses and shifts its outputs). A path that ranks the inputs
    well but off-scale scores badly under a per-input error, and a mix of paths off each other's scale loses
    correlation that none of them loses alone. Recalibrated, each path's predictions are on the label's scale,
    so a per-input error of the recalibrated prediction is small exactly where the path's correlation with
    the label is high (its least-squares residual is ``var(y) (1 - rho_p^2)``). A path whose predictions do
    not vary (std below ``min_std``) predicts the label mean."""
    x = predictions.double()
    y = labels.double().reshape(-1, 1)
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    return _least_squares_line(xm, ym, (xc ** 2).mean(0), (xc * (y - ym)).mean(0), min_std).to(torch.float32)


def _least_squares_line(xm, ym, var, cov, min_std: float = 1e-6) -> torch.Tensor:
    """``(..., 2)`` of ``(scale, shift)`` from the means, variance of x and covariance; a flat x (std below
    ``min_std``) gets scale 0, the label mean."""
    scale = torch.where(var > min_std ** 2, cov / var.clamp_min(min_std ** 2), torch.zeros_like(var))
    return torch.stack([scale, ym - scale * xm], -1)


class RunningPathCalibration:
    """:func:`fit_path_calibration` fitted on the fly, for a stage that draws paths instead of walking the tree
    (stage 3 'sampled'): the sums ``n, sum x, sum y, sum x^2, sum x y`` of every (output, label) drawn on each path
    so far, and from them the least-squares ``(scale, shift)`` of each path with at least ``min_inputs`` draws;
    every other path gets the pair fitted on the draws of all such paths (on all draws when those are fewer than
    ``min_inputs``; the identity before there are two). On a frozen backbone an input's output on a path is fixed,
    so the sums only sharpen. Also the post-hoc fit of a trained model's greedy paths
    (:func:`~dpbert_rl.training.recalibrate.fit_visited_paths`).

    :param num_layers: ``L``: the table has ``2^L`` rows (:func:`path_ids`).
    """

    def __init__(self, num_layers: int, min_inputs: int = 20):
        if min_inputs < 2:
            raise ValueError(f"min_inputs must be at least 2 (a line needs two points); got {min_inputs}")
        self.num_layers, self.min_inputs = int(num_layers), int(min_inputs)
        self.sums = torch.zeros(2 ** self.num_layers, 5, dtype=torch.float64)

    def update(self, ids: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the draws: path ids, raw outputs and labels, each ``(N,)``."""
        x = predictions.detach().reshape(-1).double().cpu()
        y = labels.detach().reshape(-1).double().cpu()
        rows = torch.stack([torch.ones_like(x), x, y, x * x, x * y], 1)
        self.sums.index_add_(0, ids.detach().reshape(-1).long().cpu(), rows)

    @staticmethod
    def _pairs(sums: torch.Tensor) -> torch.Tensor:
        n = sums[..., 0].clamp_min(1.0)
        xm, ym = sums[..., 1] / n, sums[..., 2] / n
        return _least_squares_line(xm, ym, sums[..., 3] / n - xm ** 2, sums[..., 4] / n - xm * ym)

    def table(self) -> torch.Tensor:
        """The ``(2^L, 2)`` map of :func:`apply_path_calibration` for the draws so far."""
        own = self.sums[:, 0] >= self.min_inputs
        pooled = self.sums[~own].sum(0)
        if pooled[0] < self.min_inputs:
            pooled = self.sums.sum(0)
        pair = self._pairs(pooled) if pooled[0] >= 2 else torch.tensor([1.0, 0.0], dtype=torch.float64)
        table = pair.expand(len(self.sums), 2).clone()
        table[own] = self._pairs(self.sums[own])
        return table.to(torch.float32)

    def state_dict(self) -> dict:
        """JSON-ready: the sums of the visited paths only."""
        visited = torch.nonzero(self.sums[:, 0]).reshape(-1).tolist()
        return {"num_layers": self.num_layers, "min_inputs": self.min_inputs,
                "sums": {str(p): self.sums[p].tolist() for p in visited}}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_layers"]) != self.num_layers:
            raise ValueError(f"a per-path calibration of {state['num_layers']} layers cannot be read into "
                             f"{self.num_layers}")
        self.min_inputs = int(state["min_inputs"])
        self.sums.zero_()
        for p, row in state["sums"].items():
            self.sums[int(p)] = torch.tensor(row, dtype=torch.float64)


def path_ids(actions: torch.Tensor) -> torch.Tensor:
    """The path index of each row of 0/1 ``actions`` ``(..., L)``: its bits, layer 1 the most significant (the
    path tree's order, :func:`dpbert_rl.pathtree.oracle.paths`)."""
    L = actions.shape[-1]
    return (actions.long() * (2 ** torch.arange(L - 1, -1, -1, device=actions.device))).sum(-1)


def apply_path_calibration(predictions: torch.Tensor, path_ids: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """``scale[p] * prediction + shift[p]`` for each input's path id ``p`` (:func:`fit_path_calibration`);
    ``predictions`` and ``path_ids`` of the same shape."""
    cal = calibration.to(predictions.device)[path_ids.long()]
    return cal[..., 0].to(predictions.dtype) * predictions + cal[..., 1].to(predictions.dtype)


def reward_to_go(actions: torch.Tensor, outcome: torch.Tensor, cost: float = 1.0, lam: float = 5.0) -> torch.Tensor:
    """``R_i = sum_{j=i..L} (-c a_j) + lambda * q``: eq. (9) with any outcome term ``q`` ``(B,)``.

    :param actions: ``(B, L)`` 0/1, 1 = executed.
    :return: ``(B, L)``; no gradient flows through it.
    """
    actions = actions.detach().to(torch.float32)
    cost_to_go = torch.flip(torch.cumsum(torch.flip(actions, [1]), 1), [1])  # sum_{j>=i} a_j
    return -cost * cost_to_go + lam * outcome.detach().to(torch.float32)[:, None]


def returns_to_go(actions: torch.Tensor, task_loss: torch.Tensor, cost: float = 1.0, lam: float = 5.0) -> torch.Tensor:
    """Eq. (9): ``R_i = sum_{j=i..L} (-c a_j) - lambda * ell``.

    :param actions: ``(B, L)`` 0/1, 1 = executed.
    :param task_loss: ``(B,)`` the task loss of each example's executed path.
    :return: ``(B, L)``; no gradient flows through it.
    """
    return reward_to_go(actions, -task_loss.detach().to(torch.float32), cost, lam)


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
    returns: torch.Tensor, baseline: str = "batch-mean", greedy_returns: Optional[torch.Tensor] = None,
    samples: int = 1,
) -> torch.Tensor:
    """``R_i - b_i`` for the baselines of eq. (12).

    * ``none``: ``b_i = 0``;
    * ``batch-mean``: ``b_i`` = mean of ``R_i`` over the batch;
    * ``self-critical``: ``b_i`` = ``R_i`` of the same input's greedy path (``greedy_returns``);
    * ``loo``: leave-one-out over the ``samples`` (K) paths drawn for the same input: ``b_i`` = mean of
      ``R_i`` over the input's other K-1 paths. Rows must come in groups of K per input (as
      ``repeat_interleave(K)`` makes them). It removes how hard the input is from the advantage, which
      a batch mean cannot: between-input loss variance exceeds the within-input one.
    """
    if baseline == "none":
        return returns
    if baseline == "batch-mean":
        return returns - returns.mean(0, keepdim=True)
    if baseline == "self-critical":
        if greedy_returns is None:
            raise ValueError("baseline 'self-critical' needs the greedy path's returns")
        return returns - greedy_returns
    if baseline == "loo":
        if samples < 2:
            raise ValueError(f"baseline 'loo' needs at least 2 samples per input; got {samples}")
        if returns.shape[0] % samples:
            raise ValueError(f"{returns.shape[0]} rows are not groups of {samples} samples per input")
        g = returns.reshape(-1, samples, *returns.shape[1:])  # (B, K, L)
        others = (g.sum(1, keepdim=True) - g) / (samples - 1)
        return (g - others).reshape(returns.shape)
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")


def normalise_advantages(adv: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages scaled to zero mean and unit standard deviation over the batch (as in PPO)."""
    if adv.numel() < 2:
        return adv
    return (adv - adv.mean()) / (adv.std() + eps)


class DualPrice:
    """Rate control by a price per executed layer, set by dual ascent on a Lagrangian multiplier.

    The constraint is ``execute rate = 1 - r`` for the target skip rate ``r``. After each batch the
    price moves against the violation, ``mu <- mu + lr * (executed - (1 - r))``: executing too much
    raises the price of a layer, executing too little lowers it. The constraint is an equality, so the
    multiplier has no sign: a negative price pays for executing, which a policy that skips more than
    ``r`` even for free needs (seen in joint stage 3 on RTE, where a price floored at 0 could not pull
    the rate back up). Unlike ``beta (S - r)^2``, which
    is as satisfied by every gate at ``p = 1 - r`` as by 0/1 decisions, a price per layer only changes
    what a layer costs, so it pushes the *greedy* policy to the rate without rewarding hesitant gates.

    :param target_rate: ``r``, the target fraction of layers skipped.
    :param lr: the dual step size.
    :param init: the starting price (the paper's ``c``).
    """

    def __init__(self, target_rate: float, lr: float = 0.05, init: float = 1.0):
        check_rate(target_rate)
        if not (lr > 0 and math.isfinite(init)):
            raise ValueError(f"dual ascent needs lr > 0 and a finite starting price; got lr={lr}, init={init}")
        self.target_rate, self.lr, self.price = float(target_rate), float(lr), float(init)

    def update(self, execute_rate: float) -> float:
        """One dual step from the observed fraction of layers executed; returns the new price."""
        self.price = self.price + self.lr * (float(execute_rate) - (1.0 - self.target_rate))
        return self.price

    def state_dict(self) -> dict:
        return {"target_rate": self.target_rate, "lr": self.lr, "price": self.price}

    def load_state_dict(self, state: dict) -> None:
        self.target_rate, self.lr, self.price = state["target_rate"], state["lr"], state["price"]


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
    outcome: Optional[torch.Tensor] = None,
    samples: int = 1,
    normalise: bool = False,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
) -> dict:
    """Eq. (12): ``J = ell - sum_i (R_i - b_i) log pi + beta P``, and its parts for logging.

    :param task_loss: scalar mean task loss (carries the gradient to backbone and head).
    :param per_example_loss: ``(B,)``, enters the reward (detached) when ``outcome`` is None.
    :param target_rate: ``r``; with None the penalty term is left out.
    :param outcome: ``(B,)`` the reward's outcome term ``q`` (:func:`final_reward`); default ``-ell``.
    :param samples: paths drawn per input (the ``loo`` baseline's K).
    :param normalise: scale the advantages to zero mean, unit variance.
    :param entropy: ``(B, L)`` the planners' entropies; ``- entropy_coef * mean`` is added (a bonus).
    :return: dict with ``loss`` (J), ``policy_loss``, ``penalty``, ``returns`` ``(B, L)``, ``entropy_bonus``.
    """
    if outcome is None:
        outcome = -per_example_loss.detach().to(torch.float32)
    returns = reward_to_go(actions, outcome, cost, lam)
    adv = advantages(returns, baseline, greedy_returns, samples)
    if normalise:
        adv = normalise_advantages(adv)
    pg = reinforce_loss(log_probs, adv)
    penalty = skip_penalty(probs, target_rate) if target_rate is not None else probs.new_zeros(())
    bonus = entropy.mean() * entropy_coef if entropy is not None and entropy_coef else probs.new_zeros(())
    return {"loss": task_loss + pg + beta * penalty - bonus, "policy_loss": pg, "penalty": penalty,
            "returns": returns, "entropy_bonus": bonus}
