"""Benchmark: agents compared on one fine-tuned MiniLM backbone, frozen and joint, on RTE and SST-2.

For each task it takes the fine-tuned backbone written by ``benchmarks/pipeline.py`` (stage 1), trains
every agent in the batched environment, and evaluates its greedy policy on the full dev set with
real skipping (score, layers executed, batch-1 speed-up), next to random skipping at the same rate.
Writes ``benchmarks/results/agents.json``, ``agents.md`` and ``agents.png`` (dev score against layers
executed, with the first-k and random references drawn as curves).

    python benchmarks/agents.py --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

# this file is named like the `agents` package: import the package before the script's folder is on the path
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
from agents.cli import plot, run_agent  # noqa: E402

sys.path.insert(0, _HERE)
from _common import RESULTS, command, commit, markdown_table  # noqa: E402

from agents.evaluate import score_agent  # noqa: E402
from agents.references import FirstK, RandomSkip  # noqa: E402
from dpbert_rl.data import collator, get_task, load_split, tokenize  # noqa: E402
from dpbert_rl.latency import machine_info  # noqa: E402
from dpbert_rl.model import DPBert  # noqa: E402


def reference_curves(model_dir: str, task: str, data_dir: str, seed: int) -> dict:
    model = DPBert.load(model_dir).eval()
    t = get_task(task)
    dev = tokenize(load_split(t, "dev", data_dir), model.tokenizer, model.task_info.max_seq_length)
    collate = collator(model.tokenizer)
    L = model.num_layers
    first_k = [score_agent(FirstK(k, L), model, t, dev, collate) for k in range(1, L + 1)]
    rand = [score_agent(RandomSkip(r, L, seed), model, t, dev, collate) for r in (0.1, 0.2, 0.3, 0.4, 0.5)]
    return {"first-k": [(r["layers_executed_mean"], r["score"]) for r in first_k],
            "random": [(r["layers_executed_mean"], r["score"]) for r in rand]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    ap.add_argument("--tasks", default="rte,sst2")
    ap.add_argument("--agents", default="reinforce,ppo,always")
    ap.add_argument("--modes", default="frozen,joint")
    ap.add_argument("--pipeline-dir", default="runs/bench-pipeline", help="where benchmarks/pipeline.py trained")
    ap.add_argument("--total-steps", type=int, default=12_000)
    ap.add_argument("--num-envs", type=int, default=32)
    ap.add_argument("--max-train-samples", type=int, default=5000)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--target-rate", type=float, default=0.3)
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/bench-agents")
    args = ap.parse_args()
    commit()  # pin the commit this run starts from

    rows, curves = [], {}
    for task in args.tasks.split(","):
        model_dir = f"{args.pipeline_dir}/{task}/stage1_finetune/model"
        if not Path(model_dir, "dpbert.json").is_file():
            raise SystemExit(f"{model_dir} is missing: run benchmarks/pipeline.py --tasks {task} first")
        curves[task] = reference_curves(model_dir, task, args.data_dir, args.seed)
        for mode in args.modes.split(","):
            for agent in args.agents.split(","):
                ns = SimpleNamespace(model=model_dir, task=task, data_dir=args.data_dir, backbone_mode=mode,
                                     total_steps=args.total_steps if agent not in ("always", "random") else 0,
                                     num_envs=args.num_envs, max_train_samples=args.max_train_samples,
                                     max_eval_samples=None, lam=args.lam, cost=1.0, target_rate=args.target_rate,
                                     latency_samples=args.latency_samples, seed=args.seed,
                                     output_dir=f"{args.output_dir}/{task}-{mode}")
                row = run_agent(agent, ns)
                row.update({"commit": commit(), "command": command(), "lam": args.lam,
                            "target_rate": args.target_rate, "machine": machine_info()})
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "machine"}))
                (RESULTS / "agents.json").write_text(json.dumps(rows, indent=2))
    cols = [("task", "task", ""), ("agent", "agent", ""), ("backbone", "backbone_mode", ""),
            ("dev score", "dev_score", ".2f"), ("random, same rate", "random_same_rate_score", ".2f"),
            ("layers", "layers_executed_mean", ".2f"), ("speed-up", "speedup_measured", ".2f"),
            ("env steps", "env_steps", ""), ("train s", "train_seconds", ".0f")]
    (RESULTS / "agents.md").write_text("# Agents on fine-tuned MiniLM-L6 (dev sets)\n\nWritten by "
                                       "`benchmarks/agents.py`.\n\n" + markdown_table(rows, cols) + "\n")
    plot(rows, RESULTS / "agents.png", curves)


if __name__ == "__main__":
    main()
