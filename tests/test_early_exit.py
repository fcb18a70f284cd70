"""Early-exit baselines and the oracle: batched exits equal batch-1, exited rows are not computed,
the exit rules, the losses and targets, training touches only what it should, LayerDrop subsets,
BERT-kL truncation, and the 2^L path enumeration."""

import math

import numpy as np
import pytest
import torch

from dpbert_rl import baselines as ee
from dpbert_rl.pathtree import oracle
from dpbert_rl.data import collator, load_split, tokenize
from dpbert_rl.model import DPBert
from tests.conftest import make_tiny_checkpoint
from tests.test_model import SENTENCES, LayerSpy, batch

MORE = SENTENCES + ["the dog is not happy", "music in the house is very loud and the cat sleeps", "a good film",
                    "the woman runs in the park and the man eats"]


def _spread(x):
    """A direction along which the rows of ``x`` differ most, scaled so projections have std 2."""
    c = x - x.mean(0)
    v = torch.linalg.svd(c, full_matrices=False).Vh[0]
    return v * 2.0 / (c @ v).std()


def exit_model(path, seed=0):
    """An early-exit model whose off-ramps and exit head split a batch of MORE differently at each
    layer (a tiny random BERT gives nearly the same [CLS] for every input; this spreads them)."""
    torch.manual_seed(seed)
    m = ee.EarlyExitBert(DPBert.load(path)).eval()
    b = batch(m.tokenizer, MORE)
    with torch.no_grad():
        _, cls = m.all_exits(b["input_ids"], b["attention_mask"])
        for i, r in enumerate(m.ramps):
            f = torch.tanh(r.pooler(cls[:, i]))
            v = _spread(f)
            r.classifier.weight.zero_()
            r.classifier.bias.zero_()
            r.classifier.weight[-1] = v * (1 + i)
            r.classifier.bias[-1] = -(f @ v * (1 + i)).quantile(0.5) + 0.3 * (i % 2)
        pooled = m.pooled(1, cls[:, 1])  # the LTE head reads what exit 2 reads
        v = _spread(pooled)
        m.exit_head.weight[0] = v
        m.exit_head.bias[0] = -(pooled @ v).quantile(0.5)
    return m


def one_by_one(m, texts, **rule):
    outs = [m(**batch(m.tokenizer, [t]), **rule) for t in texts]
    return torch.cat([o.logits for o in outs]), torch.cat([o.exit_layer for o in outs])


def median_entropy(m, b, layer):
    logits, _ = m.all_exits(b["input_ids"], b["attention_mask"])
    logp = torch.log_softmax(logits[:, layer], -1)
    return float(-(logp.exp() * logp).sum(-1).quantile(0.5).detach())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ee_bert"), layers=4)


@pytest.fixture(scope="module")
def reg_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ee_reg"), num_labels=1, layers=4)


def rules(m, b):
    return [dict(rule="entropy", threshold=median_entropy(m, b, 1)),
            dict(rule="patience", patience=1), dict(rule="patience", patience=2),
            dict(rule="learned", threshold=0.5), dict(rule="fixed", exit_layer=2)]


def test_batched_exits_equal_batch_of_one_for_every_rule(ckpt):
    m = exit_model(ckpt)
    b = batch(m.tokenizer, MORE)
    varied = 0
    for rule in rules(m, b):
        out = m(**b, **rule)
        logits, exits = one_by_one(m, MORE, **rule)
        assert torch.equal(out.exit_layer, exits), rule
        torch.testing.assert_close(out.logits, logits, atol=1e-3, rtol=1e-3)  # the ramps amplify float noise
        # an exit at layer k ran layers 1..k: by hand, from the exits found one input at a time
        prefix = (torch.arange(m.num_layers)[None, :] < exits[:, None]).to(out.actions.dtype)
        assert torch.equal(out.actions, prefix), rule
        varied += len(set(exits.tolist())) > 1
    assert varied >= 2  # the test is meaningful: examples left at different layers


def test_exited_rows_are_dropped_from_later_layers(ckpt):
    m = exit_model(ckpt)
    b = batch(m.tokenizer, MORE)
    rule = dict(rule="entropy", threshold=median_entropy(m, b, 0))
    spy = LayerSpy(m.model)
    try:
        out = m(**b, **rule)
    finally:
        spy.remove()
    for i in range(m.num_layers):
        still = int((out.exit_layer > i).sum())
        assert spy.rows[i] == ([still] if still else []), (i, spy.rows)
        assert int(out.actions[:, i].sum()) == still  # the reported actions count the rows that really ran


def test_patience_zero_runs_every_layer_and_is_the_backbone(ckpt):
    m = exit_model(ckpt)
    b = batch(m.tokenizer, MORE)
    out = m(**b, rule="patience", patience=0)
    assert (out.exit_layer == m.num_layers).all()
    full = m.model(**b, mode="full")
    torch.testing.assert_close(out.logits, full.logits)


def test_patience_counts_consecutive_agreements(ckpt):
    m = exit_model(ckpt)
    b = batch(m.tokenizer, MORE)
    logits, _ = m.all_exits(b["input_ids"], b["attention_mask"])
    preds = logits.argmax(-1)  # (B, L)
    for t in (1, 2):
        out = m(**b, rule="patience", patience=t)
        for row in range(len(MORE)):
            count, expect = 0, m.num_layers
            for i in range(1, m.num_layers - 1):
                count = count + 1 if preds[row, i] == preds[row, i - 1] else 0
                if count >= t:
                    expect = i + 1
                    break
            assert out.exit_layer[row] == expect


def test_entropy_threshold_trades_layers(ckpt):
    m = exit_model(ckpt)
    b = batch(m.tokenizer, MORE)
    layers = [m(**b, rule="entropy", threshold=t).exit_layer.float().mean() for t in (0.0, 0.3, 0.6, 0.7)]
    assert layers[0] == m.num_layers and layers[-1] == 1  # ln 2 = 0.693: everything below it exits at once
    assert all(a >= c for a, c in zip(layers, layers[1:]))


def test_regression_patience_and_learned_exit(reg_ckpt):
    m = exit_model(reg_ckpt)
    b = batch(m.tokenizer, MORE)
    for rule in (dict(rule="patience", patience=1, tolerance=0.5), dict(rule="learned", threshold=0.5)):
        out = m(**b, **rule)
        logits, exits = one_by_one(m, MORE, **rule)
        assert out.logits.shape == (len(MORE), 1)
        assert torch.equal(out.exit_layer, exits)
    with pytest.raises(ValueError, match="regression"):
        m(**b, rule="entropy", threshold=0.1)


@pytest.mark.parametrize("rule, kwargs, message", [
    ("nope", {}, "unknown exit rule"),
    ("entropy", {}, "needs a threshold"),
    ("learned", {}, "needs a threshold"),
    ("patience", {"patience": -1}, "whole number"),
    ("patience", {"patience": 1.5}, "whole number"),
    ("patience", {}, "whole number"),
    ("fixed", {"exit_layer": 0}, "exit_layer"),
    ("fixed", {"exit_layer": 9}, "exit_layer"),
])
def test_bad_exit_rules_are_refused(ckpt, rule, kwargs, message):
    m = exit_model(ckpt)
    with pytest.raises(ValueError, match=message):
        m(**batch(m.tokenizer, ["a dog"]), rule=rule, **kwargs)


def test_checkpoint_round_trip(ckpt, tmp_path):
    m = exit_model(ckpt)
    b = batch(m.tokenizer, MORE)
    m.save(tmp_path / "ee", meta={"kind": "test"})
    back = ee.EarlyExitBert.load(tmp_path / "ee").eval()
    for rule in rules(m, b):
        a, c = m(**b, **rule), back(**b, **rule)
        assert torch.equal(a.exit_layer, c.exit_layer)
        torch.testing.assert_close(a.logits, c.logits)
    with pytest.raises(FileNotFoundError, match="early_exit.safetensors"):
        ee.EarlyExitBert.load(ckpt)


def test_weighted_loss_and_exit_targets(ckpt, reg_ckpt):
    m = exit_model(ckpt)
    logits = torch.randn(5, m.num_layers, 2)
    y = torch.tensor([0, 1, 1, 0, 1])
    per_layer = [torch.nn.functional.cross_entropy(logits[:, i], y) for i in range(m.num_layers)]
    expect = sum((i + 1) * per_layer[i] for i in range(m.num_layers)) / sum(range(1, m.num_layers + 1))
    torch.testing.assert_close(ee.weighted_exit_loss(m, logits, y), expect)
    assert torch.equal(ee.exit_targets(m, logits, y), (logits.argmax(-1) == y[:, None]).float())
    r = exit_model(reg_ckpt)
    vals = torch.tensor([[[1.0], [2.5]], [[4.0], [0.0]]])
    t = ee.exit_targets(r, vals, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(t, 1 - torch.tanh(torch.tensor([[1.0, 0.5], [0.0, 4.0]])))


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module, prefix):
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_training_touches_only_what_each_baseline_trains(ckpt, tiny_glue, tmp_path):
    m = ee.EarlyExitBert(DPBert.load(ckpt))
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), m.tokenizer, 64)
    collate = collator(m.tokenizer)
    feats = ee.layer_features(m, ds, collate, batch_size=16, progress=False)
    assert feats["cls"].shape == (len(ds), m.num_layers, m.model.backbone.hidden_size)

    before = _params(m)
    info = ee.train_offramps_frozen(m, feats, epochs=2, batch_size=16, log_dir=tmp_path / "deebert", progress=False)
    assert info["steps"] == 2 * math.ceil(len(ds) / 16)
    assert _changed(before, m, "ramps.") and not _changed(before, m, "model.") and not _changed(before, m, "exit_head")
    assert (tmp_path / "deebert" / "metrics.jsonl").is_file() and list((tmp_path / "deebert" / "tb").iterdir())

    before = _params(m)
    ee.train_exits_joint(m, ds, collate, epochs=1, batch_size=16, progress=False)
    assert _changed(before, m, "model.backbone") and _changed(before, m, "ramps.")
    assert not _changed(before, m, "exit_head") and not _changed(before, m, "model.planners")

    before = _params(m)
    ee.train_berxit(m, ds, collate, epochs=1, batch_size=16, progress=False)
    assert _changed(before, m, "model.backbone") and _changed(before, m, "ramps.") and _changed(before, m, "exit_head")
    assert not _changed(before, m, "model.planners")


def test_layerdrop_subset():
    assert ee.layerdrop_subset(6, 3) == [0, 1, 0, 1, 0, 1]  # every other, the last kept
    assert ee.layerdrop_subset(6, 6) == [1] * 6
    for L in (4, 6, 12):
        for k in range(1, L + 1):
            s = ee.layerdrop_subset(L, k)
            assert sum(s) == k and s[-1] == 1
    with pytest.raises(ValueError, match="keep"):
        ee.layerdrop_subset(6, 0)


def test_truncate_is_the_first_k_layers(ckpt, tmp_path):
    m = DPBert.load(ckpt).eval()
    b = batch(m.tokenizer, MORE)
    for k in (1, 3):
        t = ee.truncate(m, k).eval()
        assert t.num_layers == k and m.num_layers == 4  # the original is untouched
        want = m(**b, mode="path", actions=torch.tensor([1.0] * k + [0.0] * (4 - k))).logits
        torch.testing.assert_close(t(**b, mode="full").logits, want)
        t.save(tmp_path / f"k{k}")
        back = DPBert.load(tmp_path / f"k{k}")
        assert back.num_layers == k and back.backbone.config.num_hidden_layers == k
    with pytest.raises(ValueError):
        ee.truncate(m, 5)


def test_layerdrop_stage_trains_on_random_layer_subsets(tiny_model_dir, tiny_glue, tmp_path):
    import json

    from dpbert_rl.training import TrainConfig, train_stage

    cfg = TrainConfig(task="sst2", backbone=tiny_model_dir, data_dir=str(tiny_glue), output_dir=str(tmp_path / "ld"),
                      max_steps=6, batch_size=8, layerdrop=0.5, logging_steps=1, progress=False)
    out = train_stage("layerdrop", cfg)
    assert (out / "DONE").is_file()
    rows = [json.loads(x) for x in (tmp_path / "ld" / "metrics.jsonl").read_text().splitlines()]
    executed = [r["charts/layers_executed"] for r in rows if "charts/layers_executed" in r]
    assert executed and min(executed) < 4  # some batches ran without some layers
    with pytest.raises(ValueError, match="layerdrop"):
        train_stage("layerdrop", TrainConfig(task="sst2", layerdrop=1.0, output_dir=str(tmp_path / "bad")))


def test_oracle_enumerates_every_path(ckpt):
    m = DPBert.load(ckpt).eval()
    ds = tokenize(_tiny_ds(m), m.tokenizer, 64)
    res = oracle.enumerate_paths(m, ds, collator(m.tokenizer), batch_size=3, progress=False)
    P = oracle.paths(4)
    assert P.shape == (16, 4) and torch.equal(P[5], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert res["predictions"].shape == (len(ds), 16)
    b = collator(m.tokenizer)([ds[i] for i in range(len(ds))])
    for p in range(16):
        with torch.no_grad():
            out = m(b["input_ids"], b["attention_mask"], mode="path", actions=P[p], labels=b["labels"])
        np.testing.assert_array_equal(res["predictions"][:, p], out.logits.argmax(-1).numpy())
        np.testing.assert_allclose(res["losses"][:, p], out.per_example_loss.numpy(), rtol=1e-4, atol=1e-5)


def _tiny_ds(m):
    from datasets import Dataset

    return Dataset.from_dict({"text_a": MORE, "text_b": [None] * len(MORE), "label": [i % 2 for i in range(len(MORE))]})


def test_oracle_choice_and_best_static_path():
    P = oracle.paths(2).numpy()  # [00, 01, 10, 11]
    run = {"paths": P, "labels": np.array([1.0, 0.0, 1.0]),
           "predictions": np.array([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=float)}
    assert oracle.oracle_choices(run, regression=False).tolist() == [1, 0, 0]  # cheapest right path; none right: 0 layers
    assert oracle.oracle_choices(run, regression=False, max_layers=0).tolist() == [0, 0, 0]
    best = oracle.best_static_paths(run, lambda preds: float((preds == run["labels"]).mean()))
    assert best[0][0] == 0 and best[1][0] == 1 and best[2][0] == 3
    reg = {"paths": P, "labels": np.array([2.0]), "predictions": np.array([[0.0, 1.9, 2.05, 2.0]])}
    assert oracle.oracle_choices(reg, regression=True).tolist() == [3]
    assert oracle.oracle_choices(reg, regression=True, max_layers=1).tolist() == [2]


def _tradeoff_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tradeoff.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("tradeoff_bench", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def test_tradeoff_analysis_front_window_and_target_check():
    tb = _tradeoff_module()
    # selection scores and speed-ups equal to dev's here, so that the choices (made on them) are easy to follow
    pts = [{"setting": s, "score": sc, "speedup_measured": sp, "layers_executed_mean": 6 / sp, "select_score": sc,
            "select_speedup_ideal": sp}
           for s, sc, sp in (("a", 80, 1.0), ("b", 78, 1.4), ("c", 79, 1.35), ("d", 70, 2.2), ("e", 60, 1.8))]
    assert [p["setting"] for p in tb.front(pts)] == ["a", "c", "b", "d"]  # e is beaten by the faster d
    assert tb.best_in_window(pts, 1.3, 1.96)["setting"] == "c"
    assert tb.best_in_window(pts, 3.0, 4.0) is None
    assert tb.envelope_at(pts, 1.5) == 70 and tb.envelope_at(pts, 3.0) is None
    other = [{"setting": "x", "score": 75, "speedup_measured": 1.5, "layers_executed_mean": 4, "select_score": 75,
              "select_speedup_ideal": 1.5}]
    entry = {"methods": {"dpbert": {"points": pts}, "pabee": {"points": other}}}
    (check,) = tb.target_check(entry)
    assert check["against"] == "pabee" and [s for s, _, _ in check["below_at"]] == [1.45, 1.5]
    oracle_pts = [{"score": 60, "layers_executed_mean": 1.0}, {"score": 90, "layers_executed_mean": 5.0}]
    entry["methods"]["oracle"] = {"points": oracle_pts}
    gaps = {g["setting"]: g["gap"] for g in tb.oracle_gap(entry)}
    assert gaps["b"] == pytest.approx(60 + 30 * (6 / 1.4 - 1) / 4 - 78)
