"""Benchmark: what the planners themselves cost at batch size 1 (issue 23: measured over ideal speed-up >= 0.9).

For each DPBERT checkpoint, on a seeded sample of its task's dev inputs, one input at a time, interleaved in
one process at a fixed thread count (median of ``--repeats`` passes):

* ``full``: every layer (the backbone's own speed, the reference);
* ``reference``: hard mode through the reference loop (``DPBert.lean_inference = False``: the planners read
  their features per layer as in training, decisions as tensors);
* ``lean``: hard mode through the inference path (``Planners.decider``, Python decisions at batch size 1).

Timed by :func:`dpbert_rl.evaluation.latency.interleaved_latency` (the order alternating per input and pass);
the layer calls are timed apart (``Backbone.layer``, their mean over the passes), so a path splits into layers
and the rest (embeddings, head, and in hard mode the planners and their bookkeeping). Reported per checkpoint: the mean
layers run, the ideal speed-up ``L / layers``, the measured speed-up of both hard-mode paths against
``full``, measured over ideal, and the planners' own milliseconds (a hard pass's rest minus the full pass's).

Why measured over ideal can be low with cheap planners: ``L / layers`` counts every input's layers alike, but
a layer on a long input costs more than one on a short input. Planners that skip more on short inputs save
less time than the layer count says. So each row also has the **length-weighted ideal**
``L * sum(T) / sum(T * k)`` (``T`` an input's tokens, ``k`` its layers run: the speed-up if a layer's cost
were proportional to its tokens and nothing else cost anything), measured over it, and Spearman's rank
correlation between ``T`` and ``k`` over the timed inputs.

A checkpoint may be given as ``PATH@THRESHOLD`` to time it at that execute threshold (a trade-off point's
``spec``) instead of its own.

Outputs ``benchmarks/results/planner_cost.json`` (``commit``, ``command``, ``machine``, rows) and
``planner_cost.md``.

    python benchmarks/planner_cost.py runs/skip_aware/stsb/exact_r0.3/model runs/skip_aware/sst2/exact_r0.3/model \\
        --data-dir ../shared/data/glue
    python benchmarks/planner_cost.py runs/tradeoff-adapt/rte/stage3_adapt_exact_r0.5/model@0.5 \\
        --data-dir ../shared/data/glue --results benchmarks/results/planner_cost_tradeoff.json
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

from _common import RESULTS, command, markdown_table, pinned_code_commit  # noqa: E402

PATHS = ("full", "reference", "lean")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="trained DPBERT model/ directories (each names its task), each "
                    "optionally PATH@THRESHOLD to run it at that execute threshold")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--samples", type=int, default=300, help="dev inputs timed (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="passes per path, interleaved; the median is kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS / "planner_cost.json"))
    return ap.parse_args(argv)


def split_checkpoint(arg: str) -> tuple:
    """``PATH`` or ``PATH@THRESHOLD`` -> ``(path, threshold or None)``."""
    path, at, thr = arg.rpartition("@")
    if not at:
        return arg, None
    try:
        value = float(thr)
    except ValueError:
        raise SystemExit(f"{arg}: the part after '@' must be an execute threshold in [0, 1]; got {thr!r}") from None
    if not 0.0 <= value <= 1.0:
        raise SystemExit(f"{arg}: the execute threshold must be in [0, 1]; got {value}")
    return path, value


def time_checkpoint(arg: str, args) -> dict:
    import torch
    from scipy.stats import spearmanr

    from dpbert_rl.data import get_task, load_inputs
    from dpbert_rl.evaluation.evaluate import speedup_ideal_length_weighted
    from dpbert_rl.evaluation.latency import interleaved_latency, sample_indices
    from dpbert_rl.model import DPBert
    from dpbert_rl.model.backbone import Backbone
    from dpbert_rl.model.budget import encode_inputs

    path, threshold = split_checkpoint(arg)
    model = DPBert.load(path, require_planners=True).eval()
    if threshold is not None:
        model.threshold = threshold
    task = get_task(model.task_info.task)
    raw = load_inputs(task.name, "dev", args.data_dir)  # the inputs alone: labels are never read
    idx = sample_indices(len(raw["text_a"]), args.samples, args.seed)
    inputs = {k: [raw[k][i] for i in idx] for k in ("text_a", "text_b")}
    encs = encode_inputs(model, inputs, model.task_info.max_seq_length, batch_size=1)
    layer_s, now = dict.fromkeys(PATHS, 0.0), {"path": "full"}
    real = Backbone.layer

    def timed_layer(self, *a, **kw):  # the layer calls' share of each path's time
        t = time.perf_counter()
        out = real(self, *a, **kw)
        layer_s[now["path"]] += time.perf_counter() - t
        return out

    def runner(name: str):
        mode = "full" if name == "full" else "hard"

        def call(e: dict) -> None:
            now["path"] = name
            model.lean_inference = name == "lean"
            model(e["input_ids"], e["attention_mask"], e.get("token_type_ids"), mode=mode)

        return call

    with torch.inference_mode():  # each timed input's tokens and layers run, counted once, outside the timing
        tokens = [int(e["attention_mask"].sum()) for e in encs]
        per_input = [int(model(e["input_ids"], e["attention_mask"], e.get("token_type_ids"),
                               mode="hard").layers_executed.sum()) for e in encs]
    runners = {p: runner(p) for p in PATHS}
    Backbone.layer = timed_layer
    try:
        for e in encs[:5]:  # warm-up, not counted
            for fn in runners.values():
                fn(e)
        for p in PATHS:
            layer_s[p] = 0.0
        timed = interleaved_latency(runners, encs, repeats=args.repeats, warmup=0, threads=args.threads)
    finally:
        Backbone.layer = real
        model.lean_inference = True
    calls = args.repeats * len(encs)
    ms = {p: timed[p]["latency_ms"] for p in PATHS}
    layer_ms = {p: 1000 * layer_s[p] / calls for p in PATHS}
    fixed = ms["full"] - layer_ms["full"]  # embeddings and head
    row = {"checkpoint": path, "threshold": model.threshold, "task": task.name, "inputs": len(encs),
           "num_layers": model.num_layers, "layers_executed_mean": sum(per_input) / len(per_input), "full_ms": ms["full"],
           "fixed_ms": fixed, "tokens_mean": sum(tokens) / len(tokens)}
    row["speedup_ideal"] = model.num_layers / row["layers_executed_mean"]
    row["speedup_ideal_length_weighted"] = speedup_ideal_length_weighted(tokens, per_input, model.num_layers)
    rho = spearmanr(tokens, per_input).statistic if len(set(per_input)) > 1 and len(set(tokens)) > 1 else None
    row["length_layers_spearman"] = None if rho is None else float(rho)
    for p in ("reference", "lean"):
        row[f"{p}_ms"] = ms[p]
        row[f"{p}_speedup"] = timed[p]["speedup"]
        row[f"{p}_ratio"] = row[f"{p}_speedup"] / row["speedup_ideal"]
        row[f"{p}_planner_ms"] = (ms[p] - layer_ms[p]) - fixed
    row["lean_ratio_length_weighted"] = row["lean_speedup"] / row["speedup_ideal_length_weighted"]
    return row


def write_report(res: dict, path: Path) -> None:
    cols = [("task", "task", ""), ("layers", "layers_executed_mean", ".2f"), ("ideal", "speedup_ideal", ".2f"),
            ("full ms", "full_ms", ".2f"), ("embed+head ms", "fixed_ms", ".2f"),
            ("reference: speed-up", "reference_speedup", ".2f"), ("measured/ideal", "reference_ratio", ".3f"),
            ("planners ms", "reference_planner_ms", ".2f"),
            ("lean: speed-up", "lean_speedup", ".2f"), ("measured/ideal ", "lean_ratio", ".3f"),
            ("planners ms ", "lean_planner_ms", ".2f"), ("thr", "threshold", ".3f"),
            ("length-weighted ideal", "speedup_ideal_length_weighted", ".2f"),
            ("lean/length-weighted", "lean_ratio_length_weighted", ".3f"),
            ("Spearman(tokens, layers)", "length_layers_spearman", ".2f")]
    lines = ["# The planners' own cost at batch size 1", "",
             "Written by `benchmarks/planner_cost.py`; do not edit by hand. One input at a time, the three paths "
             "interleaved in one process (median of the passes); 'planners ms': a hard-mode pass's time outside "
             "the layer calls minus the full pass's (embeddings and head). Even with free planners, measured over "
             "ideal stays below 1 by the embeddings and head, which every path runs. 'length-weighted ideal': "
             "L * sum(T) / sum(T * k) over the timed inputs (T tokens, k layers run); below the ideal when the "
             "planners skip more on short inputs (a positive Spearman correlation of tokens and layers).", "",
             f"Commit {res['commit']}; command `{res['command']}`; {res['machine'].get('cpu', '')}, "
             f"{res['threads']} threads.", "", markdown_table(res["rows"], cols), "",
             "Checkpoints: " + ", ".join(f"`{r['checkpoint']}`" for r in res["rows"]), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    import torch

    from dpbert_rl.evaluation.latency import machine_info

    args = parse_args(argv)
    if not args.data_dir:
        raise SystemExit("--data-dir (or $GLUE_DIR) is needed: the local GLUE directory")
    torch.set_num_threads(args.threads)
    res = {"commit": pinned_code_commit(), "command": command(), "machine": machine_info(), "threads": args.threads,
           "rows": [time_checkpoint(c, args) for c in args.checkpoints]}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    write_report(res, out.with_suffix(".md"))
    for r in res["rows"]:
        print(f"{r['task']}: {r['layers_executed_mean']:.2f} layers, ideal {r['speedup_ideal']:.2f}x; reference "
              f"{r['reference_speedup']:.2f}x ({r['reference_ratio']:.3f}), lean {r['lean_speedup']:.2f}x "
              f"({r['lean_ratio']:.3f}); planners {r['reference_planner_ms']:.2f} -> {r['lean_planner_ms']:.2f} ms; "
              f"length-weighted ideal {r['speedup_ideal_length_weighted']:.2f}x ({r['lean_ratio_length_weighted']:.3f})")


if __name__ == "__main__":
    main()
