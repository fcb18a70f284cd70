"""The planning module: one linear planner per layer (eq. 4) and its Bernoulli policy (eq. 7).

Planner ``i`` reads features of the state *before* layer ``i`` and outputs one logit;
``p_i = sigmoid(logit)`` is the probability of executing layer ``i``. The paper writes (4) as a
softmax over two outputs; a sigmoid over one logit is the same family and halves the parameters.
Parameters are not shared between layers.

What a planner reads (``features``):

==========  ==================================================================================
cls         ``h_{i-1}^cls``, the paper's choice
mean        the masked mean of the token states of ``h_{i-1}`` (padding excluded)
cls+mean    both, concatenated
==========  ==================================================================================

Each is standardised per layer, ``z = clip((x - mean_i) / std_i, -10, 10)``, with statistics from
training inputs (:meth:`Planners.set_feature_stats`) that are stored in the checkpoint. The clip
bounds the environment's observation space (as SB3's ``VecNormalize(clip_obs=10)`` does).

**A budget as an input** (``budget=(c_min, c_max)``): the planners also read the price of an executed
layer, ``c`` of eq. (9), standardised over the range, ``g = (c - mid) / half-width``, and planner ``i``'s
logit becomes
``(W_i + g V_i) z + b_i + g u_i``. Trained over a range of prices (the exact stage's ``--budget-range``),
one checkpoint then serves every speed: a higher price runs fewer layers. The price it runs at is a buffer
(:meth:`Planners.set_price`), set on unlabeled inputs by ``dpbert-rl calibrate``; fixed-rate planners
(the default, ``budget=None``) have none of this.

Why it matters: a backbone trained with mean pooling (all-MiniLM-L6-v2) leaves its ``[CLS]`` row
nearly the same for every input until the last layer, so a ``[CLS]`` planner can only learn one
fixed path (``dpbert-rl inspect`` measures this for any checkpoint).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


FEATURES = ("cls", "mean", "cls+mean")
CLIP = 10.0  # standardised features are clipped to [-CLIP, CLIP]


def check_features(features: str) -> str:
    if features not in FEATURES:
        raise ValueError(f"unknown planner features {features!r}; expected one of {FEATURES}")
    return features


def feature_dim(features: str, hidden_size: int) -> int:
    """Width of the planner input for ``features`` on a backbone of width ``hidden_size``."""
    return 2 * hidden_size if check_features(features) == "cls+mean" else hidden_size


def token_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` 1.0 on real tokens from the additive attention mask ``(batch, 1, 1, seq)``
    (0 on real tokens, a large negative number on padding) or a 0/1 mask ``(batch, seq)``."""
    if mask.dim() == 4:
        return (mask[:, 0, 0, :] > -1.0).to(torch.float32)
    return mask.to(torch.float32)


def token_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(batch, 1, seq)``: each real token's weight in the masked mean (``1 / tokens``), 0 on padding, so that
    the mean of ``hidden`` ``(batch, seq, d)`` is one product, ``bmm(weights, hidden)``."""
    m = token_mask(mask).to(dtype)
    return (m / m.sum(1, keepdim=True).clamp_min(1.0))[:, None, :]


def raw_features(hidden: torch.Tensor, mask: torch.Tensor, features: str, weights: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """Unstandardised planner input ``(batch, F)`` from ``hidden`` ``(batch, seq, d)``.

    :param weights: the :func:`token_weights` of ``mask``, computed once per batch by an inference loop
        (:meth:`Planners.decider`): the mean is then one product. Without them the mean is summed and divided
        as every cache, environment and training step has computed it (the two agree to float round-off)."""
    check_features(features)
    if features == "cls":
        return hidden[:, 0]
    if weights is not None:
        mean = torch.bmm(weights, hidden)[:, 0]
    else:
        m = token_mask(mask).to(hidden.dtype)[:, :, None]  # (batch, seq, 1)
        mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return mean if features == "mean" else torch.cat([hidden[:, 0], mean], 1)


def standardised(raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``clip((raw - mean) / std, -10, 10)``."""
    return ((raw - mean) / std).clamp(-CLIP, CLIP)


def linear_logit(z: torch.Tensor, weight, bias, g=None, budget_weight=None, budget_bias=None) -> torch.Tensor:
    """``W z + b``, plus ``g (V z + u)`` for a price-conditioned planner reading the price input ``g``."""
    out = z @ weight + bias
    return out if g is None else out + g * (z @ budget_weight + budget_bias)


class Planners(nn.Module):
    """``L`` independent linear planners ``p_i = sigmoid(W_i z_i + b_i)`` on standardised features ``z_i``.

    :param num_layers: ``L``.
    :param hidden_size: ``d``, the width of the backbone's hidden states.
    :param features: what each planner reads: ``cls`` (the paper), ``mean`` or ``cls+mean``.
    :param init_bias: initial ``b_i``. The default 2.0 (``p_i ~ 0.88``) starts every gate nearly
        open, so that stage 2 begins close to the fine-tuned backbone rather than from a model
        that averages every layer with its input. The paper does not say; this is our choice.
    :param init_std: standard deviation of the initial ``W_i`` (BERT's initializer range).
    """

    def __init__(self, num_layers: int, hidden_size: int, init_bias: float = 2.0, init_std: float = 0.02,
                 features: str = "cls", budget: Optional[tuple] = None):
        super().__init__()
        self.features = check_features(features)
        self.hidden_size = hidden_size
        F_ = feature_dim(features, hidden_size)
        self.weight = nn.Parameter(torch.randn(num_layers, F_) * init_std)  # (L, F)
        self.bias = nn.Parameter(torch.full((num_layers,), float(init_bias)))  # (L,)
        # standardisation statistics per layer, from training inputs; identity until set
        self.register_buffer("feature_mean", torch.zeros(num_layers, F_))  # (L, F)
        self.register_buffer("feature_std", torch.ones(num_layers, F_))  # (L, F)
        self.register_buffer("stats_set", torch.zeros((), dtype=torch.bool))
        self.budget = None if budget is None else check_budget_range(budget)
        if self.budget is not None:  # a price-conditioned policy: (W_i + g V_i) z + b_i + g u_i
            lo, hi = self.budget
            self.budget_weight = nn.Parameter(torch.zeros(num_layers, F_))  # V (L, F)
            self.budget_bias = nn.Parameter(torch.zeros(num_layers))  # u (L,)
            self.register_buffer("price_center", torch.tensor((lo + hi) / 2))
            self.register_buffer("price_scale", torch.tensor((hi - lo) / 2))
            # the price it runs at when none is given: the middle of the range until calibrated
            self.register_buffer("price", torch.tensor((lo + hi) / 2))

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[1]

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor, min_std: float = 1e-6,
                          rel_floor: float = 1e-3) -> None:
        """Store the per-layer mean and standard deviation ``(L, F)`` of the raw features.

        A feature that hardly varies across inputs would be blown up to noise by ``1 / std`` (and the
        clip would turn float round-off into +-10): each layer's std is floored at ``rel_floor`` times
        the root mean square of that layer's mean (and at ``min_std``), so an (almost) constant feature
        reads as (almost) 0. The floor depends on the mean only, so storing the result again changes
        nothing."""
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(f"feature statistics must have shape {tuple(self.feature_mean.shape)}; "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        floor = (rel_floor * mean.pow(2).mean(1, keepdim=True).sqrt()).clamp_min(min_std)  # (L, 1)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.maximum(std, floor))
        self.stats_set.fill_(True)

    def standardise(self, i: int, raw: torch.Tensor) -> torch.Tensor:
        """``clip((raw - mean_i) / std_i, -10, 10)``: the input planner ``i`` reads, ``(batch, F)``."""
        return standardised(raw, self.feature_mean[i].to(raw.dtype), self.feature_std[i].to(raw.dtype))

    def observe(self, i: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The standardised features of ``hidden`` ``(batch, seq, d)`` for planner ``i``: ``(batch, F)``.
        The model's planners, the environments' observations and the agents all read this."""
        return self.standardise(i, raw_features(hidden, mask, self.features))

    @torch.no_grad()
    def set_fixed_path(self, path, margin: float = 2.0) -> None:
        """Planners whose every decision is one fixed path: the weights (and a budget's ``V``, ``u``) zeroed and
        ``b_i = +margin`` on the layers ``path`` executes, ``-margin`` on those it skips, so that the greedy
        decision (threshold 0.5) is ``path`` on every input and a sampled one follows it with probability
        ``sigmoid(margin)``. A later stage learns from there what to read of the state.

        :param path: ``L`` decisions, 1 execute and 0 skip."""
        decisions = torch.as_tensor(path, dtype=torch.float32).flatten()
        if decisions.numel() != self.num_layers or not bool(((decisions == 0) | (decisions == 1)).all()):
            raise ValueError(f"a fixed path is {self.num_layers} decisions of 0 (skip) or 1 (execute); got {path!r}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
            raise ValueError(f"margin must be a positive number; got {margin!r}")
        self.weight.zero_()
        self.bias.copy_((2.0 * decisions - 1.0) * float(margin))
        if self.budget is not None:
            self.budget_weight.zero_()
            self.budget_bias.zero_()

    @property
    def input_independent(self) -> bool:
        """Whether no planner reads its input (every weight zero, :meth:`set_fixed_path`): then every input
        takes the same greedy path, and a rate measured on one input is the rate on all of them."""
        return not bool(self.weight.any()) and (self.budget is None or not bool(self.budget_weight.any()))

    @property
    def conditioned(self) -> bool:
        """Whether the planners read a budget (the layer price) as well as the state."""
        return self.budget is not None

    def set_price(self, price: float) -> None:
        """The layer price the planners run at when no budget is passed (price-conditioned planners only)."""
        if not self.conditioned:
            raise ValueError("these planners were trained for one rate and read no budget; train them with a "
                             "budget range (dpbert-rl exact --budget-range) to set a price")
        if not (isinstance(price, (int, float)) and math.isfinite(price)):
            raise ValueError(f"price must be a finite number; got {price!r}")
        self.price.fill_(float(price))

    def budget_input(self, price=None) -> torch.Tensor:
        """``g``: the standardised price, from ``price`` (a number or ``(batch,)``) or the stored one."""
        price = self.price if price is None else torch.as_tensor(price, dtype=self.price.dtype,
                                                                 device=self.price.device)
        return (price - self.price_center) / self.price_scale

    def decider(self, mask: torch.Tensor, dtype: torch.dtype, price=None):
        """For inference: a function ``(i, hidden) -> logit (batch,)``, equal to
        ``forward(i, observe(i, hidden, mask), price)`` up to float round-off, with the work that does not
        depend on the layer done once per input batch (the token weights of the mean, the statistics in the
        state's dtype, the price's input) instead of once per layer. At batch size 1 a planner's cost is
        the number of tensor operations it launches, not their size: this is 5 per layer (``mean``)
        against about 20."""
        feats = self.features
        mu, std = self.feature_mean.to(dtype), self.feature_std.to(dtype)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        tw = None if feats == "cls" else token_weights(mask, dtype)
        g = v = u = None
        if self.budget is not None:
            g = self.budget_input(price).to(dtype)
            v, u = self.budget_weight.to(dtype), self.budget_bias.to(dtype)

        def logit(i: int, hidden: torch.Tensor) -> torch.Tensor:
            z = standardised(raw_features(hidden, mask, feats, tw), mu[i], std[i])
            return linear_logit(z, weight[i], bias[i], g, None if v is None else v[i], None if u is None else u[i])

        return logit

    def forward(self, i: int, z: torch.Tensor, price=None) -> torch.Tensor:
        """Logit of planner ``i`` (0-based) for standardised features ``z`` ``(batch, F)`` (or
        ``(batch, nodes, F)``); ``(batch,)`` (or ``(batch, nodes)``). ``price``: the layer price a
        price-conditioned planner reads, a number or one per row ``(batch,)``; default the stored one."""
        if self.budget is None:
            return linear_logit(z, self.weight[i], self.bias[i])
        g = self.budget_input(price).to(z.dtype)
        if g.dim() == 1 and z.dim() == 3:
            g = g[:, None]  # one price per input, for all its nodes
        return linear_logit(z, self.weight[i], self.bias[i], g, self.budget_weight[i], self.budget_bias[i])


def check_budget_range(budget) -> tuple:
    """``(c_min, c_max)``: two finite prices with ``c_min < c_max``. A negative price pays for an executed
    layer: the dual ascent of fixed-rate training goes there to make planners run more layers than the
    reward alone would."""
    try:
        lo, hi = (float(c) for c in budget)
    except (TypeError, ValueError):
        raise ValueError(f"a budget range is two prices (c_min, c_max); got {budget!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"a budget range needs c_min < c_max, both finite; got {budget!r}")
    return (lo, hi)


def bernoulli_log_prob(logit: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Eq. (7) in log form: ``log p^a (1-p)^(1-a)``, computed stably from the logit."""
    action = action.to(logit.dtype)
    return action * F.logsigmoid(logit) + (1.0 - action) * F.logsigmoid(-logit)


def bernoulli_entropy(logit: torch.Tensor) -> torch.Tensor:
    """Entropy of Bernoulli(sigmoid(logit)), in nats."""
    p = torch.sigmoid(logit)
    return -(p * F.logsigmoid(logit) + (1.0 - p) * F.logsigmoid(-logit))
