"""Rate control for any agent: the environment's layer price set by dual ascent.

The planners of ``dpbert_rl`` hold their skip rate with a price per executed layer that follows dual
ascent (:class:`dpbert_rl.model.objectives.DualPrice`). :class:`DualRateControl` gives every agent the same
control without touching the algorithm: it is the ``callback`` of :meth:`agents.base.Agent.learn`, reads
the skip rate of each batch of finished episodes, and moves the environment's ``layer_price``::

    control = DualRateControl(env, target_rate=0.35, lr=0.002)
    agent.learn(env, 1_000_000, callback=control)
    control.history  # [(steps, price, execute rate), ...]

The rate it reads is that of the training episodes (sampled actions); as the policy's entropy falls it
becomes the greedy policy's.
"""

from __future__ import annotations

from typing import Optional

from dpbert_rl.model.objectives import DualPrice

from .base import Callback


class DualRateControl:
    """:param env: an environment with a settable ``layer_price`` (the live or the tree env, single or vector).
    :param target_rate: ``r``, the fraction of layers to skip.
    :param lr: the dual step size per batch of finished episodes.
    :param callback: called after each update with the scalars and ``charts/layer_price``; may stop
        training by returning False.
    """

    def __init__(self, env, target_rate: float, lr: float = 0.002, callback: Optional[Callback] = None):
        self.env = env
        self.dual = DualPrice(target_rate, lr, init=env.layer_price)
        self.callback = callback
        self.history: list = []

    def __call__(self, scalars: dict):
        execute = 1.0 - float(scalars["charts/skip_rate"])
        self.env.layer_price = self.dual.update(execute)
        self.history.append((int(scalars["steps"]), self.dual.price, execute))
        if self.callback is not None:
            return self.callback({**scalars, "charts/layer_price": self.dual.price})
        return None


__all__ = ["DualRateControl"]
