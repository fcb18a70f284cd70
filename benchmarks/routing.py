"""Benchmark: does DPBERT route per input, and does it beat every fixed path at the same cost?

For each task whose pipeline run (``benchmarks/pipeline.py``) has finished, it loads the stage-3 model
and reports, on dev, its score against the fixed-path frontier at the same mean number of layers (fixed
paths chosen on the held-out selection split, never on dev; paired-bootstrap 95% interval), the number
of distinct paths, the fraction of hesitant gates (p in (0.2, 0.8)) and a linear probe on the same
features at the nearest layer count. Rows go to ``benchmarks/results/routing.json`` (one per backbone, task
and learner, merged with the rows other benchmarks write there) and ``routing.md``.

Up to 8 layers the fixed paths are every path (the path tree); on a 12-layer backbone (4,096 paths) they are
one path per layer count found by backward elimination on ``--frontier-samples`` selection inputs (75 passes,
up to an hour on 2 cores): each scored path is kept in ``routing_frontier.npz`` beside the model as it comes, so
a stopped run started again scores only the paths it had not.

    python benchmarks/routing.py --data-dir ../shared/data/glue
    python benchmarks/routing.py --data-dir ../shared/data/glue --tasks rte --runs runs/bench-pipeline
    python benchmarks/routing.py --data-dir ../shared/data/glue --tasks mrpc --runs runs/bench-pipeline-mpnet
    python benchmarks/routing.py --data-dir ../shared/data/glue --tasks rte \
        --model runs/feature-choice/rte-mean/model --learner dpbert-exact --backbone-mode frozen
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

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

KEY = ("backbone", "task", "learner", "backbone_mode", "features")
LEGACY_BACKBONE = "minilm"
"""The backbone of rows written before rows named theirs: every one of them ran on MiniLM."""


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


def row_key(row: dict) -> tuple:
    """A row's identity: (backbone, task, learner, backbone_mode, features)."""
    return tuple(row.get(k, LEGACY_BACKBONE) if k == "backbone" else row.get(k) for k in KEY)


def backbone_name(model_dir: Path, given: Optional[str] = None) -> str:
    """The backbone a checkpoint was trained from: its stage's ``config.json`` (``backbone``, written by the
    pipeline), else ``given``, else MiniLM. A ``given`` name that the stage's config contradicts is refused."""
    cfg = Path(model_dir).parent / "config.json"
    recorded = None
    if cfg.is_file():  # the stage wrote it: a damaged one is an error, not a silent guess
        try:
            stage = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{cfg}: not valid JSON ({err}); expected the stage's config, which names its backbone")
        if not isinstance(stage, dict):
            raise ValueError(f"{cfg}: expected a JSON object (the stage's config); got {json.dumps(stage)[:60]}")
        recorded = stage.get("backbone")
    if recorded and given and Path(str(recorded)).name != Path(given).name:
        raise ValueError(f"{model_dir}: its stage ran on backbone {recorded!r} ({cfg}), not {given!r}")
    return Path(str(recorded or given or LEGACY_BACKBONE)).name


def pipeline_choice(run_dir: Path) -> Optional[Path]:
    """The final model a pipeline run chose between its skip-aware alternation and the first fit
    (``alternation.json``'s ``chosen``, resolved inside ``run_dir`` so that a moved run still resolves); None
    when the run made no such choice."""
    record = Path(run_dir) / "alternation.json"
    if not record.is_file():
        return None
    try:
        chosen = json.loads(record.read_text(encoding="utf-8"))["chosen"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{record}: expected the pipeline's JSON record with 'chosen' ({err})") from None
    return Path(run_dir) / Path(*Path(chosen).parts[-2:])  # <stage>/model, inside this run


def merge_rows(path: Path, new_rows: list) -> list:
    """Replace the rows with the same (backbone, task, learner, backbone_mode, features), keep the others."""
    rows = read_rows(path, check_fields=False)
    keys = {row_key(r) for r in new_rows}
    rows = [r for r in rows if row_key(r) not in keys] + new_rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return rows


def write_markdown(rows: list, path: Path) -> None:
    for r in rows:
        lo, hi = r["margin_ci95"]
        r["_ci"] = f"[{lo:+.2f}, {hi:+.2f}]"
        r["_mid"] = "-" if r.get("mid_gate_fraction") is None else f"{r['mid_gate_fraction']:.3f}"
        r["_backbone"] = r.get("backbone", LEGACY_BACKBONE)
        r["_fixed"] = "all" if r.get("frontier", "every path") == "every path" else "greedy"
    cols = [("backbone", "_backbone", ""), ("task", "task", ""), ("learner", "learner", ""),
            ("backbone mode", "backbone_mode", ""), ("fixed paths", "_fixed", ""),
            ("features", "features", ""), ("score", "score", ".2f"), ("layers", "layers_executed_mean", ".2f"),
            ("fixed frontier", "fixed_frontier_score", ".2f"), ("margin", "margin", "+.2f"),
            ("95% CI", "_ci", ""), ("distinct paths", "distinct_paths", ""), ("gates in (0.2, 0.8)", "_mid", ""),
            ("probe", "probe_score", ".2f"), ("commit", "commit", "")]
    text = ("# Routing: learners against the best fixed path at the same mean layers (dev)\n\n"
            "Written by the benchmark scripts (`benchmarks/routing.py`, `benchmarks/agents.py`); do not edit by "
            "hand. Fixed paths are chosen on the held-out selection split; the margin's interval is a paired "
            "bootstrap over dev inputs. Fixed paths \"all\": the best of every path at each layer count; "
            "\"greedy\" (12-layer backbones, 4,096 paths): one path per layer count by backward elimination on "
            "the selection split, so a margin over it is an upper bound on the margin over all paths.\n\n" + markdown_table(rows, cols) + "\n\n"
            + "\n".join(f"- {r['_backbone']} / {r['task']} / {r['learner']}: `{r['command']}`" for r in rows) + "\n")
    for r in rows:
        for k in ("_ci", "_mid", "_backbone", "_fixed"):
            r.pop(k, None)
    path.write_text(text)


def fail(message: str) -> None:
    """One line, ``routing.py: error: ...``, and exit status 2."""
    print(f"routing.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="rte,mrpc,sst2,stsb", help="comma-separated GLUE tasks")
    ap.add_argument("--runs", default="runs/bench-pipeline", help="the pipeline benchmark's output directory")
    ap.add_argument("--model", help="score this checkpoint instead of the pipeline's stage-3 model (one task)")
    ap.add_argument("--learner", default="dpbert", help="the row's learner name")
    ap.add_argument("--backbone-mode", default="frozen",
                    help="with --model, the row's backbone_mode: frozen or joint (for the pipeline's runs it follows "
                         "their stage 3: exact is frozen, rl is joint)")
    ap.add_argument("--backbone", default=None,
                    help="the rows' backbone name (default: the one the checkpoint's stage config names, else minilm); "
                         "rows of different backbones live side by side in one results file")
    ap.add_argument("--frontier-samples", type=int, default=500,
                    help="above 8 layers, the selection inputs (seeded subset) on which the fixed paths are found by "
                         "backward elimination (75 path passes at 12 layers); up to 8 layers every path is walked "
                         "on the whole selection split")
    ap.add_argument("--probe-train", type=int, default=2000, help="training inputs for the linear probe")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the margin's interval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS / "routing.json"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite routing.md from routing.json")
    args = ap.parse_args(argv)
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
        else:  # the pipeline's stage 3: exact or sampled (frozen backbone), or rl (joint)
            found = [(Path(args.runs) / name / f"stage3_{kind}" / "model", m)
                     for kind, m in (("exact", "frozen"), ("sampled", "frozen"), ("rl", "joint"))]
            model_dir, mode = next(((d, m) for d, m in found if d.is_dir()), found[0])
            try:
                chosen = pipeline_choice(Path(args.runs) / name)
            except ValueError as err:
                fail(str(err))
            if chosen is not None:  # the first fit, where the pipeline kept it over the skip-aware alternation
                model_dir = chosen
        if not (model_dir / "DONE").is_file():
            print(f"[routing] {name}: no finished stage-3 model at {model_dir}; skipped")
            continue
        try:
            backbone_label = backbone_name(model_dir, args.backbone)
        except ValueError as err:
            fail(str(err))
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
                backbone = exact_stage_backbone(model_dir.parent.parent, model_dir.parent.name)  # the chosen fit's
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
                             frontier_samples=args.frontier_samples, **runs,
                             frontier_cache=model_dir.parent / "routing_frontier.npz")  # a stopped run resumes
        row = {"backbone": backbone_label, "task": task.name, "learner": args.learner, "backbone_mode": mode,
               "features": model.planner_features,
               **rep, "threshold": model.threshold, "dev_examples": len(dev), "select_examples": len(select),
               "checkpoint": str(model_dir), "commit": commit(), "command": command(), "machine": machine_info()}
        rows = merge_rows(results, [row])
        write_markdown(rows, results.with_suffix(".md"))
        print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "frontier_hull")}, indent=2))


if __name__ == "__main__":
    main()
