"""Wall-clock speed: batch-size-1 latency and batched throughput, measured side by side.

The production setting of the paper is one input at a time. The full backbone and the method
are timed in the same run, interleaved example by example (their order alternating), over
``repeats`` passes; each pass gives one speed-up and the median is reported, so that drift of a
shared machine hits both sides alike. The thread count is fixed for the whole measurement.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..data import collator, get_task, load_split, tokenize
from ..checks import check_max_seq_length, check_task_compatible, check_threshold
from .diagnostics import score_interval
from .evaluate import run_dataset, score_run, speedup_ideal_fields
from ..model.budget import apply_budget, get_knob, knob_name, set_knob, solve_knob
from ..model.objectives import check_rate
from ..model.dpbert import DPBert


def sample_indices(n: int, k: Optional[int], seed: int = 0) -> list:
    """A seeded sample of ``k`` of ``range(n)``, sorted (all of them when ``k`` is None or at least ``n``):
    the inputs a benchmark times, and computes each point's ideal speed-up on."""
    if k is None or k >= n:
        return list(range(n))
    import numpy as np

    return sorted(int(i) for i in np.random.RandomState(seed).choice(n, size=k, replace=False))


def encode_batches(dataset, indices: Sequence[int], batch_size: int, collate_fn, device=None) -> list:
    """Rows ``indices`` of a tokenised dataset as padded batches of ``batch_size`` (on ``device``), each
    with ``index``, the rows' positions in ``dataset``: the inputs of a batched timing."""
    out = []
    for j in range(0, len(indices), batch_size):
        idx = list(indices[j:j + batch_size])
        b = dict(collate_fn([{k: v for k, v in dataset[i].items() if k != "labels"} for i in idx]))
        b["index"] = torch.tensor(idx)
        out.append({k: v.to(device) if device is not None else v for k, v in b.items()})
    return out


def encode_examples(dataset, n: Optional[int] = None) -> list:
    """Tokenised rows to batch-of-1 tensors (done once, outside the timed region)."""
    rows = []
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in dataset.column_names]
    for i in range(len(dataset) if n is None else min(n, len(dataset))):
        r = dataset[i]
        rows.append({k: torch.tensor([r[k]]) for k in keys})
    return rows


@torch.inference_mode()
def interleaved_latency(
    methods: Dict[str, Callable[[dict], object]],
    examples: Sequence[dict],
    repeats: int = 3,
    warmup: int = 5,
    threads: Optional[int] = None,
    progress: bool = False,
    synchronize: Optional[Callable[[], None]] = None,
) -> dict:
    """Time each method on every example at batch size 1, interleaved.

    :param methods: name -> callable taking one example's tensors. The first is the reference.
    :param synchronize: called after every call inside the timed region (``torch.cuda.synchronize``
        on a GPU, whose calls return before the work is done).
    :return: per method ``latency_ms`` (median over passes of the mean per example) and
        ``speedup`` against the first method (median over passes of the per-pass ratio).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    names = list(methods)
    try:
        for ex in examples[:warmup]:
            for fn in methods.values():
                fn(ex)
        totals = {n: [] for n in names}
        it = range(repeats)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"latency ({len(examples)} inputs x {len(names)} methods)", leave=False)
        for r in it:
            acc = dict.fromkeys(names, 0.0)
            for j, ex in enumerate(examples):
                order = names if (j + r) % 2 == 0 else names[::-1]
                for n in order:
                    t = time.perf_counter()
                    methods[n](ex)
                    if synchronize is not None:
                        synchronize()
                    acc[n] += time.perf_counter() - t
            for n in names:
                totals[n].append(acc[n])
    finally:
        torch.set_num_threads(old_threads)
    ref = names[0]
    count = max(len(examples), 1)
    return {
        n: {
            "latency_ms": 1000 * statistics.median(totals[n]) / count,
            "speedup": statistics.median(a / b for a, b in zip(totals[ref], totals[n])),
            "passes_s": totals[n],
        }
        for n in names
    }


@torch.inference_mode()
def batched_throughput(model: DPBert, dataset, collate_fn, batch_size: int = 32, mode: str = "hard",
                       repeats: int = 3, threshold: Optional[float] = None) -> float:
    """Examples per second over the dataset in batches (median of ``repeats`` passes)."""
    from torch.utils.data import DataLoader

    batches = list(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), mode=mode, threshold=threshold)
        times.append(time.perf_counter() - t)
    return len(dataset) / statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def evaluate_checkpoint(
    checkpoint: str,
    baseline_checkpoint: Optional[str] = None,
    task: Optional[str] = None,
    data_dir: Optional[str] = None,
    split: str = "dev",
    max_eval_samples: Optional[int] = None,
    max_seq_length: Optional[int] = None,
    threshold: Optional[float] = None,
    repeats: int = 3,
    latency_samples: Optional[int] = None,
    threads: Optional[int] = None,
    batch_size: int = 64,
    throughput_batch_size: int = 32,
    progress: bool = True,
    output: Optional[str] = None,
    budget: Optional[float] = None,
    rate_on_inputs: Optional[float] = None,
    bootstrap: int = 1000,
) -> dict:
    """Everything ``dpbert-rl evaluate`` reports about a trained DPBERT checkpoint.

    :param budget: run at this fraction of the layers (read off the checkpoint's budget curve,
        :mod:`dpbert_rl.model.budget`); default: the checkpoint's own setting.
    :param rate_on_inputs: set the knob, in memory, so that the model skips this fraction of the layers on
        the evaluated split's own inputs, read without their labels (a budget set on the inputs that are
        served, as ``dpbert-rl calibrate --inputs`` does); the checkpoint on disk is not changed. The report's
        ``rate_on_inputs`` records the knob before and after.

    :param bootstrap: resamples of the paired bootstrap behind ``score_diff_ci95`` and ``score_retained_ci95``
        (DPBERT against the full backbone on the same resampled inputs; 95% intervals).
    :param baseline_checkpoint: the fine-tuned backbone whose full-model score is the reference
        (stage 1's ``model/``); default: this checkpoint's own backbone with every layer run.
    :return: dev score, layers executed (mean and per layer), measured and ideal speed-ups,
        batched throughput; written as JSON to ``output`` when given.
    """
    if sum(x is not None for x in (threshold, budget, rate_on_inputs)) > 1:
        raise ValueError("threshold, budget and rate_on_inputs each set the planners' knob: give one of them")
    model = DPBert.load(checkpoint, require_planners=True).eval()
    if budget is not None:
        apply_budget(model, budget)
    task_name = task or model.task_info.task
    if task_name is None:
        raise ValueError(f"{checkpoint} does not name its task; pass --task")
    t = get_task(task_name)
    check_task_compatible(model, t, checkpoint)  # a 2-class head scored on STS-B is a correlation of class ids
    seq = max_seq_length or model.task_info.max_seq_length
    check_max_seq_length(model, seq, checkpoint)
    ds = tokenize(load_split(t, split, data_dir, max_eval_samples), model.tokenizer, seq)
    collate = collator(model.tokenizer)
    if threshold is not None:
        model.threshold = check_threshold(threshold)
    L = model.num_layers
    on_inputs = None
    if rate_on_inputs is not None:
        check_rate(rate_on_inputs)
        before = get_knob(model)
        # the inputs scored below, their label column dropped: no label reaches the knob
        unlabelled = DataLoader(ds.remove_columns("labels"), batch_size=batch_size, collate_fn=collate)
        knob, reached = solve_knob(model, list(unlabelled), (1.0 - rate_on_inputs) * L, tol=0.01 * L)
        set_knob(model, knob)
        on_inputs = {"split": split, "num_inputs": len(ds), "target_rate": rate_on_inputs, "knob": knob_name(model),
                     "value_before": before, "value": knob, "skip_rate": 1.0 - reached / L}

    dp_run = run_dataset(model, ds, collate, batch_size, "hard", progress=progress)
    dp = score_run(t, dp_run)
    base_model = DPBert.load(baseline_checkpoint).eval() if baseline_checkpoint else model
    check_task_compatible(base_model, t, baseline_checkpoint or checkpoint)
    base_run = run_dataset(base_model, ds, collate, batch_size, "full", progress=progress)
    base = score_run(t, base_run)
    interval = score_interval(t, dp_run["predictions"], base_run["predictions"], dp_run["labels"], bootstrap)

    examples = encode_examples(ds, latency_samples)

    def full(ex):
        return model(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="full")

    def dpbert(ex):
        return model(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="hard")

    lat = interleaved_latency({"full": full, "dpbert": dpbert}, examples, repeats, threads=threads, progress=progress)
    tp_full = batched_throughput(model, ds, collate, throughput_batch_size, "full")
    tp_dp = batched_throughput(model, ds, collate, throughput_batch_size, "hard")
    report = {
        "task": t.name,
        "checkpoint": str(checkpoint),
        "baseline_checkpoint": str(baseline_checkpoint) if baseline_checkpoint else None,
        "backbone": model.backbone.config.name_or_path if hasattr(model.backbone.config, "name_or_path") else None,
        "metric": t.metric,
        "split": split,
        "num_examples": dp["num_examples"],
        "backbone_score": base["score"],
        "dpbert_score": dp["score"],
        "score_retained": dp["score"] / base["score"] if base["score"] else None,
        **interval,
        "backbone_metrics": base["metrics"],
        "dpbert_metrics": dp["metrics"],
        "num_layers": L,
        "threshold": model.threshold,
        "rate_on_inputs": on_inputs,
        "layers_executed_mean": dp["layers_executed_mean"],
        "layer_frequency": dp["layer_frequency"],
        "latency_ms_full": lat["full"]["latency_ms"],
        "latency_ms_dpbert": lat["dpbert"]["latency_ms"],
        "speedup_measured": lat["dpbert"]["speedup"],
        # and length-weighted: a layer on a long input costs more (below speedup_ideal when short inputs skip more)
        **speedup_ideal_fields(dp["layers_executed_mean"], L, [len(x) for x in ds["input_ids"]],
                               dp_run["actions"].sum(1)),
        "latency_examples": len(examples),
        "latency_repeats": repeats,
        "throughput_full": tp_full,
        "throughput_dpbert": tp_dp,
        "throughput_speedup": tp_dp / tp_full,
        "machine": machine_info(),
    }
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
    return report


def format_report(r: dict) -> str:
    """A short table of an :func:`evaluate_checkpoint` report."""
    rows = [
        ("task", r["task"]),
        (f"backbone {r['metric']}", f"{r['backbone_score']:.2f}"),
        (f"DPBERT {r['metric']}", f"{r['dpbert_score']:.2f}"),
        *([("DPBERT - backbone", f"{r['dpbert_score'] - r['backbone_score']:+.2f} "
                                 f"[{r['score_diff_ci95'][0]:+.2f}, {r['score_diff_ci95'][1]:+.2f}] "
                                 "(paired bootstrap 95%)")] if r.get("score_diff_ci95") else []),
        *([("score retained", f"{r['score_retained']:.3f} [{r['score_retained_ci95'][0]:.3f}, "
                              f"{r['score_retained_ci95'][1]:.3f}]")] if r.get("score_retained_ci95") else []),
        ("layers executed", f"{r['layers_executed_mean']:.2f} / {r['num_layers']}"),
        ("layer frequency", " ".join(f"{x:.2f}" for x in r["layer_frequency"])),
        ("batch-1 latency", f"{r['latency_ms_full']:.2f} ms -> {r['latency_ms_dpbert']:.2f} ms"),
        ("speed-up measured", f"{r['speedup_measured']:.2f}x"),
        ("speed-up ideal", f"{r['speedup_ideal']:.2f}x" if r.get("speedup_ideal") is not None
         else f"none ({r.get('speedup_ideal_note', 'no layer executed')})"),
        ("speed-up ideal, length-weighted", f"{r['speedup_ideal_length_weighted']:.2f}x"
         if r.get("speedup_ideal_length_weighted") is not None else "none"),
        ("batched throughput", f"{r['throughput_full']:.1f} -> {r['throughput_dpbert']:.1f} ex/s "
                               f"({r['throughput_speedup']:.2f}x)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
