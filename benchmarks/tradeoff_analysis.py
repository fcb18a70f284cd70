"""The trade-off benchmark's analysis: choices on the selection split, the target check, the oracle
gap, merging results files and the report (``tradeoff.md``).

Every *choice* here reads only what a point measured on the selection split (``select_score`` and
``select_speedup_ideal``, the ideal speed-up ``L / mean layers`` of the selection inputs); the dev
score and the measured dev speed-up of the chosen point are what is reported. Dev-side helpers
(:func:`front`, :func:`envelope_at`, :func:`best_in_window`) only describe curves, for the figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpbert_rl.model.backbone import canonical_backbone

from _common import MixedRunError, check_one_commit, markdown_table

METHODS = ("backbone", "dpbert", "dpbert_soft", "deebert", "pabee", "berxit", "layerdrop", "bert_kl", "static_path",
           "oracle")
LABELS = {"backbone": "backbone (all layers)", "dpbert": "DPBERT (RL)", "dpbert_soft": "DPBERT-soft",
          "deebert": "DeeBERT", "pabee": "PABEE", "berxit": "BERxiT", "layerdrop": "LayerDrop",
          "bert_kl": "BERT-kL", "static_path": "best fixed path", "oracle": "oracle (dev labels)"}
WINDOW = (1.30, 1.96)  # the paper's comparison range (BERT-9L to BERT-6L)
TARGET_WINDOW = (1.3, 2.0)  # the target range
NOISE_BAND = (0.97, 1.03)  # the backbone timed against itself must land here, or the timing run is noisy


# ---------------------------------------------------------------------- curves (dev, descriptive)
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
    """The best *dev* score with a measured speed-up in ``[lo, hi]``: a description of a curve, never a
    choice (choices are :func:`choose`)."""
    inside = [p for p in points if lo <= p["speedup_measured"] <= hi]
    return max(inside, key=lambda p: p["score"]) if inside else None


def envelope_at(points: list, s: float):
    """The best dev score a method reaches at measured speed-up ``s`` or faster (its staircase)."""
    ok = [p["score"] for p in points if p["speedup_measured"] >= s]
    return max(ok) if ok else None


# ---------------------------------------------------------------------- choices (selection split)
def choose(points: list, lo: float, hi: float = math.inf):
    """The setting chosen on the selection split: the best ``select_score`` among the points whose
    selection-split ideal speed-up is in ``[lo, hi]`` (ties: the faster). None if there is none."""
    ok = [p for p in points if p.get("select_score") is not None and p.get("select_speedup_ideal") is not None
          and lo <= p["select_speedup_ideal"] <= hi and math.isfinite(p["select_score"])]
    return max(ok, key=lambda p: (p["select_score"], p["select_speedup_ideal"])) if ok else None


def chosen_summary(p) -> dict:
    """What ``chosen`` records: the setting, its selection score and speed-up, and its dev score."""
    if p is None:
        return None
    keys = ("setting", "select_score", "select_speedup_ideal", "score", "speedup_measured", "speedup_ideal",
            "layers_executed_mean")
    return {k: p.get(k) for k in keys}


TARGET_AGAINST = ("bert_kl", "deebert", "pabee", "berxit")
"""What DPBERT's curve must be on or above in :data:`TARGET_WINDOW`: static truncation (BERT-kL, what a
practitioner would fine-tune instead) and every early exit (issue 23's target)."""
PICK_AT = (1.3, 1.5, 2.0)
"""The speed-ups at which the report says which method a user should pick (:func:`pick`)."""
CANDIDATES = ("dpbert", "dpbert_soft", "deebert", "pabee", "berxit", "layerdrop", "bert_kl", "static_path")
"""The methods a user could pick (the backbone is not faster; the oracle reads dev labels)."""


def _chosen_score(points: list, s: float):
    p = choose(points, s)
    return None if p is None else p["score"]


def target_check(entry: dict, methods=TARGET_AGAINST, grid_step: float = 0.05, measured: bool = False) -> list:
    """At every speed-up ``s`` of the target range (grid of 0.05): each method's setting chosen on the
    selection split among those at ``s`` or faster (selection ideal speed-up), and whether DPBERT's
    chosen setting has a dev score on or above the other's.

    ``measured=True`` compares the dev envelopes instead (:func:`envelope_at`: each method's best dev score at a
    *measured* speed-up of ``s`` or more). That reads dev labels to pick each method's point, so it describes the
    curves at the same measured speed and chooses nothing; it shows where a method's selection-split speed-up
    did not hold on dev."""
    score_at = envelope_at if measured else _chosen_score
    m = entry["methods"]
    dp = m.get("dpbert", {}).get("points", [])
    out = []
    for other in methods:
        op = m.get(other, {}).get("points", [])
        if not dp or not op:
            continue
        worse, compared = [], 0
        for s in np.round(np.arange(TARGET_WINDOW[0], TARGET_WINDOW[1] + 1e-9, grid_step), 2):
            a, b = score_at(dp, s), score_at(op, s)
            if b is None:
                continue
            compared += 1
            if a is None or a < b:
                worse.append((round(float(s), 2), a, b))
        out.append({"against": other, "below_at": worse, "compared": compared})
    return out


def pick(entry: dict, s: float):
    """Which method a user should pick at speed-up ``s`` or faster, on the selection split alone: each method's
    setting chosen by :func:`choose` at ``s``, then the one with the best selection score. Returns
    ``(method, point)``, or None when no method has a setting that fast. The point's dev score is reported,
    never used."""
    best = None
    for m in CANDIDATES:
        p = choose(entry["methods"].get(m, {}).get("points", []), s)
        if p is not None and (best is None or p["select_score"] > best[1]["select_score"]):
            best = (m, p)
    return best


def target_met(entry: dict, measured: bool = False) -> bool:
    """DPBERT on or above every method of :data:`TARGET_AGAINST` at every compared speed-up of the window
    (and compared with at least one); False when one of them was not run on the task. ``measured``: by the
    dev envelopes at measured speed-up (see :func:`target_check`)."""
    methods = entry["methods"]
    if "dpbert" not in methods or any(m not in methods for m in TARGET_AGAINST):
        return False  # not measured (a method with no points is one that does not apply, e.g. DeeBERT on STS-B)
    checks = target_check(entry, measured=measured)
    return any(c["compared"] for c in checks) and not any(c["below_at"] for c in checks)


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


def headline(entry: dict):
    """DPBERT's point shown in Fig. 4 and Table 3: its setting chosen in the window, else its fastest."""
    pts = entry["methods"].get("dpbert", {}).get("points", [])
    if not pts:
        return None
    return choose(pts, *WINDOW) or max(pts, key=lambda p: p["speedup_measured"])


# ---------------------------------------------------------------------- timing noise
def is_noisy(self_speedup) -> bool:
    """A timing run is noisy when the backbone timed against itself leaves :data:`NOISE_BAND`."""
    return self_speedup is None or not NOISE_BAND[0] <= self_speedup <= NOISE_BAND[1]


def task_noise(entry: dict) -> dict:
    """A task's ``self_speedup`` (the backbone method's timing run, else the median over its methods'
    runs), ``noisy`` (any of its timing runs noisy) and the noisy methods."""
    runs = {n: e["self_speedup"] for n, e in entry.get("methods", {}).items() if e.get("self_speedup") is not None}
    if not runs:
        return {"self_speedup": None, "noisy": False, "noisy_methods": []}
    own = runs.get("backbone", float(np.median(list(runs.values()))))
    bad = sorted(n for n, s in runs.items() if is_noisy(s))
    return {"self_speedup": own, "noisy": bool(bad), "noisy_methods": bad}


# ---------------------------------------------------------------------- merging results files
def current_code(entry: dict, method: str, hashes: dict) -> bool:
    """A method's results were measured by the code it runs now: their code hash (recorded with them) is this
    run's (``hashes``: ``code_hashes`` of the results file)."""
    return entry.get("code_hash") is not None and entry.get("code_hash") == hashes.get(method)


#: How reports and figures name the packaged backbones; any other backbone by its directory or hub name.
BACKBONE_TITLES = {"minilm": "MiniLM-L6", "mpnet-base": "MPNet-base"}


def results_backbone(results: dict) -> str:
    """The backbone a results file (or a run's results) was run on, spelled one way
    (:func:`dpbert_rl.model.backbone.canonical_backbone`): its ``args`` (or ``context.settings``) ``backbone``;
    files written before the backbone was recorded ran on MiniLM."""
    return canonical_backbone(str((results.get("args") or {}).get("backbone")
                                  or ((results.get("context") or {}).get("settings") or {}).get("backbone")
                                  or "minilm"))


def backbone_title(results: dict) -> str:
    """:func:`results_backbone` as reports and figures name it (a checkpoint directory ``.../<name>/model`` as
    ``<name>/model``)."""
    name = results_backbone(results)
    if name in BACKBONE_TITLES:
        return BACKBONE_TITLES[name]
    path = Path(name)
    return f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name


def merge(existing: dict, incoming: dict, allow_mixed: bool = False, rerun=()) -> dict:
    """``incoming`` (this run) merged into ``existing`` (the results file), method by method.

    Refuses (:class:`_common.MixedRunError`) results on another backbone (always: one file per backbone), and
    results of another code commit or a dirty tree unless
    ``allow_mixed``; then the file records ``mixed_commits`` and the report marks those methods. Results of
    another commit whose method's code hash is this run's (:func:`current_code`) are not mixed: that code did
    not change. What this run re-runs (``rerun``: ``(task, method)`` pairs) replaces the old results, so those are
    not checked."""
    if existing.get("tasks") and results_backbone(existing) != results_backbone(incoming):
        raise MixedRunError(f"tradeoff.json holds results on backbone {results_backbone(existing)!r} and this run is on "
                            f"{results_backbone(incoming)!r}: one results file per backbone (give this run its own "
                            "--results-dir)")
    hashes = incoming.get("code_hashes", {})
    rerun = set(rerun)
    commits = [e.get("commit") for t, te in existing.get("tasks", {}).items() for m, e in te.get("methods", {}).items()
               if (t, m) not in rerun and not current_code(e, m, hashes)]
    if not existing.get("tasks"):
        commits.append(existing.get("commit"))
    commits += [e.get("commit") for t in incoming.get("tasks", {}).values() for m, e in t.get("methods", {}).items()
                if not current_code(e, m, hashes)]
    seen = check_one_commit([c for c in commits if c], incoming["commit"], allow_mixed, "tradeoff.json")
    merged = {k: v for k, v in existing.items() if k != "tasks"}
    merged.update({k: v for k, v in incoming.items() if k not in ("tasks", "selection", "budget")})
    for key, per_task in (("selection", "tasks"), ("budget", "train_subsets")):  # a resumed run adds tasks
        old, new = existing.get(key, {}), incoming.get(key, {})
        merged[key] = {**old, **new, per_task: {**old.get(per_task, {}), **new.get(per_task, {})}}
    merged["tasks"] = {t: dict(e) for t, e in existing.get("tasks", {}).items()}
    for task, entry in incoming.get("tasks", {}).items():
        into = merged["tasks"].setdefault(task, {})
        into.update({k: v for k, v in entry.items() if k != "methods"})
        into["methods"] = {**into.get("methods", {}), **entry.get("methods", {})}
    for entry in merged["tasks"].values():
        entry.update(task_noise(entry))
    if len(seen) > 1 or any(c.endswith("+dirty") or c == "unknown" for c in seen):
        merged["mixed_commits"] = seen
    else:
        merged.pop("mixed_commits", None)
    return merged


# ---------------------------------------------------------------------- the report
def _cell(p, commit_ok: bool = True) -> str:
    if not p:
        return "-"
    mark = "" if commit_ok else " †"
    return f"{p['score']:.2f} ({p['speedup_measured']:.2f}x){mark}"


def _check_lines(tasks: dict, measured: bool) -> list:
    """The target check's lines, one per task and method compared (see :func:`target_check`)."""
    where = "measured on dev" if measured else "on the selection split"
    lines = []
    for t, e in tasks.items():
        for c in target_check(e, measured=measured):
            who = LABELS[c["against"]]
            if not c["compared"]:
                lines.append(f"- {t} vs {who}: nothing to compare ({who} has no setting at {TARGET_WINDOW[0]}x or "
                             f"faster {where})")
            elif c["below_at"]:
                detail = "; ".join(f"{s}x: {'-' if a is None else round(a, 2)} vs {round(b, 2)}"
                                   for s, a, b in c["below_at"])
                lines.append(f"- {t} vs {who}: below at {len(c['below_at'])} of {c['compared']} speed-ups compared "
                             f"({detail})")
            else:
                lines.append(f"- {t} vs {who}: on or above at all {c['compared']} speed-ups compared")
    return lines


def write_report(results: dict, out_dir: Path) -> None:
    tasks = results.get("tasks", {})
    top = results.get("commit")
    lines = [f"# Score vs measured batch-1 speed-up: DPBERT and the early-exit baselines ({backbone_title(results)}, CPU)",
             "",
             "Written by `benchmarks/tradeoff.py`; do not edit by hand. Every method starts from the same stage-1 "
             "backbone and is trained for the same number of epochs beyond it; checkpoints, thresholds, patience, "
             "rates and the settings in the tables are chosen on the selection split (held out from the training "
             "file); dev is scored once per final model and setting. Speed-ups are measured at batch size 1 against "
             "the full backbone on one seeded sample of dev inputs, in one interleaved run per method (median of the "
             "passes); the ideal speed-up is computed on the same inputs. The oracle uses the dev labels: an upper "
             "bound, not a method.", ""]
    if results.get("mixed_commits"):
        lines += [f"**Mixed run** (merged with --allow-mixed): commits {', '.join(results['mixed_commits'])}; "
                  "methods from another commit than the file's are marked †.", ""]
    noisy = [t for t, e in tasks.items() if e.get("noisy")]
    if noisy:
        lines += ["**Noisy timing** on " + ", ".join(
            f"{t} (backbone against itself {tasks[t].get('self_speedup', float('nan')):.3f}x; noisy runs: "
            f"{', '.join(tasks[t].get('noisy_methods', []))})" for t in noisy)
            + f": outside [{NOISE_BAND[0]}, {NOISE_BAND[1]}], so measured speed-ups there are not reliable.", ""]
    # Table 1
    lines += [f"## Table 1: the setting chosen on the selection split with a speed-up in [{WINDOW[0]}, {WINDOW[1]}]", ""]
    names = [n for n in METHODS if any(n in e["methods"] for e in tasks.values())]
    head = "| method | " + " | ".join(f"{t} ({e['metric']})" + (" (noisy)" if e.get("noisy") else "")
                                     for t, e in tasks.items()) + " |"
    lines += [head, "|---" * (len(tasks) + 1) + "|"]
    for n in names:
        cells = []
        for e in tasks.values():
            me = e["methods"].get(n, {})
            pts = me.get("points", [])
            if n == "backbone":
                p = pts[0] if pts else None
            elif n == "oracle":
                p = best_in_window(pts, *WINDOW)
            else:
                p = choose(pts, *WINDOW)
            cells.append(_cell(p, me.get("commit") in (None, top) or current_code(me, n, results.get("code_hashes", {}))))
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    lines.append("| *backbone timed against itself* | " + " | ".join(
        "-" if e.get("self_speedup") is None else f"{e['self_speedup']:.3f}x" + (" (noisy)" if e.get("noisy") else "")
        for e in tasks.values()) + " |")
    lines += ["", "Each cell: dev score (measured speed-up). The setting is the best selection-split score among a "
              "method's settings whose selection-split ideal speed-up (L / mean layers) is in the window; '-' = no "
              "such setting. Oracle: best dev score in the window (dev labels; an upper bound).", ""]
    # Table 2
    lines += ["## Table 2: DPBERT (RL) vs DPBERT-soft, calibrated on the selection split to the same speed-up", ""]
    rows = []
    for t, e in tasks.items():
        dp = e["methods"].get("dpbert", {}).get("points", [])
        for p in e["methods"].get("dpbert_soft", {}).get("points", []):
            if p.get("target") is None:
                continue
            q = choose([x for x in dp if x.get("target") == p["target"]], 0.0)
            if q:
                rows.append({"task": t, "target": p["target"], "dp": q["score"], "dp_s": q["speedup_measured"],
                             "soft": p["score"], "soft_s": p["speedup_measured"]})
    lines += [markdown_table(rows, [("task", "task", ""), ("target speed-up", "target", ".2f"), ("DPBERT", "dp", ".2f"),
                                    ("measured", "dp_s", ".2f"), ("DPBERT-soft", "soft", ".2f"),
                                    ("measured ", "soft_s", ".2f")]), "",
              "DPBERT: of its models calibrated to that target, the one with the best selection score.", ""]
    # target
    lines += [f"## Target: DPBERT on or above {', '.join(LABELS[m] for m in TARGET_AGAINST)} at every speed-up in "
              f"[{TARGET_WINDOW[0]}, {TARGET_WINDOW[1]}]", "",
              "At each speed-up s (step 0.05) every method's setting is chosen on the selection split among those "
              "with a selection ideal speed-up of s or more; their dev scores are compared.", ""]
    lines += _check_lines(tasks, measured=False)
    met = [t for t, e in tasks.items() if target_met(e)]
    lines += ["", f"Target met (on or above all of them at every speed-up compared) on {len(met)} of {len(tasks)} "
              f"tasks{': ' + ', '.join(met) if met else ''} (the target: at least 3 of 4).", "",
              "### The same comparison at dev's measured speed-up (descriptive)", "",
              "Each method's best dev score among its points measured at s or faster on dev (its envelope). This "
              "reads dev labels to pick each method's point, so it chooses nothing; it shows where a setting's "
              "selection-split speed-up did not hold on dev.", ""]
    lines += _check_lines(tasks, measured=True)
    met_m = [t for t, e in tasks.items() if target_met(e, measured=True)]
    lines += ["", f"By the dev envelopes at measured speed-up: on or above all of them on {len(met_m)} of {len(tasks)} "
              f"tasks{': ' + ', '.join(met_m) if met_m else ''}.", ""]
    # what to pick
    lines += ["## What a user should pick", "",
              "At each speed-up, every method's setting chosen on the selection split among those with a selection "
              "ideal speed-up of that or more (as above), then the method with the best selection score; its dev "
              "score and measured speed-up as reported.", ""]
    rows = []
    for t, e in tasks.items():
        row = {"task": t}
        for s_ in PICK_AT:
            got = pick(e, s_)
            row[f"{s_:g}x"] = "-" if got is None else \
                f"{LABELS[got[0]]}: {got[1]['score']:.2f} ({got[1]['speedup_measured']:.2f}x)"
        rows.append(row)
    lines += [markdown_table(rows, [("task", "task", "")] + [(f"{s_:g}x or faster (selection, ideal)", f"{s_:g}x", "")
                                                             for s_ in PICK_AT]),
              "", "The columns are the selection split's ideal speed-up (L / mean layers), as every choice here; the "
              "measured speed-up in each cell is what the choice ran at on dev, timed.", ""]
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
    lines += ["## Every point", "", "select: score and ideal speed-up on the selection split (what choices read); "
              "score, measured, ideal: dev.", ""]
    for t, e in tasks.items():
        rows = [{"method": LABELS[n], **p} for n in METHODS for p in e["methods"].get(n, {}).get("points", [])]
        lines += [f"### {t}", "", markdown_table(rows, [
            ("method", "method", ""), ("setting", "setting", ""), ("select", "select_score", ".2f"),
            ("select ideal", "select_speedup_ideal", ".2f"), ("score", "score", ".2f"),
            ("measured", "speedup_measured", ".2f"), ("ideal", "speedup_ideal", ".2f"),
            ("layers", "layers_executed_mean", ".2f")]), ""]
        notes = [f"- {LABELS[n]}: {e['methods'][n]['note']}" for n in METHODS if e["methods"].get(n, {}).get("note")]
        lines += notes + [""] if notes else []
    # provenance
    cmds = sorted({m.get("command") for e in tasks.values() for m in e["methods"].values() if m.get("command")})
    mach = results.get("machine") or next((m["machine"] for e in tasks.values() for m in e["methods"].values()
                                           if m.get("machine")), {})
    off = sorted({f"{t}/{n}: {m.get('commit')}" for t, e in tasks.items() for n, m in e["methods"].items()
                  if m.get("commit") not in (None, top)})
    sel = results.get("selection", {})
    lines += ["## Provenance", "", f"- code commit: {top}" + (f" (methods of other commits: {'; '.join(off)})" if off else ""),
              *[f"- command: `{c}`" for c in cmds],
              f"- machine: {mach.get('cpu') or mach.get('processor')}, {mach.get('threads')} threads, "
              f"torch {mach.get('torch')}, device {mach.get('device', 'cpu')}",
              f"- selection split: {sel.get('how', '-')}",
              *[f"- {t}: {s.get('select_examples')} selection / {s.get('train_examples')} training examples; backbone "
                f"against itself {tasks.get(t, {}).get('self_speedup') or float('nan'):.3f}x"
                + (" (noisy)" if tasks.get(t, {}).get("noisy") else "") for t, s in sel.get("tasks", {}).items()],
              f"- budget: {({k: v for k, v in results.get('budget', {}).items() if k != 'train_subsets'}) or '-'} "
              "(training examples per task above)", ""]
    (out_dir / "tradeoff.md").write_text("\n".join(lines))


def device_rows(device: dict, source: dict, task: str) -> list:
    """One row per method of ``task`` re-timed on a device (``tradeoff_<device>.json``): the setting chosen
    on the selection split (``source``'s, i.e. tradeoff.json's) with its dev score and its speed-ups here
    at every batch size, the range over all its settings, and whether its paths here are those of the
    run that made it."""
    bss = device.get("batch_sizes", [])
    src = source.get("tasks", {}).get(task, {}).get("methods", {})
    rows = []
    for n in METHODS:
        m = device.get("tasks", {}).get(task, {}).get("methods", {}).get(n)
        if not m or not m.get("points"):
            continue
        pts = {p["setting"]: p for p in m["points"]}
        chosen = (src.get(n) or {}).get("chosen") or {}  # the oracle has none: not a choice
        pick = pts.get(chosen.get("setting"))
        drift = max(abs(p["layers_executed_mean_device"] - p["layers_executed_mean_source"]) for p in m["points"])
        row = {"method": LABELS[n], "setting": pick["setting"] if pick else "-", "score": pick["score"] if pick else None,
               "ideal": pick["speedup_ideal"] if pick else None, "cpu": chosen.get("speedup_measured"),
               "paths": "same" if drift < 1e-9 else f"same but up to {drift:.3f} layers per input apart"}
        for bs in bss:
            vals = [p[f"speedup_measured_b{bs}"] for p in m["points"]]
            row[f"b{bs}"] = pick[f"speedup_measured_b{bs}"] if pick else None
            row[f"range_b{bs}"] = f"{min(vals):.2f}-{max(vals):.2f}"
        rows.append(row)
    return rows


def write_device_report(device: dict, source: dict, path: Path) -> None:
    """``tradeoff_<device>.md``: the chosen settings' speed-ups on another device (``--retime``)."""
    bss = device.get("batch_sizes", [])
    lines = [f"# The trade-off benchmark's models timed on {device.get('device_name')} ({device.get('device')})", "",
             "Written by `benchmarks/tradeoff.py --retime`; do not edit by hand. The models of `tradeoff.json` "
             f"(code commit {str(device.get('source_commit'))[:12]}) timed again here against the full backbone, "
             "interleaved, on the same seeded sample of dev inputs, at batch sizes "
             f"{', '.join(map(str, bss))}; nothing is trained, scores are those of `tradeoff.json`.", ""]
    if device.get("note"):
        lines += [f"How the models came here: {device['note']}", ""]
    for t in device.get("tasks", {}):
        rows = device_rows(device, source, t)
        lines += [f"## {t}", ""]
        fulls = {bs: [m["points"][0][f"latency_ms_full_b{bs}"] for m in device["tasks"][t]["methods"].values()
                      if m.get("points")] for bs in bss}
        if all(fulls.values()):  # each method's run times the full backbone beside it
            lines += ["Full backbone, over the methods' runs: " + ", ".join(
                f"{min(v):.2f}-{max(v):.2f} ms per batch of {bs}" for bs, v in fulls.items()) + ".", ""]
        cols = [("method", "method", ""), ("setting chosen on the selection split", "setting", ""),
                ("dev score", "score", ".2f"), ("ideal", "ideal", ".2f"), ("CPU batch 1", "cpu", ".2f")]
        for bs in bss:
            cols += [(f"here, batch {bs}", f"b{bs}", ".2f"), (f"all settings, batch {bs}", f"range_b{bs}", "")]
        lines += [markdown_table(rows, cols + [("paths here", "paths", "")]), ""]
        self_s = {n: m.get("self_speedup") for n, m in device["tasks"][t]["methods"].items()}
        lines += ["Backbone timed against itself, per method's run: " + "; ".join(
            f"{LABELS[n]} " + ", ".join(f"b{bs} {v:.3f}x" for bs, v in s.items()) for n, s in self_s.items() if s)
            + ".", ""]
    cmds = device.get("commands") or [device.get("command")]
    mach = device.get("machine", {})
    lines += ["## Provenance", "", f"- code commit: {device.get('commit')}; models from {device.get('source_commit')}",
              *[f"- command: `{c}`" for c in cmds if c],
              f"- machine: {mach.get('cpu') or mach.get('processor')}, torch {mach.get('torch')}", ""]
    path.write_text("\n".join(lines))
