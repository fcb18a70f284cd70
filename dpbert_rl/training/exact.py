"""Stage 3 'exact': the planners of a frozen checkpoint trained by gradient ascent on the exact expected
reward over all ``2^L`` paths, read from the path-tree cache (:mod:`dpbert_rl.pathtree.cache`). No sampling,
so the gradient has no variance; the same reward, dual price and entropy bonus as the 'rl' stage.

``dpbert-rl exact CKPT`` runs it; ``dpbert-rl pipeline`` uses it as stage 3 by default.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checks import check_config_numbers, check_max_seq_length, check_number, nonfinite
from ..data import GlueTask, collator, get_task, load_split, tokenize
from ..evaluation.diagnostics import warn_if_constant
from ..evaluation.evaluate import evaluate_model, executed_fraction, score_run
from ..model.dpbert import DPBert, TaskInfo
from ..model.objectives import (REWARDS, DualPrice, apply_path_calibration, check_rate, final_reward,
                                fit_path_calibration)
from ..model.planner import Planners, check_budget_range, check_features
from ..pathtree.cache import (DEFAULT_CACHE_DIR, PathTree, checkpoint_fingerprint, expected_return, greedy_paths,
                              outcome_correct, tree_cache, tree_index)
from ..pathtree.oracle import check_tree_size, paths
from .checkpoint import DONE_FILE, save_atomic, stage_dir, stage_done, truncate_metrics
from .config import COST_UNITS, TrainingError, check_same_run

# settings that do not change what the exact stage computes
_EXACT_BOOKKEEPING = {"output_dir", "cache_dir", "progress", "build_batch_size", "device", "score_dev"}


@dataclass
class ExactConfig:
    """Planner training by the exact expected reward over the path tree (frozen backbone)."""

    task: Optional[str] = None
    """GLUE task (default: the checkpoint's)."""
    data_dir: Optional[str] = None
    """Local GLUE directory; default $GLUE_DIR, else the hub."""
    output_dir: str = "runs/exact"
    """Where config, metrics, TensorBoard events and the model/ checkpoint go."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Where the path-tree caches are kept (and reused)."""
    max_seq_length: Optional[int] = None
    """Tokenisation length (default: the checkpoint's, 128)."""
    max_train_samples: Optional[int] = None
    """The first N inputs of the fit split (as the environments read it)."""
    max_eval_samples: Optional[int] = None
    """The first N inputs of the selection split and of dev."""
    planner_features: str = "mean"
    """What the planners read: cls, mean or cls+mean."""
    fresh_planners: bool = False
    """Start from fresh planners even when the checkpoint has planners of these features."""
    feature_stats_samples: int = 1000
    """Fit inputs for the standardisation statistics of fresh planners."""
    planner_init_bias: float = 2.0
    """Initial bias of fresh planners (p = 0.88)."""
    lr: float = 1e-2
    """Adam learning rate of the planners. Higher than stage 3's 1e-3: the exact gradient has no
    sampling noise to average out."""
    batch_size: int = 64
    """Inputs per step (each carries all 2^L paths)."""
    epochs: float = 20.0
    """Passes over the fit split (steps are cheap: array lookups and L small matrix products)."""
    max_steps: Optional[int] = None
    """Stop after this many steps (overrides epochs)."""
    cost: float = 1.0
    """c: price of an executed layer (with rate_control 'dual', its starting value)."""
    lam: float = 5.0
    """lambda: weight of the outcome term q."""
    reward: str = "correct"
    """The outcome term q: 'loss' (-task loss, eq. 9) or 'correct' (bounded)."""
    rate_control: str = "dual"
    """'dual': the layer price follows dual ascent (DualPrice) so that the greedy paths skip
    target_rate of the layers; 'none': the fixed price cost."""
    target_rate: Optional[float] = 0.3
    """Target fraction of layers skipped (rate_control 'dual', and the selection rule)."""
    dual_lr: float = 0.05
    """Step size of the dual ascent on the layer price."""
    cost_unit: str = "layers"
    """What the price c is paid per. 'layers': every executed layer costs c (eq. 9), and the rate counts layers.
    'tokens': a layer executed on an input of T tokens costs c T / T_fit (T_fit the fit split's mean), and the
    rate, the dual price and the selection rule count token-layers: the work a layer does on that input,
    which is what its time is about proportional to on a CPU. Skipping then goes where it saves time: planners
    paid per layer learn to skip more on short inputs (RTE: Spearman 0.55-0.69 between an input's tokens and
    its layers, benchmarks/results/planner_cost_tradeoff.md), where a skipped layer saves least. Not with
    budget_range."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (path entropy / L, nats per decision), decayed linearly to 0."""
    budget_range: Optional[tuple] = None
    """[choice] One model for every speed: train price-conditioned planners (they read the layer price c as
    an input, :class:`~dpbert_rl.model.planner.Planners`) over prices drawn uniformly from
    (c_min, c_max), one per input and step. The price is then set at inference (``dpbert-rl calibrate``);
    rate_control, target_rate and cost do not apply, and the planners are chosen by their mean greedy
    return over ``budget_grid`` prices spread over the range."""
    budget_grid: int = 5
    """Prices (evenly spaced over budget_range) at which price-conditioned planners are evaluated and chosen."""
    path_calibration: bool = True
    """Regression (STS-B) only: recalibrate each path's output by a per-path affine map fitted on the fit
    split's tree (``fit_path_calibration``), score the reward on the recalibrated outputs, and save the map
    with the model (applied at inference). Correlation scores each path's ranking, not its scale; without
    it a path that ranks well but off the label's scale is penalised, and mixing paths costs correlation."""
    threshold: float = 0.5
    """Hard-mode threshold used for the greedy paths (dual price, selection) and saved in the checkpoint."""
    select_tolerance: float = 0.05
    """Keep the best selection-split score among evaluations whose skip rate is at least
    target_rate - select_tolerance; without target_rate, the best greedy return lambda q - c |p|."""
    eval_steps: Optional[int] = None
    """Evaluate on the selection split every N steps (default: once per epoch)."""
    build_batch_size: int = 1
    """Inputs per batch when a cache is built (1: an input's tree is already a batch of up to 2^(L-1) rows
    per layer call; more inputs per batch only add padding)."""
    score_dev: bool = True
    """Score the chosen model on dev once, with the live model in hard mode (reported, chooses nothing)."""
    seed: int = 42
    device: str = "cpu"
    """Device for building caches (training runs on the CPU)."""
    progress: bool = True

    def validate(self) -> None:
        # the numeric checks every stage shares (lr > 0, lambda and c >= 0, whole step counts >= 1, finite
        # numbers); the length None means "the checkpoint's", checked against the backbone at load
        check_config_numbers(replace(self, max_seq_length=self.max_seq_length or 128))
        check_features(self.planner_features)
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; expected one of {REWARDS}")
        if self.rate_control not in ("dual", "none"):
            raise ValueError(f"rate_control must be 'dual' or 'none'; got {self.rate_control!r}")
        if self.cost_unit not in COST_UNITS:
            raise ValueError(f"cost_unit must be one of {COST_UNITS}; got {self.cost_unit!r}")
        if self.cost_unit != "layers" and self.budget_range is not None:
            raise ValueError("cost_unit 'tokens' is for planners of one rate; price-conditioned planners "
                             "(--budget-range) are paid per layer")
        if self.budget_range is not None:
            self.budget_range = check_budget_range(self.budget_range)
            check_number(self.budget_grid, "budget_grid (--budget-grid)", low=2, integer=True)
        elif self.rate_control == "dual" and self.target_rate is None:
            raise ValueError("rate_control 'dual' needs a target_rate")
        if self.target_rate is not None:
            check_rate(self.target_rate)
        if self.batch_size <= 0 or self.lr <= 0 or self.dual_lr <= 0 or self.entropy_coef < 0:
            raise ValueError("batch_size, lr and dual_lr must be positive and entropy_coef >= 0")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1); got {self.threshold}")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError(f"epochs must be positive; got {self.epochs}")


def evaluate_tree(planners: Planners, tree: PathTree, task, cfg: ExactConfig, price: float,
                  index: Optional[dict] = None, weights: Optional[np.ndarray] = None) -> dict:
    """Greedy paths of ``planners`` on a cached split: score, layers, skip rate, distinct paths, and the
    mean greedy return ``lambda q - price |p|``. With ``weights`` (each input's price factor, ``T / T_fit``
    for ``cost_unit`` 'tokens'), the price of input n is ``price * weights[n]`` and ``token_skip_rate`` is
    the skipped fraction of its token-layers."""
    index = index or tree_index(tree.num_layers)
    raw = torch.from_numpy(np.array(tree.raw(planners.features), dtype=np.float32))
    with torch.no_grad():
        chosen = greedy_paths(planners, raw, cfg.threshold, price if planners.conditioned else None).numpy()
    rows = np.arange(tree.num_inputs)
    run = {"predictions": tree.predictions[rows, chosen], "labels": np.asarray(tree.labels),
           "actions": paths(tree.num_layers).numpy()[chosen]}
    res = score_run(task, run)
    q = final_reward(cfg.reward, torch.from_numpy(np.asarray(tree.losses[rows, chosen])),
                     torch.from_numpy(run["predictions"]), torch.from_numpy(run["labels"]), tree.regression)
    layers = torch.as_tensor(index["path_layers"][chosen])
    w = torch.ones(len(rows), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    res["greedy_return"] = float((cfg.lam * q - price * w * layers).mean())
    if weights is not None:
        res["token_skip_rate"] = 1.0 - executed_fraction(layers, tree.num_layers, w)
    return res


def token_weights(tree: PathTree, model: DPBert, task: GlueTask, split: str, cfg: ExactConfig, max_len: int,
                  mean_tokens: Optional[float] = None) -> tuple:
    """``(weights, mean)``: each tree input's tokens over ``mean_tokens`` (default: their own mean), read
    from the split as the tree was built from it (the first ``max_samples`` inputs, tokenised to
    ``max_len``), and the mean used."""
    n = cfg.max_train_samples if split == "fit" else cfg.max_eval_samples
    ds = tokenize(load_split(task, split, cfg.data_dir, n), model.tokenizer, max_len)
    lengths = np.array([len(ids) for ids in ds["input_ids"]], dtype=np.float64)[np.asarray(tree.indices)]
    if len(lengths) != tree.num_inputs:
        raise TrainingError(f"[exact] the {split} split holds {len(lengths)} inputs but its path tree "
                            f"{tree.num_inputs}: the cache is not of this data")
    mean = float(lengths.mean()) if mean_tokens is None else float(mean_tokens)
    return lengths / mean, mean


class RunLog:
    """The scalars of a run, to TensorBoard (``<output_dir>/tb``) and to ``metrics.jsonl`` alike."""

    def __init__(self, out_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)
        self.metrics = open(out_dir / "metrics.jsonl", "a")

    def __call__(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        self.writer.close()
        self.metrics.close()


def train_exact(checkpoint: str, cfg: Optional[ExactConfig] = None) -> Path:
    """Train the planners of a frozen checkpoint by gradient ascent on the exact expected reward.

    Reads the ``fit`` split's path tree (built once, :func:`tree_cache`), chooses the planners on the
    ``select`` split's tree (never dev), and writes ``<output_dir>/model``: a normal DPBert checkpoint
    (the checkpoint's backbone and head, the trained planners with their statistics, the threshold),
    with ``selection.json`` and ``DONE`` (the dev score, measured once by the live model). Also
    ``config.json``, ``metrics.jsonl`` and TensorBoard events (``charts/...``, ``losses/...``,
    ``eval/...``) in ``<output_dir>/tb``. A finished run (``model/DONE``) is not run again.
    """
    cfg = cfg or ExactConfig()
    cfg.validate()
    out_dir = Path(cfg.output_dir)
    same = dict(ignore=_EXACT_BOOKKEEPING, resolved=frozenset({"task", "max_seq_length"}))
    if stage_done(out_dir):  # reused as it is: no write access or lock needed
        check_same_run("exact", cfg, str(checkpoint), out_dir, **same)
        _check_calibration_setting(out_dir, cfg)
        print(f"[exact] already complete: {out_dir / 'model'}")
        return out_dir / "model"
    with stage_dir(out_dir, "exact", init=checkpoint):
        # an unfinished run restarts from step 0: its settings may change, but it must be an exact stage's
        check_same_run("exact", cfg, str(checkpoint), out_dir, ignore={"init", *asdict(cfg)})
        if stage_done(out_dir):
            print(f"[exact] already complete: {out_dir / 'model'}")
            return out_dir / "model"
        return _train_exact(checkpoint, cfg, out_dir)


def _check_calibration_setting(out_dir: Path, cfg: ExactConfig) -> None:
    """A finished regression run from before the per-path recalibration existed (its config has no
    ``path_calibration``) ran without it: not the run ``cfg`` asks for when it asks for one."""
    saved = json.loads((out_dir / "config.json").read_text())
    task = saved.get("task")
    if "path_calibration" not in saved and cfg.path_calibration and task and get_task(task).is_regression:
        raise TrainingError(f"[exact] {out_dir} holds a {task} run finished without the per-path recalibration (it "
                            "predates it); use another --output-dir, or --no-path-calibration to reuse it")


def _train_exact(checkpoint: str, cfg: ExactConfig, out_dir: Path) -> Path:
    t_start = time.time()
    model_dir = out_dir / "model"
    model, task, max_len = load_frozen(checkpoint, cfg)
    torch.manual_seed(cfg.seed)
    fp = checkpoint_fingerprint(checkpoint) if Path(checkpoint, "dpbert.json").is_file() else None
    fit, select = (tree_cache(model, task.name, split, cfg.data_dir, n, max_len, cfg.planner_features,
                              cfg.cache_dir, batch_size=cfg.build_batch_size, device=cfg.device,
                              progress=cfg.progress, fingerprint=fp, mmap=False)
                   for split, n in (("fit", cfg.max_train_samples), ("select", cfg.max_eval_samples)))
    model.to("cpu")
    fit, select = recalibrate(model, fit, select, cfg)
    planners = exact_planners(model, fit, cfg)
    weights, mean_tokens = None, None
    if cfg.cost_unit == "tokens":  # each input's price factor T / T_fit, on both splits
        w_fit, mean_tokens = token_weights(fit, model, task, "fit", cfg, max_len)
        weights = {"fit": w_fit, "select": token_weights(select, model, task, "select", cfg, max_len, mean_tokens)[0]}

    out_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = math.ceil(fit.num_inputs / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    resolved = {"stage": "exact", "init": str(checkpoint), **asdict(cfg), "max_seq_length": max_len,
                "task": task.name, "fit_examples": fit.num_inputs, "select_examples": select.num_inputs,
                "steps_per_epoch": steps_per_epoch, "total_steps": total, "fit_mean_tokens": mean_tokens,
                "caches": {"fit": fit.meta.get("key"), "select": select.meta.get("key")}}
    (out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    # the stage restarts from step 0 after a kill (a step is array lookups): drop what the killed run logged
    truncate_metrics(out_dir / "metrics.jsonl", 0)
    log = RunLog(out_dir, purge_step=1)
    t0 = time.time()
    best, step, price = ascend(planners, fit, select, task, cfg, total, cfg.eval_steps or steps_per_epoch, log,
                               weights)
    seconds = time.time() - t0

    # ---- the chosen planners into a normal checkpoint; dev once, live
    note = None
    if best["state"] is None:
        best.update(step=step, state=copy.deepcopy(planners.state_dict()))
        note = "last (no evaluation met the skip-rate rule)"
    planners.load_state_dict(best["state"])
    planners.requires_grad_(False)
    bad = nonfinite(planners.named_parameters())
    if bad:
        raise TrainingError(f"[exact] the chosen planners hold non-finite values ({', '.join(bad)}); nothing saved. "
                            "Check the path-tree cache's features and the settings (--lr, --planner-init-bias)")
    # select_price: the layer price at the chosen step (the last one's when none met the rule), where a second fit of
    # these planners starts (pipeline.carried_price); price: the final one (price-conditioned planners: their own)
    chosen_price = price if note else best["price"]
    save_atomic(model, model_dir, extra={"step": best["step"], "select": best["res"], "note": note, "price": price,
                                         **({"select_price": float(chosen_price)} if cfg.budget_range is None else {})})
    done = {"best_select": best["res"]["score"] if best["res"] else None, "best_step": best["step"],
            "steps": step, "train_seconds": seconds, "seconds": time.time() - t_start}  # seconds: caches included
    if cfg.score_dev:
        done["dev"] = score_dev_live(model_dir, task, cfg.data_dir, cfg.max_eval_samples, max_len)
        log({"eval/dev_score": done["dev"]["score"]}, step)
        print(f"[exact] chosen model (step {best['step']}): dev {task.metric} {done['dev']['score']:.2f}, "
              f"layers {done['dev']['layers_executed_mean']:.2f}/{model.num_layers}")
    (model_dir / DONE_FILE).write_text(json.dumps(done))
    log.close()
    return model_dir


def load_frozen(checkpoint: str, cfg: ExactConfig) -> tuple:
    """The checkpoint whose backbone stays frozen, its task and sequence length, checked against ``cfg``.

    Returns ``(model, task, max_seq_length)``; the model's threshold and task info are set from ``cfg``."""
    if not Path(checkpoint, "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint!r}: expected a fine-tuned dpbert_rl model/ directory")
    model = DPBert.load(checkpoint)
    check_tree_size(model.num_layers, checkpoint)  # before any data is read or cache built
    if not (cfg.task or model.task_info.task):
        raise ValueError(f"{checkpoint} does not name its task; pass --task")
    task = get_task(cfg.task or model.task_info.task)
    if model.backbone.num_labels != task.num_labels:
        raise ValueError(f"checkpoint {checkpoint} has {model.backbone.num_labels} labels; task {task.name} needs "
                         f"{task.num_labels}")
    max_len = cfg.max_seq_length or model.task_info.max_seq_length
    check_max_seq_length(model, max_len, checkpoint)  # before any cache is built or step taken
    model.task_info = TaskInfo(task.name, task.display_names, max_len)
    model.threshold = cfg.threshold
    return model, task, max_len


def recalibrate(model: DPBert, fit: PathTree, select: PathTree, cfg: ExactConfig) -> tuple:
    """Regression with ``cfg.path_calibration``: fit the per-path recalibration on the fit tree, set it on
    ``model`` and return both trees with their predictions, losses and ``correct`` recalibrated (in memory).
    Otherwise the trees as they are, and the model without a recalibration (the trees hold the head's raw
    outputs, so one inherited from an earlier stage would no longer match)."""
    if not (fit.regression and cfg.path_calibration):
        model.set_path_calibration(None)
        return fit, select
    cal = fit_path_calibration(torch.from_numpy(np.asarray(fit.predictions)), torch.from_numpy(np.asarray(fit.labels)))
    model.set_path_calibration(cal)
    return calibrated_tree(fit, cal), calibrated_tree(select, cal)


def calibrated_tree(tree: PathTree, calibration: torch.Tensor) -> PathTree:
    """A copy of a regression tree whose per-path outputs are recalibrated (the arrays in memory; the cache on
    disk keeps the raw outputs): predictions, squared-error losses and ``|error| < 0.5``."""
    preds = torch.from_numpy(np.asarray(tree.predictions, dtype=np.float32))
    ids = torch.arange(preds.shape[1]).expand_as(preds)
    cal = apply_path_calibration(preds, ids, calibration).numpy()
    labels = np.asarray(tree.labels, dtype=np.float32)[:, None]
    return replace(tree, predictions=cal, losses=((cal - labels) ** 2).astype(np.float32),
                   correct=outcome_correct(cal, labels, True))


def exact_planners(model: DPBert, fit: PathTree, cfg: ExactConfig) -> Planners:
    """The planners to train: the checkpoint's, or fresh ones standardised on fit inputs."""
    own = model.planners
    if cfg.budget_range is not None:
        return conditioned_planners(model, fit, cfg)
    if cfg.fresh_planners or own.features != cfg.planner_features or not bool(own.stats_set):
        model.planners = Planners(model.num_layers, model.backbone.hidden_size, cfg.planner_init_bias,
                                  features=cfg.planner_features)
        stats = fit.feature_stats(cfg.planner_features, cfg.feature_stats_samples)
        model.planners.set_feature_stats(stats.pop("mean"), stats.pop("std"))
        warn_if_constant(stats)
    model.planners.requires_grad_(True)
    return model.planners


def ascend(planners: Planners, fit: PathTree, select: PathTree, task: GlueTask, cfg: ExactConfig, total: int,
           eval_steps: int, log: RunLog, weights: Optional[dict] = None) -> tuple:
    """The loop: gradient ascent on E[R] (+ entropy bonus) over the fit tree, the layer price by dual ascent,
    the planners chosen on the selection tree every ``eval_steps``. ``weights``: per split (``fit``,
    ``select``) each input's price factor (``cost_unit`` 'tokens'); the dual ascent then holds the executed
    fraction of token-layers at ``1 - target_rate``.

    Returns ``(best, steps, price)``: the best evaluation (``state``, ``step``, ``res``; ``state`` None when
    none met the rule), the steps taken and the final layer price."""
    from tqdm.auto import tqdm

    # the fixed parts of the objective: every path's outcome q, and the features
    index = tree_index(fit.num_layers)
    raw_fit = torch.from_numpy(np.array(fit.raw(cfg.planner_features), dtype=np.float32))
    losses = torch.from_numpy(np.asarray(fit.losses))  # (N, P)
    q_fit = final_reward(cfg.reward, losses, torch.from_numpy(np.asarray(fit.predictions)),
                         torch.from_numpy(np.asarray(fit.labels))[:, None].expand_as(losses), fit.regression)  # (N, P)
    N, L = fit.num_inputs, fit.num_layers
    optimizer = torch.optim.Adam(planners.parameters(), lr=cfg.lr)
    budget = cfg.budget_range
    dual = DualPrice(cfg.target_rate, cfg.dual_lr, init=cfg.cost) \
        if cfg.rate_control == "dual" and budget is None else None
    best = {"criterion": None, "step": None, "state": None, "res": None}

    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(total=total, desc=f"exact {task.name}", disable=not cfg.progress, dynamic_ncols=True)
    step, order = 0, np.empty(0, dtype=np.int64)
    while step < total:
        if len(order) == 0:
            order = rng.permutation(N)
        rows, order = torch.from_numpy(order[:cfg.batch_size]), order[cfg.batch_size:]
        price = dual.price if dual is not None else cfg.cost
        if budget is not None:  # one price per input, uniform over the range: every speed is trained
            price = torch.from_numpy(rng.uniform(budget[0], budget[1], len(rows)))
        w = None if weights is None else torch.from_numpy(weights["fit"][rows.numpy()])
        out = expected_return(planners, raw_fit[rows], q_fit[rows], price if w is None else price * w, cfg.lam, index)
        coef = cfg.entropy_coef * max(0.0, 1.0 - step / total)
        loss = -(out["expected_return"].mean() + coef * out["entropy"].mean() / L)
        if not torch.isfinite(loss):
            raise TrainingError(f"[exact] the objective is {loss.item()} at step {step + 1} (non-finite features in "
                                "the path-tree cache, or planners that diverged); stopped, nothing saved")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            greedy = greedy_paths(planners, raw_fit[rows], cfg.threshold, price if budget is not None else None)
            greedy_rate = executed_fraction(torch.as_tensor(index["path_layers"])[greedy], L, w)
        if dual is not None:
            dual.update(greedy_rate)
        step += 1
        bar.update(1)
        layers, entropy = out["expected_layers"].mean().item(), out["entropy"].mean().item() / L
        scalars = {"charts/expected_return": out["expected_return"].mean().item(), "charts/expected_layers": layers,
                   "charts/expected_skip_rate": 1.0 - layers / L, "charts/greedy_execute_rate": greedy_rate,
                   "charts/layer_price": float(torch.as_tensor(price).float().mean()), "losses/policy_loss": loss.item(), "losses/entropy": entropy,
                   "losses/entropy_bonus": coef * entropy}
        if step % 10 == 0 or step == total:
            log(scalars, step)
            bar.set_postfix({"E[R]": f"{scalars['charts/expected_return']:.3g}", "layers": f"{layers:.2f}"})
        if step % eval_steps == 0 or step == total:
            res = select_step(planners, select, task, cfg, price, index, step, best,
                              None if weights is None else weights["select"])
            log({"eval/select_score": res["score"], "eval/layers_executed": res["layers_executed_mean"],
                 "eval/skip_rate": res["skip_rate"], "eval/distinct_paths": res["distinct_paths"],
                 "eval/greedy_return": res["greedy_return"],
                 **({"eval/token_skip_rate": res["token_skip_rate"]} if "token_skip_rate" in res else {})}, step)
            bar.write(f"[exact] step {step}: selection {task.metric} {res['score']:.2f}, "
                      f"layers {res['layers_executed_mean']:.2f}/{L}")
    bar.close()
    final = dual.price if dual is not None else cfg.cost
    return best, step, float(planners.price) if budget is not None else final


def select_step(planners: Planners, select: PathTree, task: GlueTask, cfg: ExactConfig, price: float, index: dict,
                step: int, best: dict, weights: Optional[np.ndarray] = None) -> dict:
    """Score the planners on the selection tree and keep them in ``best`` when they beat it: the best score
    among evaluations that skip at least ``target_rate - select_tolerance`` (of the token-layers with
    ``weights``; without a target rate, the best greedy return)."""
    if cfg.budget_range is not None:
        res = evaluate_over_prices(planners, select, task, cfg, index)
        ok, crit = True, res["greedy_return"]
    elif cfg.target_rate is not None:
        res = evaluate_tree(planners, select, task, cfg, price, index, weights)
        rate = res["skip_rate"] if weights is None else res["token_skip_rate"]
        ok, crit = rate >= cfg.target_rate - cfg.select_tolerance, res["score"]
    else:
        res = evaluate_tree(planners, select, task, cfg, price, index, weights)
        ok, crit = True, res["greedy_return"]
    if ok and (best["criterion"] is None or crit > best["criterion"]):
        best.update(criterion=crit, step=step, state=copy.deepcopy(planners.state_dict()), res=res, price=price)
    return res


def budget_prices(cfg: ExactConfig) -> np.ndarray:
    """The ``budget_grid`` prices, evenly spaced over ``budget_range``, that price-conditioned planners are
    evaluated at."""
    lo, hi = cfg.budget_range
    return np.linspace(lo, hi, cfg.budget_grid)


def evaluate_over_prices(planners: Planners, tree: PathTree, task: GlueTask, cfg: ExactConfig,
                         index: Optional[dict] = None) -> dict:
    """Price-conditioned planners at every grid price (:func:`budget_prices`): the mean of each figure over
    the prices, and per price its ``score``, ``layers`` and ``greedy_return`` under ``by_price``."""
    runs = [(float(c), evaluate_tree(planners, tree, task, cfg, float(c), index)) for c in budget_prices(cfg)]
    keys = ("score", "layers_executed_mean", "skip_rate", "distinct_paths", "greedy_return")
    res = {k: float(np.mean([r[k] for _, r in runs])) for k in keys}
    res["by_price"] = [{"price": c, "score": r["score"], "layers": r["layers_executed_mean"],
                        "greedy_return": r["greedy_return"]} for c, r in runs]
    return res


def conditioned_planners(model: DPBert, fit: PathTree, cfg: ExactConfig) -> Planners:
    """Price-conditioned planners over ``cfg.budget_range``: their state part (``W``, ``b``) and statistics
    start from the checkpoint's planners when they read the same features (stage 2's), else fresh; the
    price part (``V``, ``u``) starts at zero."""
    own = model.planners
    planners = Planners(model.num_layers, model.backbone.hidden_size, cfg.planner_init_bias,
                        features=cfg.planner_features, budget=cfg.budget_range)
    if not cfg.fresh_planners and own.features == cfg.planner_features and bool(own.stats_set):
        with torch.no_grad():
            planners.weight.copy_(own.weight)
            planners.bias.copy_(own.bias)
        planners.set_feature_stats(own.feature_mean.clone(), own.feature_std.clone())
    else:
        stats = fit.feature_stats(cfg.planner_features, cfg.feature_stats_samples)
        planners.set_feature_stats(stats.pop("mean"), stats.pop("std"))
        warn_if_constant(stats)
    model.planners = planners
    planners.requires_grad_(True)
    return planners


def score_dev_live(model_dir, task, data_dir, max_samples, max_seq_length) -> dict:
    """The dev score of a saved checkpoint in hard mode, by the live model (reported, chooses nothing)."""
    model = DPBert.load(model_dir, require_planners=True)
    dev = tokenize(load_split(task, "dev", data_dir, max_samples), model.tokenizer, max_seq_length)
    res = evaluate_model(model, task, dev, collator(model.tokenizer), mode="hard")
    return {k: v for k, v in res.items() if isinstance(v, (int, float, str))}


__all__ = ["ExactConfig", "train_exact", "evaluate_tree", "evaluate_over_prices", "budget_prices", "score_dev_live"]
