"""Scoring a model on a GLUE split: the dev score, the layers executed and how often each runs."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from ..data import GlueTask
from .metrics import compute_metrics
from ..model.backbone import eval_mode
from ..model.dpbert import DPBert


@torch.no_grad()
def run_dataset(
    model: DPBert,
    dataset,
    collate_fn,
    batch_size: int = 64,
    mode: str = "hard",
    threshold: Optional[float] = None,
    actions: Optional[torch.Tensor] = None,
    progress: bool = False,
    forward: Optional[Callable[[dict], tuple]] = None,
    with_loss: bool = False,
) -> dict:
    """Run ``model`` over a tokenised dataset; returns numpy ``predictions``, ``labels``,
    ``actions`` ``(N, L)`` and (when the paths come from the planners) ``probs`` ``(N, L)``.

    :param forward: replaces the model's own path choice: ``batch -> (logits, actions)`` or
        ``(logits, actions, probs)``, e.g. an agent driving the layers (:func:`agents.evaluate.agent_forward`).
    :param with_loss: also return the task loss of every input, ``losses`` ``(N,)``.
    """
    with eval_mode(model):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"eval ({mode})", leave=False)
        preds, labels, acts, probs, losses = [], [], [], [], []
        device = next(model.parameters()).device
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            if forward is None:
                out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                            mode=mode, threshold=threshold, actions=actions)
                logits, act = out.logits, out.actions
                probs.append(out.probs.float().cpu())
            else:
                logits, act, *p = forward(batch)
                if p and p[0] is not None:
                    probs.append(torch.as_tensor(p[0]).float().cpu())
            preds.append(model.predict(logits).float().cpu())
            if with_loss:
                losses.append(model.task_loss(logits, batch["labels"]).float().cpu())
            labels.append(batch["labels"].float().cpu())
            acts.append(torch.as_tensor(act).float().cpu())
    run = {
        "predictions": torch.cat(preds).numpy(),
        "labels": torch.cat(labels).numpy(),
        "actions": torch.cat(acts).numpy(),
    }
    if probs:
        run["probs"] = torch.cat(probs).numpy()
    if losses:
        run["losses"] = torch.cat(losses).numpy()
    return run


def score_run(task: GlueTask, run: dict) -> dict:
    """Metric, layers executed (mean) and per-layer execution frequency of a :func:`run_dataset`."""
    preds, labels = run["predictions"], run["labels"]
    if not task.is_regression:
        preds, labels = preds.astype(int), labels.astype(int)
    metrics = compute_metrics(task.metric, preds, labels)
    actions = run["actions"]
    return {
        "score": metrics["score"],
        "metrics": metrics,
        "layers_executed_mean": float(actions.sum(1).mean()),
        "layer_frequency": [float(x) for x in actions.mean(0)],
        "skip_rate": float(1.0 - actions.mean()),
        "num_examples": int(len(labels)),
        "distinct_paths": distinct_paths(actions),
        "mid_gate_fraction": mid_gate_fraction(run["probs"]) if "probs" in run else None,
    }


def distinct_paths(actions) -> int:
    """How many different paths ``(N, L)`` 0/1 the inputs took: 1 means one fixed path for all."""
    import numpy as np

    return int(len(np.unique(np.asarray(actions).astype(np.int8), axis=0)))


def mid_gate_fraction(probs, lo: float = 0.2, hi: float = 0.8) -> float:
    """Fraction of gate probabilities in ``(lo, hi)``: hesitant gates, whose greedy decision at 0.5 is
    close to arbitrary. A planner that decides has few."""
    import numpy as np

    p = np.asarray(probs)
    return float(((p > lo) & (p < hi)).mean())


def evaluate_model(model: DPBert, task: GlueTask, dataset, collate_fn, batch_size: int = 64,
                   mode: str = "hard", threshold: Optional[float] = None, progress: bool = False) -> dict:
    """Dev score and layer statistics of ``model`` in ``mode`` (``full`` for the backbone alone)."""
    return score_run(task, run_dataset(model, dataset, collate_fn, batch_size, mode, threshold, progress=progress))


def speedup_ideal(layers_executed_mean: float, num_layers: int) -> float:
    """The speed-up implied by the layer count alone: ``L / mean layers executed``; infinite when no
    layer runs at all (the ratio has no finite value; it used to read 6e9)."""
    if layers_executed_mean <= 0:
        return math.inf
    return float(num_layers / layers_executed_mean)


def executed_fraction(layers, num_layers: int, weights=None) -> float:
    """The executed fraction of the layers, ``sum(k) / (L N)`` over the inputs' layers run ``k``, or with
    per-input ``weights`` ``w`` (tokens, or tokens over a mean) of the token-layers, ``sum(w k) / (L sum(w))``."""
    k = torch.as_tensor(layers, dtype=torch.float64)
    if weights is None:
        return float(k.mean()) / num_layers
    w = torch.as_tensor(weights, dtype=torch.float64)
    return float((w * k).sum() / w.sum()) / num_layers


def speedup_ideal_length_weighted(tokens, layers, num_layers: int) -> float:
    """``L * sum(T) / sum(T * k)``, ``1 /`` :func:`executed_fraction` of the token-layers: the speed-up if a
    layer's cost on an input were proportional to its tokens ``T`` and nothing but the layers cost anything
    (``k``: the layers run on each input). It is below :func:`speedup_ideal` when more layers are skipped on
    short inputs, where they cost less; infinite when no layer runs."""
    fraction = executed_fraction(layers, num_layers, tokens)
    return math.inf if fraction <= 0 else 1.0 / fraction


ZERO_LAYER_NOTE = ("no layer was executed for any input: the ideal speed-up L / 0 is unbounded, and the measured "
                   "one is the cost of embeddings and head alone")


def speedup_ideal_fields(layers_executed_mean: float, num_layers: int, tokens=None, layers=None) -> dict:
    """``speedup_ideal`` for a JSON report: the ratio, or None with ``speedup_ideal_note`` when no layer
    ran (JSON has no infinity, and a huge finite stand-in reads as a result). Given each input's ``tokens`` and
    ``layers`` run, also ``speedup_ideal_length_weighted`` (:func:`speedup_ideal_length_weighted`; None
    likewise)."""
    value = speedup_ideal(layers_executed_mean, num_layers)
    out = {"speedup_ideal": None, "speedup_ideal_note": ZERO_LAYER_NOTE} if math.isinf(value) else \
        {"speedup_ideal": value}
    if tokens is not None:
        weighted = speedup_ideal_length_weighted(tokens, layers, num_layers)
        out["speedup_ideal_length_weighted"] = None if math.isinf(weighted) else weighted
    return out
