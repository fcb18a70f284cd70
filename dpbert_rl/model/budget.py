"""One model, any speed: the budget knob of a DPBERT checkpoint, and its curve on the inputs it will serve.

What moves the compute a checkpoint spends is its **knob**:

==============  ===========================================================================================
planners        knob
==============  ===========================================================================================
price-          the layer price ``c`` the planners read (:class:`~dpbert_rl.model.planner.Planners` with a
conditioned     budget range): trained for every price in the range, so every speed is one they learned
fixed-rate      the hard-mode threshold of eq. (5): the planners were trained for one rate; other rates come
                from moving the threshold they were not trained for
==============  ===========================================================================================

A **budget** is the fraction of the ``L`` layers to run on average (1 = the full model; a speed-up ``s``
asks for ``1 / s`` in ideal terms). How many layers a knob setting runs depends on the inputs, not their
labels, so the curve budget -> knob is measured on unlabeled inputs (:func:`budget_curve`, ``dpbert-rl
calibrate --inputs``), stored in ``dpbert.json`` (``budget_table``), and read back at inference
(:func:`knob_for_budget`): ``pipeline(..., model_kwargs={"budget": 0.6})``, ``predict --budget``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .backbone import eval_mode

CURVE_POINTS = 25


def knob_name(model) -> str:
    """``price`` for price-conditioned planners, else ``threshold``."""
    return "price" if model.planners.conditioned else "threshold"


def get_knob(model) -> float:
    return float(model.planners.price) if model.planners.conditioned else float(model.threshold)


def set_knob(model, value: float) -> None:
    if model.planners.conditioned:
        model.planners.set_price(float(value))
    else:
        model.threshold = float(value)


@contextlib.contextmanager
def knob_at(model, value: Optional[float]):
    """Run with the knob at ``value`` (None: as it is), then put it back."""
    if value is None:
        yield model
        return
    old = get_knob(model)
    set_knob(model, value)
    try:
        yield model
    finally:
        set_knob(model, old)


def knob_grid(model, n: int = CURVE_POINTS) -> np.ndarray:
    """Knob values from the most compute to the least: prices evenly spaced over the trained range widened by
    its width on either side; thresholds spread evenly in logit over (0.0025, 0.9975)."""
    if model.planners.conditioned:
        lo, hi = model.planners.budget
        return np.linspace(lo - (hi - lo), hi + (hi - lo), n)
    return 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, n)))


def encode_inputs(model, inputs: dict, max_seq_length: int, batch_size: int = 64) -> list:
    """Tokenised, padded batches of ``{"text_a", "text_b"}`` (no labels)."""
    from ..data import collator, encode

    enc = encode(model.tokenizer, inputs["text_a"], inputs["text_b"], max_seq_length)
    rows = [{k: enc[k][i] for k in enc} for i in range(len(inputs["text_a"]))]
    collate = collator(model.tokenizer)
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def mean_layers(model, batches: Sequence[dict], knob: Optional[float] = None) -> float:
    """Mean layers executed in hard mode over ``batches`` with the knob at ``knob``. Planners that read no input (a
    fixed path, :attr:`~dpbert_rl.model.planner.Planners.input_independent`) run the same path on every input, so
    for them one input is read (a NaN in another input's features, which would skip its layers, is not seen)."""
    if model.planners.input_independent:
        first = next(iter(batches), None)
        batches = [] if first is None else [{k: (v[:1] if torch.is_tensor(v) else v) for k, v in first.items()}]
    total, n = 0.0, 0
    with eval_mode(model):
        device = next(model.parameters()).device
        with knob_at(model, knob):
            for b in batches:
                out = model(b["input_ids"].to(device), b["attention_mask"].to(device),
                            b["token_type_ids"].to(device) if "token_type_ids" in b else None, mode="hard")
                total += float(out.layers_executed.float().sum())
                n += int(out.layers_executed.shape[0])
    return total / max(n, 1)


def budget_curve(model, batches: Sequence[dict], n: int = CURVE_POINTS) -> list:
    """``[[layers, knob], ...]`` over :func:`knob_grid`, layers made non-increasing along the grid (a
    bump is flattened so that the curve can be inverted)."""
    points = [[mean_layers(model, batches, float(k)), float(k)] for k in knob_grid(model, n)]
    for j in range(1, len(points)):  # the knob grid runs from most to least compute
        points[j][0] = min(points[j][0], points[j - 1][0])
    return points


def solve_knob(model, batches: Optional[Sequence[dict]], target_layers: float, iterations: int = 24,
               layers_at: Optional[Callable[[float], float]] = None, tol: float = 0.0,
               resolution: Optional[float] = None) -> tuple:
    """The knob whose mean layers on ``batches`` is closest to ``target_layers``, by bisection over the knob
    (the price, or the logit of the threshold); returns ``(knob, layers reached)``. ``layers_at(knob)``
    replaces the live passes over ``batches`` (e.g. a replay on a path tree). The bisection stops early at a knob
    within ``tol`` layers of the target, or once its bracket is narrower than ``resolution`` of the knob's range
    (default: 1e-4 when ``tol`` > 0, at most 14 passes where the layers jump, as on nearly deterministic planners,
    and no knob reaches ``tol``; 0 when ``tol`` is 0, so that a search asked for the closest knob runs its
    ``iterations``); each step is a pass over ``batches`` (:func:`mean_layers`: one input for planners that read
    none), and at 12 layers they cost."""
    if resolution is None:
        resolution = 1e-4 if tol > 0 else 0.0
    if not (0.0 <= resolution < 1.0):
        raise ValueError(f"resolution is a fraction of the knob's range in [0, 1); got {resolution!r}")
    layers_at = layers_at or (lambda knob: mean_layers(model, batches, knob))
    grid = knob_grid(model, 2)
    to_u, from_u = ((lambda c: c, lambda c: c) if model.planners.conditioned else
                    (lambda t: np.log(t / (1 - t)), lambda u: 1.0 / (1.0 + np.exp(-u))))
    lo, hi = float(to_u(grid[0])), float(to_u(grid[1]))  # lo: more compute, hi: less
    width = hi - lo
    best = None
    for _ in range(iterations):
        if hi - lo < resolution * width:
            break
        mid = (lo + hi) / 2
        knob = float(from_u(mid))
        layers = layers_at(knob)
        if best is None or abs(layers - target_layers) < abs(best[1] - target_layers):
            best = (knob, layers)
        if abs(layers - target_layers) <= tol:
            break
        if layers > target_layers:
            lo = mid
        else:
            hi = mid
    return best


def check_budget(budget: float) -> float:
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"budget must be a fraction of the layers in (0, 1] (1 = the full model); got {budget!r}")
    return float(budget)


def knob_for_budget(model, budget: float) -> float:
    """The knob that runs ``budget * L`` layers on average on the inputs the checkpoint was calibrated on
    (its ``budget_table``), by interpolation along the measured curve."""
    budget = check_budget(budget)
    table = model.budget_table
    if not table or table.get("knob") != knob_name(model):
        raise ValueError("this checkpoint has no budget curve: measure it on your inputs first, "
                         "`dpbert-rl calibrate CKPT --speedup S --inputs FILE` (or `--budget B`)")
    layers = np.array([p[0] for p in table["points"]], dtype=float)
    knobs = np.array([p[1] for p in table["points"]], dtype=float)
    u = knobs if table["knob"] == "price" else np.log(knobs / (1 - knobs))
    target = budget * model.num_layers
    # layers fall along the grid: interpolate on the reversed (increasing) arrays, clamped to the ends
    value = float(np.interp(target, layers[::-1], u[::-1]))
    return value if table["knob"] == "price" else float(1.0 / (1.0 + np.exp(-value)))


def apply_budget(model, budget: float) -> None:
    """Set the knob so that ``model`` runs ``budget`` of its layers on average on the inputs it was calibrated
    on; a budget of 1 runs every layer (threshold 0: every gate passes)."""
    budget = check_budget(budget)
    if budget >= 1.0:
        model.threshold = 0.0
        return
    set_knob(model, knob_for_budget(model, budget))
