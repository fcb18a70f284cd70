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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="stsb,sst2", help="comma-separated GLUE tasks, one after another")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help=f"some of {', '.join(CANDIDATES)}")
    ap.add_argument("--backbone", default=None, help="default: the packaged MiniLM")
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
    g = ap.add_argument_group("budget (the trade-off benchmark's defaults)")
    g.add_argument("--stage1-epochs", type=float, default=3.0)
    g.add_argument("--extra-epochs", type=float, default=1.0, help="epochs beyond stage 1, as every baseline's")
    g.add_argument("--stage2-share", type=float, default=0.5, help="the part of --extra-epochs stage 2 takes")
    g.add_argument("--lr", type=float, default=1e-4, help="stage-1 and stage-2 learning rate")
    g.add_argument("--adapt-lr", type=float, default=5e-5, help="the skip-aware backbone training's (as the baselines')")
    g.add_argument("--layerdrop", type=float, default=0.3)
    g.add_argument("--target-rates", default="0.3,0.5")
    g.add_argument("--exact-epochs", type=float, default=20.0)
    g.add_argument("--exact-lr", type=float, default=1e-2)
    g.add_argument("--max-train-samples", type=int, default=None, help="default per task: as tradeoff.py")
    g.add_argument("--max-steps", type=int, default=None, help="cap every stage's steps (smoke tests)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lam", type=float, default=1.0)
    g.add_argument("--cost", type=float, default=0.05)
    g.add_argument("--dual-lr", type=float, default=0.02)
    g.add_argument("--beta", type=float, default=200.0)
    g.add_argument("--evals-per-epoch", type=int, default=3)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--threads", type=int, default=2, help="torch threads for the whole run")
    args = ap.parse_args(argv)
    args.tasks = csv_list(args.tasks)
    args.candidates = csv_list(args.candidates, allowed=CANDIDATES, what="candidates", ap=ap)
    args.target_rates = csv_list(args.target_rates, float)
    args.match_layers = csv_list(args.match_layers, float)
    if not 0 < args.stage2_share < 1:
        ap.error("--stage2-share must be in (0, 1)")
    return args


class Task:
    """One task's stage-1 backbone, stage 2 and the candidates' stages, each reused when finished."""

    def __init__(self, task: str, args):
        from dataclasses import replace

        from dpbert_rl.data import get_task
        from dpbert_rl.training import TrainConfig, stage_done, train_stage
        from tradeoff_methods import TASK_SETTINGS

        self.task, self.args, self.t = task, args, get_task(task)
        self.root = (Path(args.output_dir) / task).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        max_train = args.max_train_samples or TASK_SETTINGS.get(task, {}).get("max_train_samples")
        backbone = {"backbone": args.backbone} if args.backbone else {}
        self.base = TrainConfig(task=task, data_dir=args.data_dir, **backbone, lr=args.lr, epochs=args.stage1_epochs,
                                evals_per_epoch=args.evals_per_epoch, seed=args.seed, progress=False,
                                batch_size=args.batch_size, lam=args.lam, beta=args.beta, cost=args.cost,
                                dual_lr=args.dual_lr, max_train_samples=max_train, max_steps=args.max_steps)
        self.replace, self.train_stage = replace, train_stage
        s1 = self.root / "stage1_finetune"
        shared = Path(args.stage1_from) / task / "stage1_finetune"
        if not s1.exists() and stage_done(shared):
            s1.symlink_to(shared.resolve(), target_is_directory=True)
        self.s1 = train_stage("finetune", self.config("stage1_finetune"))
        self.backbone_epochs = args.extra_epochs * (1 - args.stage2_share)

    def config(self, sub: str, **kw):
        return self.replace(self.base, output_dir=str(self.root / sub), **kw)

    def stage2(self, init: Path, sub: str) -> Path:
        a = self.args
        return self.train_stage("planner_init", self.config(sub, epochs=a.extra_epochs * a.stage2_share,
                                                            target_rate=a.target_rates[0]), init=str(init))

    def exact(self, init: Path, sub: str, r: float, calibration: bool = True) -> Path:
        from dpbert_rl.training import exact_stage

        a = self.args
        return exact_stage(self.config(sub, target_rate=r), init, self.root / sub, a.exact_epochs, a.exact_lr,
                           cache_dir=self.root / "pathtree", path_calibration=calibration)

    def candidate(self, name: str) -> dict:
        """``{rate: final model}`` of one candidate (and ``none_raw`` on regression)."""
        a = self.args
        out = {}
        if name == "layerdrop":
            ld = self.train_stage("layerdrop", self.config("layerdrop", epochs=self.backbone_epochs, lr=a.adapt_lr,
                                                            layerdrop=a.layerdrop), init=str(self.s1))
            s2 = self.stage2(ld, "layerdrop_stage2")
        else:
            s2 = self.stage2(self.s1, "stage2")
        for r in a.target_rates:
            tag = f"r{r:g}"
            if name == "layerdrop":
                out[r] = self.exact(s2, f"layerdrop_exact_{tag}", r)
            elif name == "none":
                out[r] = self.exact(s2, f"exact_{tag}", r)
            else:  # adapt: the backbone on the paths of the rate's planners, then the planners on its new tree
                first = self.exact(s2, f"exact_{tag}", r)
                adapted = self.train_stage("adapt", self.config(f"adapt_{tag}", epochs=self.backbone_epochs,
                                                                lr=a.adapt_lr, target_rate=r), init=str(first))
                out[r] = self.exact(adapted, f"adapt_exact_{tag}", r)
        return out

    def raw_candidate(self) -> dict:
        """``none`` without the per-path recalibration (regression only)."""
        s2 = self.stage2(self.s1, "stage2")
        return {r: self.exact(s2, f"exact_raw_r{r:g}", r, calibration=False) for r in self.args.target_rates}


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

    torch.set_num_threads(args.threads)
    path = Path(args.results_dir) / "skip_aware.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    commit = pinned_code_commit()
    check_one_commit([results.get("commit")] if results.get("tasks") else [], commit, args.allow_mixed,
                     "skip_aware.json")
    if results.get("command") and results.get("commit") != commit:
        results.setdefault("earlier_commands", []).append({"commit": results["commit"], "command": results["command"]})
    results.update({"commit": commit, "command": command(), "machine": machine_info(),
                    "budget": {k: getattr(args, k) for k in ("stage1_epochs", "extra_epochs", "stage2_share",
                                                             "adapt_lr", "layerdrop", "target_rates", "exact_epochs")}})
    for task in args.tasks:
        t = Task(task, args)
        entry = results.setdefault("tasks", {}).setdefault(task, {"metric": t.t.metric, "candidates": {}})
        names = list(args.candidates) + (["none_raw"] if t.t.is_regression and "none" in args.candidates else [])
        for name in names:
            t0 = time.time()
            print(f"[{task}] {name} ...", flush=True)
            models = t.raw_candidate() if name == "none_raw" else t.candidate(name)
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
    import numpy as np
    import torch

    from dpbert_rl.data import get_task
    from dpbert_rl.evaluation.evaluate import score_run
    from dpbert_rl.model import DPBert
    from dpbert_rl.pathtree.cache import PathTree, greedy_paths, tree_index
    from dpbert_rl.pathtree.oracle import paths
    from dpbert_rl.training.exact import calibrated_tree

    run = json.loads((Path(model_dir).parent / "config.json").read_text())
    tree = PathTree.load(Path(cache_dir) / run["caches"]["select"], mmap=False)
    model = DPBert.load(model_dir, require_planners=True)
    if tree.regression and model.path_calibration is not None:
        tree = calibrated_tree(tree, model.path_calibration)
    task, L = get_task(run["task"]), tree.num_layers
    raw = torch.from_numpy(np.array(tree.raw(model.planners.features), dtype=np.float32))
    counts = torch.as_tensor(tree_index(L)["path_layers"]).float()
    rows = np.arange(tree.num_inputs)

    def greedy(thr: float):
        with torch.no_grad():
            chosen = greedy_paths(model.planners, raw, thr).numpy()
        return chosen, float(counts[chosen].mean())

    out = {}
    for k in target_layers:
        lo, hi, best = 0.0, 1.0, None
        for _ in range(30):  # a higher threshold skips more
            mid = (lo + hi) / 2
            chosen, layers = greedy(mid)
            if best is None or abs(layers - k) < abs(best[2] - k):
                best = (mid, chosen, layers)
            lo, hi = (mid, hi) if layers > k else (lo, mid)
        thr, chosen, layers = best
        res = score_run(task, {"predictions": tree.predictions[rows, chosen], "labels": np.asarray(tree.labels),
                               "actions": paths(L).numpy()[chosen]})
        out[f"{k:g}"] = {"threshold": thr, "layers": layers, "select_score": res["score"]}
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
