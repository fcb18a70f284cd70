"""Does a learner route per input, and does that beat one fixed path? Diagnostics shared by the trainer,
the agents and every benchmark.

* :func:`inspect_features`: what the planners can see. Per layer, how much the planner input varies
  across inputs (``spread`` = sum of variances / ``|mean|^2``), and how well a ridge probe on it
  predicts the loss change from skipping that layer (fitted on one half of the inputs, correlation
  on the other half). A ``[CLS]`` row that is the same for every input (all-MiniLM-L6-v2 before its
  last layer) shows up as a spread near 0 and a probe correlation near 0.
* :func:`fixed_frontier` and :func:`frontier_margin`: the best *fixed* path (one path for every input)
  at each layer count, chosen on the selection split (never on dev); the frontier at a learner's mean
  number of layers mixes the two neighbouring paths of the selection split's upper hull; the learner's
  margin over it on dev comes with a paired-bootstrap 95% interval (:func:`paired_bootstrap`; the same for
  DPBERT against the full backbone, :func:`score_interval`).
* :func:`linear_probe`: a classifier (or regressor) on the same planner features at the nearest layer
  count, as a reference: a planner may act as a classifier that steers each input to the path whose
  prediction it wants, so routing gains should be read next to what a probe alone gets.
* :func:`distinct_paths` and :func:`mid_gate_fraction` (in :mod:`dpbert_rl.evaluation.evaluate`): one path for all
  inputs, and hesitant gates, are the two ways planners fail to route.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import GlueTask
from .metrics import compute_metrics
from ..model.dpbert import DPBert, feature_stats
from ..model.planner import FEATURES, raw_features


# ---------------------------------------------------------------------- what the planners see
@torch.no_grad()
def skip_one_losses(model: DPBert, dataset, collate_fn, batch_size: int = 64) -> dict:
    """Per input, the task loss of the full path and of each path that skips exactly one layer, and the
    raw planner features (every choice) before each layer on the full path.

    :return: ``full`` ``(N,)``, ``skip`` ``(N, L)``, ``features`` ``{kind: (N, L, F)}``.
    """
    model.eval()
    L = model.num_layers
    full, skip, feats = [], [], {k: [] for k in FEATURES}
    for b in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        state = model.embed(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        h, per_layer = state.hidden, []
        for i in range(L):
            per_layer.append(h)
            h = model.execute(i, h, state.mask)
        full.append(model.task_loss(model.classify(h), b["labels"]))
        losses = []
        for i in range(L):  # skip layer i only: continue from the state before it
            g = per_layer[i]
            for j in range(i + 1, L):
                g = model.execute(j, g, state.mask)
            losses.append(model.task_loss(model.classify(g), b["labels"]))
        skip.append(torch.stack(losses, 1))
        for k in FEATURES:
            feats[k].append(torch.stack([raw_features(x, state.mask, k) for x in per_layer], 1))
    return {"full": torch.cat(full).numpy(), "skip": torch.cat(skip).numpy(),
            "features": {k: torch.cat(v).float().numpy() for k, v in feats.items()}}


def inspect_features(model: DPBert, dataset, collate_fn, batch_size: int = 64, alpha: float = 1.0,
                     seed: int = 0) -> dict:
    """Per feature choice and layer: the spread across inputs, and the held-out correlation of a ridge
    probe from the (standardised) features to the loss change from skipping that layer.

    :return: ``{"layers": L, "examples": N, "rows": [{"features", "layer", "spread", "probe_corr"}]}``.
    """
    from scipy.stats import pearsonr
    from sklearn.linear_model import Ridge

    run = skip_one_losses(model, dataset, collate_fn, batch_size)
    n, L = run["skip"].shape
    if n < 8:
        raise ValueError(f"inspecting the planner input needs at least 8 inputs; got {n}")
    delta = run["skip"] - run["full"][:, None]  # (N, L): what skipping layer i costs this input
    order = np.random.RandomState(seed).permutation(n)
    fit, held = order[: n // 2], order[n // 2:]
    rows = []
    for kind in FEATURES:
        x = run["features"][kind]  # (N, L, F)
        for i in range(L):
            xi = x[:, i].astype(np.float64)
            mean, var = xi.mean(0), xi.var(0, ddof=1)
            spread = float(var.sum() / max(float((mean ** 2).sum()), 1e-30))
            z = (xi - xi[fit].mean(0)) / np.maximum(xi[fit].std(0), 1e-6)
            corr = float("nan")
            if np.std(delta[held, i]) > 0:
                pred = Ridge(alpha=alpha).fit(z[fit], delta[fit, i]).predict(z[held])
                # a constant input gives a constant prediction: no correlation (0), not a warning
                corr = float(pearsonr(pred, delta[held, i])[0]) if np.ptp(pred) > 1e-9 * (1 + np.abs(pred).max()) else 0.0
            rows.append({"features": kind, "layer": i + 1, "spread": spread, "probe_corr": corr})
    return {"layers": L, "examples": int(n), "rows": rows}


def format_inspection(report: dict) -> str:
    """The :func:`inspect_features` report as a table: one row per feature choice, one column per layer."""
    L = report["layers"]
    head = "| features | measure | " + " | ".join(f"layer {i}" for i in range(1, L + 1)) + " |"
    lines = [head, "|" + "---|" * (L + 2)]
    for kind in FEATURES:
        rows = [r for r in report["rows"] if r["features"] == kind]
        lines.append(f"| {kind} | spread (var / mean^2) | " + " | ".join(f"{r['spread']:.2g}" for r in rows) + " |")
        lines.append(f"| {kind} | probe corr. (skip loss) | " + " | ".join(f"{r['probe_corr']:.2f}" for r in rows) + " |")
    return "\n".join(lines)


@torch.no_grad()
def skip_all_check(model: DPBert, dataset, collate_fn, reward: str, cost: float, lam: float, samples: int = 256,
                   batch_size: int = 64, warn: bool = True) -> dict:
    """Estimate on (training) inputs whether skipping every layer beats the full model under the reward
    ``-c |path| + lambda q`` (:func:`dpbert_rl.model.objectives.final_reward`). If it does, the best policy is to
    skip everything; warn, and say which lambda (or c) would not. Returns both mean returns."""
    import warnings

    from .evaluate import run_dataset
    from ..model.objectives import final_reward

    sample = dataset.select(range(min(samples, len(dataset))))
    L = model.num_layers
    q = {}
    for name, path in (("full", torch.ones(L)), ("skip_all", torch.zeros(L))):
        run = run_dataset(model, sample, collate_fn, batch_size, "path", actions=path, with_loss=True)
        q[name] = float(final_reward(reward, torch.as_tensor(run["losses"]), torch.as_tensor(run["predictions"]),
                                     torch.as_tensor(run["labels"]), model.is_regression).mean())
    full, skip = lam * q["full"] - cost * L, lam * q["skip_all"]
    out = {"full": full, "skip_all": skip, "examples": len(sample), "skip_all_wins": skip >= full}
    if warn and skip >= full:
        gain = q["full"] - q["skip_all"]
        fix = (f"lambda > {cost * L / gain:.3g} (with c = {cost:g}) or c < {lam * gain / L:.3g} (with lambda = "
               f"{lam:g})") if gain > 0 else "a backbone whose full path does better than none"
        warnings.warn(f"under the reward ({reward}, lambda={lam:g}, c={cost:g}) skipping every layer earns {skip:.3g} "
                      f"on average and the full model {full:.3g} on {len(sample)} inputs: the best policy is to skip "
                      f"everything. Use {fix}.", stacklevel=3)
    return out


# ---------------------------------------------------------------------- the fixed-path frontier
def task_score(task: GlueTask, preds: np.ndarray, labels: np.ndarray) -> float:
    """The task's GLUE score of predictions (class ids, or values for regression) against labels."""
    if not task.is_regression:
        preds, labels = preds.astype(int), labels.astype(int)
    return float(compute_metrics(task.metric, preds, labels)["score"])


def fixed_frontier(task: GlueTask, select_run: dict) -> list:
    """The upper hull of (layers, score) over the best fixed path per layer count, on the selection split.

    :param select_run: :func:`dpbert_rl.pathtree.oracle.enumerate_paths` on the selection split.
    :return: hull points ``[(layers, path index, selection score)]``, by layers ascending.
    """
    P = select_run["paths"]
    cost = P.sum(1).astype(int)
    best: dict = {}
    for p in range(len(P)):
        s = task_score(task, select_run["predictions"][:, p], select_run["labels"])
        k = int(cost[p])
        if not np.isfinite(s):  # e.g. a correlation of constant predictions: no score, not a hull point
            continue
        if k not in best or s > best[k][1]:
            best[k] = (p, s)
    pts = sorted((k, p, s) for k, (p, s) in best.items())
    hull: list = []
    for pt in pts:  # upper concave hull (monotone chain), then keep only its rising part
        while len(hull) >= 2:
            (k1, _, s1), (k2, _, s2) = hull[-2], hull[-1]
            if (s2 - s1) * (pt[0] - k1) <= (pt[2] - s1) * (k2 - k1):
                hull.pop()
            else:
                break
        hull.append(pt)
    rising = [hull[0]]
    for pt in hull[1:]:
        if pt[2] > rising[-1][2]:
            rising.append(pt)
    return rising


def fixed_paths_run(model: DPBert, dataset, collate_fn, paths, batch_size: int = 64) -> dict:
    """Given fixed paths run on every input (skipped layers not computed): the same dict as
    :func:`dpbert_rl.pathtree.oracle.enumerate_paths` restricted to ``paths`` (``predictions`` ``(N, P)``,
    ``labels`` ``(N,)``, ``paths`` ``(P, L)``), so :func:`fixed_frontier` and :func:`frontier_margin` read it."""
    from .evaluate import run_dataset

    P = np.asarray(paths, dtype=np.float32).reshape(-1, model.num_layers)
    return _paths_run(P, [run_dataset(model, dataset, collate_fn, batch_size, "path", actions=torch.from_numpy(p))
                          for p in P])


def _paths_run(paths: np.ndarray, runs: list) -> dict:
    """One :func:`~dpbert_rl.evaluation.evaluate.run_dataset` result per path, as :func:`fixed_paths_run`'s dict."""
    return {"predictions": np.stack([r["predictions"] for r in runs], 1).astype(np.float32),
            "labels": np.asarray(runs[0]["labels"], dtype=np.float32), "paths": np.asarray(paths, dtype=np.float32)}


class FixedPathCache:
    """Fixed paths' predictions on one set of inputs, kept in an ``.npz`` file as each path is scored (the whole
    file written to a temporary name, then renamed over the old one), so that a search stopped midway resumes
    where it was. Nothing is unpickled. A file written for another ``key`` (the model and the inputs) or other
    labels is refused, not overwritten.

    :param key: what the predictions depend on: the model (:func:`fixed_path_key`) and the inputs drawn.
    """

    def __init__(self, file, key: str, labels) -> None:
        self.file, self.key = Path(file), str(key)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.preds: dict = {}
        if not self.file.is_file():
            return
        try:
            with np.load(self.file, allow_pickle=False) as z:
                key_, labels_, paths, preds = str(z["key"]), z["labels"], z["paths"], z["predictions"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"{self.file}: not a fixed-path cache ({err}); move it away to search afresh") from err
        if key_ != self.key or not np.array_equal(labels_, self.labels):
            raise ValueError(f"{self.file}: a fixed-path cache of {key_!r} on {len(labels_)} inputs, not of "
                             f"{self.key!r} on these {len(self.labels)}; move it away to search afresh")
        if paths.ndim != 2 or preds.shape[0] != paths.shape[0] or preds.shape[1:2] != (len(self.labels),):
            raise ValueError(f"{self.file}: {paths.shape[0]} paths and predictions of shape {preds.shape}; expected "
                             f"one row of {len(self.labels)} predictions per path")
        self.preds = {tuple(int(x) for x in p): v for p, v in zip(paths, preds)}

    def get(self, path) -> Optional[np.ndarray]:
        return self.preds.get(tuple(int(x) for x in path))

    def put(self, path, predictions) -> None:
        self.preds[tuple(int(x) for x in path)] = np.asarray(predictions, dtype=np.float32)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(self.file.name + ".tmp.npz")
        np.savez(tmp, key=np.array(self.key), labels=self.labels, paths=np.array(list(self.preds), dtype=np.int8),
                 predictions=np.stack(list(self.preds.values())))
        os.replace(tmp, self.file)


def fixed_path_key(model: DPBert) -> str:
    """What a fixed path's predictions depend on: the backbone's tensors, head included
    (:func:`dpbert_rl.pathtree.cache.checkpoint_fingerprint`), and the per-path output map that every hard mode
    applies (regression heads); not the planners."""
    import hashlib

    from ..pathtree.cache import checkpoint_fingerprint

    cal = model.path_calibration
    cal_hash = "none" if cal is None else hashlib.sha256(cal.detach().cpu().float().numpy().tobytes()).hexdigest()[:16]
    return f"{checkpoint_fingerprint(model)}, path map {cal_hash}"


def fixed_path_cache(file, model: DPBert, inputs, seed: int) -> FixedPathCache:
    """The :class:`FixedPathCache` of ``model``'s fixed paths on ``inputs`` (a tokenised dataset with labels, drawn
    from the selection split with ``seed``), keyed by :func:`fixed_path_key` and the inputs drawn."""
    return FixedPathCache(file, f"{fixed_path_key(model)} | {len(inputs)} selection inputs, seed {seed}",
                          inputs["labels"])


def greedy_fixed_paths(model: DPBert, task: GlueTask, dataset, collate_fn, batch_size: int = 64,
                       min_layers: int = 2, progress: bool = False, cache: Optional[FixedPathCache] = None) -> dict:
    """Fixed paths by backward elimination, where every path cannot be walked (2^L - 1 layer calls per input):
    from all ``L`` layers, drop at each step the layer whose removal loses the least score on ``dataset`` (on a
    tie, the earlier layer), down to ``min_layers``. ``sum(k, k = min_layers+1 .. L)`` path passes (75 at L = 12).

    :param cache: where each scored path's predictions are kept as the search goes (:class:`FixedPathCache`, on
        ``dataset``'s inputs): a search stopped midway and started again scores only the paths it has not.
    :return: ``{k: (path, score, run)}`` for k = L .. min_layers, each path a list of 0/1 and each the one
        before it with one layer dropped; ``score`` is the path's score on ``dataset`` and ``run`` its
        ``run_dataset`` result there (predictions and labels, the only fields read from a cached path's run).
    """
    from .evaluate import run_dataset

    L = model.num_layers
    if not 1 <= min_layers <= L:
        raise ValueError(f"min_layers must be in [1, {L}]; got {min_layers}")

    def scored(p):
        known = cache.get(p) if cache is not None else None
        if known is not None:
            run = {"predictions": known, "labels": cache.labels}
        else:
            run = run_dataset(model, dataset, collate_fn, batch_size, "path",
                              actions=torch.tensor(p, dtype=torch.float32))
            if cache is not None:
                cache.put(p, run["predictions"])
        s = task_score(task, run["predictions"], run["labels"])
        return (s if np.isfinite(s) else -np.inf), run

    path = [1] * L
    out = {L: (path, *scored(path))}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(range(min_layers + 1, L + 1)), desc="fixed paths (backward elimination)", leave=False)
    while sum(path) > min_layers:
        trials = []
        for i in (j for j in range(L) if path[j]):
            trial = path[:i] + [0] + path[i + 1:]
            trials.append((*scored(trial), -i, trial))
            if bar is not None:
                bar.update()
        best, run, _, path = max(trials, key=lambda t: (t[0], t[2]))  # ties: drop the earlier layer
        out[sum(path)] = (path, float(best), run)
    if bar is not None:
        bar.close()
    return out


def frontier_mixture(hull: list, layers: float) -> list:
    """The mix of (at most two) hull paths whose mean layer count is ``layers``: ``[(path, weight)]``.
    Below the first point it is the first point; past the last, the last."""
    if layers <= hull[0][0]:
        return [(hull[0][1], 1.0)]
    for (k1, p1, _), (k2, p2, _) in zip(hull, hull[1:]):
        if k1 <= layers <= k2:
            w = (k2 - layers) / (k2 - k1)
            return [(p1, w), (p2, 1.0 - w)]
    return [(hull[-1][1], 1.0)]


def paired_bootstrap(score_pair, n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``(n_boot, 2)``: ``score_pair(idx)`` (two scores of the same inputs) on ``n_boot`` resamples of the ``n``
    inputs drawn with replacement, both sides scored on the same resample (a paired bootstrap)."""
    if n_boot < 2:
        raise ValueError(f"n_boot={n_boot}: a bootstrap interval needs at least 2 resamples (1000 is usual)")
    rng = np.random.RandomState(seed)
    return np.array([score_pair(rng.randint(0, n, n)) for _ in range(n_boot)], dtype=float)


def score_interval(task: GlueTask, preds: np.ndarray, reference_preds: np.ndarray, labels: np.ndarray,
                   n_boot: int = 1000, seed: int = 0) -> dict:
    """How far ``preds`` (e.g. DPBERT's) are from ``reference_preds`` (the full backbone's) on the same inputs:
    paired-bootstrap 95% intervals of the score difference and of the score retained (ratio).

    :return: ``score_diff_ci95`` (``[lo, hi]`` of score - reference score) and ``score_retained_ci95`` (of
        score / reference score; ``None`` when any resample's reference score is 0 or below, where a ratio means
        nothing: MCC, a correlation), ``bootstrap`` (resamples).
    """
    if not (len(preds) == len(reference_preds) == len(labels)):
        raise ValueError(f"{len(preds)} predictions, {len(reference_preds)} reference predictions and "
                         f"{len(labels)} labels: expected one of each per input")
    draws = paired_bootstrap(lambda idx: (task_score(task, preds[idx], labels[idx]),
                                          task_score(task, reference_preds[idx], labels[idx])),
                             len(labels), n_boot, seed)
    diff = np.nanpercentile(draws[:, 0] - draws[:, 1], [2.5, 97.5])
    ratio = None
    if np.isfinite(draws).all() and (draws[:, 1] > 0).all():
        ratio = [float(x) for x in np.percentile(draws[:, 0] / draws[:, 1], [2.5, 97.5])]
    return {"score_diff_ci95": [float(x) for x in diff], "score_retained_ci95": ratio, "bootstrap": int(n_boot)}


def frontier_margin(task: GlueTask, learner_preds: np.ndarray, learner_layers: float, dev_run: dict, hull: list,
                    n_boot: int = 1000, seed: int = 0) -> dict:
    """The learner's dev score minus the fixed-path frontier's at the same mean layers, with a paired
    bootstrap 95% interval (dev inputs resampled; learner and frontier scored on the same resample).

    :param learner_preds: ``(N,)`` the learner's dev predictions.
    :param dev_run: :func:`dpbert_rl.pathtree.oracle.enumerate_paths` on dev (the same inputs, same order).
    :param hull: :func:`fixed_frontier` on the selection split.
    """
    labels = dev_run["labels"]
    if len(learner_preds) != len(labels):
        raise ValueError(f"{len(learner_preds)} learner predictions for {len(labels)} dev inputs")
    mix = frontier_mixture(hull, learner_layers)

    def scores(idx):
        learner = task_score(task, learner_preds[idx], labels[idx])
        frontier = sum(w * task_score(task, dev_run["predictions"][idx, p], labels[idx]) for p, w in mix)
        return learner, frontier

    learner, frontier = scores(np.arange(len(labels)))
    draws = paired_bootstrap(scores, len(labels), n_boot, seed)
    lo, hi = np.nanpercentile(draws[:, 0] - draws[:, 1], [2.5, 97.5])
    return {"score": learner, "fixed_frontier_score": frontier, "margin": learner - frontier,
            "margin_ci95": [float(lo), float(hi)], "frontier_paths": [[int(p), float(w)] for p, w in mix]}


def random_skip_score(task: GlueTask, run: dict, rate: float, seed: int = 0, draws: int = 20) -> float:
    """Mean score of random skipping (each layer skipped with probability ``rate``, independently per input),
    read from every path's predictions (:func:`dpbert_rl.pathtree.oracle.enumerate_paths`, or a tree's ``oracle_run``)."""
    from ..pathtree.oracle import path_indices

    preds, labels = run["predictions"], run["labels"]
    n, L = preds.shape[0], run["paths"].shape[1]
    rng = np.random.default_rng(seed)
    return float(np.mean([task_score(task, preds[np.arange(n), path_indices(rng.random((n, L)) >= rate)], labels)
                          for _ in range(draws)]))


# ---------------------------------------------------------------------- the linear probe
@torch.no_grad()
def layer_features(model: DPBert, dataset, collate_fn, k: int, batch_size: int = 64) -> tuple:
    """The model's planner features (standardised, its own choice) of the state after its first ``k``
    layers, and the labels: ``(N, F)``, ``(N,)``."""
    model.eval()
    xs, ys = [], []
    for b in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        state = model.embed(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        h = state.hidden
        for i in range(k):
            h = model.execute(i, h, state.mask)
        x = raw_features(h, state.mask, model.planner_features)
        i = min(k, model.num_layers - 1)  # after the last layer: standardise with the last layer's statistics
        xs.append(model.planners.standardise(i, x))
        ys.append(b["labels"].float())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def linear_probe(model: DPBert, task: GlueTask, fit_set, dev_set, collate_fn, k: int,
                 batch_size: int = 64) -> dict:
    """A logistic-regression (ridge for regression) probe on the planner features after ``k`` layers,
    fitted on training inputs and scored on dev: what ``k`` layers plus a linear read-out get."""
    x_fit, y_fit = layer_features(model, fit_set, collate_fn, k, batch_size)
    x_dev, y_dev = layer_features(model, dev_set, collate_fn, k, batch_size)
    return _probe(task, x_fit, y_fit, x_dev, y_dev, k)


def _probe(task: GlueTask, x_fit, y_fit, x_dev, y_dev, k: int) -> dict:
    from sklearn.linear_model import LogisticRegression, Ridge

    if task.is_regression:
        probe = Ridge(alpha=1.0).fit(x_fit, y_fit)
    else:
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(x_fit, y_fit.astype(int))
    return {"probe_score": task_score(task, probe.predict(x_dev), y_dev), "probe_layers": int(k)}


def tree_probe(model: DPBert, task: GlueTask, fit_tree, dev_tree, k: int, max_fit: int = 2000) -> dict:
    """:func:`linear_probe` read from path-tree caches of ``model``'s frozen backbone (no model call): the
    features after the first ``k`` layers are the tree's node with those ``k`` bits set (skipped layers
    leave the state unchanged), for the first ``max_fit`` inputs of ``fit_tree`` and all of ``dev_tree``."""
    from ..pathtree.oracle import first_k_path

    L = fit_tree.num_layers
    node, i = first_k_path(k, L), min(k, L - 1)

    def read(tree, n=None):
        x = torch.from_numpy(np.array(tree.raw(model.planner_features)[:n, node], dtype=np.float32))
        return model.planners.standardise(i, x).numpy(), np.asarray(tree.labels[:n], dtype=np.float32)

    return _probe(task, *read(fit_tree, max_fit), *read(dev_tree), k)


def check_spread(stats: dict, threshold: float = 1e-3) -> list:
    """Layers (1-based) whose planner input hardly varies across inputs (``spread < threshold``)."""
    return [i + 1 for i, v in enumerate(stats["spread"]) if v < threshold]


__all__ = ["warn_if_constant", "skip_one_losses", "inspect_features", "format_inspection", "fixed_frontier", "frontier_mixture",
           "frontier_margin", "random_skip_score", "task_score", "layer_features", "linear_probe", "tree_probe",
           "check_spread", "feature_stats", "skip_all_check", "routing_report"]


def routing_report(model: DPBert, task: GlueTask, learner_run: dict, select_set, dev_set, fit_set, collate_fn,
                   batch_size: int = 64, n_boot: int = 1000, seed: int = 0, progress: bool = False,
                   select_run: Optional[dict] = None, dev_run: Optional[dict] = None,
                   probe: Optional[dict] = None, frontier_samples: Optional[int] = 500,
                   frontier_cache: Optional[str] = None) -> dict:
    """Everything a routing row reports for one learner on one (frozen) backbone.

    The fixed paths are every path of the backbone up to :data:`~dpbert_rl.pathtree.oracle.MAX_TREE_LAYERS`
    layers. Deeper (4,096 paths at L = 12), they are found by backward elimination (:func:`greedy_fixed_paths`)
    on ``frontier_samples`` inputs of the selection split (seeded; all of it when ``None`` or fewer): a frontier
    of one path per layer count, not the best of all paths, so a margin over it is an upper bound on the margin
    over the exact frontier. ``frontier`` in the result says which.

    :param learner_run: the learner's :func:`dpbert_rl.evaluation.evaluate.run_dataset` on ``dev_set`` (predictions,
        actions, and probs where the learner has gate probabilities).
    :param select_run, dev_run: every path's predictions on the two splits, when already known (e.g.
        :func:`dpbert_rl.pathtree.PathTree.oracle_run` of a cache); else enumerated here.
    :param probe: a dict that memoises the linear probe per layer count across calls (same model, same sets).
    :param frontier_cache: an ``.npz`` file that keeps the backward elimination's scored paths as it goes
        (:class:`FixedPathCache`, keyed by :func:`fixed_path_key`), so that a stopped run resumes.
    :return: ``score``, ``layers_executed_mean``, ``fixed_frontier_score``, ``margin``, ``margin_ci95``,
        ``distinct_paths``, ``mid_gate_fraction``, ``probe_score``, ``probe_layers`` and the frontier's paths.
    """
    from .evaluate import distinct_paths, mid_gate_fraction
    from ..pathtree.oracle import MAX_TREE_LAYERS, enumerate_paths, path_indices

    frontier = "every path"
    if select_run is None and model.num_layers > MAX_TREE_LAYERS:
        sub = select_set
        if frontier_samples and frontier_samples < len(select_set):
            sub = select_set.shuffle(seed=seed).select(range(frontier_samples))
        cache = fixed_path_cache(frontier_cache, model, sub, seed) if frontier_cache else None
        greedy = [v for _, v in sorted(greedy_fixed_paths(model, task, sub, collate_fn, batch_size, min_layers=1,
                                                         progress=progress, cache=cache).items())]
        fixed = [p for p, _, _ in greedy]
        select_run = _paths_run(fixed, [run for _, _, run in greedy])  # the elimination's own passes
        if dev_run is None:
            dev_run = fixed_paths_run(model, dev_set, collate_fn, fixed, batch_size)
        frontier = f"backward elimination on {len(sub)} selection inputs"
    if select_run is None:
        select_run = enumerate_paths(model, select_set, collate_fn, batch_size, progress=progress)
    if dev_run is None:
        dev_run = enumerate_paths(model, dev_set, collate_fn, batch_size, progress=progress)
    hull = fixed_frontier(task, select_run)
    layers = float(np.asarray(learner_run["actions"]).sum(1).mean())
    out = frontier_margin(task, np.asarray(learner_run["predictions"]), layers, dev_run, hull, n_boot, seed)
    path_id = path_indices(select_run["paths"])  # column -> path id (layer 1 the top bit), as enumerate_paths
    out["frontier_paths"] = [[int(path_id[p]), w] for p, w in out["frontier_paths"]]
    out.update({
        "layers_executed_mean": layers,
        "distinct_paths": distinct_paths(learner_run["actions"]),
        "mid_gate_fraction": mid_gate_fraction(learner_run["probs"]) if "probs" in learner_run else None,
        "frontier_hull": [[int(k), int(path_id[p]), float(s)] for k, p, s in hull],
        "frontier": frontier,
    })
    k = int(round(layers))
    out.update(probe[k] if probe and k in probe else linear_probe(model, task, fit_set, dev_set, collate_fn, k,
                                                                 batch_size))
    if probe is not None:
        probe[k] = {"probe_score": out["probe_score"], "probe_layers": out["probe_layers"]}
    return out


def warn_if_constant(stats: dict, threshold: float = 1e-3) -> list:
    """Warn when the planner input hardly varies across inputs before some layers (``spread`` below
    ``threshold``): planners there can only learn a fixed decision. Returns those layers (1-based)."""
    import warnings

    flat = check_spread(stats, threshold)
    if flat:
        warnings.warn(
            f"the planners' {stats['features']!r} features are nearly constant across inputs before layer(s) "
            f"{flat} (variance / |mean|^2 < {threshold:g} on {stats['examples']} training inputs): planners there "
            "can only learn a fixed decision. Try --planner-features mean (see `dpbert-rl inspect`).",
            stacklevel=3)
    return flat
