"""``dpbert-rl agents``: train one agent, or train and compare several on one backbone checkpoint."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from dpbert_rl.checks import arg_type

    count, weight = arg_type(int, 1), arg_type(float, 0.0)  # step and sample counts >= 1; lambda, c >= 0
    parser = argparse.ArgumentParser(prog="dpbert-rl agents",
                                     description="Policy-learning agents in the layer-skipping environment.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("train", "train one agent, evaluate it on dev, save it"),
                       ("compare", "train and evaluate several agents on the same backbone; table + plot")):
        p = sub.add_parser(name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == "train":
            p.add_argument("--agent", default="ppo", help="registry name (reinforce, ppo, a2c, dqn, recurrent-ppo, "
                                                          "always, random, first-k, every-other) or module:Class")
        else:
            p.add_argument("--agents", default="reinforce,ppo,a2c,random", help="comma-separated agent names")
        p.add_argument("--model", required=True, help="a dpbert_rl checkpoint (e.g. runs/x/stage1_finetune/model)")
        p.add_argument("--task", help="GLUE task (default: the checkpoint's)")
        p.add_argument("--data-dir", help="local GLUE directory (default: $GLUE_DIR, else the hub)")
        p.add_argument("--backbone-mode", default="frozen", choices=("frozen", "joint"))
        p.add_argument("--env", default="live", choices=("live", "tree"),
                       help="live: the model runs every step (dpbert_rl/LayerSkip-v0); tree: the frozen game replayed "
                            "from the path-tree cache (dpbert_rl/LayerSkipTree-v0, frozen backbone only)")
        p.add_argument("--features", default="auto", help="what the agents observe: auto (the checkpoint's), cls, "
                                                           "mean or cls+mean")
        p.add_argument("--reward", default="loss", choices=("loss", "correct"), help="the reward's outcome term")
        p.add_argument("--cache-dir", default="runs/pathtree", help="where --env tree keeps its path-tree caches")
        p.add_argument("--total-steps", type=count, default=20_000, help="environment steps per agent")
        p.add_argument("--num-envs", type=count, default=32, help="inputs per batched step")
        p.add_argument("--max-train-samples", type=count, help="cap on the training split")
        p.add_argument("--max-eval-samples", type=count, help="first N dev examples")
        p.add_argument("--lam", type=weight, default=5.0, help="lambda of the reward (eq. 9), >= 0")
        p.add_argument("--cost", type=weight, default=1.0, help="c of the reward (eq. 9), >= 0")
        p.add_argument("--target-rate", type=arg_type(float, 0.0, 1.0),
                       help="target fraction of layers skipped, r (held as --rate-control says)")
        p.add_argument("--rate-control", default="dual", choices=("dual", "penalty", "none"),
                       help="with --target-rate: dual (every agent: the env's layer price follows dual ascent on "
                            "the skip rate of the training episodes, starting at --cost), penalty (beta (S - r)^2 "
                            "of eq. 11, beta 200: REINFORCE on each batch's skip probability, every other agent in "
                            "the env's reward at each episode's end) or none")
        p.add_argument("--dual-lr", type=arg_type(float, 0.0), default=0.002,
                       help="dual step size per batch of finished episodes (--rate-control dual)")
        p.add_argument("--rate-probe", type=arg_type(int, 0), default=64,
                       help="--rate-control dual holds the rate of the agent's greedy actions, the ones it is scored "
                            "on: every --probe-every updates they are run on this many training inputs and the gap "
                            "to the training episodes' sampled rate is added to it; 0 holds the sampled rate")
        p.add_argument("--probe-every", type=count, default=50, help="dual updates between two greedy probes")
        p.add_argument("--agent-kwargs", type=_json_object, default={},
                       help='JSON: keyword arguments per agent name, e.g. \'{"ppo": {"batch_size": 256}, '
                            '"reinforce": {"baseline": "loo", "samples": 4}}\' (SB3 agents: the algorithm\'s '
                            'constructor; reinforce: ReinforceConfig fields)')
        p.add_argument("--latency-samples", type=count, default=200, help="dev inputs timed at batch 1")
        p.add_argument("--seed", type=arg_type(int, 0), default=0)
        p.add_argument("--output-dir", default="runs/agents", help="one TensorBoard run per agent, results, plot")
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of objects, {{agent: {{keyword: value}}}}; got {text!r}")
    return value


def check_agent_kwargs(names: list, agent_kwargs: dict) -> None:
    """Refuse ``--agent-kwargs`` for agents this run does not train, and keywords an agent does not take
    (one error naming the agent, the keywords and those it accepts), before anything is trained."""
    from .base import resolve

    extra = [k for k in agent_kwargs if k not in names]
    if extra:
        raise ValueError(f"--agent-kwargs: {extra} {'is' if len(extra) == 1 else 'are'} not trained in this run "
                         f"(agents: {', '.join(names)}); its keys must name agents of --agent/--agents")
    for name in names:
        given = agent_kwargs.get(name) or {}
        accepted = resolve(name).keywords()
        if accepted is None or not given:
            continue
        accepted = accepted - {"num_layers"}  # the environment's
        bad = sorted(set(given) - accepted)
        if bad:
            raise ValueError(f"--agent-kwargs: agent {name!r} does not take {', '.join(map(repr, bad))}; it "
                             f"accepts {', '.join(sorted(accepted))}")


def run_agent(name: str, args, progress=None) -> dict:
    """Train one agent in a fresh environment on a fresh copy of the checkpoint, then evaluate it."""
    return evaluate_trained(train_agent(name, args, progress), args)


def train_agent(name: str, args, progress=None) -> dict:
    """Train one agent in a fresh environment on a fresh copy of the checkpoint; returns ``agent``,
    ``env``, ``model`` (after training: in joint mode its backbone has moved), ``task``, ``name``,
    ``train_seconds`` and the rate ``control`` (or None)."""
    from dpbert_rl.data import get_task
    from dpbert_rl.model import DPBert
    from envs.layer_skip import BatchedLayerSkipEnv

    from .base import resolve
    from .reinforce import ReinforceAgent, ReinforceConfig

    agent_kwargs = getattr(args, "agent_kwargs", None) or {}
    check_agent_kwargs([name], {k: v for k, v in agent_kwargs.items() if k == name})
    klass = resolve(name)
    rate_control = getattr(args, "rate_control", "penalty" if args.target_rate is not None else "none")
    penalty = rate_control == "penalty" and args.target_rate is not None
    # --rate-control penalty: REINFORCE adds eq. (11) on each batch's skip probability to its loss; every other
    # agent gets it from the env, -beta (S - r)^2 at each episode's end (S: that episode's skipped fraction)
    env_penalty = penalty and not issubclass(klass, ReinforceAgent)
    model = DPBert.load(args.model)
    if not (args.task or model.task_info.task):
        raise ValueError(f"{args.model} does not name its task; pass --task")
    task = get_task(args.task or model.task_info.task)
    env_kwargs = dict(num_envs=args.num_envs, task=task.name, data_dir=args.data_dir, split="fit", model=model,
                      c=args.cost, lambda_=args.lam, max_samples=args.max_train_samples,
                      backbone_mode=args.backbone_mode, features=args.features, reward=args.reward,
                      **({"target_rate": args.target_rate, "rate_coef": ReinforceConfig.beta} if env_penalty else {}))
    if args.env == "tree":
        if args.backbone_mode != "frozen":
            raise ValueError("--env tree replays a frozen backbone; --backbone-mode joint needs --env live")
        from envs.layer_skip_tree import BatchedLayerSkipTreeEnv

        # the checkpoint's directory, not the loaded model: its caches are keyed by the files, so the caches
        # another run built for this checkpoint (e.g. the pipeline's exact stage) are found and reused
        env = BatchedLayerSkipTreeEnv(**{**env_kwargs, "model": args.model}, cache_dir=args.cache_dir)
    else:
        env = BatchedLayerSkipEnv(**env_kwargs)
    accepted = klass.keywords()
    kwargs = dict(agent_kwargs.get(name, {}))
    if accepted is None or "seed" in accepted:
        kwargs.setdefault("seed", args.seed)
    if "num_layers" in inspect.signature(klass.__init__).parameters:  # the references' paths, SB3's layer count
        kwargs["num_layers"] = env.num_layers
    if penalty and not env_penalty:
        kwargs["target_rate"] = args.target_rate
    agent = klass(**kwargs)
    out = Path(args.output_dir)
    control = None
    if rate_control == "dual" and args.target_rate is not None and args.total_steps > 0:
        from .rate import DualRateControl, greedy_execute_rate

        greedy = None
        if getattr(args, "rate_probe", 0):  # the first N inputs of the training split, one batch
            from dpbert_rl.data import collator, load_split, tokenize

            rows = tokenize(load_split(task, "fit", args.data_dir, args.rate_probe), model.tokenizer,
                            model.task_info.max_seq_length)
            probe = collator(model.tokenizer)([rows[i] for i in range(len(rows))])
            probe = {k: v for k, v in probe.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            greedy = lambda: greedy_execute_rate(agent, model, probe, env.observer)  # noqa: E731
        control = progress = DualRateControl(env, args.target_rate, getattr(args, "dual_lr", 0.002), progress,
                                             greedy_rate=greedy, probe_every=getattr(args, "probe_every", 50))
    t = time.time()
    agent.learn(env, args.total_steps, callback=progress, log_dir=str(out / "tb" / name))
    train_seconds = time.time() - t
    agent.save(out / "agents" / name)
    return {"agent": agent, "env": env, "model": model, "task": task, "name": name, "train_seconds": train_seconds,
            "control": control, "rate_control": rate_control}


def log_evaluation(log_dir: Path, steps: int, res: dict, control=None) -> None:
    """The dev score next to the training curves in TensorBoard, and the rate control's price history."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        writer.add_scalar("eval/dev_score", res["score"], steps)
        writer.add_scalar("eval/layers_executed", res["layers_executed_mean"], steps)
        for step, price, execute in (control.history if control else [])[::10]:
            writer.add_scalar("charts/layer_price", price, step)
            writer.add_scalar("charts/held_execute_rate", execute, step)
        for step, greedy, sampled in (control.probes if control else []):
            writer.add_scalar("charts/greedy_execute_rate", greedy, step)
            writer.add_scalar("charts/sampled_execute_rate", sampled, step)


def evaluate_trained(trained: dict, args) -> dict:
    """Dev score, layers, measured speed-up and random skipping at the same rate, of a :func:`train_agent`."""
    from dpbert_rl.data import collator, load_split, tokenize

    from .evaluate import evaluate_agent, score_agent
    from .references import RandomSkip

    agent, env, model, task, name = (trained[k] for k in ("agent", "env", "model", "task", "name"))
    control, rate_control, train_seconds = trained["control"], trained["rate_control"], trained["train_seconds"]
    out = Path(args.output_dir)
    collate = collator(model.tokenizer)
    dev = tokenize(load_split(task, "dev", args.data_dir, args.max_eval_samples), model.tokenizer,
                   model.task_info.max_seq_length)
    if args.latency_samples:
        res = evaluate_agent(agent, model, task, dev, collate, latency_samples=args.latency_samples,
                             observer=env.observer)
    else:  # not timed here (e.g. the CPU is busy): the speed-up is left for a later measurement
        from dpbert_rl.evaluation.evaluate import speedup_ideal_fields

        res = score_agent(agent, model, task, dev, collate, observer=env.observer)
        res.update({"speedup_measured": None, **speedup_ideal_fields(res["layers_executed_mean"], model.num_layers)})
    log_evaluation(out / "tb" / name, args.total_steps, res, control)
    # the floor at the same budget: random skipping at this agent's skip rate, on the same backbone
    reference = RandomSkip(rate=res["skip_rate"], num_layers=model.num_layers, seed=args.seed)
    random_score = score_agent(reference, model, task, dev, collate, observer=env.observer)["score"]
    return {"task": task.name, "agent": name, "backbone_mode": args.backbone_mode, "env": args.env,
            "features": env.observer.features, "reward": args.reward, "dev_score": res["score"],
            "layers_executed_mean": res["layers_executed_mean"], "skip_rate": res["skip_rate"],
            "layer_frequency": res["layer_frequency"], "speedup_measured": res["speedup_measured"],
            "speedup_ideal": res["speedup_ideal"], "random_same_rate_score": random_score,
            **({"speedup_ideal_note": res["speedup_ideal_note"]} if "speedup_ideal_note" in res else {}),
            "env_steps": args.total_steps, "train_seconds": train_seconds, "rate_control": rate_control,
            **({"target_rate": args.target_rate} if rate_control != "none" and args.target_rate is not None else {}),
            **({"rate_coef": env.core.rate_coef} if env.core.rate_coef else {}),
            "layer_price": env.layer_price, "lam": args.lam,
            **({"rate_probe": args.rate_probe} if control is not None and getattr(args, "rate_probe", 0) else {}),
            "model": args.model}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dpbert-rl agents: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from tqdm.auto import tqdm

    names = [args.agent] if args.command == "train" else [a.strip() for a in args.agents.split(",") if a.strip()]
    if not names:
        raise ValueError(f"--agents: no agent named in {args.agents!r}; expected comma-separated agent names, "
                         "e.g. reinforce,ppo,random")
    check_agent_kwargs(names, args.agent_kwargs)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=args.total_steps * len(names), desc="agents", unit="step")
    try:  # closed before an error is printed, so that the error is the last line
        for name in names:
            bar.set_postfix_str(name)
            done = {"n": 0}

            def progress(scalars, done=done):
                bar.update(scalars["steps"] - done["n"])
                done["n"] = scalars["steps"]

            rows.append(run_agent(name, args, progress))
            bar.update(max(0, args.total_steps - done["n"]))
    finally:
        bar.close()
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(format_table(rows))
    if len(rows) > 1:
        plot(rows, out / "score_vs_layers.png")
        print(f"plot written to {out / 'score_vs_layers.png'}")
    return 0


def format_table(rows: list) -> str:
    head = f"{'agent':<14}{'mode':<8}{'dev':>8}{'random@rate':>13}{'layers':>8}{'speed-up':>10}"
    lines = [head] + [f"{r['agent']:<14}{r['backbone_mode']:<8}{r['dev_score']:>8.2f}"
                      f"{r.get('random_same_rate_score', float('nan')):>13.2f}{r['layers_executed_mean']:>8.2f}"
                      f"{r['speedup_measured']:>9.2f}x" for r in rows]
    return "\n".join(lines)


def plot(rows: list, path: Path, curves: Optional[dict] = None) -> None:
    """Dev score against layers executed, one panel per task; ``curves[task][name]`` holds reference
    curves as ``[(layers, score), ...]`` (e.g. first-k and random skipping)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, pts in ((curves or {}).get(task) or {}).items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", label=f"{name} (reference)")
        for r in [r for r in rows if r["task"] == task]:
            ax.scatter(r["layers_executed_mean"], r["dev_score"], marker="o" if r["backbone_mode"] == "frozen" else "^",
                       label=f"{r['agent']} ({r['backbone_mode']})")
        ax.set_title(task)
        ax.set_xlabel("layers executed (mean)")
        ax.set_ylabel("dev score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
