"""Benchmark: what a training step costs, per backbone and task (issue 22: profile the step, measure length-grouped
batches and CPU autocast, and give ``--plan`` measured costs for the 12-layer runs).

For each task, one process at a fixed thread count, on the fit split at ``--batch-size`` and ``--max-seq-length``:

* the stage-1 step (every layer: forward, backward, AdamW; :class:`dpbert_rl.training.stages.StageRun`'s own
  ``_update``) in three variants: ``plain`` (the seeded shuffle every result so far was trained with),
  ``grouped`` (``--group-by-length``: HF's length-grouped order) and ``bf16`` (``--mixed-precision bf16``:
  Accelerate's CPU autocast, plain order). Each times the same number of batches drawn (seeded) from one
  epoch of its own order, after a warm-up step. A step's cost grows with its padded tokens, so the epoch
  estimate is the measured seconds per padded token times the epoch's padded tokens;
* the stage-3 ``sampled`` step (planners only, ``--samples`` paths per input sharing their prefixes; the
  backbone frozen: forward only), with fresh planners (p near 0.5), plain order;
* the batch-1 forward of the full model on dev inputs (ms, median of the per-input times);
* a ``torch.profiler`` table of one plain stage-1 step's operators (self CPU time).

Outputs ``benchmarks/results/train_step_<backbone>.json`` (``commit``, ``command``, ``machine``, rows) and
``.md``; ``benchmarks/tradeoff.py --plan`` and ``benchmarks/pipeline.py --plan`` read the JSON for that backbone.

    python benchmarks/train_step.py --backbone mpnet-base --tasks rte,sst2 --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS, command, csv_list, markdown_table, pinned_code_commit  # noqa: E402

VARIANTS = {"plain": {}, "grouped": {"group_by_length": True}, "bf16": {"mixed_precision": "bf16"}}


def parse_args(argv=None):
    from dpbert_rl.data import TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm", help="minilm, mpnet-base, or a checkpoint directory")
    ap.add_argument("--tasks", default="rte,mrpc,stsb,sst2", help="comma-separated GLUE tasks")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"stage-1 variants, from {','.join(VARIANTS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--samples", type=int, default=4, help="paths per input in the sampled stage-3 step")
    ap.add_argument("--latency-inputs", type=int, default=20, help="dev inputs timed at batch size 1")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="default: benchmarks/results/train_step_<backbone>.json")
    args = ap.parse_args(argv)
    args.tasks = csv_list(args.tasks, allowed=tuple(TASKS), what="tasks", ap=ap)
    args.variants = csv_list(args.variants, allowed=tuple(VARIANTS), what="variants", ap=ap)
    if not args.data_dir:
        ap.error("--data-dir (or $GLUE_DIR) is required")
    return args


def results_path(backbone: str, results_dir: Path = RESULTS) -> Path:
    """Where the step costs of ``backbone`` are written (and read by ``--plan``)."""
    return results_dir / f"train_step_{Path(backbone).name}.json"


def _run(stage: str, args, task: str, out: Path, init=None, **cfg_kw):
    from dpbert_rl.training import TrainConfig
    from dpbert_rl.training.stages import StageRun

    cfg = TrainConfig(task=task, backbone=args.backbone, data_dir=args.data_dir, output_dir=str(out),
                      batch_size=args.batch_size, max_seq_length=args.max_seq_length, seed=args.seed,
                      progress=False, samples=args.samples, target_rate=0.3 if stage == "sampled" else None,
                      **cfg_kw)
    cfg.validate()
    # Accelerate keeps one state per process, mixed precision included; the variants differ in it (its own tests
    # reset it the same way between runs)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run = StageRun(stage, cfg, init)
    run.step, run.total_steps = 0, 10 ** 6
    return run


def time_steps(run, n: int, seed: int, profile: bool = False) -> dict:
    """``n`` batches drawn (seeded) from one epoch of ``run``'s order, each through one optimizer step, after one
    warm-up step; seconds and padded tokens per step, and the epoch's padded tokens."""
    import random

    import torch

    batches = list(run._epoch_loader())
    padded = [int(b["input_ids"].numel()) for b in batches]
    picks = random.Random(seed).sample(range(len(batches)), min(n + 1, len(batches)))
    run._update(batches[picks[0]])  # warm-up
    secs, toks, table = [], [], None
    for i in picks[1:]:
        t0 = time.perf_counter()
        run._update(batches[i])
        secs.append(time.perf_counter() - t0)
        toks.append(padded[i])
    if profile:  # one more step, under the profiler (its overhead kept out of the timings)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run._update(batches[picks[-1]])
        table = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                 for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    per_token = sum(secs) / sum(toks)
    return {"steps_per_epoch": len(batches), "timed_steps": len(secs), "step_seconds": statistics.mean(secs),
            "tokens_per_step": statistics.mean(toks), "epoch_padded_tokens": sum(padded),
            "epoch_seconds": per_token * sum(padded), "profile": table}


def batch1_ms(model, task: str, args) -> float:
    """The full model's batch-1 forward on ``--latency-inputs`` dev inputs (read without labels), ms: the median
    over passes of the mean per input (:func:`dpbert_rl.evaluation.latency.interleaved_latency`)."""
    from dpbert_rl.data import load_inputs
    from dpbert_rl.evaluation.latency import interleaved_latency
    from dpbert_rl.model.budget import encode_inputs

    inputs = load_inputs(task, "dev", args.data_dir, max_samples=args.latency_inputs)
    batches = encode_inputs(model, inputs, args.max_seq_length, batch_size=1)
    model.eval()
    got = interleaved_latency({"full": lambda b: model(**b, mode="full")}, batches, repeats=3, warmup=1,
                              threads=args.threads)
    return got["full"]["latency_ms"]


def measure_task(task: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    row = {"task": task, "backbone": args.backbone, "batch_size": args.batch_size,
           "max_seq_length": args.max_seq_length, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            run = _run("finetune", args, task, Path(tmp) / name, **VARIANTS[name])
            got = time_steps(run, args.steps, args.seed, profile=name == "plain" and not args.no_profile)
            profile = got.pop("profile")
            if profile is not None:
                row["profile_plain_step"] = profile
            if name == "plain":
                row["batch1_ms_full"] = batch1_ms(run.raw, task, args)
            row["num_layers"] = run.raw.num_layers
            row["variants"][name] = got
            print(f"{task} {name}: {got['step_seconds']:.2f} s/step ({got['tokens_per_step']:.0f} padded tokens), "
                  f"epoch ~{got['epoch_seconds'] / 60:.1f} min", flush=True)
        run = _run("sampled", args, task, Path(tmp) / "sampled")
        row["sampled"] = time_steps(run, args.steps, args.seed)
        row["sampled"].pop("profile")
        print(f"{task} sampled stage 3: {row['sampled']['step_seconds']:.2f} s/step", flush=True)
    return row


def write_report(res: dict, path: Path) -> None:
    rows = []
    for r in res["rows"]:
        v = r["variants"]
        plain = v.get("plain", {})
        row = {"task": r["task"], "layers": r["num_layers"], "b1": r.get("batch1_ms_full"),
               "sampled": r["sampled"]["step_seconds"]}
        for name in VARIANTS:
            if name in v:
                row[f"{name}_s"] = v[name]["step_seconds"]
                row[f"{name}_epoch"] = v[name]["epoch_seconds"] / 60
                if plain and name != "plain":
                    row[f"{name}_ratio"] = v[name]["epoch_seconds"] / plain["epoch_seconds"]
        rows.append(row)
    cols = [("task", "task", ""), ("layers", "layers", "")]
    for name in VARIANTS:
        cols += [(f"{name} s/step", f"{name}_s", ".2f"), (f"{name} min/epoch", f"{name}_epoch", ".1f")]
        if name != "plain":
            cols.append((f"{name} / plain", f"{name}_ratio", ".2f"))
    cols += [("sampled stage-3 s/step", "sampled", ".2f"), ("batch-1 ms", "b1", ".1f")]
    lines = [f"# What a training step costs: {res['backbone']}", "",
             f"Code `{res['commit']}`, {res['threads']} threads, batch {res['batch_size']}, length <= "
             f"{res['max_seq_length']}, {res['steps']} timed steps per variant after a warm-up. Command: "
             f"`{res['command']}`. Machine: {res['machine'].get('processor')}, {res['machine'].get('cpu_count')} cores.",
             "", "An epoch's minutes: the measured seconds per padded token times the epoch's padded tokens "
             "(the fit split in its own order).", "", markdown_table(rows, cols), ""]
    for r in res["rows"]:
        if r.get("profile_plain_step"):
            lines += [f"## {r['task']}: one plain stage-1 step, top operators by self CPU time", "",
                      markdown_table(r["profile_plain_step"], [("operator", "op", ""), ("self ms", "self_cpu_ms", ".1f"),
                                                               ("calls", "calls", "")]), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    from dpbert_rl.evaluation.latency import machine_info

    args = parse_args(argv)
    out = Path(args.results) if args.results else results_path(args.backbone)
    res = {"backbone": args.backbone, "commit": pinned_code_commit(), "command": command(), "machine": machine_info(),
           "threads": args.threads, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
           "steps": args.steps, "rows": []}
    if out.is_file():  # other tasks measured before are kept (one file per backbone)
        old = json.loads(out.read_text())
        if old.get("commit") == res["commit"] and old.get("batch_size") == args.batch_size:
            res["rows"] = [r for r in old["rows"] if r["task"] not in args.tasks]
    for task in args.tasks:
        res["rows"].append(measure_task(task, args))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        write_report(res, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
