"""Early-exit baselines on the same backbone and the same per-layer calls as DPBERT.

An early-exit model stops *after* some layer ``k`` and predicts from there; it never skips a layer
and then goes on. DPBERT's claim is that free skipping beats this at equal speed-up; these are the
baselines of the paper's Table 1, built so that claim can be tested on one backbone:

===========  ==========================================================================================
method       what it is here
===========  ==========================================================================================
DeeBERT      an off-ramp (its own pooler, initialised from the backbone's, + classifier on
             ``h_i^cls``) after every layer, trained in a second stage with the fine-tuned backbone
             frozen on the sum of the off-ramps' losses (:func:`train_offramps_frozen`); exit when the
             off-ramp's prediction entropy is below a threshold (``rule="entropy"``; classification only)
PABEE        one pooler shared by every exit (the backbone's own) and a linear classifier per layer,
             trained jointly with the backbone, the loss of layer ``i`` weighted by ``i``
             (``shared_pooler=True``, :func:`train_exits_joint`); exit once ``t`` consecutive layers
             agree (``rule="patience"``; regression: agree within ``tolerance``); ``t = 0`` runs every layer
BERxiT       DeeBERT's off-ramps and a learning-to-exit (LTE) head, one linear layer shared by the
             layers that reads the pooled output of the exit at that layer; alternating fine-tuning
             (:func:`train_berxit`): even steps the last layer's loss, odd steps the sum of the
             off-ramps' losses, every step plus the LTE loss; exit when the LTE score passes a
             threshold (``rule="learned"``). The LTE target is ``1[exit i correct]``, or
             ``1 - tanh(|y_i - y|)`` for regression (STS-B)
LayerDrop    structured layer dropout while fine-tuning (``train_stage("layerdrop")``), then one fixed
             subset of layers at inference (:func:`layerdrop_subset`, run by ``DPBert(mode="path")``)
BERT-kL      the first ``k`` layers only: :func:`truncate` makes a real ``k``-layer checkpoint that
             ``train_stage("finetune")`` fine-tunes
===========  ==========================================================================================

Every exit rule runs batched with per-example exits: after each layer the rows that exit are
written out and *dropped* from the batch, so later layers run only on the rows still going; the
predictions equal those at batch size 1 (tested). The layers are run through
:meth:`DPBert.execute`, the same call DPBERT and the Gymnasium environment use.

The last layer's exit is the backbone's own head, so an early-exit model that never exits early
is exactly the fine-tuned backbone.

Thresholds are set on held-out data without running the model again: :func:`exit_statistics`
records every exit's logits and LTE score once, :func:`exits_from_statistics` replays any rule on
them (equal to the batched forward, tested), and :func:`calibrate_exit` finds by bisection the
threshold whose mean exit layer is a given number of layers. The trainers choose their checkpoint
with ``select_fn`` (a score on held-out data, higher is better), evaluated a few times per epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.dpbert import DPBert

RULES = ("entropy", "patience", "learned", "fixed")
RAMPS_FILE = "early_exit.safetensors"
EXIT_META_FILE = "early_exit.json"


class OffRamp(nn.Module):
    """An exit after one layer: a pooler (linear + tanh on ``h_i^cls``, DeeBERT's and BERxiT's
    "highway"), dropout and a linear classifier. Without its own pooler (PABEE) it is dropout and
    the classifier, reading a pooler shared by every exit."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, own_pooler: bool = True):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size) if own_pooler else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def pool(self, cls: torch.Tensor) -> torch.Tensor:
        """``(batch, d)`` [CLS] vectors to the pooled features the classifier (and BERxiT's LTE head) read."""
        if self.pooler is None:
            raise RuntimeError("this off-ramp reads a shared pooler: pool with EarlyExitBert.pooled")
        return torch.tanh(self.pooler(cls))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(cls))


@dataclass
class ExitOutput:
    """What one early-exit pass over a batch produced.

    :param logits: ``(batch, num_labels)`` from the layer each example exited at.
    :param exit_layer: ``(batch,)`` long, the 1-based layer each example exited after (= layers run).
    :param actions: ``(batch, L)`` float, 1 for the layers that ran (a prefix), for the statistics
        DPBERT reports (layers executed, per-layer frequency).
    """

    logits: torch.Tensor
    exit_layer: torch.Tensor
    actions: torch.Tensor

    @property
    def layers_executed(self) -> torch.Tensor:
        return self.exit_layer


@dataclass
class ExitTrace:
    """Every exit of a pass that ran every layer (training, statistics).

    :param logits: ``(batch, L, num_labels)``, exit ``i`` after layer ``i + 1``.
    :param cls: ``(batch, L, d)``, ``h_i^cls`` after every layer.
    :param pooled: ``(batch, L, d)``, what exit ``i``'s classifier and the LTE head read.
    :param exits: the ``L`` tensors ``(batch, num_labels)`` stacked in ``logits``: a loss on some exits
        must read these, so that the others get no gradient at all (not a zero one, which weight
        decay would still act on).
    """

    logits: torch.Tensor
    cls: torch.Tensor
    pooled: torch.Tensor
    exits: Optional[list] = None


class EarlyExitBert(nn.Module):
    """A fine-tuned :class:`DPBert` backbone with an off-ramp after every layer but the last, and a
    learning-to-exit head. The last exit is the backbone's own head.

    :param model: the backbone (its planners are not used).
    :param dropout: dropout inside the off-ramps (and on the LTE head's input) while training.
    :param shared_pooler: PABEE's exits: every exit reads the backbone's own pooler, each with its
        own linear classifier. Otherwise (DeeBERT, BERxiT) each off-ramp has its own pooler,
        initialised from the backbone's, as their code initialises it from BERT's.
    """

    def __init__(self, model: DPBert, dropout: float = 0.1, shared_pooler: bool = False):
        super().__init__()
        self.model = model
        self.shared_pooler = bool(shared_pooler)
        L, d, C = model.num_layers, model.backbone.hidden_size, model.backbone.num_labels
        self.ramps = nn.ModuleList(OffRamp(d, C, dropout, own_pooler=not shared_pooler) for _ in range(L - 1))
        self.exit_head = nn.Linear(d, 1)
        self.lte_dropout = nn.Dropout(dropout)
        source = model.backbone.pooler
        if not shared_pooler and isinstance(source, nn.Module) and hasattr(source, "dense"):
            with torch.no_grad():
                for r in self.ramps:
                    r.pooler.weight.copy_(source.dense.weight)
                    r.pooler.bias.copy_(source.dense.bias)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def is_regression(self) -> bool:
        return self.model.is_regression

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return self.model.predict(logits)

    def pooled(self, i: int, cls: torch.Tensor) -> torch.Tensor:
        """The features exit ``i`` (0-based) reads from ``h_{i+1}^cls`` ``(batch, d)``: its own pooler,
        or the backbone's (PABEE, and the last exit: the backbone's head reads it)."""
        if i < self.num_layers - 1 and not self.shared_pooler:
            return self.ramps[i].pool(cls)
        return self.model.backbone.pool(cls)

    def exit_logits(self, i: int, cls: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of exit ``i`` (0-based) from ``h_{i+1}^cls`` ``(batch, d)``: off-ramp ``i``, or the
        backbone's head after the last layer (the BERT, RoBERTa and ELECTRA heads read only [CLS])."""
        if i < self.num_layers - 1:
            return self.ramps[i].classify(self.pooled(i, cls) if pooled is None else pooled)
        return self.model.classify(cls[:, None, :])

    def exit_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """BERxiT's learning-to-exit score ``u_i`` in [0, 1] (how likely exit ``i`` is right) from the
        pooled features exit ``i`` reads (:meth:`pooled`); ``(batch,)``, or ``(batch, L)`` from ``(batch, L, d)``."""
        return torch.sigmoid(self.exit_head(self.lte_dropout(pooled)).squeeze(-1))

    # ------------------------------------------------------------------ training pass
    def layer_cls(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Run every layer; the [CLS] vector after every layer, ``(batch, L, d)``."""
        state = self.model.embed(input_ids, attention_mask, token_type_ids)
        h, cls = state.hidden, []
        for i in range(self.num_layers):
            h = self.model.execute(i, h, state.mask)
            cls.append(h[:, 0])
        return torch.stack(cls, 1)

    def trace_from_cls(self, cls: torch.Tensor) -> ExitTrace:
        """Every exit's logits and pooled features from the [CLS] vectors ``(batch, L, d)``."""
        pooled = [self.pooled(i, cls[:, i]) for i in range(self.num_layers)]
        exits = [self.exit_logits(i, cls[:, i], pooled[i]) for i in range(self.num_layers)]
        return ExitTrace(logits=torch.stack(exits, 1), cls=cls, pooled=torch.stack(pooled, 1), exits=exits)

    def trace(self, input_ids, attention_mask, token_type_ids=None) -> ExitTrace:
        """Run every layer and every exit."""
        return self.trace_from_cls(self.layer_cls(input_ids, attention_mask, token_type_ids))

    def all_exits(self, input_ids, attention_mask, token_type_ids=None) -> tuple:
        """Run every layer; return the logits of every exit ``(batch, L, C)`` and the [CLS] vector
        after every layer ``(batch, L, d)``."""
        t = self.trace(input_ids, attention_mask, token_type_ids)
        return t.logits, t.cls

    # ------------------------------------------------------------------ inference with exits
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        rule: str = "entropy",
        threshold: Optional[float] = None,
        patience: Optional[int] = None,
        exit_layer: Optional[int] = None,
        tolerance: float = 0.1,
    ) -> ExitOutput:
        """Predict with per-example exits; exited rows are dropped from the later layers.

        :param rule: ``entropy`` (DeeBERT: exit when the entropy of the exit's softmax is below
            ``threshold``), ``patience`` (PABEE: exit once ``patience`` consecutive layers agree;
            0 runs every layer), ``learned`` (BERxiT: exit when the learning-to-exit score is above
            ``threshold``) or ``fixed`` (every example exits after ``exit_layer``, 1-based).
        :param tolerance: for ``patience`` on regression, two layers agree when their predictions
            differ by less than this.
        """
        self._check_rule(rule, threshold, patience, exit_layer)
        L = self.num_layers
        state = self.model.embed(input_ids, attention_mask, token_type_ids)
        h, mask = state.hidden, state.mask
        B = h.shape[0]
        C = self.model.backbone.num_labels
        out = h.new_zeros(B, C)
        exit_at = torch.full((B,), L, dtype=torch.long, device=h.device)
        alive = torch.arange(B, device=h.device)
        counter = torch.zeros(B, dtype=torch.long, device=h.device)
        prev = None
        for i in range(L):
            h = self.model.execute(i, h, mask)
            cls = h[:, 0]
            if i == L - 1:
                logits = self.exit_logits(i, cls)
                leave = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
            else:
                pooled = self.pooled(i, cls)
                logits = self.exit_logits(i, cls, pooled)
                if rule == "entropy":
                    leave = _entropy(logits) < threshold
                elif rule == "learned":
                    leave = self.exit_score(pooled) > threshold
                elif rule == "fixed":
                    leave = torch.full((h.shape[0],), i + 1 == exit_layer, dtype=torch.bool, device=h.device)
                else:  # patience
                    pred = self.predict(logits)
                    if prev is not None:
                        same = (pred - prev).abs() < tolerance if self.is_regression else pred == prev
                        counter = torch.where(same, counter + 1, torch.zeros_like(counter))
                    prev = pred
                    leave = counter >= patience if patience > 0 else torch.zeros_like(counter, dtype=torch.bool)
            if leave.any():
                rows = alive[leave]
                out[rows] = logits[leave].to(out.dtype)
                exit_at[rows] = i + 1
                stay = ~leave
                if not stay.any():
                    break
                h, mask, alive, counter = h[stay], mask[stay], alive[stay], counter[stay]
                if prev is not None:
                    prev = prev[stay]
        actions = (torch.arange(L, device=h.device)[None, :] < exit_at[:, None]).to(out.dtype)
        return ExitOutput(logits=out, exit_layer=exit_at, actions=actions)

    def _check_rule(self, rule, threshold, patience, exit_layer) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown exit rule {rule!r}; expected one of {RULES}")
        if rule in ("entropy", "learned") and threshold is None:
            raise ValueError(f"rule {rule!r} needs a threshold")
        if rule == "entropy" and self.is_regression:
            raise ValueError("the entropy rule (DeeBERT) needs class probabilities; a regression task has none "
                             "(use 'patience' or 'learned')")
        if rule == "patience" and (patience is None or int(patience) != patience or patience < 0):
            raise ValueError(f"patience must be a whole number >= 0 (0 = run every layer); got {patience!r}")
        if rule == "fixed" and (exit_layer is None or not 1 <= exit_layer <= self.num_layers):
            raise ValueError(f"rule 'fixed' needs exit_layer in 1..{self.num_layers}; got {exit_layer!r}")

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, meta: Optional[dict] = None) -> Path:
        """The backbone as a DPBert checkpoint (a plain HF checkpoint too) plus the off-ramps and
        the exit head in ``early_exit.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        self.model.save(path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("model.")}
        save_file(state, path / RAMPS_FILE)
        (path / EXIT_META_FILE).write_text(json.dumps({"num_layers": self.num_layers,
                                                       "shared_pooler": self.shared_pooler, **(meta or {})}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EarlyExitBert":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / RAMPS_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} holds no {RAMPS_FILE}: it is not an early-exit checkpoint")
        meta = json.loads((path / EXIT_META_FILE).read_text()) if (path / EXIT_META_FILE).is_file() else {}
        model = cls(DPBert.load(path), shared_pooler=meta.get("shared_pooler", False))
        missing, unexpected = model.load_state_dict(load_file(str(path / RAMPS_FILE)), strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise ValueError(f"{path / RAMPS_FILE} does not fit this backbone: missing {missing}, unexpected {unexpected}")
        return model


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension (nats)."""
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)
