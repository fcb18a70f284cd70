"""Stable-Baselines3 algorithms behind the agent protocol (PPO by default, A2C, DQN, RecurrentPPO).

They train on :class:`envs.sb3.SB3VecEnv` under ``VecMonitor``; ``policy`` and every other keyword
argument pass through to the SB3 constructor. Their TensorBoard runs carry the shared scalar names
(``charts/episodic_return``, ``charts/skip_rate``, ...) besides SB3's own.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

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
    def keywords(cls) -> set:
        """``policy`` and the SB3 algorithm's constructor arguments (``env`` is the agent's to give)."""
        import inspect

        params = inspect.signature(cls._algo().__init__).parameters.values()
        return {"policy", "num_layers"} | {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                                           and p.name not in ("self", "env", "_init_setup_model")}

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
        return {"policy": self.policy, "num_layers": self.num_layers,
                "kwargs": {k: v for k, v in self.kwargs.items() if _is_json(v)}}

    @classmethod
    def _restore(cls, path: Path, state: dict) -> "SB3Agent":
        state = dict(state)
        kwargs = state.pop("kwargs", None) or {}
        agent = cls(**state, **kwargs)
        agent.model = load_sb3(cls._algo(), path / "model.zip", agent.policy, agent.num_layers, kwargs)
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


# ------------------------------------------------------------------------------------------- loading safely
# SB3's model.zip keeps what JSON cannot hold as cloudpickle (":serialized:" entries of its "data" member),
# which SB3's own load would unpickle: a crafted file runs code. Every such entry is rebuilt here from the
# agent's own state and the entry's readable fields, and handed to SB3 as `custom_objects`, which SB3 then
# uses instead of unpickling; an entry this table does not know is refused. The weights (*.pth) must load
# under torch.load(weights_only=True): tensors and plain containers only.
_RESET = ("_last_obs", "_last_original_obs", "_last_episode_starts", "_last_lstm_states", "ep_info_buffer",
          "ep_success_buffer", "rollout_buffer_class", "replay_buffer_class", "exploration_schedule")
"""Entries SB3 rebuilds itself when the model is set up or trains again (None: the default)."""
_SCHEDULES = ("lr_schedule", "clip_range", "clip_range_vf")
_TORCH_CLASSES = ("torch.optim.", "torch.nn.modules.activation.")
"""Where a class named in ``policy_kwargs`` may come from (optimizers, activation functions)."""


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def load_sb3(algo, zip_path: Path, policy: str, num_layers: Optional[int], kwargs: dict):
    """``algo.load(zip_path)`` without unpickling anything: see the comment above."""
    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as z:
            names = z.namelist()
            data = json.loads(z.read("data")) if "data" in names else None
            weights = {n: z.read(n) for n in names if n.endswith(".pth")}
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{zip_path}: not a Stable-Baselines3 model file ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or "policy.pth" not in weights:
        raise ValueError(f"{zip_path}: not a Stable-Baselines3 model file (expected the members 'data' and "
                         f"'policy.pth'; found {names})")
    _check_weights(zip_path, weights)
    custom = {}
    for key, entry in data.items():
        if isinstance(entry, dict) and ":serialized:" in entry:
            custom[key] = _rebuild(algo, zip_path, key, entry, data, policy, num_layers, kwargs)
    try:
        return algo.load(str(zip_path), device="cpu", custom_objects=custom)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{zip_path}: cannot be loaded as a {algo.__name__} model ({type(err).__name__}: "
                         f"{' '.join(str(err).split())})") from err


def _check_weights(zip_path: Path, weights: dict) -> None:
    import pickle

    import torch

    for name, raw in weights.items():
        try:
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, EOFError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [""])[0]
            hint = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), first)
            raise ValueError(f"{zip_path}: {name} holds more than tensors and plain containers, so it is not "
                             f"loaded (torch.load(weights_only=True) refused it: {hint[:200]})") from None


def _rebuild(algo, zip_path: Path, key: str, entry: dict, data: dict, policy: str, num_layers: Optional[int],
             kwargs: dict) -> Any:
    """The object that stands for the serialized entry ``key``, built without unpickling it."""
    import inspect

    from gymnasium import spaces

    def refuse(why: str):
        raise ValueError(f"{zip_path}: the serialized entry {key!r} ({entry.get(':type:', '?')}) {why}; it is not "
                         f"unpickled, so this file cannot be loaded")

    kind = str(entry.get(":type:", ""))
    if key in _RESET:
        return None
    if key == "policy_class":
        aliases = getattr(algo, "policy_aliases", {})
        if policy not in aliases:
            refuse(f"is rebuilt from agent.json's policy name, and {policy!r} is not one of {sorted(aliases)}")
        return aliases[policy]
    if key == "action_space":
        if not kind.endswith(".Discrete'>") or str(entry.get("n")) != "2" or str(entry.get("start", 0)) != "0":
            refuse("is not Discrete(2), the layer-skip action space")
        return spaces.Discrete(2)
    if key == "observation_space":
        return _observation_space(entry, kind, num_layers, refuse)
    if key in _SCHEDULES:
        value = _constant(entry)
        if value is None and key == "lr_schedule" and isinstance(data.get("learning_rate"), (int, float)):
            value = data["learning_rate"]  # SB3 rebuilds lr_schedule from learning_rate anyway
        if value is None:
            value = kwargs.get(key, inspect.signature(algo.__init__).parameters.get(key, inspect.Parameter).default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            refuse("is not a constant schedule, and agent.json records no number for it")
        return float(value)
    if key == "train_freq":
        value = kwargs.get(key, inspect.signature(algo.__init__).parameters[key].default)
        return tuple(value) if isinstance(value, list) else value
    if key == "policy_kwargs":
        return _policy_kwargs(entry, refuse)
    refuse("is not one this loader knows how to rebuild")


def _constant(entry: dict) -> Optional[float]:
    """The value of a constant schedule from its readable fields (``ConstantSchedule(val=0.2)``), or None."""
    text = str(entry.get("value_schedule", entry.get("val", "")))
    m = re.fullmatch(r"(?:ConstantSchedule\(val=)?([-+]?[0-9.]+(?:e[-+]?\d+)?)\)?", text.strip())
    return float(m.group(1)) if m else None


def _observation_space(entry: dict, kind: str, num_layers: Optional[int], refuse):
    """The env's own observation space, Box(F + L) or Dict(features, layer), of the shape the entry records."""
    from envs.layer_skip import observation_space

    if not num_layers:
        refuse("needs the layer count, and agent.json records none")
    if kind.endswith(".Box'>"):
        try:
            shape = entry.get("_shape")
            shape = tuple(ast.literal_eval(shape) if isinstance(shape, str) else shape)
        except (ValueError, SyntaxError, TypeError):
            shape = ()
        if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] <= num_layers:
            refuse(f"records no 1-d shape wider than the {num_layers} layers")
        return observation_space(shape[0] - num_layers, num_layers, "box")
    if kind.endswith(".Dict'>"):
        text = str(entry.get("spaces", ""))
        f = re.search(r"'features': Box\([^()]*\((\d+),\)", text)
        layer = re.search(r"'layer': Box\([^()]*\((\d+),\)", text)
        if not (f and layer) or int(layer.group(1)) != num_layers:
            refuse(f"is not the env's Dict(features, layer) of {num_layers} layers")
        return observation_space(int(f.group(1)), num_layers, "dict")
    refuse("is neither a Box nor a Dict observation space of the layer-skip env")


def _policy_kwargs(entry: dict, refuse) -> dict:
    """``policy_kwargs`` from its readable fields: JSON values, literals, and torch optimizer / activation classes."""
    import importlib

    import torch

    out = {}
    for name, value in entry.items():
        if name.startswith(":"):
            continue
        if isinstance(value, str):
            m = re.fullmatch(r"<class '([\w.]+)\.(\w+)'>", value)
            if m:
                module, attr = m.groups()
                klass = None
                if (module + ".").startswith(_TORCH_CLASSES):
                    klass = getattr(importlib.import_module(module), attr, None)
                if not (isinstance(klass, type) and issubclass(klass, (torch.optim.Optimizer, torch.nn.Module))):
                    refuse(f"names the class {value} for {name!r}; only torch optimizers and activations are accepted")
                value = klass
            else:
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    pass  # a plain string (or an object's repr, which SB3 will refuse): never evaluated as code
        out[name] = value
    return out
