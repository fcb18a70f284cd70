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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import DPBert

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


# ---------------------------------------------------------------------- held-out statistics and thresholds
@torch.no_grad()
def exit_statistics(model: EarlyExitBert, dataset, collate_fn, batch_size: int = 64) -> dict:
    """Every exit's logits ``(N, L, C)`` and LTE score ``(N, L)`` and the labels ``(N,)`` of a tokenised
    dataset, in eval mode: any exit rule can then be replayed on them (:func:`exits_from_statistics`)."""
    return statistics_from_features(model, layer_features(model, dataset, collate_fn, batch_size, progress=False))


@torch.no_grad()
def statistics_from_features(model: EarlyExitBert, features: dict) -> dict:
    """:func:`exit_statistics` from cached [CLS] features (:func:`layer_features`)."""
    was = model.training
    model.eval()
    try:
        t = model.trace_from_cls(features["cls"])
        return {"logits": t.logits.float(), "scores": model.exit_score(t.pooled).float(),
                "labels": features["labels"]}
    finally:
        model.train(was)


def exits_from_statistics(stats: dict, rule: str, threshold: Optional[float] = None,
                          patience: Optional[int] = None, tolerance: float = 0.1,
                          regression: bool = False) -> torch.Tensor:
    """The 1-based exit layer ``(N,)`` of every input under an exit rule, replayed on
    :func:`exit_statistics`; the same decisions as :meth:`EarlyExitBert.forward`."""
    logits = stats["logits"]
    N, L = logits.shape[:2]
    if rule == "entropy":
        leave = _entropy(logits[:, :-1]) < threshold
    elif rule == "learned":
        leave = stats["scores"][:, :-1] > threshold
    elif rule == "patience":
        pred = logits.squeeze(-1) if regression else logits.argmax(-1)
        leave = torch.zeros(N, L - 1, dtype=torch.bool)
        counter = torch.zeros(N, dtype=torch.long)
        for i in range(1, L - 1):
            same = (pred[:, i] - pred[:, i - 1]).abs() < tolerance if regression else pred[:, i] == pred[:, i - 1]
            counter = torch.where(same, counter + 1, torch.zeros_like(counter))
            if patience > 0:
                leave[:, i] = counter >= patience
    else:
        raise ValueError(f"rule {rule!r} cannot be replayed; expected entropy, learned or patience")
    leave = torch.cat([leave, torch.ones(N, 1, dtype=torch.bool)], 1)
    return leave.float().argmax(1) + 1  # the first layer that leaves


def statistics_run(model: EarlyExitBert, stats: dict, exit_layer: torch.Tensor) -> dict:
    """What :func:`dpbert_rl.evaluate.run_dataset` returns (``predictions``, ``labels``, ``actions``),
    for inputs that exit at ``exit_layer``, read off :func:`exit_statistics`."""
    logits = stats["logits"][torch.arange(len(exit_layer)), exit_layer - 1]
    L = stats["logits"].shape[1]
    actions = (torch.arange(L)[None, :] < exit_layer[:, None]).float()
    return {"predictions": model.predict(logits).float().numpy(), "labels": stats["labels"].float().numpy(),
            "actions": actions.numpy()}


def per_exit_scores(model: EarlyExitBert, stats: dict, metric: str) -> list:
    """The task metric of every exit on its own, from :func:`exit_statistics`."""
    from .metrics import compute_metrics

    labels = stats["labels"].numpy()
    out = []
    for i in range(stats["logits"].shape[1]):
        preds = model.predict(stats["logits"][:, i]).float().numpy()
        if not model.is_regression:
            preds, gold = preds.astype(int), labels.astype(int)
        else:
            gold = labels
        out.append(compute_metrics(metric, preds, gold)["score"])
    return out


def calibrate_exit(stats: dict, rule: str, target_layers: float, iterations: int = 40,
                   regression: bool = False) -> tuple:
    """Bisection for the ``entropy`` or ``learned`` threshold whose mean exit layer on
    :func:`exit_statistics` is closest to ``target_layers``. Returns ``(threshold, mean layers)``.

    A higher entropy threshold exits earlier; a higher LTE threshold exits later."""
    if rule == "entropy":
        lo, hi, earlier_when_higher = 0.0, float(math.log(max(stats["logits"].shape[-1], 2))) + 1e-3, True
    elif rule == "learned":
        lo, hi, earlier_when_higher = 0.0, 1.0, False
    else:
        raise ValueError(f"only the entropy and learned rules have a threshold to calibrate; got {rule!r}")

    def layers(t: float) -> float:
        return float(exits_from_statistics(stats, rule, t, regression=regression).float().mean())

    return bisect_threshold(layers, target_layers, lo, hi, decreasing=earlier_when_higher, iterations=iterations)


def bisect_threshold(layers: Callable[[float], float], target: float, lo: float, hi: float, decreasing: bool,
                     iterations: int = 20, cache: Optional[dict] = None) -> tuple:
    """Bisection on ``[lo, hi]`` for the ``t`` whose ``layers(t)`` (monotone: ``decreasing`` in ``t``, or
    increasing) is closest to ``target``; returns ``(t, layers(t))``. ``cache`` (a dict) memoises
    ``layers`` across calls, so several targets on one model share their evaluations."""
    cache = {} if cache is None else cache

    def f(t: float) -> float:
        if t not in cache:
            cache[t] = layers(t)
        return cache[t]

    best = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        v = f(mid)
        if best is None or abs(v - target) < abs(best[1] - target):
            best = (mid, v)
        if (v > target) == decreasing:  # too many layers: move towards fewer
            lo = mid
        else:
            hi = mid
    return best


# ---------------------------------------------------------------------- losses
def weighted_exit_loss(model: EarlyExitBert, logits: torch.Tensor, labels: torch.Tensor,
                       weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_i w_i ell_i / sum_i w_i`` over the exits ``logits`` ``(batch, L, C)``; PABEE's
    ``w_i = i`` (1-based) by default."""
    L = logits.shape[1]
    if weights is None:
        weights = torch.arange(1, L + 1, dtype=logits.dtype, device=logits.device)
    losses = torch.stack([model.model.task_loss(logits[:, i], labels).mean() for i in range(L)])
    return (weights * losses).sum() / weights.sum()


def exit_targets(model: EarlyExitBert, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BERxiT's learning-to-exit targets ``(batch, L)``: 1 where exit ``i`` is right (classification),
    ``1 - tanh(|y_i - y|)`` for regression."""
    if model.is_regression:
        return 1.0 - torch.tanh((logits.squeeze(-1) - labels[:, None].to(logits.dtype)).abs())
    return (logits.argmax(-1) == labels[:, None].long()).to(logits.dtype)


def berxit_loss(model: EarlyExitBert, trace: ExitTrace, labels: torch.Tensor, step: int) -> dict:
    """BERxiT's alternating objective at training step ``step`` (0-based): on even steps the last
    layer's task loss, on odd steps the sum of the off-ramps' task losses (layers ``1..L-1``); on
    every step plus the LTE loss, the mean squared error between the LTE scores of all ``L`` exits
    and :func:`exit_targets` (targets detached). Returns ``loss``, ``task`` and ``lte``."""
    L = model.num_layers
    exits = trace.exits if trace.exits is not None else list(trace.logits.unbind(1))
    if step % 2 == 0:
        task = model.model.task_loss(exits[-1], labels).mean()
    else:
        task = sum(model.model.task_loss(exits[i], labels).mean() for i in range(L - 1))
    u = model.exit_score(trace.pooled)  # (batch, L)
    lte = F.mse_loss(u, exit_targets(model, trace.logits.detach(), labels))
    return {"loss": task + lte, "task": task, "lte": lte}


# ---------------------------------------------------------------------- training
@torch.no_grad()
def layer_features(model: EarlyExitBert, dataset, collate_fn, batch_size: int = 64, progress: bool = True) -> dict:
    """The [CLS] vector after every layer, ``(N, L, d)``, and the labels, with the backbone in eval
    mode: what DeeBERT's frozen-backbone off-ramps train on, so the backbone runs once instead of
    once per epoch."""
    from torch.utils.data import DataLoader

    was = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="layer features", leave=False)
    feats, labels = [], []
    device = next(model.parameters()).device
    for b in loader:
        b = {k: v.to(device) for k, v in b.items()}
        feats.append(model.layer_cls(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).cpu())
        labels.append(b["labels"].cpu())
    model.train(was)
    return {"cls": torch.cat(feats), "labels": torch.cat(labels)}


def selection_scorer(model: EarlyExitBert, data, metric: str, collate_fn=None, batch_size: int = 64) -> Callable:
    """The checkpoint criterion of every early-exit trainer: the mean, over all ``L`` exits, of each
    exit's score on held-out data (the selection split). ``data``: cached :func:`layer_features`
    (DeeBERT's frozen backbone) or a tokenised dataset (with ``collate_fn``)."""

    def score() -> float:
        stats = statistics_from_features(model, data) if isinstance(data, dict) else \
            exit_statistics(model, data, collate_fn, batch_size)
        return float(np.mean(per_exit_scores(model, stats, metric)))

    return score


def _fit(groups: list, loss_fn: Callable[[object, int], torch.Tensor], n: int, epochs: float, batch_size: int,
         seed: int, log_dir: Optional[Path], desc: str, progress: bool, warmup_ratio: float = 0.1,
         batches: Optional[Callable[[torch.Tensor], object]] = None, select_fn: Optional[Callable[[], float]] = None,
         evals_per_epoch: int = 3) -> dict:
    """A small AdamW loop (linear warm-up and decay, gradient clipping at 1) over ``n`` examples.

    :param groups: AdamW parameter groups (``{"params", "lr", "weight_decay"}``).
    :param loss_fn: the loss of one mini-batch, given its row indices (or ``batches(indices)``) and
        the 0-based step.
    :param log_dir: scalars go to TensorBoard (``tb/``) and ``metrics.jsonl`` there.
    :param select_fn: the held-out score of the current parameters (higher is better), evaluated
        ``evals_per_epoch`` times per epoch and after the last step; the parameters of the best
        evaluation are restored at the end. None keeps the last step's.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // max(1, evals_per_epoch))
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * total), total)
    writer, metrics = None, None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(log_dir / "tb"))
        metrics = open(log_dir / "metrics.jsonl", "a")
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)
    step, t0, last = 0, time.time(), float("nan")
    best = {"score": None, "step": None, "params": None}
    evaluations = []
    try:
        while step < total:
            order = torch.randperm(n, generator=gen)
            for j in range(0, n, batch_size):
                idx = order[j:j + batch_size]
                loss = loss_fn(idx if batches is None else batches(idx), step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"[{desc}] loss is {loss.item()} at step {step + 1}; lower the lr")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                last = loss.item()
                bar.update(1)
                logs = {}
                if step % 10 == 0 or step == total:
                    bar.set_postfix(loss=f"{last:.3g}")
                    logs.update({"losses/train_loss": last, "charts/lr": sched.get_last_lr()[0]})
                if select_fn is not None and (step % eval_every == 0 or step == total):
                    score = select_fn()
                    evaluations.append({"step": step, "select_score": score})
                    logs["eval/select_score"] = score
                    if math.isfinite(score) and (best["score"] is None or score > best["score"]):
                        best = {"score": score, "step": step, "params": [p.detach().clone() for p in params]}
                if logs and writer is not None:
                    for k, v in logs.items():
                        writer.add_scalar(k, v, step)
                    metrics.write(json.dumps({"step": step, **logs}) + "\n")
                if step >= total:
                    break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
            metrics.close()
    if best["params"] is not None:
        with torch.no_grad():
            for p, v in zip(params, best["params"]):
                p.copy_(v)
    return {"steps": step, "seconds": time.time() - t0, "final_loss": last, "best_select": best["score"],
            "best_step": best["step"] if select_fn is not None else step, "evaluations": evaluations}


def train_offramps_frozen(model: EarlyExitBert, features: dict, epochs: float = 3.0, lr: float = 5e-4,
                          batch_size: int = 32, seed: int = 42, log_dir: Optional[Path] = None,
                          progress: bool = True, select_fn: Optional[Callable[[], float]] = None,
                          evals_per_epoch: int = 3) -> dict:
    """DeeBERT's second stage: the off-ramps of layers ``1..L-1`` on the frozen backbone's features
    (:func:`layer_features`), the sum of their task losses. The last exit, the backbone's head, is left
    as fine-tuned. [choice] lr 5e-4 (DeeBERT: 2e-5): the ramps' classifiers start from scratch and see
    cached features, so they take a larger rate than a backbone."""
    cls, labels = features["cls"], features["labels"]
    model.train()

    def loss(idx, step):
        return sum(model.model.task_loss(model.ramps[i](cls[idx, i]), labels[idx]).mean()
                   for i in range(model.num_layers - 1))

    groups = [{"params": list(model.ramps.parameters()), "lr": lr, "weight_decay": 0.01}]
    return _fit(groups, loss, len(labels), epochs, batch_size, seed, log_dir, "DeeBERT off-ramps", progress,
                select_fn=_in_eval(model, select_fn), evals_per_epoch=evals_per_epoch)


def train_exits_joint(model: EarlyExitBert, dataset, collate_fn, epochs: float = 1.0, lr: float = 2e-5,
                      ramp_lr: float = 5e-4, batch_size: int = 32, seed: int = 42, log_dir: Optional[Path] = None,
                      progress: bool = True, select_fn: Optional[Callable[[], float]] = None,
                      evals_per_epoch: int = 3) -> dict:
    """PABEE's joint training: backbone, head and exits on the exits' losses weighted by layer index
    (:func:`weighted_exit_loss`). The LTE head is not trained."""
    model.train()
    for p in model.exit_head.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.model.backbone.parameters()), "lr": lr, "weight_decay": 0.01},
              {"params": list(model.ramps.parameters()), "lr": ramp_lr, "weight_decay": 0.01}]

    def loss(b, step):
        logits, _ = model.all_exits(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        return weighted_exit_loss(model, logits, b["labels"])

    return _fit(groups, loss, len(dataset), epochs, batch_size, seed, log_dir, "PABEE joint", progress,
                batches=_batches(dataset, collate_fn, model), select_fn=_in_eval(model, select_fn),
                evals_per_epoch=evals_per_epoch)


def train_berxit(model: EarlyExitBert, dataset, collate_fn, epochs: float = 1.0, lr: float = 2e-5,
                 ramp_lr: float = 5e-4, batch_size: int = 32, seed: int = 42, log_dir: Optional[Path] = None,
                 progress: bool = True, select_fn: Optional[Callable[[], float]] = None,
                 evals_per_epoch: int = 3) -> dict:
    """BERxiT's alternating fine-tuning with its learning-to-exit module (:func:`berxit_loss`): backbone,
    head, off-ramps and LTE head together; step ``s`` trains the last layer when ``s`` is even and the
    off-ramps when it is odd, the LTE loss on every step."""
    model.train()
    groups = [{"params": list(model.model.backbone.parameters()), "lr": lr, "weight_decay": 0.01},
              {"params": list(model.ramps.parameters()) + list(model.exit_head.parameters()), "lr": ramp_lr,
               "weight_decay": 0.01}]

    def loss(b, step):
        trace = model.trace(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        return berxit_loss(model, trace, b["labels"], step)["loss"]

    return _fit(groups, loss, len(dataset), epochs, batch_size, seed, log_dir, "BERxiT alternating", progress,
                batches=_batches(dataset, collate_fn, model), select_fn=_in_eval(model, select_fn),
                evals_per_epoch=evals_per_epoch)


def _batches(dataset, collate_fn, model):
    device = next(model.parameters()).device

    def batches(idx):
        return {k: v.to(device) for k, v in collate_fn([dataset[i] for i in idx.tolist()]).items()}

    return batches


def _in_eval(model: nn.Module, fn: Optional[Callable[[], float]]) -> Optional[Callable[[], float]]:
    """``fn`` run with ``model`` in eval mode, its training mode restored afterwards."""
    if fn is None:
        return None

    def wrapped() -> float:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            model.train(was)

    return wrapped

# ---------------------------------------------------------------------- LayerDrop, BERT-kL
def layerdrop_subset(num_layers: int, keep: int) -> list:
    """LayerDrop's fixed subset at inference: ``keep`` layers spread evenly, the last one always
    kept (the head was trained on it), e.g. 6 layers, keep 3 -> layers 2, 4, 6 ("every other").
    Returns a 0/1 action list of length ``num_layers``."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be in 1..{num_layers}; got {keep}")
    kept = {num_layers - 1 - math.floor(j * num_layers / keep) for j in range(keep)}
    return [1 if i in kept else 0 for i in range(num_layers)]


def truncate(model: DPBert, k: int) -> DPBert:
    """BERT-kL: a real ``k``-layer model made of the first ``k`` layers (and the head) of
    ``model``. Its checkpoint is a plain ``k``-layer HF checkpoint."""
    import copy

    from .backbone import Backbone
    from .planner import Planners

    if not 1 <= k <= model.num_layers:
        raise ValueError(f"k must be in 1..{model.num_layers}; got {k}")
    hf = copy.deepcopy(model.backbone.model)
    base = getattr(hf, hf.base_model_prefix)
    del base.encoder.layer[k:]
    hf.config.num_hidden_layers = k
    planners = Planners(k, model.backbone.hidden_size)
    with torch.no_grad():
        planners.weight.copy_(model.planners.weight[:k])
        planners.bias.copy_(model.planners.bias[:k])
    return DPBert(Backbone(hf), planners, threshold=model.threshold, tokenizer=model.tokenizer,
                  task_info=model.task_info)


__all__ = ["EarlyExitBert", "ExitOutput", "ExitTrace", "OffRamp", "RULES", "layer_features", "train_offramps_frozen",
           "train_exits_joint", "train_berxit", "berxit_loss", "weighted_exit_loss", "exit_targets",
           "exit_statistics", "statistics_from_features", "exits_from_statistics", "statistics_run",
           "per_exit_scores", "calibrate_exit", "bisect_threshold", "selection_scorer", "layerdrop_subset",
           "truncate"]
