"""How the early-exit baselines are trained: DeeBERT's off-ramps on a frozen backbone, PABEE's exits
jointly with the backbone, BERxiT's alternating fine-tuning with its learning-to-exit head; each chooses its
checkpoint with ``select_fn`` on held-out data."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.backbone import eval_mode
from .early_exit import EarlyExitBert, ExitTrace


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
        with eval_mode(model), torch.no_grad():
            return fn()

    return wrapped
