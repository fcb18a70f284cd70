"""Benchmark: score against measured batch-1 speed-up for DPBERT and the early-exit baselines.

On each task (RTE, MRPC, SST-2 on a training subset, STS-B) with the packaged MiniLM-L6:

* stage 1 fine-tunes the backbone once; every method starts from it;
* DPBERT (RL, stages 2-3) for each ``--target-rates`` value, then its execute threshold calibrated
  on training inputs to several skip rates (``--calibration-rates``); DPBERT-soft likewise;
* DeeBERT (entropy threshold), PABEE (patience), BERxiT (learned exit), LayerDrop (fixed subsets),
  BERT-kL (k = 1..L-1), from :mod:`dpbert_rl.early_exit`;
* the oracle over all 2^L paths of the frozen stage-1 backbone (:mod:`dpbert_rl.oracle`), and the
  best single path per layer count chosen on dev (both use the dev labels: upper bounds).

Every point's speed-up is measured at batch size 1 on the CPU against the full stage-1 backbone,
interleaved in the same run (:func:`dpbert_rl.latency.interleaved_latency`, median of 3 passes).

Outputs: ``benchmarks/results/tradeoff.json`` (per task and method: points
``{setting, score, speedup_measured, speedup_ideal, layers_executed_mean}``, commit, command),
``tradeoff.md`` (Tables 1-3, the target check, the oracle gap), ``tradeoff_<task>.png`` (Fig. 3)
and ``tradeoff_layers.png`` (Fig. 4). Trained models live under ``runs/tradeoff/<task>/``; each
method's points are cached there too (``points/<method>.json``), so a re-run resumes where it
stopped and retrains nothing that is done.

    python benchmarks/tradeoff.py --data-dir ../shared/data/glue
    python benchmarks/tradeoff.py --data-dir ../shared/data/glue --tasks rte --methods deebert,pabee
    python benchmarks/tradeoff.py --report-only      # tables and figures from tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command, commit, layer_heatmap, markdown_table  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dpbert_rl import early_exit as ee  # noqa: E402
from dpbert_rl import oracle  # noqa: E402
from dpbert_rl.data import collator, get_task, load_split, tokenize  # noqa: E402
from dpbert_rl.evaluate import run_dataset, score_run, speedup_ideal_fields  # noqa: E402
from dpbert_rl.latency import encode_examples, interleaved_latency, machine_info  # noqa: E402
from dpbert_rl.metrics import compute_metrics  # noqa: E402
from dpbert_rl.model import DPBert  # noqa: E402
from dpbert_rl.train import TrainConfig, calibrate_threshold, train_stage  # noqa: E402

TASK_SETTINGS = {"rte": {}, "mrpc": {}, "sst2": {"max_train_samples": 5000}, "stsb": {}}
METHODS = ("backbone", "dpbert", "dpbert_soft", "deebert", "pabee", "berxit", "layerdrop", "bert_kl", "oracle",
           "static_path")
LABELS = {"backbone": "backbone (all layers)", "dpbert": "DPBERT (RL)", "dpbert_soft": "DPBERT-soft",
          "deebert": "DeeBERT", "pabee": "PABEE", "berxit": "BERxiT", "layerdrop": "LayerDrop",
          "bert_kl": "BERT-kL", "oracle": "oracle (dev labels)", "static_path": "best fixed path (dev labels)"}
WINDOW = (1.30, 1.96)  # the paper's comparison range (BERT-9L to BERT-6L)
TARGET_WINDOW = (1.3, 2.0)  # the target range


# ---------------------------------------------------------------------- the run
class TaskRun:
    """Everything one task's methods share: the stage-1 model, the data, the latency inputs."""

    def __init__(self, task: str, args):
        self.task, self.args = task, args
        self.t = get_task(task)
        self.root = Path(args.output_dir) / task
        self.points_dir = self.root / "points"
        self.points_dir.mkdir(parents=True, exist_ok=True)
        self.s1 = train_stage("finetune", self.config("stage1_finetune", epochs=args.stage1_epochs, lr=args.lr))
        self.full = DPBert.load(self.s1).eval()
        tok = self.full.tokenizer
        self.collate = collator(tok)
        self.dev_raw = load_split(self.t, "dev", args.data_dir)
        self.dev = tokenize(self.dev_raw, tok)
        self._train = None
        self.calib = tokenize(load_split(self.t, "train", args.data_dir, args.calibration_samples,
                                         shuffle_seed=args.seed + 1), tok)
        self.examples = encode_examples(self.dev, args.latency_samples)
        for j, ex in enumerate(self.examples):
            ex["index"] = j

    def config(self, sub: str, **kw) -> TrainConfig:
        a = self.args
        base = TrainConfig(task=self.task, backbone=a.backbone, data_dir=a.data_dir, output_dir=str(self.root / sub),
                           lr=a.lr, epochs=a.stage1_epochs, evals_per_epoch=3, seed=a.seed, progress=False,
                           lam=a.lam, beta=a.beta, planner_lr=a.planner_lr, **TASK_SETTINGS.get(self.task, {}))
        return replace(base, **kw)

    @property
    def train(self):
        if self._train is None:
            self._train = tokenize(load_split(self.t, "train", self.args.data_dir,
                                              TASK_SETTINGS.get(self.task, {}).get("max_train_samples"),
                                              shuffle_seed=self.args.seed), self.full.tokenizer)
        return self._train

    # ---- scoring and timing
    def score(self, run: dict) -> dict:
        return score_run(self.t, run)

    def full_fn(self, ex):
        return self.full(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="full")

    def measure(self, settings: list) -> list:
        """``settings``: (label, scored dev run summary, batch-1 callable). Times them all against
        the full backbone in one interleaved run and returns the points."""
        fns = {"__full__": self.full_fn}
        for label, _, fn in settings:
            fns[label] = fn
        lat = interleaved_latency(fns, self.examples, repeats=self.args.latency_repeats, threads=self.args.threads)
        L = self.full.num_layers
        points = []
        for label, s, _ in settings:
            points.append({
                "setting": label,
                "score": s["score"],
                "speedup_measured": lat[label]["speedup"],
                **speedup_ideal_fields(s["layers_executed_mean"], L),  # null with a note when no layer ran
                "layers_executed_mean": s["layers_executed_mean"],
                "layer_frequency": s["layer_frequency"],
                "latency_ms": lat[label]["latency_ms"],
                "latency_ms_full": lat["__full__"]["latency_ms"],
            })
        return points


def _dp_fn(model, thr):
    def fn(ex):
        return model(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="hard", threshold=thr)
    return fn


def _path_fn(model, path):
    path = torch.as_tensor(path, dtype=torch.float32)

    def fn(ex):
        return model(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="path", actions=path)
    return fn


def _exit_fn(model, **rule):
    def fn(ex):
        return model(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), **rule)
    return fn


def _exit_run(run: TaskRun, model: ee.EarlyExitBert, **rule) -> dict:
    def forward(b):
        o = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), **rule)
        return o.logits, o.actions

    return run.score(run_dataset(model.model, run.dev, run.collate, 64, forward=forward))


# ---------------------------------------------------------------------- methods
def m_backbone(run: TaskRun) -> dict:
    s = run.score(run_dataset(run.full, run.dev, run.collate, 64, "full"))
    return {"points": run.measure([("all layers", s, run.full_fn)])}


def _planner_points(run: TaskRun, model_dir: Path, name: str, rates) -> list:
    """A trained planner model at threshold 0.5 and calibrated to each skip rate in ``rates``."""
    model = DPBert.load(model_dir).eval()
    settings, extra = [], {}
    thresholds = [("p>=0.5", 0.5)]
    for q in rates:
        thr, reached = calibrate_threshold(model, run.calib, run.collate, q, iterations=8)
        thresholds.append((f"calibrated to skip {q:.2f} (train {reached:.2f}), p>={thr:.3f}", thr))
    for label, thr in thresholds:
        dev_run = run_dataset(model, run.dev, run.collate, 64, "hard", threshold=thr)
        s = run.score(dev_run)
        settings.append((f"{name}: {label}", s, _dp_fn(model, thr)))
        extra[f"{name}: {label}"] = dev_run["actions"]
    points = run.measure(settings)
    for p in points:
        p["_actions"] = extra[p["setting"]]
    return points


def _stage2(run: TaskRun) -> Path:
    """Stage 2 at the first target rate: the start of every DPBERT (RL) model and of DPBERT-soft."""
    a = run.args
    return train_stage("planner_init", run.config("stage2_planner_init", epochs=a.stage2_epochs,
                                                  target_rate=a.target_rates[0]), init=str(run.s1))


def _calibration_rates(r: float) -> list:
    """The skip rates a model trained at target rate ``r`` is calibrated to: r - 0.15, r, r + 0.15."""
    return sorted({round(min(max(r + d, 0.05), 0.9), 2) for d in (-0.15, 0.0, 0.15)})


def m_dpbert(run: TaskRun) -> dict:
    a = run.args
    s2 = _stage2(run)
    points = []
    for r in a.target_rates:
        s3 = train_stage("rl", run.config(f"stage3_rl_r{r:g}", epochs=a.stage3_epochs, lr=a.stage3_lr, target_rate=r),
                         init=str(s2))
        points += _planner_points(run, s3, f"r={r:g}", _calibration_rates(r))
    return {"points": points}


def m_dpbert_soft(run: TaskRun) -> dict:
    a = run.args
    r = a.target_rates[0]
    soft = train_stage("soft", run.config(f"soft_r{r:g}", epochs=a.stage3_epochs, lr=a.stage3_lr, target_rate=r),
                       init=str(_stage2(run)))
    return {"points": _planner_points(run, soft, f"soft r={r:g}", _calibration_rates(r))}


def _exit_model(run: TaskRun, kind: str) -> ee.EarlyExitBert:
    """DeeBERT's frozen-backbone off-ramps, or the jointly trained exits shared by PABEE and BERxiT
    (BERxiT's exit head trained on top); cached under runs/."""
    a = run.args
    d = run.root / kind
    if (d / ee.RAMPS_FILE).is_file():
        return ee.EarlyExitBert.load(d).eval()
    if kind == "deebert":
        model = ee.EarlyExitBert(DPBert.load(run.s1))
        feats = ee.layer_features(model, run.train, run.collate, progress=False)
        info = ee.train_offramps_frozen(model, feats, epochs=a.ramp_epochs, seed=a.seed, log_dir=d, progress=False)
    elif kind == "joint":
        model = ee.EarlyExitBert(DPBert.load(run.s1))
        info = ee.train_exits_joint(model, run.train, run.collate, epochs=a.joint_epochs, lr=a.adapt_lr,
                                    seed=a.seed, log_dir=d, progress=False)
    else:  # berxit: the exit head on the joint model's frozen features
        model = _exit_model(run, "joint")
        feats = ee.layer_features(model, run.train, run.collate, progress=False)
        info = ee.train_exit_head(model, feats, epochs=a.ramp_epochs, seed=a.seed, log_dir=d, progress=False)
    model.save(d, meta={"kind": kind, **info})
    return model.eval()


def m_deebert(run: TaskRun) -> dict:
    if run.t.is_regression:
        return {"points": [], "note": "DeeBERT's entropy rule needs class probabilities; not defined for regression "
                                      "(the paper's Table 1 has no STS-B entry for it either)"}
    model = _exit_model(run, "deebert")
    hmax = float(np.log(run.t.num_labels))
    settings = []
    for frac in (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999):  # ramps of weak tasks sit near ln C
        rule = dict(rule="entropy", threshold=frac * hmax)
        settings.append((f"entropy < {frac:g} ln C", _exit_run(run, model, **rule), _exit_fn(model, **rule)))
    return {"points": run.measure(settings)}


def m_pabee(run: TaskRun) -> dict:
    model = _exit_model(run, "joint")
    settings = []
    for t in range(0, run.full.num_layers):
        rule = dict(rule="patience", patience=t, tolerance=run.args.regression_tolerance)
        settings.append((f"patience {t}", _exit_run(run, model, **rule), _exit_fn(model, **rule)))
    return {"points": run.measure(settings)}


def m_berxit(run: TaskRun) -> dict:
    model = _exit_model(run, "berxit")
    settings = []
    for thr in (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9):
        rule = dict(rule="learned", threshold=thr)
        settings.append((f"exit score > {thr:g}", _exit_run(run, model, **rule), _exit_fn(model, **rule)))
    return {"points": run.measure(settings)}


def m_layerdrop(run: TaskRun) -> dict:
    a = run.args
    ld_dir = train_stage("layerdrop", run.config(f"layerdrop_p{a.layerdrop:g}", epochs=a.joint_epochs,
                                                 lr=a.adapt_lr, layerdrop=a.layerdrop), init=str(run.s1))
    model = DPBert.load(ld_dir).eval()
    L = model.num_layers
    settings = []
    for keep in range(L, 1, -1):
        path = ee.layerdrop_subset(L, keep)
        s = run.score(run_dataset(model, run.dev, run.collate, 64, "path", actions=torch.tensor(path)))
        label = f"keep {keep}: layers {','.join(str(i + 1) for i, x in enumerate(path) if x)}"
        settings.append((label, s, _path_fn(model, path)))
    return {"points": run.measure(settings)}


def m_bert_kl(run: TaskRun) -> dict:
    a = run.args
    settings = []
    for k in range(1, run.full.num_layers):
        init = run.root / f"bert_{k}l_init"
        if not (init / "config.json").is_file():
            ee.truncate(DPBert.load(run.s1), k).save(init)
        d = train_stage("finetune", run.config(f"bert_{k}l", epochs=a.kl_epochs, lr=a.adapt_lr), init=str(init))
        model = DPBert.load(d).eval()
        s = run.score(run_dataset(model, run.dev, run.collate, 64, "full"))
        s["layers_executed_mean"] = float(k)
        s["layer_frequency"] = [1.0] * k + [0.0] * (run.full.num_layers - k)

        def fn(ex, m=model):
            return m(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="full")

        settings.append((f"BERT-{k}L", s, fn))
    return {"points": run.measure(settings)}


def _oracle_run(run: TaskRun) -> dict:
    cache = run.root / "oracle_paths.npz"
    if cache.is_file():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    res = oracle.enumerate_paths(run.full, run.dev, run.collate, progress=False)
    np.savez_compressed(cache, **res)
    return res


def _path_points(run: TaskRun, res: dict, chosen: dict) -> list:
    """``chosen``: label -> path index per dev input. Scores them; times each input's path."""
    P = res["paths"]
    settings = []
    for label, idx in chosen.items():
        preds = res["predictions"][np.arange(len(idx)), idx]
        acts = P[idx]
        s = run.score({"predictions": preds, "labels": res["labels"], "actions": acts})
        per_ex = torch.as_tensor(acts, dtype=torch.float32)

        def fn(ex, per_ex=per_ex):
            return run.full(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="path",
                            actions=per_ex[ex["index"]])

        settings.append((label, s, fn))
    return run.measure(settings)


def m_oracle(run: TaskRun) -> dict:
    res = _oracle_run(run)
    L = run.full.num_layers
    chosen = {f"at most {k} layers per input": oracle.oracle_choices(res, run.t.is_regression, k) for k in range(1, L + 1)}
    return {"points": _path_points(run, res, chosen)}


def m_static_path(run: TaskRun) -> dict:
    res = _oracle_run(run)
    labels = res["labels"]

    def score_fn(preds):
        if run.t.is_regression:
            return compute_metrics(run.t.metric, preds, labels)["score"]
        return compute_metrics(run.t.metric, preds.astype(int), labels.astype(int))["score"]

    best = oracle.best_static_paths(res, score_fn)
    L = run.full.num_layers
    chosen = {}
    for k in range(2, L):
        p = best[k][0]
        path = res["paths"][p]
        chosen[f"{k} layers: {','.join(str(i + 1) for i, x in enumerate(path) if x)}"] = np.full(len(labels), p)
    return {"points": _path_points(run, res, chosen)}


RUNNERS = {"backbone": m_backbone, "dpbert": m_dpbert, "dpbert_soft": m_dpbert_soft, "deebert": m_deebert,
           "pabee": m_pabee, "berxit": m_berxit, "layerdrop": m_layerdrop, "bert_kl": m_bert_kl, "oracle": m_oracle,
           "static_path": m_static_path}


def run_task(task: str, args, results: dict, save) -> None:
    run = TaskRun(task, args)
    entry = results.setdefault("tasks", {}).setdefault(task, {"metric": run.t.metric, "methods": {}})
    entry["dev_examples"] = len(run.dev)
    entry["latency_examples"] = len(run.examples)
    entry["train_examples"] = json.loads((Path(run.s1).parent / "config.json").read_text())["train_examples"]
    for name in args.methods:
        cache = run.points_dir / f"{name}.json"
        if cache.is_file() and not args.recompute:
            out = json.loads(cache.read_text())
        else:
            t0 = time.time()
            print(f"[{task}] {name} ...", flush=True)
            out = RUNNERS[name](run)
            out["seconds"] = time.time() - t0
            out["commit"], out["command"], out["machine"] = commit(), command(), machine_info()
            if name == "dpbert":
                _keep_paths(run, out)
            for p in out["points"]:
                p.pop("_actions", None)
            cache.write_text(json.dumps(out, indent=2))
        entry["methods"][name] = out
        print(f"[{task}] {name}: " + ", ".join(f"{p['score']:.1f}@{p['speedup_measured']:.2f}x"
                                               for p in out["points"]), flush=True)
        save()


def _keep_paths(run: TaskRun, out: dict) -> None:
    """Table 3 material: the dev inputs with the layers DPBERT ran for each, for every DPBERT point."""
    for p in out["points"]:
        acts = np.asarray(p.pop("_actions"))
        n = acts.sum(1)
        order = np.argsort(n, kind="stable")
        pick = list(order[:3]) + list(order[::-1][:3])
        names = run.t.label_names
        p["examples"] = [{"index": int(i), "text_a": run.dev_raw[int(i)]["text_a"], "text_b": run.dev_raw[int(i)]["text_b"],
                          "label": names[run.dev_raw[int(i)]["label"]] if names else run.dev_raw[int(i)]["label"],
                          "layers": [j + 1 for j in range(acts.shape[1]) if acts[i, j] > 0]} for i in pick]


# ---------------------------------------------------------------------- analysis
def front(points: list, key: str = "speedup_measured") -> list:
    """The upper-left envelope: points not beaten by a faster-or-equal point with a higher score."""
    pts = sorted(points, key=lambda p: (-p[key], -p["score"]))
    out, best = [], -np.inf
    for p in pts:
        if p["score"] > best:
            out.append(p)
            best = p["score"]
    return sorted(out, key=lambda p: p[key])


def best_in_window(points: list, lo: float, hi: float):
    inside = [p for p in points if lo <= p["speedup_measured"] <= hi]
    return max(inside, key=lambda p: p["score"]) if inside else None


def envelope_at(points: list, s: float):
    """The best score a method reaches at speed-up ``s`` or faster (its staircase envelope)."""
    ok = [p["score"] for p in points if p["speedup_measured"] >= s]
    return max(ok) if ok else None


def target_check(entry: dict) -> list:
    """Where DPBERT's envelope is below DeeBERT's or PABEE's in [1.3, 2.0] (grid of 0.05)."""
    m = entry["methods"]
    dp = m.get("dpbert", {}).get("points", [])
    out = []
    for other in ("deebert", "pabee"):
        op = m.get(other, {}).get("points", [])
        if not dp or not op:
            continue
        worse, compared = [], 0
        for s in np.round(np.arange(TARGET_WINDOW[0], TARGET_WINDOW[1] + 1e-9, 0.05), 2):
            a, b = envelope_at(dp, s), envelope_at(op, s)
            compared += b is not None
            if b is not None and (a is None or a < b):
                worse.append((round(float(s), 2), a, b))
        out.append({"against": other, "below_at": worse, "compared": compared})
    return out


def oracle_gap(entry: dict) -> list:
    """For every DPBERT point: the oracle's score at the same layer budget (interpolated over the
    oracle's mean layers) minus DPBERT's."""
    m = entry["methods"]
    orc = sorted(m.get("oracle", {}).get("points", []), key=lambda p: p["layers_executed_mean"])
    out = []
    if not orc:
        return out
    xs = [p["layers_executed_mean"] for p in orc]
    ys = [p["score"] for p in orc]
    for p in m.get("dpbert", {}).get("points", []):
        o = float(np.interp(p["layers_executed_mean"], xs, ys))
        out.append({"setting": p["setting"], "layers": p["layers_executed_mean"], "dpbert": p["score"], "oracle": o,
                    "gap": o - p["score"]})
    return out


def write_report(results: dict, out_dir: Path) -> None:
    tasks = results.get("tasks", {})
    lines = ["# Score vs measured batch-1 speed-up: DPBERT and the early-exit baselines (MiniLM-L6, CPU)", "",
             "Written by `benchmarks/tradeoff.py`; do not edit by hand. Speed-ups are measured at batch size 1 "
             "against the full fine-tuned backbone in the same interleaved run (median of 3 passes). The oracle "
             "and the best fixed path use the dev labels: they are upper bounds, not methods.", ""]
    # Table 1
    lines += [f"## Table 1: best dev score with a measured speed-up in [{WINDOW[0]}, {WINDOW[1]}]", ""]
    names = [n for n in METHODS if any(n in e["methods"] for e in tasks.values())]
    head = "| method | " + " | ".join(f"{t} ({e['metric']})" for t, e in tasks.items()) + " |"
    lines += [head, "|---" * (len(tasks) + 1) + "|"]
    for n in names:
        cells = []
        for t, e in tasks.items():
            pts = e["methods"].get(n, {}).get("points", [])
            if n == "backbone":
                b = pts[0] if pts else None
            else:
                b = best_in_window(pts, *WINDOW)
            cells.append(f"{b['score']:.2f} ({b['speedup_measured']:.2f}x)" if b else "-")
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: score (measured speed-up of that point); '-' = no point of that method in the window.", ""]
    # Table 2
    lines += ["## Table 2: DPBERT (RL) vs DPBERT-soft, calibrated to the same skip rate on training inputs", ""]
    rows = []
    for t, e in tasks.items():
        dp = {p["setting"].split(": ", 1)[1].split(" (")[0]: p for p in e["methods"].get("dpbert", {}).get("points", [])
              if p["setting"].startswith(f"r={results['args']['target_rates'][0]:g}:")}
        for p in e["methods"].get("dpbert_soft", {}).get("points", []):
            key = p["setting"].split(": ", 1)[1].split(" (")[0]
            if key in dp:
                q = dp[key]
                rows.append({"task": t, "setting": key, "dp": q["score"], "dp_s": q["speedup_measured"],
                             "soft": p["score"], "soft_s": p["speedup_measured"]})
    lines += [markdown_table(rows, [("task", "task", ""), ("setting", "setting", ""), ("DPBERT", "dp", ".2f"),
                                    ("speed-up", "dp_s", ".2f"), ("DPBERT-soft", "soft", ".2f"),
                                    ("speed-up ", "soft_s", ".2f")]), ""]
    # target
    lines += ["## Target: DPBERT on or above DeeBERT and PABEE at every speed-up in [1.3, 2.0]", "",
              "Envelope = the best score a method reaches at that speed-up or faster.", ""]
    for t, e in tasks.items():
        for c in target_check(e):
            if not c["compared"]:
                lines.append(f"- {t} vs {LABELS[c['against']]}: nothing to compare ({LABELS[c['against']]} has no "
                             f"point at {TARGET_WINDOW[0]}x or faster)")
            elif c["below_at"]:
                detail = "; ".join(f"{s}x: {a if a is None else round(a, 2)} vs {round(b, 2)}" for s, a, b in c["below_at"])
                lines.append(f"- {t} vs {LABELS[c['against']]}: below at {len(c['below_at'])} of {c['compared']} "
                             f"speed-ups compared ({detail})")
            else:
                lines.append(f"- {t} vs {LABELS[c['against']]}: on or above at all {c['compared']} speed-ups compared")
    lines.append("")
    # oracle gap
    lines += ["## How far DPBERT is from the oracle (same mean number of layers)", ""]
    rows = [{"task": t, **g} for t, e in tasks.items() for g in oracle_gap(e)]
    lines += [markdown_table(rows, [("task", "task", ""), ("DPBERT setting", "setting", ""), ("layers", "layers", ".2f"),
                                    ("DPBERT", "dpbert", ".2f"), ("oracle", "oracle", ".2f"), ("gap", "gap", ".2f")]), ""]
    # Table 3
    lines += ["## Table 3: dev inputs and the layers DPBERT executed (shortest and longest paths)", ""]
    for t, e in tasks.items():
        p = headline(e)
        if not p or "examples" not in p:
            continue
        lines += [f"### {t} - {p['setting']} ({p['score']:.2f}, {p['speedup_measured']:.2f}x)", "",
                  "| layers executed | label | input |", "|---|---|---|"]
        for x in p["examples"]:
            text = x["text_a"] + (f" [SEP] {x['text_b']}" if x.get("text_b") else "")
            text = text.replace("|", "/")[:200]
            lines.append(f"| {','.join(map(str, x['layers'])) or '(none)'} | {x['label']} | {text} |")
        lines.append("")
    # all points
    lines += ["## Every point", ""]
    for t, e in tasks.items():
        rows = [{"method": LABELS[n], **p} for n in METHODS for p in e["methods"].get(n, {}).get("points", [])]
        lines += [f"### {t}", "", markdown_table(rows, [("method", "method", ""), ("setting", "setting", ""),
                                                       ("score", "score", ".2f"), ("measured", "speedup_measured", ".2f"),
                                                       ("ideal", "speedup_ideal", ".2f"),
                                                       ("layers", "layers_executed_mean", ".2f")]), ""]
        notes = [f"- {LABELS[n]}: {e['methods'][n]['note']}" for n in METHODS if e["methods"].get(n, {}).get("note")]
        lines += notes + [""] if notes else []
    commits = sorted({m["commit"] for e in tasks.values() for m in e["methods"].values()})
    cmds = sorted({m["command"] for e in tasks.values() for m in e["methods"].values()})
    mach = next((m["machine"] for e in tasks.values() for m in e["methods"].values()), {})
    lines += ["## Provenance", "", f"- commits: {', '.join(commits)}", *[f"- command: `{c}`" for c in cmds],
              f"- machine: {mach.get('processor')}, {mach.get('threads')} threads, torch {mach.get('torch')}", ""]
    (out_dir / "tradeoff.md").write_text("\n".join(lines))


def headline(entry: dict):
    """DPBERT's point shown in Fig. 4 and Table 3: its best in the window, else its fastest."""
    pts = entry["methods"].get("dpbert", {}).get("points", [])
    if not pts:
        return None
    return best_in_window(pts, *WINDOW) or max(pts, key=lambda p: p["speedup_measured"])


STYLE = {"dpbert": ("o-", "C3"), "dpbert_soft": ("s--", "C1"), "deebert": ("^-", "C0"), "pabee": ("v-", "C2"),
         "berxit": ("D-", "C4"), "layerdrop": ("x-", "C5"), "bert_kl": ("P-", "C7"),
         "oracle": (":", "k"), "static_path": ("+:", "C8")}


def draw_task(ax, t: str, e: dict, title: str, legend: bool = True) -> None:
    """One task's Fig. 3 panel: for every method the best score at each speed-up or faster (a
    staircase through its front) and, faint, every point it measured."""
    ax.axvspan(*WINDOW, color="0.93", zorder=0)
    base = e["methods"].get("backbone", {}).get("points", [])
    if base:
        ax.axhline(base[0]["score"], color="0.5", lw=0.8, ls="--", label="backbone (all layers)")
    for n, (fmt, col) in STYLE.items():
        pts = e["methods"].get(n, {}).get("points", [])
        if not pts:
            continue
        shown = front(pts)
        ax.step([p["speedup_measured"] for p in shown], [p["score"] for p in shown], fmt, where="pre", color=col,
                ms=4, label=LABELS[n], lw=2.2 if n == "dpbert" else 1.1, zorder=3 if n == "dpbert" else 2)
        ax.scatter([p["speedup_measured"] for p in pts], [p["score"] for p in pts], color=col, s=9, alpha=0.3)
    # the y range of the methods; an oracle far above it is marked at the top edge instead of
    # squeezing every method's curve into a sliver
    scores = [p["score"] for n in STYLE if n not in ("oracle", "static_path")
              for p in e["methods"].get(n, {}).get("points", [])] + [b["score"] for b in base]
    if scores:
        lo, hi = min(scores), max(scores)
        pad = max(1.0, 0.08 * (hi - lo))
        orc = e["methods"].get("oracle", {}).get("points", [])
        top = max([p["score"] for p in orc] + [hi])
        if top > hi + 4 * pad:
            ax.set_ylim(lo - pad, hi + 2 * pad)
            best = max(orc, key=lambda p: (p["score"], p["speedup_measured"]))
            ax.annotate(f"oracle (dev labels) above: {best['score']:.1f} at {best['layers_executed_mean']:.2f} "
                        f"layers, {best['speedup_measured']:.1f}x", xy=(0.99, 0.985), xycoords="axes fraction",
                        ha="right", va="top", fontsize=7, color="k")
    ax.set_xscale("log")
    ticks = [1, 1.3, 2, 3, 4, 6]
    ax.set_xticks(ticks, [f"{x:g}x" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("measured speed-up at batch size 1 (CPU, log scale)")
    ax.set_ylabel(f"dev {e['metric']}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results.get("tasks", {})
    for t, e in tasks.items():
        fig, ax = plt.subplots(figsize=(8.6, 4.6))
        draw_task(ax, t, e, f"{t}: best dev score at each speed-up or faster (MiniLM-L6; shaded {WINDOW[0]}-{WINDOW[1]}x)")
        fig.tight_layout()
        fig.savefig(out_dir / f"tradeoff_{t}.png", dpi=120)
        plt.close(fig)
    if tasks:  # the main figure: every task side by side, one legend
        n = len(tasks)
        cols = min(n, 2)
        rows_n = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(6.2 * cols + 2.2, 4.0 * rows_n), squeeze=False)
        for ax, (t, e) in zip(axes.flat, tasks.items()):
            draw_task(ax, t, e, t, legend=False)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
        fig.suptitle(f"Best dev score at each batch-1 speed-up or faster, MiniLM-L6 on CPU "
                     f"(shaded: {WINDOW[0]}-{WINDOW[1]}x)", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1 - 2.0 / (6.2 * cols + 2.2), 0.96))
        fig.savefig(out_dir / "tradeoff.png", dpi=110)
        plt.close(fig)
    rows = [(t, headline(e)) for t, e in tasks.items() if headline(e)]
    if rows:  # Fig. 4
        layer_heatmap([f"{t} ({p['speedup_measured']:.2f}x)" for t, p in rows], [p["layer_frequency"] for _, p in rows],
                      out_dir / "tradeoff_layers.png", "DPBERT: fraction of dev inputs that execute each layer")


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE directory (default: $GLUE_DIR)")
    ap.add_argument("--tasks", default="rte,mrpc,stsb,sst2", help="comma-separated GLUE tasks")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--output-dir", default="runs/tradeoff", help="trained models and cached points")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--recompute", action="store_true", help="recompute points even where cached (models are reused)")
    ap.add_argument("--report-only", action="store_true", help="only redraw tables and figures from tradeoff.json")
    g = ap.add_argument_group("training budget (2-core CPU defaults)")
    g.add_argument("--stage1-epochs", type=float, default=3.0)
    g.add_argument("--lr", type=float, default=1e-4, help="stage-1 learning rate")
    g.add_argument("--stage2-epochs", type=float, default=1.0)
    g.add_argument("--stage3-epochs", type=float, default=1.0, help="DPBERT RL and DPBERT-soft")
    g.add_argument("--stage3-lr", type=float, default=2e-5, help="backbone lr after stage 1 (all methods)")
    g.add_argument("--planner-lr", type=float, default=1e-3)
    g.add_argument("--lam", type=float, default=10.0)
    g.add_argument("--beta", type=float, default=200.0)
    g.add_argument("--target-rates", default="0.3,0.5", help="DPBERT is trained once per target rate r")
    g.add_argument("--adapt-lr", type=float, default=5e-5,
                   help="backbone lr of the baselines' second fine-tuning (PABEE/BERxiT, LayerDrop, BERT-kL)")
    g.add_argument("--joint-epochs", type=float, default=1.0, help="PABEE/BERxiT joint exits and LayerDrop")
    g.add_argument("--ramp-epochs", type=float, default=3.0, help="DeeBERT off-ramps and BERxiT's exit head")
    g.add_argument("--kl-epochs", type=float, default=0.5, help="BERT-kL: fine-tuning of each truncated model")
    g.add_argument("--layerdrop", type=float, default=0.3, help="LayerDrop rate while fine-tuning")
    g.add_argument("--regression-tolerance", type=float, default=0.1, help="PABEE agreement on STS-B")
    g.add_argument("--calibration-samples", type=int, default=300, help="training inputs the thresholds are calibrated on")
    g.add_argument("--seed", type=int, default=42)
    m = ap.add_argument_group("latency")
    m.add_argument("--latency-samples", type=int, default=100, help="dev inputs timed at batch size 1")
    m.add_argument("--latency-repeats", type=int, default=3)
    m.add_argument("--threads", type=int, default=2, help="torch threads for the whole run (training and timing)")
    args = ap.parse_args()
    commit()
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tradeoff.json"
    if args.report_only:
        results = json.loads(path.read_text()) if path.is_file() else {}
        write_report(results, out_dir)
        plot(results, out_dir)
        return
    results = {}
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    args.target_rates = [float(x) for x in args.target_rates.split(",")]
    args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; expected some of {', '.join(METHODS)}")
    results["args"] = {k: v for k, v in vars(args).items()}
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    def save():
        # merge into what is on disk: several runs (e.g. one per task, in parallel) may share the file
        merged = json.loads(path.read_text()) if path.is_file() else {}
        for task, entry in results.get("tasks", {}).items():  # method by method: a run of some methods keeps the rest
            into = merged.setdefault("tasks", {}).setdefault(task, {})
            into.update({k: v for k, v in entry.items() if k != "methods"})
            into.setdefault("methods", {}).update(entry["methods"])
        merged["args"] = results["args"]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=2))
        tmp.replace(path)
        write_report(merged, out_dir)
        plot(merged, out_dir)

    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        run_task(task, args, results, save)


if __name__ == "__main__":
    main()
