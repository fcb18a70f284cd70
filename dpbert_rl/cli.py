"""The ``dpbert-rl`` command. Subcommands map one-to-one to the library's functions:

    finetune | init-planners | rl | sampled | soft | layerdrop | adapt
                                           one training stage         (train.train_stage)
    pipeline                               stages 1-3, then evaluate  (train.run_pipeline)
    evaluate                               score, layers, speed-up    (latency.evaluate_checkpoint)
    calibrate                              threshold for a skip rate  (train.calibrate_checkpoint)
    predict                                one input: label and path  (model.DPBert)
    exact                                  planners by the exact expected reward over the
                                           path tree of a frozen backbone (pathtree.train_exact)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from .checks import arg_type

THRESHOLD = arg_type(float, 0.0, 1.0)  # eq. (5)'s threshold: NaN or 2 would silently skip every layer
EPILOG = """examples (offline, with the packaged MiniLM and a local GLUE directory):
  dpbert-rl pipeline --task rte --data-dir ../shared/data/glue --output-dir runs/rte
  dpbert-rl evaluate runs/rte/stage3_exact/model --data-dir ../shared/data/glue
  dpbert-rl predict runs/rte/stage3_exact/model "A man is playing." "Someone plays."
  tensorboard --logdir runs/rte

more commands: dpbert-rl agents {train,compare} --help   (policy-learning agents in the environment)
"""


def _field_help(cls) -> dict:
    """Attribute docstrings of a dataclass (the string literal after each field)."""
    import inspect

    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                helps[node.target.id] = " ".join(str(nxt.value.value).split())
    return helps


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """One ``--flag`` per dataclass field, with its type, default and docstring as help.

    The default is shown once, as ``%(default)s``: ``ArgumentDefaultsHelpFormatter`` and (on Python
    < 3.13) ``BooleanOptionalAction`` add it themselves unless the help already holds it."""
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        args = typing.get_args(tp)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), tp) if optional else tp
        default = f.default
        text = helps.get(f.name, "").replace("%", "%%")  # help strings are %-formatted by argparse
        if base is bool:
            action = parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                         help=text)
        elif base is tuple:  # a pair of numbers, e.g. --budget-range C_MIN C_MAX
            action = parser.add_argument(flag, dest=f.name, type=float, nargs=2, default=default,
                                         metavar=("LOW", "HIGH"), help=text)
        else:
            conv = base if base in (int, float, str) else str
            if optional:
                conv = _optional(conv)
            action = parser.add_argument(flag, dest=f.name, type=conv, default=default, metavar=f.name.upper(),
                                         help=text)
        if "%(default)" not in action.help:
            action.help += " (default: %(default)s)"


def _optional(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else conv(text)

    parse.__name__ = conv.__name__
    return parse


def _from_args(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def build_parser() -> argparse.ArgumentParser:
    from .training import PipelineConfig, TrainConfig

    parser = argparse.ArgumentParser(
        prog="dpbert-rl",
        description="DPBERT: learn, per input, which BERT layers to run (planners trained with RL).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stages = {
        "finetune": ("finetune", "stage 1: fine-tune backbone and head on the task (all layers)"),
        "init-planners": ("planner_init", "stage 2: train the planners with soft gates, backbone frozen"),
        "rl": ("rl", "stage 3: joint REINFORCE of backbone, head and planners (eq. 12)"),
        "sampled": ("sampled", "stage 3 that scales to 12 layers: REINFORCE of the planners on paths drawn from them "
                               "(--samples per input, leave-one-out baselines, the dual price), backbone frozen"),
        "soft": ("soft", "ablation DPBERT-soft: joint training with relaxed gates and the skip-rate penalty"),
        "layerdrop": ("layerdrop", "baseline LayerDrop: fine-tune with structured layer dropout (--layerdrop)"),
        "adapt": ("adapt", "skip-aware: fine-tune backbone and head on the paths a trained checkpoint's planners "
                           "draw (planners frozen); then re-fit the planners with `exact` on the new backbone"),
    }
    for name, (stage, text) in stages.items():
        p = sub.add_parser(name, help=text, description=text + ". Re-running the same command resumes.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--init", default=None, help="checkpoint to start from: the previous stage's model/ directory")
        add_dataclass_args(p, TrainConfig)
        p.set_defaults(stage=stage)
    p = sub.add_parser("pipeline", help="stages 1-3 and the evaluation, resumable",
                       description="Fine-tune, initialise the planners, train them on the exact expected reward "
                                   "over every path of the frozen backbone (--stage3 exact; 'auto', the default, up "
                                   "to 8 layers), on paths sampled from them (--stage3 sampled; 'auto' above 8 "
                                   "layers) or jointly with REINFORCE (--stage3 rl, the paper's), then evaluate (dev score, layers "
                                   "executed, batch-1 speed-up). Finished stages are reused and an interrupted "
                                   "stage resumes when the command is re-run.")
    add_dataclass_args(p, PipelineConfig, skip=("epochs",))

    p = sub.add_parser("calibrate", help="set a trained checkpoint's speed: a speed-up or budget on your own inputs",
                       description="Set the checkpoint's knob (the layer price of price-conditioned planners, else "
                                   "the threshold of eq. (5)) so that it runs the requested share of its layers on "
                                   "average on --inputs, which are read without labels: a file of your own (one "
                                   "input per line, a tab between the sentences of a pair) or a GLUE split. Its "
                                   "whole budget curve on those inputs is stored too, so pipeline(..., budget=B) and "
                                   "--budget elsewhere can pick any speed. --target-rate instead sets the threshold "
                                   "for a skip rate on the selection split (what the pipeline does after stage 3).")
    p.add_argument("checkpoint", help="a trained DPBERT model/ directory (changed in place)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--speedup", type=arg_type(float, 1.0), help="ideal speed-up L / mean layers, >= 1")
    goal.add_argument("--budget", type=BUDGET, help="fraction of the layers to run on average, in (0, 1]")
    goal.add_argument("--target-rate", type=float, help="fraction of layers to skip, in [0, 1], on the selection split")
    p.add_argument("--inputs", default="select", help="the inputs to calibrate on, read without labels: a file, or "
                                                      "a GLUE split (dev, select, ...)")
    p.add_argument("--max-samples", type=arg_type(int, 1), help="the first N inputs only")
    p.add_argument("--task", help="GLUE task (default: the checkpoint's)")
    p.add_argument("--data-dir", help="local GLUE directory (default: $GLUE_DIR, else the hub)")
    p.add_argument("--samples", type=arg_type(int, 1), default=1000, help="training inputs to calibrate on")

    p = sub.add_parser("evaluate", help="dev score, layers executed and measured speed-up of a checkpoint",
                       description="Scores a DPBERT checkpoint and its full backbone on the same inputs (with a "
                                   "paired-bootstrap 95% interval of their difference and of the score retained), "
                                   "counts the layers executed, and times both at batch size 1, interleaved in one "
                                   "run (median of --repeats passes), and batched.")
    p.add_argument("checkpoint", help="a trained DPBERT model/ directory")
    p.add_argument("--baseline-checkpoint", help="fine-tuned backbone for the reference score (default: this one, all layers)")
    p.add_argument("--task", help="GLUE task (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", help="local GLUE directory (default: $GLUE_DIR, else the hub)")
    p.add_argument("--split", default="dev", help="dev (or dev_mismatched for MNLI)")
    p.add_argument("--max-eval-samples", type=arg_type(int, 1), help="first N examples only")
    p.add_argument("--threshold", type=THRESHOLD, help="execute a layer when p >= threshold, in [0, 1] "
                                                       "(default: saved, 0.5)")
    _add_budget_args(p)
    p.add_argument("--repeats", type=arg_type(int, 1), default=3, help="latency passes; the median is reported")
    p.add_argument("--latency-samples", type=arg_type(int, 1), help="time only the first N examples")
    p.add_argument("--threads", type=arg_type(int, 1), help="torch threads during timing")
    p.add_argument("--output", help="write the JSON report here (default: <checkpoint>/eval_<split>.json)")

    from .training.exact import ExactConfig

    p = sub.add_parser("exact", help="train planners by the exact expected reward over all paths (frozen backbone)",
                       description="Train the planners of a fine-tuned checkpoint, backbone frozen, by gradient ascent "
                                   "on the exact expected reward: a sum over all 2^L paths read from the path-tree "
                                   "cache (built once per split, reused), so the gradient has no sampling variance. "
                                   "Planners are chosen on the selection split; dev is scored once. Writes "
                                   "<output-dir>/model, a normal DPBERT checkpoint.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a fine-tuned dpbert_rl model/ directory (e.g. a stage-1 result)")
    add_dataclass_args(p, ExactConfig)

    p = sub.add_parser("predict", help="classify one input and show which layers ran")
    p.add_argument("checkpoint", help="a trained DPBERT model/ directory")
    p.add_argument("text", help="the sentence (or the first of a pair)")
    p.add_argument("text_b", nargs="?", help="the second sentence of a pair")
    p.add_argument("--threshold", type=THRESHOLD, help="execute a layer when p >= threshold, in [0, 1]")
    _add_budget_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "inspect", help="what planners can see: per-layer spread of each feature choice and a probe of skip losses",
        description="Per layer and feature choice (cls, mean, cls+mean): the spread of the planner input across "
                    "inputs (sum of variances / |mean|^2; near 0 = the same input for every text, so only a fixed "
                    "path can be learned) and the held-out correlation of a ridge probe from it to the loss change "
                    "from skipping that layer. Reads the held-out selection split by default.")
    p.add_argument("checkpoint", help="any checkpoint: a dpbert_rl model/ directory, an HF directory, or 'minilm'")
    p.add_argument("--task", help="GLUE task (default: the checkpoint's)")
    p.add_argument("--data-dir", help="local GLUE directory (default: $GLUE_DIR, else the hub)")
    p.add_argument("--split", default="select", help="select (default), fit, train or dev")
    p.add_argument("--samples", type=int, default=256, help="inputs to measure on")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def _budget(text: str) -> float:
    from .model.budget import check_budget

    try:
        return check_budget(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


BUDGET = _budget


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=BUDGET, help="run this fraction of the layers on average, read off the budget "
                                                 "curve that `calibrate` measured on your inputs; 1 = every layer")
    g.add_argument("--speedup", type=arg_type(float, 1.0), help="run at this ideal speed-up (= --budget 1/S)")


def _requested_budget(args) -> Optional[float]:
    if getattr(args, "speedup", None) is not None:
        return 1.0 / args.speedup
    return getattr(args, "budget", None)


def plugin_commands() -> dict:
    """Subcommands that other packages register under the entry-point group ``dpbert_rl.commands``
    (``agents`` comes from this distribution's ``agents`` package); dpbert_rl itself imports none."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="dpbert_rl.commands")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    if argv and argv[0] in plugins:
        return int(plugins[argv[0]].load()(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .training import TrainingError

    try:
        return _dispatch(args)
    except (DataError, TrainingError, FileNotFoundError, ValueError) as err:
        print(f"dpbert-rl: error: {err}", file=sys.stderr)
        return 2


#: Subcommands that write a run directory (--output-dir), checked before anything is loaded or trained.
WRITING_COMMANDS = ("finetune", "init-planners", "rl", "sampled", "soft", "layerdrop", "adapt", "pipeline", "exact")


def _dispatch(args) -> int:
    from .checks import check_output_dir
    from .evaluation.latency import evaluate_checkpoint, format_report
    from .training import PipelineConfig, TrainConfig, run_pipeline, train_stage

    if args.command in WRITING_COMMANDS:
        check_output_dir(args.output_dir)
        if getattr(args, "cache_dir", None):
            check_output_dir(args.cache_dir, "cache_dir (--cache-dir)")
    if args.command in ("finetune", "init-planners", "rl", "sampled", "soft", "layerdrop", "adapt"):
        path = train_stage(args.stage, _from_args(TrainConfig, args), init=args.init)
        print(f"model written to {path}")
    elif args.command == "pipeline":
        report = run_pipeline(_from_args(PipelineConfig, args))
        print(format_report(report))
        print(f"report written to {Path(args.output_dir) / 'report.json'}")
    elif args.command == "calibrate":
        from .model import DPBert
        from .training import calibrate_checkpoint

        from .checks import check_task_compatible
        from .data import get_task

        model = DPBert.load(args.checkpoint, require_planners=True)
        info = model.task_info
        task = args.task or info.task
        if task is None:
            raise ValueError(f"{args.checkpoint} does not name its task; pass --task")
        check_task_compatible(model, get_task(task), args.checkpoint)
        if args.target_rate is None:
            from .training.calibrate import calibrate_budget

            r = calibrate_budget(args.checkpoint, args.inputs, _requested_budget(args) * model.num_layers, task,
                                 args.data_dir, args.max_samples)
            print(f"[calibration] {r['knob']} {r['value']:.4g}: {r['layers_executed_mean']:.3f} of {r['num_layers']} "
                  f"layers on {r['num_inputs']} inputs of {r['inputs']} (requested {r['requested_layers']:.3f}; "
                  f"ideal speed-up {r['speedup_ideal']:.3f}x); budget curve stored in {args.checkpoint}")
            return 0
        cfg = TrainConfig(task=task, data_dir=args.data_dir, target_rate=args.target_rate,
                          max_seq_length=info.max_seq_length)
        cfg.validate()
        calibrate_checkpoint(args.checkpoint, cfg, samples=args.samples)
    elif args.command == "evaluate":
        output = args.output or str(Path(args.checkpoint) / f"eval_{args.split}.json")
        report = evaluate_checkpoint(
            args.checkpoint, args.baseline_checkpoint, args.task, args.data_dir, args.split, args.max_eval_samples,
            threshold=args.threshold, repeats=args.repeats, latency_samples=args.latency_samples,
            threads=args.threads, output=output, budget=_requested_budget(args),
        )
        print(format_report(report))
        print(f"report written to {output}")
    elif args.command == "exact":
        from .training.exact import ExactConfig, train_exact

        path = train_exact(args.checkpoint, _from_args(ExactConfig, args))
        print(f"model written to {path}")
    elif args.command == "predict":
        print(_predict(args))
    elif args.command == "inspect":
        print(_inspect(args))
    else:  # a subcommand with a parser but no branch here would do nothing and exit 0
        raise NotImplementedError(f"subcommand {args.command!r} is not dispatched")
    return 0


def _inspect(args) -> str:
    from .data import collator, get_task, load_split, tokenize
    from .evaluation.diagnostics import format_inspection, inspect_features
    from .model import DPBert, META_FILE

    trained = Path(args.checkpoint, META_FILE).is_file()
    model = DPBert.load(args.checkpoint) if trained else None
    name = args.task or (model.task_info.task if model else None)
    if name is None:
        raise ValueError(f"{args.checkpoint} does not name its task; pass --task")
    task = get_task(name)
    if model is None:
        model = DPBert.from_source(args.checkpoint, task.num_labels)
    if args.samples < 8:
        raise ValueError(f"--samples must be at least 8; got {args.samples}")
    ds = tokenize(load_split(task, args.split, args.data_dir, args.samples, shuffle_seed=0), model.tokenizer,
                  model.task_info.max_seq_length)
    report = inspect_features(model, ds, collator(model.tokenizer))
    if args.json:
        return json.dumps(report, indent=2)
    return (f"{args.checkpoint} on {task.name} ({args.split}, {report['examples']} inputs)\n"
            + format_inspection(report))


def _predict(args) -> str:
    import torch

    from .data import encode_one
    from .model import DPBert

    model = DPBert.load(args.checkpoint, require_planners=True).eval()
    if _requested_budget(args) is not None:
        from .model.budget import apply_budget

        apply_budget(model, _requested_budget(args))
    info = model.task_info
    _warn_if_pair_mismatch(info.task, args.text_b)
    enc = encode_one(model.tokenizer, args.text, args.text_b, info.max_seq_length)
    with torch.inference_mode():
        out = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), mode="hard",
                    threshold=args.threshold)
    if model.is_regression:
        label = float(out.logits[0, 0])
    else:
        idx = int(out.logits[0].argmax())
        label = info.label_names[idx] if info.label_names else idx
    layers = [i + 1 for i, a in enumerate(out.actions[0].tolist()) if a]
    result = {"label": label, "layers_executed": layers, "num_layers": model.num_layers,
              "probs": [round(p, 4) for p in out.probs[0].tolist()]}
    if args.json:
        return json.dumps(result)
    return f"label: {label}\nlayers executed: {layers} ({len(layers)}/{model.num_layers})\nplanner p: {result['probs']}"


def _warn_if_pair_mismatch(task_name: Optional[str], text_b: Optional[str]) -> None:
    """Warn on stderr when ``predict`` gets one sentence for a sentence-pair task (RTE, MRPC, STS-B, ...)
    or two for a single-sentence task: the model then sees an input unlike any it was trained on."""
    if task_name is None:
        return
    from .data import get_task

    task = get_task(task_name)
    if task.text_b is not None and text_b is None:
        print(f"dpbert-rl: warning: {task.name} is a sentence-pair task but one sentence was given; the "
              "prediction is for an incomplete input (pass the second sentence after the first)", file=sys.stderr)
    elif task.text_b is None and text_b is not None:
        print(f"dpbert-rl: warning: {task.name} takes one sentence but two were given; they are encoded as a "
              "pair, unlike the training inputs", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
