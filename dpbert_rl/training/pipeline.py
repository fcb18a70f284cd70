"""The whole method in one call: stage 1 -> 2 -> 3 -> evaluation, each finished stage reused when re-run."""

from __future__ import annotations

import json
import math
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

from ..evaluation.latency import evaluate_checkpoint
from ..model.backbone import backbone_layers
from ..pathtree.oracle import MAX_TREE_LAYERS, check_tree_size
from .calibrate import calibrate_checkpoint
from .checkpoint import DONE_FILE
from .config import PipelineConfig, TrainConfig
from .exact import ExactConfig, train_exact
from .fixed_start import fixed_path_start
from .recalibrate import recalibrate_sampled
from .stages import train_stage


def exact_stage(cfg: TrainConfig, init: Path, out: Path, epochs: float = 20.0, lr: float = 1e-2,
                cache_dir: Optional[Path] = None, path_calibration: bool = True, cost_unit: str = "layers") -> Path:
    """Stage 3 'exact': the planners of ``init`` (a stage-2 model) trained on the exact expectation over the
    path tree of its frozen backbone (:func:`dpbert_rl.training.exact.train_exact`), with ``cfg``'s reward, rate
    control, features and selection rule. The path-tree caches go to ``cache_dir`` (default
    ``<out>/pathtree``; runs on the same backbone can share it, and the tree env can read it); ``cost_unit``: what the
    layer price is paid per (``ExactConfig.cost_unit``). Returns ``<out>/model``."""
    return train_exact(str(init), ExactConfig(
        task=cfg.task, data_dir=cfg.data_dir, output_dir=str(out),
        cache_dir=str(cache_dir or Path(out) / "pathtree"),
        max_seq_length=cfg.max_seq_length, max_steps=cfg.max_steps,
        max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
        planner_features=cfg.planner_features, feature_stats_samples=cfg.feature_stats_samples,
        lr=lr, epochs=epochs, cost=cfg.cost, lam=cfg.lam, reward=cfg.reward,
        rate_control=cfg.rate_control, target_rate=cfg.target_rate, dual_lr=cfg.dual_lr,
        entropy_coef=cfg.entropy_coef, select_tolerance=cfg.select_tolerance, seed=cfg.seed,
        path_calibration=path_calibration, cost_unit=cost_unit, progress=cfg.progress))


def planner_stage(kind: str, cfg: TrainConfig, init: Path, out: Path, epochs: float = 20.0, lr: float = 1e-2,
                  cache_dir: Optional[Path] = None, path_calibration: bool = True, cost_unit: str = "layers") -> Path:
    """Stage 3 on ``init``'s frozen backbone into ``out``: ``kind`` 'exact' (:func:`exact_stage`, with ``epochs``,
    ``lr``, ``cache_dir``, ``path_calibration``, ``cost_unit``) or 'sampled' (stage ``sampled``: REINFORCE of the planners on
    paths drawn from them, with ``cfg``'s epochs, batch size, samples and planner learning rate; it scales to
    any depth; with ``path_calibration``, a regression head's visited paths are then recalibrated,
    :func:`~dpbert_rl.training.recalibrate.recalibrate_sampled`). Returns ``<out>/model``."""
    if kind == "exact":
        return exact_stage(cfg, init, out, epochs, lr, cache_dir, path_calibration, cost_unit)
    if kind != "sampled":
        raise ValueError(f"unknown frozen-backbone stage 3 {kind!r}; expected 'exact' or 'sampled'")
    if cost_unit != "layers":
        raise ValueError(f"cost_unit {cost_unit!r} is for stage 3 'exact'; 'sampled' pays per layer")
    cfg = replace(cfg, output_dir=str(out))
    earlier = (Path(out) / "model" / DONE_FILE).is_file()  # finished before this call
    model = train_stage("sampled", cfg, init=str(init))
    # a regression head: the paths its planners take, recalibrated when the selection split gains
    recalibrate_sampled(model, cfg, path_calibration, earlier)
    return model


def planner_stage3(cfg: TrainConfig, init: Path, out: Path, epochs: float = 20.0, lr: float = 1e-2,
                   cache_dir: Optional[Path] = None, path_calibration: bool = True,
                   adapt: Optional[tuple] = None, kind: str = "exact", cost_unit: str = "layers") -> list:
    """Stage 3 of ``kind`` (:func:`planner_stage`) into ``out``, with one skip-aware alternation when ``adapt`` is
    ``(adapt_cfg, first_out)``: the stage on ``init``'s frozen backbone into ``first_out``, the backbone and head
    fine-tuned on those planners' paths (stage ``adapt``, ``adapt_cfg``), then the stage again on the adapted
    backbone (for 'exact', its new path tree) into ``out``. Returns the models written, the final one last."""
    trained = []
    if adapt is not None:
        adapt_cfg, first_out = adapt
        # a sampled fit's recalibration would be thrown away by adapt (the head moves): only the exact stage's
        # shapes its reward
        first = planner_stage(kind, cfg, init, first_out, epochs, lr, cache_dir,
                              path_calibration and kind == "exact", cost_unit)
        init = train_stage("adapt", adapt_cfg, init=str(first))
        trained += [first, init]
        cfg = carried_price(cfg, first, out)
    return trained + [planner_stage(kind, cfg, init, out, epochs, lr, cache_dir, path_calibration, cost_unit)]


def carried_price(cfg, first: Path, out: Path):
    """``cfg`` for the second fit of a skip-aware alternation (into ``out``): under ``rate_control`` 'dual' with a
    target rate, its starting layer price (``cost``) is the price at which the first fit's chosen planners were
    selected (``select_price`` in its ``selection.json``), the planners the backbone was then adapted to.
    Restarting at ``--cost`` instead, the price lagged the adapted planners' rate (MPNet, MRPC: the frozen fit
    had ended at 0.107; the second went negative while its planners skipped too much, then overshot to 9.7 of
    12 layers). A second fit already begun or finished in ``out`` keeps the price its ``config.json`` records (a
    run from before the carry is reused, not refused). Otherwise ``cfg`` unchanged (with a fixed price,
    ``cost`` is the price itself)."""
    if cfg.rate_control != "dual" or cfg.target_rate is None:
        return cfg
    recorded = Path(out) / "config.json"
    if recorded.is_file():
        cost = json.loads(recorded.read_text()).get("cost")
        return cfg if cost is None else replace(cfg, cost=float(cost))
    selection = Path(first) / "selection.json"
    price = json.loads(selection.read_text()).get("select_price") if selection.is_file() else None
    if price is None or not math.isfinite(price):
        return cfg
    return replace(cfg, cost=float(price))


def keep_alternation(first: Path, final: Path, cfg, out: Path) -> tuple:
    """The skip-aware alternation (first fit, adapt, second fit) kept only when its final model beats the first
    fit's on the selection split, each with its knob set so that it skips ``cfg.target_rate`` of the layers there
    (:func:`~dpbert_rl.training.calibrate.selection_at_rate`): a choice on the selection split, made before dev is
    scored. (On MPNet STS-B the backbone adapted to the first fit's 3.7-layer paths scored 2-4 on the selection
    split and its second fit ran every layer.) The outcome is kept in ``<out>/alternation.json`` and read back by a
    re-run with the same target. Returns ``(model chosen, outcome)``."""
    from .calibrate import selection_at_rate

    record = Path(out) / "alternation.json"
    n = getattr(cfg, "calibration_samples", 1000)
    # the same comparison: the same target and inputs, the same two models (their stage folders and DONE records)
    key = {"target_rate": cfg.target_rate, "requested_examples": n,
           "models": [[Path(m).parent.name, (Path(m) / DONE_FILE).read_text()] for m in (first, final)]}
    if record.is_file():
        outcome = json.loads(record.read_text())
        if all(outcome.get(k) == v for k, v in key.items()):
            return Path(out) / Path(*Path(outcome["chosen"]).parts[-2:]), outcome  # inside this run, wherever moved
    a, b = selection_at_rate(first, cfg, n), selection_at_rate(final, cfg, n)
    kept = b["score"] >= a["score"]
    chosen = final if kept else first
    outcome = {"first": {**a, "checkpoint": str(first)}, "final": {**b, "checkpoint": str(final)}, "kept": kept,
               "chosen": str(chosen), **key}
    print(f"[alternation] selection score at skip rate {cfg.target_rate:g}: first fit {a['score']:.2f}, after adapt "
          f"{b['score']:.2f}: {'kept' if kept else 'not kept, the first fit is the final model'}")
    record.write_text(json.dumps(outcome, indent=2))
    return chosen, outcome


def stage3_for(stage3: str, num_layers: int) -> str:
    """'auto' is 'exact' when a ``num_layers``-layer path tree can be walked
    (:data:`~dpbert_rl.pathtree.oracle.MAX_TREE_LAYERS` layers or fewer) and 'sampled' above; others as given."""
    if stage3 != "auto":
        return stage3
    return "exact" if num_layers <= MAX_TREE_LAYERS else "sampled"


def resolve_stage3(stage3: str, backbone: str) -> str:
    """The pipeline's stage 3 for ``backbone`` (:func:`stage3_for`; its layers read from its config)."""
    return stage3 if stage3 != "auto" else stage3_for(stage3, backbone_layers(backbone))


def exact_stage_backbone(run_dir, stage: str = "stage3_exact") -> Path:
    """The checkpoint whose frozen backbone a pipeline run's final exact stage (``run_dir/stage3_exact``) walked:
    the adapted backbone (``stage3_adapt/model``) under ``--skip-aware adapt``, stage 2's otherwise, as that stage's
    ``config.json`` records it (``init``, read inside ``run_dir`` so that a moved run still resolves). Whatever
    replays that stage's paths (its path trees, the fixed-path frontier, the agents' env) must use this one.
    ``stage``: another stage folder of the run, e.g. ``stage3_exact_frozen`` where the pipeline kept the first fit."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / stage / "config.json"
    if not cfg_path.is_file():
        what = "exact stage 3" if stage == "stage3_exact" else stage
        raise FileNotFoundError(f"{cfg_path}: no {what} in this pipeline run")
    init = json.loads(cfg_path.read_text()).get("init")
    if not init:
        raise ValueError(f"{cfg_path}: records no 'init' (the checkpoint the stage started from)")
    backbone = run_dir / Path(*Path(init).parts[-2:])  # <stage>/model, inside this run
    if not (backbone / DONE_FILE).is_file():
        raise FileNotFoundError(f"{cfg_path}: its init {init!r} is not a finished model in {run_dir} "
                                f"(looked for {backbone / DONE_FILE})")
    return backbone


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Stage 1 -> 2 -> 3 -> evaluation; each finished stage is reused when re-run.

    Returns the evaluation report (also written to ``<output_dir>/report.json``).
    """
    cfg = replace(cfg, stage3=resolve_stage3(cfg.stage3, cfg.backbone))
    cfg.validate()  # with the checks of the resolved stage 3
    if cfg.stage3 == "exact":  # refuse now, not after hours of stages 1 and 2
        check_tree_size(backbone_layers(cfg.backbone), cfg.backbone)
    out = Path(cfg.output_dir)
    base = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    stage_cfg = lambda sub, **kw: replace(TrainConfig(**base), output_dir=str(out / sub), **kw)  # noqa: E731
    s1 = train_stage("finetune", stage_cfg("stage1_finetune", epochs=cfg.stage1_epochs))
    trained = [s1]
    start = s1
    if cfg.skip_aware == "layerdrop":  # the backbone sees random paths before the planners are fitted
        start = train_stage("layerdrop", stage_cfg("stage1_layerdrop", epochs=cfg.skip_aware_epochs,
                                                   lr=cfg.skip_aware_lr), init=str(s1))
        trained.append(start)
    s2 = train_stage("planner_init", stage_cfg("stage2_planner_init", epochs=cfg.stage2_epochs), init=str(start))
    trained.append(s2)
    start_record = None
    if cfg.planner_start == "fixed-path":  # stage 3 starts on the best fixed path at the target rate
        s2 = fixed_path_start(cfg, s2, out / "stage2_fixed_path", cfg.calibration_samples, cfg.planner_init_bias)
        trained.append(s2)
        done = json.loads((Path(s2) / DONE_FILE).read_text())
        start_record = {k: done.get(k) for k in ("path", "layers", "select_score", "full_select_score", "examples")}
    if cfg.stage3 in ("exact", "sampled"):
        # the final planners are always stage3_<kind>/model; with 'adapt' they are fitted on the adapted backbone
        # after a first fit on the frozen one (stage3_<kind>_frozen), whose paths the backbone is adapted to
        kind = cfg.stage3
        adapt = None
        if cfg.skip_aware == "adapt":
            adapt = (stage_cfg("stage3_adapt", epochs=cfg.skip_aware_epochs, lr=cfg.skip_aware_lr),
                     out / f"stage3_{kind}_frozen")
        s3_cfg = cfg if kind == "exact" else stage_cfg(f"stage3_{kind}", epochs=cfg.stage3_epochs,
                                                       batch_size=cfg.stage3_batch_size or cfg.batch_size,
                                                       eval_at_start=cfg.eval_at_start or cfg.planner_start == "fixed-path")
        *earlier, s3 = planner_stage3(s3_cfg, s2, out / f"stage3_{kind}", cfg.exact_epochs, cfg.exact_lr,
                                      path_calibration=cfg.path_calibration, adapt=adapt, kind=kind,
                                      cost_unit=cfg.cost_unit)
        trained += earlier
    else:
        s3 = train_stage("rl", stage_cfg("stage3_rl", epochs=cfg.stage3_epochs, lr=cfg.stage3_lr or cfg.lr,
                                         batch_size=cfg.stage3_batch_size or cfg.batch_size), init=str(s2))
    alternation, final = None, s3
    # both read the rate in layers: a run that counts token-layers (cost_unit 'tokens') keeps its own threshold
    calibrating = cfg.calibrate_threshold != "never" and cfg.target_rate is not None and cfg.cost_unit == "layers"
    if not calibrating:  # no choice made: no record of one (routing reads it)
        (out / "alternation.json").unlink(missing_ok=True)
    if cfg.skip_aware == "adapt" and cfg.stage3 in ("exact", "sampled") and calibrating:
        # compared at the asked rate, the one the model will then run
        s3, alternation = keep_alternation(out / f"stage3_{cfg.stage3}_frozen" / "model", s3, cfg, out)
    calibration = None
    if calibrating:  # the knob the alternation's comparison found for the model chosen is not searched for again
        side = alternation and alternation["final" if alternation["kept"] else "first"]
        solved = (side["value"], side["layers"]) if side and "layers" in side else None
        calibration = calibrate_checkpoint(s3, cfg, only_if_missed=cfg.calibrate_threshold == "auto", solved=solved)
    t_eval = time.time()
    report = evaluate_checkpoint(
        str(s3), baseline_checkpoint=str(s1), data_dir=cfg.data_dir, max_eval_samples=cfg.max_eval_samples,
        repeats=cfg.latency_repeats, latency_samples=cfg.latency_samples, threads=cfg.threads,
        batch_size=cfg.eval_batch_size, progress=cfg.progress,
        rate_on_inputs=cfg.target_rate if cfg.rate_on_eval_inputs else None,
    )
    report["train_examples"] = json.loads((Path(s1).parent / "config.json").read_text())["train_examples"]
    # training time of every stage (also when a finished stage was reused) plus this evaluation
    report["seconds"] = sum(json.loads((Path(s) / DONE_FILE).read_text())["seconds"] for s in (*trained, final)) \
        + (time.time() - t_eval)
    report["seed"] = cfg.seed
    report["calibration"] = calibration
    report["alternation"] = alternation
    report["fixed_path_start"] = start_record  # the path stage 3 started on, and its selection-split score
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
