"""The planning module: one linear planner per layer (eq. 4) and its Bernoulli policy (eq. 7).

Planner ``i`` reads ``h_{i-1}^cls``, the ``[CLS]`` row of the state *before* layer ``i``, and
outputs one logit; ``p_i = sigmoid(logit)`` is the probability of executing layer ``i``. The paper
writes (4) as a softmax over two outputs; a sigmoid over one logit is the same family and halves
the parameters. Parameters are not shared between layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Planners(nn.Module):
    """``L`` independent linear planners ``p_i = sigmoid(W_i h_{i-1}^cls + b_i)``.

    :param num_layers: ``L``.
    :param hidden_size: ``d``, the width of the ``[CLS]`` vector.
    :param init_bias: initial ``b_i``. The default 2.0 (``p_i ~ 0.88``) starts every gate nearly
        open, so that stage 2 begins close to the fine-tuned backbone rather than from a model
        that averages every layer with its input. The paper does not say; this is our choice.
    :param init_std: standard deviation of the initial ``W_i`` (BERT's initializer range).
    """

    def __init__(self, num_layers: int, hidden_size: int, init_bias: float = 2.0, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_layers, hidden_size) * init_std)  # (L, d)
        self.bias = nn.Parameter(torch.full((num_layers,), float(init_bias)))  # (L,)

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    def forward(self, i: int, cls: torch.Tensor) -> torch.Tensor:
        """Logit of planner ``i`` (0-based) for ``cls`` ``(batch, d)``; returns ``(batch,)``."""
        return cls @ self.weight[i] + self.bias[i]


def bernoulli_log_prob(logit: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Eq. (7) in log form: ``log p^a (1-p)^(1-a)``, computed stably from the logit."""
    action = action.to(logit.dtype)
    return action * F.logsigmoid(logit) + (1.0 - action) * F.logsigmoid(-logit)


def bernoulli_entropy(logit: torch.Tensor) -> torch.Tensor:
    """Entropy of Bernoulli(sigmoid(logit)), in nats."""
    p = torch.sigmoid(logit)
    return -(p * F.logsigmoid(logit) + (1.0 - p) * F.logsigmoid(-logit))
