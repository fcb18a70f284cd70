"""Layer skipping in BERT as a Gymnasium environment (DPBERT's planning problem, method.md).

The environment drives a :class:`dpbert_rl.model.DPBert` one layer per step through its per-layer
calls (``embed``, ``execute``, ``classify``); it never re-implements the forward pass.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from dpbert_rl.model.objectives import final_reward

OBS_MODES = ("box", "dict")
BACKBONE_MODES = ("frozen", "joint")


def observe(planners, hidden: torch.Tensor, mask: torch.Tensor, i: int, observation: str = "box") -> Any:
    """The observation before layer ``i`` (0-based; ``i = L`` after the last): the planner features of
    ``hidden`` ``(N, seq, d)`` (standardised, :meth:`dpbert_rl.model.planner.Planners.observe`) and the layer's
    one-hot, as ``(N, F + L)`` float32 or a dict of the two parts. After the last layer the features are
    those that layer ``L``'s statistics standardise (the episode is over; nothing acts on them)."""
    L = planners.num_layers
    with torch.no_grad():
        feats = planners.observe(min(i, L - 1), hidden.detach(), mask).float().cpu().numpy().copy()  # (N, F)
    layer = np.zeros((hidden.shape[0], L), dtype=np.float32)
    if i < L:
        layer[:, i] = 1.0
    if observation == "dict":
        return {"features": feats, "layer": layer}
    return np.concatenate([feats, layer], axis=1)


def observation_space(feature_dim: int, num_layers: int, observation: str = "box") -> spaces.Space:
    """Standardised features clipped to [-CLIP, CLIP] and the layer's one-hot: ``Box(F + L)`` or a Dict."""
    from dpbert_rl.model.planner import CLIP

    feats = spaces.Box(-CLIP, CLIP, (feature_dim,), np.float32)
    layer = spaces.Box(0.0, 1.0, (num_layers,), np.float32)
    if observation == "dict":
        return spaces.Dict({"features": feats, "layer": layer})
    low = np.concatenate([feats.low, layer.low]).astype(np.float32)
    high = np.concatenate([feats.high, layer.high]).astype(np.float32)
    return spaces.Box(low, high, (feature_dim + num_layers,), np.float32)


class _Episodes:
    """N episodes in lock-step over one model: the engine shared by the single and vector envs.

    Holds the hidden states ``h`` ``(N, seq, hidden)`` of the current inputs, advances them one layer
    per :meth:`step` (computing the layer only for rows whose action is 1), and at the last layer
    computes the task loss, the reward and, in joint mode, the backbone's update.
    """

    def __init__(self, task, data_dir, split, model, c, lambda_, max_seq_length, max_samples, observation,
                 backbone_mode, joint_lr, joint_update_every, target_rate, rate_coef, device, features="auto",
                 reward="loss", stats_samples=1000, check_reward=True):
        from dpbert_rl.data import collator, get_task, load_split, tokenize
        from dpbert_rl.model import DPBert, feature_stats
        from dpbert_rl.model.planner import Planners

        check_env_args(c=c, lambda_=lambda_, max_seq_length=max_seq_length, max_samples=max_samples,
                       observation=observation, backbone_mode=backbone_mode, joint_lr=joint_lr,
                       joint_update_every=joint_update_every, target_rate=target_rate, rate_coef=rate_coef,
                       features=features, reward=reward, stats_samples=stats_samples)
        self.task = get_task(task)
        if isinstance(model, DPBert):
            self.model = model
        else:
            if not Path(model, "dpbert.json").is_file():
                warnings.warn(f"{model!r} is not a fine-tuned dpbert_rl checkpoint: its classifier head is "
                              "untrained, so the final reward carries little signal", stacklevel=3)
            self.model = DPBert.from_source(model, self.task.num_labels)
        _check_model_fits(self.model, self.task, max_seq_length, model)
        self.device = torch.device(device)
        self.model.to(self.device).eval()  # no dropout: a path determines its outcome
        self.data = tokenize(load_split(self.task, split, data_dir, max_samples), self.model.tokenizer,
                             max_seq_length)
        self.collate = collator(self.model.tokenizer)
        self.L = self.model.num_layers
        self.reward = reward
        # what the agent sees: the model's own planner features when they fit, else fresh statistics
        own = self.model.planners
        if features == "auto":  # the model's own; for planners never trained, the project's default
            features = own.features if bool(own.stats_set) else "mean"
        if features == own.features and bool(own.stats_set):
            self.planners = own
        else:  # standardise with statistics of this env's own inputs (training inputs when split is)
            self.planners = Planners(self.L, self.model.backbone.hidden_size, features=features)
            sample = self.data.select(range(min(int(stats_samples), len(self.data))))
            stats = feature_stats(self.model, sample, self.collate, features)
            self.planners.set_feature_stats(stats["mean"], stats["std"])
        self.planners.to(self.device)
        self.d = self.planners.feature_dim
        if check_reward:  # a reward whose optimum is to skip everything is worth a warning, not a silent run
            from dpbert_rl.evaluation.diagnostics import skip_all_check

            skip_all_check(self.model, self.data, self.collate, reward, c, lambda_, samples=256)
        self.c, self.lambda_ = float(c), float(lambda_)
        self.target_rate, self.rate_coef = target_rate, float(rate_coef)
        self.observation = observation
        self.joint = backbone_mode == "joint"
        if self.joint:
            self.optimizer = torch.optim.AdamW(self.model.backbone.parameters(), lr=joint_lr)
            self.update_every = int(joint_update_every)
            self._pending = 0
        self.model.requires_grad_(False)  # planners are the agent's business; the backbone only in joint mode
        self.model.backbone.requires_grad_(self.joint)
        self.n = 0
        self.i = None  # None: no episode running

    # -------------------------------------------------------------- spaces
    def single_observation_space(self) -> spaces.Space:
        return observation_space(self.d, self.L, self.observation)

    # -------------------------------------------------------------- episodes
    def start(self, indices: np.ndarray) -> Any:
        batch = self.collate([self.data[int(k)] for k in indices])
        self.labels = batch["labels"].to(self.device)
        self.indices = np.asarray(indices)
        self.n = len(indices)
        with torch.set_grad_enabled(self.joint):
            state = self.model.embed(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                     batch["token_type_ids"].to(self.device) if "token_type_ids" in batch else None)
        self.h, self.mask = state.hidden, state.mask
        self.i = 0
        self.path = np.zeros((self.n, self.L), dtype=np.int8)
        return self.obs()

    def obs(self) -> Any:
        return observe(self.planners, self.h, self.mask, self.i, self.observation)

    def step(self, actions: np.ndarray):
        """Advance every episode by one layer; returns (obs, rewards (N,), done, final infos or None)."""
        if self.i is None or self.i >= self.L:
            raise RuntimeError("the episode has ended: call reset() before step()")
        actions = np.asarray(actions)
        if actions.shape != (self.n,):
            raise ValueError(f"expected {self.n} actions of shape ({self.n},); got shape {actions.shape}")
        if not np.isin(actions, (0, 1)).all():
            raise ValueError(f"actions must be 0 (skip) or 1 (execute); got {actions.tolist()}")
        execute = torch.from_numpy(actions.astype(bool)).to(self.device)
        with torch.set_grad_enabled(self.joint):
            self.h = self.model.execute(self.i, self.h, self.mask, execute)
        self.path[:, self.i] = actions
        self.i += 1
        rewards = -self.c * actions.astype(np.float64)
        if self.i < self.L:
            return self.obs(), rewards, False, None
        # last layer: the task loss of the executed path enters the reward
        with torch.set_grad_enabled(self.joint):
            logits = self.model.classify(self.h)
            loss = self.model.task_loss(logits, self.labels)  # (N,)
        if self.joint:
            self._update(loss)
        loss_np = loss.detach().float().cpu().numpy().astype(np.float64)
        preds_t = self.model.predict(logits.detach())
        outcome = final_reward(self.reward, loss.detach(), preds_t, self.labels, self.model.is_regression)
        rewards = rewards + self.lambda_ * outcome.float().cpu().numpy().astype(np.float64)
        if self.target_rate is not None and self.rate_coef:
            skipped = 1.0 - self.path.mean(1)
            rewards = rewards - self.rate_coef * (skipped - self.target_rate) ** 2
        preds = preds_t.float().cpu().numpy()
        labels = self.labels.float().cpu().numpy()
        infos = [{
            "loss": float(loss_np[j]),
            "prediction": float(preds[j]) if self.model.is_regression else int(preds[j]),
            "label": float(labels[j]) if self.model.is_regression else int(labels[j]),
            "correct": bool(abs(preds[j] - labels[j]) < 0.5) if self.model.is_regression else bool(preds[j] == labels[j]),
            "layers_executed": int(self.path[j].sum()),
            "path": self.path[j].copy(),
            "index": int(self.indices[j]),
        } for j in range(self.n)]
        return self.obs(), rewards, True, infos

    def _update(self, loss: torch.Tensor) -> None:
        loss.sum().div(self.update_every).backward()  # the mean over `update_every` episodes
        self._pending += self.n
        if self._pending >= self.update_every:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._pending = 0


class _ModelAccess:
    core: _Episodes

    @property
    def model(self):
        """The :class:`~dpbert_rl.model.DPBert` this environment drives."""
        return self.core.model

    @property
    def num_layers(self) -> int:
        """``L``: the episode length."""
        return self.core.L

    @property
    def feature_dim(self) -> int:
        """``F``: the width of the observation's feature part."""
        return self.core.d

    @property
    def layer_price(self) -> float:
        """``c``: every executed layer is rewarded ``-c``. It may be changed between steps, e.g. by a rate
        controller (:class:`agents.rate.DualRateControl`), and applies from the next step on. Unlike the
        constructor's ``c`` it may be negative: a price set by dual ascent is a signed multiplier."""
        return self.core.c

    @layer_price.setter
    def layer_price(self, value: float) -> None:
        if not math.isfinite(float(value)):
            raise ValueError(f"the layer price must be finite; got {value!r}")
        self.core.c = float(value)

    @property
    def observer(self):
        """The :class:`~dpbert_rl.model.planner.Planners` whose features and statistics make the observations;
        pass it to :func:`agents.evaluate.agent_forward` to drive the model as in this env."""
        return self.core.planners


class LayerSkipEnv(_ModelAccess, gym.Env):
    """
    ## Description
    DPBERT's planning problem (Dynamic Planning in BERT): a transformer of ``L`` layers reads one GLUE
    input; before each layer an agent sees features of the current hidden state and decides whether the
    layer runs.
    Executed layers cost ``c`` each; at the end the task loss of the resulting prediction is charged,
    weighted by ``lambda_``. A skipped layer is not computed. One episode is one input and lasts
    exactly ``L`` steps; the undiscounted return-to-go from step ``i`` is ``R_i`` of eq. (9).

    ## Action Space
    ``Discrete(2)``: 0 = skip layer ``i``, 1 = execute it.

    ## Observation Space
    ``Box(F + L,)`` float32 (or, with ``observation="dict"``, ``Dict(features=Box(F,), layer=Box(L,))``):

    | index        | observation                                                  | min  | max |
    |--------------|--------------------------------------------------------------|------|-----|
    | 0 .. F-1     | features of ``h_{i-1}``, the state before layer i (below)     | -10  | 10  |
    | F .. F+L-1   | one-hot index of the layer to decide                          | 0    | 1   |

    The features are what the model's planners read (``features``): ``cls`` (the ``[CLS]`` row, the
    paper's; ``F = d``), ``mean`` (masked mean of the token states; ``F = d``) or ``cls+mean``
    (``F = 2d``), standardised per layer with statistics of training inputs and clipped to [-10, 10]
    (:meth:`dpbert_rl.model.planner.Planners.observe`). With ``features="auto"`` they are the model's own
    (statistics from its checkpoint), or ``mean`` for a model whose planners were never trained;
    otherwise, or when the model has no statistics, statistics are computed on
    the first ``stats_samples`` inputs of this env's split. After the last step the one-hot part is all
    zeros. Note: a ``[CLS]`` row of a mean-pooling backbone (all-MiniLM-L6-v2) is nearly the same for
    every input before the last layer; ``dpbert-rl inspect`` measures it.

    ## Rewards
    ``-c * a_i`` at every step, and at the last step additionally ``lambda_ * q`` with ``reward``:
    ``"loss"`` (eq. 9, the default): ``q = -loss`` (cross-entropy; squared error for STS-B);
    ``"correct"`` (bounded): ``q = 1[correct]``, or ``1 - tanh|error|`` for regression. When the env is
    made it estimates on 256 of its inputs whether skipping every layer beats the full model under this
    reward, and warns (with a lambda that would not) if so (``check_reward=False`` turns that off). With ``target_rate`` and ``rate_coef`` set, the last step also gets
    ``-rate_coef * (skipped fraction - target_rate)^2``, a per-episode form of eq. (11) (off by default).

    ## Starting State
    An input drawn uniformly from the split with ``self.np_random``; ``reset(options={"index": k})``
    picks input ``k``. The first observation is the embedding output's [CLS] row.

    ## Episode End
    Termination after exactly ``L`` steps. There is no truncation.

    ## Arguments
    - ``task``: GLUE task name (``"sst2"``, ``"rte"``, ...).
    - ``data_dir``: local GLUE directory (default ``$GLUE_DIR``, else the hub); ``split``: ``train``,
      ``fit`` (train less the held-out selection split), ``select`` or ``dev``.
    - ``model``: a trained dpbert_rl checkpoint directory (recommended), a backbone name/dir, or a ``DPBert``.
    - ``c``, ``lambda_``: the reward's layer cost and loss weight (eq. 9).
    - ``max_seq_length``, ``max_samples``: tokenisation length and an optional cap on the split.
    - ``observation``: ``"box"`` or ``"dict"``.
    - ``backbone_mode``: ``"frozen"`` (eval mode, deterministic) or ``"joint"``: the env also trains
      backbone and head on the task loss of the paths its agent chose (AdamW, ``joint_lr``, one update
      per ``joint_update_every`` episodes), as in the paper's stage 3. Dropout stays off in both.
    - ``target_rate``, ``rate_coef``: optional skip-rate shaping (see Rewards).
    - ``features``: ``"auto"`` (the model's; ``mean`` if untrained), ``"cls"``, ``"mean"`` or ``"cls+mean"``; ``stats_samples``:
      inputs for fresh standardisation statistics; ``reward``: ``"loss"`` or ``"correct"``.

    ## Vectorized environment
    :class:`BatchedLayerSkipEnv` runs N inputs through one batched forward per step, computing layer ``i``
    only on the rows whose action is 1; all N episodes end together and are reset in the same step.
    ``gymnasium.make_vec("dpbert_rl/LayerSkip-v0", num_envs=N, ...)`` builds it.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: str = "sst2", data_dir: Optional[str] = None, split: str = "train",
                 model: Union[str, Any] = "minilm", c: float = 1.0, lambda_: float = 5.0, max_seq_length: int = 128,
                 max_samples: Optional[int] = None, observation: str = "box", backbone_mode: str = "frozen",
                 joint_lr: float = 2e-5, joint_update_every: int = 32, target_rate: Optional[float] = None,
                 rate_coef: float = 0.0, device: str = "cpu", features: str = "auto", reward: str = "loss",
                 stats_samples: int = 1000, check_reward: bool = True, render_mode: Optional[str] = None):
        self.core = _Episodes(task, data_dir, split, model, c, lambda_, max_seq_length, max_samples, observation,
                              backbone_mode, joint_lr, joint_update_every, target_rate, rate_coef, device, features,
                              reward, stats_samples, check_reward)
        self.observation_space = self.core.single_observation_space()
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        index = _index_from_options(options, len(self.core.data))
        if index is None:
            index = int(self.np_random.integers(len(self.core.data)))
        obs = self.core.start(np.array([index]))
        return _row(obs, 0), {"index": index}

    def step(self, action):
        action = np.asarray(action).reshape(-1)
        if action.size != 1:
            raise ValueError(f"expected one action, 0 (skip) or 1 (execute); got {action.tolist()}")
        obs, rewards, done, infos = self.core.step(action)
        return _row(obs, 0), float(rewards[0]), done, False, (infos[0] if done else {})


class BatchedLayerSkipEnv(_ModelAccess, VectorEnv):
    """N :class:`LayerSkipEnv` episodes in one batched forward per step (same arguments, plus ``num_envs``).

    Every episode lasts ``L`` steps, so the batch stays in lock-step: at the last step all N episodes
    terminate and are reset in that same step (``AutoresetMode.SAME_STEP``): the returned observation
    is the new episodes' first one, and ``infos["final_obs"]`` / ``infos["final_info"]`` hold the ends.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 16, **kwargs):
        from dpbert_rl.checks import check_number

        num_envs = int(check_number(num_envs, "num_envs", low=1, integer=True))
        kwargs.pop("render_mode", None)
        self.core = self._make_core(kwargs)
        self.num_envs = num_envs
        self.single_observation_space = self.core.single_observation_space()
        self.single_action_space = spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._np_random = None

    def _make_core(self, kwargs: dict):
        return _Episodes(**_core_kwargs(kwargs, LayerSkipEnv))

    @property
    def _num_inputs(self) -> int:
        return len(self.core.data)

    def _draw(self) -> np.ndarray:
        return self.np_random.integers(self._num_inputs, size=self.num_envs)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        indices = options.get("indices") if options else None
        if options and set(options) - {"indices"}:
            raise ValueError(f"unknown reset options {sorted(set(options) - {'indices'})}; expected 'indices'")
        if indices is None:
            indices = self._draw()
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"options['indices'] must be integers; got {indices.tolist()} ({indices.dtype})")
        if indices.shape != (self.num_envs,) or (indices < 0).any() or (indices >= self._num_inputs).any():
            raise ValueError(f"options['indices'] must be {self.num_envs} indices in [0, {self._num_inputs})")
        return self.core.start(indices), {"indices": indices.copy()}

    def step(self, actions):
        obs, rewards, done, finals = self.core.step(np.asarray(actions))
        terminated = np.full(self.num_envs, done)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict = {}
        if done:
            final_obs = np.empty(self.num_envs, dtype=object)
            for j in range(self.num_envs):
                final_obs[j] = _row(obs, j)
            infos = {"final_obs": final_obs, "_final_obs": np.ones(self.num_envs, dtype=bool),
                     "final_info": self._final_info(finals), "_final_info": np.ones(self.num_envs, dtype=bool)}
            obs = self.core.start(self._draw())
        return obs, rewards.astype(np.float64), terminated, truncated, infos

    def _final_info(self, finals: list) -> dict:
        """The ended episodes' infos (one dict per episode) as Gymnasium's vector form: arrays + masks."""
        return _stack_infos(finals)


def _core_kwargs(kwargs: dict, single: type) -> dict:
    """A vector env's keyword arguments, checked against (and defaulted from) its single env's (``single``)."""
    import inspect

    params = inspect.signature(single.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k not in ("self", "render_mode")}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; expected some of {sorted(defaults)}")
    return {**defaults, **kwargs}


def check_env_args(*, c, lambda_, max_seq_length, max_samples, observation, backbone_mode, joint_lr,
                   joint_update_every, target_rate, rate_coef, features, reward, stats_samples) -> None:
    """The arguments the live and the tree env share, each against what it may be (c, lambda_ >= 0, finite;
    counts whole; names from their lists): the one check both envs make before any model or cache is touched,
    so that they refuse the same arguments with the same error."""
    from dpbert_rl.checks import check_number
    from dpbert_rl.model.objectives import REWARDS
    from dpbert_rl.model.planner import FEATURES

    numbers = {"c": (c, dict(low=0.0)), "lambda_": (lambda_, dict(low=0.0)), "rate_coef": (rate_coef, dict(low=0.0)),
               "target_rate": (target_rate, dict(low=0.0, high=1.0, optional=True)),
               "joint_lr": (joint_lr, dict(low=0.0, low_open=True)),
               "joint_update_every": (joint_update_every, dict(low=1, integer=True)),
               "max_seq_length": (max_seq_length, dict(low=8, integer=True)),
               "max_samples": (max_samples, dict(low=1, integer=True, optional=True)),
               "stats_samples": (stats_samples, dict(low=2, integer=True))}  # statistics need two inputs
    for name, (value, rule) in numbers.items():
        check_number(value, name, **rule)
    for name, value, allowed in (("observation", observation, OBS_MODES), ("reward", reward, REWARDS),
                                 ("backbone_mode", backbone_mode, BACKBONE_MODES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    if features != "auto" and features not in FEATURES:
        raise ValueError(f"features must be 'auto' or one of {FEATURES}; got {features!r}")


def _check_model_fits(model, task, max_seq_length: int, source) -> None:
    """The model's head must fit the task (label count and type) and its positions the sequence length."""
    from dpbert_rl.checks import check_max_seq_length, check_task_compatible

    where = source if not hasattr(source, "backbone") else "the DPBert model passed as `model`"
    check_task_compatible(model, task, where)
    check_max_seq_length(model, max_seq_length, where)


def _index_from_options(options: Optional[dict], n: int) -> Optional[int]:
    if not options:
        return None
    unknown = set(options) - {"index"}
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; expected 'index'")
    raw = options["index"]
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
        raise ValueError(f"options['index'] must be an integer in [0, {n}); got {raw!r}")
    index = int(raw)
    if not 0 <= index < n:
        raise ValueError(f"options['index'] = {index} is outside [0, {n})")
    return index


def _row(obs, j: int):
    if isinstance(obs, dict):
        return {k: v[j] for k, v in obs.items()}
    return obs[j]


def _stack_infos(infos: list) -> dict:
    out = {}
    for key in infos[0]:
        out[key] = np.stack([np.asarray(info[key]) for info in infos])
        out["_" + key] = np.ones(len(infos), dtype=bool)
    return out
