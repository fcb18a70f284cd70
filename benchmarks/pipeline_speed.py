"""Benchmark: is the speed-up kept behind ``transformers.pipeline``? (issue 24)

For a calibrated DPBERT checkpoint and a budget, times at batch size 1, interleaved, on a seeded sample of
dev inputs:

* through ``pipeline("text-classification", trust_remote_code=True, model_kwargs={"budget": B})`` against the
  same folder loaded as the plain backbone through ``pipeline`` (tokenising and post-processing included);
* the way ``dpbert-rl evaluate`` times it: DPBERT's hard mode against the full model on pre-tokenised inputs.

The ratio of the two speed-ups is what the pipeline keeps of the model's own. Appends a row to
``benchmarks/results/pipeline_speed.json`` (command, commit, machine) and rewrites ``pipeline_speed.md``.

    python benchmarks/pipeline_speed.py runs/bench-budget/rte/one_model_linear/model --budget 0.67 \\
        --data-dir ../shared/data/glue --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, markdown_table  # noqa: E402
from _common import pinned_code_commit as commit  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a DPBERT model/ directory with a budget curve (dpbert-rl calibrate)")
    ap.add_argument("--budget", type=float, required=True, help="fraction of the layers to run, in (0, 1)")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    ap.add_argument("--samples", type=int, default=100, help="dev inputs timed (seeded sample)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS / "pipeline_speed.json"))
    args = ap.parse_args(argv)
    commit()

    import torch
    from transformers import pipeline

    from dpbert_rl.data import load_inputs
    from dpbert_rl.evaluation.latency import interleaved_latency, machine_info, sample_indices
    from dpbert_rl.model.auto import DPBertForSequenceClassification
    from dpbert_rl.model.budget import encode_inputs

    torch.set_num_threads(args.threads)
    dp = pipeline("text-classification", model=args.checkpoint, trust_remote_code=True,
                  model_kwargs={"budget": args.budget})
    plain = pipeline("text-classification", model=args.checkpoint)  # the same folder, every layer
    assert isinstance(dp.model, DPBertForSequenceClassification), type(dp.model)
    task = dp.model.dpbert.task_info.task
    inputs = load_inputs(task, "dev", args.data_dir)  # labels never read
    idx = sample_indices(len(inputs["text_a"]), args.samples, 0)
    inputs = {k: [inputs[k][i] for i in idx] for k in ("text_a", "text_b")}
    texts = [a if b is None else {"text": a, "text_pair": b} for a, b in zip(inputs["text_a"], inputs["text_b"])]
    through = interleaved_latency({"plain": lambda t: plain(t), "dpbert": lambda t: dp(t)}, texts,
                                  repeats=args.repeats, threads=args.threads)
    model = dp.model.dpbert
    enc = encode_inputs(model, inputs, model.task_info.max_seq_length or 128, batch_size=1)
    direct = interleaved_latency(
        {"full": lambda e: model(e["input_ids"], e["attention_mask"], e.get("token_type_ids"), mode="full"),
         "dpbert": lambda e: model(e["input_ids"], e["attention_mask"], e.get("token_type_ids"), mode="hard")},
        enc, repeats=args.repeats, threads=args.threads)
    row = {"checkpoint": args.checkpoint, "task": task, "budget": args.budget, "samples": len(texts),
           "pipeline_speedup": through["dpbert"]["speedup"], "evaluate_speedup": direct["dpbert"]["speedup"],
           "kept": through["dpbert"]["speedup"] / direct["dpbert"]["speedup"],
           "pipeline_ms": through["dpbert"]["latency_ms"], "pipeline_plain_ms": through["plain"]["latency_ms"],
           "model_ms": direct["dpbert"]["latency_ms"], "model_full_ms": direct["full"]["latency_ms"],
           "commit": commit(), "command": command(), "machine": machine_info()}
    path = Path(args.results)
    rows = (json.loads(path.read_text()) if path.is_file() else []) + [row]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    cols = [("task", "task", ""), ("budget", "budget", ".2f"), ("through pipeline()", "pipeline_speedup", ".3f"),
            ("as evaluate times it", "evaluate_speedup", ".3f"), ("kept", "kept", ".3f"),
            ("pipeline ms", "pipeline_ms", ".2f"), ("plain pipeline ms", "pipeline_plain_ms", ".2f")]
    path.with_suffix(".md").write_text(
        "# DPBERT behind `transformers.pipeline` (`benchmarks/pipeline_speed.py`)\n\n"
        "Batch-1 speed-up through `pipeline()` (against the same folder as the plain backbone, tokenising and "
        "post-processing included) and as `dpbert-rl evaluate` measures it (pre-tokenised, DPBERT against the "
        "full model); `kept` is their ratio (the target: >= 0.9).\n\n" + markdown_table(rows, cols) + "\n\n"
        + "\n".join(f"- `{r['command']}` at {r['commit'][:10]}" for r in rows) + "\n")
    print(json.dumps({k: row[k] for k in ("task", "budget", "pipeline_speedup", "evaluate_speedup", "kept")}))


if __name__ == "__main__":
    main()
