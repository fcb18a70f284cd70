"""Benchmark: environment steps per second against the raw batched model forward.

On SST-2 dev with the MiniLM default, it measures
- the single env (one input per episode, batch 1);
- the vectorised env at N = 1, 16 and 64 (one batched forward per step);
- the raw batched forward (``DPBert(..., mode="path")``) over the same inputs with the same action
  sequences, as the reference the environment should come close to;
- the path-tree env (``dpbert_rl/LayerSkipTree-v0``, the same frozen game replayed from its cache):
  single, and vectorised at N = 1, 16, 64, 1024 and 4096. Its cache is built first (not timed) under
  ``--cache-dir``.

Actions are drawn once (execute with probability ``--p-execute``) and replayed identically in the
env and the reference. Writes ``benchmarks/results/env_throughput.json``.

    python benchmarks/env_throughput.py --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command  # noqa: E402
from _common import pinned_code_commit as commit  # noqa: E402  (the last commit that changed code)

from dpbert_rl.evaluation.latency import machine_info  # noqa: E402
from dpbert_rl.model import DPBert  # noqa: E402
from envs.layer_skip import BatchedLayerSkipEnv, LayerSkipEnv  # noqa: E402
from envs.layer_skip_tree import BatchedLayerSkipTreeEnv, LayerSkipTreeEnv  # noqa: E402

TREE_SIZES = (1, 16, 64, 1024, 4096)


def run_vec(env: BatchedLayerSkipEnv, episodes: int, rng: np.random.Generator, p: float):
    """Steps/s of the vector env; returns (steps_per_s, [(indices, actions (N, L))])."""
    L, n = env.num_layers, env.num_envs
    plan = [(rng.random((L, n)) < p).astype(np.int64) for _ in range(episodes + 1)]
    env.reset(seed=0)
    for a in plan[0]:  # warm-up episode
        env.step(a)
    used = []
    t = time.perf_counter()
    for e in range(1, episodes + 1):
        for a in plan[e]:
            _, _, term, _, info = env.step(a)
        used.append((info["final_info"]["index"].copy(), plan[e].T.copy()))
    return episodes * L * n / (time.perf_counter() - t), used


@torch.inference_mode()
def run_raw(model: DPBert, dataset, collate, used) -> float:
    """Steps/s of the model alone on the same inputs and actions (collation included)."""
    L = model.num_layers
    idx, acts = used[0]
    b = collate([dataset[int(k)] for k in idx])
    model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), mode="path", actions=torch.from_numpy(acts))
    t = time.perf_counter()
    for idx, acts in used:
        b = collate([dataset[int(k)] for k in idx])
        model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), mode="path",
              actions=torch.from_numpy(acts))
    return len(used) * L * len(used[0][0]) / (time.perf_counter() - t)


def run_single(env: LayerSkipEnv, episodes: int, rng: np.random.Generator, p: float) -> float:
    L = env.num_layers
    env.reset(seed=0)
    t = time.perf_counter()
    for _ in range(episodes):
        env.reset()
        for a in (rng.random(L) < p).astype(np.int64):
            env.step(int(a))
    return episodes * L / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    ap.add_argument("--model", default="minilm", help="backbone name/dir or a dpbert_rl checkpoint")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--p-execute", type=float, default=0.7, help="probability that an action is 'execute'")
    ap.add_argument("--single-episodes", type=int, default=300)
    ap.add_argument("--vec-steps", type=int, default=3000, help="about this many env steps per vector measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="median over this many measurements")
    ap.add_argument("--tree-single-episodes", type=int, default=20_000, help="episodes of the single tree env")
    ap.add_argument("--tree-vec-steps", type=int, default=2_000_000,
                    help="about this many env steps per vectorised tree measurement")
    ap.add_argument("--cache-dir", default="runs/pathtree", help="where the tree env's cache is built and kept")
    ap.add_argument("--output", default=str(RESULTS / "env_throughput.json"))
    args = ap.parse_args()
    commit()  # pin the commit this run starts from
    torch.set_num_threads(args.threads)

    model = DPBert.load(args.model) if Path(args.model, "dpbert.json").is_file() else \
        DPBert.from_backbone(args.model, num_labels=2)
    common = dict(task=args.task, data_dir=args.data_dir, split="dev", model=model)
    single = LayerSkipEnv(**common)
    L = single.num_layers
    results, raw, ratio = {}, [], []
    rng = np.random.default_rng(0)
    singles = [run_single(single, args.single_episodes, rng, args.p_execute) for _ in range(args.repeats)]
    for n in (1, 16, 64):
        env = BatchedLayerSkipEnv(num_envs=n, **common)
        episodes = max(2, args.vec_steps // (n * L))
        runs = []
        for _ in range(args.repeats):
            sps, used = run_vec(env, episodes, rng, args.p_execute)
            runs.append(sps)
            if n == 64:  # the reference, measured right after, on the same inputs and actions
                raw.append(run_raw(model, env.core.data, env.core.collate, used))
                ratio.append(sps / raw[-1])
        results[str(n)] = float(np.median(runs))
        print(f"vec N={n}: {results[str(n)]:.0f} steps/s")

    # the path-tree env: the same game from the cache (built here once, outside the timing)
    tree_common = dict(common, cache_dir=args.cache_dir)
    tree_single = LayerSkipTreeEnv(**tree_common)
    tree_singles = [run_single(tree_single, args.tree_single_episodes, rng, args.p_execute)
                    for _ in range(args.repeats)]
    print(f"tree single: {np.median(tree_singles):.0f} steps/s")
    tree = {}
    for n in TREE_SIZES:
        env = BatchedLayerSkipTreeEnv(num_envs=n, **tree_common)
        episodes = max(2, args.tree_vec_steps // (n * L))
        tree[str(n)] = float(np.median([run_vec(env, episodes, rng, args.p_execute)[0] for _ in range(args.repeats)]))
        print(f"tree vec N={n}: {tree[str(n)]:.0f} steps/s")
    out = {
        "steps_per_s_single": float(np.median(singles)),
        "steps_per_s_vec": results,
        "steps_per_s_raw_64": float(np.median(raw)),
        "vec64_over_raw": float(np.median(ratio)),
        "vec64_over_single": results["64"] / float(np.median(singles)),
        "tree_steps_per_s_single": float(np.median(tree_singles)),
        "tree_steps_per_s_vec": tree,
        "tree_over_live_single": float(np.median(tree_singles)) / float(np.median(singles)),
        "tree_vec_best_over_live_vec64": max(tree.values()) / results["64"],
        "task": args.task, "split": "dev", "model": args.model, "num_layers": L, "p_execute": args.p_execute,
        "repeats": args.repeats, "commit": commit(), "command": command(), "machine": machine_info(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
