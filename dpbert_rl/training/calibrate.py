"""The hard-mode threshold of eq. (5) set so that the greedy skip rate on the selection split is a target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..data import collator, load_split, tokenize
from ..evaluation.evaluate import run_dataset
from ..model.dpbert import DPBert
from ..model.objectives import check_rate
from .config import TrainConfig


@torch.no_grad()
def calibrate_threshold(model: DPBert, dataset, collate_fn, target_rate: float, batch_size: int = 64,
                        iterations: int = 14) -> tuple:
    """Bisection for the hard-mode threshold whose skip rate on ``dataset`` is ``target_rate``.

    Returns ``(threshold, skip_rate reached)``. Raising the threshold skips more at every layer."""
    check_rate(target_rate)

    def rate(t: float) -> float:
        return float(1.0 - run_dataset(model, dataset, collate_fn, batch_size, "hard", threshold=t)["actions"].mean())

    lo, hi = 0.0, 1.0
    best = (0.5, rate(0.5))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        r = rate(mid)
        if abs(r - target_rate) < abs(best[1] - target_rate):
            best = (mid, r)
        if r < target_rate:
            lo = mid
        else:
            hi = mid
    return best


def calibrate_checkpoint(model_dir, cfg: TrainConfig, samples: Optional[int] = None,
                         only_if_missed: bool = False, solved: Optional[tuple] = None) -> dict:
    """Set the knob of a trained checkpoint (the threshold; the price of price-conditioned planners) so that its
    greedy skip rate on the selection split's inputs is ``cfg.target_rate``, and save it in place with
    ``calibration.json``. Labels are never read.

    :param only_if_missed: leave the knob as it is when the rate there is already within
        ``cfg.select_tolerance`` of the target (``PipelineConfig.calibrate_threshold='auto'``).
    :param solved: ``(knob, mean layers)`` already found for this target on the same inputs
        (:func:`selection_at_rate`, as the pipeline's alternation choice does): no bisection again.
    :return: what was done: ``calibrated``, ``knob``, ``value``, the skip rate ``before`` and ``train_skip_rate``
        (reached; the key keeps its earlier name), ``target_rate``, ``examples``. A re-run on the same checkpoint
        with the same target and inputs reads ``calibration.json`` back instead of moving the knob again.
    """
    from ..model.budget import get_knob, knob_name, mean_layers, set_knob, solve_knob

    model_dir = Path(model_dir)
    model = DPBert.load(model_dir).eval()
    n = samples or getattr(cfg, "calibration_samples", 1000)
    record = model_dir / "calibration.json"
    if record.is_file():  # saved with the knob it set; a stage trained again replaces the directory, record and all
        info = json.loads(record.read_text())
        if (info.get("target_rate"), info.get("requested_examples"), info.get("only_if_missed")) == \
                (cfg.target_rate, n, only_if_missed):
            print(f"[calibration] reusing {record}")
            return info
    check_rate(cfg.target_rate)
    # calibration is a choice: it reads the held-out selection split's inputs, never dev and never a label
    ds, batches = _selection_batches(model, cfg, n)
    L = model.num_layers
    target_layers = (1.0 - cfg.target_rate) * L
    before = 1.0 - mean_layers(model, batches) / L
    info = {"knob": knob_name(model), "value_before": get_knob(model), "before": before,
            "target_rate": cfg.target_rate, "examples": len(ds), "requested_examples": n,
            "only_if_missed": only_if_missed}
    if only_if_missed and abs(before - cfg.target_rate) <= cfg.select_tolerance:
        info.update(calibrated=False, value=get_knob(model), train_skip_rate=before)
        print(f"[calibration] skip rate {before:.3f} on {len(ds)} selection inputs, within "
              f"{cfg.select_tolerance:g} of the target {cfg.target_rate:g}: {info['knob']} left at {info['value']:.4g}")
    else:
        # within 0.01 of the target rate: closer is the selection inputs' own noise
        knob, layers = solved or solve_knob(model, batches, target_layers, tol=0.01 * L)
        set_knob(model, knob)
        model.save(model_dir)
        info.update(calibrated=True, value=knob, train_skip_rate=1.0 - layers / L)
        print(f"[calibration] skip rate {before:.3f} -> {info['train_skip_rate']:.3f} (target {cfg.target_rate:g}) "
              f"on {len(ds)} selection inputs: {info['knob']} {info['value_before']:.4g} -> {knob:.4g}")
    if info["knob"] == "threshold":
        info["threshold"] = info["value"]
    record.write_text(json.dumps(info, indent=2))
    return info


def selection_inputs(model: DPBert, cfg: TrainConfig, n: int):
    """The first ``n`` inputs of the selection split (as every choice of a run reads it), tokenised."""
    return tokenize(load_split(cfg.task, "select", cfg.data_dir, n, shuffle_seed=cfg.seed + 1, bad_rows=cfg.bad_rows),
                    model.tokenizer, cfg.max_seq_length)


def _selection_batches(model: DPBert, cfg: TrainConfig, n: int) -> tuple:
    """:func:`selection_inputs` and their padded batches (labels in the batches, read only by a caller that
    scores)."""
    from torch.utils.data import DataLoader

    ds = selection_inputs(model, cfg, n)
    return ds, list(DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collator(model.tokenizer)))


@torch.no_grad()
def selection_at_rate(model_dir, cfg: TrainConfig, samples: Optional[int] = None) -> dict:
    """The selection-split score of a checkpoint with its knob set (in memory, nothing saved) so that its skip rate
    on those inputs is ``cfg.target_rate``: two models compared at the rate that was asked for, as they will run.
    Returns ``score``, ``knob``, ``value``, ``layers`` (mean, reached), ``skip_rate``, ``examples``."""
    from ..data import get_task
    from ..evaluation.evaluate import evaluate_model
    from ..model.budget import knob_name, set_knob, solve_knob

    check_rate(cfg.target_rate)
    model = DPBert.load(model_dir).eval()
    ds, batches = _selection_batches(model, cfg, samples or getattr(cfg, "calibration_samples", 1000))
    L = model.num_layers
    knob, layers = solve_knob(model, batches, (1.0 - cfg.target_rate) * L, tol=0.01 * L)
    set_knob(model, knob)
    res = evaluate_model(model, get_task(cfg.task), ds, collator(model.tokenizer), cfg.eval_batch_size, "hard")
    return {"score": res["score"], "knob": knob_name(model), "value": knob, "layers": layers,
            "skip_rate": res["skip_rate"], "examples": len(ds)}


def calibrate_budget(model_dir, inputs, target_layers: float, task: Optional[str] = None,
                     data_dir: Optional[str] = None, max_samples: Optional[int] = None,
                     source: Optional[str] = None) -> dict:
    """Set a checkpoint's knob so that it runs ``target_layers`` on average on ``inputs`` (no labels), measure
    its whole budget curve on them, and save both in place (``dpbert.json``'s ``budget_table`` and knob).

    :param inputs: ``{"text_a", "text_b"}`` (:func:`dpbert_rl.data.load_inputs`), or a file / split name
        that it reads for ``task`` (default: the checkpoint's).
    :return: what was reached: ``knob``, ``value``, ``layers_executed_mean``, ``speedup_ideal``, ...
    """
    from ..data import load_inputs
    from ..evaluation.evaluate import speedup_ideal
    from ..model.budget import budget_curve, encode_inputs, knob_name, set_knob, solve_knob

    model = DPBert.load(model_dir, require_planners=True).eval()
    L = model.num_layers
    if not 0 < target_layers <= L:
        raise ValueError(f"the target must lie in (0, {L}] layers; got {target_layers:g}")
    if not isinstance(inputs, dict):
        source = source or str(inputs)
        inputs = load_inputs(task or model.task_info.task, inputs, data_dir, max_samples)
    batches = encode_inputs(model, inputs, model.task_info.max_seq_length or 128)
    knob, reached = solve_knob(model, batches, target_layers)
    curve = budget_curve(model, batches)
    set_knob(model, knob)
    n = len(inputs["text_a"])
    model.budget_table = {"knob": knob_name(model), "points": curve, "inputs": source, "num_inputs": n,
                          "requested_layers": target_layers, "layers_executed_mean": reached, "value": knob}
    model.save(model_dir)
    info = {"knob": knob_name(model), "value": knob, "requested_layers": target_layers,
            "layers_executed_mean": reached, "speedup_ideal": speedup_ideal(reached, L), "num_layers": L,
            "inputs": source, "num_inputs": n}
    (Path(model_dir) / "calibration.json").write_text(json.dumps(info, indent=2))
    return info
