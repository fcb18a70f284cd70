"""Benchmark: which skip-aware backbone training DPBERT's pipeline uses, chosen on the selection split at an
equal training budget (issue 23).

On each task, from the trade-off benchmark's stage-1 backbone (``runs/tradeoff/<task>/stage1_finetune``,
linked, trained if missing with the same settings), every candidate trains the backbone for the same
``--extra-epochs`` beyond stage 1 as BERT-kL and the early exits do in ``benchmarks/tradeoff.py``:
stage 2 (the planners, backbone frozen) takes ``--stage2-share`` of them, the skip-aware backbone training
the rest (the exact stage's passes over the path tree train the planners only):

* ``none``: stage 1 -> stage 2 -> exact (the pipeline before issue 23; the backbone never sees a skip);
* ``layerdrop``: stage 1 -> LayerDrop fine-tuning (random layer subsets, ``--layerdrop``) -> stage 2 -> exact;
* ``adapt``: stage 1 -> stage 2 -> exact -> ``adapt`` (backbone and head on the paths the frozen planners
  draw) -> exact again on the new backbone's path tree (one alternation).

Each at every ``--target-rates`` value (the exact stage's dual price holds the skip rate). On a regression
task (STS-B) each candidate runs with the per-path recalibration of the reward and the head (the exact
stage's default) and ``none`` also without it (``none_raw``): the reward change measured alone.

Every choice reads the selection split: the exact stage's chosen planners (best selection score at the
rate), and the candidate the pipeline should default to (the best mean selection score over tasks and
rates). Dev is scored once per final model (the exact stage's ``DONE``) and only reported.

The candidates are the trade-off benchmark's own DPBERT (``tradeoff_methods.dpbert_models``) under its
budget flags (any flag of ``benchmarks/tradeoff.py``'s training budget is accepted here), trained by its
``TaskRun`` under ``--output-dir`` (one code commit per task folder, as there).

Outputs ``benchmarks/results/skip_aware.json`` (``commit``, ``command``, ``machine``, ``tasks -> task ->
candidates -> name -> rates -> r -> {select_score, select_layers, dev_score, dev_layers, seconds}``) and
``skip_aware.md``. Models under ``runs/skip_aware/<task>/``: a re-run resumes where it stopped.

    python benchmarks/skip_aware.py --data-dir ../shared/data/glue --tasks stsb,sst2
    python benchmarks/skip_aware.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS, check_one_commit, command, csv_list, markdown_table, pinned_code_commit  # noqa: E402

CANDIDATES = ("none", "layerdrop", "adapt")


def parse_args(argv=None):
    """This script's own options; every other flag is the trade-off benchmark's training budget
    (``benchmarks/tradeoff.py --help``: ``--stage1-epochs``, ``--extra-epochs``, ``--adapt-lr``, ...), parsed by
    its parser into ``args.budget`` so that both run the same protocol."""
    from tradeoff import parse_args as tradeoff_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any other flag is a training-budget flag of benchmarks/tradeoff.py "
                                        "(see its --help); the defaults are its own.")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="stsb,sst2", help="comma-separated GLUE tasks, one after another")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help=f"some of {', '.join(CANDIDATES)}")
    ap.add_argument("--output-dir", default="runs/skip_aware", help="trained models (resumable)")
    ap.add_argument("--stage1-from", default="runs/tradeoff",
                    help="reuse <dir>/<task>/stage1_finetune when it is finished (linked, not copied)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true", help="only rewrite skip_aware.md from skip_aware.json")
    ap.add_argument("--match-only", action="store_true",
                    help="only add the matched-compute scores (--match-layers) of the trained models to skip_aware.json")
    ap.add_argument("--match-layers", default="4,3",
                    help="mean layer counts every final model is set to on the selection split, for a comparison at "
                         "the same compute (empty: none)")
    ap.add_argument("--allow-mixed", action="store_true", help="merge results of another code commit (marked)")
    args, rest = ap.parse_known_args(argv)
    args.tasks = csv_list(args.tasks)
    args.candidates = csv_list(args.candidates, allowed=CANDIDATES, what="candidates", ap=ap)
    args.match_layers = csv_list(args.match_layers, float)
    args.budget = tradeoff_args(rest + ["--output-dir", args.output_dir, "--tasks", ",".join(args.tasks)]
                                + (["--data-dir", args.data_dir] if args.data_dir else []))
    args.budget.allow_mixed = args.allow_mixed
    return args


def task_run(task: str, args):
    """The trade-off benchmark's :class:`TaskRun` of ``task`` under ``--output-dir``, its stage 1 linked from
    ``--stage1-from`` when that one is finished."""
    from dpbert_rl.training import stage_done
    from tradeoff_methods import TaskRun

    s1 = Path(args.output_dir) / task / "stage1_finetune"
    shared = Path(args.stage1_from) / task / "stage1_finetune"
    if not s1.exists() and stage_done(shared):
        s1.parent.mkdir(parents=True, exist_ok=True)
        s1.symlink_to(shared.resolve(), target_is_directory=True)
    return TaskRun(task, args.budget)


def summary(model_dir: Path, t0: float) -> dict:
    done = json.loads((model_dir / "DONE").read_text())
    sel = json.loads((model_dir / "selection.json").read_text()).get("select") or {}
    dev = done.get("dev") or {}
    return {"select_score": done.get("best_select"), "select_layers": sel.get("layers_executed_mean"),
            "dev_score": dev.get("score"), "dev_layers": dev.get("layers_executed_mean"),
            "path_calibration": "path_calibration" in json.loads((model_dir / "dpbert.json").read_text()),
            "model": str(model_dir), "seconds": round(time.time() - t0, 1)}


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def run(args) -> dict:
    import torch

    from dpbert_rl.evaluation.latency import machine_info
    from tradeoff_methods import dpbert_models

    b = args.budget
    torch.set_num_threads(b.threads)
    path = Path(args.results_dir) / "skip_aware.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    commit = b.code_commit = pinned_code_commit()
    check_one_commit([results.get("commit")] if results.get("tasks") else [], commit, args.allow_mixed,
                     "skip_aware.json")
    if results.get("command") and results.get("commit") != commit:
        results.setdefault("earlier_commands", []).append({"commit": results["commit"], "command": results["command"]})
    results.update({"commit": commit, "command": command(), "machine": machine_info(),
                    "budget": {k: getattr(b, k) for k in ("stage1_epochs", "extra_epochs", "stage2_share", "adapt_lr",
                                                          "layerdrop", "target_rates", "exact_epochs")}})
    for task in args.tasks:
        t = task_run(task, args)
        entry = results.setdefault("tasks", {}).setdefault(task, {"metric": t.t.metric, "candidates": {}})
        names = list(args.candidates) + (["none_raw"] if t.t.is_regression and "none" in args.candidates else [])
        for name in names:
            t0 = time.time()
            print(f"[{task}] {name} ...", flush=True)
            models, _ = (dpbert_models(t, "none", path_calibration=False) if name == "none_raw" else
                         dpbert_models(t, name))
            entry["candidates"][name] = {"rates": {f"{r:g}": summary(m, t0) for r, m in models.items()},
                                         "commit": commit}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
            print(f"[{task}] {name}: " + ", ".join(f"r={r}: selection {_num(v['select_score'])} at "
                                                   f"{_num(v['select_layers'])} layers"
                                                   for r, v in entry["candidates"][name]["rates"].items()), flush=True)
    return results


def matched_scores(model_dir: Path, target_layers, cache_dir: Path) -> dict:
    """The final model's planners set, by their threshold, to each of ``target_layers`` mean layers on the
    selection split, and its selection score there: replayed on the selection split's path tree that its
    exact stage read (the same paths and outputs as the live model, recalibrated as the model is), so that
    candidates are compared at the same compute. Returns ``{layers: {threshold, layers, select_score}}``."""
    from dataclasses import replace

    from dpbert_rl.data import get_task
    from dpbert_rl.model import DPBert
    from dpbert_rl.model.budget import solve_knob
    from dpbert_rl.pathtree.cache import PathTree
    from dpbert_rl.training.exact import ExactConfig, calibrated_tree, evaluate_tree

    run = json.loads((Path(model_dir).parent / "config.json").read_text())
    tree = PathTree.load(Path(cache_dir) / run["caches"]["select"], mmap=False)
    model = DPBert.load(model_dir, require_planners=True)
    if tree.regression and model.path_calibration is not None:
        tree = calibrated_tree(tree, model.path_calibration)
    task, cfg = get_task(run["task"]), ExactConfig()

    def at(threshold: float) -> dict:
        return evaluate_tree(model.planners, tree, task, replace(cfg, threshold=threshold), 0.0)

    out = {}
    for k in target_layers:
        thr, layers = solve_knob(model, None, k, 30, layers_at=lambda t: at(t)["layers_executed_mean"])
        out[f"{k:g}"] = {"threshold": thr, "layers": layers, "select_score": at(thr)["score"]}
    return out


def add_matched(results: dict, args) -> None:
    """Every final model's :func:`matched_scores` at ``--match-layers`` where it has none at those counts yet
    (the models and trees of earlier tasks may be gone), each recorded with the commit that computed it."""
    keys = {f"{k:g}" for k in args.match_layers}
    for task, e in results.get("tasks", {}).items():
        cache = Path(args.output_dir) / task / "pathtree"
        for c in e["candidates"].values():
            for v in c["rates"].values():
                if keys <= set(v.get("matched", {})):
                    continue
                v["matched"] = matched_scores(Path(v["model"]), args.match_layers, cache)
                v["matched_commit"] = pinned_code_commit()
    results.setdefault("matched_commit", pinned_code_commit())
    results["match_layers"] = list(args.match_layers)


def best_matched(candidate: dict, k: str):
    """A candidate's best selection score at ``k`` mean layers over its models (one per target rate)."""
    vals = [v["matched"][k]["select_score"] for v in candidate["rates"].values() if k in v.get("matched", {})]
    return max(vals) if vals else None


def choose_default(results: dict) -> tuple:
    """The candidate with the best selection score averaged over its tasks and rates, among the candidates run
    on every task (every candidate runs the same ``--target-rates``; ``none_raw`` is not a pipeline choice);
    returns ``(name, {name: mean})``."""
    tasks = results.get("tasks", {})
    names = [c for c in CANDIDATES if all(c in e["candidates"] for e in tasks.values())]
    means = {}
    ks = results.get("match_layers")
    for c in names:
        if ks:  # at the same compute: each task and matched layer count, the candidate's best model there
            vals = [best_matched(e["candidates"][c], f"{k:g}") for e in tasks.values() for k in ks]
        else:  # a rate whose planners never met the skip-rate rule has no selection score: it counts as 0
            vals = [v["select_score"] for e in tasks.values() for v in e["candidates"][c]["rates"].values()]
        vals = [v or 0.0 for v in vals]
        means[c] = sum(vals) / len(vals) if vals else float("nan")
    best = max(means, key=means.get) if means else None
    return best, means


def matched_table(results: dict) -> list:
    ks = results.get("match_layers")
    if not ks:
        return []
    rows = []
    for task, e in results.get("tasks", {}).items():
        for name, c in e["candidates"].items():
            row = {"task": task, "candidate": name}
            for k in ks:
                row[f"{k:g}"] = best_matched(c, f"{k:g}")
            rows.append(row)
    cols = [("task", "task", ""), ("candidate", "candidate", "")] + [
        (f"selection at {k:g} layers", f"{k:g}", ".2f") for k in ks]
    return ["## At the same compute", "",
            f"Each final model's threshold set on the selection split to {', '.join(f'{k:g}' for k in ks)} mean layers "
            f"(replayed on that split's path tree); per candidate, its best model at each count. Computed at commit "
            f"{results.get('matched_commit')}.", "", markdown_table(rows, cols), ""]


def _commits_line(results: dict) -> list:
    """The code commit of every task's candidates, when a run merged tasks of several commits (--allow-mixed)."""
    per_task = {t: sorted({c.get("commit") for c in e["candidates"].values()}) for t, e in
                results.get("tasks", {}).items()}
    if len({c for cs in per_task.values() for c in cs}) <= 1:
        return []
    return ["Mixed commits (merged with --allow-mixed): " + "; ".join(
        f"{t}: {', '.join(str(c)[:12] for c in cs)}" for t, cs in per_task.items()) + ".", ""]


def write_report(results: dict, out_dir: Path) -> Path:
    rows = []
    for task, e in results.get("tasks", {}).items():
        for name, c in e["candidates"].items():
            for r, v in c["rates"].items():
                rows.append({"task": f"{task} ({e['metric']})", "candidate": name, "r": r, **v})
    best, means = choose_default(results)
    lines = ["# Skip-aware backbone training: the candidates on the selection split (MiniLM-L6, CPU)", "",
             "Written by `benchmarks/skip_aware.py`; do not edit by hand. Every candidate trains the backbone for the "
             "same epochs beyond stage 1 as the trade-off benchmark's baselines (see the script's docstring). "
             "Selection: the exact stage's chosen planners at the rate, scored on the selection split. Dev: scored "
             "once on the final model, reported only.", "",
             f"Commit {results.get('commit')}; command `{results.get('command')}`; budget {results.get('budget')}.", "",
             *_commits_line(results),
             markdown_table(rows, [("task", "task", ""), ("candidate", "candidate", ""), ("target r", "r", ""),
                                   ("selection", "select_score", ".2f"), ("layers (selection)", "select_layers", ".2f"),
                                   ("dev", "dev_score", ".2f"), ("layers (dev)", "dev_layers", ".2f"),
                                   ("seconds (candidate so far)", "seconds", ".0f")]), "",
             *matched_table(results),
             "## The pipeline's default", "",
             ("Mean selection score at the matched layer counts (each candidate's best model there), over every task "
              "and count: " if results.get("match_layers") else "Mean selection score over every task and rate: ") + ", ".join(f"{k} {v:.2f}" for k, v in means.items())
             + (f". Best: **{best}**." if best else "."), ""]
    out = out_dir / "skip_aware.md"
    out.write_text("\n".join(lines))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    out_dir = Path(args.results_dir)
    path = out_dir / "skip_aware.json"
    if args.report_only or args.match_only:
        results = json.loads(path.read_text())
        if args.match_only:
            add_matched(results, args)
            path.write_text(json.dumps(results, indent=2))
    else:
        if not args.data_dir:
            raise SystemExit("--data-dir (or $GLUE_DIR) is needed: the local GLUE directory")
        results = run(args)
        if args.match_layers:
            add_matched(results, args)
            path.write_text(json.dumps(results, indent=2))
    print(f"report written to {write_report(results, out_dir)}")


if __name__ == "__main__":
    main()
