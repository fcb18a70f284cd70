"""Benchmark: one model for every speed against fixed-rate models retrained per speed (issue 24).

Per task, on the packaged MiniLM-L6 and the local GLUE files:

1. stage 1 (fine-tune, all layers) and stage 2 (planner initialisation), as the pipeline runs them;
2. **one model**: price-conditioned planners trained once by the exact stage over a range of layer prices
   (``--budget-range``), frozen backbone;
3. **fixed-rate**: for every requested speed-up ``s``, the default exact stage trained for the skip rate
   ``r = 1 - 1/s`` (dual price), one model per speed;
4. every model is set to ``L / s`` layers on average, twice: on the selection split's inputs, and on dev's
   inputs read without their labels (:func:`dpbert_rl.data.load_inputs`); dev is then scored once per
   (model, speed, calibration), and its batch-1 latency measured against the full backbone, interleaved.

Writes ``benchmarks/results/budget.json`` (a list of rows: task, model, calibration, requested_layers,
layers_executed_mean, score, speedup_ideal, speedup_measured, commit, command, machine), ``budget.md`` and
``budget.png``. Runs live under ``--output-dir`` and resume; results are rewritten after every task.

    python benchmarks/budget.py --data-dir ../shared/data/glue --threads 2     # all four tasks
    python benchmarks/budget.py --report-only                                  # redraw from budget.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, markdown_table  # noqa: E402
from _common import pinned_code_commit as commit  # noqa: E402

from dpbert_rl.data import collator, get_task, load_inputs, load_split, tokenize  # noqa: E402
from dpbert_rl.evaluation.evaluate import evaluate_model, speedup_ideal  # noqa: E402
from dpbert_rl.evaluation.latency import encode_examples, interleaved_latency, machine_info, sample_indices  # noqa: E402
from dpbert_rl.model import DPBert  # noqa: E402
from dpbert_rl.model.budget import encode_inputs, knob_name, set_knob, solve_knob  # noqa: E402
from dpbert_rl.training import TrainConfig, train_stage  # noqa: E402
from dpbert_rl.training.exact import ExactConfig, train_exact  # noqa: E402

TASKS = ("rte", "mrpc", "stsb", "sst2")
SPEEDUPS = (1.2, 1.5, 2.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated GLUE tasks")
    ap.add_argument("--speedups", default=",".join(map(str, SPEEDUPS)), help="requested ideal speed-ups")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--output-dir", default="runs/bench-budget")
    ap.add_argument("--max-train-samples", type=int, default=1500,
                    help="seeded subset of each task's fit split for every stage (CPU budget; stated up front)")
    ap.add_argument("--max-eval-samples", type=int, default=600,
                    help="first N inputs of the selection split and of dev (calibrated on, scored and timed)")
    ap.add_argument("--stage1-epochs", type=float, default=3.0)
    ap.add_argument("--stage2-epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4, help="stages 1-2")
    ap.add_argument("--exact-epochs", type=float, default=20.0)
    ap.add_argument("--exact-lr", type=float, default=1e-2)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--cost", type=float, default=0.05, help="fixed-rate: the dual price's start")
    ap.add_argument("--dual-lr", type=float, default=0.02)
    ap.add_argument("--entropy-coef", type=float, default=0.01)
    ap.add_argument("--budget-range", type=float, nargs=2, default=(-0.08, 0.08), metavar=("LOW", "HIGH"),
                    help="one model: the layer prices it is trained over (the fixed-rate runs' dual prices end "
                         "between -0.03 and 0.02; a negative price pays for running a layer)")
    ap.add_argument("--calibration-iterations", type=int, default=12, help="bisection steps per calibration")
    ap.add_argument("--latency-samples", type=int, default=64, help="dev inputs timed per point (seeded sample)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--results", default=str(RESULTS / "budget.json"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite budget.md and budget.png")
    return ap.parse_args(argv)


def train_models(task: str, args) -> dict:
    """Stage 1 and 2, then the one model and a fixed-rate model per speed-up; returns name -> model dir."""
    root = Path(args.output_dir) / task
    base = TrainConfig(task=task, backbone=args.backbone, data_dir=args.data_dir, lr=args.lr, seed=args.seed,
                       max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                       evals_per_epoch=3, target_rate=0.35, lam=args.lam, cost=args.cost, dual_lr=args.dual_lr,
                       planner_features="mean", progress=False)
    s1 = train_stage("finetune", replace(base, output_dir=str(root / "stage1"), epochs=args.stage1_epochs))
    s2 = train_stage("planner_init", replace(base, output_dir=str(root / "stage2"), epochs=args.stage2_epochs),
                     init=str(s1))
    exact = dict(task=task, data_dir=args.data_dir, cache_dir=str(root / "pathtree"), lr=args.exact_lr,
                 epochs=args.exact_epochs, lam=args.lam, cost=args.cost, dual_lr=args.dual_lr,
                 entropy_coef=args.entropy_coef, max_train_samples=args.max_train_samples,
                 max_eval_samples=args.max_eval_samples, seed=args.seed, progress=False, score_dev=False)
    models = {"backbone": s1, "one-model": train_exact(str(s2), ExactConfig(
        output_dir=str(root / "one_model_linear"), budget_range=tuple(args.budget_range), rate_control="none",
        target_rate=None, **exact))}
    for s in args.speedups:
        r = round(1.0 - 1.0 / s, 4)
        models[f"fixed-rate@{s:g}"] = train_exact(str(s2), ExactConfig(
            output_dir=str(root / f"fixed_r{r:g}"), target_rate=r, rate_control="dual", **exact))
    return models


def measure(task: str, models: dict, args) -> list:
    """Every (model, speed, calibration) row of one task."""
    t = get_task(task)
    rows = []
    ref = DPBert.load(models["backbone"]).eval()
    dev_inputs = load_inputs(t, "dev", args.data_dir, args.max_eval_samples)  # labels never read
    sel_inputs = load_inputs(t, "select", args.data_dir, args.max_eval_samples)
    dev = tokenize(load_split(t, "dev", args.data_dir, args.max_eval_samples), ref.tokenizer, 128)
    collate = collator(ref.tokenizer)
    timed = [encode_examples(dev.select([i]))[0] for i in sample_indices(len(dev), args.latency_samples, args.seed)]
    for s in args.speedups:
        for name in ("one-model", f"fixed-rate@{s:g}"):
            model = DPBert.load(models[name]).eval()
            L = model.num_layers
            target = L / s
            for calibration, inputs in (("selection", sel_inputs), ("unlabeled-dev", dev_inputs)):
                t0 = time.time()
                knob, reached = solve_knob(model, encode_inputs(model, inputs, 128), target, iterations=args.calibration_iterations)
                set_knob(model, knob)
                res = evaluate_model(model, t, dev, collate, 64, "hard")  # dev's labels: scored once, here
                lat = interleaved_latency(
                    {"full": lambda ex: ref(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"),
                                            mode="full"),
                     "dpbert": lambda ex, m=model: m(ex["input_ids"], ex["attention_mask"],
                                                     ex.get("token_type_ids"), mode="hard")},
                    timed, repeats=args.repeats, threads=args.threads)
                rows.append({
                    "task": task, "model": "one-model" if name == "one-model" else "fixed-rate",
                    "trained_for": None if name == "one-model" else s, "calibration": calibration,
                    "requested_speedup": s, "requested_layers": target, "knob": knob_name(model), "knob_value": knob,
                    "calibration_layers": reached, "layers_executed_mean": res["layers_executed_mean"],
                    "layers_off": res["layers_executed_mean"] - target, "score": res["score"], "metric": t.metric,
                    "speedup_ideal": speedup_ideal(res["layers_executed_mean"], L),
                    "speedup_measured": lat["dpbert"]["speedup"], "latency_ms": lat["dpbert"]["latency_ms"],
                    "full_latency_ms": lat["full"]["latency_ms"], "num_dev": len(dev),
                    "num_calibration_inputs": len(inputs["text_a"]), "seconds": time.time() - t0,
                    "commit": commit(), "command": command(), "machine": machine_info(),
                })
                print(f"[{task}] {name:>16} {calibration:>13} s={s:g}: {t.metric} {res['score']:.2f}, layers "
                      f"{res['layers_executed_mean']:.2f} (asked {target:.2f}), measured {rows[-1]['speedup_measured']:.2f}x",
                      flush=True)
    full = evaluate_model(ref, t, dev, collate, 64, "full")
    rows.append({"task": task, "model": "backbone", "calibration": None, "requested_speedup": 1.0,
                 "requested_layers": float(ref.num_layers), "layers_executed_mean": float(ref.num_layers),
                 "score": full["score"], "metric": t.metric, "speedup_ideal": 1.0, "speedup_measured": 1.0,
                 "num_dev": len(dev), "commit": commit(), "command": command(), "machine": machine_info()})
    return rows


def report(rows: list, md_path: Path, png_path: Path) -> None:
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lines = ["# One model, any speed: the budget knob (`benchmarks/budget.py`)", "",
             f"Commit(s): {sorted({r['commit'] for r in rows})}. Command: `{rows[0]['command']}`.", "",
             "Every model is set to `L / s` layers on average on the named inputs (no labels read), then scored "
             "once on dev. `one-model`: price-conditioned planners trained once over a range of layer prices; "
             "`fixed-rate`: the exact stage retrained for the skip rate `1 - 1/s` at each speed-up. "
             "`layers off`: dev's mean layers minus the requested ones.", ""]
    cols = [("task", "task", ""), ("model", "model", ""), ("calibrated on", "calibration", ""),
            ("speed-up asked", "requested_speedup", ".2f"), ("layers asked", "requested_layers", ".2f"),
            ("layers on dev", "layers_executed_mean", ".2f"), ("layers off", "layers_off", "+.2f"),
            ("score", "score", ".2f"), ("ideal", "speedup_ideal", ".2f"),
            ("measured", "speedup_measured", ".2f")]
    lines.append(markdown_table([dict(r, layers_off=r.get("layers_off", 0.0)) for r in rows], cols))
    lines += ["", "## Targets", ""]
    for task in tasks:
        gaps = []
        for s in sorted({r["requested_speedup"] for r in rows if r["task"] == task and r["model"] != "backbone"}):
            one = [r for r in rows if r["task"] == task and r["model"] == "one-model" and r["requested_speedup"] == s
                   and r["calibration"] == "unlabeled-dev"]
            fix = [r for r in rows if r["task"] == task and r["model"] == "fixed-rate" and r["requested_speedup"] == s
                   and r["calibration"] == "unlabeled-dev"]
            if one and fix:
                gaps.append((s, one[0]["score"] - fix[0]["score"]))
        dev_off = [abs(r["layers_off"]) for r in rows if r["task"] == task and r.get("calibration") == "unlabeled-dev"]
        sel_off = [r["layers_off"] for r in rows if r["task"] == task and r.get("calibration") == "selection"]
        ok = all(g >= -0.5 for _, g in gaps)
        lines.append(f"- **{task}**: one model minus fixed-rate (dev-calibrated) "
                     + ", ".join(f"{g:+.2f} at {s:g}x" for s, g in gaps)
                     + f" ({'within 0.5 everywhere' if ok else 'below by more than 0.5 somewhere'}); "
                     f"rate on dev when calibrated on dev's inputs: worst |off| {max(dev_off, default=0):.2f} layers "
                     f"({'within' if max(dev_off, default=0) <= 0.1 else 'outside'} +-0.1); calibrated on the "
                     f"selection split instead: off by {min(sel_off, default=0):+.2f} to {max(sel_off, default=0):+.2f}.")
    md_path.write_text("\n".join(lines) + "\n")
    plot(rows, tasks, png_path)


def plot(rows: list, tasks: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model, cal, style in (("one-model", "unlabeled-dev", "o-"), ("fixed-rate", "unlabeled-dev", "s--"),
                                  ("one-model", "selection", "o:"), ("fixed-rate", "selection", "s:")):
            pts = sorted((r["speedup_measured"], r["score"]) for r in rows
                         if r["task"] == task and r["model"] == model and r["calibration"] == cal)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{model} ({cal})", alpha=1.0 if cal == "unlabeled-dev" else 0.5)
        full = [r for r in rows if r["task"] == task and r["model"] == "backbone"]
        if full:
            ax.axhline(full[0]["score"], color="gray", lw=0.8, label="backbone")
        ax.set_title(task)
        ax.set_xlabel("measured speed-up (batch 1)")
    axes[0][0].set_ylabel("dev score")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.speedups = [float(x) for x in str(args.speedups).split(",") if x.strip()]
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.is_file() else []
    if args.report_only:
        report(rows, results.with_suffix(".md"), results.with_suffix(".png"))
        return
    commit()
    torch.set_num_threads(args.threads)
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        models = train_models(task, args)
        rows = [r for r in rows if r["task"] != task] + measure(task, models, args)
        results.write_text(json.dumps(rows, indent=1, default=float) + "\n")
        report(rows, results.with_suffix(".md"), results.with_suffix(".png"))


if __name__ == "__main__":
    main()
