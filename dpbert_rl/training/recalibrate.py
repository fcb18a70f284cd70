"""Per-path recalibration of a regression head where the path tree is not walked (stage 3 'sampled', 12 layers).

The exact stage fits ``y ~ a_p * prediction_p + b_p`` for all 2^L paths on the fit split's tree
(:func:`~dpbert_rl.model.objectives.fit_path_calibration`). Above 8 layers no tree is walked, but a trained
model runs only a few of its 4,096 paths: this fits the map on the paths its greedy planners take on the fit
split, one pair per path that at least ``min_inputs`` fit inputs take, one pooled pair for every other path.
The pipeline keeps it only when it raises the selection-split score (a choice on the selection split; dev is
then scored once, on the model kept).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data import collator, get_task
from ..evaluation.evaluate import run_dataset, score_run
from ..model.dpbert import DPBert
from ..model.objectives import RunningPathCalibration, apply_path_calibration, path_ids
from .checkpoint import DONE_FILE, stage_dir, swap_in
from .config import TrainConfig, TrainingError

_log = logging.getLogger(__name__)

#: fit inputs a path needs for a (scale, shift) pair of its own; the rest share one pooled pair
MIN_INPUTS = 20


@torch.no_grad()
def fit_visited_paths(model: DPBert, dataset, collate_fn, batch_size: int = 64, min_inputs: int = MIN_INPUTS) -> tuple:
    """The ``(2^L, 2)`` recalibration of ``model``'s greedy paths on ``dataset`` (labelled; the fit split): a
    least-squares pair for each path taken by at least ``min_inputs`` inputs, and the pair fitted on the inputs
    of all other paths (all inputs when those are fewer than ``min_inputs``) for every other path, unseen ones
    included. The head's raw outputs are read (an existing map is set aside while they are).

    Returns ``(table, info)``: ``info`` counts the paths with a pair of their own and the inputs on them."""
    if min_inputs < 2:
        raise ValueError(f"min_inputs must be at least 2 (a line needs two points); got {min_inputs}")
    saved, model.path_calibration = model.path_calibration, None
    try:
        run = run_dataset(model, dataset, collate_fn, batch_size, "hard")
    finally:
        model.path_calibration = saved
    ids = path_ids(torch.as_tensor(np.asarray(run["actions"])))
    fit = RunningPathCalibration(model.num_layers, min_inputs)  # the same fit, from one pass's sums
    fit.update(ids, torch.as_tensor(np.asarray(run["predictions"])), torch.as_tensor(np.asarray(run["labels"])))
    counts = fit.sums[:, 0]  # inputs per path, as the fit counted them
    own = counts >= min_inputs
    info = {"paths_visited": int((counts > 0).sum()), "paths_fitted": int(own.sum()),
            "inputs_on_fitted_paths": int(counts[own].sum()), "inputs": int(len(ids)), "min_inputs": min_inputs}
    return fit.table(), info


def recalibrated(run: dict, table: torch.Tensor) -> dict:
    """A :func:`~dpbert_rl.evaluation.evaluate.run_dataset` result of the head's raw outputs with each input's
    prediction mapped by its path's pair in ``table`` (what the model with that map predicts)."""
    preds = apply_path_calibration(torch.as_tensor(np.asarray(run["predictions"])),
                                   path_ids(torch.as_tensor(np.asarray(run["actions"]))), table)
    return {**run, "predictions": preds.numpy()}


def recalibrate_sampled(model_dir, cfg: TrainConfig, path_calibration: bool, earlier: bool) -> dict:
    """The pipeline's step after a sampled stage 3 (``model_dir`` = ``<stage>/model``, trained with ``cfg``):
    :func:`recalibrate_stage` with ``path_calibration``; ``earlier`` says the stage had finished before this
    call. A stage finished by a version without the recalibration (its ``selection.json`` has no
    ``select_price``) is reused as it is, with a warning: its model is not rewritten. A recalibrated model
    reused with ``path_calibration`` off is refused (it would not be the run asked for). Returns the outcome
    (``{}`` when none)."""
    if not get_task(cfg.task).is_regression:
        return {}
    model_dir = Path(model_dir)
    outcome = json.loads((model_dir / DONE_FILE).read_text()).get("path_calibration")
    if not path_calibration:
        if outcome and outcome.get("kept"):
            raise TrainingError(f"{model_dir}: holds planners whose paths were recalibrated (DONE, path_calibration); "
                                "without the recalibration this is another run: use another --output-dir")
        return {}
    if outcome is None and earlier:
        selection = model_dir / "selection.json"
        if not (selection.is_file() and "select_price" in json.loads(selection.read_text())):
            _log.warning("%s: finished by a version without the per-path recalibration; reused as it is", model_dir)
            return {}
    return recalibrate_stage(model_dir, cfg)


def recalibrate_stage(model_dir, cfg: TrainConfig, min_inputs: int = MIN_INPUTS) -> dict:
    """Fit :func:`fit_visited_paths` for a finished stage's regression model (``<stage>/model``, trained with
    ``cfg``), keep it when it raises the selection-split score over the model as saved (raw, or with the map the
    stage fitted on its draws), then score dev once on the model kept; the
    outcome goes into ``DONE`` (``path_calibration``; with a map kept, ``best_select`` is the recalibrated
    selection score, the earlier one and dev's beside it) and the model is rewritten in place only when kept
    (the folder swapped in whole, ``DONE`` and ``selection.json`` inside it), under the stage folder's lock. A
    model whose ``DONE`` already holds an outcome is left as it is. Returns the outcome; ``{}`` for a
    classifier."""
    from .stages import load_data, score_dev_once

    model_dir = Path(model_dir)
    task = get_task(cfg.task)
    if not task.is_regression:
        return {}
    with stage_dir(model_dir.parent, "sampled"):  # locked; an interrupted swap of the model finished first
        done = json.loads((model_dir / DONE_FILE).read_text())
        if "path_calibration" in done:
            return done["path_calibration"]
        model = DPBert.load(model_dir)
        own = model.path_calibration  # the map the stage fitted on its draws (online_path_calibration), or None
        model.set_path_calibration(None)
        data = load_data(cfg, model.tokenizer)
        collate = collator(model.tokenizer)
        # one pass over the selection split: a map changes no path, so the score with either map is read off the
        # same run of the raw outputs
        select = run_dataset(model, data["select"], collate, cfg.eval_batch_size, "hard")
        before = score_run(task, select if own is None else recalibrated(select, own))["score"]
        table, info = fit_visited_paths(model, data["train"], collate, cfg.eval_batch_size, min_inputs)
        model.set_path_calibration(table)
        after = score_run(task, recalibrated(select, table))["score"]
        kept = math.isfinite(after) and after > before
        outcome = {**info, "select_before": before, "select_after": after, "kept": kept}
        if kept:
            tmp = model_dir.with_name(model_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save(tmp)
            if (model_dir / "selection.json").is_file():
                shutil.copy2(model_dir / "selection.json", tmp / "selection.json")
            dev = score_dev_once(tmp, cfg, "hard")
            (tmp / DONE_FILE).write_text(json.dumps({
                **done, "best_select": after, "best_select_before_recalibration": done.get("best_select"),
                "dev": dev, "dev_before_recalibration": done.get("dev"), "path_calibration": outcome}))
            swap_in(tmp, model_dir)
        else:
            tmp_done = model_dir / (DONE_FILE + ".tmp")
            tmp_done.write_text(json.dumps({**done, "path_calibration": outcome}))
            tmp_done.replace(model_dir / DONE_FILE)
    return outcome


__all__ = ["MIN_INPUTS", "fit_visited_paths", "recalibrate_sampled", "recalibrate_stage", "recalibrated"]
