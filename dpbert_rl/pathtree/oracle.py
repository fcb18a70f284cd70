"""The oracle: every one of the ``2^L`` paths through a frozen backbone, for every input.

It answers "how good could any skipping policy be on this backbone?", an upper bound that no
planner (which cannot see the label) can beat. The paths form a binary tree (layer ``i`` skipped
or executed), and a path's state after layer ``i`` depends only on its first ``i`` decisions, so
the tree is walked once: the skip branch costs nothing and the execute branch runs only on the
distinct prefixes. All 64 paths of a 6-layer model cost 63 layer calls per input (10.5 forward
passes) instead of 64 x 3 = 192.

Path ``p``'s decisions are the bits of ``p``, layer 1 the most significant: ``paths()[p]``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..model.dpbert import DPBert
from ..model.objectives import path_ids


#: The most layers whose whole path tree is walked: 2^8 - 1 = 255 layer calls per input. A 12-layer model's
#: tree takes 4,095 (65x MiniLM's 63), too many to enumerate on the inputs of a training set.
MAX_TREE_LAYERS = 8


def check_tree_size(num_layers: int, source="the model") -> None:
    """Refuse to enumerate every path of a model deeper than :data:`MAX_TREE_LAYERS`, saying what scales."""
    if num_layers > MAX_TREE_LAYERS:
        raise ValueError(
            f"{source} has {num_layers} layers: its path tree takes {2 ** num_layers - 1:,} layer calls per input "
            f"(the limit is {MAX_TREE_LAYERS} layers, {2 ** MAX_TREE_LAYERS - 1} calls). Use sampled paths instead: "
            "stage 3 'sampled' (--stage3 sampled, the pipeline's 'auto' above 8 layers: REINFORCE of the planners "
            "with leave-one-out baselines and the dual price on the frozen backbone), 'rl' (joint) and the live "
            "environment dpbert_rl/LayerSkip-v0")


def paths(num_layers: int) -> torch.Tensor:
    """All ``2^L`` paths as ``(2^L, L)`` 0/1, row ``p`` the bits of ``p`` (layer 1 most significant)."""
    p = torch.arange(2 ** num_layers)
    return ((p[:, None] >> torch.arange(num_layers - 1, -1, -1)[None, :]) & 1).float()


@torch.no_grad()
def path_states(model: DPBert, batch: dict) -> tuple:
    """Walk the path tree of one batch: the hidden state at the end of every path.

    :return: ``(h, mask)``: ``h`` ``(B, 2^L, T, d)``, row ``p`` the state after path ``p``
        (:func:`paths`), and the batch's additive mask ``(B, 1, 1, T)``. Layer ``i`` runs once per
        distinct prefix of length ``i``: ``2^L - 1`` layer calls per input in all. Since a skipped layer
        leaves the state unchanged, the state at decision node (layer ``i``, prefix ``s``) is that of
        path ``s << (L - i)`` (the prefix followed by skips): these ``2^L`` states are every state the
        tree holds (:mod:`dpbert_rl.pathtree`).
    """
    check_tree_size(model.num_layers)
    state = model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    h, mask = state.hidden[:, None], state.mask  # (B, 1, T, d): one prefix per input so far
    B, _, T, d = h.shape
    for i in range(model.num_layers):
        S = h.shape[1]
        ran = model.execute(i, h.reshape(B * S, T, d), mask.repeat_interleave(S, 0)).reshape(B, S, T, d)
        h = torch.stack([h, ran], 2).reshape(B, 2 * S, T, d)  # prefix s -> 2s (skip), 2s + 1 (execute)
    return h, mask


def first_k_path(k: int, num_layers: int) -> int:
    """The index of the path that executes layers 1..k and skips the rest (layer 1 the most significant
    bit); in a path tree it is also the node of the state after the first ``k`` layers."""
    return ((1 << k) - 1) << (num_layers - k)


def path_indices(actions: np.ndarray) -> np.ndarray:
    """Path indices of 0/1 action rows ``(N, L)``, layer 1 the most significant bit."""
    return path_ids(torch.as_tensor(np.asarray(actions, dtype=np.int64))).numpy()


@torch.no_grad()
def enumerate_paths(model: DPBert, dataset, collate_fn, batch_size: int = 8, progress: bool = True) -> dict:
    """Run every path for every input of a tokenised dataset.

    :return: ``predictions`` ``(N, 2^L)`` (class ids, or values for regression), ``labels`` ``(N,)``,
        ``losses`` ``(N, 2^L)`` (the task loss), and ``paths`` ``(2^L, L)``.
    """
    model.eval()
    L = model.num_layers
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=f"oracle ({2 ** L} paths)", leave=False)
    preds, losses, labels = [], [], []
    for b in loader:
        h, _ = path_states(model, b)  # (B, 2^L, T, d)
        B, P, _, d = h.shape
        logits = model.classify(h[:, :, :1].reshape(B * P, 1, d))  # the heads read [CLS] only
        y = b["labels"].repeat_interleave(P, 0)
        losses.append(model.task_loss(logits, y).reshape(B, P))
        preds.append(model.predict(logits).float().reshape(B, P))
        labels.append(b["labels"].float())
    return {"predictions": torch.cat(preds).numpy(), "losses": torch.cat(losses).numpy(),
            "labels": torch.cat(labels).numpy(), "paths": paths(L).numpy()}


def oracle_choices(run: dict, regression: bool, max_layers: Optional[float] = None) -> np.ndarray:
    """For every input, the cheapest path whose error is lowest among the paths of at most
    ``max_layers`` layers (all paths when None). Classification error is 0/1, regression error the
    squared error. Returns the chosen path index per input, ``(N,)``."""
    preds, labels, P = run["predictions"], run["labels"], run["paths"]
    cost = P.sum(1)
    err = (preds - labels[:, None]) ** 2 if regression else (preds != labels[:, None]).astype(float)
    allowed = np.ones_like(cost, dtype=bool) if max_layers is None else cost <= max_layers
    err = np.where(allowed[None, :], err, np.inf)
    # lowest error first, then fewest layers: a tiny cost term breaks the ties
    key = err + 1e-6 * cost[None, :] / (cost.max() + 1)
    return key.argmin(1)


def best_static_paths(run: dict, score_fn) -> dict:
    """For each number of layers ``k``, the one path (the same for every input) with the best
    ``score_fn(predictions)``: ``{k: (path index, score)}``."""
    P = run["paths"]
    cost = P.sum(1).astype(int)
    best = {}
    for p in range(len(P)):
        s = score_fn(run["predictions"][:, p])
        k = int(cost[p])
        if k not in best or s > best[k][1]:
            best[k] = (p, s)
    return best


__all__ = ["paths", "first_k_path", "path_indices", "path_states", "enumerate_paths", "oracle_choices",
           "best_static_paths"]
