"""REINFORCE with L separate linear planners: the paper's algorithm (eq. 4, 7, 9-12) as an agent.

It trains on the natively batched environment. With ``backbone_mode="joint"`` in the environment
(which then updates backbone and head on the task loss of the chosen paths) this is the paper's
stage 3. Relation to ``dpbert_rl``'s own stage-3 trainer (``dpbert-rl rl``): that trainer computes
eq. (12) in one differentiable pass over a batch; this agent sees only observations and rewards,
and builds the same REINFORCE term from the environment's rewards, whose returns-to-go are eq. (9).
On the same batch and the same sampled actions the two give the same planner gradient (tested).

The trainer's variance reductions are here too, through the same functions of
:mod:`dpbert_rl.model.objectives`: the leave-one-out baseline over K episodes per input (``baseline="loo"``,
``samples=K``; the agent replays the inputs by resetting the environment to them, which
``dpbert_rl/LayerSkipTree-v0`` makes nearly free), advantage normalisation and an entropy bonus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dpbert_rl.model.objectives import BASELINES, advantages, normalise_advantages, reinforce_loss, skip_penalty
from dpbert_rl.model.planner import Planners, bernoulli_entropy, bernoulli_log_prob

from .base import Agent, Callback, split_obs


@dataclass
class ReinforceConfig:
    lr: float = 1e-3
    """Adam learning rate of the planners (as in dpbert_rl's TrainConfig.planner_lr)."""
    baseline: str = "batch-mean"
    """b_i of eq. (12): none, batch-mean, self-critical (the greedy path's return on the same inputs), or loo
    (leave-one-out: the mean return of the other `samples` - 1 episodes of the same input)."""
    samples: int = 1
    """Episodes per input in one update (K; loo needs K >= 2). The agent replays the same inputs by
    resetting the environment to them (reset(options={"indices": ...})); cheap in the tree env."""
    normalise_advantages: bool = False
    """Scale the advantages to zero mean and unit variance per update (as in PPO)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus on the planners' Bernoulli policies (mean over decisions)."""
    target_rate: Optional[float] = None
    """r of eq. (11); None leaves the skip-rate penalty out."""
    beta: float = 200.0
    """Weight of the penalty (S - r)^2 (as in dpbert_rl's TrainConfig)."""
    init_bias: float = 2.0
    """Initial planner bias: gates start nearly open (p = 0.88)."""
    seed: int = 0


def _check_config(cfg: ReinforceConfig) -> None:
    """A learning rate > 0 and a penalty weight >= 0 (a negative one would reward leaving the target rate)."""
    from dpbert_rl.checks import check_number
    from dpbert_rl.model.objectives import BASELINES, check_rate

    check_number(cfg.lr, "lr", low=0.0, low_open=True)
    check_number(cfg.beta, "beta", low=0.0)
    check_number(cfg.init_bias, "init_bias")
    if cfg.target_rate is not None:
        check_rate(cfg.target_rate)
    if cfg.baseline not in BASELINES:
        raise ValueError(f"unknown baseline {cfg.baseline!r}; expected one of {BASELINES}")


class ReinforceAgent(Agent):
    """:param config: :class:`ReinforceConfig`; keyword arguments override its fields."""

    name = "reinforce"

    def __init__(self, config: Optional[ReinforceConfig] = None, **overrides):
        self.config = config or ReinforceConfig()
        for k, v in overrides.items():
            if not hasattr(self.config, k):
                raise TypeError(f"unknown REINFORCE option {k!r}")
            setattr(self.config, k, v)
        _check_config(self.config)
        cfg = self.config
        if cfg.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {cfg.baseline!r}; expected one of {BASELINES}")
        if cfg.samples < 1 or (cfg.baseline == "loo" and cfg.samples < 2):
            raise ValueError(f"samples must be >= 1 (>= 2 for the loo baseline); got {cfg.samples}")
        if cfg.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0; got {cfg.entropy_coef}")
        self.planners: Optional[Planners] = None
        self.hidden_size = None

    @classmethod
    def keywords(cls) -> set:
        """The fields of :class:`ReinforceConfig`."""
        from dataclasses import fields

        return {f.name for f in fields(ReinforceConfig)}

    # -------------------------------------------------------------- the policy, eq. (4) and (7)
    def _build(self, num_layers: int, hidden_size: int) -> None:
        """``hidden_size``: the width of the observation's feature part (the env's ``feature_dim``)."""
        if self.planners is None:
            torch.manual_seed(self.config.seed)
            self.planners = Planners(num_layers, hidden_size, self.config.init_bias)
            self.hidden_size = hidden_size

    def logits(self, obs) -> torch.Tensor:
        """Planner logits ``(N,)``: each row is scored by the planner of the layer it is about."""
        cls, layer = split_obs(obs, self.hidden_size)
        cls = torch.as_tensor(cls, dtype=torch.float32)
        layer = torch.as_tensor(layer, dtype=torch.long)
        return (cls * self.planners.weight[layer]).sum(-1) + self.planners.bias[layer]

    def execute_probability(self, obs) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(self.logits(obs)).numpy()

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        with torch.no_grad():
            logit = self.logits(obs)
            a = (logit >= 0) if deterministic else torch.bernoulli(torch.sigmoid(logit)).bool()
        return a.long().numpy()

    # -------------------------------------------------------------- the loss, eq. (9)-(12)
    def loss(self, observations: list, actions: np.ndarray, rewards: np.ndarray,
             greedy_returns: Optional[np.ndarray] = None) -> dict:
        """REINFORCE loss of one batch of complete episodes.

        :param observations: L observations, each ``(N, ...)``: the states the actions were taken in.
        :param actions: ``(N, L)`` 0/1; :param rewards: ``(N, L)`` as the environment paid them.
            With ``samples`` K > 1, rows come in groups of K episodes of the same input.
        """
        cfg = self.config
        logits = torch.stack([self.logits(o) for o in observations], 1)  # (N, L)
        act = torch.as_tensor(actions, dtype=torch.float32)
        returns = torch.as_tensor(np.flip(np.cumsum(np.flip(rewards, 1), 1), 1).copy(), dtype=torch.float32)
        greedy = torch.as_tensor(greedy_returns, dtype=torch.float32) if greedy_returns is not None else None
        adv = advantages(returns, cfg.baseline, greedy, cfg.samples)
        if cfg.normalise_advantages:
            adv = normalise_advantages(adv)
        pg = reinforce_loss(bernoulli_log_prob(logits, act), adv)
        probs = torch.sigmoid(logits)
        penalty = skip_penalty(probs, cfg.target_rate) if cfg.target_rate is not None else pg.new_zeros(())
        entropy = bernoulli_entropy(logits).mean()
        bonus = cfg.entropy_coef * entropy
        return {"loss": pg + cfg.beta * penalty - bonus, "policy_loss": pg, "penalty": penalty,
                "entropy": entropy, "entropy_bonus": bonus, "returns": returns}

    def _rollout(self, env, obs, deterministic: bool):
        """Play the N lock-step episodes to their end; returns trajectories and the next observation."""
        observations, actions, rewards = [], [], []
        for _ in range(env.num_layers):
            a = self.act(obs, deterministic)
            observations.append(obs)
            obs, r, terminated, truncated, infos = env.step(a)
            actions.append(a)
            rewards.append(r)
        return observations, np.stack(actions, 1), np.stack(rewards, 1), infos, obs

    # -------------------------------------------------------------- training
    def learn(self, env, total_steps: int, callback: Optional[Callback] = None, log_dir: Optional[str] = None):
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.config
        self._build(env.num_layers, env.feature_dim)
        optimizer = torch.optim.Adam(self.planners.parameters(), lr=cfg.lr)
        writer = SummaryWriter(log_dir) if log_dir else None
        obs, _ = env.reset(seed=cfg.seed)
        steps = 0
        while steps < total_steps:
            # rollout: one batch of N complete episodes with sampled actions (K per input: the same
            # inputs replayed K times, rows then grouped by input as the loo baseline reads them)
            runs = [self._rollout(env, obs, deterministic=False)]
            indices = runs[0][3]["final_info"]["index"]
            for _ in range(cfg.samples - 1):
                replay, _ = env.reset(options={"indices": indices})
                runs.append(self._rollout(env, replay, deterministic=False))
            obs = runs[-1][4]
            observations = [_group([r[0][i] for r in runs]) for i in range(env.num_layers)]
            actions, rewards = _group([r[1] for r in runs]), _group([r[2] for r in runs])
            final = {k: _group([r[3]["final_info"][k] for r in runs]) for k in runs[0][3]["final_info"]}
            steps += actions.size
            greedy = None
            if cfg.baseline == "self-critical":  # replay the same inputs greedily
                g_obs, _ = env.reset(options={"indices": indices})
                _, _, g_rewards, _, _ = self._rollout(env, g_obs, deterministic=True)
                greedy = np.repeat(np.flip(np.cumsum(np.flip(g_rewards, 1), 1), 1), cfg.samples, axis=0)
                obs, _ = env.reset()
            # update
            out = self.loss(observations, actions, rewards, greedy)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            # logging
            scalars = {
                "charts/episodic_return": float(out["returns"][:, 0].mean()),
                "charts/skip_rate": float(1.0 - actions.mean()),
                "charts/layers_executed": float(actions.sum(1).mean()),
                "losses/task_loss": float(np.mean(final["loss"])),
                "losses/policy_loss": out["policy_loss"].item(),
                "losses/entropy": out["entropy"].item(),
            }
            if writer:
                for k, v in scalars.items():
                    writer.add_scalar(k, v, steps)
            if callback is not None and callback({"steps": steps, **scalars}) is False:
                break
        if writer:
            writer.close()
        return self

    # -------------------------------------------------------------- persistence
    def save(self, path) -> None:
        from safetensors.torch import save_file

        super().save(path)
        save_file({k: v.detach().contiguous() for k, v in self.planners.state_dict().items()},
                  str(Path(path) / "planners.safetensors"))

    def state(self) -> dict:
        return {"config": asdict(self.config), "hidden_size": self.hidden_size, "num_layers": self.planners.num_layers}

    @classmethod
    def _restore(cls, path: Path, state: dict) -> "ReinforceAgent":
        from safetensors.torch import load_file

        agent = cls(ReinforceConfig(**state["config"]))
        agent._build(state["num_layers"], state["hidden_size"])
        agent.planners.load_state_dict(load_file(str(path / "planners.safetensors")))
        return agent


def _group(parts: list):
    """K arrays ``(N, ...)`` (or dicts of them) of K episodes of the same N inputs, as ``(N * K, ...)`` rows
    grouped by input (row ``j * K + k``: input ``j``, episode ``k``), as ``repeat_interleave(K)`` orders them."""
    if isinstance(parts[0], dict):
        return {k: _group([p[k] for p in parts]) for k in parts[0]}
    stacked = np.stack([np.asarray(p) for p in parts], 1)  # (N, K, ...)
    return stacked.reshape(-1, *stacked.shape[2:])
