"""The trade-off benchmark's protocol: the code commit that counts, refusing mixed commits, the noisy
mark, thresholds calibrated on held-out data reach their targets, BERxiT's alternating schedule, the
early-exit trainers' checkpoint selection, and (end to end, on a tiny model) that no choice reads dev."""

from __future__ import annotations

import importlib
import inspect
import json
import types
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpbert_rl import baselines as ee
from dpbert_rl.data import collator, load_split, tokenize
from dpbert_rl.model import DPBert
from tests.conftest import make_tiny_checkpoint
from tests.test_early_exit import MORE, exit_model
from tests.test_model import batch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name: str):
    """A module of benchmarks/ (they import each other by name, as scripts)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


# ---------------------------------------------------------------------- the commit that counts
def _git(root, *args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def _commit(root, message):
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return _git(root, "rev-parse", "HEAD")


def test_code_commit_is_the_last_commit_that_changed_code(tmp_path):
    common = bench("_common")
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "benchmarks" / "results").mkdir(parents=True)
    _git(root, "init", "-q")
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "README.md").write_text("readme\n")
    code = _commit(root, "code")
    assert common.code_commit(root) == code
    (root / "benchmarks" / "results" / "tradeoff.json").write_text("{}\n")
    _commit(root, "results only")
    (root / "README.md").write_text("readme, more\n")
    (root / "docs").mkdir()
    (root / "docs" / "x.md").write_text("doc\n")
    head = _commit(root, "README and docs only")
    assert head != code and common.code_commit(root) == code  # a resumed run stays one run
    (root / "benchmarks" / "results" / "tradeoff.json").write_text('{"a": 1}\n')
    assert common.code_commit(root) == code  # results being written do not make the tree dirty
    (root / "pkg" / "a.py").write_text("x = 2\n")
    assert common.code_commit(root) == code + "+dirty"
    code2 = _commit(root, "code again")
    assert common.code_commit(root) == code2
    assert common.code_commit(tmp_path / "not-a-repo") == "unknown"


def test_results_of_other_commits_or_a_dirty_tree_are_refused_unless_allowed(tmp_path):
    common, an = bench("_common"), bench("tradeoff_analysis")
    pt = {"setting": "s", "score": 70.0, "speedup_measured": 1.5, "speedup_ideal": 1.5, "layers_executed_mean": 4.0,
          "select_score": 71.0, "select_speedup_ideal": 1.5}

    def res(commit, method):
        return {"commit": commit, "selection": {"tasks": {"rte": {"select_examples": 9}}},
                "tasks": {"rte": {"metric": "accuracy", "methods": {method: {"commit": commit, "points": [pt],
                                                                             "self_speedup": 1.0}}}}}

    a, b = "a" * 40, "b" * 40
    same = an.merge(res(a, "pabee"), res(a, "deebert"))  # one commit: merged method by method
    assert set(same["tasks"]["rte"]["methods"]) == {"pabee", "deebert"} and "mixed_commits" not in same
    assert same["commit"] == a and same["selection"]["tasks"]["rte"]["select_examples"] == 9
    resumed = an.merge({**res(a, "pabee"), "budget": {"stage1_epochs": 3.0, "train_subsets": {"rte": None}}},
                       {**res(a, "deebert"), "budget": {"stage1_epochs": 3.0, "train_subsets": {"sst2": 5000}}})
    assert resumed["budget"] == {"stage1_epochs": 3.0, "train_subsets": {"rte": None, "sst2": 5000}}
    with pytest.raises(common.MixedRunError, match="other code commits"):
        an.merge(res(a, "pabee"), res(b, "deebert"))
    with pytest.raises(common.MixedRunError, match="dirty"):
        an.merge({}, res(a + "+dirty", "deebert"))
    with pytest.raises(common.MixedRunError):
        common.check_one_commit([a], b)
    mixed = an.merge(res(a, "pabee"), res(b, "deebert"), allow_mixed=True)
    assert mixed["mixed_commits"] == [b, a] and mixed["commit"] == b
    an.write_report(mixed, tmp_path)
    md = (tmp_path / "tradeoff.md").read_text()
    assert "Mixed run" in md and "70.00 (1.50x) †" in md and f"rte/pabee: {a}" in md


def test_tradeoff_refuses_to_resume_a_task_directory_of_other_code(tmp_path, monkeypatch):
    common, methods = bench("_common"), bench("tradeoff_methods")
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / methods.COMMIT_FILE).write_text("a" * 40 + "\n")

    class Args:
        output_dir, code_commit, allow_mixed = str(tmp_path), "b" * 40, False

    with pytest.raises(common.MixedRunError, match="trained at code commit a"):
        methods.TaskRun("rte", Args())
    (tmp_path / "mrpc" / "stage1_finetune").mkdir(parents=True)  # written by a run that recorded no commit
    with pytest.raises(common.MixedRunError, match="trained at code commit unknown"):
        methods.TaskRun("mrpc", Args())


def test_noisy_timing_is_marked(tmp_path):
    an = bench("tradeoff_analysis")
    assert not an.is_noisy(1.0) and not an.is_noisy(0.97) and not an.is_noisy(1.03)
    assert an.is_noisy(1.031) and an.is_noisy(0.96) and an.is_noisy(None)
    pt = {"setting": "s", "score": 70.0, "speedup_measured": 1.5, "speedup_ideal": 1.5, "layers_executed_mean": 4.0,
          "select_score": 71.0, "select_speedup_ideal": 1.5}
    entry = {"metric": "accuracy", "methods": {"backbone": {"points": [pt], "self_speedup": 1.01},
                                               "pabee": {"points": [pt], "self_speedup": 1.08}}}
    noise = an.task_noise(entry)
    assert noise == {"self_speedup": 1.01, "noisy": True, "noisy_methods": ["pabee"]}
    merged = an.merge({}, {"commit": "c" * 40, "tasks": {"rte": entry}})
    assert merged["tasks"]["rte"]["noisy"] and merged["tasks"]["rte"]["self_speedup"] == 1.01
    an.write_report(merged, tmp_path)
    md = (tmp_path / "tradeoff.md").read_text()
    assert "**Noisy timing** on rte" in md and "rte (accuracy) (noisy)" in md
    entry["methods"]["pabee"]["self_speedup"] = 1.0
    assert not an.task_noise(entry)["noisy"]


def test_plan_prints_an_earlier_runs_wall_clock_beside_its_estimate(tiny_glue, tmp_path, capsys):
    task_dir = tmp_path / "runs" / "rte"
    (task_dir / "points").mkdir(parents=True)
    (task_dir / "points" / "deebert.json").write_text(json.dumps({"seconds": 252.4, "points": []}))
    (task_dir / "stage1_finetune" / "model").mkdir(parents=True)
    (task_dir / "stage1_finetune" / "model" / "DONE").write_text(json.dumps({"seconds": 790.0}))
    assert bench("tradeoff_methods").measured_seconds(task_dir) == {"stage1": 790.0, "deebert": 252.4}
    bench("tradeoff").main(["--data-dir", str(tiny_glue), "--tasks", "rte,mrpc", "--plan",
                            "--output-dir", str(tmp_path / "runs")])
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ")]
    header, rows = lines[0], {r[0]: dict(zip(lines[0], r)) for r in lines[1:]}
    assert header[0] == "task" and set(rows) == {"rte", "rte measured", "mrpc"}  # mrpc never ran
    seen = rows["rte measured"]
    assert seen["stage1"] == "790" and seen["deebert"] == "252" and seen["pabee"] == "" and seen["total"] == ""
    assert float(rows["rte"]["stage1"]) > 0


def test_choices_read_only_the_selection_split():
    an = bench("tradeoff_analysis")
    pts = [{"setting": "a", "score": 90, "speedup_measured": 1.5, "select_score": 60, "select_speedup_ideal": 1.5},
           {"setting": "b", "score": 50, "speedup_measured": 1.5, "select_score": 70, "select_speedup_ideal": 1.5},
           {"setting": "c", "score": 99, "speedup_measured": 1.5, "select_score": 65, "select_speedup_ideal": 2.5}]
    assert an.choose(pts, *an.WINDOW)["setting"] == "b"  # not a (the best dev score), not c (out of the window)
    assert an.choose(pts, 2.0)["setting"] == "c" and an.choose(pts, 3.0) is None
    other = [{"setting": "x", "score": 60, "speedup_measured": 1.5, "select_score": 99, "select_speedup_ideal": 1.6}]
    (check,) = an.target_check({"methods": {"dpbert": {"points": pts}, "pabee": {"points": other}}})
    # up to 1.5x DPBERT's choice is b (selection 70 > 65; dev 50 < 60); from 1.55x on only c is that fast
    assert [s for s, _, _ in check["below_at"]] == [1.3, 1.35, 1.4, 1.45, 1.5] and check["compared"] == 7
    # the target is against BERT-kL and every early-exit baseline of Table 1: DeeBERT, PABEE and BERxiT
    checks = an.target_check({"methods": {"dpbert": {"points": pts}, **{m: {"points": other} for m in
                                                                          ("bert_kl", "deebert", "pabee", "berxit",
                                                                           "layerdrop")}}})
    assert [c["against"] for c in checks] == ["bert_kl", "deebert", "pabee", "berxit"]
    low = [{**other[0], "score": 10}]
    every = {m: {"points": low} for m in ("bert_kl", "deebert", "pabee", "berxit")}
    assert an.target_met({"methods": {"dpbert": {"points": pts}, **every}})
    assert not an.target_met({"methods": {"dpbert": {"points": pts}, **every, "bert_kl": {"points": other}}})
    assert not an.target_met({"methods": {"dpbert": {"points": pts}, "bert_kl": {"points": low}}})  # exits not run
    # a method that does not apply to the task (no points: DeeBERT on STS-B) does not block it
    assert an.target_met({"methods": {"dpbert": {"points": pts}, **every, "deebert": {"points": []}}})


def test_the_measured_check_compares_dev_envelopes_at_the_speed_they_ran():
    an = bench("tradeoff_analysis")
    # DPBERT's setting promised 1.6x on the selection split but ran at 1.2x on dev (SST-2's longer dev inputs)
    dp = [{"setting": "a", "score": 85, "speedup_measured": 1.2, "select_score": 90, "select_speedup_ideal": 1.6},
          {"setting": "b", "score": 80, "speedup_measured": 1.8, "select_score": 80, "select_speedup_ideal": 2.2}]
    kl = [{"setting": "k", "score": 84, "speedup_measured": 1.5, "select_score": 84, "select_speedup_ideal": 1.5}]
    entry = {"methods": {"dpbert": {"points": dp}, "bert_kl": {"points": kl}}}
    (by_selection,) = an.target_check(entry)
    assert by_selection["below_at"] == [] and by_selection["compared"] == 5  # a (85) >= k (84) up to 1.5x
    (by_measured,) = an.target_check(entry, measured=True)
    # on dev only b ran at 1.3x or faster: 80 < 84 up to 1.5x; beyond 1.5x BERT-kL has nothing to compare
    assert by_measured["below_at"] == [(s, 80, 84) for s in (1.3, 1.35, 1.4, 1.45, 1.5)]
    assert by_measured["compared"] == 5
    every = {m: {"points": [{**kl[0], "score": 10}]} for m in ("deebert", "pabee", "berxit")}
    entry["methods"].update(every)
    assert an.target_met(entry) and not an.target_met(entry, measured=True)


def test_the_pick_reads_the_selection_split_only():
    an = bench("tradeoff_analysis")
    dp = [{"setting": "d", "score": 99, "speedup_measured": 1.5, "select_score": 60, "select_speedup_ideal": 1.6}]
    kl = [{"setting": "k", "score": 10, "speedup_measured": 1.5, "select_score": 70, "select_speedup_ideal": 1.6},
          {"setting": "k2", "score": 5, "speedup_measured": 2.0, "select_score": 50, "select_speedup_ideal": 2.0}]
    entry = {"methods": {"dpbert": {"points": dp}, "bert_kl": {"points": kl},
                         "oracle": {"points": [{**dp[0], "select_score": 100}]}}}
    method, point = an.pick(entry, 1.3)
    assert method == "bert_kl" and point["setting"] == "k"  # the better selection score, though dev says otherwise
    assert an.pick(entry, 1.8)[1]["setting"] == "k2" and an.pick(entry, 2.5) is None  # never the oracle


# ---------------------------------------------------------------------- held-out exit statistics
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tt_bert"), layers=4)


def _more_ds(m):
    from datasets import Dataset

    raw = Dataset.from_dict({"text_a": MORE, "text_b": [None] * len(MORE), "label": [i % 2 for i in range(len(MORE))]})
    return tokenize(raw, m.tokenizer, 64)


def test_replayed_exits_equal_the_batched_forward(ckpt):
    m = exit_model(ckpt)
    ds = _more_ds(m)
    stats = ee.exit_statistics(m, ds, collator(m.tokenizer), batch_size=5)
    b = batch(m.tokenizer, MORE)
    rules = [dict(rule="entropy", threshold=t) for t in _between(ee.early_exit._entropy(stats["logits"][:, :-1]))]
    rules += [dict(rule="learned", threshold=t) for t in _between(stats["scores"][:, :-1])]
    rules += [dict(rule="patience", patience=t) for t in (0, 1, 2)]
    varied = 0
    for rule in rules:
        replay = ee.exits_from_statistics(stats, **rule)
        out = m(**b, **rule)
        assert torch.equal(replay, out.exit_layer), rule
        run = ee.statistics_run(m, stats, replay)
        np.testing.assert_array_equal(run["predictions"], m.predict(out.logits).numpy())
        varied += len(set(replay.tolist())) > 1
    assert varied >= 3


def _between(values, at=(0.3, 0.6)):
    """Thresholds half-way between two neighbouring values (never on one: float noise between batch
    compositions must not decide a comparison)."""
    v = np.unique(np.asarray(values, dtype=float))
    return [float((v[int(q * (len(v) - 1))] + v[int(q * (len(v) - 1)) + 1]) / 2) for q in at]


def _achievable(fn, grid):
    return sorted({round(fn(t), 9) for t in grid})


@pytest.mark.parametrize("rule", ["entropy", "learned"])
def test_exit_thresholds_calibrated_to_target_layers(ckpt, rule):
    m = exit_model(ckpt)
    stats = ee.exit_statistics(m, _more_ds(m), collator(m.tokenizer))
    hi = float(np.log(2)) + 1e-3 if rule == "entropy" else 1.0

    def layers(t):
        return float(ee.exits_from_statistics(stats, rule, t).float().mean())

    # the layer count only changes where the threshold passes an input's value: try between every two
    values = ee.early_exit._entropy(stats["logits"][:, :-1]) if rule == "entropy" else stats["scores"][:, :-1]
    v = np.unique(np.asarray(values, dtype=float))
    reachable = _achievable(layers, [0.0, hi, *((v[1:] + v[:-1]) / 2), v[0] - 1e-6, v[-1] + 1e-6])
    assert len(reachable) >= 4  # the thresholds do trade layers on this model
    for target in (1.5, 2.0, 2.5, 3.0, 3.5):
        thr, got = ee.calibrate_exit(stats, rule, target)
        assert got == pytest.approx(layers(thr))
        assert abs(got - target) <= min(abs(r - target) for r in reachable) + 1e-9, (target, got, reachable)


def test_planner_threshold_calibrated_to_target_layers(ckpt):
    """DPBERT's execute threshold, bisected on held-out inputs, reaches the closest reachable layer count."""
    methods = bench("tradeoff_methods")
    torch.manual_seed(0)
    m = DPBert.load(ckpt).eval()
    with torch.no_grad():  # planners whose probabilities spread over (0, 1) across inputs and layers
        m.planners.weight.normal_(0, 3.0)
        m.planners.bias.copy_(torch.linspace(-1, 1, m.num_layers))

    class Run:
        calib, collate = _more_ds(m), collator(m.tokenizer)

    layers = methods.planner_layers(Run, m)
    reachable = _achievable(layers, np.linspace(0, 1, 61))
    assert len(reachable) >= 4
    cache = {}
    for target in (1.5, 2.5, 3.5):
        thr, got = ee.bisect_threshold(layers, target, 0.0, 1.0, decreasing=True, iterations=14, cache=cache)
        best = min(abs(r - target) for r in reachable)
        assert abs(got - target) <= best + 0.15, (target, got, reachable)  # bisection, not an exhaustive search


# ---------------------------------------------------------------------- BERxiT and checkpoint selection
def _grads(m):
    head = m.model.backbone.model.classifier.weight.grad
    ramps = [r.classifier.weight.grad for r in m.ramps]
    return head, ramps, m.exit_head.weight.grad, m.model.backbone.model.bert.encoder.layer[0].output.dense.weight.grad


def _nonzero(g):
    return g is not None and bool(g.abs().sum() > 0)


def test_berxit_alternates_between_the_last_layer_and_the_off_ramps(ckpt, tiny_glue):
    m = ee.EarlyExitBert(DPBert.load(ckpt)).train()
    b = batch(m.tokenizer, MORE)
    labels = torch.tensor([i % 2 for i in range(len(MORE))])
    for step in (0, 1, 2, 3):
        m.zero_grad(set_to_none=True)
        ee.berxit_loss(m, m.trace(b["input_ids"], b["attention_mask"]), labels, step)["loss"].backward()
        head, ramps, lte, layer0 = _grads(m)
        assert _nonzero(lte) and _nonzero(layer0)  # the LTE loss on every step, into the backbone too
        if step % 2 == 0:  # even: the last layer's loss; no gradient at all reaches the off-ramps' classifiers
            assert _nonzero(head) and all(g is None for g in ramps), step
        else:  # odd: the off-ramps' losses; none reaches the head's classifier
            assert head is None and all(_nonzero(g) for g in ramps), step
    # the trainer follows the same schedule: after one step only the head's classifier moved, after two the ramps too
    ds = tokenize(load_split("rte", "train", str(tiny_glue), max_samples=8), m.tokenizer, 64)
    for steps, ramps_moved in ((1, False), (2, True)):
        m = ee.EarlyExitBert(DPBert.load(ckpt))
        before = {k: v.clone() for k, v in m.state_dict().items()}
        ee.train_berxit(m, ds, collator(m.tokenizer), epochs=steps, batch_size=8, progress=False)  # 1 step an epoch
        after = m.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("model.backbone.model.classifier") for k in moved)
        assert any(k.startswith("ramps.") and ".classifier." in k for k in moved) == ramps_moved, moved
        assert any(k.startswith("exit_head") for k in moved)


def test_lte_head_reads_the_exit_pooled_features(ckpt):
    m = ee.EarlyExitBert(DPBert.load(ckpt)).eval()
    b = batch(m.tokenizer, MORE)
    t = m.trace(b["input_ids"], b["attention_mask"])
    for i in range(m.num_layers - 1):
        torch.testing.assert_close(t.pooled[:, i], torch.tanh(m.ramps[i].pooler(t.cls[:, i])))
    torch.testing.assert_close(t.pooled[:, -1], m.model.backbone.pool(t.cls[:, -1]))  # the head's own pooler
    # the LTE score at layer i moves with off-ramp i's pooler, and with nothing else
    before = ee.statistics_from_features(m, {"cls": t.cls, "labels": torch.zeros(len(MORE))})["scores"]
    with torch.no_grad():
        m.ramps[0].pooler.bias += 1.0
    after = ee.statistics_from_features(m, {"cls": t.cls, "labels": torch.zeros(len(MORE))})["scores"]
    assert not torch.allclose(before[:, 0], after[:, 0]) and torch.equal(before[:, 1:], after[:, 1:])
    # the off-ramps start from the backbone's pooler (DeeBERT's and BERxiT's init_highway_pooler)
    torch.testing.assert_close(m.ramps[0].pooler.weight, m.model.backbone.pooler.dense.weight)
    # PABEE: one pooler, the backbone's, for every exit; the last exit is exactly the backbone's head
    p = ee.EarlyExitBert(DPBert.load(ckpt), shared_pooler=True).eval()
    assert p.ramps[0].pooler is None
    tp = p.trace(b["input_ids"], b["attention_mask"])
    for i in range(p.num_layers):
        torch.testing.assert_close(tp.pooled[:, i], p.model.backbone.pool(tp.cls[:, i]))
    torch.testing.assert_close(tp.logits[:, -1], p.model(**b, mode="full").logits)


def test_early_exit_trainers_keep_the_checkpoint_chosen_on_held_out_data(ckpt, tiny_glue, tmp_path):
    m = ee.EarlyExitBert(DPBert.load(ckpt))
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), m.tokenizer, 64)
    feats = ee.layer_features(m, ds, collator(m.tokenizer), progress=False)
    snapshots, scores = [], iter([1.0, 5.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0])

    def select_fn():
        assert not m.training  # scored in eval mode
        snapshots.append({k: v.clone() for k, v in m.ramps.state_dict().items()})
        return next(scores)

    info = ee.train_offramps_frozen(m, feats, epochs=2, batch_size=8, select_fn=select_fn, evals_per_epoch=2,
                                    progress=False, log_dir=tmp_path)
    assert len(info["evaluations"]) == 4 and info["best_select"] == 5.0
    assert info["best_step"] == info["evaluations"][1]["step"] < info["steps"]
    for k, v in m.ramps.state_dict().items():  # the second evaluation's parameters, not the last step's
        assert torch.equal(v, snapshots[1][k])
    assert any(not torch.equal(snapshots[1][k], snapshots[-1][k]) for k in snapshots[1])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/select_score"] for r in rows if "eval/select_score" in r] == [1.0, 5.0, 2.0, 3.0]


# ---------------------------------------------------------------------- end to end: no choice reads dev
TINY_ARGS = ["--tasks", "sst2", "--stage1-epochs", "1", "--extra-epochs", "1", "--batch-size", "16",
             "--stage3-batch-size", "8", "--samples", "2", "--target-rates", "0.3", "--target-speedups", "1.3,2.0",
             "--kl-layers", "2", "--calibration-iterations", "4", "--latency-samples", "5", "--latency-repeats", "1",
             "--threads", "1", "--evals-per-epoch", "2", "--lr", "1e-6", "--adapt-lr", "1e-6", "--stage3-lr", "1e-6"]
FAKE_COMMIT = "f" * 40


def _run_tiny(tb, glue, ckpt, root, monkeypatch, extra=()):
    monkeypatch.setattr(tb, "pinned_code_commit", lambda: FAKE_COMMIT)
    tb.main(["--data-dir", str(glue), "--backbone", str(ckpt), "--output-dir", str(root / "runs"),
             "--results-dir", str(root / "results"), *TINY_ARGS, *extra])
    return json.loads((root / "results" / "tradeoff.json").read_text())


def _spy_on_load_split(monkeypatch, flip_dev: bool):
    """Patch dpbert_rl.data.load_split and every module's imported name for it: record each call with
    the functions that made it and, with ``flip_dev``, hand out another dev: every label flipped and
    every sentence's words reversed (so that a choice reading dev inputs, not only its labels, changes)."""
    import dpbert_rl.data as data

    real = data.load_split
    calls = []

    def spy(task, split="train", *args, **kw):
        stack = [f.function for f in inspect.stack(0)[1:8]]
        calls.append((split, stack))
        ds = real(task, split, *args, **kw)
        if split == "dev" and flip_dev:
            ds = ds.map(lambda r: {"label": 1 - r["label"], "text_a": " ".join(r["text_a"].split()[::-1])})
        return ds

    for mod in list(sys.modules.values()):
        if getattr(mod, "load_split", None) is real:
            monkeypatch.setattr(mod, "load_split", spy)
    return calls


def make_learnable_sst2(root: Path, n_train: int = 160, n_dev: int = 32) -> Path:
    """An SST-2 folder a tiny model can learn (one sentiment word decides the label), so that its
    settings differ in score and a choice made on the wrong split shows."""
    import random

    rng = random.Random(1)
    pos, neg = ("good", "great", "happy"), ("bad", "terrible", "sad")
    neutral = [w for w in "the a man woman dog cat is was plays runs park house food music".split()]
    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            y = rng.randint(0, 1)
            words = rng.sample(neutral, rng.randint(2, 8)) + [rng.choice(pos if y else neg)]
            rng.shuffle(words)
            lines.append(f"{' '.join(words)}\t{y}")
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_glue_big(tmp_path_factory):
    return make_learnable_sst2(tmp_path_factory.mktemp("glue_tt"))


@pytest.fixture(scope="module")
def spread_ckpt(tmp_path_factory, tiny_glue_big):
    """A tiny random BERT whose head splits the inputs (a random one predicts one class for all, and
    then every choice is a tie): the classifier reads the pooled output's direction of most spread.
    With the backbone's learning rates near 0 in the run, its settings keep different predictions."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tt_spread"), layers=4)
    m = DPBert.load(path).eval()
    ds = tokenize(load_split("sst2", "train", str(tiny_glue_big)), m.tokenizer, 64)
    b = collator(m.tokenizer)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        cls = ee.EarlyExitBert(m).layer_cls(b["input_ids"], b["attention_mask"])[:, -1]
        pooled = m.backbone.pool(cls)
        c = pooled - pooled.mean(0)
        v = torch.linalg.svd(c, full_matrices=False).Vh[0]
        v = v * 2.0 / (c @ v).std()
        head = m.backbone.model.classifier
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1] = v
        head.bias[1] = -(pooled @ v).median()
    m.save(path)
    return path


def _choices(res, root):
    """Every choice a run made: settings (thresholds are in their labels), selection scores, the chosen
    setting of each method, and every training stage's chosen step."""
    out = {}
    for name, m in res["tasks"]["sst2"]["methods"].items():
        out[name] = ([p["setting"] for p in m["points"]], [p.get("select_score") for p in m["points"]],
                     (m.get("chosen") or {}).get("setting"))
    for done in sorted((root / "runs").rglob("DONE")):
        d = json.loads(done.read_text())
        out[str(done.relative_to(root))] = (d["best_step"], d["best_select"])
    for meta in sorted((root / "runs").rglob("early_exit.json")):
        d = json.loads(meta.read_text())
        out[str(meta.relative_to(root))] = (d["best_step"], d["best_select"])
    return out


# the only functions of the benchmark that may touch dev: they score, time or count it
REPORTING = {"dev_run", "exit_dev_run", "time_specs", "timed_tokens", "run_task", "paths_of"}


def _spy_on_dev(monkeypatch) -> list:
    """Record the function that reads the benchmark's dev set (``TaskRun.dev``), at every access."""
    methods = bench("tradeoff_methods")
    real = methods.TaskRun.dev
    readers = []

    def dev(self):
        readers.append(inspect.stack(0)[1].function)
        return real.fget(self)

    monkeypatch.setattr(methods.TaskRun, "dev", property(dev))
    return readers


def test_no_choice_reads_dev_end_to_end(tiny_glue_big, spread_ckpt, tmp_path, monkeypatch):
    ckpt = spread_ckpt
    tb = bench("tradeoff")
    calls = _spy_on_load_split(monkeypatch, flip_dev=False)
    readers = _spy_on_dev(monkeypatch)
    res = _run_tiny(tb, tiny_glue_big, ckpt, tmp_path / "a", monkeypatch)
    # dev is loaded only to be scored (a stage's score_dev_once, the exact stage's score_dev_live) or timed
    # and scored (the benchmark's dev) ...
    dev_calls = [stack for split, stack in calls if split == "dev"]
    assert dev_calls and all({"score_dev_once", "score_dev_live"} & set(s) or s[0] == "dev" for s in dev_calls), \
        dev_calls
    # ... and read only by the functions that score, time or count it: no calibration, no checkpoint choice
    assert readers and set(readers) <= REPORTING, set(readers) - REPORTING
    assert {"fit", "select"} <= {split for split, _ in calls}
    # the results contract
    e = res["tasks"]["sst2"]
    assert res["commit"] == FAKE_COMMIT and res["selection"]["tasks"]["sst2"]["select_examples"] == 16
    assert "self_speedup" in e and isinstance(e["noisy"], bool)
    for name in ("backbone", "dpbert", "dpbert_soft", "deebert", "pabee", "berxit", "layerdrop", "bert_kl",
                 "static_path", "oracle"):
        m = e["methods"][name]
        assert m["points"] and "chosen" in m and m["commit"] == FAKE_COMMIT, name
        for p in m["points"]:
            assert {"setting", "score", "speedup_measured", "speedup_ideal", "layers_executed_mean"} <= set(p)
            if name == "backbone":  # every layer of every input: both ideals are 1
                assert p["speedup_ideal"] == p["speedup_ideal_length_weighted"] == pytest.approx(1.0)
            if name == "bert_kl":  # a fixed depth costs every input alike: both ideals agree
                assert p["speedup_ideal_length_weighted"] == pytest.approx(p["speedup_ideal"])
    for name in ("dpbert", "deebert", "berxit"):  # calibrated to every target speed-up
        assert {p["target"] for p in e["methods"][name]["points"]} >= {1.3, 2.0}
    assert e["methods"]["oracle"]["chosen"] is None
    assert all(p["select_score"] is None for p in e["methods"]["oracle"]["points"])

    # the same run with every dev label flipped: every choice is the same, the dev scores are not
    monkeypatch.undo()
    flipped = _spy_on_load_split(monkeypatch, flip_dev=True)
    res_b = _run_tiny(tb, tiny_glue_big, ckpt, tmp_path / "b", monkeypatch)
    assert any(split == "dev" for split, _ in flipped)
    assert _choices(res, tmp_path / "a") == _choices(res_b, tmp_path / "b")
    dev_a = [p["score"] for m in e["methods"].values() for p in m["points"]]
    dev_b = [p["score"] for m in res_b["tasks"]["sst2"]["methods"].values() for p in m["points"]]
    assert dev_a != dev_b
    assert len(set(dev_a)) >= 3  # the settings differ on dev: a choice made there would show

    # resuming at the same code commit reuses everything; the report and the re-timing read the same files
    monkeypatch.undo()
    again = _run_tiny(tb, tiny_glue_big, ckpt, tmp_path / "a", monkeypatch, ["--methods", "backbone,pabee"])
    assert again["tasks"]["sst2"]["methods"]["pabee"] == e["methods"]["pabee"]
    with pytest.raises(bench("_common").MixedRunError):  # another code commit is refused ...
        monkeypatch.setattr(tb, "pinned_code_commit", lambda: "0" * 40)
        tb.main(["--data-dir", str(tiny_glue_big), "--backbone", str(ckpt), "--output-dir", str(tmp_path / "a" / "runs"),
                 "--results-dir", str(tmp_path / "a" / "results"), *TINY_ARGS, "--methods", "backbone"])
    monkeypatch.setattr(tb, "pinned_code_commit", lambda: FAKE_COMMIT)
    tb.main(["--data-dir", str(tiny_glue_big), "--backbone", str(ckpt), "--output-dir", str(tmp_path / "a" / "runs"),
             "--results-dir", str(tmp_path / "a" / "results"), *TINY_ARGS, "--methods", "backbone,pabee,oracle",
             "--retime", "--batch-sizes", "1,4"])
    (timed,) = (tmp_path / "a" / "results").glob("tradeoff_cpu-*.json")
    t = json.loads(timed.read_text())
    pts = t["tasks"]["sst2"]["methods"]["oracle"]["points"]
    assert t["batch_sizes"] == [1, 4] and all("speedup_measured_b4" in p for p in pts)
    # the same models on the same device take the same paths as in the run that made them
    for m in t["tasks"]["sst2"]["methods"].values():
        for p in m["points"]:
            assert p["layers_executed_mean_device"] == pytest.approx(p["layers_executed_mean_source"], abs=1e-9)
    # a second re-timing of other methods is merged into the device's file, its note kept
    tb.main(["--data-dir", str(tiny_glue_big), "--backbone", str(ckpt), "--output-dir", str(tmp_path / "a" / "runs"),
             "--results-dir", str(tmp_path / "a" / "results"), *TINY_ARGS, "--methods", "dpbert",
             "--retime", "--batch-sizes", "1,4", "--note", "carried as is"])
    t2 = json.loads(timed.read_text())
    assert set(t2["tasks"]["sst2"]["methods"]) == {"backbone", "pabee", "oracle", "dpbert"}
    assert t2["tasks"]["sst2"]["methods"]["pabee"] == t["tasks"]["sst2"]["methods"]["pabee"]
    assert t2["note"] == "carried as is" and len(t2["commands"]) == 2
    # its report: the setting chosen on the selection split, timed at each batch size, and a figure
    dev_md = timed.with_suffix(".md")
    dev_md.unlink()
    tb.main(["--report-only", "--results-dir", str(tmp_path / "a" / "results")])
    md_dev = dev_md.read_text()
    labels = bench("tradeoff_analysis").LABELS
    picks = [(n, res["tasks"]["sst2"]["methods"][n]["chosen"]) for n in ("pabee", "dpbert")]
    assert any(c for _, c in picks)
    for n, c in picks:
        assert f"| {labels[n]} | {c['setting'] if c else '-'} |" in md_dev
    assert "here, batch 4" in md_dev and "carried as is" in md_dev
    assert timed.with_suffix(".png").is_file()
    md = (tmp_path / "a" / "results" / "tradeoff.md").read_text()
    assert "Table 1" in md and "selection split" in md


def test_results_of_another_commit_merge_when_the_methods_code_hash_is_unchanged(tmp_path):
    an = bench("tradeoff_analysis")
    pt = {"setting": "x", "score": 70.0, "speedup_measured": 1.5, "speedup_ideal": 1.5, "layers_executed_mean": 4.0,
          "select_score": 71.0, "select_speedup_ideal": 1.5}
    a, b = "a" * 40, "b" * 40
    old = {"commit": a, "tasks": {"rte": {"metric": "accuracy", "methods": {
        "pabee": {"commit": a, "code_hash": "h-pabee", "points": [pt]},
        "deebert": {"commit": a, "code_hash": "h-old", "points": [pt]}}}}}
    new = {"commit": b, "code_hashes": {"pabee": "h-pabee", "deebert": "h-new", "bert_kl": "h-kl"},
           "tasks": {"rte": {"metric": "accuracy", "methods": {"bert_kl": {"commit": b, "code_hash": "h-kl",
                                                                           "points": [pt]}}}}}
    with pytest.raises(bench("_common").MixedRunError):  # DeeBERT's code changed and it is not re-run
        an.merge(old, new)
    merged = an.merge(old, new, rerun={("rte", "deebert")})  # re-run: its old results are replaced
    assert "mixed_commits" not in merged
    an.write_report(merged, tmp_path)
    md = (tmp_path / "tradeoff.md").read_text()
    assert "| PABEE | 70.00 (1.50x) |" in md  # its code did not change: not marked as another commit's
    assert "| DeeBERT | 70.00 (1.50x) † |" in md  # its code did (here not re-run yet: marked)


def test_a_methods_code_hash_follows_the_code_it_runs(tmp_path, monkeypatch):
    import importlib

    ch = bench("code_hash")
    tm = bench("tradeoff_methods")
    files = {n: {str(p.relative_to(ch.ROOT)) for p in ch.code_files(fn)[1]} for n, fn in tm.RUNNERS.items()}
    assert "dpbert_rl/training/exact.py" in files["dpbert"]  # through exact_stage -> pipeline -> exact
    assert "dpbert_rl/training/exact.py" not in files["deebert"] | files["static_path"]
    assert "dpbert_rl/baselines/exit_training.py" in files["berxit"]
    # a change in a helper the runner calls changes the hash; one in a function it never reaches does not
    mod = tmp_path / "fake_methods.py"
    src = "def helper():\n    return 1\n\ndef other():\n    return 2\n\ndef runner():\n    return helper()\n"
    mod.write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = importlib.import_module("fake_methods")
    before = ch.method_code_hash(fake.runner)
    mod.write_text(src.replace("return 2", "return 3"))
    assert ch.method_code_hash(importlib.reload(fake).runner) == before
    mod.write_text(src.replace("return 1", "return 5"))
    assert ch.method_code_hash(importlib.reload(fake).runner) != before


# ---------------------------------------------------------------------- 12 layers (issue 22)
def test_greedy_static_paths_drop_the_least_useful_layer_first(tmp_path, monkeypatch):
    import dpbert_rl.evaluation.diagnostics as diagnostics
    import dpbert_rl.evaluation.evaluate as evaluate

    methods = bench("tradeoff_methods")
    weight = [5, 1, 7, 3, 9, 2, 8, 4, 6, 0.5, 10, 11]  # what each layer adds to the score
    monkeypatch.setattr(evaluate, "run_dataset", lambda model, ds, collate, bs, mode, actions: {
        "predictions": actions.numpy(), "labels": None})
    monkeypatch.setattr(diagnostics, "task_score", lambda t, acts, labels: float(sum(
        w for w, a in zip(weight, acts.tolist()) if a)))
    run = type("Run", (), {})()
    run.root, run.t, run.calib, run.collate = tmp_path, None, [None] * 8, None
    run.full = type("Full", (), {"num_layers": 12})()
    paths = methods.greedy_static_paths(run)
    order = sorted(range(12), key=lambda i: weight[i])  # the layers by usefulness
    assert sorted(paths) == list(range(2, 12))
    for k, path in paths.items():
        assert sorted(i for i in range(12) if path[i]) == sorted(order[12 - k:]), k  # the k most useful kept
    # cached for a resume, under the size of the subset they were chosen on
    assert json.loads((tmp_path / "greedy_paths_calib8.json").read_text())["4"] == paths[4]
    weight[:] = [1.0] * 12  # a tie: the earlier layer goes first
    run.root = tmp_path / "tie"
    run.root.mkdir()
    assert methods.greedy_static_paths(run)[11] == [0] + [1] * 11


def test_plan_scales_by_the_measured_step_costs_of_both_backbones(tmp_path):
    methods = bench("tradeoff_methods")
    big = make_tiny_checkpoint(tmp_path / "big", layers=12)

    def write(name, per_token, b1, batch_size=16):
        row = {"task": "rte", "batch1_ms_full": b1,
               "variants": {"plain": {"epoch_seconds": per_token * 1000, "epoch_padded_tokens": 1000}}}
        (tmp_path / f"train_step_{name}.json").write_text(json.dumps(
            {"batch_size": batch_size, "max_seq_length": 128, "threads": 2, "rows": [row]}))

    write("minilm", 0.002, 20.0)
    write(big.name, 0.010, 70.0)
    got = methods.backbone_scale(str(big), ["rte", "sst2"], tmp_path)
    assert got["layers"] == 12 and got["step"]["rte"] == pytest.approx(5.0) and got["batch1"]["rte"] == 3.5
    assert "measured" in got["source"]["rte"] and "hidden^2" in got["source"]["sst2"]  # not measured: the rough rule
    write(big.name, 0.010, 70.0, batch_size=32)  # measured otherwise: not comparable
    assert "hidden^2" in methods.backbone_scale(str(big), ["rte"], tmp_path)["source"]["rte"]


def test_bert_kl_depths_follow_the_backbone():
    kl = bench("tradeoff_methods").kl_depths
    assert kl([], 6) == [3, 4, 5] and kl([], 12) == [6, 8, 10] and kl([6, 8], 12) == [6, 8]
    with pytest.raises(ValueError, match=r"\[12\].*\[1, 11\]"):
        kl([12], 12)


def test_plan_at_twelve_layers_uses_sampled_stage3_greedy_paths_and_no_oracle(tiny_glue, tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "t12", layers=12)
    tb = bench("tradeoff")
    tb.main(["--data-dir", str(tiny_glue), "--tasks", "rte", "--plan", "--backbone", str(ckpt),
             "--output-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert "12 layers" in out and "layers x hidden^2" in out
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    row = dict(zip(lines[0], lines[1]))
    assert row["oracle"] == "0" and "static_path" in row
    args = tb.parse_args(["--data-dir", str(tiny_glue), "--backbone", str(ckpt)])
    scale = {"layers": 12, "step": {"rte": 1.0}, "batch1": {"rte": 1.0}}
    plan = bench("tradeoff_methods").plan
    row = plan(args, {"rte": (1000, 200, 200)}, scale)[0]
    assert row["oracle"] == 0 and row["static_path"] > 0
    args.sampled_epochs *= 2
    assert plan(args, {"rte": (1000, 200, 200)}, scale)[0]["dpbert"] > row["dpbert"]  # the sampled stage counts
    args.dpbert_stage3 = "exact"  # a walked tree of 12 layers would cost far more
    assert plan(args, {"rte": (1000, 200, 200)}, scale)[0]["dpbert"] > 10 * row["dpbert"]
    args.dpbert_stage3, args.sampled_epochs = "auto", args.sampled_epochs / 2
    args.planner_start = "fixed-path"  # the elimination per target rate counts
    fixed = plan(args, {"rte": (1000, 200, 200)}, scale)[0]["dpbert"]
    assert fixed > row["dpbert"]
    args.skip_aware = "layerdrop"  # and so does layerdrop's backbone training beside it
    with_layerdrop = plan(args, {"rte": (1000, 200, 200)}, scale)[0]["dpbert"]
    args.skip_aware = "none"
    assert with_layerdrop > plan(args, {"rte": (1000, 200, 200)}, scale)[0]["dpbert"]


def test_the_tradeoff_runs_at_twelve_layers(tiny_glue_big, tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path / "t12", layers=12)
    tb = bench("tradeoff")
    # the tiny arguments, BERT-8L (the last --kl-layers wins)
    res = _run_tiny(tb, tiny_glue_big, ckpt, tmp_path, monkeypatch,
                    ["--methods", "backbone,dpbert,bert_kl,static_path,oracle", "--calibration-samples", "8",
                     "--kl-layers", "8"])
    e = res["tasks"]["sst2"]["methods"]
    root = tmp_path / "runs" / "sst2"
    for sub in ("stage3_sampled_r0.3", "stage3_adapt_r0.3", "stage3_adapt_sampled_r0.3"):
        assert (root / sub / "model" / "DONE").is_file(), sub
    assert [p["setting"] for p in e["bert_kl"]["points"]] == ["BERT-8L"]
    assert "greedy" in e["static_path"]["note"] and len(e["static_path"]["points"]) == 10
    assert list(root.glob("greedy_paths_calib*.json")) and not (root / "paths_select.npz").exists()
    assert e["oracle"]["points"] == [] and "4,095" in e["oracle"]["note"]
    assert e["dpbert"]["points"] and all(p["layers_executed_mean"] <= 12 for p in e["dpbert"]["points"])


def test_the_tradeoffs_dpbert_can_start_on_the_best_fixed_path(tiny_glue_big, tmp_path, monkeypatch):
    """--planner-start fixed-path: per target rate, the backward elimination's path at that rate starts the sampled
    stage 3 (its folders apart: _fixedstart), the start a step-0 candidate; refused where stage 3 is exact."""
    ckpt = make_tiny_checkpoint(tmp_path / "t12", layers=12)
    tb = bench("tradeoff")
    res = _run_tiny(tb, tiny_glue_big, ckpt, tmp_path, monkeypatch,
                    ["--methods", "dpbert", "--calibration-samples", "8", "--planner-start", "fixed-path"])
    root = tmp_path / "runs" / "sst2"
    record = json.loads((root / "stage2_fixed_path_r0.3" / "model" / "selection.json").read_text())
    assert record["layers"] == 8 and record["target_rate"] == 0.3 and record["examples"] == 8
    for sub in ("stage3_sampled_r0.3_fixedstart", "stage3_adapt_r0.3_fixedstart", "stage3_adapt_sampled_r0.3_fixedstart"):
        assert (root / sub / "model" / "DONE").is_file(), sub
    first = json.loads((root / "stage3_sampled_r0.3_fixedstart" / "config.json").read_text())
    assert first["init"].endswith("stage2_fixed_path_r0.3/model") and first["eval_at_start"] is True
    assert not (root / "stage3_sampled_r0.3").exists()  # the stage-2 start's folders are not touched
    assert res["tasks"]["sst2"]["methods"]["dpbert"]["points"]
    with pytest.raises(ValueError, match="planner_start: 'fixed-path' -> 'stage2'"):  # its cached points not reused
        _run_tiny(tb, tiny_glue_big, ckpt, tmp_path, monkeypatch, ["--methods", "dpbert", "--calibration-samples", "8"])
    six = make_tiny_checkpoint(tmp_path / "t6", layers=6)
    args = tb.parse_args(["--data-dir", str(tiny_glue_big), "--backbone", str(six), "--planner-start", "fixed-path",
                          "--output-dir", str(tmp_path / "runs6"), "--tasks", "sst2"])
    methods = bench("tradeoff_methods")
    monkeypatch.setattr(methods, "_stage2", lambda run: pytest.fail("trained before the refusal"))
    with pytest.raises(ValueError, match="starts the sampled stage 3"):
        methods.dpbert_models(types.SimpleNamespace(args=args, s1=six))


def test_cached_points_of_other_settings_are_refused_not_reused():
    tb = bench("tradeoff")
    cached = {"settings": {"latency_samples": 100, "target_rates": [0.3], "seed": 42}}
    same = {"settings": {"latency_samples": 100, "target_rates": [0.3], "seed": 42, "planner_start": "stage2"}}
    assert tb.settings_changed(cached, same) == []  # a setting added since, at the value every earlier run had
    other = {"settings": {**same["settings"], "planner_start": "fixed-path", "latency_samples": 300}}
    assert tb.settings_changed(cached, other) == [("latency_samples", 100, 300), ("planner_start", "stage2", "fixed-path")]


def test_a_results_file_holds_one_backbone_and_its_report_names_it(tmp_path, monkeypatch):
    an = bench("tradeoff_analysis")
    pt = {"setting": "s", "score": 70.0, "speedup_measured": 1.5, "speedup_ideal": 1.5, "layers_executed_mean": 8.0,
          "select_score": 71.0, "select_speedup_ideal": 1.5}

    def res(backbone, task):
        out = {"commit": "a" * 40, "tasks": {task: {"metric": "accuracy", "methods": {"backbone": {"points": [pt]}}}}}
        if backbone:
            out["args"] = {"backbone": backbone}
        return out

    mpnet = an.merge({}, res("mpnet-base", "sst2"))
    an.write_report(mpnet, tmp_path)
    assert (tmp_path / "tradeoff.md").read_text().splitlines()[0].endswith("(MPNet-base, CPU)")
    an.write_report(res(None, "rte"), tmp_path)  # written before the backbone was recorded: MiniLM
    assert (tmp_path / "tradeoff.md").read_text().splitlines()[0].endswith("(MiniLM-L6, CPU)")
    assert an.merge(mpnet, res("mpnet-base", "rte"))["tasks"].keys() == {"sst2", "rte"}
    with pytest.raises(bench("_common").MixedRunError, match="backbone 'mpnet-base' and this run is on 'minilm'"):
        an.merge(mpnet, res("minilm", "rte"), allow_mixed=True)
    with pytest.raises(bench("_common").MixedRunError, match="--results-dir"):
        an.merge(res(None, "rte"), res("mpnet-base", "sst2"))
    # a local checkpoint, spelled relative in one run and absolute in the next: the same backbone
    (tmp_path / "ckpt" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    local = an.merge({}, res("ckpt/model", "rte"))
    assert an.merge(local, res(str(tmp_path / "ckpt" / "model") + "/", "sst2"))["tasks"].keys() == {"rte", "sst2"}
    an.write_report(local, tmp_path)
    assert (tmp_path / "tradeoff.md").read_text().splitlines()[0].endswith("(ckpt/model, CPU)")
