"""The frozen layer-skipping game replayed from the path-tree cache (:mod:`dpbert_rl.pathtree`).

With a frozen backbone every state an episode can reach is known in advance, so an episode is a few
array lookups: the state after the decisions so far is path ``p``'s (the bits decided, then zeros),
its features are ``features[input, p]``, and the outcome at the end is ``losses[input, p]``. No model
runs and no torch call is made per step. Equal, step for step, to :class:`envs.layer_skip.LayerSkipEnv`
with ``backbone_mode="frozen"``; the live environment stays the one for joint mode.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from .layer_skip import (BatchedLayerSkipEnv, _check_model_fits, _core_kwargs, _index_from_options, _ModelAccess,
                         check_env_args, observation_space)

IN_MEMORY_BYTES = 2 ** 31  # caches up to this size are read into memory; larger ones stay memory-mapped
CACHE_DTYPES = ("float32", "float16")
# model types whose position ids start after the padding index (RoBERTa-style), as dpbert_rl.checks.max_positions
# reads it from a loaded model's embeddings; here it is read from a checkpoint's config.json without loading it
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text", "mpnet",
                     "roberta-prelayernorm", "xmod", "ernie_m")


def _check_positions(model, task: str, max_seq_length: int) -> None:
    """Refuse a ``max_seq_length`` beyond the backbone's position embeddings, as the live env does (else a long
    input crashes inside the embeddings while the cache is built). A checkpoint directory is not loaded for
    this: its ``config.json`` says how many positions it has."""
    if not isinstance(model, (str, Path)):
        from dpbert_rl.data import get_task

        return _check_model_fits(model, get_task(task), max_seq_length, model)
    config = Path(model, "config.json")
    if not config.is_file():
        return
    from dpbert_rl.checks import read_json

    cfg = read_json(config)
    n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    if not isinstance(n, int):
        return
    if cfg.get("model_type") in _OFFSET_POSITIONS and isinstance(cfg.get("pad_token_id"), int):
        n -= cfg["pad_token_id"] + 1
    if max_seq_length > n:
        raise ValueError(f"max_seq_length (--max-seq-length) {max_seq_length} exceeds the {n} positions of {model}; "
                         f"use --max-seq-length {n} or less")


class _TreeEpisodes:
    """N episodes in lock-step over one path-tree cache: the engine of the single and vector envs.

    The state of episode ``j`` is one integer, the path index ``p_j`` with the decided bits set (layer 1
    the most significant bit): ``p_j |= a << (L - 1 - i)`` at step ``i``.
    """

    def __init__(self, task, data_dir, split, model, c, lambda_, max_seq_length, max_samples, observation,
                 backbone_mode, joint_lr, joint_update_every, target_rate, rate_coef, device, features="auto",
                 reward="loss", stats_samples=1000, cache_dir=None, build_batch_size=1, progress=True,
                 cache_dtype="float32"):
        import torch

        from dpbert_rl.checks import check_number
        from dpbert_rl.model.objectives import final_reward
        from dpbert_rl.pathtree import DEFAULT_CACHE_DIR, planner_info, tree_cache
        from dpbert_rl.model.planner import CLIP, Planners

        check_env_args(c=c, lambda_=lambda_, max_seq_length=max_seq_length, max_samples=max_samples,
                       observation=observation, backbone_mode=backbone_mode, joint_lr=joint_lr,
                       joint_update_every=joint_update_every, target_rate=target_rate, rate_coef=rate_coef,
                       features=features, reward=reward, stats_samples=stats_samples)
        if backbone_mode != "frozen":
            raise ValueError("backbone_mode='joint' trains the backbone, so its path tree cannot be cached: "
                             "use the live environment dpbert_rl/LayerSkip-v0 for joint mode")
        check_number(build_batch_size, "build_batch_size", low=1, integer=True)
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}; got {cache_dtype!r}")
        if isinstance(model, (str, Path)) and not Path(model, "dpbert.json").is_file():
            from dpbert_rl.data import get_task
            from dpbert_rl.model import DPBert

            warnings.warn(f"{model!r} is not a fine-tuned dpbert_rl checkpoint: its classifier head is "
                          "untrained, so the final reward carries little signal", stacklevel=3)
            model = DPBert.from_source(str(model), get_task(task).num_labels)
        _check_positions(model, task, max_seq_length)
        self.source = model
        own = planner_info(model)
        if features == "auto":  # the model's own; for planners never trained, the project's default
            features = own["features"] if own["mean"] is not None else "mean"
        self.tree = tree_cache(model, task, split, data_dir, max_samples, max_seq_length, features,
                               cache_dir or DEFAULT_CACHE_DIR, cache_dtype, build_batch_size, device, progress)
        tree = self.tree
        self.L, self.N = tree.num_layers, tree.num_inputs
        hidden = int(tree.meta["hidden_size"])
        # what the agent sees: the model's own statistics when they fit, else statistics of this split's
        # first `stats_samples` inputs along the full path (as the live env computes them, from the cache)
        self.planners = Planners(self.L, hidden, features=features)
        if features == own["features"] and own["mean"] is not None:
            self.planners.set_feature_stats(torch.as_tensor(own["mean"]), torch.as_tensor(own["std"]))
        else:
            stats = tree.feature_stats(features, stats_samples)
            self.planners.set_feature_stats(stats["mean"], stats["std"])
        self.mean = self.planners.feature_mean.numpy().copy()  # (L, F) float32
        self.std = self.planners.feature_std.numpy().copy()
        self.d = self.planners.feature_dim
        self.clip = float(CLIP)
        raw = tree.raw(features)
        self.raw = np.ascontiguousarray(raw) if raw.nbytes <= IN_MEMORY_BYTES else raw  # (N, P, F)
        # each path's outcome term q, computed once for all paths by the live env's own function
        losses = torch.from_numpy(np.asarray(tree.losses))
        labels = torch.from_numpy(np.asarray(tree.labels))[:, None].expand_as(losses)
        self.outcome = final_reward(reward, losses, torch.from_numpy(np.asarray(tree.predictions)), labels,
                                    tree.regression).float().numpy()  # (N, P)
        self.losses, self.predictions = np.asarray(tree.losses), np.asarray(tree.predictions)
        self.correct, self.labels = np.asarray(tree.correct), np.asarray(tree.labels)
        self.indices = np.asarray(tree.indices)
        self.regression = tree.regression
        self.reward = reward
        self.c, self.lambda_ = float(c), float(lambda_)
        self.target_rate, self.rate_coef = target_rate, float(rate_coef)
        self.observation = observation
        self.onehot = np.zeros((self.L + 1, self.L), np.float32)  # row L: after the last layer, all zeros
        self.onehot[np.arange(self.L), np.arange(self.L)] = 1.0
        self.n = 0
        self.i = None  # None: no episode running

    # -------------------------------------------------------------- spaces
    def single_observation_space(self) -> spaces.Space:
        return observation_space(self.d, self.L, self.observation)

    # -------------------------------------------------------------- episodes
    def start(self, indices: np.ndarray) -> Any:
        self._begin(indices)
        return self.obs()

    def _begin(self, indices: np.ndarray) -> None:
        self.rows = np.asarray(indices, dtype=np.int64)
        self.n = len(self.rows)
        self.state = np.zeros(self.n, dtype=np.int64)
        self.path = np.zeros((self.n, self.L), dtype=np.int8)
        self.i = 0

    def obs(self) -> Any:
        i, F = self.i, self.d
        k = min(i, self.L - 1)  # after the last layer: layer L's statistics, as the live env does
        out = np.empty((self.n, F + self.L), np.float32)
        z = out[:, :F]
        np.subtract(self.raw[self.rows, self.state], self.mean[k], out=z)  # (n, F): the states' raw features
        np.divide(z, self.std[k], out=z)
        np.minimum(np.maximum(z, -self.clip, out=z), self.clip, out=z)  # clip, without np.clip's overhead
        out[:, F:] = self.onehot[i]
        if self.observation == "dict":
            return {"features": out[:, :F].copy(), "layer": out[:, F:].copy()}
        return out

    # -------------------------------------------------------------- one episode, without batch arrays
    def start_one(self, index: int) -> Any:
        """:meth:`start` for one input, kept as scalars: the single env's fast path."""
        self._begin(np.array([index]))
        self.row, self.p = int(index), 0
        return self.obs_one()

    def obs_one(self) -> Any:
        i, F = self.i, self.d
        k = min(i, self.L - 1)
        out = np.empty(F + self.L, np.float32)
        z = out[:F]
        np.subtract(self.raw[self.row, self.p], self.mean[k], out=z)
        np.divide(z, self.std[k], out=z)
        np.minimum(np.maximum(z, -self.clip, out=z), self.clip, out=z)  # clip, without np.clip's overhead
        out[F:] = self.onehot[i]
        if self.observation == "dict":
            return {"features": out[:F], "layer": out[F:]}
        return out

    def step_one(self, action: int):
        """:meth:`step` for the one episode of :meth:`start_one`: (obs, reward, done, info or {})."""
        if self.i is None or self.i >= self.L:
            raise RuntimeError("the episode has ended: call reset() before step()")
        if action != 0 and action != 1:
            raise ValueError(f"actions must be 0 (skip) or 1 (execute); got {[action]}")
        a, i = int(action), self.i
        self.path[0, i] = a
        self.p |= a << (self.L - 1 - i)
        self.i = i + 1
        reward = -self.c * float(a)
        if self.i < self.L:
            return self.obs_one(), reward, False, {}
        row, p = self.row, self.p
        reward = reward + self.lambda_ * float(self.outcome[row, p])
        if self.target_rate is not None and self.rate_coef:
            skipped = 1.0 - float(self.path[0].mean())
            reward = reward - self.rate_coef * (skipped - self.target_rate) ** 2
        kind = float if self.regression else int
        info = {"loss": float(self.losses[row, p]), "prediction": kind(self.predictions[row, p]),
                "label": kind(self.labels[row]), "correct": bool(self.correct[row, p]),
                "layers_executed": int(self.path[0].sum()), "path": self.path[0].copy(),
                "index": int(self.indices[row])}
        return self.obs_one(), reward, True, info

    def step(self, actions: np.ndarray):
        """Advance every episode by one layer; returns (obs, rewards (N,), done, final infos or None),
        the final infos as a dict of arrays ``(N, ...)``."""
        if self.i is None or self.i >= self.L:
            raise RuntimeError("the episode has ended: call reset() before step()")
        actions = np.asarray(actions)
        if actions.shape != (self.n,):
            raise ValueError(f"expected {self.n} actions of shape ({self.n},); got shape {actions.shape}")
        if not ((actions == 0) | (actions == 1)).all():
            raise ValueError(f"actions must be 0 (skip) or 1 (execute); got {actions.tolist()}")
        a = actions.astype(np.int64)
        self.path[:, self.i] = a
        self.state |= a << (self.L - 1 - self.i)
        self.i += 1
        rewards = -self.c * a.astype(np.float64)
        if self.i < self.L:
            return self.obs(), rewards, False, None
        # last layer: the outcome of the path taken, read from the cache
        rows, p = self.rows, self.state
        rewards = rewards + self.lambda_ * self.outcome[rows, p].astype(np.float64)
        if self.target_rate is not None and self.rate_coef:
            skipped = 1.0 - self.path.mean(1)
            rewards = rewards - self.rate_coef * (skipped - self.target_rate) ** 2
        preds, labels = self.predictions[rows, p], self.labels[rows]
        kind = np.float64 if self.regression else np.int64
        infos = {
            "loss": self.losses[rows, p].astype(np.float64),
            "prediction": preds.astype(kind),
            "label": labels.astype(kind),
            "correct": self.correct[rows, p].astype(bool),
            "layers_executed": self.path.sum(1).astype(np.int64),
            "path": self.path.copy(),
            "index": self.indices[rows].astype(np.int64),
        }
        return self.obs(), rewards, True, infos


class _TreeAccess(_ModelAccess):
    """The live env's accessors (``num_layers``, ``feature_dim``, ``observer``), with the model loaded lazily
    and the tree it replays."""

    core: _TreeEpisodes

    @property
    def model(self):
        """The :class:`~dpbert_rl.model.DPBert` whose tree this is (loaded on first use: no step needs it)."""
        from dpbert_rl.model import DPBert

        if not isinstance(self.core.source, DPBert):
            self.core.source = DPBert.load(self.core.source)
        return self.core.source

    @property
    def tree(self):
        """The :class:`~dpbert_rl.pathtree.PathTree` this environment replays."""
        return self.core.tree


class LayerSkipTreeEnv(_TreeAccess, gym.Env):
    """
    ## Description
    DPBERT's planning problem with a frozen backbone, replayed from the path-tree cache
    (:mod:`dpbert_rl.pathtree`): the same game as ``dpbert_rl/LayerSkip-v0`` with
    ``backbone_mode="frozen"``, equal step for step (observations, rewards, terminations, infos) for the
    same inputs, seeds and actions, but each step is an array lookup instead of a transformer layer.
    One episode is one input and lasts exactly ``L`` steps; before each layer the agent sees the
    planner features of the current state and decides whether the layer runs. The cache is built on
    first use (``2^L - 1`` layer calls per input, with a progress bar) and reused afterwards.

    **Joint mode** (``backbone_mode="joint"``, the backbone trained on the chosen paths) changes the
    tree while it is played, so it cannot be cached: it stays on the live environment, and this one
    raises for it.

    ## Action Space
    ``Discrete(2)``: 0 = skip layer ``i``, 1 = execute it.

    ## Observation Space
    ``Box(F + L,)`` float32 (or, with ``observation="dict"``, ``Dict(features=Box(F,), layer=Box(L,))``):

    | index        | observation                                                         | min  | max |
    |--------------|---------------------------------------------------------------------|------|-----|
    | 0 .. F-1     | planner features of ``h_{i-1}``, standardised per layer and clipped | -10  | 10  |
    | F .. F+L-1   | one-hot index of the layer to decide                                | 0    | 1   |

    ``F`` is ``d`` for ``features="cls"`` or ``"mean"`` and ``2d`` for ``"cls+mean"``. After the last step the
    one-hot part is all zeros and the features are those of the final state.

    ## Rewards
    ``-c * a_i`` at every step, and at the last step additionally ``lambda_ * q``: ``q = -loss`` with
    ``reward="loss"`` (eq. 9), or the bounded ``q`` of ``reward="correct"``
    (:func:`dpbert_rl.model.objectives.final_reward`). With ``target_rate`` and ``rate_coef`` set, the last step
    also gets ``-rate_coef * (skipped fraction - target_rate)^2``.

    ## Starting State
    An input drawn uniformly from the split with ``self.np_random``; ``reset(options={"index": k})``
    picks input ``k``. The first observation is that of the embedding output.

    ## Episode End
    Termination after exactly ``L`` steps, with the infos ``loss``, ``prediction``, ``label``, ``correct``,
    ``layers_executed``, ``path`` and ``index``. There is no truncation.

    ## Arguments
    The live environment's (:class:`envs.layer_skip.LayerSkipEnv`), with the same meaning:
    ``task``, ``data_dir``, ``split``, ``model``, ``c``, ``lambda_``, ``max_seq_length``, ``max_samples``,
    ``observation``, ``target_rate``, ``rate_coef``, ``features``, ``reward``, ``stats_samples``;
    ``backbone_mode`` must be ``"frozen"``; ``device`` is where a missing cache is built; ``joint_lr`` and
    ``joint_update_every`` are accepted for a drop-in swap and unused. Besides:

    - ``cache_dir``: where caches are kept (default ``runs/pathtree``).
    - ``build_batch_size``, ``progress``: batch size and progress bar of a build.
    - ``cache_dtype``: ``"float32"`` (default, equal to the live env) or ``"float16"`` features.

    ## Vectorized environment
    :class:`BatchedLayerSkipTreeEnv`: N episodes in lock-step by numpy indexing, reset together at the
    last step (``AutoresetMode.SAME_STEP``) as :class:`envs.layer_skip.BatchedLayerSkipEnv` does.
    ``gymnasium.make_vec("dpbert_rl/LayerSkipTree-v0", num_envs=N, ...)`` builds it; it works under
    :class:`envs.sb3.SB3VecEnv` and ``VecMonitor``.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: str = "sst2", data_dir: Optional[str] = None, split: str = "train",
                 model: Union[str, Any] = "minilm", c: float = 1.0, lambda_: float = 5.0, max_seq_length: int = 128,
                 max_samples: Optional[int] = None, observation: str = "box", backbone_mode: str = "frozen",
                 joint_lr: float = 2e-5, joint_update_every: int = 32, target_rate: Optional[float] = None,
                 rate_coef: float = 0.0, device: str = "cpu", features: str = "auto", reward: str = "loss",
                 stats_samples: int = 1000, cache_dir: Optional[str] = None, build_batch_size: int = 1,
                 progress: bool = True, cache_dtype: str = "float32", render_mode: Optional[str] = None):
        self.core = _TreeEpisodes(task, data_dir, split, model, c, lambda_, max_seq_length, max_samples, observation,
                                  backbone_mode, joint_lr, joint_update_every, target_rate, rate_coef, device,
                                  features, reward, stats_samples, cache_dir, build_batch_size, progress, cache_dtype)
        self.observation_space = self.core.single_observation_space()
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        index = _index_from_options(options, self.core.N)
        if index is None:
            index = int(self.np_random.integers(self.core.N))
        return self.core.start_one(index), {"index": index}

    def step(self, action):
        if not isinstance(action, (int, np.integer)):
            action = np.asarray(action).reshape(-1)
            if action.size != 1:
                raise ValueError(f"expected one action, 0 (skip) or 1 (execute); got {action.tolist()}")
            action = action[0]
        obs, reward, done, info = self.core.step_one(action)
        return obs, reward, done, False, info


class BatchedLayerSkipTreeEnv(_TreeAccess, BatchedLayerSkipEnv):
    """N :class:`LayerSkipTreeEnv` episodes in lock-step (same arguments, plus ``num_envs``), by numpy
    indexing: at the last step all N episodes terminate and are reset in that same step
    (``AutoresetMode.SAME_STEP``); ``infos["final_obs"]`` / ``infos["final_info"]`` hold the ends."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def _make_core(self, kwargs: dict):
        return _TreeEpisodes(**_core_kwargs(kwargs, LayerSkipTreeEnv))

    @property
    def _num_inputs(self) -> int:
        return self.core.N

    def _final_info(self, finals: dict) -> dict:
        """The tree core already gives the ended episodes' infos as arrays; add Gymnasium's masks."""
        ones = np.ones(self.num_envs, dtype=bool)
        out = {}
        for key, value in finals.items():
            out[key], out["_" + key] = value, ones
        return out


