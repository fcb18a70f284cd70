"""The trade-off benchmark's methods.

:class:`TaskRun` holds what a task's methods share: the stage-1 backbone every method starts from,
the ``fit`` part of the training file (training), the selection split (every choice), dev (scored
once per final model and setting, and a seeded sample of it timed). Each ``m_<method>`` trains its
models for ``--extra-epochs`` beyond stage 1 (checkpoints chosen on the selection split), sets its
thresholds on the selection split (calibrated to the common ``--target-speedups``), scores each
setting on dev once and times it against the backbone.

Every setting carries a ``spec`` from which :meth:`TaskRun.fn_for` rebuilds it, so the same models
can be timed again elsewhere (``--retime --device cuda``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from _common import RESULTS, MixedRunError

from dpbert_rl import baselines as ee
from dpbert_rl.pathtree import oracle
from dpbert_rl.data import collator, get_task, load_split, tokenize
from dpbert_rl.evaluation.diagnostics import greedy_fixed_paths
from dpbert_rl.evaluation.evaluate import run_dataset, score_run, speedup_ideal_fields
from dpbert_rl.evaluation.latency import encode_batches, interleaved_latency, sample_indices
from dpbert_rl.evaluation.metrics import compute_metrics
from dpbert_rl.model import DPBert
from dpbert_rl.training.fixed_start import fixed_path_start, path_layers
from dpbert_rl.training import (TrainConfig, load_data, planner_stage3, resolve_stage3, stage3_for, stage_done,
                                train_stage)

# Training subsets, chosen to fit the clean run into about 4 hours on 2 cores by the first (too low) time
# estimate; the run at these subsets takes about 5.5 h there (README, `--plan`)
TASK_SETTINGS = {"rte": {}, "mrpc": {}, "sst2": {"max_train_samples": 5000}, "stsb": {}}
# For --plan only: seconds of one batch-32 training step and ms of one batch-1 forward of the full
# MiniLM-L6 on the 2-core machine at 2 threads. RTE from the clean run at 2a69ab6 (25.5 ms batch-1, its
# per-method wall clock: ``--plan`` prints it beside the estimate); the other tasks scaled from their
# earlier rough figures by RTE's ratio (the first estimates, 2.3 s and 16 ms, were 1.5-1.6x too low).
STEP_SECONDS = {"sst2": 1.5, "rte": 3.5, "mrpc": 2.4, "stsb": 1.8}
BATCH1_MS = {"sst2": 14.5, "rte": 25.5, "mrpc": 21.0, "stsb": 17.5}
COMMIT_FILE = "CODE_COMMIT"


@dataclass
class Setting:
    """One operating point of a method before it is timed.

    :param spec: how to rebuild it (:meth:`TaskRun.fn_for`).
    :param select: :func:`score_run` on the selection split (None for the oracle: not a choice).
    :param dev: :func:`run_dataset` on dev (``predictions``, ``labels``, ``actions``).
    :param target: the ideal speed-up it was calibrated to on the selection split, if any.
    """

    label: str
    spec: dict
    select: Optional[dict]
    dev: dict
    target: Optional[float] = None


class TaskRun:
    """Everything one task's methods share."""

    def __init__(self, task: str, args, train: bool = True):
        self.task, self.args = task, args
        self.t = get_task(task)
        self.root = (Path(args.output_dir) / task).resolve()
        self.points_dir = self.root / "points"
        self._check_commit()
        self.points_dir.mkdir(parents=True, exist_ok=True)
        self.max_train = args.max_train_samples or TASK_SETTINGS.get(self.task, {}).get("max_train_samples")
        s1_dir = self.root / "stage1_finetune"
        if not train and not stage_done(s1_dir):
            raise FileNotFoundError(f"{s1_dir} has no finished stage 1: run the benchmark before re-timing it")
        self.s1 = train_stage("finetune", self.config("stage1_finetune", epochs=args.stage1_epochs, lr=args.lr))
        self.device = torch.device(getattr(args, "device", "cpu") or "cpu")
        self._models = {}
        self.full = self.model(self.s1)
        tok = self.full.tokenizer
        self.collate = collator(tok)
        # the same fit / selection sets every DPBERT stage reads (dpbert_rl.training.load_data)
        data = load_data(self.config("stage1_finetune"), tok, splits=("train", "select"))
        self.train, self.select = data["train"], data["select"]
        n = args.calibration_samples
        self.calib = self.select if not n or n >= len(self.select) else \
            self.select.shuffle(seed=args.seed).select(range(n))
        self._dev = None

    # ---- provenance
    def _check_commit(self) -> None:
        """A task directory holds models of one code commit: refuse to resume it with other code."""
        f = self.root / COMMIT_FILE
        now = self.args.code_commit
        then = f.read_text().strip() if f.is_file() else ("unknown" if self.root.is_dir() and any(self.root.iterdir())
                                                           else None)
        if then not in (None, now) and not self.args.allow_mixed:
            raise MixedRunError(f"{self.root} holds models trained at code commit {then}; this code is {now}. Use "
                                "another --output-dir for a clean run, or --allow-mixed")
        if not f.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            f.write_text(now + "\n")

    def config(self, sub: str, **kw) -> TrainConfig:
        a = self.args
        base = TrainConfig(task=self.task, backbone=a.backbone, data_dir=a.data_dir, output_dir=str(self.root / sub),
                           lr=a.lr, epochs=a.stage1_epochs, evals_per_epoch=a.evals_per_epoch, seed=a.seed,
                           progress=False, batch_size=a.batch_size, lam=a.lam, beta=a.beta, planner_lr=a.planner_lr,
                           cost=a.cost, dual_lr=a.dual_lr, samples=a.samples, max_train_samples=self.max_train)
        return replace(base, **kw)

    # ---- data that is only reported or timed
    @property
    def dev(self):
        """Dev, tokenised: scored once per final model and setting, never read by a choice."""
        if self._dev is None:
            self.dev_raw = load_split(self.t, "dev", self.args.data_dir)
            self._dev = tokenize(self.dev_raw, self.full.tokenizer)
            self.timed = sample_indices(len(self._dev), self.args.latency_samples, self.args.latency_seed)
        return self._dev

    def rel(self, path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def model(self, path, kind: str = "dpbert"):
        """A checkpoint under this task's directory, loaded once, in eval mode, on the run's device."""
        path = Path(path) if Path(path).is_absolute() else self.root / path
        key = (str(path.resolve()), kind)
        if key not in self._models:
            m = ee.EarlyExitBert.load(path) if kind == "exit" else DPBert.load(path)
            self._models[key] = m.eval().to(self.device)
        return self._models[key]

    # ---- scoring
    def select_summary(self, model: DPBert, mode: str, **kw) -> dict:
        return score_run(self.t, run_dataset(model, self.select, self.collate, 64, mode, **kw))

    def dev_run(self, model: DPBert, mode: str, **kw) -> dict:
        return run_dataset(model, self.dev, self.collate, 64, mode, **kw)

    def exit_dev_run(self, model: ee.EarlyExitBert, **rule) -> dict:
        def forward(b):
            o = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), **rule)
            return o.logits, o.actions

        return run_dataset(model.model, self.dev, self.collate, 64, forward=forward)

    # ---- rebuilding and timing
    def fn_for(self, spec: dict) -> Callable[[dict], object]:
        """The callable one timed batch goes through, rebuilt from a setting's ``spec``."""
        kind = spec["kind"]
        if kind == "exit":
            m = self.model(spec["model"], "exit")
            rule = {k: v for k, v in spec.items() if k not in ("kind", "model")}
            return lambda b: m(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), **rule)
        if kind == "oracle":
            per_ex = torch.as_tensor(self.oracle_paths(spec["max_layers"]), dtype=torch.float32, device=self.device)
            m = self.full
            return lambda b: m(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), mode="path",
                               actions=per_ex[b["index"]], planners=False)
        m = self.model(spec["model"])
        if kind == "full":
            return lambda b: m(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), mode="full")
        if kind == "planner":
            thr = spec["threshold"]
            return lambda b: m(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), mode="hard", threshold=thr)
        if kind == "path":
            path = torch.tensor(spec["path"], dtype=torch.float32, device=self.device)
            return lambda b: m(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), mode="path", actions=path,
                               planners=False)  # a fixed path pays for no planner
        raise ValueError(f"unknown setting kind {kind!r}")

    def time_specs(self, specs: list, batch_size: int = 1) -> dict:
        """Time every ``(label, spec)`` against the full backbone, and the backbone against itself
        (``__self__``), interleaved over the timed dev sample in batches of ``batch_size``."""
        self.dev  # noqa: B018  (loads the timed sample)
        batches = encode_batches(self.dev, self.timed, batch_size, self.collate, self.device)
        full = self.fn_for({"kind": "full", "model": self.rel(self.s1)})
        fns = {"__full__": full, "__self__": lambda b: full(b)}
        for label, spec in specs:
            fns[label] = self.fn_for(spec)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        return interleaved_latency(fns, batches, repeats=self.args.latency_repeats, threads=self.args.threads,
                                   synchronize=sync)

    def timed_tokens(self) -> list:
        """Each timed dev input's tokens: what its layers cost (a point's length-weighted ideal speed-up)."""
        dev = self.dev
        return [len(dev[i]["input_ids"]) for i in self.timed]

    @torch.inference_mode()
    def layers_on_device(self, specs: list, batch_size: int = 64) -> dict:
        """Per ``(label, spec)``: the mean layers it runs per input of the timed dev sample on this run's
        device. Where the models were carried to another machine (``--retime``), this shows whether they
        still take the paths they took where they were trained (their ``speedup_ideal``)."""
        self.dev  # noqa: B018
        batches = encode_batches(self.dev, self.timed, batch_size, self.collate, self.device)
        out = {}
        for label, spec in specs:
            fn = self.fn_for(spec)
            out[label] = sum(float(fn(b).actions.float().sum()) for b in batches) / len(self.timed)
        return out

    def result(self, settings: list, **extra) -> dict:
        """Time ``settings`` (one interleaved run) and return the method's points and ``self_speedup``."""
        lat = self.time_specs([(s.label, s.spec) for s in settings])
        L = self.full.num_layers
        tokens = self.timed_tokens()
        points = []
        for s in settings:
            acts = np.asarray(s.dev["actions"], dtype=float)
            if acts.shape[1] < L:  # BERT-kL: a k-layer model runs its k layers
                acts = np.concatenate([acts, np.zeros((len(acts), L - acts.shape[1]))], 1)
            dev = score_run(self.t, {**s.dev, "actions": acts})
            sel_layers = s.select["layers_executed_mean"] if s.select else None
            points.append({
                "setting": s.label,
                "score": dev["score"],
                "speedup_measured": lat[s.label]["speedup"],
                # null with a note when no layer ran; length-weighted by the timed inputs' tokens too
                **speedup_ideal_fields(float(acts[self.timed].sum(1).mean()), L, tokens, acts[self.timed].sum(1)),
                "layers_executed_mean": dev["layers_executed_mean"],
                "layer_frequency": dev["layer_frequency"],
                "latency_ms": lat[s.label]["latency_ms"],
                "latency_ms_full": lat["__full__"]["latency_ms"],
                "select_score": s.select["score"] if s.select else None,
                "select_layers_executed_mean": sel_layers,
                "select_speedup_ideal": speedup_ideal_fields(sel_layers, L)["speedup_ideal"] if s.select else None,
                "target": s.target,
                "spec": s.spec,
                "_actions": acts,
            })
        return {"points": points, "self_speedup": lat["__self__"]["speedup"], **extra}

    # ---- the path caches (stage-1 backbone, every path of every input)
    def paths_of(self, split: str) -> dict:
        """Every path's prediction for every input of ``select`` (the fixed paths are chosen there) or
        ``dev`` (the oracle: dev labels)."""
        cache = self.root / f"paths_{split}.npz"
        if cache.is_file():
            z = np.load(cache)
            return {k: z[k] for k in z.files}
        ds = self.select if split == "select" else self.dev
        res = oracle.enumerate_paths(self.full, ds, self.collate, progress=False)
        np.savez_compressed(cache, **res)
        return res

    def oracle_paths(self, max_layers: int) -> np.ndarray:
        """The oracle's path ``(N_dev, L)`` for every dev input within ``max_layers`` layers."""
        res = self.paths_of("dev")
        return res["paths"][oracle.oracle_choices(res, self.t.is_regression, max_layers)]


# ---------------------------------------------------------------------- calibration on the selection split
def planner_layers(run: TaskRun, model: DPBert) -> Callable[[float], float]:
    """Mean layers a planner model runs on the calibration inputs (a subset of the selection split)
    at execute threshold ``t``."""
    return lambda t: float(run_dataset(model, run.calib, run.collate, 64, "hard", threshold=t)["actions"].sum(1).mean())


def _planner_settings(run: TaskRun, model_dir: Path, name: str) -> list:
    """A trained planner model at its threshold 0.5 and calibrated to every target speed-up."""
    a = run.args
    model = run.model(model_dir)
    L = model.num_layers
    thresholds = [("p>=0.5", 0.5, None)]
    layers, cache = planner_layers(run, model), {}
    for s in a.target_speedups:
        thr, got = ee.bisect_threshold(layers, L / s, 0.0, 1.0, decreasing=True, iterations=a.calibration_iterations,
                                       cache=cache)
        thresholds.append((f"calibrated to {s:g}x (selection {L / max(got, 1e-9):.2f}x), p>={thr:.4f}", thr, s))
    out = []
    for label, thr, target in thresholds:
        out.append(Setting(f"{name}: {label}", {"kind": "planner", "model": run.rel(model_dir), "threshold": thr},
                           run.select_summary(model, "hard", threshold=thr), run.dev_run(model, "hard", threshold=thr),
                           target))
    return out


# ---------------------------------------------------------------------- methods
def m_backbone(run: TaskRun) -> dict:
    s = Setting("all layers", {"kind": "full", "model": run.rel(run.s1)}, run.select_summary(run.full, "full"),
                run.dev_run(run.full, "full"))
    return run.result([s])


def _stage2(run: TaskRun) -> Path:
    """Stage 2 at the first target rate, ``stage2_share`` of the budget: the start of every DPBERT (RL)
    model and of DPBERT-soft."""
    a = run.args
    return train_stage("planner_init", run.config("stage2_planner_init", epochs=a.extra_epochs * a.stage2_share,
                                                  target_rate=a.target_rates[0]), init=str(run.s1))


def dpbert_models(run: TaskRun, skip_aware: Optional[str] = None, path_calibration: bool = True) -> tuple:
    """DPBERT's final model per target rate, within the same budget beyond stage 1 as every baseline: stage 2
    takes ``stage2_share`` of ``extra_epochs``, the skip-aware backbone training (``skip_aware``, default
    ``--skip-aware``) the rest: ``adapt`` after each rate's stage 3 on the frozen backbone (``--dpbert-stage3``:
    exact, or sampled beyond 8 layers), then that stage again on the adapted backbone
    (:func:`dpbert_rl.training.planner_stage3`); ``layerdrop`` before stage 2; ``none``. With ``--planner-start
    fixed-path`` (sampled stage 3 only) each rate's stage 3 starts on the best fixed path at that rate
    (:func:`dpbert_rl.training.fixed_start.fixed_path_start`), the start a step-0 candidate.
    Returns ``({r: model}, stage-2 model)``; each variant writes folders of its own (``benchmarks/skip_aware.py``
    trains them side by side)."""
    a = run.args
    skip_aware = skip_aware or getattr(a, "skip_aware", "none")
    backbone_epochs = a.extra_epochs * (1 - a.stage2_share)
    tag = ("_layerdrop" if skip_aware == "layerdrop" else "") + ("" if path_calibration else "_raw")
    kind = resolve_stage3(getattr(a, "dpbert_stage3", "rl"), str(run.s1))
    fixed_start = getattr(a, "planner_start", "stage2") == "fixed-path"
    if fixed_start and kind != "sampled":  # refused before any training
        raise ValueError(f"--planner-start fixed-path starts the sampled stage 3 (12 layers, or --dpbert-stage3 "
                         f"sampled); DPBERT's stage 3 here is {kind!r}")
    if skip_aware == "layerdrop":  # the backbone on random paths first
        ld = train_stage("layerdrop", run.config("dpbert_layerdrop", epochs=backbone_epochs, lr=a.adapt_lr,
                                                 layerdrop=a.layerdrop), init=str(run.s1))
        s2 = train_stage("planner_init", run.config("stage2_planner_init_layerdrop", epochs=a.extra_epochs *
                                                    a.stage2_share, target_rate=a.target_rates[0]), init=str(ld))
    else:
        s2 = _stage2(run)
    models = {}
    for r in a.target_rates:
        if kind == "rl":
            models[r] = train_stage("rl", run.config(f"stage3_rl_r{r:g}", epochs=backbone_epochs, lr=a.stage3_lr,
                                                     target_rate=r, batch_size=a.stage3_batch_size), init=str(s2))
            continue
        start, rtag = s2, tag
        if fixed_start:  # the planners start on the best fixed path at r (as the pipeline's --planner-start)
            rtag = tag + "_fixedstart"
            start = fixed_path_start(run.config(f"stage2_fixed_path_r{r:g}{tag}", target_rate=r), s2,
                                     run.root / f"stage2_fixed_path_r{r:g}{tag}", a.calibration_samples,
                                     TrainConfig.planner_init_bias)
        first = run.root / f"stage3_{kind}_r{r:g}{rtag}"
        adapt = (run.config(f"stage3_adapt_r{r:g}{rtag}", epochs=backbone_epochs, lr=a.adapt_lr), first) \
            if skip_aware == "adapt" else None
        final = run.root / f"stage3_adapt_{kind}_r{r:g}{rtag}" if adapt else first
        cfg = run.config(final.name, target_rate=r)
        if kind == "sampled":  # with a fixed-path start, the start itself is a candidate (step 0)
            cfg = run.config(final.name, target_rate=r, epochs=a.sampled_epochs, batch_size=a.stage3_batch_size,
                             eval_at_start=fixed_start)
        models[r] = planner_stage3(cfg, start, final, a.exact_epochs, a.exact_lr, cache_dir=run.root / "pathtree",
                                   path_calibration=path_calibration, adapt=adapt, kind=kind)[-1]
    return models, s2


def m_dpbert(run: TaskRun) -> dict:
    models, s2 = dpbert_models(run)
    settings, training = [], {}
    for r, s3 in models.items():
        training[f"r={r:g}"] = _done(s3)
        settings += _planner_settings(run, s3, f"r={r:g}")
    return run.result(settings, training={"stage2": _done(s2), **training})


def m_dpbert_soft(run: TaskRun) -> dict:
    a = run.args
    r = a.target_rates[0]
    s2 = _stage2(run)
    soft = train_stage("soft", run.config(f"soft_r{r:g}", epochs=a.extra_epochs * (1 - a.stage2_share),
                                          lr=a.stage3_lr, target_rate=r), init=str(s2))
    return run.result(_planner_settings(run, soft, f"soft r={r:g}"), training={"stage2": _done(s2), "soft": _done(soft)})


def _done(model_dir: Path) -> dict:
    """What a finished stage recorded: its chosen step, selection score and its dev score (reported)."""
    d = json.loads((Path(model_dir) / "DONE").read_text())
    return {"best_step": d.get("best_step"), "best_select": d.get("best_select"), "steps": d.get("steps"),
            "dev_score": (d.get("dev") or {}).get("score")}


def _exit_model(run: TaskRun, kind: str) -> tuple:
    """The trained early-exit model of ``kind`` (deebert, pabee, berxit), trained once and cached under
    runs/; its checkpoint chosen on the selection split (mean score of its exits)."""
    a = run.args
    d = run.root / kind
    meta = d / ee.EXIT_META_FILE
    if meta.is_file():
        return run.model(d, "exit"), d, json.loads(meta.read_text())
    base = DPBert.load(run.s1)
    metric = run.t.metric
    common = dict(epochs=a.extra_epochs, seed=a.seed, log_dir=d, progress=False, evals_per_epoch=a.evals_per_epoch,
                  batch_size=a.batch_size)
    if kind == "deebert":
        model = ee.EarlyExitBert(base)
        feats = ee.layer_features(model, run.train, run.collate, progress=False)
        select = ee.layer_features(model, run.select, run.collate, progress=False)
        info = ee.train_offramps_frozen(model, feats, lr=a.ramp_lr, select_fn=ee.selection_scorer(model, select, metric),
                                        **common)
    elif kind == "pabee":
        model = ee.EarlyExitBert(base, shared_pooler=True)
        info = ee.train_exits_joint(model, run.train, run.collate, lr=a.adapt_lr, ramp_lr=a.ramp_lr,
                                    select_fn=ee.selection_scorer(model, run.select, metric, run.collate), **common)
    elif kind == "berxit":
        model = ee.EarlyExitBert(base)
        info = ee.train_berxit(model, run.train, run.collate, lr=a.adapt_lr, ramp_lr=a.ramp_lr,
                               select_fn=ee.selection_scorer(model, run.select, metric, run.collate), **common)
    else:
        raise ValueError(kind)
    info = {"kind": kind, "epochs": a.extra_epochs, **info}
    model.save(d, meta=info)
    return run.model(d, "exit"), d, info


def _exit_settings(run: TaskRun, kind: str, rule: str) -> dict:
    """An early-exit model's settings: thresholds calibrated on the selection split to every target
    speed-up (entropy, learned), or every patience; their selection scores replayed from the selection
    split's exit statistics, their dev scores from real batched passes."""
    a = run.args
    model, d, info = _exit_model(run, kind)
    L = model.num_layers
    reg = run.t.is_regression
    stats = ee.exit_statistics(model, run.select, run.collate)
    grid = []
    if rule == "patience":
        for t in range(0, L - 1):  # t >= L - 1 can never exit early: the same as t = 0
            grid.append((f"patience {t}", {"rule": "patience", "patience": t, "tolerance": a.regression_tolerance},
                         None))
    else:
        for s in a.target_speedups:
            thr, got = ee.calibrate_exit(stats, rule, L / s, regression=reg)
            what = "entropy <" if rule == "entropy" else "exit score >"
            grid.append((f"{what} {thr:.4f} (calibrated to {s:g}x, selection {L / got:.2f}x)",
                         {"rule": rule, "threshold": thr}, s))
    settings = []
    for label, rule_kw, target in grid:
        exits = ee.exits_from_statistics(stats, regression=reg, **rule_kw)
        sel = score_run(run.t, ee.statistics_run(model, stats, exits))
        settings.append(Setting(label, {"kind": "exit", "model": run.rel(d), **rule_kw}, sel,
                                run.exit_dev_run(model, **rule_kw), target))
    return run.result(settings, training={k: v for k, v in info.items() if k != "evaluations"})


def m_deebert(run: TaskRun) -> dict:
    if run.t.is_regression:
        return {"points": [], "note": "DeeBERT's entropy rule needs class probabilities; not defined for regression "
                                      "(the paper's Table 1 has no STS-B entry for it either)"}
    return _exit_settings(run, "deebert", "entropy")


def m_pabee(run: TaskRun) -> dict:
    return _exit_settings(run, "pabee", "patience")


def m_berxit(run: TaskRun) -> dict:
    return _exit_settings(run, "berxit", "learned")


def m_layerdrop(run: TaskRun) -> dict:
    a = run.args
    ld_dir = train_stage("layerdrop", run.config(f"layerdrop_p{a.layerdrop:g}", epochs=a.extra_epochs, lr=a.adapt_lr,
                                                 layerdrop=a.layerdrop), init=str(run.s1))
    model = run.model(ld_dir)
    L = model.num_layers
    settings = []
    for keep in range(L, 1, -1):
        path = ee.layerdrop_subset(L, keep)
        acts = torch.tensor(path, dtype=torch.float32)
        label = f"keep {keep}: layers {','.join(str(i + 1) for i, x in enumerate(path) if x)}"
        settings.append(Setting(label, {"kind": "path", "model": run.rel(ld_dir), "path": path},
                                run.select_summary(model, "path", actions=acts), run.dev_run(model, "path", actions=acts),
                                L / keep))
    return run.result(settings, training=_done(ld_dir))


def kl_depths(kl_layers, num_layers: int) -> list:
    """BERT-kL's depths: ``kl_layers`` when given, else L/2, 2L/3 and 5L/6 (3, 4, 5 of 6; 6, 8, 10 of 12)."""
    if kl_layers:
        bad = [k for k in kl_layers if not 1 <= k < num_layers]
        if bad:
            raise ValueError(f"--kl-layers {bad}: a depth k must be in [1, {num_layers - 1}] for a {num_layers}-layer "
                             "backbone")
        return list(kl_layers)
    return sorted({max(1, round(num_layers * f)) for f in (1 / 2, 2 / 3, 5 / 6)})


def m_bert_kl(run: TaskRun) -> dict:
    a = run.args
    settings, training = [], {}
    for k in kl_depths(a.kl_layers, run.full.num_layers):
        init = run.root / f"bert_{k}l_init"
        if not (init / "config.json").is_file():
            ee.truncate(DPBert.load(run.s1), k).save(init)
        d = train_stage("finetune", run.config(f"bert_{k}l", epochs=a.extra_epochs, lr=a.adapt_lr), init=str(init))
        model = run.model(d)
        training[f"{k}L"] = _done(d)
        settings.append(Setting(f"BERT-{k}L", {"kind": "full", "model": run.rel(d)}, run.select_summary(model, "full"),
                                run.dev_run(model, "full"), run.full.num_layers / k))
    return run.result(settings, training=training)


def greedy_static_paths(run: TaskRun) -> dict:
    """Where the path tree is too big to walk (more than ``MAX_TREE_LAYERS`` layers): backward elimination
    (:func:`dpbert_rl.evaluation.diagnostics.greedy_fixed_paths`) on the calibration subset of the selection
    split (stage-1 backbone). Returns ``{k: path}`` for k = L-1 .. 2 (cached in the task folder: sum of k path
    passes over the subset, 75 at L = 12)."""
    cache = run.root / f"greedy_paths_calib{len(run.calib)}.json"  # the subset they were chosen on
    if cache.is_file():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    L = run.full.num_layers
    out = {k: path for k, (path, *_) in greedy_fixed_paths(run.full, run.t, run.calib, run.collate).items() if k < L}
    cache.write_text(json.dumps(out))
    return out


def m_static_path(run: TaskRun) -> dict:
    """The best single path for each layer count, chosen on the selection split (stage-1 backbone): among every
    path where the tree can be walked, else by greedy backward elimination (:func:`greedy_static_paths`)."""
    L = run.full.num_layers
    if L > oracle.MAX_TREE_LAYERS:
        settings = []
        for k, path in sorted(greedy_static_paths(run).items()):
            acts = torch.tensor(path, dtype=torch.float32)
            label = f"{k} layers (greedy): {','.join(str(i + 1) for i, x in enumerate(path) if x)}"
            settings.append(Setting(label, {"kind": "path", "model": run.rel(run.s1), "path": path},
                                    run.select_summary(run.full, "path", actions=acts),
                                    run.dev_run(run.full, "path", actions=acts), L / k))
        return run.result(settings, note=f"{L} layers: paths by greedy backward elimination on the selection split, "
                                         "not among all paths")
    res = run.paths_of("select")
    labels = res["labels"]

    def score_fn(preds):
        if run.t.is_regression:
            return compute_metrics(run.t.metric, preds, labels)["score"]
        return compute_metrics(run.t.metric, preds.astype(int), labels.astype(int))["score"]

    best = oracle.best_static_paths(res, score_fn)
    L = run.full.num_layers
    settings = []
    for k in range(2, L):
        path = [int(x) for x in res["paths"][best[k][0]]]
        acts = torch.tensor(path, dtype=torch.float32)
        label = f"{k} layers: {','.join(str(i + 1) for i, x in enumerate(path) if x)}"
        settings.append(Setting(label, {"kind": "path", "model": run.rel(run.s1), "path": path},
                                run.select_summary(run.full, "path", actions=acts),
                                run.dev_run(run.full, "path", actions=acts), L / k))
    return run.result(settings)


def m_oracle(run: TaskRun) -> dict:
    """For every dev input the cheapest path that is right, within a layer budget: uses the dev
    labels, so an upper bound, never a choice (no selection score). Not run beyond ``MAX_TREE_LAYERS`` layers."""
    L = run.full.num_layers
    if L > oracle.MAX_TREE_LAYERS:
        return {"points": [], "note": f"{L} layers: every path of every dev input would take {2 ** L - 1:,} layer calls "
                                      "per input; the oracle is run up to 8 layers"}
    res = run.paths_of("dev")
    settings = []
    for k in range(1, L + 1):
        idx = oracle.oracle_choices(res, run.t.is_regression, k)
        dev = {"predictions": res["predictions"][np.arange(len(idx)), idx], "labels": res["labels"],
               "actions": res["paths"][idx]}
        settings.append(Setting(f"at most {k} layers per input", {"kind": "oracle", "max_layers": k}, None, dev))
    return run.result(settings, note="uses the dev labels: an upper bound, not a method")


RUNNERS = {"backbone": m_backbone, "dpbert": m_dpbert, "dpbert_soft": m_dpbert_soft, "deebert": m_deebert,
           "pabee": m_pabee, "berxit": m_berxit, "layerdrop": m_layerdrop, "bert_kl": m_bert_kl,
           "static_path": m_static_path, "oracle": m_oracle}


def keep_paths(run: TaskRun, out: dict) -> None:
    """Table 3 material: the dev inputs with the layers DPBERT ran for each, for every DPBERT point."""
    for p in out["points"]:
        acts = np.asarray(p["_actions"])
        n = acts.sum(1)
        order = np.argsort(n, kind="stable")
        pick = list(order[:3]) + list(order[::-1][:3])
        names = run.t.label_names
        p["examples"] = [{"index": int(i), "text_a": run.dev_raw[int(i)]["text_a"], "text_b": run.dev_raw[int(i)]["text_b"],
                          "label": names[run.dev_raw[int(i)]["label"]] if names else run.dev_raw[int(i)]["label"],
                          "layers": [j + 1 for j in range(acts.shape[1]) if acts[i, j] > 0]} for i in pick]


# ---------------------------------------------------------------------- the budget, before running
def backbone_scale(backbone: str, tasks, results_dir: Path = RESULTS) -> dict:
    """What ``--plan`` multiplies MiniLM's step seconds and batch-1 milliseconds by for ``backbone``, per task:
    measured where ``benchmarks/train_step.py`` wrote files for both backbones into ``results_dir`` at one
    batch size, length and thread count (the ratio of their seconds per padded token, plain order, and of their
    batch-1 forwards), else the ratio of layers x hidden^2 (the matrix products' share). Also the backbone's
    layer count."""
    from transformers import AutoConfig

    from dpbert_rl.model.backbone import resolve_backbone_path

    def shape(name):
        c = AutoConfig.from_pretrained(resolve_backbone_path(name))
        return int(c.num_hidden_layers), int(c.hidden_size)

    L, d = shape(backbone)
    L0, d0 = shape("minilm")
    rough = (L * d * d) / (L0 * d0 * d0)
    out = {"layers": L, "step": {t: rough for t in tasks}, "batch1": {t: rough for t in tasks},
           "source": {t: f"layers x hidden^2 against MiniLM ({rough:.1f}x)" for t in tasks}}
    if rough == 1.0:
        return out
    files = [results_dir / f"train_step_{Path(b).name}.json" for b in (backbone, "minilm")]
    if not all(f.is_file() for f in files):
        return out
    mine, base = (json.loads(f.read_text()) for f in files)
    if any(mine.get(k) != base.get(k) for k in ("batch_size", "max_seq_length", "threads")):
        return out
    rows = [{r["task"]: r for r in res["rows"]} for res in (mine, base)]
    for t in tasks:
        if t in rows[0] and t in rows[1] and all("plain" in rows[i][t]["variants"] for i in (0, 1)):
            a, b = rows[0][t], rows[1][t]
            per_tok = [x["variants"]["plain"]["epoch_seconds"] / x["variants"]["plain"]["epoch_padded_tokens"]
                       for x in (a, b)]
            out["step"][t] = per_tok[0] / per_tok[1]
            out["batch1"][t] = a["batch1_ms_full"] / b["batch1_ms_full"]
            out["source"][t] = f"measured (train_step_*.json): step {out['step'][t]:.1f}x, batch-1 {out['batch1'][t]:.1f}x"
    return out


def plan(args, sizes: dict, scale: Optional[dict] = None) -> list:
    """Estimated seconds per task and method of a run with ``args`` (``sizes``: task -> ``fit`` examples
    used, ``select`` examples, ``dev`` examples), from :data:`STEP_SECONDS` and :data:`BATCH1_MS` (MiniLM's)
    times ``scale`` (:func:`backbone_scale`; default MiniLM's own)."""
    rows = []
    E, sh = args.extra_epochs, args.stage2_share
    n_targets = len(args.target_speedups)
    L = scale["layers"] if scale else 6
    tree = (2 ** L - 1) / L  # full passes that one input's path tree costs (10.5 at 6 layers)
    kind = stage3_for(getattr(args, "dpbert_stage3", "rl"), L)
    kl = kl_depths(args.kl_layers, L)
    for task, (n, sel, dev) in sizes.items():
        step, ms = STEP_SECONDS.get(task, 1.5), BATCH1_MS.get(task, 12.0) / 1000
        if scale:
            step, ms = step * scale["step"][task], ms * scale["batch1"][task]
        ep = math.ceil(n / 32) * step  # one epoch of batch-32 steps
        timed = min(dev, args.latency_samples or dev)
        cal = min(sel, args.calibration_samples or sel)

        def infer(m, ms=ms):  # a batched inference pass over m inputs
            return m * ms * 0.6

        def timing(settings, mean_cost=0.6, timed=timed, ms=ms):  # full + self + each setting, per input and pass
            return timed * args.latency_repeats * ms * (2 + settings * mean_cost)

        def evals(epochs, sel=sel):  # selection-split evaluations
            return args.evals_per_epoch * epochs * infer(sel)

        r3 = args.samples * 0.8  # a stage-3 epoch runs `samples` paths per input, some layers skipped
        skip_aware = getattr(args, "skip_aware", "none")
        adapt = E * (1 - sh) * ep * 0.8 + evals(E * (1 - sh))  # the backbone on the planners' paths
        if kind in ("exact", "sampled"):
            if kind == "exact":  # a path-tree cache (fit + select; one for every r on one backbone), ~60 s per r
                once = infer(n + sel) * tree + 60
                stage3 = infer(n + sel) * tree + len(args.target_rates) * 60
            else:  # forward only (about a third of a step), `samples` paths per input, some layers skipped
                once = args.sampled_epochs * (ep * args.samples * 0.25 + evals(1))
                stage3 = len(args.target_rates) * once
            if skip_aware == "adapt":  # per r: the backbone on the planners' paths, then stage 3 again
                stage3 += len(args.target_rates) * (adapt + once)
            elif skip_aware == "layerdrop":  # once: random subsets before stage 2
                stage3 += adapt
            if kind == "sampled" and getattr(args, "planner_start", "stage2") == "fixed-path":
                # per r: the backward elimination down to r's layers on the calibration inputs
                stage3 += sum(sum(k * (k - 1) / L for k in range(path_layers(L, r) + 1, L + 1)) * infer(cal)
                              for r in args.target_rates)
        else:
            stage3 = len(args.target_rates) * E * (1 - sh) * ep * r3 + evals(E * len(args.target_rates))
        if L > oracle.MAX_TREE_LAYERS:  # greedy backward elimination on the calibration subset
            static = sum(k * (k - 1) / L for k in range(3, L + 1)) * infer(cal) + timing(L - 2)
            oracle_cost = 0.0
        else:
            static = infer(sel) * tree + timing(L - 2)
            oracle_cost = infer(dev) * tree + timing(L)
        est = {
            "stage1": args.stage1_epochs * ep + evals(args.stage1_epochs),
            "backbone": timing(1),
            "dpbert": E * sh * ep + stage3 + evals(E) + len(args.target_rates) * (n_targets * 6 + n_targets + 1) * infer(cal) + timing(len(args.target_rates) * (n_targets + 1)),
            "dpbert_soft": E * (1 - sh) * ep + evals(E) + (n_targets * 7 + 1) * infer(cal) + timing(n_targets + 1),
            "deebert": infer(n + 2 * sel) + timing(n_targets),
            "pabee": 1.05 * E * ep + evals(E) * 1.2 + timing(L - 1),
            "berxit": 1.05 * E * ep + evals(E) * 1.2 + timing(n_targets),
            "layerdrop": (1 - args.layerdrop + 0.1) * E * ep + evals(E) + timing(L - 1),
            "bert_kl": sum(k / L for k in kl) * (E * ep + evals(E)) + timing(len(kl), 0.5),
            "static_path": static,
            "oracle": oracle_cost,
        }
        rows.append({"task": task, "fit": n, "select": sel, "dev": dev, "timed": timed,
                     **{k: v for k, v in est.items() if k == "stage1" or k in args.methods},
                     "total": sum(v for k, v in est.items() if k == "stage1" or k in args.methods)})
    return rows


def measured_seconds(task_dir: Path) -> dict:
    """Wall-clock seconds that an earlier run under ``task_dir`` (``<output-dir>/<task>``) spent per method,
    from its ``points/<method>.json``, and on stage 1 (its ``DONE``; since the last resume if it was
    interrupted): what ``--plan`` puts beside its estimate. Empty where nothing ran."""
    out = {}
    done = task_dir / "stage1_finetune" / "model" / "DONE"
    if done.is_file():
        out["stage1"] = json.loads(done.read_text()).get("seconds")
    for f in sorted((task_dir / "points").glob("*.json")):
        out[f.stem] = json.loads(f.read_text()).get("seconds")
    return {k: v for k, v in out.items() if v is not None}
