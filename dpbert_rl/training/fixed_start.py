"""Stage 3 started on the best fixed path (``PipelineConfig.planner_start`` 'fixed-path').

On MPNet-base (12 layers) a single fixed path of the adapted backbone scored above its trained planners on
SST-2 and MRPC dev (benchmarks/README.md, "The 12-layer regime"): the planners started from stage 2's gates,
nearly open everywhere, and REINFORCE did not find the path one backward elimination finds. Here the path is
found first, on the selection split's inputs (the stage-2 backbone frozen; labels read, as every choice made
there), at the number of layers the target rate asks for; the planners are set to take it on every input
(:meth:`~dpbert_rl.model.planner.Planners.set_fixed_path`), and stage 3 learns from that start what to read of
the state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..data import collator, get_task
from ..evaluation.diagnostics import fixed_path_cache, greedy_fixed_paths
from ..model.dpbert import DPBert
from ..model.objectives import check_rate
from .calibrate import selection_inputs
from .checkpoint import DONE_FILE, save_atomic, stage_dir, stage_done
from .config import TrainConfig, TrainingError

STAGE = "fixed_path_start"


def path_layers(num_layers: int, target_rate: float) -> int:
    """The layers a fixed path runs for ``target_rate``: ``L - round(rate * L)``, at least 1."""
    check_rate(target_rate)
    return max(1, num_layers - int(round(target_rate * num_layers)))


def fixed_path_start(cfg: TrainConfig, init, out, samples: int = 1000, margin: float = 2.0) -> Path:
    """Write ``<out>/model``: ``init`` (a stage-2 model) with planners that take, on every input, the best fixed
    path at :func:`path_layers` layers, found by backward elimination
    (:func:`~dpbert_rl.evaluation.diagnostics.greedy_fixed_paths`) on the first ``samples`` inputs of the
    selection split. Each scored path is kept in ``<out>/fixed_paths.npz`` as it goes, so a stopped search
    resumes; a finished stage is reused. ``selection.json`` and ``DONE`` record the path, its selection score,
    the full model's and the elimination's order. Returns ``<out>/model``."""
    out = Path(out)
    model_dir = out / "model"
    if cfg.target_rate is None:
        raise ValueError("a fixed-path start needs a target rate (--target-rate): it picks the path's length")
    # what the path depends on: a finished start made with other settings is refused, not reused
    settings = {"init": str(init), "target_rate": cfg.target_rate, "requested_examples": samples, "seed": cfg.seed,
                "task": cfg.task}
    if stage_done(out):
        done = json.loads((model_dir / DONE_FILE).read_text())
        # (a start written before these were recorded, at f06d19b, is reused: nothing to compare)
        other = {k: (done[k], v) for k, v in settings.items() if k in done and done[k] != v}
        if other:
            raise TrainingError(f"[{STAGE}] {out} holds a start made with other settings ("
                                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in other.items())
                                + "); use another --output-dir, or delete that directory to start over")
        return model_dir
    with stage_dir(out, STAGE, init):
        t0 = time.time()
        model = DPBert.load(init, require_planners=True).eval()
        if not bool(model.planners.stats_set):  # stage 3 would refit their statistics: not stage 2's planners
            raise ValueError(f"{init}: its planners have no feature statistics; start from a stage-2 model")
        L = model.num_layers
        keep = path_layers(L, cfg.target_rate)
        ds = selection_inputs(model, cfg, samples)  # tokenised once; the elimination batches them itself
        cache = fixed_path_cache(out / "fixed_paths.npz", model, ds, cfg.seed)
        found = greedy_fixed_paths(model, get_task(cfg.task), ds, collator(model.tokenizer), cfg.eval_batch_size,
                                   min_layers=keep, progress=cfg.progress, cache=cache)
        path, score, _ = found[keep]
        model.planners.set_fixed_path(path, margin)
        record = {**settings, "path": [int(a) for a in path], "layers": keep, "select_score": score,
                  "full_select_score": found[L][1], "examples": len(ds), "margin": margin,
                  "elimination": [[k, [int(a) for a in p], s] for k, (p, s, _) in sorted(found.items(), reverse=True)]}
        save_atomic(model, model_dir, extra=record)
        (model_dir / DONE_FILE).write_text(json.dumps({"seconds": time.time() - t0, **record}))
        print(f"[fixed-path start] {keep} of {L} layers, path {''.join(map(str, record['path']))}: selection score "
              f"{score:.2f} (all {L}: {found[L][1]:.2f}) on {len(ds)} inputs")
    return model_dir
