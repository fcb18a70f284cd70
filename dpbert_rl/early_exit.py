"""Early-exit baselines on the same backbone and the same per-layer calls as DPBERT.

An early-exit model stops *after* some layer ``k`` and predicts from there; it never skips a layer
and then goes on. DPBERT's claim is that free skipping beats this at equal speed-up; these are the
baselines of the paper's Table 1, built so that claim can be tested on one backbone:

===========  ==========================================================================================
method       what it is here
===========  ==========================================================================================
DeeBERT      an off-ramp (pooler + classifier on ``h_i^cls``) after every layer, trained in a second
             stage with the fine-tuned backbone frozen; exit when the off-ramp's prediction entropy
             is below a threshold (``rule="entropy"``; classification only, as in the paper)
PABEE        off-ramps trained jointly with the backbone, the loss of layer ``i`` weighted by ``i``;
             exit once ``t`` consecutive layers agree (``rule="patience"``; regression: agree within
             ``tolerance``). ``t = 0`` runs every layer, as in PABEE's own code
BERxiT       a learning-to-exit head (one linear layer on ``h_i^cls``, shared by the layers) scores
             how likely off-ramp ``i`` is already right; exit when the score passes a threshold
             (``rule="learned"``). Its target is ``1[off-ramp i correct]``, or
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
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import DPBert

RULES = ("entropy", "patience", "learned", "fixed")
RAMPS_FILE = "early_exit.safetensors"
EXIT_META_FILE = "early_exit.json"


class OffRamp(nn.Module):
    """DeeBERT's off-ramp: a pooler (linear + tanh) on ``h_i^cls``, dropout, a linear classifier."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.pooler(cls))))


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


class EarlyExitBert(nn.Module):
    """A fine-tuned :class:`DPBert` backbone with an off-ramp after every layer but the last, and a
    learning-to-exit head. The last exit is the backbone's own head.

    :param model: the backbone (its planners are not used).
    :param dropout: dropout inside the off-ramps while training.
    """

    def __init__(self, model: DPBert, dropout: float = 0.1):
        super().__init__()
        self.model = model
        L, d, C = model.num_layers, model.backbone.hidden_size, model.backbone.num_labels
        self.ramps = nn.ModuleList(OffRamp(d, C, dropout) for _ in range(L - 1))
        self.exit_head = nn.Linear(d, 1)

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

    def exit_logits(self, i: int, cls: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``i`` (0-based) from ``h_{i+1}^cls`` ``(batch, d)``: off-ramp ``i``, or the
        backbone's head after the last layer (the BERT, RoBERTa and ELECTRA heads read only [CLS])."""
        if i < self.num_layers - 1:
            return self.ramps[i](cls)
        return self.model.classify(cls[:, None, :])

    def exit_score(self, cls: torch.Tensor) -> torch.Tensor:
        """BERxiT's learning-to-exit score ``u_i`` in [0, 1] from ``h_i^cls``; ``(batch,)``."""
        return torch.sigmoid(self.exit_head(cls).squeeze(-1))

    # ------------------------------------------------------------------ training pass
    def layer_cls(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Run every layer; the [CLS] vector after every layer, ``(batch, L, d)``."""
        state = self.model.embed(input_ids, attention_mask, token_type_ids)
        h, cls = state.hidden, []
        for i in range(self.num_layers):
            h = self.model.execute(i, h, state.mask)
            cls.append(h[:, 0])
        return torch.stack(cls, 1)

    def all_exits(self, input_ids, attention_mask, token_type_ids=None) -> tuple:
        """Run every layer; return the logits of every exit ``(batch, L, C)`` and the [CLS] vector
        after every layer ``(batch, L, d)``."""
        cls = self.layer_cls(input_ids, attention_mask, token_type_ids)
        return torch.stack([self.exit_logits(i, cls[:, i]) for i in range(self.num_layers)], 1), cls

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
            logits = self.exit_logits(i, cls)
            if i == L - 1:
                leave = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
            elif rule == "entropy":
                logp = F.log_softmax(logits.float(), -1)
                leave = -(logp.exp() * logp).sum(-1) < threshold
            elif rule == "learned":
                leave = self.exit_score(cls) > threshold
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
        (path / EXIT_META_FILE).write_text(json.dumps({"num_layers": self.num_layers, **(meta or {})}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EarlyExitBert":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / RAMPS_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} holds no {RAMPS_FILE}: it is not an early-exit checkpoint")
        model = cls(DPBert.load(path))
        missing, unexpected = model.load_state_dict(load_file(str(path / RAMPS_FILE)), strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise ValueError(f"{path / RAMPS_FILE} does not fit this backbone: missing {missing}, unexpected {unexpected}")
        return model


# ---------------------------------------------------------------------- losses
def weighted_exit_loss(model: EarlyExitBert, logits: torch.Tensor, labels: torch.Tensor,
                       weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_i w_i ell_i / sum_i w_i`` over the exits ``logits`` ``(batch, L, C)``; PABEE's and
    BERxiT's ``w_i = i`` (1-based) by default."""
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


# ---------------------------------------------------------------------- training
@torch.no_grad()
def layer_features(model: EarlyExitBert, dataset, collate_fn, batch_size: int = 64, progress: bool = True) -> dict:
    """The [CLS] vector after every layer, ``(N, L, d)``, and the labels, with the backbone in eval
    mode: what the frozen-backbone stages (DeeBERT's off-ramps, BERxiT's exit head) train on, so
    the backbone runs once instead of once per epoch."""
    from torch.utils.data import DataLoader

    was = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="layer features", leave=False)
    feats, labels = [], []
    for b in loader:
        feats.append(model.layer_cls(b["input_ids"], b["attention_mask"], b.get("token_type_ids")))
        labels.append(b["labels"])
    model.train(was)
    return {"cls": torch.cat(feats), "labels": torch.cat(labels)}


def _fit(groups: list, loss_fn: Callable[[object], torch.Tensor], n: int, epochs: float, batch_size: int,
         seed: int, log_dir: Optional[Path], desc: str, progress: bool, warmup_ratio: float = 0.1,
         batches: Optional[Callable[[torch.Tensor], object]] = None) -> dict:
    """A small AdamW loop (linear warm-up and decay, gradient clipping at 1) over ``n`` examples.

    :param groups: AdamW parameter groups (``{"params", "lr", "weight_decay"}``).
    :param loss_fn: the loss of one mini-batch, given its row indices (or ``batches(indices)``).
    :param log_dir: scalars go to TensorBoard (``tb/``) and ``metrics.jsonl`` there.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
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
    try:
        while step < total:
            order = torch.randperm(n, generator=gen)
            for j in range(0, n, batch_size):
                idx = order[j:j + batch_size]
                loss = loss_fn(idx if batches is None else batches(idx))
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
                if step % 10 == 0 or step == total:
                    bar.set_postfix(loss=f"{last:.3g}")
                    if writer is not None:
                        writer.add_scalar("losses/train_loss", last, step)
                        writer.add_scalar("charts/lr", sched.get_last_lr()[0], step)
                        metrics.write(json.dumps({"step": step, "losses/train_loss": last}) + "\n")
                if step >= total:
                    break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
            metrics.close()
    return {"steps": step, "seconds": time.time() - t0, "final_loss": last}


def train_offramps_frozen(model: EarlyExitBert, features: dict, epochs: float = 3.0, lr: float = 5e-4,
                          batch_size: int = 32, seed: int = 42, log_dir: Optional[Path] = None,
                          progress: bool = True) -> dict:
    """DeeBERT's second stage: the off-ramps of layers ``1..L-1`` on the frozen backbone's features
    (:func:`layer_features`), each with its own task loss (summed). The last exit, the backbone's
    head, is left as fine-tuned. [choice] lr 5e-4: the ramps start from scratch and see cached
    features, so they take a larger rate than the backbone's 2e-5."""
    cls, labels = features["cls"], features["labels"]
    model.train()

    def loss(idx):
        return sum(model.model.task_loss(model.ramps[i](cls[idx, i]), labels[idx]).mean()
                   for i in range(model.num_layers - 1))

    groups = [{"params": list(model.ramps.parameters()), "lr": lr, "weight_decay": 0.01}]
    return _fit(groups, loss, len(labels), epochs, batch_size, seed, log_dir, "DeeBERT off-ramps", progress)


def train_exits_joint(model: EarlyExitBert, dataset, collate_fn, epochs: float = 1.0, lr: float = 2e-5,
                      ramp_lr: float = 5e-4, batch_size: int = 32, seed: int = 42, log_dir: Optional[Path] = None,
                      progress: bool = True) -> dict:
    """PABEE's (and BERxiT's) joint training: backbone, head and off-ramps on the exits' losses
    weighted by layer index (:func:`weighted_exit_loss`)."""
    model.train()
    for p in model.exit_head.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.model.backbone.parameters()), "lr": lr, "weight_decay": 0.01},
              {"params": list(model.ramps.parameters()), "lr": ramp_lr, "weight_decay": 0.01}]

    def loss(b):
        logits, _ = model.all_exits(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        return weighted_exit_loss(model, logits, b["labels"])

    def batches(idx):
        return collate_fn([dataset[i] for i in idx.tolist()])

    return _fit(groups, loss, len(dataset), epochs, batch_size, seed, log_dir, "PABEE joint", progress,
                batches=batches)


def train_exit_head(model: EarlyExitBert, features: dict, epochs: float = 3.0, lr: float = 5e-4,
                    batch_size: int = 32, seed: int = 42, log_dir: Optional[Path] = None,
                    progress: bool = True) -> dict:
    """BERxiT's learning-to-exit head on frozen features: mean squared error between ``u_i`` and
    :func:`exit_targets` at every exit but the last (where the model stops anyway)."""
    cls, labels = features["cls"], features["labels"]
    model.eval()  # the off-ramps' predictions are the targets: no dropout in them
    with torch.no_grad():
        logits = torch.stack([model.exit_logits(i, cls[:, i]) for i in range(model.num_layers)], 1)
        targets = exit_targets(model, logits, labels)[:, :-1]
    model.exit_head.train()

    def loss(idx):
        u = torch.sigmoid(model.exit_head(cls[idx, :-1]).squeeze(-1))
        return F.mse_loss(u, targets[idx])

    groups = [{"params": list(model.exit_head.parameters()), "lr": lr, "weight_decay": 0.0}]
    return _fit(groups, loss, len(labels), epochs, batch_size, seed, log_dir, "BERxiT exit head", progress)


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


__all__ = ["EarlyExitBert", "ExitOutput", "OffRamp", "RULES", "layer_features", "train_offramps_frozen",
           "train_exits_joint", "train_exit_head", "weighted_exit_loss", "exit_targets", "layerdrop_subset",
           "truncate"]
