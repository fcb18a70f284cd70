"""Layer skipping in BERT as a Gymnasium environment (DPBERT's planning problem, method.md).

The environment drives a :class:`dpbert_rl.model.DPBert` one layer per step through its per-layer
calls (``embed``, ``execute``, ``classify``); it never re-implements the forward pass.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

OBS_MODES = ("box", "dict")
BACKBONE_MODES = ("frozen", "joint")


def observe(hidden: torch.Tensor, i: int, num_layers: int, observation: str = "box") -> Any:
    """The observation before layer ``i`` (0-based; ``i = L`` after the last): ``[CLS]`` of ``hidden``
    ``(N, seq, d)`` and the layer's one-hot, as ``(N, d + L)`` float32 or a dict of the two parts."""
    cls = hidden[:, 0].detach().float().cpu().numpy().copy()  # (N, d); never a view of hidden
    layer = np.zeros((hidden.shape[0], num_layers), dtype=np.float32)
    if i < num_layers:
        layer[:, i] = 1.0
    if observation == "dict":
        return {"cls": cls, "layer": layer}
    return np.concatenate([cls, layer], axis=1)


class _Episodes:
    """N episodes in lock-step over one model: the engine shared by the single and vector envs.

    Holds the hidden states ``h`` ``(N, seq, hidden)`` of the current inputs, advances them one layer
    per :meth:`step` (computing the layer only for rows whose action is 1), and at the last layer
    computes the task loss, the reward and, in joint mode, the backbone's update.
    """

    def __init__(self, task, data_dir, split, model, c, lambda_, max_seq_length, max_samples, observation,
                 backbone_mode, joint_lr, joint_update_every, target_rate, rate_coef, device):
        from dpbert_rl.data import collator, get_task, load_split, tokenize
        from dpbert_rl.model import DPBert
        from dpbert_rl.objectives import check_rate

        if observation not in OBS_MODES:
            raise ValueError(f"observation must be one of {OBS_MODES}; got {observation!r}")
        if backbone_mode not in BACKBONE_MODES:
            raise ValueError(f"backbone_mode must be one of {BACKBONE_MODES}; got {backbone_mode!r}")
        if target_rate is not None:
            check_rate(target_rate)
        _check_env_numbers(c=c, lambda_=lambda_, rate_coef=rate_coef, joint_lr=joint_lr, max_samples=max_samples,
                           joint_update_every=joint_update_every, max_seq_length=max_seq_length)
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
        self.d = self.model.backbone.hidden_size
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
        bound = self.cls_bound()
        cls = spaces.Box(-bound, bound, (self.d,), np.float32)
        layer = spaces.Box(0.0, 1.0, (self.L,), np.float32)
        if self.observation == "dict":
            return spaces.Dict({"cls": cls, "layer": layer})
        low = np.concatenate([cls.low, layer.low]).astype(np.float32)
        high = np.concatenate([cls.high, layer.high]).astype(np.float32)
        return spaces.Box(low, high, (self.d + self.L,), np.float32)

    def cls_bound(self) -> float:
        """A bound on every [CLS] coordinate. Each state of a post-LayerNorm encoder (BERT, RoBERTa,
        ELECTRA) is a LayerNorm output, whose normalised part has norm sqrt(d); so each coordinate is
        at most sqrt(d) max|gamma| + max|beta|. Doubled, for a backbone that joint mode updates."""
        norms = [m for m in self.model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
        if not norms:
            return 1e4
        gamma = max(float(m.weight.abs().max()) for m in norms if m.weight is not None)
        beta = max(float(m.bias.abs().max()) for m in norms if m.bias is not None)
        return float(np.float32(2.0 * (np.sqrt(self.d) * gamma + beta)))

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
        return observe(self.h, self.i, self.L, self.observation)

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
        rewards = rewards - self.lambda_ * loss_np
        if self.target_rate is not None and self.rate_coef:
            skipped = 1.0 - self.path.mean(1)
            rewards = rewards - self.rate_coef * (skipped - self.target_rate) ** 2
        preds = self.model.predict(logits.detach()).float().cpu().numpy()
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


class LayerSkipEnv(_ModelAccess, gym.Env):
    """
    ## Description
    DPBERT's planning problem (Dynamic Planning in BERT): a transformer of ``L`` layers reads one GLUE
    input; before each layer an agent sees the ``[CLS]`` vector and decides whether the layer runs.
    Executed layers cost ``c`` each; at the end the task loss of the resulting prediction is charged,
    weighted by ``lambda_``. A skipped layer is not computed. One episode is one input and lasts
    exactly ``L`` steps; the undiscounted return-to-go from step ``i`` is ``R_i`` of eq. (9).

    ## Action Space
    ``Discrete(2)``: 0 = skip layer ``i``, 1 = execute it.

    ## Observation Space
    ``Box(d + L,)`` float32 (or, with ``observation="dict"``, ``Dict(cls=Box(d,), layer=Box(L,))``):

    | index        | observation                                   | min  | max |
    |--------------|-----------------------------------------------|------|-----|
    | 0 .. d-1     | ``h_{i-1}^cls``, the [CLS] state before layer i | -B   | B   |
    | d .. d+L-1   | one-hot index of the layer to decide           | 0    | 1   |

    After the last step the one-hot part is all zeros. ``B`` is a bound that LayerNorm guarantees:
    ``2 (sqrt(d) max|gamma| + max|beta|)`` over the backbone's LayerNorms.

    ## Rewards
    ``-c * a_i`` at every step, and at the last step additionally ``-lambda_ * loss`` (cross-entropy;
    squared error for STS-B). With ``target_rate`` and ``rate_coef`` set, the last step also gets
    ``-rate_coef * (skipped fraction - target_rate)^2``, a per-episode form of eq. (11) (off by default).

    ## Starting State
    An input drawn uniformly from the split with ``self.np_random``; ``reset(options={"index": k})``
    picks input ``k``. The first observation is the embedding output's [CLS] row.

    ## Episode End
    Termination after exactly ``L`` steps. There is no truncation.

    ## Arguments
    - ``task``: GLUE task name (``"sst2"``, ``"rte"``, ...).
    - ``data_dir``: local GLUE directory (default ``$GLUE_DIR``, else the hub); ``split``: ``train``/``dev``.
    - ``model``: a trained dpbert_rl checkpoint directory (recommended), a backbone name/dir, or a ``DPBert``.
    - ``c``, ``lambda_``: the reward's layer cost and loss weight (eq. 9).
    - ``max_seq_length``, ``max_samples``: tokenisation length and an optional cap on the split.
    - ``observation``: ``"box"`` or ``"dict"``.
    - ``backbone_mode``: ``"frozen"`` (eval mode, deterministic) or ``"joint"``: the env also trains
      backbone and head on the task loss of the paths its agent chose (AdamW, ``joint_lr``, one update
      per ``joint_update_every`` episodes), as in the paper's stage 3. Dropout stays off in both.
    - ``target_rate``, ``rate_coef``: optional skip-rate shaping (see Rewards).

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
                 rate_coef: float = 0.0, device: str = "cpu", render_mode: Optional[str] = None):
        self.core = _Episodes(task, data_dir, split, model, c, lambda_, max_seq_length, max_samples, observation,
                              backbone_mode, joint_lr, joint_update_every, target_rate, rate_coef, device)
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
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1; got {num_envs}")
        kwargs.pop("render_mode", None)
        self.core = _Episodes(**_core_kwargs(kwargs))
        self.num_envs = num_envs
        self.single_observation_space = self.core.single_observation_space()
        self.single_action_space = spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._np_random = None

    def _draw(self) -> np.ndarray:
        return self.np_random.integers(len(self.core.data), size=self.num_envs)

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
        if indices.shape != (self.num_envs,) or (indices < 0).any() or (indices >= len(self.core.data)).any():
            raise ValueError(f"options['indices'] must be {self.num_envs} indices in [0, {len(self.core.data)})")
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
                     "final_info": _stack_infos(finals), "_final_info": np.ones(self.num_envs, dtype=bool)}
            obs = self.core.start(self._draw())
        return obs, rewards.astype(np.float64), terminated, truncated, infos


def _core_kwargs(kwargs: dict) -> dict:
    """The vector env's keyword arguments, checked against (and defaulted from) LayerSkipEnv's."""
    import inspect

    params = inspect.signature(LayerSkipEnv.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k not in ("self", "render_mode")}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; expected some of {sorted(defaults)}")
    return {**defaults, **kwargs}


def _check_env_numbers(**values) -> None:
    """The reward's weights and the env's counts, each against what it may be (c, lambda_ >= 0, ...)."""
    from dpbert_rl.checks import check_number

    rules = {"c": dict(low=0.0), "lambda_": dict(low=0.0), "rate_coef": dict(low=0.0),
             "joint_lr": dict(low=0.0, low_open=True), "joint_update_every": dict(low=1, integer=True),
             "max_seq_length": dict(low=8, integer=True), "max_samples": dict(low=1, integer=True, optional=True)}
    for name, value in values.items():
        check_number(value, name, **rules[name])


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
