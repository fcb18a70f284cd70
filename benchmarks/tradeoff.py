"""Benchmark: score against measured batch-1 speed-up for DPBERT and the early-exit baselines.

On each task (RTE, MRPC, SST-2 on a training subset, STS-B) with the packaged MiniLM-L6 (or ``--backbone``), one
task and one method after another, at a fixed thread count:

* stage 1 fine-tunes the backbone once; every method starts from it and is trained for the same
  ``--extra-epochs`` beyond it (DPBERT: stage 2 takes ``--stage2-share`` of them, stage 3 the rest,
  once per ``--target-rates`` value; DPBERT-soft likewise; DeeBERT's off-ramps; PABEE's joint exits;
  BERxiT's alternating fine-tuning; LayerDrop; each BERT-kL);
* every checkpoint is chosen on the selection split (held out from the training file, see
  :func:`dpbert_rl.data.carve_selection`), and so is every threshold: DPBERT's execute threshold,
  DeeBERT's entropy and BERxiT's exit-score thresholds are calibrated there by bisection to the
  common ``--target-speedups`` (ideal speed-ups, L / mean layers); PABEE's patience, LayerDrop's
  subsets, BERT-kL's depths and the best fixed path per layer count are enumerated and scored there;
* dev is scored once per final model and setting, and never feeds a choice. Table 1 and the target
  check report the dev score of the setting chosen on the selection split;
* each method's settings are timed at batch size 1 against the full backbone, and the backbone
  against itself (``self_speedup``; outside [0.97, 1.03] the run is marked noisy), interleaved on one
  seeded sample of dev inputs (``--latency-samples``), on which each point's ideal speed-up is
  computed too;
* the oracle over all 2^L paths of the stage-1 backbone uses the dev labels: an upper bound.

Outputs: ``benchmarks/results/tradeoff.json`` (``commit``, ``selection``, ``machine``, ``budget``, and
``tasks -> task -> {self_speedup, noisy, methods -> method -> {points, chosen, self_speedup, ...}}``,
each point ``{setting, score, speedup_measured, speedup_ideal, speedup_ideal_length_weighted (L * sum(T) /
sum(T * k) over the timed inputs' tokens T and layers k), layers_executed_mean, select_score, select_speedup_ideal,
spec, ...}``), ``tradeoff.md`` (Tables 1-3, the target check, the oracle gap),
``tradeoff.png`` and ``tradeoff_<task>.png`` (Fig. 3), ``tradeoff_layers.png`` (Fig. 4). Trained models
live under ``runs/tradeoff/<task>/``, each method's points too (``points/<method>.json``): a re-run
resumes where it stopped. Results of another code commit (the last commit that changed code:
``benchmarks/results/``, README and docs do not count) or of a dirty tree are refused unless
``--allow-mixed``, and then marked.

    python benchmarks/tradeoff.py --data-dir ../shared/data/glue              # the clean run (make tradeoff)
    python benchmarks/tradeoff.py --data-dir ../shared/data/glue --plan       # its budget and time estimate
    python benchmarks/tradeoff.py --data-dir ../shared/data/glue --tasks rte --methods deebert,pabee
    python benchmarks/tradeoff.py --report-only                               # tables and figures again
    python benchmarks/tradeoff.py --data-dir ../shared/data/glue --retime --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, check_one_commit, command, csv_list, pinned_code_commit  # noqa: E402
from code_hash import method_code_hash  # noqa: E402
from tradeoff_analysis import (LABELS, METHODS, TARGET_WINDOW, WINDOW, best_in_window, choose,  # noqa: E402,F401
                               chosen_summary, envelope_at, front, headline, is_noisy, merge, oracle_gap,
                               target_check, task_noise, write_device_report, write_report)
from tradeoff_figures import plot, plot_device  # noqa: E402
from tradeoff_methods import (RUNNERS, TASK_SETTINGS, TaskRun, backbone_scale, keep_paths, kl_depths,  # noqa: E402
                              measured_seconds, plan)

import torch  # noqa: E402

from dpbert_rl.data import SELECTION_FRACTION, SELECTION_MAX, SELECTION_SEED, load_split  # noqa: E402
from dpbert_rl.evaluation.evaluate import speedup_ideal_fields  # noqa: E402
from dpbert_rl.evaluation.latency import machine_info  # noqa: E402
from dpbert_rl.training import PipelineConfig  # noqa: E402
from dpbert_rl.model.backbone import backbone_layers, canonical_backbone  # noqa: E402
from dpbert_rl.training import stage3_for  # noqa: E402
from dpbert_rl.training.config import SKIP_AWARE, STAGE3  # noqa: E402


# ---------------------------------------------------------------------- one task
def code_hashes() -> dict:
    """Every method's code hash (:func:`code_hash.method_code_hash`: its runner and what every method shares)."""
    return {name: method_code_hash(fn, (TaskRun,)) for name, fn in RUNNERS.items()}


# arguments that choose what runs and where it is written, not what a method computes
_NOT_CONTEXT = {"tasks", "methods", "output_dir", "results_dir", "recompute", "report_only", "plan", "allow_mixed",
                "fresh", "note", "code_commit", "previous", "retime", "device", "batch_sizes"}


def run_context(args) -> dict:
    """What a method's results depend on besides its code: this run's settings and the machine (CPU, torch,
    threads). Results are reused from another commit only under the same context."""
    m = machine_info()
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_CONTEXT}
    L = backbone_layers(args.backbone)  # defaults that depend on the backbone, as they resolve
    settings["dpbert_stage3"] = stage3_for(args.dpbert_stage3, L)
    settings["kl_layers"] = kl_depths(args.kl_layers, L)
    return json.loads(json.dumps({"settings": settings, "machine": {k: m[k] for k in ("cpu", "cpu_count", "torch",
                                                                                        "threads", "cuda")}}))


# settings added after results were cached, read as the value every earlier run had
_ABSENT_SETTINGS = {"planner_start": "stage2"}


def settings_changed(cached: Optional[dict], current: dict) -> list:
    """``[(setting, cached value, current value)]`` where a cached method's context (``run_context``) and this run's
    differ, over the settings both record (and those of ``_ABSENT_SETTINGS``, absent meaning their old value)."""
    old, new = (cached or {}).get("settings", {}), current.get("settings", {})
    keys = (old.keys() & new.keys()) | (_ABSENT_SETTINGS.keys() & new.keys())
    return [(k, old.get(k, _ABSENT_SETTINGS.get(k)), new[k]) for k in sorted(keys)
            if old.get(k, _ABSENT_SETTINGS.get(k)) != new[k]]


def run_task(task: str, args, results: dict, save) -> None:
    """Every method of ``args.methods`` on ``task``, one after another; each method's result is cached
    (``points/<method>.json``) and merged into ``results`` (then ``save()``) as soon as it is done."""
    run = TaskRun(task, args)
    entry = results.setdefault("tasks", {}).setdefault(task, {"metric": run.t.metric, "methods": {}})
    run.dev  # noqa: B018
    entry.update({"dev_examples": len(run.dev), "latency_examples": len(run.timed), "latency_seed": args.latency_seed,
                  "select_examples": len(run.select), "train_examples": len(run.train)})
    results["selection"]["tasks"][task] = {"select_examples": len(run.select), "train_examples": len(run.train),
                                           "calibration_examples": len(run.calib)}
    previous = getattr(args, "previous", {}).get("tasks", {}).get(task, {}).get("methods", {})
    for name in args.methods:
        cache = run.points_dir / f"{name}.json"
        code = results["code_hashes"][name]
        prior = previous.get(name)
        if not args.recompute and prior and prior.get("code_hash") == code and prior.get("commit") != args.code_commit \
                and prior.get("context") == results["context"]:
            # the code this method runs, the settings and the machine are those that measured it: reused
            out = {**prior, "reused": True}
            print(f"[{task}] {name}: reused from commit {str(prior.get('commit'))[:12]} (its code hash is unchanged)")
        elif cache.is_file() and not args.recompute:
            out = json.loads(cache.read_text())
            changed = settings_changed(out["context"], results["context"]) if "context" in out else []
            if changed:
                raise ValueError(f"{cache}: these points were computed with other settings ("
                                 + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
                                 + "); pass --recompute to compute them again, or use another --output-dir")
            if out.get("code_hash") != code:
                check_one_commit([out.get("commit")], args.code_commit, args.allow_mixed, f"the cached points {cache}")
        else:
            t0 = time.time()
            print(f"[{task}] {name} ...", flush=True)
            torch.manual_seed(args.seed)
            out = RUNNERS[name](run)
            out["seconds"] = time.time() - t0
            out["commit"], out["command"], out["machine"] = args.code_commit, command(), machine_info()
            out["code_hash"], out["context"] = code, results["context"]
            out["noisy"] = is_noisy(out.get("self_speedup")) if out["points"] else False
            if name == "backbone":
                out["chosen"] = chosen_summary(out["points"][0])
            elif name == "oracle":
                out["chosen"] = None
            else:
                out["chosen"] = chosen_summary(choose(out["points"], *WINDOW))
            if name == "dpbert":
                keep_paths(run, out)
            for p in out["points"]:
                p.pop("_actions", None)
            cache.write_text(json.dumps(out, indent=2))
        entry["methods"][name] = out
        entry.update(task_noise(entry))
        print(f"[{task}] {name}: " + ", ".join(f"{p['score']:.1f}@{p['speedup_measured']:.2f}x" for p in out["points"])
              + (f"; self {out['self_speedup']:.3f}x" if out.get("self_speedup") else ""), flush=True)
        save()


# ---------------------------------------------------------------------- the same models on another device
def retime(args, out_dir: Path) -> Path:
    """Time the settings of ``tradeoff.json`` again on ``args.device`` at every ``args.batch_sizes``
    (the models under ``--output-dir``, nothing trained); writes ``tradeoff_<device>.json``, merged into
    the one there (other tasks and methods kept; a file of other code commits is refused unless
    ``--allow-mixed``, ``--fresh`` starts a new one). Each point also gets the layers it runs on this
    device (``layers_executed_mean_device``, ``speedup_ideal_device``) beside those of the run that
    made it: equal when the same models take the same paths here."""
    results = json.loads((out_dir / "tradeoff.json").read_text())
    check_one_commit([results.get("commit")], args.code_commit, args.allow_mixed, "re-timing tradeoff.json")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine_info()["cpu"]
    tag = re.sub(r"[^a-z0-9]+", "-", f"{device.type}-{name}".lower()).strip("-")
    path = out_dir / f"tradeoff_{tag}.json"
    out = {"device": str(device), "device_name": name, "batch_sizes": args.batch_sizes, "commit": args.code_commit,
           "source_commit": results.get("commit"), "machine": machine_info(), "command": command(), "tasks": {}}
    if args.note:
        out["note"] = args.note
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        check_one_commit([old.get("commit")], args.code_commit, args.allow_mixed, f"re-timing into {path}")
        if old.get("batch_sizes") != args.batch_sizes:
            raise ValueError(f"{path} was timed at batch sizes {old.get('batch_sizes')}, not {args.batch_sizes}: "
                             "use the same --batch-sizes, or --fresh")
        out["tasks"] = old.get("tasks", {})
        out["commands"] = old.get("commands", [old.get("command")]) + [out["command"]]
        notes = list(dict.fromkeys(x for x in (old.get("note"), args.note) if x))
        if notes:
            out["note"] = " | ".join(notes)
    for task in args.tasks:
        if task not in results.get("tasks", {}):
            continue
        run = TaskRun(task, args, train=False)
        entry = out["tasks"].setdefault(task, {"methods": {}})
        for mname in args.methods:
            src = results["tasks"][task]["methods"].get(mname)
            if not src or not src.get("points"):
                continue
            timed = [p for p in src["points"] if p.get("spec")]
            specs = [(p["setting"], p["spec"]) for p in timed]
            here = run.layers_on_device(specs, batch_size=max(args.batch_sizes))
            L = run.full.num_layers
            m = {"self_speedup": {}, "points": [{
                **{k: p.get(k) for k in ("setting", "score", "speedup_ideal", "select_score", "select_speedup_ideal")},
                "layers_executed_mean_device": here[p["setting"]],
                "speedup_ideal_device": speedup_ideal_fields(here[p["setting"]], L)["speedup_ideal"],
                # the source's layers on the same timed sample (its speedup_ideal is L / those)
                "layers_executed_mean_source": L / p["speedup_ideal"] if p.get("speedup_ideal") else 0.0,
            } for p in timed]}
            for bs in args.batch_sizes:
                lat = run.time_specs(specs, batch_size=bs)
                m["self_speedup"][str(bs)] = lat["__self__"]["speedup"]
                for p in m["points"]:
                    p[f"speedup_measured_b{bs}"] = lat[p["setting"]]["speedup"]
                    p[f"latency_ms_b{bs}"] = lat[p["setting"]]["latency_ms"]
                    p[f"latency_ms_full_b{bs}"] = lat["__full__"]["latency_ms"]
            m["noisy"] = any(is_noisy(s) for s in m["self_speedup"].values())
            entry["methods"][mname] = m
            print(f"[{task}] {mname} on {name}: " + ", ".join(
                f"b{bs} self {m['self_speedup'][str(bs)]:.3f}x" for bs in args.batch_sizes), flush=True)
        path.write_text(json.dumps(out, indent=2))
    write_device_report(out, results, path.with_suffix(".md"))
    plot_device(out, path.with_suffix(".png"))
    return path


# ---------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="rte,mrpc,stsb,sst2", help="comma-separated GLUE tasks, run one after another")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    ap.add_argument("--backbone", default="minilm",
                    help="minilm (the packaged 6-layer all-MiniLM-L6-v2), mpnet-base (the 12-layer all-mpnet-base-v2 "
                         "of the extra 'mpnet'), a local checkpoint directory or a hub name; one results file per "
                         "backbone (--results-dir)")
    ap.add_argument("--output-dir", default="runs/tradeoff", help="trained models and cached points")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--recompute", action="store_true", help="recompute points even where cached (models are reused)")
    ap.add_argument("--report-only", action="store_true", help="only redraw tables and figures from tradeoff.json")
    ap.add_argument("--plan", action="store_true", help="print the budget and time estimate of this run, then stop")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="merge results of other code commits or of a dirty tree (they are marked)")
    ap.add_argument("--fresh", action="store_true",
                    help="start a new tradeoff.json (with --retime: a new tradeoff_<device>.json) instead of merging "
                         "into the one there (its results are dropped)")
    g = ap.add_argument_group("training budget (2-core CPU defaults)")
    g.add_argument("--stage1-epochs", type=float, default=3.0, help="the backbone every method starts from")
    g.add_argument("--extra-epochs", type=float, default=1.0,
                   help="epochs every method trains beyond stage 1 (each final model's lineage)")
    g.add_argument("--stage2-share", type=float, default=0.5,
                   help="DPBERT and DPBERT-soft: the part of --extra-epochs that stage 2 takes; stage 3 the rest")
    g.add_argument("--max-train-samples", type=int, default=None,
                   help=f"training subset for every task (default per task: {TASK_SETTINGS})")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-4, help="stage-1 (and stage-2) learning rate")
    g.add_argument("--dpbert-stage3", default="auto", choices=STAGE3,
                   help="DPBERT's stage 3 (as the pipeline's --stage3): exact, the planners on the exact expected "
                        "reward over the frozen stage-2 backbone's path tree (one cache for every r); sampled, the "
                        "planners by REINFORCE on paths drawn from them on the frozen backbone (--sampled-epochs; it "
                        "scales to 12 layers); rl, joint REINFORCE for (1 - stage2-share) of --extra-epochs; auto, "
                        "exact up to 8 layers and sampled above")
    g.add_argument("--sampled-epochs", type=float, default=1.0,
                   help="stage 3 sampled: epochs of the planners' REINFORCE (the backbone frozen: not part of the "
                        "backbone's budget, like the exact stage's passes)")
    g.add_argument("--skip-aware", default=PipelineConfig.skip_aware, choices=SKIP_AWARE,
                   help="DPBERT's skip-aware backbone training within the same budget, as the pipeline's "
                        "--skip-aware (default: the pipeline's): adapt, the backbone fine-tuned on the exact "
                        "planners' paths for (1 - stage2-share) of --extra-epochs, then the planners again on its "
                        "new path tree; layerdrop, random layer subsets for that share before stage 2")
    g.add_argument("--planner-start", default=PipelineConfig.planner_start, choices=("stage2", "fixed-path"),
                   help="where DPBERT's sampled stage 3 starts (as the pipeline's --planner-start): stage2, the "
                        "planners as stage 2 left them; fixed-path, planners that take, on every input, the best "
                        "fixed path at each target rate (backward elimination on --calibration-samples selection "
                        "inputs, stage 2's backbone frozen), the start itself a candidate. Its models go to folders "
                        "of their own (_fixedstart); use a new --output-dir or --recompute for DPBERT's points")
    g.add_argument("--exact-epochs", type=float, default=20.0, help="stage 3 exact: passes over the path tree")
    g.add_argument("--exact-lr", type=float, default=1e-2, help="stage 3 exact: the planners' Adam learning rate")
    g.add_argument("--stage3-lr", type=float, default=2e-5, help="backbone lr in DPBERT's stage 3 and DPBERT-soft")
    g.add_argument("--stage3-batch-size", type=int, default=8, help="inputs per stage-3 batch (each drawn --samples times)")
    g.add_argument("--samples", type=int, default=4, help="paths drawn per input in stage 3")
    g.add_argument("--planner-lr", type=float, default=1e-3)
    g.add_argument("--lam", type=float, default=1.0)
    g.add_argument("--cost", type=float, default=0.05, help="starting price of a layer (dual ascent moves it)")
    g.add_argument("--dual-lr", type=float, default=0.02)
    g.add_argument("--beta", type=float, default=200.0)
    g.add_argument("--target-rates", default="0.3,0.5", help="DPBERT is trained once per target skip rate r")
    g.add_argument("--adapt-lr", type=float, default=5e-5,
                   help="backbone lr of the baselines' training beyond stage 1 (PABEE, BERxiT, LayerDrop, BERT-kL)")
    g.add_argument("--ramp-lr", type=float, default=5e-4, help="off-ramps and BERxiT's LTE head")
    g.add_argument("--kl-layers", default="",
                   help="BERT-kL: the depths k trained (default: L/2, 2L/3 and 5L/6: 3,4,5 of 6 layers, 6,8,10 of 12)")
    g.add_argument("--layerdrop", type=float, default=0.3, help="LayerDrop rate while fine-tuning")
    g.add_argument("--regression-tolerance", type=float, default=0.1, help="PABEE agreement on STS-B")
    g.add_argument("--evals-per-epoch", type=int, default=3, help="selection-split evaluations per epoch (every method)")
    g.add_argument("--seed", type=int, default=42)
    c = ap.add_argument_group("choices on the selection split")
    c.add_argument("--target-speedups", default="1.2,1.4,1.6,1.8,2.0,2.25,2.5",
                   help="ideal speed-ups (L / mean layers) every threshold is calibrated to")
    c.add_argument("--calibration-samples", type=int, default=250,
                   help="selection inputs DPBERT's threshold bisection runs on (early exits use all: replayed)")
    c.add_argument("--calibration-iterations", type=int, default=8, help="bisection steps per DPBERT target")
    m = ap.add_argument_group("latency")
    m.add_argument("--latency-samples", type=int, default=300, help="seeded sample of dev inputs timed (all if fewer)")
    m.add_argument("--latency-seed", type=int, default=0)
    m.add_argument("--latency-repeats", type=int, default=3)
    m.add_argument("--threads", type=int, default=2, help="torch threads for the whole run (training and timing)")
    m.add_argument("--retime", action="store_true",
                   help="only time the settings of tradeoff.json again (on --device, at --batch-sizes)")
    m.add_argument("--device", default="cpu", help="where --retime times: cpu or cuda (implies --retime)")
    m.add_argument("--batch-sizes", default=None, help="--retime: batch sizes timed (default 1 on cpu, 1,64 on cuda)")
    m.add_argument("--note", default=None,
                   help="--retime: a note kept in the device's results file (e.g. how the models were brought there)")
    args = ap.parse_args(argv)
    args.tasks = csv_list(args.tasks)
    args.methods = csv_list(args.methods, allowed=METHODS, what="methods", ap=ap)
    args.target_rates = csv_list(args.target_rates, float)
    args.target_speedups = csv_list(args.target_speedups, float)
    args.kl_layers = csv_list(args.kl_layers, int)
    if not 0 < args.stage2_share < 1:
        ap.error("--stage2-share must be in (0, 1)")
    if args.device != "cpu":
        args.retime = True
    bs = args.batch_sizes or ("1" if args.device == "cpu" else "1,64")
    args.batch_sizes = [int(x) for x in bs.split(",")]
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    args.backbone = canonical_backbone(args.backbone)  # the results file records one spelling per backbone
    return args


def selection_info() -> dict:
    return {"how": f"a seeded {SELECTION_FRACTION:.0%} of each task's training file (at most {SELECTION_MAX}), "
                   f"carved by dpbert_rl.data.carve_selection (seed {SELECTION_SEED}); training reads the rest "
                   "('fit'); every checkpoint, threshold, patience, rate and table setting is chosen on it; dev is "
                   "scored once per final model and setting",
            "seed": SELECTION_SEED, "fraction": SELECTION_FRACTION, "max": SELECTION_MAX, "tasks": {}}


def main(argv=None) -> None:
    args = parse_args(argv)
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tradeoff.json"
    if args.report_only:
        results = json.loads(path.read_text()) if path.is_file() else {}
        write_report(results, out_dir)
        plot(results, out_dir)
        for f in sorted(out_dir.glob("tradeoff_*.json")):  # the same models timed on other devices (--retime)
            device = json.loads(f.read_text())
            write_device_report(device, results, f.with_suffix(".md"))
            plot_device(device, f.with_suffix(".png"))
        return
    if args.plan:
        sizes = {}
        for t in args.tasks:
            n_fit = len(load_split(t, "fit", args.data_dir))
            cap = args.max_train_samples or TASK_SETTINGS.get(t, {}).get("max_train_samples")
            sizes[t] = (min(n_fit, cap or n_fit), len(load_split(t, "select", args.data_dir)),
                        len(load_split(t, "dev", args.data_dir)))
        scale = backbone_scale(args.backbone, args.tasks)  # train_step.py's files in benchmarks/results
        rows = plan(args, sizes, scale)
        print(f"backbone {args.backbone}: {scale['layers']} layers; costs against MiniLM: "
              + "; ".join(f"{t} {src}" for t, src in scale["source"].items()))
        cols = [k for k in rows[0] if k not in ("task",)]
        print("| task | " + " | ".join(cols) + " |")
        for r in rows:
            print(f"| {r['task']} | " + " | ".join(f"{r[k]:.0f}" for k in cols) + " |")
            seen = measured_seconds(Path(args.output_dir) / r["task"])
            if seen:  # an earlier run's wall clock beside the estimate, where it has one
                print(f"| {r['task']} measured | " + " | ".join(
                    f"{seen[k]:.0f}" if k in seen else "" for k in cols) + " |")
        print(f"estimated total: {sum(r['total'] for r in rows) / 3600:.2f} h (seconds per column above; "
              f"'measured': what the run under {args.output_dir} took, per method)")
        return
    args.code_commit = getattr(args, "code_commit", None) or pinned_code_commit()
    check_one_commit([], args.code_commit, args.allow_mixed, "this run")  # a dirty tree stops here, not hours later
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.retime:
        print(f"wrote {retime(args, out_dir)}")
        return
    results = {"commit": args.code_commit, "command": command(), "machine": machine_info(),
               "code_hashes": code_hashes(), "context": run_context(args),
               "selection": selection_info(), "args": {k: v for k, v in vars(args).items()},
               "budget": {"stage1_epochs": args.stage1_epochs, "extra_epochs": args.extra_epochs,
                          "stage2_share": args.stage2_share, "train_subsets": {t: (args.max_train_samples or
                          TASK_SETTINGS.get(t, {}).get("max_train_samples")) for t in args.tasks}}}

    fresh = args.fresh
    rerun = {(t, m) for t in args.tasks for m in args.methods}

    def save():
        existing = json.loads(path.read_text()) if path.is_file() and not fresh else {}
        merged = merge(existing, results, args.allow_mixed, rerun)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=2))
        tmp.replace(path)
        write_report(merged, out_dir)
        plot(merged, out_dir)

    if path.is_file() and not fresh:  # refuse before training, not after
        args.previous = json.loads(path.read_text())
        merge(args.previous, {**results, "tasks": {}}, args.allow_mixed, rerun)
    for task in args.tasks:
        run_task(task, args, results, save)
        fresh = False  # from the first save on, this run's file is the one to merge into


if __name__ == "__main__":
    main()
