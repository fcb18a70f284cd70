"""Exit rules replayed on held-out statistics: every exit's logits and LTE score recorded once
(:func:`exit_statistics`), any rule replayed on them (:func:`exits_from_statistics`, equal to the batched
forward), and the threshold whose mean exit layer is a given number of layers (:func:`calibrate_exit`)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..model.backbone import eval_mode
from .early_exit import EarlyExitBert, _entropy


# ---------------------------------------------------------------------- held-out statistics and thresholds
@torch.no_grad()
def layer_features(model: EarlyExitBert, dataset, collate_fn, batch_size: int = 64, progress: bool = True) -> dict:
    """The [CLS] vector after every layer, ``(N, L, d)``, and the labels, with the backbone in eval
    mode: what DeeBERT's frozen-backbone off-ramps train on, so the backbone runs once instead of
    once per epoch."""
    from torch.utils.data import DataLoader

    with eval_mode(model):
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
    return {"cls": torch.cat(feats), "labels": torch.cat(labels)}


@torch.no_grad()
def exit_statistics(model: EarlyExitBert, dataset, collate_fn, batch_size: int = 64) -> dict:
    """Every exit's logits ``(N, L, C)`` and LTE score ``(N, L)`` and the labels ``(N,)`` of a tokenised
    dataset, in eval mode: any exit rule can then be replayed on them (:func:`exits_from_statistics`)."""
    return statistics_from_features(model, layer_features(model, dataset, collate_fn, batch_size, progress=False))


@torch.no_grad()
def statistics_from_features(model: EarlyExitBert, features: dict) -> dict:
    """:func:`exit_statistics` from cached [CLS] features (:func:`layer_features`)."""
    with eval_mode(model):
        t = model.trace_from_cls(features["cls"])
        return {"logits": t.logits.float(), "scores": model.exit_score(t.pooled).float(),
                "labels": features["labels"]}


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
    """What :func:`dpbert_rl.evaluation.evaluate.run_dataset` returns (``predictions``, ``labels``, ``actions``),
    for inputs that exit at ``exit_layer``, read off :func:`exit_statistics`."""
    logits = stats["logits"][torch.arange(len(exit_layer)), exit_layer - 1]
    L = stats["logits"].shape[1]
    actions = (torch.arange(L)[None, :] < exit_layer[:, None]).float()
    return {"predictions": model.predict(logits).float().numpy(), "labels": stats["labels"].float().numpy(),
            "actions": actions.numpy()}


def per_exit_scores(model: EarlyExitBert, stats: dict, metric: str) -> list:
    """The task metric of every exit on its own, from :func:`exit_statistics`."""
    from ..evaluation.metrics import compute_metrics

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


def selection_scorer(model: EarlyExitBert, data, metric: str, collate_fn=None, batch_size: int = 64) -> Callable:
    """The checkpoint criterion of every early-exit trainer: the mean, over all ``L`` exits, of each
    exit's score on held-out data (the selection split). ``data``: cached :func:`layer_features`
    (DeeBERT's frozen backbone) or a tokenised dataset (with ``collate_fn``)."""

    def score() -> float:
        stats = statistics_from_features(model, data) if isinstance(data, dict) else \
            exit_statistics(model, data, collate_fn, batch_size)
        return float(np.mean(per_exit_scores(model, stats, metric)))

    return score
