"""The three training stages of DPBERT and the DPBERT-soft ablation, in one loop on Accelerate.

============  ========  ==========================  ==========================================
stage         mode      trained                     objective
============  ========  ==========================  ==========================================
finetune      full      backbone + head             ``ell``                     (stage 1)
planner_init  soft      planners (backbone frozen)  ``ell`` [+ ``beta P``]      (stage 2)
rl            sample    backbone + head + planners  eq. (12): ``ell - sum (R_i-b_i) log pi + beta P``
soft          soft      backbone + head + planners  ``ell + beta P``            (DPBERT-soft)
layerdrop     path      backbone + head             ``ell`` on a random layer subset (LayerDrop)
============  ========  ==========================  ==========================================

Each stage reads the previous stage's checkpoint (``init``) and writes to its own directory::

    <output_dir>/config.json       the resolved configuration
    <output_dir>/metrics.jsonl     every logged scalar, one JSON object per line
    <output_dir>/tb/               TensorBoard events
    <output_dir>/checkpoint/       the latest resumable state (model, optimizer, scheduler, RNG)
    <output_dir>/model/            the stage's result (best on the selection split by the stage's criterion;
                                   dev is scored once, on that model, and written to model/DONE)

Training reads the ``fit`` part of the training file; checkpoints are chosen on the held-out
``select`` part (:func:`dpbert_rl.data.carve_selection`), never on dev.

Re-running the same command resumes from ``checkpoint/``; a stage whose ``model/`` is complete
is not run again. The same code runs on CPU, one GPU, or many with ``accelerate launch``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .backbone import DEFAULT_BACKBONE
from .checks import CheckpointError, NonFiniteError, check_config_numbers, check_max_seq_length, nonfinite, read_json
from .data import DataError, collator, get_task, load_split, tokenize
from .evaluate import evaluate_model
from .model import DPBert, TaskInfo
from .objectives import (BASELINES, RATE_CONTROLS, REWARDS, DualPrice, check_rate, dpbert_objective, final_reward,
                         reward_to_go, skip_penalty, skip_rate)
from .planner import FEATURES, Planners

STAGES = ("finetune", "planner_init", "rl", "soft", "layerdrop")
_STAGE_MODE = {"finetune": "full", "planner_init": "soft", "rl": "sample", "soft": "soft", "layerdrop": "path"}
DONE_FILE = "DONE"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a mismatched checkpoint)."""


@dataclass
class TrainConfig:
    """Everything one training stage needs. Defaults follow the paper unless marked [choice]."""

    task: str = "rte"
    """GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli or rte."""
    backbone: str = DEFAULT_BACKBONE
    """Starting point: 'minilm' (packaged all-MiniLM-L6-v2), a hub name, an HF checkpoint directory,
    or the model/ directory of an earlier stage."""
    data_dir: Optional[str] = None
    """Local GLUE directory (<dir>/RTE/train.tsv ...); default $GLUE_DIR, else the HF hub."""
    output_dir: str = "runs/dpbert"
    """Where config, metrics, TensorBoard events and checkpoints go."""
    max_seq_length: int = 128
    """Inputs are truncated to this many tokens; batches are padded only to their longest input."""
    max_train_samples: Optional[int] = None
    """Train on a seeded random subset of this size (quick runs, SST-2 on a CPU)."""
    max_eval_samples: Optional[int] = None
    """Score only the first N examples of the selection split and of dev."""
    batch_size: int = 32
    """Per-process training batch size (paper grid: 8, 16, 32)."""
    eval_batch_size: int = 64
    epochs: float = 5.0
    """Passes over the training data (the paper: 5 per stage)."""
    lr: float = 2e-5
    """AdamW learning rate of backbone and head (paper: 2e-5)."""
    planner_lr: float = 1e-3
    """[choice] AdamW learning rate of the planners. The paper uses one rate of 2e-5; linear planners
    trained from scratch need far more steps at that rate than a CPU budget allows."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps, then linear decay."""
    max_grad_norm: float = 1.0
    seed: int = 42
    cost: float = 1.0
    """c of eq. (9): the reward is -c for every executed layer. With rate_control 'dual' it is only the
    starting price of a layer, which dual ascent then moves."""
    lam: float = 5.0
    """lambda of eq. (9): weight of the outcome term in the reward (paper grid: 5, 20, 35, 50)."""
    reward: str = "correct"
    """[choice] The reward's outcome term: 'loss' (eq. 9, -lambda * task loss) or 'correct' (bounded:
    lambda * 1[correct]; lambda * (1 - tanh|error|) for regression). Under 'loss' the spread of the
    loss between inputs dwarfs the layer costs, and on a fine-tuned backbone skipping everything can
    win (README)."""
    rate_control: str = "dual"
    """[choice] How the skip rate is held at target_rate: 'dual' (a price per executed layer set by dual
    ascent, so that the greedy policy at threshold 0.5 hits the rate), 'penalty' (beta (S - r)^2 of
    eq. 11, the paper's) or 'none'."""
    dual_lr: float = 0.05
    """Step size of the dual ascent on the layer price (rate_control 'dual')."""
    planner_features: str = "mean"
    """[choice] What the planners read: 'cls' (the paper's [CLS] row), 'mean' (masked mean of the token
    states) or 'cls+mean'; standardised per layer with statistics of training inputs (README)."""
    feature_stats_samples: int = 1000
    """Training inputs used for the features' standardisation statistics (stage 2, or the first planner
    stage)."""
    samples: int = 4
    """[choice] Paths drawn per input in stage 3 (the 'loo' baseline's K); batch_size counts inputs."""
    normalise_advantages: bool = True
    """[choice] Scale stage 3's advantages to zero mean and unit variance per batch."""
    entropy_coef: float = 0.01
    """[choice] Weight of an entropy bonus on the planners in stage 3, decayed linearly to 0."""
    detach_planner_input: bool = True
    """[choice] In stage 3, keep the policy gradient out of the backbone: the planners read the states
    without passing gradients into them (the backbone still trains on the task loss)."""
    beta: float = 200.0
    """[choice] beta of eq. (12): weight of the skip-rate penalty. The paper's grid is 0.1-1.5, but
    with S of eq. (10) a mean over layers and examples, P is tiny (0.2^2 = 0.04): at 0.5 the planners
    stayed open, at 20 the REINFORCE term still pulled S away from r; 200 holds S at r (README)."""
    target_rate: Optional[float] = 0.3
    """r of eq. (11): target fraction of layers skipped, in [0, 1]; None drops the penalty."""
    baseline: str = "loo"
    """[choice] REINFORCE baseline b_i of eq. (12): none, batch-mean, self-critical, or loo (leave-one-out
    over the `samples` paths of the same input)."""
    init_penalty: bool = True
    """[choice] Add beta*P to the task loss in stage 2 as well, so that the planners start stage 3
    near the target rate. The paper's stage 2 uses the task loss alone (set False)."""
    planner_init_bias: float = 2.0
    """[choice] Initial planner bias (p = 0.88): gates start nearly open."""
    layerdrop: float = 0.3
    """Stage ``layerdrop`` only: probability that a layer is dropped for a training batch (the same
    layers for the whole batch: structured dropout, Fan et al. 2020)."""
    select_tolerance: float = 0.05
    """Stages with planners keep the best selection-split score among evaluations whose skip rate is at
    least target_rate - select_tolerance (else the last one)."""
    eval_steps: Optional[int] = None
    """Evaluate every N optimizer steps (default: evals_per_epoch times per epoch)."""
    evals_per_epoch: int = 1
    """Selection-split evaluations per epoch when eval_steps is not given."""
    save_steps: int = 50
    """Write the resumable checkpoint every N steps (and at every evaluation)."""
    logging_steps: int = 10
    max_steps: Optional[int] = None
    """Stop after this many steps in all (overrides epochs; for tests and smoke runs)."""
    bad_rows: str = "error"
    """What a malformed data row does: 'error' (stop, naming file and line) or 'skip' (training rows only:
    their line numbers go to stderr and config.json; a bad dev row is always an error)."""
    cpu: bool = False
    """Force the CPU even where a GPU is present."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        get_task(self.task)
        check_config_numbers(self)  # learning rates > 0; lambda, c, beta >= 0; step counts whole and >= 1; ...
        if self.target_rate is not None:
            check_rate(self.target_rate)
        if not 0.0 <= self.layerdrop < 1.0:
            raise ValueError(f"layerdrop must be in [0, 1); got {self.layerdrop}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; expected one of {BASELINES}")
        for name, allowed in (("reward", REWARDS), ("rate_control", RATE_CONTROLS), ("planner_features", FEATURES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")
        if self.baseline == "loo" and self.samples < 2:
            raise ValueError(f"baseline 'loo' needs samples >= 2; got {self.samples}")
        if self.samples < 1 or self.feature_stats_samples < 2:
            raise ValueError("samples must be >= 1 and feature_stats_samples >= 2")
        if self.entropy_coef < 0 or self.dual_lr <= 0:
            raise ValueError(f"entropy_coef must be >= 0 and dual_lr > 0; got {self.entropy_coef}, {self.dual_lr}")
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be 'error' or 'skip'; got {self.bad_rows!r}")
        for name in ("batch_size", "eval_batch_size", "save_steps", "logging_steps", "max_seq_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError(f"epochs must be positive; got {self.epochs}")


def is_checkpoint(path) -> bool:
    return (Path(path) / "config.json").is_file()


def stage_done(output_dir) -> bool:
    return (Path(output_dir) / "model" / DONE_FILE).is_file()


def build_model(cfg: TrainConfig, init: Optional[str] = None) -> DPBert:
    """The model a stage starts from: an earlier checkpoint, or a fresh DPBert on a backbone."""
    task = get_task(cfg.task)
    try:
        model = DPBert.from_source(init or cfg.backbone, task.num_labels, planner_init_bias=cfg.planner_init_bias)
    except ValueError as err:
        raise TrainingError(f"{err} (task {task.name})") from err
    model.task_info = TaskInfo(task.name, list(task.label_names) if task.label_names else None, cfg.max_seq_length)
    check_max_seq_length(model, cfg.max_seq_length, init or cfg.backbone)
    return model


def load_data(cfg: TrainConfig, tokenizer, splits=("train", "select")) -> dict:
    """Tokenised sets of ``cfg.task``: ``train`` is the ``fit`` part of the training file (a seeded
    subset of ``max_train_samples``), ``select`` the held-out selection split, ``dev`` the dev set; and
    under ``"skipped_rows"`` the training rows that ``--bad-rows skip`` dropped (dev rows are never
    skipped: a bad one is an error)."""
    task = get_task(cfg.task)
    out = {}
    for split in splits:
        n = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        skipped: list = []
        ds = load_split(task, "fit" if split == "train" else split, cfg.data_dir, max_samples=n,
                        shuffle_seed=cfg.seed if split == "train" else None, bad_rows=_bad_rows_for(cfg, split),
                        skipped=skipped)
        if split == "train":
            out["skipped_rows"] = {"count": len(skipped), "lines": [r["line"] for r in skipped]}
        out[split] = tokenize(ds, tokenizer, cfg.max_seq_length)
    return out


def _bad_rows_for(cfg: TrainConfig, split: str) -> str:
    """``--bad-rows`` applies to the rows of the training file (its fit and selection parts); dev is read
    strictly."""
    return cfg.bad_rows if split in ("train", "fit", "select") else "error"


def _flat_config(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


def _stage_loss(stage: str, cfg: TrainConfig, model, raw_model: DPBert, batch: dict, price: float = 1.0,
                progress: float = 0.0):
    """One forward pass of ``stage`` on ``batch``; returns (loss, output, logs).

    :param price: the cost of an executed layer in stage 3's reward (``cfg.cost``, or the dual price).
    :param progress: fraction of the stage done, for the entropy bonus's decay.
    """
    if stage == "rl" and cfg.samples > 1:  # K paths per input, rows grouped by input
        batch = {k: v.repeat_interleave(cfg.samples, 0) for k, v in batch.items()}
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch.get("token_type_ids"), labels=batch["labels"])
    if stage == "layerdrop":
        keep = (torch.rand(raw_model.num_layers) >= cfg.layerdrop).float()
        out = model(**inputs, mode="path", actions=keep.to(batch["input_ids"].device))
    else:
        out = model(**inputs, mode=_STAGE_MODE[stage])
    logs = {"losses/task_loss": out.loss.item()}
    if stage in ("finetune", "layerdrop"):
        if stage == "layerdrop":
            logs["charts/layers_executed"] = out.layers_executed.float().mean().item()
        return out.loss, out, logs
    with_penalty = cfg.target_rate is not None and (
        (stage == "planner_init" and cfg.init_penalty) or (stage != "planner_init" and cfg.rate_control == "penalty"))
    if stage in ("planner_init", "soft"):
        loss = out.loss
        if with_penalty:
            penalty = skip_penalty(out.probs, cfg.target_rate)
            loss = loss + cfg.beta * penalty
            logs["losses/penalty"] = penalty.item()
    else:  # rl: eq. (12)
        def outcome(o):
            return final_reward(cfg.reward, o.per_example_loss, raw_model.predict(o.logits), inputs["labels"],
                                raw_model.is_regression)

        greedy = None
        if cfg.baseline == "self-critical":
            with torch.no_grad():
                g = raw_model(**inputs, mode="hard")
            greedy = reward_to_go(g.actions, outcome(g), price, cfg.lam)
        parts = dpbert_objective(out.loss, out.log_probs, out.probs, out.actions, out.per_example_loss,
                                 price, cfg.lam, cfg.beta, cfg.target_rate if with_penalty else None, cfg.baseline,
                                 greedy, outcome=outcome(out), samples=cfg.samples, normalise=cfg.normalise_advantages,
                                 entropy=out.entropy, entropy_coef=cfg.entropy_coef * max(0.0, 1.0 - progress))
        loss = parts["loss"]
        logs.update({"losses/policy_loss": parts["policy_loss"].item(), "losses/penalty": parts["penalty"].item(),
                     "losses/entropy_bonus": parts["entropy_bonus"].item(), "charts/layer_price": price,
                     "charts/greedy_execute_rate": (out.probs >= 0.5).float().mean().item(),
                     "charts/episodic_return": parts["returns"][:, 0].mean().item()})
    logs.update({
        "losses/entropy": out.entropy.mean().item(),
        "charts/expected_skip_rate": skip_rate(out.probs).item(),
        "charts/skip_rate": 1.0 - out.actions.mean().item(),
        "charts/layers_executed": out.layers_executed.float().mean().item(),
    })
    return loss, out, logs


def train_stage(stage: str, cfg: TrainConfig, init: Optional[str] = None) -> Path:
    """Run one stage and return the directory of its resulting model (``<output_dir>/model``).

    :param stage: ``finetune``, ``planner_init``, ``rl`` or ``soft``.
    :param init: checkpoint to start from (the previous stage's ``model/``); default ``cfg.backbone``.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    cfg.validate()
    out_dir = Path(cfg.output_dir)
    model_dir, ckpt_dir = out_dir / "model", out_dir / "checkpoint"
    if stage_done(out_dir) or (ckpt_dir / "state.json").is_file():
        _check_same_run(stage, cfg, init, out_dir, resuming=not stage_done(out_dir))
    if stage_done(out_dir):
        print(f"[{stage}] already complete: {model_dir}")
        return model_dir
    if init is not None and not is_checkpoint(init):
        raise FileNotFoundError(f"no checkpoint at {init!r} to start stage {stage!r} from")

    accelerator = Accelerator(
        cpu=cfg.cpu, log_with="tensorboard", project_dir=str(out_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=stage != "finetune")],
    )
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    task = get_task(cfg.task)
    model = build_model(cfg, init)
    data = load_data(cfg, model.tokenizer)
    collate = collator(model.tokenizer)
    resuming = ckpt_dir.is_dir() and (ckpt_dir / "state.json").is_file()
    if stage in ("planner_init", "rl", "soft"):
        _prepare_planners(stage, cfg, model, data["train"], collate, fit_stats=not resuming)
    if stage == "rl" and not resuming:
        check_reward(model, data["train"], collate, cfg)

    # ---- what is trained
    train_backbone = stage != "planner_init"
    train_planners = stage not in ("finetune", "layerdrop")
    for p in model.backbone.parameters():
        p.requires_grad_(train_backbone)
    for p in model.planners.parameters():
        p.requires_grad_(train_planners)
    groups = []
    if train_backbone:
        decay = [p for n, p in model.backbone.named_parameters() if not any(k in n for k in ("bias", "LayerNorm", "layer_norm"))]
        no_decay = [p for n, p in model.backbone.named_parameters() if any(k in n for k in ("bias", "LayerNorm", "layer_norm"))]
        groups += [{"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                   {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0}]
    if train_planners:
        groups.append({"params": list(model.planners.parameters()), "lr": cfg.planner_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    world = accelerator.num_processes
    steps_per_epoch = math.ceil(len(data["train"]) / (cfg.batch_size * world))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw: DPBert = accelerator.unwrap_model(model)

    # ---- resume
    state = {"global_step": 0, "best": None, "best_step": None}
    if resuming:
        state = _load_checkpoint(ckpt_dir, raw, optimizer, scheduler)
        accelerator.print(f"[{stage}] resuming from {ckpt_dir} at step {state['global_step']}/{total_steps}")
    if main:  # a run killed between two checkpoints logged steps that it now runs again
        _truncate_metrics(out_dir / "metrics.jsonl", state["global_step"])
    dual = None
    if stage == "rl" and cfg.rate_control == "dual" and cfg.target_rate is not None:
        dual = DualPrice(cfg.target_rate, cfg.dual_lr, init=cfg.cost)
        if "dual" in state:
            dual.load_state_dict(state["dual"])
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"stage": stage, "init": init, **asdict(cfg), "num_processes": world,
                    "train_examples": len(data["train"]), "select_examples": len(data["select"]),
                    "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
        resolved["skipped_rows"] = data["skipped_rows"]  # --bad-rows skip: how many, and their lines
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    # purge_step: TensorBoard drops the events that a killed run logged past the step resumed from
    accelerator.init_trackers("tb", config=_flat_config(asdict(cfg)),
                              init_kwargs={"tensorboard": {"purge_step": state["global_step"] + 1}})

    eval_mode = "full" if stage in ("finetune", "layerdrop") else "hard"
    eval_steps = cfg.eval_steps or max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    L = raw.num_layers

    def evaluate_and_select(step: int) -> dict:
        res = evaluate_model(raw, task, data["select"], collate, cfg.eval_batch_size, eval_mode)
        ok = stage in ("finetune", "planner_init", "layerdrop") or cfg.target_rate is None or \
            res["skip_rate"] >= cfg.target_rate - cfg.select_tolerance
        if ok and (state["best"] is None or res["score"] > state["best"]):
            state["best"], state["best_step"] = res["score"], step
            if main:
                _save_atomic(raw, model_dir, extra={"step": step, "select": res})
        return res

    # ---- the loop
    bar = tqdm(total=total_steps, initial=state["global_step"], desc=f"{stage} {task.name}",
               disable=not (main and cfg.progress), dynamic_ncols=True)
    step = state["global_step"]
    t0 = time.time()
    metrics_file = out_dir / "metrics.jsonl"
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        order = np.random.RandomState(cfg.seed + epoch).permutation(len(data["train"])).tolist()
        # the loader gets its own generator: iterating it must not draw from the global RNG (which
        # drives dropout and action sampling), or a resumed run would diverge from an unbroken one
        loader = accelerator.prepare_data_loader(
            DataLoader(data["train"], batch_size=cfg.batch_size, sampler=order, collate_fn=collate,
                       generator=torch.Generator().manual_seed(cfg.seed + epoch)))
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        model.train()
        if not train_backbone:
            raw.backbone.eval()  # frozen backbone: no dropout, so stage 2 sees fixed features
        for batch in loader:
            price = dual.price if dual is not None else cfg.cost
            try:
                loss, out, logs = _stage_loss(stage, cfg, model, raw, batch, price, step / total_steps)
            except NonFiniteError as err:  # e.g. exploded planners: caught before torch.bernoulli fails on them
                raise TrainingError(f"[{stage}] {err} at step {step + 1}; stopped. {_recovery(ckpt_dir)}") from None
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"[{stage}] loss is {loss.item()} at step {step + 1}; stopped. {_recovery(ckpt_dir)}"
                )
            accelerator.backward(loss)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            _check_finite_parameters(stage, raw, step + 1, ckpt_dir)  # before any save: checkpoints stay good
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if dual is not None:  # the same price on every process: the mean rate over all of them
                rate = accelerator.reduce(torch.tensor(logs["charts/greedy_execute_rate"],
                                                       device=accelerator.device), "mean")
                dual.update(float(rate))
                state["dual"] = dual.state_dict()
            step += 1
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                logs["charts/lr"] = scheduler.get_last_lr()[0]
                logs["charts/epoch"] = step / steps_per_epoch
                _log(accelerator, metrics_file, logs, step, main)
                bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in logs.items()
                                 if k in ("losses/task_loss", "charts/layers_executed")})
            if step % eval_steps == 0 or step == total_steps:
                res = evaluate_and_select(step)
                diag = {"eval/select_score": res["score"], "eval/layers_executed": res["layers_executed_mean"],
                        "eval/skip_rate": res["skip_rate"], "eval/distinct_paths": res["distinct_paths"]}
                if res.get("mid_gate_fraction") is not None:
                    diag["eval/mid_gate_fraction"] = res["mid_gate_fraction"]
                _log(accelerator, metrics_file, diag, step, main)
                accelerator.print(f"[{stage}] step {step}: selection {task.metric} {res['score']:.2f}, "
                                  f"layers {res['layers_executed_mean']:.2f}/{L}")
            if (step % cfg.save_steps == 0 or step % eval_steps == 0) and step < total_steps and main:
                _save_checkpoint(ckpt_dir, raw, optimizer, scheduler, {**state, "global_step": step})
            if step >= total_steps:
                break
        accelerator.wait_for_everyone()
    bar.close()

    accelerator.wait_for_everyone()
    if main:
        if state["best"] is None:  # no evaluation met the selection rule: keep the last model
            _save_atomic(raw, model_dir, extra={"step": step, "note": "last (no evaluation met the skip-rate rule)"})
        seconds = time.time() - t0
        dev = score_dev_once(model_dir, cfg, eval_mode)  # scored once, on the chosen model; chooses nothing
        (model_dir / DONE_FILE).write_text(json.dumps({"best_select": state["best"], "best_step": state["best_step"],
                                                       "steps": step, "seconds": seconds, "dev": dev}))
        accelerator.print(f"[{stage}] chosen model (step {state['best_step']}): dev {task.metric} {dev['score']:.2f}")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it would tear down the process group
        tracker.finish()                  # that the pipeline's next stage still needs
    return model_dir


def _prepare_planners(stage: str, cfg: TrainConfig, model: DPBert, train_set, collate, fit_stats: bool) -> None:
    """Give a planner stage planners that read ``cfg.planner_features``, standardised with statistics of
    training inputs. Stage 2 (and any stage whose planners were never trained) starts them fresh; a
    later stage must continue planners of the same features."""
    p = model.planners
    fresh = stage == "planner_init" or not bool(p.stats_set)
    if not fresh and p.features != cfg.planner_features:
        raise TrainingError(f"[{stage}] the checkpoint's planners read {p.features!r} features; "
                            f"--planner-features {cfg.planner_features} needs a new stage 2")
    if fresh and (p.features != cfg.planner_features or stage == "planner_init"):
        model.planners = Planners(model.num_layers, model.backbone.hidden_size, cfg.planner_init_bias,
                                  features=cfg.planner_features).to(next(model.parameters()).device)
    model.detach_planner_input = cfg.detach_planner_input and stage in ("rl", "soft")
    if fresh and fit_stats:
        sample = train_set.select(range(min(cfg.feature_stats_samples, len(train_set))))
        stats = model.fit_feature_stats(sample, collate, cfg.eval_batch_size)
        warn_if_constant(stats)


def warn_if_constant(stats: dict, threshold: float = 1e-3) -> list:
    """Warn when the planner input hardly varies across inputs before some layers (``spread`` below
    ``threshold``): planners there can only learn a fixed decision. Returns those layers (1-based)."""
    import warnings

    from .diagnostics import check_spread

    flat = check_spread(stats, threshold)
    if flat:
        warnings.warn(
            f"the planners' {stats['features']!r} features are nearly constant across inputs before layer(s) "
            f"{flat} (variance / |mean|^2 < {threshold:g} on {stats['examples']} training inputs): planners there "
            "can only learn a fixed decision. Try --planner-features mean (see `dpbert-rl inspect`).",
            stacklevel=3)
    return flat


def check_reward(model: DPBert, dataset, collate, cfg: TrainConfig, samples: int = 256) -> dict:
    """Warn when skipping every layer beats the full model under stage 3's reward (see
    :func:`dpbert_rl.diagnostics.skip_all_check`)."""
    from .diagnostics import skip_all_check

    return skip_all_check(model, dataset, collate, cfg.reward, cfg.cost, cfg.lam, samples, cfg.eval_batch_size)


def score_dev_once(model_dir, cfg: TrainConfig, mode: str) -> dict:
    """The dev score of a stage's chosen model: reported, never used to choose anything."""
    model = DPBert.load(model_dir)
    dev = load_data(cfg, model.tokenizer, splits=("dev",))["dev"]
    res = evaluate_model(model, get_task(cfg.task), dev, collator(model.tokenizer), cfg.eval_batch_size, mode)
    return {k: v for k, v in res.items() if isinstance(v, (int, float, str))}


# fields that do not change what a stage computes (bookkeeping), and those a stage does not read
_BOOKKEEPING = {"output_dir", "progress", "eval_steps", "evals_per_epoch", "save_steps", "logging_steps", "cpu",
                "eval_batch_size", "select_tolerance"}
_RL_ONLY = {"cost", "lam", "baseline", "reward", "rate_control", "dual_lr", "samples", "normalise_advantages",
            "entropy_coef", "detach_planner_input"}
_NO_PLANNERS = _RL_ONLY | {"beta", "target_rate", "init_penalty", "planner_lr", "planner_init_bias", "planner_features",
                           "feature_stats_samples"}
_UNUSED = {"finetune": _NO_PLANNERS | {"layerdrop"},
           "layerdrop": _NO_PLANNERS,
           "planner_init": _RL_ONLY | {"lr", "layerdrop"},
           "soft": (_RL_ONLY - {"detach_planner_input"}) | {"init_penalty", "layerdrop"},
           "rl": {"init_penalty", "layerdrop"}}


# settings a resumed (unfinished) stage may change: after a NaN stop, re-run with a lower learning rate
RESUME_MAY_CHANGE = {"lr", "planner_lr"}


def _check_same_run(stage: str, cfg: TrainConfig, init: Optional[str], out_dir: Path, resuming: bool = False) -> None:
    """Refuse to resume or reuse a stage that was started with different settings (a resumed one may change
    its learning rates, :data:`RESUME_MAY_CHANGE`)."""
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = read_json(saved_path)
    ignore = _BOOKKEEPING | _UNUSED.get(stage, set()) | (RESUME_MAY_CHANGE if resuming else set())
    current = {"init": init, **asdict(cfg)}
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in ignore and k in saved and saved[k] != v}
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise TrainingError(f"[{stage}] {out_dir} holds a run with other settings ({detail}); "
                            "use another --output-dir, or delete that directory to start over")


def _log(accelerator, path: Path, logs: dict, step: int, main: bool) -> None:
    accelerator.log(logs, step=step)
    if main:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")


def _save_atomic(model: DPBert, path: Path, extra: Optional[dict] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if extra:
        (tmp / "selection.json").write_text(json.dumps(extra, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _save_checkpoint(path: Path, model: DPBert, optimizer, scheduler, state: dict) -> None:
    """Write the resumable state; the old one is replaced only once the new one is complete, and never
    by one whose parameters hold a NaN or an infinity."""
    bad = nonfinite(model.named_parameters())
    if bad:
        raise TrainingError(f"not saving a checkpoint at step {state.get('global_step')}: non-finite parameters "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). {_recovery(path)}")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _load_checkpoint(path: Path, model: DPBert, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``path``; the learning rates configured now
    replace the saved ones (a resume may lower them). A damaged file is one error naming it."""
    configured = [g["initial_lr"] for g in optimizer.param_groups]
    try:
        state = read_json(path / "state.json")
        saved = DPBert.load(path)
        model.load_state_dict(saved.state_dict())
        blob = _load_trainer_state(path / "trainer.pt")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TrainingError(f"cannot resume from {path}: {err}. Delete {path} to run this stage again from its "
                            "start (its model/ and the other stages are not touched)") from None
    _set_learning_rates(optimizer, scheduler, configured)
    return state


def _load_trainer_state(path: Path) -> dict:
    """The optimizer, scheduler and RNG state of a checkpoint, loaded without unpickling code
    (``weights_only=True``: tensors and plain containers only, so a crafted file cannot run anything)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the checkpoint was not written completely")
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # UnpicklingError (refused or damaged), EOFError, RuntimeError (truncated zip)
        text = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{path}: not a trainer state that loads safely ({type(err).__name__}: {text})") from None
    missing = {"optimizer", "scheduler", "torch_rng"} - set(blob if isinstance(blob, dict) else ())
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(sorted(missing))} in it; expected a trainer state")
    return blob


def _set_learning_rates(optimizer, scheduler, base_lrs: list) -> None:
    """Give a resumed optimizer the configured base learning rates, at the restored schedule position."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate wraps the LambdaLR
    old = list(inner.base_lrs)
    if old == list(base_lrs):
        return
    inner.base_lrs = list(base_lrs)
    for group, base, fn in zip(optimizer.param_groups, base_lrs, inner.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(inner.last_epoch)
    inner._last_lr = [g["lr"] for g in optimizer.param_groups]
    print(f"resuming with base learning rates {sorted(set(base_lrs))} (were {sorted(set(old))})")


def _check_finite_parameters(stage: str, model: DPBert, step: int, ckpt_dir: Path) -> None:
    """Stop right after an optimizer step that left a NaN or an infinity in a trained parameter, before
    anything is saved: the last checkpoint is then truly the last good one."""
    bad = nonfinite((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if bad:
        raise TrainingError(f"[{stage}] the update of step {step} made {len(bad)} parameters non-finite "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); stopped. {_recovery(ckpt_dir)}")


def _recovery(ckpt_dir: Path) -> str:
    """What to do after a numerical blow-up, for the error message."""
    if not ckpt_dir.exists():
        return "No checkpoint was written yet: re-run with a lower --lr / --planner-lr, or check the data."
    return (f"The last good checkpoint is {ckpt_dir}: re-run the same command with a lower --lr / --planner-lr "
            "to resume from it at that rate, or check the data.")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of ``metrics.jsonl`` logged at or before ``step`` (the checkpoint being resumed;
    0 for a fresh start), so that a resumed run does not log its steps twice. A row cut off by a kill
    is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))


# ---------------------------------------------------------------------- the pipeline
@dataclass
class PipelineConfig(TrainConfig):
    """Stages 1-3 and the evaluation; ``epochs``/``lr`` are replaced by per-stage values."""

    stage1_epochs: float = 5.0
    """Stage 1, backbone fine-tuning (paper: 5)."""
    stage2_epochs: float = 5.0
    """Stage 2, planner initialisation with soft gates (paper: 5)."""
    stage3: str = "exact"
    """[choice] Stage 3: 'exact' trains the planners on the exact expected reward over all 2^L paths of the
    frozen stage-2 backbone (``dpbert-rl exact``: the same reward, dual price and entropy bonus as 'rl',
    its gradient without sampling noise); 'rl' is the paper's joint REINFORCE of backbone, head and
    planners (eq. 12). On the RTE selection split 'exact' held the target rate (3.9 of 6 layers at
    r = 0.35) while 'rl' ended at 5.3 layers with a lower score (README, "Choices")."""
    stage3_epochs: float = 5.0
    """Stage 3 with 'rl': joint REINFORCE epochs (paper: not given; 5)."""
    exact_epochs: float = 20.0
    """Stage 3 with 'exact': passes over the fit split's path tree (a step is array lookups)."""
    exact_lr: float = 1e-2
    """Stage 3 with 'exact': Adam learning rate of the planners."""
    stage3_lr: Optional[float] = None
    """Backbone learning rate in stage 3 (default: lr)."""
    stage3_batch_size: Optional[int] = None
    """Inputs per batch in stage 3 (default: batch_size); each is drawn `samples` times."""
    calibrate_threshold: bool = False
    """After stage 3, set the execute threshold of eq. (5) (0.5 in the paper) so that the greedy skip rate
    on the selection split matches target_rate. Needed with rate_control 'penalty', whose gates stay near
    p = 1 - r; with 'dual' (the default) the greedy policy at 0.5 already holds the rate."""
    calibration_samples: int = 1000
    """Training inputs used to calibrate the threshold."""
    latency_repeats: int = 3
    """Batch-1 latency: passes over the dev set, full and DPBERT interleaved; the median is kept."""
    latency_samples: Optional[int] = None
    """Time only the first N dev examples (default: all)."""
    threads: Optional[int] = None
    """torch threads for the latency measurement (default: as set)."""

    def validate(self) -> None:
        super().validate()
        if self.stage3 not in ("exact", "rl"):
            raise ValueError(f"unknown stage3 {self.stage3!r}; expected 'exact' or 'rl'")
        if self.stage3 == "exact" and self.rate_control == "penalty":
            raise ValueError("stage3 'exact' holds the rate with rate_control 'dual' (or 'none'), not 'penalty'")
        if self.exact_epochs <= 0 or self.exact_lr <= 0:
            raise ValueError(f"exact_epochs and exact_lr must be positive; got {self.exact_epochs}, {self.exact_lr}")


def exact_stage(cfg: TrainConfig, init: Path, out: Path, epochs: float = 20.0, lr: float = 1e-2,
                cache_dir: Optional[Path] = None) -> Path:
    """Stage 3 'exact': the planners of ``init`` (a stage-2 model) trained on the exact expectation over the
    path tree of its frozen backbone (:func:`dpbert_rl.pathtree.train_exact`), with ``cfg``'s reward, rate
    control, features and selection rule. The path-tree caches go to ``cache_dir`` (default
    ``<out>/pathtree``; runs on the same backbone can share it, and the tree env can read it). Returns
    ``<out>/model``."""
    from .pathtree import ExactConfig, train_exact

    return train_exact(str(init), ExactConfig(
        task=cfg.task, data_dir=cfg.data_dir, output_dir=str(out),
        cache_dir=str(cache_dir or Path(out) / "pathtree"),
        max_seq_length=cfg.max_seq_length, max_steps=cfg.max_steps,
        max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
        planner_features=cfg.planner_features, feature_stats_samples=cfg.feature_stats_samples,
        lr=lr, epochs=epochs, cost=cfg.cost, lam=cfg.lam, reward=cfg.reward,
        rate_control=cfg.rate_control, target_rate=cfg.target_rate, dual_lr=cfg.dual_lr,
        entropy_coef=cfg.entropy_coef, select_tolerance=cfg.select_tolerance, seed=cfg.seed,
        progress=cfg.progress))


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Stage 1 -> 2 -> 3 -> evaluation; each finished stage is reused when re-run.

    Returns the evaluation report (also written to ``<output_dir>/report.json``).
    """
    from .latency import evaluate_checkpoint

    cfg.validate()
    out = Path(cfg.output_dir)
    base = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    stage_cfg = lambda sub, **kw: replace(TrainConfig(**base), output_dir=str(out / sub), **kw)  # noqa: E731
    s1 = train_stage("finetune", stage_cfg("stage1_finetune", epochs=cfg.stage1_epochs))
    s2 = train_stage("planner_init", stage_cfg("stage2_planner_init", epochs=cfg.stage2_epochs), init=str(s1))
    if cfg.stage3 == "exact":
        s3 = exact_stage(cfg, s2, out / "stage3_exact", cfg.exact_epochs, cfg.exact_lr)
    else:
        s3 = train_stage("rl", stage_cfg("stage3_rl", epochs=cfg.stage3_epochs, lr=cfg.stage3_lr or cfg.lr,
                                         batch_size=cfg.stage3_batch_size or cfg.batch_size), init=str(s2))
    calibration = None
    if cfg.calibrate_threshold and cfg.target_rate is not None:
        calibration = calibrate_checkpoint(s3, cfg)
    t_eval = time.time()
    report = evaluate_checkpoint(
        str(s3), baseline_checkpoint=str(s1), data_dir=cfg.data_dir, max_eval_samples=cfg.max_eval_samples,
        repeats=cfg.latency_repeats, latency_samples=cfg.latency_samples, threads=cfg.threads,
        batch_size=cfg.eval_batch_size, progress=cfg.progress,
    )
    report["train_examples"] = json.loads((Path(s1).parent / "config.json").read_text())["train_examples"]
    # training time of every stage (also when a finished stage was reused) plus this evaluation
    report["seconds"] = sum(json.loads((Path(s) / DONE_FILE).read_text())["seconds"] for s in (s1, s2, s3)) \
        + (time.time() - t_eval)
    report["seed"] = cfg.seed
    report["calibration"] = calibration
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def calibrate_threshold(model: DPBert, dataset, collate_fn, target_rate: float, batch_size: int = 64,
                        iterations: int = 14) -> tuple:
    """Bisection for the hard-mode threshold whose skip rate on ``dataset`` is ``target_rate``.

    Returns ``(threshold, skip_rate reached)``. Raising the threshold skips more at every layer."""
    from .evaluate import run_dataset

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


def calibrate_checkpoint(model_dir, cfg: TrainConfig, samples: Optional[int] = None) -> dict:
    """Calibrate the threshold of a trained checkpoint on the selection split and save it in place."""
    model = DPBert.load(model_dir).eval()
    n = samples or getattr(cfg, "calibration_samples", 1000)
    # calibration is a choice: it reads the held-out selection split, never dev
    ds = tokenize(load_split(cfg.task, "select", cfg.data_dir, n, shuffle_seed=cfg.seed + 1, bad_rows=cfg.bad_rows),
                  model.tokenizer, cfg.max_seq_length)
    threshold, reached = calibrate_threshold(model, ds, collator(model.tokenizer), cfg.target_rate,
                                             cfg.eval_batch_size)
    model.threshold = threshold
    model.save(model_dir)
    info = {"threshold": threshold, "train_skip_rate": reached, "target_rate": cfg.target_rate, "examples": len(ds)}
    (Path(model_dir) / "calibration.json").write_text(json.dumps(info, indent=2))
    print(f"[calibration] threshold {threshold:.4f}: skip rate {reached:.3f} on {len(ds)} selection inputs")
    return info


__all__ = ["TrainConfig", "PipelineConfig", "train_stage", "run_pipeline", "TrainingError", "DataError", "STAGES"]
