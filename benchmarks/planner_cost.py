"""Benchmark: what the planners themselves cost at batch size 1 (issue 23: measured over ideal speed-up >= 0.9).

For each DPBERT checkpoint, on a seeded sample of its task's dev inputs, one input at a time, interleaved in
one process at a fixed thread count (median of ``--repeats`` passes):

* ``full``: every layer (the backbone's own speed, the reference);
* ``reference``: hard mode through the reference loop (``DPBert.lean_inference = False``: the planners read
  their features per layer as in training, decisions as tensors);
* ``lean``: hard mode through the inference path (``Planners.decider``, Python decisions at batch size 1).

Each pass also times the layer calls alone (``Backbone.layer``), so a pass splits into layers and the rest
(embeddings, head, and in hard mode the planners and their bookkeeping). Reported per checkpoint: the mean
layers run, the ideal speed-up ``L / layers``, the measured speed-up of both hard-mode paths against
``full``, measured over ideal, and the planners' own milliseconds (a hard pass's rest minus the full pass's).

Outputs ``benchmarks/results/planner_cost.json`` (``commit``, ``command``, ``machine``, rows) and
``planner_cost.md``.

    python benchmarks/planner_cost.py runs/skip_aware/stsb/exact_r0.3/model runs/skip_aware/sst2/exact_r0.3/model \\
        --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS, command, markdown_table, pinned_code_commit  # noqa: E402

PATHS = ("full", "reference", "lean")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="trained DPBERT model/ directories (each names its task)")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--samples", type=int, default=300, help="dev inputs timed (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="passes per path, interleaved; the median is kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS / "planner_cost.json"))
    return ap.parse_args(argv)


def time_checkpoint(path: str, args) -> dict:
    import torch

    from dpbert_rl.data import get_task, load_inputs
    from dpbert_rl.evaluation.latency import sample_indices
    from dpbert_rl.model import DPBert
    from dpbert_rl.model.backbone import Backbone

    model = DPBert.load(path, require_planners=True).eval()
    task = get_task(model.task_info.task)
    raw = load_inputs(task.name, "dev", args.data_dir)
    a_texts, b_texts = raw["text_a"], raw.get("text_b")
    encs = []
    for i in sample_indices(len(a_texts), args.samples, args.seed):
        pair = [[a_texts[int(i)]]] + ([[b_texts[int(i)]]] if b_texts and b_texts[int(i)] is not None else [])
        encs.append(model.tokenizer(*pair, truncation=True, max_length=model.task_info.max_seq_length,
                                    return_tensors="pt"))
    spent = {"layers": 0.0}
    real = Backbone.layer

    def timed_layer(self, *a, **kw):
        t = time.perf_counter()
        out = real(self, *a, **kw)
        spent["layers"] += time.perf_counter() - t
        return out

    def one_pass(name: str) -> tuple:
        model.lean_inference = name == "lean"
        mode = "full" if name == "full" else "hard"
        spent["layers"], layers = 0.0, 0
        t = time.perf_counter()
        with torch.inference_mode():
            for e in encs:
                layers += int(model(**e, mode=mode).layers_executed)
        total = time.perf_counter() - t
        n = len(encs)
        return total * 1000 / n, spent["layers"] * 1000 / n, layers / n

    Backbone.layer = timed_layer
    try:
        one_pass("full")  # warm-up
        runs = {p: [] for p in PATHS}
        for _ in range(args.repeats):
            for p in PATHS:
                runs[p].append(one_pass(p))
    finally:
        Backbone.layer = real
        model.lean_inference = True
    med = {p: tuple(statistics.median(r[k] for r in runs[p]) for k in range(3)) for p in PATHS}
    full_ms, full_layer_ms, L = med["full"]
    row = {"checkpoint": path, "task": task.name, "inputs": len(encs), "num_layers": model.num_layers,
           "layers_executed_mean": med["lean"][2], "full_ms": full_ms, "fixed_ms": full_ms - full_layer_ms}
    row["speedup_ideal"] = model.num_layers / row["layers_executed_mean"]
    for p in ("reference", "lean"):
        ms, layer_ms, _ = med[p]
        row[f"{p}_ms"] = ms
        row[f"{p}_speedup"] = full_ms / ms
        row[f"{p}_ratio"] = row[f"{p}_speedup"] / row["speedup_ideal"]
        row[f"{p}_planner_ms"] = (ms - layer_ms) - (full_ms - full_layer_ms)
    return row


def write_report(res: dict, path: Path) -> None:
    cols = [("task", "task", ""), ("layers", "layers_executed_mean", ".2f"), ("ideal", "speedup_ideal", ".2f"),
            ("full ms", "full_ms", ".2f"), ("embed+head ms", "fixed_ms", ".2f"),
            ("reference: speed-up", "reference_speedup", ".2f"), ("measured/ideal", "reference_ratio", ".3f"),
            ("planners ms", "reference_planner_ms", ".2f"),
            ("lean: speed-up", "lean_speedup", ".2f"), ("measured/ideal ", "lean_ratio", ".3f"),
            ("planners ms ", "lean_planner_ms", ".2f")]
    lines = ["# The planners' own cost at batch size 1", "",
             "Written by `benchmarks/planner_cost.py`; do not edit by hand. One input at a time, the three paths "
             "interleaved in one process (median of the passes); 'planners ms': a hard-mode pass's time outside "
             "the layer calls minus the full pass's (embeddings and head). Even with free planners, measured over "
             "ideal stays below 1 by the embeddings and head, which every path runs.", "",
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
              f"({r['lean_ratio']:.3f}); planners {r['reference_planner_ms']:.2f} -> {r['lean_planner_ms']:.2f} ms")


if __name__ == "__main__":
    main()
