"""Benchmark: does DPBERT route per input, and does it beat every fixed path at the same cost?

For each task whose pipeline run (``benchmarks/pipeline.py``) has finished, it loads the stage-3 model
and reports, on dev, its score against the fixed-path frontier at the same mean number of layers (fixed
paths chosen on the held-out selection split, never on dev; paired-bootstrap 95% interval), the number
of distinct paths, the fraction of hesitant gates (p in (0.2, 0.8)) and a linear probe on the same
features at the nearest layer count. Rows go to ``benchmarks/results/routing.json`` (one per task and
learner, merged with the rows other benchmarks write there) and ``routing.md``.

    python benchmarks/routing.py --data-dir ../shared/data/glue
    python benchmarks/routing.py --data-dir ../shared/data/glue --tasks rte --runs runs/bench-pipeline
    python benchmarks/routing.py --data-dir ../shared/data/glue --tasks rte \
        --model runs/feature-choice/rte-mean/model --learner dpbert-exact --backbone-mode frozen
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, markdown_table  # noqa: E402
from _common import pinned_code_commit as commit  # noqa: E402  (the last commit that changed code)

from dpbert_rl.data import collator, get_task, load_split, tokenize  # noqa: E402
from dpbert_rl.evaluation.diagnostics import routing_report, tree_probe  # noqa: E402
from dpbert_rl.evaluation.evaluate import run_dataset  # noqa: E402
from dpbert_rl.evaluation.latency import machine_info  # noqa: E402
from dpbert_rl.model import DPBert  # noqa: E402
from dpbert_rl.pathtree import tree_cache  # noqa: E402
from dpbert_rl.training import exact_stage_backbone  # noqa: E402

KEY = ("task", "learner", "backbone_mode", "features")


NUMBER_FIELDS = ("score", "layers_executed_mean", "fixed_frontier_score", "margin", "mid_gate_fraction", "probe_score")
"""Fields the report formats as numbers: each a number, or null / absent (shown as "-")."""
REQUIRED_FIELDS = ("task", "learner", "margin_ci95", "command")


class ResultsError(ValueError):
    """A results file that cannot be read as routing rows; the message names the file, the row and what was expected."""


def read_rows(path: Path, check_fields: bool = True) -> list:
    """The rows of ``path`` (``[]`` when it does not exist), each checked for what the report needs."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); expected "
                           "a JSON list of rows") from None
    except UnicodeDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON (byte {err.start} is not UTF-8)") from None
    if not isinstance(rows, list):
        got = "an object" if isinstance(rows, dict) else json.dumps(rows)[:60]
        raise ResultsError(f"{path}: expected a JSON list of rows; got {got}")
    for i, row in enumerate(rows, 1):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise ResultsError(f"{where}: expected an object (a row); got {json.dumps(row)[:60]}")
        if not check_fields:
            continue
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ResultsError(f"{where} ({row.get('task')}/{row.get('learner')}): missing "
                               f"{', '.join(map(repr, missing))}")
        for k in NUMBER_FIELDS:
            v = row.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ResultsError(f"{where} ({row['task']}/{row['learner']}): {k!r} must be a number (or null); "
                                   f"got {json.dumps(v)}")
        ci = row["margin_ci95"]
        if not (isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                              for x in ci)):
            raise ResultsError(f"{where} ({row['task']}/{row['learner']}): 'margin_ci95' must be a list of two numbers "
                               f"[low, high]; got {json.dumps(ci)}")
    return rows


def merge_rows(path: Path, new_rows: list) -> list:
    """Replace the rows with the same (task, learner, backbone_mode, features), keep the others."""
    rows = read_rows(path, check_fields=False)
    keys = {tuple(r[k] for k in KEY) for r in new_rows}
    rows = [r for r in rows if tuple(r.get(k) for k in KEY) not in keys] + new_rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return rows


def write_markdown(rows: list, path: Path) -> None:
    for r in rows:
        lo, hi = r["margin_ci95"]
        r["_ci"] = f"[{lo:+.2f}, {hi:+.2f}]"
        r["_mid"] = "-" if r.get("mid_gate_fraction") is None else f"{r['mid_gate_fraction']:.3f}"
    cols = [("task", "task", ""), ("learner", "learner", ""), ("backbone", "backbone_mode", ""),
            ("features", "features", ""), ("score", "score", ".2f"), ("layers", "layers_executed_mean", ".2f"),
            ("fixed frontier", "fixed_frontier_score", ".2f"), ("margin", "margin", "+.2f"),
            ("95% CI", "_ci", ""), ("distinct paths", "distinct_paths", ""), ("gates in (0.2, 0.8)", "_mid", ""),
            ("probe", "probe_score", ".2f"), ("commit", "commit", "")]
    text = ("# Routing: learners against the best fixed path at the same mean layers (dev)\n\n"
            "Written by the benchmark scripts (`benchmarks/routing.py`, `benchmarks/agents.py`); do not edit by "
            "hand. Fixed paths are chosen on the held-out selection split; the margin's interval is a paired "
            "bootstrap over dev inputs.\n\n" + markdown_table(rows, cols) + "\n\n"
            + "\n".join(f"- {r['task']} / {r['learner']}: `{r['command']}`" for r in rows) + "\n")
    for r in rows:
        r.pop("_ci", None)
        r.pop("_mid", None)
    path.write_text(text)


def fail(message: str) -> None:
    """One line, ``routing.py: error: ...``, and exit status 2."""
    print(f"routing.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="rte,mrpc,sst2,stsb", help="comma-separated GLUE tasks")
    ap.add_argument("--runs", default="runs/bench-pipeline", help="the pipeline benchmark's output directory")
    ap.add_argument("--model", help="score this checkpoint instead of the pipeline's stage-3 model (one task)")
    ap.add_argument("--learner", default="dpbert", help="the row's learner name")
    ap.add_argument("--backbone-mode", default="frozen",
                    help="with --model, the row's backbone_mode: frozen or joint (for the pipeline's runs it follows "
                         "their stage 3: exact is frozen, rl is joint)")
    ap.add_argument("--probe-train", type=int, default=2000, help="training inputs for the linear probe")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the margin's interval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS / "routing.json"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite routing.md from routing.json")
    args = ap.parse_args()
    commit()
    results = Path(args.results)
    if args.report_only:
        if not results.is_file():
            fail(f"{results}: no such file; run the benchmark first (or pass --results)")
        try:
            rows = read_rows(results)
        except ResultsError as err:
            fail(str(err))
        write_markdown(rows, results.with_suffix(".md"))
        return
    try:  # a damaged results file is found now, not after the task's run
        read_rows(results, check_fields=False)
    except ResultsError as err:
        fail(str(err))
    import torch

    torch.set_num_threads(args.threads)
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        mode = args.backbone_mode
        if args.model:
            model_dir = Path(args.model)
        else:  # the pipeline's stage 3: exact (frozen backbone) or rl (joint)
            model_dir = Path(args.runs) / name / "stage3_exact" / "model"
            mode = "frozen"
            if not model_dir.is_dir():
                model_dir, mode = Path(args.runs) / name / "stage3_rl" / "model", "joint"
        if not (model_dir / "DONE").is_file():
            print(f"[routing] {name}: no finished stage-3 model at {model_dir}; skipped")
            continue
        task = get_task(name)
        model = DPBert.load(model_dir).eval()
        seq = model.task_info.max_seq_length
        collate = collator(model.tokenizer)
        dev = tokenize(load_split(task, "dev", args.data_dir), model.tokenizer, seq)
        select = tokenize(load_split(task, "select", args.data_dir), model.tokenizer, seq)
        fit = tokenize(load_split(task, "fit", args.data_dir, args.probe_train, shuffle_seed=0), model.tokenizer, seq)
        learner = run_dataset(model, dev, collate, 64, "hard")
        runs = {}
        if mode == "frozen" and not args.model and (model_dir.parent / "pathtree").is_dir():
            # every path's outcome on the exact stage's frozen backbone (stage 2's, or the adapted one under
            # --skip-aware adapt) is in its path-tree caches (the selection split's built by the exact stage, dev's
            # built here once and shared with agents.py)
            try:
                backbone = exact_stage_backbone(model_dir.parent.parent)
            except (OSError, ValueError) as err:
                fail(str(err))
            cfg = json.loads((model_dir.parent / "config.json").read_text())
            k = int(round(float(learner["actions"].sum(1).mean())))  # the probe's layer count, as routing_report
            trees = {s: tree_cache(str(backbone), task.name, s, args.data_dir, n, seq, model.planner_features,
                                   model_dir.parent / "pathtree")
                     for s, n in (("select", None), ("dev", None), ("fit", cfg["max_train_samples"]))}
            runs = {"select_run": trees["select"].oracle_run(), "dev_run": trees["dev"].oracle_run(),
                    "probe": {k: tree_probe(model, task, trees["fit"], trees["dev"], k)}}  # the one k needed
        rep = routing_report(model, task, learner, select, dev, fit, collate, n_boot=args.bootstrap, progress=True,
                             **runs)
        row = {"task": task.name, "learner": args.learner, "backbone_mode": mode,
               "features": model.planner_features,
               **rep, "threshold": model.threshold, "dev_examples": len(dev), "select_examples": len(select),
               "checkpoint": str(model_dir), "commit": commit(), "command": command(), "machine": machine_info()}
        rows = merge_rows(results, [row])
        write_markdown(rows, results.with_suffix(".md"))
        print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "frontier_hull")}, indent=2))


if __name__ == "__main__":
    main()
