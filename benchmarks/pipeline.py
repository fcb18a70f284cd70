"""Benchmark: the DPBERT pipeline (stages 1-3 + evaluation) on RTE, MRPC, SST-2 and STS-B.

Runs ``dpbert_rl.training.run_pipeline`` with the packaged MiniLM-L6 backbone on the local GLUE
files, then writes ``benchmarks/results/pipeline.json`` (one object per task) and
``pipeline.md``. Each task's runs live under ``runs/bench-pipeline/<task>`` and resume when the
script is run again; the results files are rewritten after every task.

    python benchmarks/pipeline.py --data-dir ../shared/data/glue            # all four tasks
    python benchmarks/pipeline.py --data-dir ../shared/data/glue --tasks rte
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, layer_heatmap, markdown_table  # noqa: E402
from _common import pinned_code_commit as commit  # noqa: E402  (the last commit that changed code)

from dpbert_rl.evaluation.latency import machine_info  # noqa: E402
from dpbert_rl.training import PipelineConfig, resolve_stage3, run_pipeline  # noqa: E402
from dpbert_rl.training.config import PLANNER_START, STAGE3, unread_by_stage3  # noqa: E402
from dpbert_rl.training.fixed_start import path_layers  # noqa: E402

# Per-task budget for a 2-core CPU. The paper runs 5 epochs per stage; we run fewer (see README).
TASK_SETTINGS = {
    "rte": dict(max_train_samples=None),
    "mrpc": dict(max_train_samples=None),
    "sst2": dict(max_train_samples=5000),
    "stsb": dict(max_train_samples=None),
}


def task_settings(task: str, args) -> dict:
    """The per-task budget: :data:`TASK_SETTINGS`, with ``--max-train-samples`` for every task when given."""
    got = dict(TASK_SETTINGS.get(task, {}))
    if args.max_train_samples:
        got["max_train_samples"] = args.max_train_samples
    return got


def plan_rows(args, sizes: dict, scale: dict) -> list:
    """Estimated seconds per task and stage of this run (``sizes``: task -> fit examples used, selection and dev
    examples), from the trade-off benchmark's MiniLM step and batch-1 costs times ``scale``
    (``tradeoff_methods.backbone_scale``)."""
    from tradeoff_methods import BATCH1_MS, STEP_SECONDS

    L = scale["layers"]
    stage3 = resolve_stage3(args.stage3, args.backbone)
    rows = []
    for task, (n, sel, dev) in sizes.items():
        ms = BATCH1_MS.get(task, 12.0) / 1000 * scale["batch1"][task]
        ep = -(-n // 32) * STEP_SECONDS.get(task, 1.5) * scale["step"][task]  # one epoch of batch-32 steps

        def evals(epochs):  # selection-split evaluations, a batched pass costs ~0.6 of batch-1 time per input
            return args.evals_per_epoch * epochs * sel * ms * 0.6

        if stage3 == "exact":
            s3 = (n + sel) * ms * 0.6 * (2 ** L - 1) / L + 60
        elif stage3 == "sampled":
            s3 = args.stage3_epochs * (ep * args.samples * 0.25 + evals(1))
        else:
            s3 = args.stage3_epochs * (ep * args.samples * 0.8 + evals(1))
        adapt = 0.5 * ep * 0.8 + evals(0.5) if stage3 != "rl" else 0.0  # PipelineConfig.skip_aware_epochs
        keep = path_layers(L, args.target_rate)  # a fixed-path start: backward elimination down to keep layers
        fixed = args.planner_start == "fixed-path" and stage3 == "sampled"
        passes = sum(range(keep + 1, L + 1)) + 1 if fixed else 0
        est = {"stage1": args.stage1_epochs * ep + evals(args.stage1_epochs),
               "stage2": args.stage2_epochs * ep + evals(args.stage2_epochs),
               "stage3": s3 * (2 if adapt else 1) + adapt,
               "evaluation": min(dev, args.latency_samples or dev) * 3 * ms * 1.7 + dev * ms * 0.6 * 2}
        if passes:  # each pass runs the path's layers, from L down to keep
            est["fixed_path_start"] = passes * min(sel, args.calibration_samples) * ms * 0.6 * (keep + L) / (2 * L)
        rows.append({"task": task, "fit": n, "select": sel, "dev": dev, **est, "total": sum(est.values())})
    return rows


def print_plan(args) -> None:
    from tradeoff_methods import backbone_scale

    from dpbert_rl.data import load_split

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sizes = {}
    for t in tasks:
        n_fit = len(load_split(t, "fit", args.data_dir))
        cap = task_settings(t, args).get("max_train_samples")
        sizes[t] = (min(n_fit, cap or n_fit), len(load_split(t, "select", args.data_dir)),
                    len(load_split(t, "dev", args.data_dir)))
    scale = backbone_scale(args.backbone, tasks)  # train_step.py's files in benchmarks/results
    rows = plan_rows(args, sizes, scale)
    print(f"backbone {args.backbone}: {scale['layers']} layers, stage 3 {resolve_stage3(args.stage3, args.backbone)}; "
          "costs against MiniLM: " + "; ".join(f"{t} {src}" for t, src in scale["source"].items()))
    cols = [k for k in rows[0] if k != "task"]
    print("| task | " + " | ".join(cols) + " |")
    for r in rows:
        print(f"| {r['task']} | " + " | ".join(f"{r[k]:.0f}" for k in cols) + " |")
    print(f"estimated total: {sum(r['total'] for r in rows) / 3600:.2f} h (seconds per column)")


def task_config(task: str, args, unread: set) -> PipelineConfig:
    """The pipeline's configuration for ``task`` from this script's arguments. The settings its stage 3 does not
    read (``unread``, :func:`~dpbert_rl.training.config.unread_by_stage3`: the joint REINFORCE ones under 'exact')
    are left at their defaults, so that a benchmark run with its own defaults does not warn about them."""
    settings = dict(
        stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs, stage3_epochs=args.stage3_epochs,
        target_rate=args.target_rate, lam=args.lam, beta=args.beta, seed=args.seed, threads=args.threads,
        lr=args.lr, stage3_lr=args.stage3_lr, planner_lr=args.planner_lr, evals_per_epoch=args.evals_per_epoch,
        stage3_batch_size=args.stage3_batch_size, samples=args.samples, cost=args.cost, dual_lr=args.dual_lr,
        reward=args.reward, rate_control=args.rate_control, planner_features=args.planner_features,
        stage3=args.stage3, exact_epochs=args.exact_epochs, exact_lr=args.exact_lr,
        entropy_coef=args.entropy_coef, progress=False, max_seq_length=args.max_seq_length,
        latency_samples=args.latency_samples, group_by_length=args.group_by_length,
        mixed_precision=args.mixed_precision, calibrate_threshold=args.calibrate_threshold,
        calibration_samples=args.calibration_samples, rate_on_eval_inputs=args.rate_on_eval_inputs,
        planner_start=args.planner_start, **task_settings(task, args),
    )
    return PipelineConfig(task=task, backbone=args.backbone, data_dir=args.data_dir,
                          output_dir=f"{args.output_dir}/{task}",
                          **{k: v for k, v in settings.items() if k not in unread})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="rte,mrpc,sst2,stsb", help="comma-separated GLUE tasks")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--output-dir", default="runs/bench-pipeline")
    ap.add_argument("--stage1-epochs", type=float, default=3.0)
    ap.add_argument("--stage2-epochs", type=float, default=1.0)
    ap.add_argument("--stage3", default="auto", choices=STAGE3,
                    help="exact: planners on the exact expectation over the frozen backbone's path tree; sampled: "
                         "on paths drawn from them (frozen backbone; scales to 12 layers); rl: the paper's joint "
                         "REINFORCE; auto: exact up to 8 layers, sampled above")
    ap.add_argument("--exact-epochs", type=float, default=20.0, help="stage 3 exact: passes over the path tree")
    ap.add_argument("--exact-lr", type=float, default=1e-2, help="stage 3 exact: planners' Adam learning rate")
    ap.add_argument("--entropy-coef", type=float, default=0.01, help="stage 3: entropy bonus, decayed to 0")
    ap.add_argument("--stage3-epochs", type=float, default=1.0, help="stage 3 rl or sampled: epochs")
    ap.add_argument("--stage3-batch-size", type=int, default=8, help="inputs per stage-3 batch (each drawn --samples times)")
    ap.add_argument("--samples", type=int, default=4, help="paths drawn per input in stage 3 (leave-one-out baseline)")
    ap.add_argument("--cost", type=float, default=0.05, help="starting price of a layer (dual ascent moves it)")
    ap.add_argument("--dual-lr", type=float, default=0.02)
    ap.add_argument("--reward", default="correct")
    ap.add_argument("--rate-control", default="dual")
    ap.add_argument("--planner-features", default="mean")
    ap.add_argument("--lr", type=float, default=1e-4, help="stages 1-2 (MiniLM needs more than BERT-base's 2e-5)")
    ap.add_argument("--stage3-lr", type=float, default=2e-5, help="backbone learning rate in stage 3")
    ap.add_argument("--planner-lr", type=float, default=1e-3)
    ap.add_argument("--target-rate", type=float, default=0.35)
    ap.add_argument("--calibrate-threshold", default="auto", choices=("auto", "always", "never"),
                    help="after stage 3, set the threshold so that the skip rate on the selection split's inputs (no "
                         "labels) is --target-rate: auto = only when it misses it by more than 0.05")
    ap.add_argument("--calibration-samples", type=int, default=1000, help="selection inputs to calibrate on")
    ap.add_argument("--rate-on-eval-inputs", action="store_true",
                    help="score dev with the threshold set so that the model skips --target-rate on dev's own inputs "
                         "(labels never read: a budget set on the served inputs); the saved model keeps the "
                         "selection split's. Use its own --results file")
    ap.add_argument("--planner-start", default="stage2", choices=PLANNER_START,
                    help="where stage 3 'sampled' starts its planners: stage2 (the paper), or fixed-path: the best "
                         "fixed path at --target-rate on every input, by backward elimination on "
                         "--calibration-samples selection inputs (stage 2's backbone frozen). Needs stage 3 "
                         "sampled (the default at 12 layers); use its own --results file")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=200.0)
    ap.add_argument("--evals-per-epoch", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the latency measurement")
    ap.add_argument("--results", default=str(RESULTS / "pipeline.json"),
                    help="results file (rows replaced per task); one file per backbone, e.g. pipeline_mpnet.json")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite pipeline.md and the layer plot from the existing pipeline.json")
    ap.add_argument("--max-train-samples", type=int, default=None,
                    help=f"training subset for every task (default per task: {TASK_SETTINGS})")
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--latency-samples", type=int, default=None, help="time only the first N dev inputs")
    ap.add_argument("--group-by-length", action="store_true", help="training batches of similar lengths")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"),
                    help="training autocast (timing stays fp32); measure it first with benchmarks/train_step.py")
    ap.add_argument("--plan", action="store_true", help="print the time estimate of this run, then stop")
    args = ap.parse_args(argv)
    if args.plan:
        print_plan(args)
        return
    commit()  # pin the commit this run starts from

    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    if args.report_only:
        write_markdown(results, results_path.with_suffix(".md"))
        plot_layers(results, layers_plot_path(results_path))
        return
    others = sorted({str(r["backbone"]) for r in results if "backbone" in r} - {args.backbone})
    if others:  # rows are replaced by task: a 12-layer run would overwrite a 6-layer row of the same task
        raise SystemExit(f"pipeline.py: error: {results_path} holds rows of backbone {', '.join(others)}, and this run "
                         f"is {args.backbone}: give it its own file, e.g. --results "
                         f"{results_path.with_name(f'pipeline_{Path(args.backbone).name}.json')}")
    stage3 = resolve_stage3(args.stage3, args.backbone)
    unread = set(unread_by_stage3(stage3))
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        cfg = task_config(task, args, unread)
        report = run_pipeline(cfg)
        row = {
            "task": report["task"],
            "backbone": args.backbone,
            "backbone_score": report["backbone_score"],
            "dpbert_score": report["dpbert_score"],
            "metric": report["metric"],
            "layers_executed_mean": report["layers_executed_mean"],
            "num_layers": report["num_layers"],
            "speedup_measured": report["speedup_measured"],
            "speedup_ideal": report["speedup_ideal"],
            # L * sum(T) / sum(T * k) over dev's inputs (tokens T, layers k): below the plain ideal when short inputs
            # skip more, as a layer on a long input costs more
            "speedup_ideal_length_weighted": report.get("speedup_ideal_length_weighted"),
            "train_examples": report["train_examples"],
            "seconds": report["seconds"],
            "seed": args.seed,
            "commit": commit(),
            "command": command(),
            # beyond the required keys
            "score_retained": report["score_retained"],
            "score_retained_ci95": report.get("score_retained_ci95"),  # paired bootstrap on dev: DPBERT / backbone
            "score_diff_ci95": report.get("score_diff_ci95"),  # and DPBERT - backbone
            "layer_frequency": report["layer_frequency"],
            "latency_ms_full": report["latency_ms_full"],
            "latency_ms_dpbert": report["latency_ms_dpbert"],
            "throughput_speedup": report["throughput_speedup"],
            "dev_examples": report["num_examples"],
            "stage3": stage3,
            "checkpoint": report["checkpoint"],
            "epochs": [args.stage1_epochs, args.stage2_epochs,
                       args.exact_epochs if stage3 == "exact" else args.stage3_epochs],
            "target_rate": args.target_rate,
            "calibration": report.get("calibration"),  # the threshold set on the selection inputs, if it was
            "alternation": report.get("alternation"),  # first fit vs the skip-aware alternation, on the selection split
            "rate_on_inputs": report.get("rate_on_inputs"),  # the threshold set on dev's inputs (no label), if it was
            "fixed_path_start": report.get("fixed_path_start"),  # the start's path and selection score, if one ran
            # every metric of a composite score (STS-B: Pearson and Spearman; MRPC: accuracy and F1), both models
            "dpbert_metrics": report.get("dpbert_metrics"),
            "backbone_metrics": report.get("backbone_metrics"),
            "hyperparameters": {k: getattr(args, k) for k in ("lr", "stage3_lr", "planner_lr", "lam", "beta",
                                                              "target_rate", "evals_per_epoch", "stage3_batch_size",
                                                              "samples", "cost", "dual_lr", "reward", "rate_control",
                                                              "planner_features", "stage3", "exact_epochs",
                                                              "exact_lr", "entropy_coef", "calibrate_threshold",
                                                              "calibration_samples", "rate_on_eval_inputs",
                                                              "planner_start")
                                if k not in unread},
            "machine": machine_info(),
        }
        results = [r for r in results if r["task"] != row["task"]] + [row]
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
        write_markdown(results, results_path.with_suffix(".md"))
        plot_layers(results, layers_plot_path(results_path))
        print(json.dumps(row, indent=2))


def write_markdown(results: list, path: Path) -> None:
    cols = [("task", "task", ""), ("metric", "metric", ""), ("backbone", "backbone_score", ".2f"),
            ("DPBERT", "dpbert_score", ".2f"), ("retained", "score_retained", ".3f"),
            ("retained, 95% CI", "retained_ci", ""),
            ("layers", "layers_executed_mean", ".2f"), ("of", "num_layers", ""),
            ("speed-up measured", "speedup_measured", ".2f"), ("speed-up ideal", "speedup_ideal", ".2f"),
            ("train ex.", "train_examples", ""), ("seconds", "seconds", ".0f"), ("commit", "commit", "")]
    backbones = sorted({str(r.get("backbone", "an unnamed backbone")) for r in results})
    shown = [{**r, "retained_ci": "[{:.3f}, {:.3f}]".format(*r["score_retained_ci95"])
              if r.get("score_retained_ci95") else None} for r in results]
    text = (f"# DPBERT pipeline on {', '.join(backbones)} (batch-1 CPU latency)\n\n"
            "Written by `benchmarks/pipeline.py`; do not edit by hand. Retained: DPBERT's dev score over the full "
            "backbone's; its 95% interval is a paired bootstrap over the dev inputs ('-': none, in a row written "
            "before intervals were recorded or where the backbone's score can be 0 or below).\n\n"
            + markdown_table(shown, cols) + "\n\n"
            + "\n".join(f"- {r['task']}: `{r['command']}` on {r['machine']['processor']}, "
                        f"{r['machine']['threads']} threads, torch {r['machine']['torch']}" for r in results) + "\n")
    path.write_text(text)


def layers_plot_path(results_path: Path) -> Path:
    """``pipeline.json`` -> ``pipeline_layers.png``, ``pipeline_mpnet.json`` -> ``pipeline_mpnet_layers.png``: each
    results file has its own figure (one name for all let a 12-layer run draw over the 6-layer figure)."""
    return results_path.with_name(f"{results_path.stem}_layers.png")


def plot_layers(results: list, path: Path) -> None:
    """How often DPBERT executes each layer on each task's dev set (the paper's Fig. 4)."""
    layer_heatmap([f"{r['task']} ({r['speedup_measured']:.2f}x)" for r in results],
                  [r["layer_frequency"] for r in results], path, "fraction of dev inputs that execute each layer")


if __name__ == "__main__":
    main()
