"""Rate control for any agent: the environment's layer price set by dual ascent.

The planners of ``dpbert_rl`` hold their skip rate with a price per executed layer that follows dual
ascent (:class:`dpbert_rl.model.objectives.DualPrice`). :class:`DualRateControl` gives every agent the same
control without touching the algorithm: it is the ``callback`` of :meth:`agents.base.Agent.learn`, reads
the skip rate of each batch of finished episodes, and moves the environment's ``layer_price``::

    control = DualRateControl(env, target_rate=0.35, lr=0.002)
    agent.learn(env, 1_000_000, callback=control)
    control.history  # [(steps, price, execute rate), ...]

The rate it reads each time is that of the training episodes (sampled actions), but agents are scored on their
greedy actions, whose rate can be far off while the policy still explores (the same proxy made the stages'
price go negative at 12 layers while the greedy model ran 9.5 to 11 of 12 layers). Given ``greedy_rate`` (the
execute rate of the agent's deterministic actions on a fixed probe of inputs), it measures the gap between the
two every ``probe_every`` updates and holds the sampled rate plus that gap, the greedy rate between probes::

    control = DualRateControl(env, 0.35, greedy_rate=lambda: greedy_execute_rate(agent, model, probe))
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from dpbert_rl.model.objectives import DualPrice

from .base import Callback


class DualRateControl:
    """:param env: an environment with a settable ``layer_price`` (the live or the tree env, single or vector).
    :param target_rate: ``r``, the fraction of layers to skip.
    :param lr: the dual step size per batch of finished episodes.
    :param callback: called after each update with the scalars and ``charts/layer_price``; may stop
        training by returning False.
    :param greedy_rate: ``() -> execute rate`` of the agent's greedy actions on a fixed probe of inputs
        (:func:`greedy_execute_rate`); None holds the training episodes' sampled rate.
    :param probe_every: updates between two calls of ``greedy_rate`` (the first update calls it).

    ``history``: ``(steps, price, execute rate held)`` per update; ``probes``: ``(steps, greedy execute rate,
    mean sampled execute rate since the last probe)`` per probe.
    """

    def __init__(self, env, target_rate: float, lr: float = 0.002, callback: Optional[Callback] = None,
                 greedy_rate: Optional[Callable[[], float]] = None, probe_every: int = 50):
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1; got {probe_every}")
        self.env = env
        self.dual = DualPrice(target_rate, lr, init=env.layer_price)
        self.callback = callback
        self.greedy_rate, self.probe_every = greedy_rate, int(probe_every)
        self.gap = 0.0  # greedy minus sampled execute rate, as last measured
        self.history: list = []
        self.probes: list = []
        self._sampled: list = []

    def __call__(self, scalars: dict):
        sampled = 1.0 - float(scalars["charts/skip_rate"])
        if self.greedy_rate is not None:  # the sampled rates since the last probe
            self._sampled.append(sampled)
        if self.greedy_rate is not None and len(self.history) % self.probe_every == 0:
            greedy, mean_sampled = float(self.greedy_rate()), float(np.mean(self._sampled))
            self.gap, self._sampled = greedy - mean_sampled, []
            self.probes.append((int(scalars["steps"]), greedy, mean_sampled))
        execute = min(1.0, max(0.0, sampled + self.gap))
        self.env.layer_price = self.dual.update(execute)
        self.history.append((int(scalars["steps"]), self.dual.price, execute))
        if self.callback is not None:
            return self.callback({**scalars, "charts/layer_price": self.dual.price,
                                  "charts/held_execute_rate": execute})
        return None


@torch.inference_mode()
def greedy_execute_rate(agent, model, probe: dict, observer=None) -> float:
    """The fraction of layers the agent's greedy actions execute on ``probe`` (one collated batch), driving
    ``model`` live with dropout off (:func:`agents.evaluate.agent_forward`)."""
    from dpbert_rl.model.backbone import eval_mode

    from .evaluate import agent_forward

    with eval_mode(model):
        _, actions = agent_forward(model, agent, probe["input_ids"], probe["attention_mask"],
                                   probe.get("token_type_ids"), observer)
    return float(np.asarray(actions, dtype=float).mean())


__all__ = ["DualRateControl", "greedy_execute_rate"]
