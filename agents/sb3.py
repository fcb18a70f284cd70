"""Stable-Baselines3 algorithms behind the agent protocol (PPO by default, A2C, DQN, RecurrentPPO).

They train on :class:`envs.sb3.SB3VecEnv` under ``VecMonitor``; ``policy`` and every other keyword
argument pass through to the SB3 constructor. Their TensorBoard runs carry the shared scalar names
(``charts/episodic_return``, ``charts/skip_rate``, ...) besides SB3's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .base import Agent, Callback


def _episode_callback(user_callback: Optional[Callback]):
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeScalars(BaseCallback):
        """Logs the shared scalars whenever a batch of episodes ends."""

        def _on_step(self) -> bool:
            infos = [i for i in self.locals.get("infos", []) if "path" in i]
            if not infos:
                return True
            paths = np.stack([i["path"] for i in infos])
            scalars = {
                "charts/episodic_return": float(np.mean([i["episode"]["r"] for i in infos if "episode" in i] or [np.nan])),
                "charts/skip_rate": float(1.0 - paths.mean()),
                "charts/layers_executed": float(paths.sum(1).mean()),
                "losses/task_loss": float(np.mean([i["loss"] for i in infos])),
            }
            for k, v in scalars.items():
                self.logger.record(k, v)
            self.logger.dump(self.num_timesteps)
            if user_callback is not None and user_callback({"steps": self.num_timesteps, **scalars}) is False:
                return False
            return True

    return EpisodeScalars()


class SB3Agent(Agent):
    """:param policy: SB3 policy name; ``**kwargs`` go to the algorithm's constructor."""

    name = "sb3"
    algorithm = ""  # "module:Class" of the SB3 algorithm, set by subclasses

    def __init__(self, policy: str = "MlpPolicy", num_layers: Optional[int] = None, **kwargs):
        self.policy = policy
        self.kwargs = kwargs
        self.model = None
        self.num_layers = num_layers

    @classmethod
    def _algo(cls):
        import importlib

        module, _, attr = cls.algorithm.partition(":")
        return getattr(importlib.import_module(module), attr)

    def learn(self, env, total_steps: int, callback: Optional[Callback] = None, log_dir: Optional[str] = None):
        from stable_baselines3.common.vec_env import VecMonitor

        from envs.sb3 import SB3VecEnv

        venv = VecMonitor(SB3VecEnv(env))
        self.num_layers = env.num_layers
        if self.model is None:
            kwargs = {"verbose": 0, "device": "cpu", **self.kwargs}
            if log_dir:
                kwargs["tensorboard_log"] = str(Path(log_dir).parent)
            self.model = self._algo()(self.policy, venv, **kwargs)
        else:
            self.model.set_env(venv)
        tb_name = Path(log_dir).name if log_dir else self.name
        self.model.learn(total_timesteps=total_steps, callback=_episode_callback(callback), tb_log_name=tb_name,
                         reset_num_timesteps=False)
        return self

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        actions, _ = self.model.predict(obs, deterministic=deterministic)
        return np.asarray(actions, dtype=np.int64).reshape(-1)

    def execute_probability(self, obs) -> Optional[np.ndarray]:
        """P(execute) of an actor-critic's categorical policy (PPO, A2C); None for value-based DQN."""
        import torch

        policy = self.model.policy
        if not hasattr(policy, "get_distribution"):
            return None
        with torch.no_grad():
            tensor, _ = policy.obs_to_tensor(np.asarray(obs))
            dist = policy.get_distribution(tensor).distribution
        return dist.probs[..., 1].cpu().numpy().reshape(-1) if hasattr(dist, "probs") else None

    def save(self, path) -> None:
        super().save(path)
        self.model.save(str(Path(path) / "model.zip"))

    def state(self) -> dict:
        return {"policy": self.policy, "num_layers": self.num_layers}

    @classmethod
    def _restore(cls, path: Path, state: dict) -> "SB3Agent":
        agent = cls(**state)
        agent.model = cls._algo().load(str(path / "model.zip"), device="cpu")
        return agent


class PPOAgent(SB3Agent):
    name, algorithm = "ppo", "stable_baselines3:PPO"


class A2CAgent(SB3Agent):
    name, algorithm = "a2c", "stable_baselines3:A2C"


class DQNAgent(SB3Agent):
    name, algorithm = "dqn", "stable_baselines3:DQN"


class RecurrentPPOAgent(SB3Agent):
    """sb3-contrib's RecurrentPPO (LSTM policy): the memory can carry the path taken so far."""

    name, algorithm = "recurrent-ppo", "sb3_contrib:RecurrentPPO"

    def __init__(self, policy: str = "MlpLstmPolicy", num_layers: Optional[int] = None, **kwargs):
        super().__init__(policy, num_layers, **kwargs)
        self._state = None

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        obs = np.asarray(obs)
        # an episode starts where the layer one-hot (the last L entries) points at layer 0
        starts = obs.reshape(-1, obs.shape[-1])[:, -self.num_layers:].argmax(-1) == 0
        actions, self._state = self.model.predict(obs, state=self._state, episode_start=starts,
                                                  deterministic=deterministic)
        return np.asarray(actions, dtype=np.int64).reshape(-1)
