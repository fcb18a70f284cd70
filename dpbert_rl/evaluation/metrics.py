"""GLUE metrics, as the paper reports them (percentages)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = ("accuracy", "acc_and_f1", "matthews", "pearson_spearman")


def compute_metrics(metric: str, predictions, labels) -> dict:
    """Score ``predictions`` against ``labels``; every value is in percent.

    :param metric: ``accuracy`` (SST-2, QNLI, RTE, MNLI), ``acc_and_f1`` (MRPC, QQP: the mean
        of the two), ``matthews`` (CoLA) or ``pearson_spearman`` (STS-B: the mean of the two).
    :return: the components and ``score``, the task's single number.
    """
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if preds.shape != gold.shape:
        raise ValueError(f"{preds.shape[0]} predictions for {gold.shape[0]} labels")
    if len(gold) == 0:
        raise ValueError("cannot score an empty set")
    if metric == "accuracy":
        out = {"accuracy": 100 * accuracy_score(gold, preds)}
        out["score"] = out["accuracy"]
    elif metric == "acc_and_f1":
        out = {"accuracy": 100 * accuracy_score(gold, preds), "f1": 100 * f1_score(gold, preds, zero_division=0)}
        out["score"] = (out["accuracy"] + out["f1"]) / 2
    elif metric == "matthews":
        out = {"matthews": 100 * matthews_corrcoef(gold, preds)}
        out["score"] = out["matthews"]
    elif metric == "pearson_spearman":
        if np.std(preds) == 0 or np.std(gold) == 0:
            p = s = 0.0  # correlation is undefined for a constant; score it as none
        else:
            p, s = pearsonr(preds, gold)[0], spearmanr(preds, gold)[0]
        out = {"pearson": 100 * float(p), "spearman": 100 * float(s)}
        out["score"] = (out["pearson"] + out["spearman"]) / 2
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return {k: float(v) for k, v in out.items()}
