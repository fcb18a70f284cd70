"""The agent protocol, the registry, and the TensorBoard names every agent shares.

An agent learns in an ``envs`` environment and then acts on observations:

    agent.learn(env, total_steps, callback=None) -> agent
    agent.act(obs, deterministic=True) -> actions (np.ndarray of 0/1, one per row of obs)
    agent.save(path);  Agent.load(path)

A new algorithm is one file with a class that subclasses :class:`Agent`, plus one line in
:data:`REGISTRY` (or pass ``module:Class`` wherever an agent name is taken).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# name -> "module:Class"; string entry points, so importing agents loads no algorithm
REGISTRY = {
    "reinforce": "agents.reinforce:ReinforceAgent",
    "ppo": "agents.sb3:PPOAgent",
    "a2c": "agents.sb3:A2CAgent",
    "dqn": "agents.sb3:DQNAgent",
    "recurrent-ppo": "agents.sb3:RecurrentPPOAgent",
    "always": "agents.references:AlwaysExecute",
    "random": "agents.references:RandomSkip",
    "first-k": "agents.references:FirstK",
    "every-other": "agents.references:EveryOther",
}

#: Scalars every agent logs, against the number of environment steps.
SCALARS = ("charts/episodic_return", "charts/skip_rate", "charts/layers_executed", "eval/dev_score",
           "losses/task_loss", "losses/policy_loss", "losses/entropy")

Callback = Callable[[dict], Optional[bool]]
"""Called after every batch of finished episodes with the logged scalars; return False to stop."""


class Agent:
    """Base class: subclasses implement :meth:`learn` and :meth:`act`; stateless ones need no more."""

    name = "agent"

    def learn(self, env, total_steps: int, callback: Optional[Callback] = None, log_dir: Optional[str] = None) -> "Agent":
        """Interact with ``env`` (a :class:`~envs.layer_skip.BatchedLayerSkipEnv`) for ``total_steps`` steps."""
        return self

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        raise NotImplementedError

    def execute_probability(self, obs) -> Optional[np.ndarray]:
        """The policy's probability of action 1 (execute) per row of ``obs``, or None for an agent without
        one (e.g. DQN's argmax, or a fixed reference). Used for the hesitant-gate diagnostic."""
        return None

    def state(self) -> dict:
        """JSON-serialisable constructor arguments (enough to rebuild a stateless agent)."""
        return {}

    @classmethod
    def keywords(cls) -> Optional[set]:
        """The keyword arguments the constructor takes (what ``--agent-kwargs`` may give); None when it takes
        any (``**kwargs``) and the subclass does not say which."""
        import inspect

        params = inspect.signature(cls.__init__).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "agent.json").write_text(json.dumps({"class": f"{type(self).__module__}:{type(self).__name__}",
                                                     "state": self.state()}))

    @classmethod
    def load(cls, path) -> "Agent":
        """The agent saved at ``path``. ``agent.json``'s ``class`` must be a registered agent's or a class of a
        module under ``agents/`` (anything else is refused before it is imported: an import runs code); each
        agent then reads its own files without unpickling (SB3 agents: :meth:`agents.sb3.SB3Agent._restore`)."""
        from dpbert_rl.checks import read_json

        path = Path(path)
        meta_path = path / "agent.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a saved agent directory")
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or not isinstance(meta.get("class"), str) or \
                not isinstance(meta.get("state", {}), dict):
            raise ValueError(f"{meta_path}: expected an object with \"class\" (\"module:Class\") and \"state\" "
                             f"(an object)")
        check_loadable(meta["class"], meta_path)
        return resolve(meta["class"])._restore(path, meta.get("state", {}))

    @classmethod
    def _restore(cls, path: Path, state: dict) -> "Agent":
        return cls(**state)


def check_loadable(target: str, source) -> None:
    """Refuse an agent class that a saved agent (``source``, its ``agent.json``) may not name: only the
    registry's classes and classes of modules under ``agents/`` are imported when an agent is loaded."""
    module, _, attr = target.partition(":")
    allowed = sorted(set(REGISTRY.values()))
    if target in allowed or (attr and module.startswith("agents.") and
                             all(part.isidentifier() for part in module.split(".")) and attr.isidentifier()):
        return
    raise ValueError(f"{source}: class {target!r} is neither a registered agent nor a class of a module under "
                     f"agents/, and is not imported; expected one of {allowed} or 'agents.<module>:<Class>'")


def resolve(name: str):
    """An agent class from a registry name or a ``module:Class`` path."""
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown agent {name!r}; expected one of {sorted(REGISTRY)} or 'module:Class'")
    module, _, attr = target.partition(":")
    try:
        klass = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load agent {name!r} ({target}): {err}") from err
    if not (isinstance(klass, type) and issubclass(klass, Agent)):
        raise ValueError(f"{target} is not an agents.base.Agent subclass")
    return klass


def make_agent(name: str, **kwargs) -> Agent:
    """Instantiate a registered agent (or ``module:Class``) with keyword arguments."""
    return resolve(name)(**kwargs)


def split_obs(obs, feature_dim: int):
    """A Box observation ``(N, F + L)`` (or the Dict form) into ``features (N, F)`` and layer ids ``(N,)``."""
    if isinstance(obs, dict):
        return np.asarray(obs["features"]), np.asarray(obs["layer"]).argmax(-1)
    obs = np.asarray(obs)
    return obs[..., :feature_dim], obs[..., feature_dim:].argmax(-1)
