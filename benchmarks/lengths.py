"""Benchmark: how long the inputs of each split are, per task (words, text_a and text_b together).

Rates and thresholds are set on the selection split (carved from the training file) and served on dev; the
planners' features, and so their paths, move with an input's length. Where the two splits' lengths differ (SST-2:
the training file's phrases, dev's whole sentences) a rate set on one is not the rate on the other. This script
writes the figures the READMEs quote for that: per task and split (``fit``, ``select``, ``dev``), the number of
inputs, mean and median words, and the share of inputs of at most ``--short`` words.

Outputs ``benchmarks/results/lengths.json`` (``commit``, ``command``, ``machine``, rows) and ``.md``. Reads the
data only (no model): a few seconds.

    python benchmarks/lengths.py --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS, command, csv_list, markdown_table, pinned_code_commit  # noqa: E402

SPLITS = ("fit", "select", "dev")


def parse_args(argv=None):
    from dpbert_rl.data import TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="rte,mrpc,stsb,sst2", help="comma-separated GLUE tasks")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"),
                    help="local GLUE directory (default: $GLUE_DIR; without one, the hub)")
    ap.add_argument("--short", type=int, default=5, help="an input of at most this many words counts as short")
    ap.add_argument("--results", default=str(RESULTS / "lengths.json"), help="where the JSON goes (.md beside it)")
    args = ap.parse_args(argv)
    args.tasks = csv_list(args.tasks, allowed=tuple(TASKS), what="tasks", ap=ap)
    if args.short < 1:
        ap.error(f"--short must be at least 1; got {args.short}")
    return args


def words(example: dict) -> int:
    """Whitespace-separated words of one input, both sentences of a pair counted."""
    return len(example["text_a"].split()) + len((example.get("text_b") or "").split())


def split_row(task: str, split: str, data_dir, short: int) -> dict:
    from dpbert_rl.data import load_split

    ds = load_split(task, split, data_dir)
    n = [words(ex) for ex in ds]
    return {"task": task, "split": split, "inputs": len(n), "words_mean": statistics.fmean(n),
            "words_median": statistics.median(n), "short_share": sum(k <= short for k in n) / len(n)}


def write(rows: list, args) -> Path:
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    from dpbert_rl.evaluation.latency import machine_info

    meta = {"commit": pinned_code_commit(), "command": command(), "machine": machine_info(), "short": args.short}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    cols = [("task", "task", ""), ("split", "split", ""), ("inputs", "inputs", ""), ("words, mean", "words_mean", ".1f"),
            ("words, median", "words_median", ".1f"), (f"share of <= {args.short} words", "short_share", ".1%")]
    md = (f"# Input lengths per split\n\nWritten by `benchmarks/lengths.py`; do not edit by hand. Commit "
          f"{meta['commit']}. Command: `{meta['command']}`. Machine: {meta['machine']['platform']}.\n\n"
          "Words are whitespace-separated, both sentences of a pair counted. `fit` and `select` are the two parts of "
          "the training file (the selection split is where rates, thresholds and checkpoints are chosen); `dev` is "
          "scored.\n\n" + markdown_table(rows, cols) + "\n")
    out.with_suffix(".md").write_text(md)
    return out


def main(argv=None) -> list:
    args = parse_args(argv)
    rows = [split_row(t, s, args.data_dir, args.short) for t in args.tasks for s in SPLITS]
    out = write(rows, args)
    print(out.with_suffix(".md").read_text())
    return rows


if __name__ == "__main__":
    main()
