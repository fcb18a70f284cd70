"""``DPBert``: the path executor. The only loop over layers, and the only reader of decisions.

One loop serves every mode:

========  =====================================================================================
mode      what decides layer ``i``
========  =====================================================================================
full      always execute (the plain backbone; planners are not evaluated)
hard      ``a_i = 1[p_i >= threshold]`` -- eq. (5), inference (threshold 0.5 in the paper)
sample    ``a_i ~ Bernoulli(p_i)`` -- training with REINFORCE (stage 3)
soft      no decision: ``h_i = p_i T_i(h_{i-1}) + (1 - p_i) h_{i-1}`` (stage 2, DPBERT-soft)
path      the given ``actions`` (``(L,)`` or ``(batch, L)``), e.g. from an RL agent
========  =====================================================================================

A skipped layer is never computed: layer ``i`` runs only on the rows whose action is 1 (gather
those rows, run the layer, scatter them back). The Gymnasium environment drives the same
per-layer calls (:meth:`DPBert.embed`, :meth:`DPBert.plan`, :meth:`DPBert.execute`,
:meth:`DPBert.classify`) one step at a time instead of re-implementing the forward pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DEFAULT_BACKBONE, Backbone, Embedded, eval_mode, resolve_backbone_path
from ..checks import (CheckpointError, check_checkpoint_files, check_finite_logits, check_layer_weights, check_number,
                     check_state_shapes, check_threshold, max_positions, nonfinite, read_json, read_safetensors)
from .objectives import apply_path_calibration, path_ids
from .planner import (FEATURES, Planners, bernoulli_entropy, bernoulli_log_prob, check_budget_range, feature_dim,
                      raw_features)

MODES = ("full", "hard", "sample", "soft", "path")
PLANNERS_FILE = "planners.safetensors"
META_FILE = "dpbert.json"


@dataclass
class DPBertOutput:
    """What one pass over a batch produced.

    :param logits: ``(batch, num_labels)``; ``num_labels`` is 1 for regression.
    :param loss: scalar mean task loss, when labels were given.
    :param per_example_loss: ``(batch,)`` task loss ``ell(f(h_L), y)`` per example.
    :param actions: ``(batch, L)`` float, 1 = layer executed, 0 = skipped. In soft mode, the
        hardened decisions ``1[p >= 0.5]`` (what inference would do), though every layer ran.
    :param probs: ``(batch, L)``, ``p_i`` of eq. (4); ones in full mode.
    :param log_probs: ``(batch, L)``, ``log pi(a_i | h_{i-1})`` of eq. (7); zeros in full mode.
    :param entropy: ``(batch, L)``, entropy of each planner's Bernoulli policy.
    :param layers_executed: ``(batch,)`` long, number of layers that ran for each example.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    per_example_loss: Optional[torch.Tensor]
    actions: torch.Tensor
    probs: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    layers_executed: torch.Tensor


@dataclass
class TaskInfo:
    """What a checkpoint needs to know about its task to predict on raw text."""

    task: Optional[str] = None
    label_names: Optional[list] = None  # None for regression
    max_seq_length: int = 128
    extra: dict = field(default_factory=dict)


class DPBert(nn.Module):
    """A backbone with a planner before every layer.

    :param backbone: the encoder (:class:`~dpbert_rl.model.backbone.Backbone`).
    :param planners: the ``L`` planners; created fresh when None.
    :param threshold: execute layer ``i`` in hard mode when ``p_i >= threshold`` (eq. 5 uses
        0.5). Raising it skips more; :mod:`dpbert_rl.evaluation.latency` sweeps it for trade-off curves.
    :param planner_init_bias: initial planner bias when ``planners`` is None.
    :param planner_features: what fresh planners read (``cls``, ``mean`` or ``cls+mean``; see
        :mod:`dpbert_rl.model.planner`) when ``planners`` is None.
    :param detach_planner_input: stop gradients from the planners into the states they read, so
        that the policy gradient of stage 3 trains the planners only, not the backbone below them.
    """

    def __init__(
        self,
        backbone: Backbone,
        planners: Optional[Planners] = None,
        threshold: float = 0.5,
        planner_init_bias: float = 2.0,
        tokenizer=None,
        task_info: Optional[TaskInfo] = None,
        planner_features: str = "cls",
        detach_planner_input: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.planners = planners or Planners(backbone.num_layers, backbone.hidden_size, planner_init_bias,
                                             features=planner_features)
        self.detach_planner_input = detach_planner_input
        if self.planners.num_layers != backbone.num_layers:
            raise ValueError(
                f"{self.planners.num_layers} planners for a backbone of {backbone.num_layers} layers"
            )
        self.threshold = threshold
        self.tokenizer = tokenizer
        self.task_info = task_info or TaskInfo()
        # the inputs' budget curve set by `dpbert-rl calibrate --inputs` (budget -> knob), see dpbert_rl.model.budget
        self.budget_table: Optional[dict] = None
        # regression: the per-path (scale, shift) of the exact stage, (2^L, 2), applied to the head's output in
        # every mode but soft (see dpbert_rl.model.objectives.fit_path_calibration); None: the head as it is
        self.register_buffer("path_calibration", None, persistent=False)  # saved in dpbert.json, moved by .to()
        # inference without gradients takes the lean path (Planners.decider; Python decisions at batch size 1);
        # False: the reference loop, as training runs it (benchmarks/planner_cost.py times both)
        self.lean_inference = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls, name_or_path: str = DEFAULT_BACKBONE, num_labels: int = 2, **kwargs
    ) -> "DPBert":
        """A fresh DPBert on a pretrained backbone (hub name, local dir, or ``"minilm"``). A local directory whose
        weights lack layers that its ``config.json`` sets (``num_hidden_layers`` raised) is refused."""
        backbone, tokenizer = Backbone.from_pretrained(name_or_path, num_labels=num_labels)
        local = Path(resolve_backbone_path(name_or_path))
        if local.is_dir():
            check_layer_weights(backbone.model, backbone._layers, local)
        return cls(backbone, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_source(cls, source, num_labels: int, **kwargs) -> "DPBert":
        """A trained dpbert_rl checkpoint (a directory with ``dpbert.json``) is loaded as it is; anything
        else (``"minilm"``, a hub name, a plain HF directory) gets fresh planners. Either way the label
        count must be ``num_labels``."""
        if Path(source, META_FILE).is_file():
            model = cls.load(source)
            if model.backbone.num_labels != num_labels:
                raise ValueError(f"checkpoint {source} has {model.backbone.num_labels} labels; {num_labels} needed")
            return model
        return cls.from_backbone(source, num_labels=num_labels, **kwargs)

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @property
    def is_regression(self) -> bool:
        return self.backbone.num_labels == 1

    # ------------------------------------------------------------------ per-layer calls
    def embed(self, input_ids, attention_mask, token_type_ids=None) -> Embedded:
        """Eq. (1): ``h_0`` ``(batch, seq, hidden)`` and the additive mask ``(batch, 1, 1, seq)``."""
        return self.backbone.embed(input_ids, attention_mask, token_type_ids)

    @property
    def planner_features(self) -> str:
        return self.planners.features

    def observe(self, i: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What planner ``i`` reads of ``h_{i-1}`` ``(batch, seq, d)``: standardised features ``(batch, F)``."""
        if self.detach_planner_input:
            hidden = hidden.detach()
        return self.planners.observe(i, hidden, mask)

    def plan(self, i: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. (4): planner ``i``'s logit from the features of ``h_{i-1}``; ``(batch,)``."""
        return self.planners(i, self.observe(i, hidden, mask))

    def fit_feature_stats(self, dataset, collate_fn, batch_size: int = 64) -> dict:
        """Set the planners' standardisation statistics from ``dataset`` (training inputs); see
        :func:`feature_stats`. Returns the statistics' summary (``examples``, ``features``, ``spread``)."""
        stats = feature_stats(self, dataset, collate_fn, self.planner_features, batch_size)
        self.planners.set_feature_stats(stats.pop("mean"), stats.pop("std"))
        return stats

    def execute(
        self, i: int, hidden: torch.Tensor, mask: torch.Tensor, execute=None,
        position_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Eq. (6): run layer ``i`` on the rows where ``execute`` (bool ``(batch,)``) is true.

        The other rows are returned unchanged and are never computed. ``execute=None`` runs all; a Python
        bool decides for the whole batch (one input: no row bookkeeping, no host sync).
        ``position_bias`` (MPNet, :attr:`Embedded.position_bias`) is gathered with the rows, like ``mask``.
        """
        if isinstance(execute, bool):
            return self.backbone.layer(i, hidden, mask, position_bias) if execute else hidden
        if execute is None:
            return self.backbone.layer(i, hidden, mask, position_bias)
        n = int(execute.sum())
        if n == hidden.shape[0]:
            return self.backbone.layer(i, hidden, mask, position_bias)
        if n == 0:
            return hidden
        rows = execute.nonzero(as_tuple=True)[0]
        bias = position_bias.index_select(0, rows) if position_bias is not None else None
        out = self.backbone.layer(i, hidden.index_select(0, rows), mask.index_select(0, rows), bias)
        return hidden.index_copy(0, rows, out)  # out of place: autograd keeps both paths

    def execute_shared(self, i: int, hidden: torch.Tensor, mask: torch.Tensor, execute: torch.Tensor,
                       groups: torch.Tensor, position_bias: Optional[torch.Tensor] = None) -> tuple:
        """Eq. (6) where rows repeat an input (stage 3's K paths per input): rows with equal ``groups`` ids
        hold equal states, so layer ``i`` runs once per distinct (state, execute) pair, not once per row,
        and an input's sampled paths share the layer calls of their common prefix. Exact when the layer is
        deterministic (no dropout: the backbone in eval mode); gradients flow through the shared call.

        :param groups: ``(batch,)`` long, equal for rows whose states are equal.
        :return: ``(hidden, groups)``: the new states and their ids (equal again for equal states).
        """
        if self.backbone.training:
            raise ValueError("shared prefixes need a deterministic backbone: call model.backbone.eval() first "
                             "(dropout makes an input's repeated rows differ)")
        key = groups.long() * 2 + execute.long()
        uniq, new_groups = torch.unique(key, return_inverse=True)
        run = (uniq % 2).bool()  # distinct states that execute layer i
        n = int(run.sum())
        if n == 0:
            return hidden, new_groups
        B = hidden.shape[0]
        first = torch.full((len(uniq),), B, dtype=torch.long, device=hidden.device).scatter_reduce(
            0, new_groups, torch.arange(B, device=hidden.device), reduce="amin")  # a row holding each state
        reps = first[run]
        bias = position_bias.index_select(0, reps) if position_bias is not None else None
        out = self.backbone.layer(i, hidden.index_select(0, reps), mask.index_select(0, reps), bias)
        slot = torch.cumsum(run.long(), 0) - 1  # distinct state -> its row of `out`
        rows = execute.nonzero(as_tuple=True)[0]
        return hidden.index_copy(0, rows, out.index_select(0, slot[new_groups[rows]])), new_groups

    def soft_execute(self, i: int, hidden: torch.Tensor, mask: torch.Tensor, prob: torch.Tensor,
                     position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Relaxed gate of stage 2 / DPBERT-soft: ``p T_i(h) + (1 - p) h``."""
        p = prob[:, None, None].to(hidden.dtype)
        return p * self.backbone.layer(i, hidden, mask, position_bias) + (1.0 - p) * hidden

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """``f(h_L)``: logits ``(batch, num_labels)``."""
        return self.backbone.head(hidden)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``ell(f(h_L), y)`` per example, ``(batch,)``: cross-entropy, or MSE for regression."""
        if self.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="none")
        return F.cross_entropy(logits, labels.long(), reduction="none")

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids ``(batch,)``, or the regression value for STS-B."""
        return logits.squeeze(-1) if self.is_regression else logits.argmax(-1)

    def set_path_calibration(self, calibration: Optional[torch.Tensor], source: str = "path_calibration") -> None:
        """Set (or clear, with None) the per-path recalibration: ``(2^L, 2)`` finite ``(scale, shift)`` rows,
        for a regression head only."""
        if calibration is None:
            self.path_calibration = None
            return
        cal = torch.as_tensor(calibration, dtype=torch.float32, device=next(self.backbone.parameters()).device)
        if not self.is_regression:
            raise ValueError(f"{source}: a per-path recalibration is for regression heads; this one has "
                             f"{self.backbone.num_labels} labels")
        if cal.shape != (2 ** self.num_layers, 2):
            raise ValueError(f"{source}: expected (2^{self.num_layers}, 2) = ({2 ** self.num_layers}, 2) rows of "
                             f"(scale, shift); got {tuple(cal.shape)}")
        if not torch.isfinite(cal).all():
            raise ValueError(f"{source}: non-finite values")
        self.path_calibration = cal

    # ------------------------------------------------------------------ the loop
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        mode: str = "hard",
        actions: Optional[torch.Tensor] = None,
        threshold: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        planners: bool = True,
        shared: Optional[torch.Tensor] = None,
        sample_at_threshold: bool = False,
    ) -> DPBertOutput:
        """Run one batch along the paths chosen by ``mode`` (see the module docstring).

        :param input_ids: ``(batch, seq)``.
        :param attention_mask: ``(batch, seq)``, 1 on real tokens.
        :param labels: ``(batch,)`` class ids or float targets; gives ``loss``.
        :param actions: ``(L,)`` or ``(batch, L)`` of 0/1 for ``mode="path"``.
        :param threshold: overrides ``self.threshold`` in hard mode.
        :param generator: random source for ``mode="sample"``.
        :param planners: ``mode="path"`` only: False runs the given path without the planners (a fixed
            path needs no decisions; what its timing should cost); ``probs``, ``log_probs`` and
            ``entropy`` are then NaN.
        :param shared: ``(batch,)`` ids, equal for rows that repeat one input (``sample``, ``hard`` and ``path``
            modes): their common path prefixes are computed once (:meth:`execute_shared`; the backbone must
            be in eval mode).
        :param sample_at_threshold: ``mode="sample"`` draws layer ``i`` with probability
            ``sigmoid(logit_i - logit(threshold))`` instead of ``p_i``: draws centred on the hard-mode path at that
            threshold (stage ``adapt`` trains the backbone on paths at a calibrated rate). ``log_probs`` stay those
            of ``p_i``: not for a policy gradient.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        L = self.num_layers
        state = self.embed(input_ids, attention_mask, token_type_ids)
        h, mask = state.hidden, state.mask  # (B, T, d), (B, 1, 1, T)
        bias = state.position_bias  # (B, heads, T, T) for MPNet, else None
        B = h.shape[0]
        if mode == "path":
            if actions is None:
                raise ValueError("mode='path' needs `actions` of shape (L,) or (batch, L)")
            actions = torch.as_tensor(actions, device=h.device)
            if actions.dim() == 1:
                actions = actions.expand(B, -1)
            if actions.shape != (B, L):
                raise ValueError(f"actions must have shape ({L},) or ({B}, {L}); got {tuple(actions.shape)}")
        thr = check_threshold(self.threshold if threshold is None else threshold)  # NaN would skip every layer
        if not planners and mode != "path":
            raise ValueError(f"planners=False is for mode='path' only (mode {mode!r} reads the planners)")
        if shared is not None:
            if mode not in ("sample", "hard", "path"):
                raise ValueError(f"shared is for modes 'sample', 'hard' and 'path' (mode {mode!r})")
            if tuple(shared.shape) != (B,):
                raise ValueError(f"shared must have shape ({B},); got {tuple(shared.shape)}")
            groups = torch.unique(shared, return_inverse=True)[1].to(h.device)

        acts, logits_per_layer = [], []
        logit_thr = math.log(thr / (1.0 - thr)) if 0.0 < thr < 1.0 else (-math.inf if thr <= 0 else math.inf)
        # inference: the planners' per-batch work once, not per layer (Planners.decider); one input: each
        # decision a Python bool, and a skipped layer costs nothing but the planner (no row bookkeeping)
        lean = self.lean_inference and not torch.is_grad_enabled()
        decide = self.planners.decider(mask, h.dtype) if mode == "hard" and lean else None
        single = lean and B == 1 and mode in ("hard", "path") and shared is None
        if single:
            thr_item = torch.tensor(logit_thr, dtype=h.dtype).item()  # the threshold as the tensor comparison sees it
            given = actions[0].tolist() if mode == "path" else None
        for i in range(L):
            if mode == "full":
                a = torch.ones(B, dtype=torch.bool, device=h.device)
                h = self.execute(i, h, mask, None, bias)
            else:
                logit = None  # a given path needs no decision
                if planners:
                    logit = decide(i, h) if decide is not None else self.plan(i, h, mask)  # (B,)
                if mode == "soft":
                    p = torch.sigmoid(logit)
                    a = p >= 0.5
                    h = self.soft_execute(i, h, mask, p, bias)
                else:
                    if mode == "hard":  # p_i >= thr, eq. (5); one input: a Python bool
                        a = logit.item() >= thr_item if single else logit >= logit_thr
                    elif mode == "sample":
                        check_finite_logits(logit, i)  # a NaN here is an exploded planner, not a probability
                        drawn = logit.detach() - logit_thr if sample_at_threshold else logit.detach()
                        a = torch.bernoulli(torch.sigmoid(drawn), generator=generator).bool()
                    else:  # path
                        a = bool(given[i]) if single else actions[:, i].bool()
                    if shared is not None:
                        h, groups = self.execute_shared(i, h, mask, a, groups, bias)
                    else:
                        h = self.execute(i, h, mask, a, bias)
                if planners:
                    logits_per_layer.append(logit)
            acts.append(a)

        logits = self.classify(h)
        if single:
            act = torch.tensor([acts], dtype=h.dtype, device=h.device)  # (1, L)
        else:
            act = torch.stack(acts, 1).to(h.dtype)  # (B, L)
        if self.path_calibration is not None and mode != "soft":  # set for regression heads only
            logits = apply_path_calibration(logits.squeeze(-1), path_ids(act), self.path_calibration).unsqueeze(-1)
        if mode == "full":
            probs_t = torch.ones_like(act)
            logp_t = torch.zeros_like(act)
            ent_t = torch.zeros_like(act)
        elif not planners:
            probs_t = logp_t = ent_t = torch.full_like(act, float("nan"))
        else:  # computed once for all layers, off the per-layer path
            planner_logits = torch.stack(logits_per_layer, 1)  # (B, L)
            probs_t = torch.sigmoid(planner_logits)
            logp_t = bernoulli_log_prob(planner_logits, act)
            ent_t = bernoulli_entropy(planner_logits)
        per_ex = loss = None
        if labels is not None:
            per_ex = self.task_loss(logits, labels)
            loss = per_ex.mean()
        return DPBertOutput(
            logits=logits,
            loss=loss,
            per_example_loss=per_ex,
            actions=act,
            probs=probs_t,
            log_probs=logp_t,
            entropy=ent_t,
            layers_executed=act.sum(1).long(),
        )

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Write a checkpoint directory.

        It is a standard Hugging Face checkpoint of the backbone (``config.json``,
        ``model.safetensors``, tokenizer files), loadable by ``AutoModelForSequenceClassification``,
        plus ``planners.safetensors`` and ``dpbert.json`` (threshold and task).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.set_label_names(self.task_info.label_names)  # config.json's id2label, for HF pipelines
        self.backbone.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.planners.state_dict().items()}, path / PLANNERS_FILE)
        meta = {"threshold": self.threshold, "num_layers": self.num_layers, "task_info": asdict(self.task_info),
                "planner_features": self.planner_features, "detach_planner_input": self.detach_planner_input}
        if self.planners.conditioned:
            meta["budget_range"] = list(self.planners.budget)
        if self.budget_table is not None:
            meta["budget_table"] = self.budget_table
        if self.path_calibration is not None:
            meta["path_calibration"] = {"scale": self.path_calibration[:, 0].tolist(),
                                        "shift": self.path_calibration[:, 1].tolist()}
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        from .auto_files import write_auto_files

        write_auto_files(path)  # transformers' Auto classes and pipeline() load it with skipping (trust_remote_code)
        return path

    @classmethod
    def load(cls, path: str | Path, require_planners: bool = False) -> "DPBert":
        """Load a checkpoint written by :meth:`save` (or any HF sequence-classification dir,
        which then gets fresh planners unless ``require_planners``)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no checkpoint at {str(path)!r}: expected a directory with config.json "
                "(written by `dpbert-rl finetune`/`pipeline`, or any HF checkpoint)"
            )
        check_checkpoint_files(path)  # a damaged JSON or safetensors file is one error that names it
        meta = read_json(path / META_FILE) if (path / META_FILE).is_file() else {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path / META_FILE}: expected a JSON object, found {type(meta).__name__}")
        features = meta.get("planner_features", "cls")
        if features not in FEATURES:
            raise CheckpointError(f"{path / META_FILE}: planner_features {features!r} is not one of "
                                  f"{', '.join(FEATURES)}")
        state = read_safetensors(path / PLANNERS_FILE) if (path / PLANNERS_FILE).is_file() else None
        if state is not None:
            _check_planner_layers(path, state, meta)
        backbone, tokenizer = Backbone.from_pretrained(str(path), num_labels=_num_labels(path))
        check_layer_weights(backbone.model, backbone._layers, path)
        planners = None
        if state is not None:
            budget = meta.get("budget_range")
            if budget is not None:
                try:
                    budget = check_budget_range(budget)
                except ValueError as err:
                    raise CheckpointError(f"{path / META_FILE}: budget_range: {err}") from None
            planners = Planners(backbone.num_layers, backbone.hidden_size, features=features, budget=budget)
            # checkpoints written before standardisation existed have no statistics: identity
            expected = {k: v for k, v in planners.state_dict().items()
                        if k in state or k not in ("feature_mean", "feature_std", "stats_set")}
            check_state_shapes(expected, state, path / PLANNERS_FILE)
            planners.load_state_dict(state, strict=False)
            bad = nonfinite(planners.named_parameters()) + nonfinite(planners.named_buffers())
            if bad:  # predict would answer with `planner p: [nan ...]`
                raise CheckpointError(f"{path / PLANNERS_FILE}: non-finite values in {', '.join(bad[:4])}: these "
                                      "planners were not trained to completion; train them again")
        elif require_planners:
            raise FileNotFoundError(f"{str(path)!r} holds no {PLANNERS_FILE}: it is not a trained DPBERT")
        try:
            info = TaskInfo(**meta.get("task_info", {}))
        except TypeError as err:
            raise CheckpointError(f"{path / META_FILE}: task_info does not fit ({err})") from None
        threshold = check_threshold(meta.get("threshold", 0.5), f"{path / META_FILE}: threshold")
        model = cls(backbone, planners, threshold=threshold, tokenizer=tokenizer, task_info=info,
                    planner_features=features, detach_planner_input=meta.get("detach_planner_input", False))
        if "max_seq_length" in (meta.get("task_info") or {}):
            _check_saved_length(path, model)
        model.budget_table = meta.get("budget_table")
        cal = meta.get("path_calibration")
        if cal is not None:
            source = f"{path / META_FILE}: path_calibration"
            try:
                table = torch.tensor([cal["scale"], cal["shift"]], dtype=torch.float32).T
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{source}: expected {{'scale': [...], 'shift': [...]}} of {2 ** model.num_layers} "
                                      f"numbers each ({type(err).__name__}: {err})") from None
            try:
                model.set_path_calibration(table, source)
            except ValueError as err:
                raise CheckpointError(str(err)) from None
        return model


@torch.no_grad()
def feature_stats(model: "DPBert", dataset, collate_fn, features: str, batch_size: int = 64) -> dict:
    """Mean and standard deviation ``(L, F)`` of the raw planner features before every layer, along the
    full path, over ``dataset``; and per layer the ``spread``: the sum of the variances across inputs
    divided by ``|mean|^2``. A spread near 0 means the planners see (almost) the same input whatever
    the text: a ``[CLS]`` row of a mean-pooling backbone such as all-MiniLM-L6-v2 has ~1e-5."""
    from torch.utils.data import DataLoader

    with eval_mode(model):
        L, F_ = model.num_layers, feature_dim(features, model.backbone.hidden_size)
        n, s1, s2 = 0, torch.zeros(L, F_, dtype=torch.float64), torch.zeros(L, F_, dtype=torch.float64)
        device = next(model.parameters()).device
        for b in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
            b = {k: v.to(device) for k, v in b.items()}
            state = model.embed(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            h = state.hidden
            for i in range(L):
                x = raw_features(h, state.mask, features).double().cpu()  # (B, F)
                s1[i] += x.sum(0)
                s2[i] += (x * x).sum(0)
                h = model.execute(i, h, state.mask)
            n += h.shape[0]
    if n < 2:
        raise ValueError("feature statistics need at least 2 inputs")
    mean = s1 / n
    var = (s2 / n - mean ** 2).clamp_min(0.0) * n / (n - 1)
    spread = (var.sum(1) / (mean ** 2).sum(1).clamp_min(1e-30)).tolist()
    return {"mean": mean.float(), "std": var.sqrt().float(), "examples": n, "features": features, "spread": spread}


def _check_planner_layers(path: Path, state: dict, meta: dict) -> None:
    """The planners were trained for the layer count ``config.json`` sets; an edited ``num_hidden_layers`` is
    named as such (not as planners of the wrong shape). When ``dpbert.json``'s ``num_layers`` agrees with
    ``config.json``, the planners file is the odd one and is named by :func:`check_state_shapes` instead."""
    config = read_json(path / "config.json")
    layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
    weight = state.get("weight")
    if layers is None or weight is None or weight.dim() != 2 or int(weight.shape[0]) == int(layers):
        return
    saved = meta.get("num_layers")
    if isinstance(saved, int) and saved == int(layers):
        return  # config.json and dpbert.json agree: the planners file is the odd one (check_state_shapes names it)
    note = f" and {META_FILE} says num_layers {saved}" if saved is not None else ""
    raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers {layers}, but {path / PLANNERS_FILE} holds "
                          f"planners for {int(weight.shape[0])} layers{note}: config.json was edited or the files "
                          f"come from different checkpoints; restore num_hidden_layers {int(weight.shape[0])}")


def _check_saved_length(path: Path, model: "DPBert") -> None:
    """``task_info.max_seq_length`` of ``dpbert.json`` is a whole number within the backbone's positions (a
    longer one would crash inside the embeddings on the first long input)."""
    value = check_number(model.task_info.max_seq_length, f"{path / META_FILE}: max_seq_length (task_info)",
                         low=1, integer=True)
    limit = max_positions(model)
    if limit is not None and value > limit:
        raise CheckpointError(f"{path / META_FILE}: max_seq_length {value} (task_info) exceeds the {limit} positions "
                              f"of the backbone ({path / 'config.json'}: max_position_embeddings); set it to "
                              f"{limit} or less")


def _num_labels(path: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(path)).num_labels)
