"""Benchmark: RL agents that choose the layers, on the path-tree env (frozen) and the live env (joint).

For each task it takes the pipeline benchmark's run (``benchmarks/pipeline.py``): the stage-2 checkpoint
(the fine-tuned stage-1 backbone and head, with planner-feature statistics of training inputs) and the
path-tree caches that the pipeline's exact stage 3 built for it. Then, for every agent:

- **frozen**, on ``dpbert_rl/LayerSkipTree-v0`` (the same game as the live env, replayed from the cache),
  ``--total-steps`` env steps (10^6 by default) under the bounded reward (``--reward correct``,
  ``--lam``) with the layer price set by dual ascent so that the agents skip ``--target-rate`` of the
  layers (:class:`agents.rate.DualRateControl`, starting at the exact stage's final price);
- **joint** (``--joint-tasks``, ``--joint-agents``), on the live env ``dpbert_rl/LayerSkip-v0``, which
  fine-tunes the backbone as the agent plays (``--joint-steps``);

then scores its greedy policy on dev with real skipping (score, layers, batch-1 speed-up, random skipping
at the same rate) and writes the diagnostics row of ``routing.json``: the margin over the fixed-path
frontier at the same mean layers (fixed paths chosen on the selection split, never dev; paired
bootstrap), distinct paths, hesitant gates and a linear probe. Writes ``agents.json``/``.md``/``.png``
(dev score against layers, with the frontier, first-k and random references), ``agents_curves.png``
(each agent's TensorBoard reward curve on the first task) and the ``routing.json``/``.md`` rows.
No hyperparameter is chosen on dev. The settings are ``AGENT_SETTINGS`` below, or (``--settings tuned``) the
change to them that ``--tune`` chose per task and agent on the selection split (``TUNING_GRID``; trials are
shorter than the final runs, ``--tune-steps``).

    python benchmarks/agents.py --data-dir ../shared/data/glue
    python benchmarks/agents.py --data-dir ../shared/data/glue --tasks mrpc --agents ppo --joint-tasks ""
    python benchmarks/agents.py --data-dir ../shared/data/glue --tune                 # choose on the selection split
    python benchmarks/agents.py --data-dir ../shared/data/glue --settings tuned --joint-tasks ""
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# this file is named like the `agents` package: import the package before the script's folder is on the path
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
from agents.cli import evaluate_trained, plot, train_agent  # noqa: E402

sys.path.insert(0, _HERE)
from _common import RESULTS, command, markdown_table  # noqa: E402
from _common import pinned_code_commit as commit  # noqa: E402  (the last commit that changed code)
from routing import backbone_name, merge_rows  # noqa: E402
from routing import write_markdown as write_routing  # noqa: E402

from agents.evaluate import tree_run  # noqa: E402
from dpbert_rl.data import collator, get_task, load_split, tokenize  # noqa: E402
from dpbert_rl.evaluation.diagnostics import fixed_frontier, random_skip_score, routing_report, task_score, tree_probe  # noqa: E402
from dpbert_rl.pathtree.oracle import first_k_path  # noqa: E402
from dpbert_rl.evaluation.latency import machine_info  # noqa: E402
from dpbert_rl.model import DPBert  # noqa: E402
from dpbert_rl.pathtree import tree_cache  # noqa: E402
from dpbert_rl.training import exact_stage_backbone  # noqa: E402
from envs.layer_skip_tree import BatchedLayerSkipTreeEnv  # noqa: E402

# One setting per algorithm for every task, fixed before any run (not tuned on dev). gamma = 1: an episode
# is 6 decisions and the return is undiscounted, as in DPBERT's reward-to-go.
AGENT_SETTINGS = {
    "reinforce": {"lr": 1e-2, "baseline": "loo", "samples": 4, "normalise_advantages": True, "entropy_coef": 0.01},
    "ppo": {"n_steps": 64, "batch_size": 512, "n_epochs": 4, "learning_rate": 3e-4, "ent_coef": 0.01, "gamma": 1.0},
    "a2c": {"n_steps": 6, "learning_rate": 7e-4, "ent_coef": 0.01, "gamma": 1.0},
    "dqn": {"learning_starts": 20_000, "buffer_size": 200_000, "batch_size": 256, "train_freq": 4,
            "gradient_steps": 4, "learning_rate": 5e-4, "target_update_interval": 5_000,
            "exploration_fraction": 0.2, "exploration_final_eps": 0.02, "gamma": 1.0},
}


# ``--tune``: the settings tried per agent and task, each a change to AGENT_SETTINGS (``{}``: as fixed). Reward
# scale (the layer price is set by the dual, so the step of the dual is what scales it), entropy and
# learning rate are what matter; every choice is made on the selection split's tree, never on dev.
TUNING_GRID = {
    "reinforce": [{}, {"lr": 3e-3}, {"lr": 3e-2}, {"entropy_coef": 0.03}],
    "ppo": [{}, {"learning_rate": 1e-4}, {"learning_rate": 1e-3}, {"ent_coef": 0.03}],
    "a2c": [{}, {"learning_rate": 2e-4}, {"learning_rate": 2e-3}, {"ent_coef": 0.03}],
    "dqn": [{}, {"learning_rate": 2e-4}, {"dual_lr": 5e-4}, {"exploration_fraction": 0.4}],
}
SELECT_TOLERANCE = 0.05
"""A tuned setting must skip at least ``target_rate - SELECT_TOLERANCE`` of the layers on the selection split
(the planners' selection rule)."""


def choose_setting(trials: list, target_rate: float) -> int:
    """Index of the trial with the best selection score among those that skip at least
    ``target_rate - SELECT_TOLERANCE`` on the selection split; without any, the one that skips most."""
    ok = [i for i, t in enumerate(trials) if t["select_skip_rate"] >= target_rate - SELECT_TOLERANCE]
    if ok:
        return max(ok, key=lambda i: trials[i]["select_score"])
    return max(range(len(trials)), key=lambda i: trials[i]["select_skip_rate"])


def agent_settings(agent: str, change: dict, dual_lr: float) -> tuple:
    """``(agent kwargs, dual step)``: AGENT_SETTINGS with ``change`` applied (``dual_lr`` is the rate control's)."""
    change = dict(change)
    return {**AGENT_SETTINGS.get(agent, {}), **{k: v for k, v in change.items() if k != "dual_lr"}}, \
        change.get("dual_lr", dual_lr)


TUNED_UNDER = ("target_rate", "reward", "lam", "dual_lr", "num_envs", "pipeline_dir")
"""The arguments a tuning choice depends on: ``--settings tuned`` refuses choices made under others."""


def tuned_settings(results: Path, args=None, pairs=()) -> dict:
    """``{(task, agent): change}`` chosen by an earlier ``--tune`` (``agents_tuning.json``). With ``args``,
    every pair of ``pairs`` must have a choice made under the same :data:`TUNED_UNDER` arguments."""
    path = results / "agents_tuning.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    chosen = {(r["task"], r["agent"]): r for r in rows}
    for pair in pairs:
        if pair not in chosen:
            raise SystemExit(f"--settings tuned: {path} has no choice for {pair[0]}/{pair[1]}; run --tune "
                             f"--tasks {pair[0]} --agents {pair[1]} first")
        diff = {k: (chosen[pair].get("tuned_under", {}).get(k), getattr(args, k)) for k in TUNED_UNDER
                if chosen[pair].get("tuned_under", {}).get(k) != getattr(args, k)}
        if diff:
            raise SystemExit(f"--settings tuned: {pair[0]}/{pair[1]} was tuned under other arguments "
                             f"(tuned, now): {diff}; run --tune again")
    return {k: r["trials"][r["chosen"]]["change"] for k, r in chosen.items()}


def tune(args, results: Path) -> None:
    """For every task and agent, train each TUNING_GRID setting for ``--tune-steps`` on the tree env of the
    fit split, score its greedy policy on the selection split's tree, and choose (:func:`choose_setting`).
    Writes ``agents_tuning.json`` and ``.md``; dev is not read."""
    path = results / "agents_tuning.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    for task_name in [t for t in args.tasks.split(",") if t]:
        setup = task_setup(task_name, args)
        task = get_task(task_name)
        for agent in [a for a in args.agents.split(",") if a]:
            trials = []
            for i, change in enumerate(TUNING_GRID.get(agent, [{}])):
                kwargs, dual_lr = agent_settings(agent, change, args.dual_lr)
                ns = agent_namespace(task.name, agent, "frozen", setup, args, kwargs, dual_lr, args.tune_steps,
                                     f"{args.output_dir}/{task.name}-tune/{agent}-{i}")
                print(f"[tune] {task.name} {agent} {change or 'as fixed'}: {ns.total_steps} steps", flush=True)
                trained = train_agent(agent, ns)
                select = tree_run(trained["agent"], tree_env(setup, ns, "select"))
                acts = np.asarray(select["actions"])
                trials.append({"change": change, "select_score": task_score(task, select["predictions"],
                                                                            select["labels"]),
                               "select_layers": float(acts.sum(1).mean()), "select_skip_rate": 1.0 - float(acts.mean()),
                               "train_seconds": trained["train_seconds"]})
                print(f"[tune]   selection {trials[-1]['select_score']:.2f} at {trials[-1]['select_layers']:.2f} layers",
                      flush=True)
            row = {"task": task.name, "agent": agent, "trials": trials, "chosen": choose_setting(trials, args.target_rate),
                   "env_steps": args.tune_steps, "tuned_under": {k: getattr(args, k) for k in TUNED_UNDER},
                   "rule": f"best selection score with skip rate >= target_rate - {SELECT_TOLERANCE}",
                   "commit": commit(), "command": command()}
            rows = [r for r in rows if (r["task"], r["agent"]) != (task.name, agent)] + [row]
            path.write_text(json.dumps(rows, indent=2))
            write_tuning(rows, results / "agents_tuning.md")


def write_tuning(rows: list, path: Path) -> None:
    lines = ["# Agents tuned on the selection split (tree env; dev not read)", "",
             "Written by `benchmarks/agents.py --tune`; do not edit by hand. Chosen: the best selection score "
             f"among settings that skip at least target_rate - {SELECT_TOLERANCE}.", "",
             "| task | agent | change to AGENT_SETTINGS | selection score | layers | chosen |", "|---|---|---|---|---|---|"]
    for r in rows:
        for i, t in enumerate(r["trials"]):
            lines.append(f"| {r['task']} | {r['agent']} | {json.dumps(t['change']) if t['change'] else 'as fixed'} | "
                         f"{t['select_score']:.2f} | {t['select_layers']:.2f} | {'yes' if i == r['chosen'] else ''} |")
    lines += ["", *sorted({f"- `{r['command']}` at {r['commit'][:12]}, {r['env_steps']} env steps per trial (the final "
                           "runs are longer: agents.md)" for r in rows})]
    path.write_text("\n".join(lines) + "\n")


def task_setup(task_name: str, args) -> dict:
    """The pipeline run an agent starts from: the exact stage's frozen backbone (stage 2's, or the adapted one under
    ``--skip-aware adapt``: :func:`~dpbert_rl.training.exact_stage_backbone`), the exact stage's directory and
    config (features, caches), and the starting layer price (where the exact stage's dual ascent ended;
    an env's c must be >= 0 to start)."""
    run_dir = Path(args.pipeline_dir) / task_name
    exact_dir = run_dir / "stage3_exact"
    if not (exact_dir / "model" / "DONE").is_file():
        raise SystemExit(f"{exact_dir} is not finished: run benchmarks/pipeline.py --tasks {task_name} first")
    try:
        model_dir = exact_stage_backbone(run_dir)
    except (OSError, ValueError) as err:
        raise SystemExit(str(err)) from None
    exact_cfg = json.loads((exact_dir / "config.json").read_text())
    price0 = max(0.0, json.loads((exact_dir / "model" / "selection.json").read_text())["price"])
    return {"model_dir": model_dir, "exact_dir": exact_dir, "exact_cfg": exact_cfg, "price0": price0}


def agent_namespace(task: str, agent: str, mode: str, setup: dict, args, kwargs: dict, dual_lr: float,
                    total_steps: int, output_dir: str) -> SimpleNamespace:
    """The arguments :func:`agents.cli.train_agent` reads, for one agent on one task."""
    cfg = setup["exact_cfg"]
    return SimpleNamespace(
        model=str(setup["model_dir"]), task=task, data_dir=args.data_dir, backbone_mode=mode,
        env="tree" if mode == "frozen" else "live", features=cfg["planner_features"], reward=args.reward,
        cache_dir=str(setup["exact_dir"] / "pathtree"), total_steps=total_steps, num_envs=args.num_envs,
        max_train_samples=cfg["max_train_samples"], max_eval_samples=None, lam=args.lam, cost=setup["price0"],
        target_rate=args.target_rate, rate_control="dual", dual_lr=dual_lr, agent_kwargs={agent: kwargs},
        latency_samples=args.latency_samples, seed=args.seed, output_dir=output_dir,
        rate_probe=0)  # the recorded runs held the training episodes' sampled rate (the CLI now holds the greedy one)


def tree_env(setup: dict, ns, split: str) -> BatchedLayerSkipTreeEnv:
    """A one-env replay of ``split`` from the exact stage's caches (price 0: greedy paths only)."""
    return BatchedLayerSkipTreeEnv(num_envs=1, split=split, task=ns.task, data_dir=ns.data_dir, model=ns.model,
                                   cache_dir=ns.cache_dir, features=ns.features, reward=ns.reward, c=0.0,
                                   lambda_=ns.lam, progress=False)


def tree_row(trained: dict, ns, learner: dict, dev_run: dict, seed: int) -> dict:
    """A frozen agent's agents.json row from its greedy paths on the dev tree (the fields a live evaluation
    writes; the batch-1 speed-up comes from a live measurement, now or with --retime)."""
    from agents.cli import log_evaluation
    from dpbert_rl.evaluation.evaluate import speedup_ideal_fields

    task, acts = trained["task"], np.asarray(learner["actions"])
    L = acts.shape[1]
    res = {"score": task_score(task, learner["predictions"], learner["labels"]),
           "layers_executed_mean": float(acts.sum(1).mean())}
    log_evaluation(Path(ns.output_dir) / "tb" / trained["name"], ns.total_steps, res, trained["control"])
    rate = 1.0 - float(acts.mean())
    env = trained["env"]
    return {"task": task.name, "agent": trained["name"], "backbone_mode": "frozen", "env": "tree",
            "features": env.observer.features, "reward": ns.reward, "dev_score": res["score"],
            "layers_executed_mean": res["layers_executed_mean"], "skip_rate": rate,
            "layer_frequency": acts.mean(0).tolist(), "speedup_measured": None,
            **speedup_ideal_fields(res["layers_executed_mean"], L),
            "random_same_rate_score": random_skip_score(task, dev_run, rate, seed), "random_draws": 20,
            "env_steps": ns.total_steps, "train_seconds": trained["train_seconds"],
            "rate_control": trained["rate_control"], "layer_price": env.layer_price, "lam": ns.lam,
            "model": ns.model}


def references(task, dev_run: dict, hull: list, seed: int) -> dict:
    """Dev score against mean layers of the fixed-path frontier (paths chosen on the selection split),
    first-k, and random skipping (20 draws per rate), all read from the dev path tree."""
    preds, labels = dev_run["predictions"], dev_run["labels"]
    L = dev_run["paths"].shape[1]
    first_k = [(k, task_score(task, preds[:, first_k_path(k, L)], labels)) for k in range(1, L + 1)]
    rand = [(L * (1 - r), random_skip_score(task, dev_run, r, seed)) for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    frontier = [(int(k), task_score(task, preds[:, int(p)], labels)) for k, p, _ in hull]
    return {"fixed frontier (paths chosen on selection)": frontier, "first-k": first_k, "random": rand}


def plot_curves(tb_root: Path, agents: list, path: Path, title: str) -> None:
    """Each agent's training curves from its TensorBoard run: episodic return and layers executed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in agents:
        scalars: dict = {}
        for events in sorted((tb_root / name).rglob("events.out.tfevents*")) + \
                sorted(tb_root.glob(f"{name}_*/events.out.tfevents*")):  # SB3 names its run <name>_1
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
            for tag in ("charts/episodic_return", "charts/layers_executed"):
                if tag in acc.Tags()["scalars"]:
                    scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for ax, tag in zip(axes, ("charts/episodic_return", "charts/layers_executed")):
            pts = sorted(scalars.get(tag, []))
            if not pts:
                continue
            x, y = np.array(pts).T
            k = max(1, len(y) // 200)  # a running mean over ~0.5% of the run
            y = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(x[len(x) - len(y):], y, label=name)
    for ax, label in zip(axes, ("episodic return (price moves with the dual)", "layers executed (sampled)")):
        ax.set_xlabel("env steps")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="rte,mrpc,stsb,sst2", help="tasks for the frozen (tree) runs")
    ap.add_argument("--agents", default="reinforce,ppo,a2c,dqn")
    ap.add_argument("--joint-tasks", default="rte,sst2", help="tasks for the joint (live) runs; '' for none")
    ap.add_argument("--joint-agents", default="reinforce,ppo")
    ap.add_argument("--pipeline-dir", default="runs/bench-pipeline-v3", help="where benchmarks/pipeline.py trained")
    ap.add_argument("--total-steps", type=int, default=1_000_000, help="env steps per agent on the tree env")
    ap.add_argument("--joint-steps", type=int, default=20_000, help="env steps per agent on the live env (joint)")
    ap.add_argument("--num-envs", type=int, default=64)
    ap.add_argument("--reward", default="correct", choices=("correct", "loss"))
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--target-rate", type=float, default=0.35, help="as the pipeline's planners")
    ap.add_argument("--dual-lr", type=float, default=0.002, help="dual step per batch of finished episodes")
    ap.add_argument("--latency-samples", type=int, default=200,
                    help="dev inputs timed at batch 1; 0: no timing now (run --retime later on an idle CPU)")
    ap.add_argument("--tune", action="store_true",
                    help="only tune: train every TUNING_GRID setting per task and agent for --tune-steps on the tree "
                         "env, score it on the selection split, choose; writes agents_tuning.json/.md (dev not read)")
    ap.add_argument("--tune-steps", type=int, default=300_000, help="env steps per --tune trial")
    ap.add_argument("--settings", default="fixed", choices=("fixed", "tuned"),
                    help="fixed: AGENT_SETTINGS; tuned: the settings --tune chose (agents_tuning.json), per task and "
                         "agent (frozen rows; refused where none was chosen, or where it was chosen under other "
                         "--target-rate/--reward/--lam/--dual-lr/--num-envs/--pipeline-dir)")
    ap.add_argument("--retime", action="store_true",
                    help="only measure the batch-1 speed-up of the saved frozen agents whose rows have none "
                         "(loads each from --output-dir), and rewrite the results")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curves-task", default="mrpc", help="the task whose TensorBoard curves go to agents_curves.png")
    ap.add_argument("--curves-only", action="store_true",
                    help="only redraw agents_curves.png from the TensorBoard logs of --curves-task's frozen runs "
                         "under --output-dir (those of --settings), and stop")
    ap.add_argument("--output-dir", default="runs/bench-agents-v2")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where the results files go (a trial run: elsewhere)")
    args = ap.parse_args()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    commit()  # pin the commit this run starts from
    import torch

    torch.set_num_threads(args.threads)
    path = results / "agents.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    if args.retime and args.tune:
        ap.error("--retime and --tune are separate runs: pass one of them")
    if args.curves_only:
        draw_curves(args, results)
        return
    if args.retime:
        retime(rows, args, results)
        return
    if args.tune:
        tune(args, results)
        return
    rows = [r for r in rows if r.get("env") in ("tree", "live") and r.get("rate_control") == "dual"]  # this protocol
    curves = load_references(args)  # earlier invocations' tasks stay in the plot
    plan = [(t, "frozen", a) for t in args.tasks.split(",") if t for a in args.agents.split(",")] + \
           [(t, "joint", a) for t in args.joint_tasks.split(",") if t for a in args.joint_agents.split(",")]
    shared: dict = {}
    tuned = tuned_settings(results, args, [(t, a) for t, m, a in plan if m == "frozen"]) \
        if args.settings == "tuned" else {}
    for task_name, mode, agent in plan:
        setup = task_setup(task_name, args)
        model_dir, exact_dir, exact_cfg = setup["model_dir"], setup["exact_dir"], setup["exact_cfg"]
        task = get_task(task_name)
        if task_name not in shared:  # per task: the frozen model, the trees, the sets, the probe memo
            model = DPBert.load(model_dir).eval()
            seq, feats = exact_cfg["max_seq_length"], exact_cfg["planner_features"]
            trees = {s: tree_cache(str(model_dir), task.name, s, args.data_dir, None, seq, feats, exact_dir / "pathtree")
                     for s in ("select", "dev")}
            runs = {s: t.oracle_run() for s, t in trees.items()}
            sets = {s: tokenize(load_split(task, s, args.data_dir, n, shuffle_seed=0 if s == "fit" else None),
                                model.tokenizer, seq) for s, n in (("select", None), ("dev", None), ("fit", 2000))}
            # the probe of the frozen rows is read from the trees (the first 2,000 fit inputs); joint rows'
            # backbones moved, so theirs is computed live on `sets["fit"]` (2,000 seeded fit inputs)
            hull = fixed_frontier(task, runs["select"])
            fit_tree = tree_cache(str(model_dir), task.name, "fit", args.data_dir, exact_cfg["max_train_samples"], seq,
                                  feats, exact_dir / "pathtree")
            probe = {k: tree_probe(model, task, fit_tree, trees["dev"], k) for k in range(model.num_layers + 1)}
            shared[task_name] = dict(model=model, runs=runs, sets=sets, probe=probe, hull=hull, feats=feats, seq=seq)
            curves[task_name] = references(task, runs["dev"], hull, args.seed)
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "references.json").write_text(json.dumps(curves))
        sh = shared[task_name]
        is_tuned = mode == "frozen" and (task.name, agent) in tuned  # tuning runs on the tree env
        change = tuned[(task.name, agent)] if is_tuned else {}
        kwargs, dual_lr = agent_settings(agent, change, args.dual_lr)
        ns = agent_namespace(task.name, agent, mode, setup, args, kwargs, dual_lr,
                             args.total_steps if mode == "frozen" else args.joint_steps,
                             f"{args.output_dir}/{task.name}-{mode}" + ("-tuned" if is_tuned else ""))
        print(f"[agents] {task.name} {mode} {agent}: {ns.total_steps} steps", flush=True)
        trained = train_agent(agent, ns)
        collate = collator(trained["model"].tokenizer)
        if mode == "frozen":  # the greedy paths replayed from the trees: equal to driving the model (tested)
            learner = tree_run(trained["agent"], tree_env(setup, ns, "dev"))
            select = tree_run(trained["agent"], tree_env(setup, ns, "select"))
            row = tree_row(trained, ns, learner, sh["runs"]["dev"], args.seed)
            row["select_score"] = task_score(task, select["predictions"], select["labels"])
            if args.latency_samples:  # timed now, live (else: --retime, which also checks the live score)
                timed = evaluate_trained(trained, ns)
                row.update({k: timed[k] for k in ("speedup_measured", "latency_ms_full", "latency_ms_agent")
                            if k in timed})
            rep = routing_report(sh["model"], task, learner, sh["sets"]["select"], sh["sets"]["dev"],
                                 sh["sets"]["fit"], collate, n_boot=args.bootstrap, select_run=sh["runs"]["select"],
                                 dev_run=sh["runs"]["dev"], probe=sh["probe"])
        else:  # joint: the backbone moved, so its paths are enumerated live on the trained model
            row = evaluate_trained(trained, ns)  # live dev: score, layers, batch-1 speed-up, random at the rate
            from agents.evaluate import agent_forward
            from dpbert_rl.evaluation.evaluate import run_dataset

            m, ag, obs = trained["model"].eval(), trained["agent"], trained["env"].observer

            def forward(b, m=m, ag=ag, obs=obs):
                return agent_forward(m, ag, b["input_ids"], b["attention_mask"], b.get("token_type_ids"), obs,
                                     with_probs=True)

            learner = run_dataset(m, sh["sets"]["dev"], collate, 64, forward=forward)
            rep = routing_report(m, task, learner, sh["sets"]["select"], sh["sets"]["dev"], sh["sets"]["fit"],
                                 collate, n_boot=args.bootstrap)
        stamp = {"commit": commit(), "command": command(), "machine": machine_info()}
        row.update({"target_rate": args.target_rate, "dual_lr": dual_lr, "settings": kwargs,
                    "settings_source": "tuned" if is_tuned else "fixed",
                    "agent_dir": str(Path(ns.output_dir) / "agents" / agent),
                    "margin": rep["margin"], "margin_ci95": rep["margin_ci95"], **stamp})
        rows = [r for r in rows if (r["task"], r["agent"], r["backbone_mode"]) != (task.name, agent, mode)] + [row]
        path.write_text(json.dumps(rows, indent=2))
        routing = merge_rows(results / "routing.json", [{
            "backbone": backbone_name(model_dir), "task": task.name, "learner": agent, "backbone_mode": mode,
            "features": sh["feats"], **rep,
            "env": row["env"], "env_steps": ns.total_steps, "layer_price": row["layer_price"],
            "random_same_rate_score": row["random_same_rate_score"], "speedup_measured": row["speedup_measured"],
            "dev_examples": len(sh["sets"]["dev"]), "select_examples": len(sh["sets"]["select"]),
            "checkpoint": str(model_dir), **stamp}])
        write_routing(routing, results / "routing.md")
        print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "settings", "layer_frequency")}),
              flush=True)
        write_report(rows, curves, results)
    if args.curves_task in args.tasks.split(","):
        draw_curves(args, results)


def draw_curves(args, results: Path) -> None:
    """agents_curves.png from the TensorBoard logs of ``--curves-task``'s frozen runs of this ``--settings``."""
    t, tuned = args.curves_task, args.settings == "tuned"
    tb = Path(args.output_dir) / (f"{t}-frozen" + ("-tuned" if tuned else "")) / "tb"
    if not tb.is_dir():
        raise SystemExit(f"no TensorBoard logs at {tb}: run the frozen {t} agents (--settings {args.settings}) first")
    plot_curves(tb, args.agents.split(","), results / "agents_curves.png",
                f"{t}, frozen backbone, tree env, {'tuned' if tuned else 'fixed'} settings: training curves (TensorBoard)")


def retime(rows: list, args, results: Path) -> None:
    """Batch-1 speed-up of every saved frozen agent whose row has none, on an idle CPU, same protocol
    as a timed run (:func:`agents.evaluate.evaluate_agent`: interleaved, median of 3 passes)."""
    from agents.base import Agent
    from agents.evaluate import evaluate_agent

    for row in rows:
        if row.get("speedup_measured") is not None or row["backbone_mode"] != "frozen":
            continue
        task = get_task(row["task"])
        agent_dir = row.get("agent_dir") or Path(args.output_dir) / f"{task.name}-frozen" / "agents" / row["agent"]
        try:  # first: a row's agent_dir is read from a results file, so what it points at is checked before use
            agent = Agent.load(agent_dir)
        except (ValueError, FileNotFoundError) as err:
            print(f"agents.py: error: {task.name}/{row['agent']}: the agent at {agent_dir} (agent_dir of its row "
                  f"in {results / 'agents.json'}) is refused: {' '.join(str(err).split())}", file=sys.stderr)
            raise SystemExit(2) from None
        model = DPBert.load(row["model"]).eval()  # frozen: the checkpoint is the model the agent drove
        dev = tokenize(load_split(task, "dev", args.data_dir), model.tokenizer, model.task_info.max_seq_length)
        res = evaluate_agent(agent, model, task, dev, collator(model.tokenizer), latency_samples=args.latency_samples)
        if abs(res["score"] - row["dev_score"]) > 1e-4:  # the trees hold float32 predictions (STS-B: ~1e-6 apart)
            raise SystemExit(f"{task.name}/{row['agent']}: the reloaded agent scores {res['score']}, its row "
                             f"{row['dev_score']}: not the same agent")
        row.update(speedup_measured=res["speedup_measured"], latency_ms_full=res["latency_ms_full"],
                   latency_ms_agent=res["latency_ms_agent"], timed={**machine_info(), "command": command()})
        print(f"[retime] {task.name} {row['agent']}: {res['speedup_measured']:.2f}x", flush=True)
        (results / "agents.json").write_text(json.dumps(rows, indent=2))
    measured = {(r["task"], r["agent"], r["backbone_mode"]): r["speedup_measured"] for r in rows}
    routing = json.loads((results / "routing.json").read_text())
    for r in routing:  # the routing rows carry the same figure
        key = (r["task"], r["learner"], r["backbone_mode"])
        if key in measured and r.get("env") in ("tree", "live"):
            r["speedup_measured"] = measured[key]
    (results / "routing.json").write_text(json.dumps(routing, indent=2))
    write_routing(routing, results / "routing.md")
    write_report(rows, load_references(args), results)


def load_references(args) -> dict:
    path = Path(args.output_dir) / "references.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(rows: list, curves: dict, results: Path) -> None:
    cols = [("task", "task", ""), ("agent", "agent", ""), ("backbone", "backbone_mode", ""), ("env", "env", ""),
            ("dev score", "dev_score", ".2f"), ("random, same rate", "random_same_rate_score", ".2f"),
            ("margin vs fixed", "margin", "+.2f"), ("layers", "layers_executed_mean", ".2f"),
            ("speed-up", "speedup_measured", ".2f"), ("env steps", "env_steps", ""), ("train s", "train_seconds", ".0f"),
            ("settings", "settings_source", ""), ("commit", "commit", "")]
    (results / "agents.md").write_text(
        "# Agents on fine-tuned MiniLM-L6 (dev sets)\n\nWritten by `benchmarks/agents.py`; do not edit by hand. "
        "Frozen rows trained on the path-tree env, joint rows on the live env; the margin is over the fixed-path "
        "frontier at the same mean layers (`routing.json` has its interval).\n\n" + markdown_table(rows, cols) + "\n\n"
        + "\n".join(sorted({f"- `{r['command']}`" for r in rows})) + "\n")
    plot(rows, results / "agents.png", curves)


if __name__ == "__main__":
    main()
