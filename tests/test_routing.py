"""Planners that see the input: features and their statistics, the selection split, bounded rewards, dual
ascent, the leave-one-out baseline, the detach option, the skip-all warning and the routing diagnostics."""

import json
import warnings

import numpy as np
import pytest
import torch

from dpbert_rl.data import carve_selection, collator, get_task, load_split, selection_size, tokenize
from dpbert_rl.evaluation.diagnostics import (fixed_frontier, frontier_margin, frontier_mixture, inspect_features,
                                              paired_bootstrap, score_interval,
                                   linear_probe, skip_all_check)
from dpbert_rl.evaluation.evaluate import distinct_paths, mid_gate_fraction
from dpbert_rl.model import DPBert
from dpbert_rl.model.objectives import DualPrice, advantages, final_reward, normalise_advantages
from dpbert_rl.model.planner import raw_features


def data(model, tiny_glue, split="train", task="rte"):
    return tokenize(load_split(task, split, str(tiny_glue)), model.tokenizer, 128)


# ---------------------------------------------------------------------- features
def test_mean_features_ignore_padding(tiny_model_dir, tiny_glue):
    model = DPBert.load(tiny_model_dir).eval()
    ds = data(model, tiny_glue)
    collate = collator(model.tokenizer)
    lengths = [len(ds[i]["input_ids"]) for i in range(10)]
    short, long_ = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[short] < lengths[long_]
    alone = collate([ds[short]])
    padded = collate([ds[short], ds[long_]])
    with torch.no_grad():
        a = model.embed(alone["input_ids"], alone["attention_mask"], alone["token_type_ids"])
        b = model.embed(padded["input_ids"], padded["attention_mask"], padded["token_type_ids"])
    n = lengths[short]
    by_hand = a.hidden[0, :n].mean(0)  # the mean over the real tokens, computed directly
    assert torch.allclose(raw_features(a.hidden, a.mask, "mean")[0], by_hand, atol=1e-5)
    assert torch.allclose(raw_features(b.hidden, b.mask, "mean")[0], by_hand, atol=1e-5)
    both = raw_features(b.hidden, b.mask, "cls+mean")
    assert both.shape == (2, 64) and torch.equal(both[:, :32], b.hidden[:, 0])


def test_feature_statistics_round_trip_through_a_checkpoint(tiny_model_dir, tiny_glue, tmp_path):
    model = DPBert.load(tiny_model_dir)
    model.planners = type(model.planners)(model.num_layers, model.backbone.hidden_size, features="cls+mean")
    ds = data(model, tiny_glue)
    stats = model.fit_feature_stats(ds, collator(model.tokenizer))
    assert bool(model.planners.stats_set) and stats["features"] == "cls+mean" and len(stats["spread"]) == 4
    # the statistics are those of the inputs: by hand for layer 1 (the embedding output)
    b = collator(model.tokenizer)([ds[i] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        e = model.embed(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        x = raw_features(e.hidden, e.mask, "cls+mean")
    assert torch.allclose(model.planners.feature_mean[0], x.mean(0), atol=1e-5)
    assert torch.allclose(model.planners.feature_std[0][32:], x.std(0)[32:], atol=1e-4)
    with torch.no_grad():
        model.planners.weight.normal_()
    model.save(tmp_path / "ck")
    back = DPBert.load(tmp_path / "ck")
    assert back.planner_features == "cls+mean" and bool(back.planners.stats_set)
    for k, v in model.planners.state_dict().items():
        assert torch.equal(v, back.planners.state_dict()[k]), k
    with torch.no_grad():
        o1 = model.eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="hard")
        o2 = back.eval()(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="hard")
    assert torch.allclose(o1.probs, o2.probs, atol=1e-6)


def test_training_warns_when_the_planner_input_is_constant(tiny_model_dir, tiny_glue):
    from dpbert_rl.evaluation.diagnostics import warn_if_constant

    model = DPBert.load(tiny_model_dir)
    stats = model.fit_feature_stats(data(model, tiny_glue), collator(model.tokenizer))
    # the [CLS] row of the embedding output is the same for every input: position 0, token [CLS]
    assert stats["spread"][0] < 1e-10
    with pytest.warns(UserWarning, match=r"nearly constant across inputs before layer\(s\) \[1"):
        assert warn_if_constant(stats)[0] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_constant({"spread": [0.5, 0.2], "features": "mean", "examples": 9}) == []


def test_inspect_reports_a_flat_cls_and_a_varying_mean(tiny_model_dir, tiny_glue):
    model = DPBert.load(tiny_model_dir)
    report = inspect_features(model, data(model, tiny_glue), collator(model.tokenizer))
    rows = {(r["features"], r["layer"]): r for r in report["rows"]}
    assert report["examples"] == 48 and len(rows) == 3 * 4
    assert rows[("cls", 1)]["spread"] < 1e-10 and rows[("mean", 1)]["spread"] > 1e-3


def test_inspect_cli(tiny_model_dir, tiny_glue, capsys):
    from dpbert_rl.cli import main

    assert main(["inspect", str(tiny_model_dir), "--task", "rte", "--data-dir", str(tiny_glue), "--split", "train",
                 "--samples", "16"]) == 0
    out = capsys.readouterr().out
    assert "| cls | spread" in out and "| mean | probe corr." in out and "layer 4" in out


# ---------------------------------------------------------------------- the selection split
def test_selection_split_is_held_out_seeded_and_capped(tiny_glue):
    fit = load_split("rte", "fit", str(tiny_glue))
    select = load_split("rte", "select", str(tiny_glue))
    train = load_split("rte", "train", str(tiny_glue))
    assert len(select) == 5 and len(fit) + len(select) == len(train) == 48
    assert not set(fit["text_a"]) & set(select["text_a"])
    assert carve_selection(48) == carve_selection(48)
    assert selection_size(100_000) == 2000 and selection_size(2490) == 249


# ---------------------------------------------------------------------- rewards and baselines
def test_bounded_rewards():
    loss = torch.tensor([0.1, 2.0, 0.7])
    preds, labels = torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])
    assert final_reward("correct", loss, preds, labels, False).tolist() == [1.0, 0.0, 1.0]
    assert final_reward("loss", loss, preds, labels, False).tolist() == pytest.approx([-0.1, -2.0, -0.7])
    reg = final_reward("correct", loss, torch.tensor([3.0, 0.0, 5.0]), torch.tensor([3.0, 5.0, 4.0]), True)
    assert reg.tolist() == pytest.approx([1.0, 1 - np.tanh(5.0), 1 - np.tanh(1.0)], abs=1e-6)
    assert ((reg >= 0) & (reg <= 1)).all()
    with pytest.raises(ValueError, match="unknown reward"):
        final_reward("accuracy", loss, preds, labels, False)


def test_leave_one_out_advantage_by_hand():
    # two inputs, K = 3 samples each, L = 2 steps; rows grouped by input
    R = torch.tensor([[1.0, 2.0], [4.0, 5.0], [7.0, 2.0],
                      [0.0, 0.0], [3.0, 6.0], [3.0, 3.0]])
    adv = advantages(R, "loo", samples=3)
    expected = torch.tensor([[1 - 5.5, 2 - 3.5], [4 - 4.0, 5 - 2.0], [7 - 2.5, 2 - 3.5],
                             [0 - 3.0, 0 - 4.5], [3 - 1.5, 6 - 1.5], [3 - 1.5, 3 - 3.0]])
    assert torch.allclose(adv, expected)
    with pytest.raises(ValueError, match="groups of 4"):
        advantages(R, "loo", samples=4)
    with pytest.raises(ValueError, match="at least 2"):
        advantages(R, "loo", samples=1)
    n = normalise_advantages(expected)
    assert abs(float(n.mean())) < 1e-6 and float(n.std()) == pytest.approx(1.0, abs=1e-5)


def test_dual_ascent_reaches_the_target_rate_on_a_toy_problem():
    """Inputs worth v ~ U(0, 1) each; executing costs the price. At a 70% skip target the greedy policy
    must execute 30% of the inputs (those worth most), which needs a price near 0.7."""
    rng = np.random.RandomState(0)
    v = torch.tensor(rng.uniform(0, 1, 500), dtype=torch.float32)
    theta = torch.zeros(500, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=2.0)
    dual = DualPrice(target_rate=0.7, lr=0.05, init=0.0)
    for _ in range(1500):
        p = torch.sigmoid(theta)
        expected_reward = (p * (v - dual.price)).sum()  # exact expectation of (v - price) * a
        opt.zero_grad()
        (-expected_reward).backward()
        opt.step()
        dual.update(float((torch.sigmoid(theta) >= 0.5).float().mean()))
    greedy = (torch.sigmoid(theta) >= 0.5).float()
    assert float(greedy.mean()) == pytest.approx(0.3, abs=0.03)
    assert dual.price == pytest.approx(0.7, abs=0.05)
    assert float(v[greedy.bool()].min()) > 0.6  # it executes the inputs worth most
    with pytest.raises(ValueError):
        DualPrice(0.3, lr=0.0)


def test_dual_price_goes_negative_when_skipping_is_worth_more_than_the_target():
    """Every input is worth executing less than nothing (v < 0): at a price of 0 the policy skips all.
    To execute the target 40% the price must turn negative (a bonus for executing)."""
    v = torch.tensor(np.random.RandomState(1).uniform(-1, 0, 400), dtype=torch.float32)
    theta = torch.zeros(400, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=2.0)
    dual = DualPrice(target_rate=0.6, lr=0.05, init=0.0)
    for _ in range(1500):
        expected_reward = (torch.sigmoid(theta) * (v - dual.price)).sum()
        opt.zero_grad()
        (-expected_reward).backward()
        opt.step()
        dual.update(float((torch.sigmoid(theta) >= 0.5).float().mean()))
    assert float((torch.sigmoid(theta) >= 0.5).float().mean()) == pytest.approx(0.4, abs=0.03)
    assert -0.5 < dual.price < -0.25  # near the 60% quantile of v (-0.4); the policy lags the price a little


def test_detach_keeps_the_policy_gradient_out_of_the_backbone(tiny_model_dir, tiny_glue):
    model = DPBert.load(tiny_model_dir)
    b = collator(model.tokenizer)([data(model, tiny_glue)[i] for i in range(6)])

    def grads(detach: bool):
        model.zero_grad()
        model.detach_planner_input = detach
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="sample",
                    generator=torch.Generator().manual_seed(0))
        (-(out.log_probs.sum())).backward()  # a policy-gradient term alone
        backbone = sum(float(p.grad.abs().sum()) for p in model.backbone.parameters() if p.grad is not None)
        planners = float(model.planners.weight.grad.abs().sum())
        return backbone, planners

    bb, pl = grads(True)
    assert bb == 0.0 and pl > 0
    bb, pl = grads(False)
    assert bb > 0 and pl > 0


def test_warning_when_skipping_everything_wins(tiny_model_dir, tiny_glue):
    model = DPBert.load(tiny_model_dir).eval()
    ds = data(model, tiny_glue)
    with pytest.warns(UserWarning, match="skip every"):
        out = skip_all_check(model, ds, collator(model.tokenizer), "loss", cost=1.0, lam=0.0)
    assert out["skip_all_wins"] and out["full"] == pytest.approx(-4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cost, and a full path that is better: no warning
        fine = skip_all_check(model, ds, collator(model.tokenizer), "loss", cost=0.0, lam=1.0, warn=False)
    assert fine["full"] == pytest.approx(-float(np.mean(_losses(model, ds, torch.ones(4)))), abs=1e-4)


def _losses(model, ds, path):
    from dpbert_rl.evaluation.evaluate import run_dataset

    return run_dataset(model, ds, collator(model.tokenizer), 16, "path", actions=path, with_loss=True)["losses"]


def test_env_warns_when_skipping_everything_wins(tiny_model_dir, tiny_glue):
    from envs.layer_skip import LayerSkipEnv

    with pytest.warns(UserWarning, match="the best policy is to skip"):
        LayerSkipEnv(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, c=1.0, lambda_=0.0)


# ---------------------------------------------------------------------- diagnostics
def test_distinct_paths_and_mid_gates():
    assert distinct_paths(np.array([[1, 0, 1], [1, 0, 1], [0, 0, 1]])) == 2
    assert mid_gate_fraction(np.array([[0.1, 0.5, 0.9, 0.79]])) == pytest.approx(0.5)


def _run(preds, labels):
    P = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    return {"predictions": np.asarray(preds, float), "labels": np.asarray(labels, float), "paths": P}


def test_fixed_frontier_is_the_rising_upper_hull():
    task = get_task("sst2")
    labels = [1, 1, 0, 0, 1, 0, 1, 0, 1, 1]
    # per path (columns 00, 01, 10, 11): accuracy 0.5, 0.6, 0.9, 0.8 on these labels
    cols = [[1, 1, 1, 1, 1, 0, 0, 0, 0, 1],   # 0.5
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],   # ...
            [1, 1, 0, 0, 1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 1, 1, 0, 0]]
    preds = np.array(cols).T
    accs = [(preds[:, p] == labels).mean() for p in range(4)]
    hull = fixed_frontier(task, _run(preds, labels))
    # 0 layers: 00; 1 layer: best of 01/10; 2 layers only if better than the best 1-layer path
    best1 = 1 if accs[1] > accs[2] else 2
    assert hull[0][:2] == (0, 0) and hull[1][:2] == (1, best1)
    assert all(h[2] < g[2] for h, g in zip(hull, hull[1:]))
    assert frontier_mixture(hull, 0.5) == [(0, 0.5), (best1, 0.5)]


def test_fixed_frontier_skips_paths_without_a_score():
    """STS-B: a path whose score is NaN (seen for skip-all on MiniLM: a correlation of near-constant
    predictions) must not become the frontier (it did: every comparison with NaN is False, so the hull
    stopped at that point and the frontier read 0)."""
    task = get_task("stsb")
    labels = np.linspace(0, 5, 12)
    preds = np.stack([np.full(12, np.nan),                  # 00: no score
                      labels + np.sin(np.arange(12)),         # 01
                      labels + 0.5 * np.cos(np.arange(12)),   # 10: better
                      labels + 0.1 * np.arange(12) % 3], 1)   # 11: best
    hull = fixed_frontier(task, _run(preds, labels))
    assert [h[0] for h in hull] == [1, 2] and hull[0][1] == 2 and np.isfinite([h[2] for h in hull]).all()


def test_frontier_margin_and_its_interval():
    task = get_task("sst2")
    rng = np.random.RandomState(1)
    labels = rng.randint(0, 2, 400)
    preds = np.stack([np.where(rng.rand(400) < q, labels, 1 - labels) for q in (0.5, 0.7, 0.7, 0.8)], 1)
    run = _run(preds, labels)
    hull = [(0, 0, 0.5), (1, 1, 0.7), (2, 3, 0.8)]
    learner = labels.copy()  # a perfect learner at 1.5 layers
    m = frontier_margin(task, learner, 1.5, run, hull, n_boot=200)
    by_hand = 100 - (0.5 * (preds[:, 1] == labels).mean() + 0.5 * (preds[:, 3] == labels).mean()) * 100
    assert m["margin"] == pytest.approx(by_hand) and m["score"] == 100
    assert m["margin_ci95"][0] < m["margin"] < m["margin_ci95"][1] and m["margin_ci95"][0] > 0
    same = frontier_margin(task, preds[:, 1], 1.0, run, hull, n_boot=200)  # the frontier itself
    assert same["margin"] == 0 and same["margin_ci95"] == [0.0, 0.0]


def test_score_interval_is_paired_and_brackets_the_gap():
    task = get_task("sst2")
    rng = np.random.RandomState(2)
    labels = rng.randint(0, 2, 300)
    backbone = np.where(rng.rand(300) < 0.9, labels, 1 - labels)
    same = score_interval(task, backbone.copy(), backbone, labels, n_boot=200)
    assert same["score_diff_ci95"] == [0.0, 0.0] and same["score_retained_ci95"] == [1.0, 1.0]
    # DPBERT flips 12 of the backbone's correct answers: 4 points lost on every resample's share of them
    flipped = backbone.copy()
    wrong = np.flatnonzero(backbone == labels)[:12]
    flipped[wrong] = 1 - flipped[wrong]
    ci = score_interval(task, flipped, backbone, labels, n_boot=500)
    gap = 100 * ((flipped == labels).mean() - (backbone == labels).mean())
    assert gap == pytest.approx(-4.0)
    lo, hi = ci["score_diff_ci95"]
    assert lo < gap < hi and hi < 0 and hi - lo < 5  # paired: unpaired scores of ~88% on 300 inputs spread ~7 points
    base = 100 * (backbone == labels).mean()
    assert ci["score_retained_ci95"][0] < (base + gap) / base < ci["score_retained_ci95"][1] < 1
    # the 95% level: the 2.5th and 97.5th percentiles of the paired differences (accuracy, in points)
    draws = paired_bootstrap(lambda i: (100 * (flipped[i] == labels[i]).mean(), 100 * (backbone[i] == labels[i]).mean()),
                             300, 500, seed=0)
    assert ci["score_diff_ci95"] == pytest.approx(np.percentile(draws[:, 0] - draws[:, 1], [2.5, 97.5]))
    with pytest.raises(ValueError, match="one of each per input"):
        score_interval(task, flipped[:10], backbone, labels)
    with pytest.raises(ValueError, match="at least 2 resamples"):
        score_interval(task, flipped, backbone, labels, n_boot=1)
    # CoLA's MCC of a coin-flip reference is 0 or below on some resamples: no ratio, the difference still
    coin = rng.randint(0, 2, 300)
    cola = score_interval(get_task("cola"), labels, coin, labels, n_boot=200)
    assert cola["score_retained_ci95"] is None and cola["score_diff_ci95"][0] > 50
    stsb = score_interval(get_task("stsb"), labels + 0.3 * rng.randn(300), labels + 0.1 * rng.randn(300),
                          labels.astype(float), n_boot=100)  # a correlation on each resample
    assert stsb["score_diff_ci95"][1] < 0 and stsb["bootstrap"] == 100


def test_linear_probe_learns_a_feature_that_gives_the_label(tiny_model_dir, tiny_glue):
    model = DPBert.load(tiny_model_dir)
    ds = data(model, tiny_glue, task="sst2")
    model.fit_feature_stats(ds, collator(model.tokenizer))
    res = linear_probe(model, get_task("sst2"), ds, ds, collator(model.tokenizer), k=2)
    # 32 features for 48 training inputs: a linear read-out fits its own training set far above the majority
    majority = 100 * max(np.mean(ds["labels"]), 1 - np.mean(ds["labels"]))
    assert res["probe_layers"] == 2 and res["probe_score"] > majority + 10


def test_stage3_dual_price_moves_and_resumes(tiny_ckpt, tiny_glue, tmp_path):
    from dpbert_rl.training import TrainConfig, train_stage

    cfg = TrainConfig(task="rte", backbone=str(tiny_ckpt), data_dir=str(tiny_glue), output_dir=str(tmp_path / "rl"),
                      batch_size=4, epochs=1, target_rate=0.5, cost=0.0, dual_lr=0.5, samples=2,
                      progress=False, evals_per_epoch=2, save_steps=3)
    out = train_stage("rl", cfg)
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    prices = [r["charts/layer_price"] for r in rows if "charts/layer_price" in r]
    assert prices and max(prices) > 0.0  # gates start open (p = 0.88 > 0.5 executes): the price rises
    assert DPBert.load(out).planner_features == "mean"


def test_path_indices_first_k_and_random_skipping_read_the_right_paths():
    from dpbert_rl.evaluation.diagnostics import random_skip_score, task_score
    from dpbert_rl.pathtree.oracle import first_k_path, path_indices, paths

    P = paths(4).numpy()
    assert (path_indices(P) == np.arange(16)).all()
    assert [P[first_k_path(k, 4)].tolist() for k in (0, 2, 4)] == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    task = get_task("sst2")
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 2, 50)
    preds = rng.randint(0, 2, (50, 4))
    run = {"predictions": preds, "labels": labels, "paths": np.array([[0, 0], [0, 1], [1, 0], [1, 1]])}
    assert random_skip_score(task, run, 0.0) == task_score(task, preds[:, 3], labels)  # nothing skipped
    assert random_skip_score(task, run, 1.0) == task_score(task, preds[:, 0], labels)  # everything skipped
    half = random_skip_score(task, run, 0.5, draws=200)
    assert abs(half - np.mean([task_score(task, preds[:, p], labels) for p in range(4)])) < 3


def test_evaluate_scores_dpbert_against_the_backbones_own_predictions(tiny_model_dir, tiny_glue, tmp_path,
                                                                      monkeypatch):
    """The interval in ``evaluate_checkpoint``'s report pairs DPBERT's predictions with the full backbone's on the
    same dev inputs, in the same order."""
    from conftest import gated_sst2_model
    from dpbert_rl.evaluation import latency
    from dpbert_rl.evaluation.evaluate import run_dataset

    model = gated_sst2_model(tiny_model_dir)  # one layer of four at its threshold 0.9
    dev = tokenize(load_split("sst2", "dev", str(tiny_glue)), model.tokenizer, 128)
    with torch.no_grad():
        # the random head answers 1 everywhere: centre its margin on the full model's median, so answers differ
        out = model(**{k: v for k, v in collator(model.tokenizer)([dev[i] for i in range(len(dev))]).items()
                       if k != "labels"}, mode="full")
        margin = out.logits[:, 1] - out.logits[:, 0]
        [m for m in model.backbone.model.classifier.modules()
         if isinstance(m, torch.nn.Linear)][-1].bias[1] -= margin.median()
    ckpt = model.save(tmp_path / "m")
    seen = []
    real = latency.score_interval
    monkeypatch.setattr(latency, "score_interval", lambda *a, **k: seen.append(a) or real(*a, **k))
    report = latency.evaluate_checkpoint(str(ckpt), data_dir=str(tiny_glue), repeats=1, latency_samples=2,
                                         progress=False)
    model = DPBert.load(ckpt).eval()
    hard = run_dataset(model, dev, collator(model.tokenizer), mode="hard")
    full = run_dataset(model, dev, collator(model.tokenizer), mode="full")
    assert (hard["predictions"] != full["predictions"]).any()  # one layer and four answer differently here
    (_, preds, reference, labels, *_), = seen
    assert np.array_equal(preds, hard["predictions"]) and np.array_equal(reference, full["predictions"])
    assert np.array_equal(labels, full["labels"])
    again = score_interval(get_task("sst2"), hard["predictions"], full["predictions"], full["labels"])
    assert report["score_diff_ci95"] == again["score_diff_ci95"] != [0.0, 0.0]
