"""The three training stages of DPBERT and the DPBERT-soft ablation, in one loop on Accelerate.

============  ========  ==========================  ==========================================
stage         mode      trained                     objective
============  ========  ==========================  ==========================================
finetune      full      backbone + head             ``ell``                     (stage 1)
planner_init  soft      planners (backbone frozen)  ``ell`` [+ ``beta P``]      (stage 2)
rl            sample    backbone + head + planners  eq. (12): ``ell - sum (R_i-b_i) log pi + beta P``
sampled       sample    planners (backbone frozen)  eq. (12)'s policy term: stage 3 that scales to 12 layers
soft          soft      backbone + head + planners  ``ell + beta P``            (DPBERT-soft)
layerdrop     path      backbone + head             ``ell`` on a random layer subset (LayerDrop)
adapt         sample    backbone + head             ``ell`` on paths drawn from the frozen planners (at the
                                                        target rate: ``adapt_at_rate``)
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

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..checks import NonFiniteError, check_max_seq_length
from ..data import collator, get_task, load_split, tokenize
from ..evaluation.diagnostics import skip_all_check, warn_if_constant
from ..evaluation.evaluate import evaluate_model
from ..model.backbone import eval_mode
from ..model.dpbert import DPBert, TaskInfo
from ..model.objectives import (DualPrice, RunningPathCalibration, apply_path_calibration, dpbert_objective,
                                final_reward, path_ids, reward_to_go, skip_penalty, skip_rate)
from ..model.planner import Planners
from .checkpoint import (DONE_FILE, check_finite_parameters, is_checkpoint, load_checkpoint, recovery, save_atomic,
                         save_checkpoint, stage_dir, stage_done, truncate_metrics)
from .config import STAGES, TrainConfig, TrainingError, check_same_run


_STAGE_MODE = {"finetune": "full", "planner_init": "soft", "rl": "sample", "sampled": "sample", "soft": "soft",
               "layerdrop": "path", "adapt": "sample"}
# stages that train the backbone and head only (the planners, if any, frozen)
_BACKBONE_ONLY = ("finetune", "layerdrop", "adapt")
# stages that train the planners only (the backbone and head frozen, in eval mode)
_PLANNERS_ONLY = ("planner_init", "sampled")
# stages that draw K paths per input and learn from their rewards (eq. 12)
_REINFORCE = ("rl", "sampled")


def build_model(cfg: TrainConfig, init: Optional[str] = None) -> DPBert:
    """The model a stage starts from: an earlier checkpoint, or a fresh DPBert on a backbone."""
    task = get_task(cfg.task)
    try:
        model = DPBert.from_source(init or cfg.backbone, task.num_labels, planner_init_bias=cfg.planner_init_bias)
    except ValueError as err:
        raise TrainingError(f"{err} (task {task.name})") from err
    model.task_info = TaskInfo(task.name, task.display_names, cfg.max_seq_length)
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
                progress: float = 0.0, calibration: Optional[RunningPathCalibration] = None):
    """One forward pass of ``stage`` on ``batch``; returns (loss, output, logs).

    :param price: the cost of an executed layer in stage 3's reward (``cfg.cost``, or the dual price).
    :param progress: fraction of the stage done, for the entropy bonus's decay.
    :param calibration: a regression head's per-path map fitted on the fly (``cfg.online_path_calibration``): this
        batch's draws are added to it, and the reward reads each output through it.
    """
    shared, once = None, batch  # `once`: one row per input
    if stage in _REINFORCE and cfg.samples > 1:  # K paths per input, rows grouped by input
        n = batch["input_ids"].shape[0]
        batch = {k: v.repeat_interleave(cfg.samples, 0) for k, v in batch.items()}
        if stage == "sampled":  # frozen backbone: an input's K paths share the layer calls of common prefixes
            shared = torch.arange(n, device=batch["input_ids"].device).repeat_interleave(cfg.samples)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch.get("token_type_ids"), labels=batch["labels"])
    if stage == "layerdrop":
        keep = (torch.rand(raw_model.num_layers) >= cfg.layerdrop).float()
        out = model(**inputs, mode="path", actions=keep.to(batch["input_ids"].device))
    elif shared is not None:
        out = model(**inputs, mode="sample", shared=shared)
    elif stage == "adapt":  # around the greedy path at the knob set for the target rate (StageRun._set_adapt_knob)
        out = model(**inputs, mode="sample", sample_at_threshold=_adapts_at_rate(cfg))
    else:
        out = model(**inputs, mode=_STAGE_MODE[stage])
    logs = {"losses/task_loss": out.loss.item()}
    if stage in _BACKBONE_ONLY:
        if stage != "finetune":
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
            prediction = raw_model.predict(o.logits)
            if table is not None:  # each path's output on the label's scale, fitted on the earlier draws
                prediction = apply_path_calibration(prediction, path_ids(o.actions), table)
            return final_reward(cfg.reward, o.per_example_loss, prediction, inputs["labels"], raw_model.is_regression)

        table = None
        if calibration is not None:  # this batch's draws join the map after its rewards are read
            table = calibration.table()
            calibration.update(path_ids(out.actions), raw_model.predict(out.logits), inputs["labels"])

        greedy, rate = None, None
        if cfg.baseline == "self-critical":
            with torch.no_grad():
                g = raw_model(**inputs, mode="hard", shared=shared)
            greedy = reward_to_go(g.actions, outcome(g), price, cfg.lam)
            rate = g.actions.float().mean().item()
        if rate is None and cfg.rate_control == "dual" and cfg.target_rate is not None:
            # the dual price holds the rate of the path the model will run, the greedy one, walked from its own
            # states: `p >= 0.5` read along the sampled paths is not that rate (those states skipped other layers;
            # at 12 layers it read 0.15-0.25 below the greedy path's, and the price went negative while the greedy
            # path ran 10-11 layers)
            with torch.no_grad(), eval_mode(raw_model):  # as deployed: no dropout (and no random draws taken)
                rate = raw_model(input_ids=once["input_ids"], attention_mask=once["attention_mask"],
                                 token_type_ids=once.get("token_type_ids"), mode="hard").actions.float().mean().item()
        parts = dpbert_objective(out.loss, out.log_probs, out.probs, out.actions, out.per_example_loss,
                                 price, cfg.lam, cfg.beta, cfg.target_rate if with_penalty else None, cfg.baseline,
                                 greedy, outcome=outcome(out), samples=cfg.samples, normalise=cfg.normalise_advantages,
                                 entropy=out.entropy, entropy_coef=cfg.entropy_coef * max(0.0, 1.0 - progress))
        loss = parts["loss"]
        logs.update({"losses/policy_loss": parts["policy_loss"].item(), "losses/penalty": parts["penalty"].item(),
                     "losses/entropy_bonus": parts["entropy_bonus"].item(), "charts/layer_price": price,
                     "charts/episodic_return": parts["returns"][:, 0].mean().item()})
        if rate is not None:
            logs["charts/greedy_execute_rate"] = rate
    logs.update({
        "losses/entropy": out.entropy.mean().item(),
        "charts/expected_skip_rate": skip_rate(out.probs).item(),
        "charts/skip_rate": 1.0 - out.actions.mean().item(),
        "charts/layers_executed": out.layers_executed.float().mean().item(),
    })
    return loss, out, logs


def train_stage(stage: str, cfg: TrainConfig, init: Optional[str] = None) -> Path:
    """Run one stage and return the directory of its resulting model (``<output_dir>/model``).

    :param stage: one of :data:`STAGES` (the table above).
    :param init: checkpoint to start from (the previous stage's ``model/``); default ``cfg.backbone``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    cfg.validate()
    out_dir = Path(cfg.output_dir)
    model_dir, ckpt_dir = out_dir / "model", out_dir / "checkpoint"
    if stage_done(out_dir):  # reused as it is: no write access or lock needed
        check_same_run(stage, cfg, init, out_dir)
        print(f"[{stage}] already complete: {model_dir}")
        return model_dir
    with stage_dir(out_dir, stage, init):  # claimed, locked; a swap a kill interrupted finished or rolled back
        if stage_done(out_dir) or (ckpt_dir / "state.json").is_file():
            check_same_run(stage, cfg, init, out_dir, resuming=not stage_done(out_dir))
        if stage_done(out_dir):
            print(f"[{stage}] already complete: {model_dir}")
            return model_dir
        if init is not None and not is_checkpoint(init):
            raise FileNotFoundError(f"no checkpoint at {init!r} to start stage {stage!r} from")
        run = StageRun(stage, cfg, init)
        run.train()
        run.finish()
    return model_dir


def trainable_groups(stage: str, cfg: TrainConfig, model: DPBert) -> list:
    """Freeze what ``stage`` does not train; the optimizer's parameter groups for the rest (backbone with
    and without weight decay at ``lr``, planners at ``planner_lr``)."""
    train_backbone = stage not in _PLANNERS_ONLY
    train_planners = stage not in _BACKBONE_ONLY
    for p in model.backbone.parameters():
        p.requires_grad_(train_backbone)
    for p in model.planners.parameters():
        p.requires_grad_(train_planners)
    groups = []
    if train_backbone:
        no_wd = ("bias", "LayerNorm", "layer_norm")
        decay = [p for n, p in model.backbone.named_parameters() if not any(k in n for k in no_wd)]
        no_decay = [p for n, p in model.backbone.named_parameters() if any(k in n for k in no_wd)]
        groups += [{"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                   {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0}]
    if train_planners:
        groups.append({"params": list(model.planners.parameters()), "lr": cfg.planner_lr, "weight_decay": 0.0})
    return groups


class StageRun:
    """One stage being trained: the model wrapped by Accelerate, its data, optimizer, schedule and the
    resumable ``state`` (``global_step``, the best selection score and its step, the dual price)."""

    def __init__(self, stage: str, cfg: TrainConfig, init: Optional[str]):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import set_seed

        self.stage, self.cfg, self.init = stage, cfg, init
        self.out_dir = Path(cfg.output_dir)
        self.model_dir, self.ckpt_dir = self.out_dir / "model", self.out_dir / "checkpoint"
        self.metrics_file = self.out_dir / "metrics.jsonl"
        self.accelerator = Accelerator(
            cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=str(self.out_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=stage != "finetune")],
        )
        self.main = self.accelerator.is_main_process
        set_seed(cfg.seed)
        self.task = get_task(cfg.task)
        model = build_model(cfg, init)
        self.data = load_data(cfg, model.tokenizer)
        self.collate = collator(model.tokenizer)
        self.lengths = None  # of the training inputs, for group_by_length
        resuming = (self.ckpt_dir / "state.json").is_file()
        if stage in ("planner_init", "soft") + _REINFORCE:
            _prepare_planners(stage, cfg, model, self.data["train"], self.collate, fit_stats=not resuming)
        if stage in _REINFORCE and not resuming:
            check_reward(model, self.data["train"], self.collate, cfg)
        if stage == "adapt":
            _check_adapt_planners(model, init)
        if stage not in _PLANNERS_ONLY:  # the backbone or head moves: a regression head's per-path map no longer fits
            model.set_path_calibration(None)
        self.train_backbone = stage not in _PLANNERS_ONLY
        self.groups = trainable_groups(stage, cfg, model)
        self._prepare(model)
        self._resume(resuming)
        self._set_adapt_knob()
        self._write_config()
        self.eval_mode = "full" if stage in ("finetune", "layerdrop") else "hard"
        self.eval_steps = cfg.eval_steps or max(1, self.steps_per_epoch // max(1, cfg.evals_per_epoch))

    # ---- set-up
    def _prepare(self, model: DPBert) -> None:
        from transformers import get_linear_schedule_with_warmup

        cfg = self.cfg
        optimizer = torch.optim.AdamW(self.groups)
        self.world = self.accelerator.num_processes
        self.steps_per_epoch = math.ceil(len(self.data["train"]) / (cfg.batch_size * self.world))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * self.total_steps),
                                                    self.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.raw: DPBert = self.accelerator.unwrap_model(self.model)

    def _resume(self, resuming: bool) -> None:
        cfg = self.cfg
        self.state = {"global_step": 0, "best": None, "best_step": None}
        if resuming:
            self.state = load_checkpoint(self.ckpt_dir, self.raw, self.optimizer, self.scheduler)
            self.accelerator.print(f"[{self.stage}] resuming from {self.ckpt_dir} at step "
                                   f"{self.state['global_step']}/{self.total_steps}")
        if self.main:  # a run killed between two checkpoints logged steps that it now runs again
            truncate_metrics(self.metrics_file, self.state["global_step"])
        self.dual = None
        if self.stage in _REINFORCE and cfg.rate_control == "dual" and cfg.target_rate is not None:
            self.dual = DualPrice(cfg.target_rate, cfg.dual_lr, init=cfg.cost)
            if "dual" in self.state:
                self.dual.load_state_dict(self.state["dual"])
        self.path_map = None  # the regression head's per-path map, fitted on the stage's draws
        if self.stage == "sampled" and cfg.online_path_calibration and self.task.is_regression:
            if self.accelerator.num_processes > 1:  # each process would fit its own shard's map
                raise TrainingError("[sampled] online_path_calibration fits one map on one process; run the stage on "
                                    "one process, or pass --no-online-path-calibration")
            self.path_map = RunningPathCalibration(self.raw.num_layers)
            if "path_map" in self.state:
                self.path_map.load_state_dict(self.state["path_map"])
            self.raw.set_path_calibration(None)  # the forward gives raw outputs; the reward maps them

    def _set_adapt_knob(self) -> None:
        """Stage ``adapt`` with ``adapt_at_rate``: the planners' knob set so that their greedy skip rate on the
        selection split's inputs (labels never read) is ``target_rate``, solved once at the start (then read from
        the resumable state: the backbone moves, the paths it was adapted on must not) and kept while the stage
        draws its paths and scores its evaluations; each model is saved with its knob as it came
        (:meth:`_knob_as_loaded`), so that the next planner stage starts from the planners it was given."""
        from ..model.budget import get_knob, set_knob, solve_knob

        self.knob_before = None
        if self.stage != "adapt" or not _adapts_at_rate(self.cfg):
            return
        if "adapt_knob" not in self.state:
            cfg, L = self.cfg, self.raw.num_layers
            batches = list(DataLoader(self.data["select"], batch_size=cfg.eval_batch_size, shuffle=False,
                                      collate_fn=self.collate))
            before = get_knob(self.raw)
            knob, layers = solve_knob(self.raw, batches, (1.0 - cfg.target_rate) * L, tol=0.01 * L)
            self.state["adapt_knob"] = {"before": before, "value": knob, "layers": layers}
            self.accelerator.print(f"[adapt] paths drawn at the knob {before:.4g} -> {knob:.4g}: {layers:.2f} of {L} "
                                   f"layers on {len(self.data['select'])} selection inputs (target rate "
                                   f"{cfg.target_rate:g})")
        self.knob_before = self.state["adapt_knob"]["before"]
        set_knob(self.raw, self.state["adapt_knob"]["value"])

    def _knob_as_loaded(self):
        """The model with the knob it was loaded with (for saving a chosen model), then as it runs in the stage."""
        from ..model.budget import knob_at

        return knob_at(self.raw, self.knob_before)

    def _write_config(self) -> None:
        cfg = self.cfg
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = {"stage": self.stage, "init": self.init, **asdict(cfg), "num_processes": self.world,
                        "train_examples": len(self.data["train"]), "select_examples": len(self.data["select"]),
                        "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
            resolved["skipped_rows"] = self.data["skipped_rows"]  # --bad-rows skip: how many, and their lines
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        # purge_step: TensorBoard drops the events that a killed run logged past the step resumed from
        self.accelerator.init_trackers("tb", config=_flat_config(asdict(cfg)),
                                       init_kwargs={"tensorboard": {"purge_step": self.state["global_step"] + 1}})

    # ---- the loop
    def train(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.t0 = time.time()
        bar = tqdm(total=self.total_steps, initial=self.state["global_step"], desc=f"{self.stage} {self.task.name}",
                   disable=not (self.main and cfg.progress), dynamic_ncols=True)
        self.step = self.state["global_step"]
        if self.step == 0 and cfg.eval_at_start:  # the start is a candidate too (re-scored if stopped before step 1)
            self._evaluate(0)
        while self.step < self.total_steps:
            for batch in self._epoch_loader():
                logs = self._update(batch)
                self.step += 1
                bar.update(1)
                self._after_step(logs, bar)
                if self.step >= self.total_steps:
                    break
            self.accelerator.wait_for_everyone()
        bar.close()

    def _epoch_loader(self):
        """The rest of the current epoch's batches, in an order fixed by the seed and the epoch."""
        cfg = self.cfg
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        if cfg.group_by_length:  # similar lengths together: less padding (HF Trainer's group_by_length)
            from transformers.trainer_pt_utils import get_length_grouped_indices

            if self.lengths is None:
                self.lengths = [len(x) for x in self.data["train"]["input_ids"]]
            order = get_length_grouped_indices(self.lengths, cfg.batch_size,
                                               generator=torch.Generator().manual_seed(cfg.seed + epoch))
        else:
            order = np.random.RandomState(cfg.seed + epoch).permutation(len(self.data["train"])).tolist()
        # the loader gets its own generator: iterating it must not draw from the global RNG (which
        # drives dropout and action sampling), or a resumed run would diverge from an unbroken one
        loader = self.accelerator.prepare_data_loader(
            DataLoader(self.data["train"], batch_size=cfg.batch_size, sampler=order, collate_fn=self.collate,
                       generator=torch.Generator().manual_seed(cfg.seed + epoch)))
        if skip:
            loader = self.accelerator.skip_first_batches(loader, skip)
        self.model.train()
        if not self.train_backbone:
            self.raw.backbone.eval()  # frozen backbone: no dropout, so stage 2 sees fixed features
        return loader

    def _update(self, batch: dict) -> dict:
        """One optimizer step on ``batch``; stops before anything is saved when a number goes non-finite."""
        cfg, stage, step = self.cfg, self.stage, self.step
        price = self.dual.price if self.dual is not None else cfg.cost
        try:
            loss, _, logs = _stage_loss(stage, cfg, self.model, self.raw, batch, price, step / self.total_steps,
                                        self.path_map)
        except NonFiniteError as err:  # e.g. exploded planners: caught before torch.bernoulli fails on them
            raise TrainingError(f"[{stage}] {err} at step {step + 1}; stopped. {recovery(self.ckpt_dir)}") from None
        if not torch.isfinite(loss):
            raise TrainingError(
                f"[{stage}] loss is {loss.item()} at step {step + 1}; stopped. {recovery(self.ckpt_dir)}"
            )
        self.accelerator.backward(loss)
        if cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_([p for g in self.groups for p in g["params"]], cfg.max_grad_norm)
        self.optimizer.step()
        check_finite_parameters(stage, self.raw, step + 1, self.ckpt_dir)  # before any save: checkpoints stay good
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dual is not None:  # the same price on every process: the mean rate over all of them
            rate = self.accelerator.reduce(torch.tensor(logs["charts/greedy_execute_rate"],
                                                        device=self.accelerator.device), "mean")
            self.dual.update(float(rate))
            self.state["dual"] = self.dual.state_dict()
        if self.path_map is not None:
            self.state["path_map"] = self.path_map.state_dict()
        return logs

    def _after_step(self, logs: dict, bar) -> None:
        """Log, evaluate on the selection split, and write the resumable checkpoint, each on its schedule."""
        cfg, step, total = self.cfg, self.step, self.total_steps
        if step % cfg.logging_steps == 0 or step == total:
            logs["charts/lr"] = self.scheduler.get_last_lr()[0]
            logs["charts/epoch"] = step / self.steps_per_epoch
            _log(self.accelerator, self.metrics_file, logs, step, self.main)
            bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in logs.items()
                             if k in ("losses/task_loss", "charts/layers_executed")})
        if step % self.eval_steps == 0 or step == total:
            self._evaluate(step)
        if (step % cfg.save_steps == 0 or step % self.eval_steps == 0) and step < total and self.main:
            save_checkpoint(self.ckpt_dir, self.raw, self.optimizer, self.scheduler, {**self.state, "global_step": step})

    def _evaluate(self, step: int) -> None:
        """:meth:`evaluate_and_select`, logged and printed."""
        res = self.evaluate_and_select(step)
        diag = {"eval/select_score": res["score"], "eval/layers_executed": res["layers_executed_mean"],
                "eval/skip_rate": res["skip_rate"], "eval/distinct_paths": res["distinct_paths"]}
        if res.get("mid_gate_fraction") is not None:
            diag["eval/mid_gate_fraction"] = res["mid_gate_fraction"]
        _log(self.accelerator, self.metrics_file, diag, step, self.main)
        self.accelerator.print(f"[{self.stage}] step {step}: selection {self.task.metric} {res['score']:.2f}, "
                               f"layers {res['layers_executed_mean']:.2f}/{self.raw.num_layers}")

    def evaluate_and_select(self, step: int) -> dict:
        """Score on the selection split; keep the model as the stage's choice when it is the best so far among
        evaluations that meet the skip-rate rule (stages with a target rate)."""
        cfg, state = self.cfg, self.state
        with self._path_map_set():  # scored, and saved, with the map the reward reads
            res = evaluate_model(self.raw, self.task, self.data["select"], self.collate, cfg.eval_batch_size,
                                 self.eval_mode)
            ok = self.stage in _BACKBONE_ONLY + ("planner_init",) or cfg.target_rate is None or \
                res["skip_rate"] >= cfg.target_rate - cfg.select_tolerance
            if ok and (state["best"] is None or res["score"] > state["best"]):
                state["best"], state["best_step"] = res["score"], step
                if self.main:  # with the layer price at that step: a later fit of these planners starts there
                    with self._knob_as_loaded():
                        save_atomic(self.raw, self.model_dir,
                                    extra={"step": step, "select": res, **self._selection_extra()})
        return res

    @contextlib.contextmanager
    def _path_map_set(self):
        """The model with the per-path map fitted so far (when the stage fits one), then raw again."""
        if self.path_map is None:
            yield
            return
        self.raw.set_path_calibration(self.path_map.table())
        try:
            yield
        finally:
            self.raw.set_path_calibration(None)

    def _selection_extra(self) -> dict:
        """What ``selection.json`` records beyond the step and score: ``select_price``, the dual layer price now
        (where a later fit of these planners starts); stage ``adapt`` at the rate: ``adapt_knob``, the knob its
        paths were drawn and scored at. Empty without either."""
        extra = {} if self.dual is None else {"select_price": self.dual.price}
        if "adapt_knob" in self.state:
            extra["adapt_knob"] = self.state["adapt_knob"]
        return extra

    # ---- the end
    def finish(self) -> None:
        """The chosen model (the last one when no evaluation met the rule) scored once on dev, ``DONE``
        written, the resumable checkpoint removed."""
        accelerator, state, step = self.accelerator, self.state, self.step
        accelerator.wait_for_everyone()
        if self.main:
            if state["best"] is None:  # no evaluation met the selection rule: keep the last model
                with self._path_map_set(), self._knob_as_loaded():
                    save_atomic(self.raw, self.model_dir,
                                extra={"step": step, "note": "last (no evaluation met the skip-rate rule)",
                                       **self._selection_extra()})
            seconds = time.time() - self.t0
            dev = score_dev_once(self.model_dir, self.cfg, self.eval_mode)  # once, on the chosen model; chooses nothing
            (self.model_dir / DONE_FILE).write_text(json.dumps(
                {"best_select": state["best"], "best_step": state["best_step"], "steps": step, "seconds": seconds,
                 "dev": dev}))
            accelerator.print(f"[{self.stage}] chosen model (step {state['best_step']}): dev {self.task.metric} "
                              f"{dev['score']:.2f}")
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        accelerator.wait_for_everyone()
        for tracker in accelerator.trackers:  # not end_training(): it would tear down the process group
            tracker.finish()                  # that the pipeline's next stage still needs


def _adapts_at_rate(cfg: TrainConfig) -> bool:
    """Stage ``adapt`` draws its paths at the target rate (``cfg.adapt_at_rate`` with a ``target_rate``)."""
    return bool(cfg.adapt_at_rate) and cfg.target_rate is not None


def _check_adapt_planners(model: DPBert, init: Optional[str]) -> None:
    """Stage ``adapt`` fine-tunes the backbone on the paths its planners draw: they must be trained ones. (A
    regression head's per-path recalibration is dropped, as by every stage that trains the backbone: the next
    exact stage fits one for the new backbone.)"""
    if init is None or not bool(model.planners.stats_set):
        raise TrainingError(f"[adapt] {init or 'the backbone'} has no trained planners: stage 'adapt' draws its "
                            "paths from them; start it from a stage-2 or stage-3 model/")


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


def check_reward(model: DPBert, dataset, collate, cfg: TrainConfig, samples: int = 256) -> dict:
    """Warn when skipping every layer beats the full model under stage 3's reward (see
    :func:`dpbert_rl.evaluation.diagnostics.skip_all_check`)."""
    return skip_all_check(model, dataset, collate, cfg.reward, cfg.cost, cfg.lam, samples, cfg.eval_batch_size)


def score_dev_once(model_dir, cfg: TrainConfig, mode: str) -> dict:
    """The dev score of a stage's chosen model: reported, never used to choose anything."""
    model = DPBert.load(model_dir)
    dev = load_data(cfg, model.tokenizer, splits=("dev",))["dev"]
    res = evaluate_model(model, get_task(cfg.task), dev, collator(model.tokenizer), cfg.eval_batch_size, mode)
    return {k: v for k, v in res.items() if isinstance(v, (int, float, str))}


def _log(accelerator, path: Path, logs: dict, step: int, main: bool) -> None:
    accelerator.log(logs, step=step)
    if main:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
