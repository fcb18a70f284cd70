"""Stable-Baselines3 ``VecEnv`` adapter over :class:`envs.layer_skip.BatchedLayerSkipEnv` (or the tree
env's :class:`envs.layer_skip_tree.BatchedLayerSkipTreeEnv`, which speaks the same protocol).

SB3 does not take a Gymnasium ``VectorEnv``; this adapter speaks SB3's protocol: ``reset()`` returns
the observation only, ``step_wait()`` the 4-tuple ``(obs, rewards, dones, infos)`` with a list of
per-env info dicts, and each finished episode carries ``terminal_observation`` (episodes end by
termination, never by a time limit, so ``TimeLimit.truncated`` is False). It works under
``VecMonitor``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from .layer_skip import BatchedLayerSkipEnv


class SB3VecEnv(VecEnv):
    """:param env: a :class:`BatchedLayerSkipEnv` (or build one from ``**kwargs`` with ``num_envs``)."""

    def __init__(self, env: Optional[BatchedLayerSkipEnv] = None, **kwargs):
        self.venv = env if env is not None else BatchedLayerSkipEnv(**kwargs)
        super().__init__(self.venv.num_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self._actions = None
        self._seed: Optional[int] = None

    def reset(self):
        obs, _ = self.venv.reset(seed=self._seed)
        self._seed = None
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        dones = terminated | truncated
        out = [{} for _ in range(self.num_envs)]
        if dones.any():
            final = infos["final_info"]
            for j in range(self.num_envs):
                out[j] = {k: v[j] for k, v in final.items() if not k.startswith("_")}
                out[j]["terminal_observation"] = infos["final_obs"][j]
                out[j]["TimeLimit.truncated"] = bool(truncated[j])
        return obs, rewards.astype(np.float32), dones, out

    def seed(self, seed: Optional[int] = None) -> Sequence[None]:
        self._seed = seed
        return [None] * self.num_envs

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices=None) -> list:
        return [getattr(self.venv, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list:
        return [getattr(self.venv, method_name)(*args, **kwargs)] * len(self._indices(indices))

    def env_is_wrapped(self, wrapper_class, indices=None) -> list:
        return [False] * len(self._indices(indices))

    def _indices(self, indices) -> list:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)
