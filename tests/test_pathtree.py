"""The path-tree lab: the cache (built once, reused), exact-expectation planner training (gradient ==
brute force over DPBert paths, a checkpoint DPBert uses), the replay env (== the live frozen env),
and the agents on it."""

import json

import numpy as np
import pytest
import torch

from dpbert_rl import pathtree
from dpbert_rl.pathtree import oracle
from dpbert_rl.data import collator, load_split, tokenize
from dpbert_rl.model import DPBert
from dpbert_rl.model.objectives import final_reward
from dpbert_rl.pathtree import PathTree, expected_return, greedy_paths, tree_cache
from dpbert_rl.training.exact import ExactConfig, train_exact
from envs.layer_skip import BatchedLayerSkipEnv, LayerSkipEnv
from envs.layer_skip_tree import BatchedLayerSkipTreeEnv, LayerSkipTreeEnv


@pytest.fixture()
def layer_calls(monkeypatch):
    """A spy on DPBert.execute: the rows every layer call ran on."""
    calls = []
    original = DPBert.execute

    def spy(self, i, hidden, mask, execute=None):
        calls.append(int(hidden.shape[0] if execute is None else execute.sum()))
        return original(self, i, hidden, mask, execute)

    monkeypatch.setattr(DPBert, "execute", spy)
    return calls


def _trained_like(tiny_model_dir, tiny_glue, features="mean", seed=0):
    """The tiny checkpoint with planners that have statistics and non-trivial weights."""
    model = DPBert.load(tiny_model_dir).eval()
    from dpbert_rl.model.planner import Planners

    model.planners = Planners(model.num_layers, model.backbone.hidden_size, 0.0, features=features)
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), model.tokenizer, 128)
    model.fit_feature_stats(ds, collator(model.tokenizer))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.planners.weight.normal_(0, 0.3)
        model.planners.bias.normal_(0, 1.0)
    return model, ds


# ---------------------------------------------------------------------------------------- the cache
def test_cache_is_built_once_and_reused(tiny_model_dir, tiny_glue, tmp_path, layer_calls):
    kw = dict(task="rte", split="train", data_dir=str(tiny_glue), features="mean", cache_dir=tmp_path,
              progress=False)
    tree = tree_cache(tiny_model_dir, **kw)
    N, L = tree.num_inputs, tree.num_layers
    assert (N, L) == (48, 4) and tree.features.shape == (48, 16, 32) and tree.losses.shape == (48, 16)
    assert sum(layer_calls) == N * (2 ** L - 1)  # 15 rows per input: one per distinct prefix
    (cache,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert {f.name for f in cache.iterdir()} == {"meta.json", *(f"{a}.npy" for a in pathtree.ARRAYS)}
    np.load(cache / "features.npy", allow_pickle=False)  # no pickle anywhere

    layer_calls.clear()
    again = tree_cache(tiny_model_dir, **kw)
    assert layer_calls == [] and np.array_equal(again.features, tree.features)  # reused: no layer ran
    tree_cache(tiny_model_dir, **{**kw, "features": "cls+mean"})  # another key: built
    assert layer_calls
    layer_calls.clear()
    assert tree_cache(tiny_model_dir, **{**kw, "features": "cls"}).features.shape[-1] == 64  # served by cls+mean
    assert layer_calls == []

    import shutil

    for d in tmp_path.iterdir():  # missing (both the mean and the cls+mean caches): rebuilt, to the same content
        shutil.rmtree(d)
    rebuilt = tree_cache(tiny_model_dir, **kw)
    assert layer_calls and np.allclose(rebuilt.features, tree.features) and np.array_equal(rebuilt.labels, tree.labels)


def test_cache_is_keyed_by_the_data_files_content(tiny_model_dir, tiny_glue, tmp_path, layer_calls):
    """A GLUE directory copied elsewhere or restored with new file times keeps its caches; a data file
    whose content changed gets a new cache."""
    import os
    import shutil

    kw = dict(task="rte", split="train", features="mean", cache_dir=tmp_path / "c", progress=False)
    tree_cache(tiny_model_dir, data_dir=str(tiny_glue), **kw)
    copy = shutil.copytree(tiny_glue, tmp_path / "glue_copy")
    f = copy / "RTE" / "train.tsv"
    os.utime(f, ns=(1, 1))  # same bytes, another time and place
    layer_calls.clear()
    tree_cache(tiny_model_dir, data_dir=str(copy), **kw)
    assert layer_calls == []
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:-1]))  # one input fewer
    rebuilt = tree_cache(tiny_model_dir, data_dir=str(copy), **kw)
    assert layer_calls and rebuilt.num_inputs == 47


def test_cache_holds_the_outcome_of_every_path(tiny_model_dir, tiny_glue, tmp_path):
    """Losses and predictions equal the oracle's; the state of node (layer i, prefix s) is the state of
    path s << (L - i), whose raw features equal those of the model's own path execution."""
    from dpbert_rl.model.planner import raw_features

    model = DPBert.load(tiny_model_dir).eval()
    tree = tree_cache(model, "rte", "train", str(tiny_glue), max_samples=6, features="cls+mean", cache_dir=tmp_path,
                      progress=False)
    ds = tokenize(load_split("rte", "train", str(tiny_glue), 6), model.tokenizer, 128)
    run = oracle.enumerate_paths(model, ds, collator(model.tokenizer), batch_size=4, progress=False)
    cached = tree.oracle_run()  # the oracle can read the cache instead
    assert np.array_equal(cached["paths"], run["paths"]) and np.allclose(cached["losses"], run["losses"], atol=1e-5)
    assert np.array_equal(oracle.oracle_choices(cached, False), oracle.oracle_choices(run, False))
    assert np.allclose(tree.losses, run["losses"], atol=1e-5)
    assert np.array_equal(tree.predictions, run["predictions"]) and np.array_equal(tree.labels, run["labels"])
    assert np.array_equal(tree.correct, tree.predictions == tree.labels[:, None])
    b = collator(model.tokenizer)([ds[3]])
    L = model.num_layers
    with torch.no_grad():
        state = model.embed(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        h = state.hidden
        for i, a in enumerate([1, 0, 1]):
            h = model.execute(i, h, state.mask, torch.tensor([bool(a)]))
        x = raw_features(h, state.mask, "cls+mean")[0].numpy()
    assert np.allclose(tree.features[3, 0b101 << (L - 3)], x, atol=1e-5)
    assert np.array_equal(tree.raw("mean")[3], tree.features[3, :, 32:])


# ---------------------------------------------------------------------------------------- exact expectation
@pytest.mark.parametrize("reward", ["loss", "correct"])
def test_exact_gradient_equals_brute_force_over_paths(tiny_model_dir, tiny_glue, tmp_path, reward):
    """E[R] = sum_p prod_i pi(a_i|node) (lambda q(p) - c |p|): its value and its gradient in the planners
    equal a brute-force sum that runs DPBert(mode="path") for every path."""
    c, lam, n = 0.7, 3.0, 5
    model, ds = _trained_like(tiny_model_dir, tiny_glue)
    tree = tree_cache(model, "rte", "train", str(tiny_glue), max_samples=n, features="mean", cache_dir=tmp_path,
                      progress=False)
    L, P = model.num_layers, 2 ** model.num_layers
    # the cache's exact expectation
    q = final_reward(reward, torch.from_numpy(tree.losses), torch.from_numpy(tree.predictions),
                     torch.from_numpy(tree.labels)[:, None].expand(n, P), False)
    raw = torch.from_numpy(np.array(tree.raw("mean")))
    out = expected_return(model.planners, raw, q, c, lam)
    model.planners.zero_grad()
    out["expected_return"].mean().backward()
    exact = {k: v.grad.clone() for k, v in model.planners.named_parameters()}
    # brute force: every path through the live model, probability times return, summed
    b = collator(model.tokenizer)([ds[k] for k in range(n)])
    model.planners.zero_grad()
    total = torch.zeros(n)
    probs = torch.zeros(n, P)
    for p, path in enumerate(oracle.paths(L)):
        o = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], labels=b["labels"], mode="path",
                  actions=path)
        prob = o.log_probs.sum(1).exp()
        q = final_reward(reward, o.per_example_loss, model.predict(o.logits), b["labels"], False)
        ret = lam * q - c * path.sum()
        total = total + prob * ret
        probs[:, p] = prob.detach()
    total.mean().backward()
    assert torch.allclose(out["expected_return"].detach(), total.detach(), atol=1e-4)
    assert torch.allclose(out["probs"].detach(), probs, atol=1e-5) and torch.allclose(probs.sum(1), torch.ones(n))
    for name, param in model.planners.named_parameters():
        assert torch.allclose(exact[name], param.grad, atol=1e-5), name
        assert exact[name].abs().sum() > 0
    # and the greedy path through the tree is the path hard mode takes
    with torch.no_grad():
        hard = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="hard").actions
    assert torch.equal(oracle.paths(L)[greedy_paths(model.planners, raw)], hard)


def test_exact_stage_writes_a_checkpoint_that_dpbert_uses(tiny_model_dir, tiny_glue, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpbert_rl.cli import main

    out, cache = tmp_path / "exact", tmp_path / "cache"
    args = [tiny_model_dir, "--task", "rte", "--data-dir", str(tiny_glue), "--output-dir", str(out),
            "--cache-dir", str(cache), "--max-steps", "12", "--batch-size", "8", "--eval-steps", "4", "--lr", "0.05",
            "--target-rate", "0.5", "--no-progress"]
    assert main(["exact", *args]) == 0
    model_dir = out / "model"
    done = json.loads((model_dir / "DONE").read_text())
    assert done["steps"] == 12 and 0 <= done["dev"]["score"] <= 100
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stage"] == "exact" and set(cfg["caches"]) == {"fit", "select"}  # never a dev cache
    assert {p.name.split("_")[1] for p in cache.iterdir()} == {"fit", "select"}
    tags = set(EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"])
    assert {"charts/expected_return", "charts/layer_price", "losses/policy_loss", "losses/entropy",
            "eval/select_score", "eval/dev_score"} <= tags, tags
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 12
    # a normal checkpoint: DPBert loads it, with trained planners that carry their statistics ...
    trained = DPBert.load(model_dir, require_planners=True).eval()
    start = DPBert.load(tiny_model_dir)
    assert trained.planner_features == "mean" and bool(trained.planners.stats_set)
    assert not torch.allclose(trained.planners.weight, start.planners.weight)
    for (k, v), (_, w) in zip(trained.backbone.state_dict().items(), start.backbone.state_dict().items()):
        assert torch.equal(v, w), k  # the backbone is frozen
    # ... and DPBert's hard mode takes the paths the stage chose on the selection tree
    select = PathTree.load(next(p for p in cache.iterdir() if "_select_" in p.name))
    ds = tokenize(load_split("rte", "select", str(tiny_glue)), trained.tokenizer, 128)
    b = collator(trained.tokenizer)([ds[k] for k in range(len(ds))])
    with torch.no_grad():
        hard = trained(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="hard").actions
    chosen = greedy_paths(trained.planners, torch.from_numpy(np.array(select.raw("mean"))))
    assert torch.equal(oracle.paths(trained.num_layers)[chosen], hard)
    # a finished run is not run again
    capsys.readouterr()
    assert main(["exact", *args]) == 0 and "already complete" in capsys.readouterr().out


def test_exact_training_raises_the_expected_return(tiny_model_dir, tiny_glue, tmp_path):
    """With a fixed layer price the objective is a plain sum: a few exact steps increase it."""
    cfg = ExactConfig(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / "x"),
                      cache_dir=str(tmp_path / "c"), max_steps=30, batch_size=64, lr=0.05, rate_control="none",
                      target_rate=None, cost=0.3, reward="loss", score_dev=False, progress=False,
                      fresh_planners=True)
    model_dir = train_exact(tiny_model_dir, cfg)
    rows = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    returns = [r["charts/expected_return"] for r in rows if "charts/expected_return" in r]
    assert returns[-1] > returns[0]
    assert json.loads((model_dir / "selection.json").read_text())["price"] == 0.3


def test_executed_fraction_counts_layers_or_token_layers():
    from dpbert_rl.training.exact import executed_fraction

    assert executed_fraction([3, 6], 6) == pytest.approx(0.75)
    # an input of twice the tokens counts twice: 3 of 6 layers on the long one, all 6 on the short one
    assert executed_fraction([3, 6], 6, [2.0, 1.0]) == pytest.approx((2 * 3 + 6) / (6 * 3))
    assert executed_fraction([3, 6], 6, [1.0, 1.0]) == executed_fraction([3, 6], 6)


def test_the_token_priced_exact_stage_holds_the_rate_of_token_layers(tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    from dpbert_rl.data import get_task
    from dpbert_rl.training import exact
    from dpbert_rl.training.exact import evaluate_tree, executed_fraction

    prices, real = [], exact.expected_return

    def spy(planners, raw, outcome, cost, lam, index=None):
        prices.append(torch.as_tensor(cost).detach().clone())
        return real(planners, raw, outcome, cost, lam, index)

    monkeypatch.setattr(exact, "expected_return", spy)
    weighted, real_fraction = [], exact.executed_fraction

    def fraction_spy(layers, num_layers, weights=None):  # the dual's rate and the selection rule's
        weighted.append(weights is not None)
        return real_fraction(layers, num_layers, weights)

    monkeypatch.setattr(exact, "executed_fraction", fraction_spy)

    cfg = ExactConfig(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / "x"),
                      cache_dir=str(tmp_path / "c"), max_steps=4, batch_size=8, eval_steps=4, lr=0.01,
                      target_rate=0.05, cost_unit="tokens", score_dev=False, progress=False, fresh_planners=True,
                      planner_init_bias=0.0)  # gates near 0.5: some layers skipped on some inputs
    model_dir = train_exact(tiny_model_dir, cfg)
    model = DPBert.load(model_dir, require_planners=True).eval()
    fit = tokenize(load_split("rte", "fit", str(tiny_glue)), model.tokenizer, 128)
    mean_tokens = float(np.mean([len(x) for x in fit["input_ids"]]))
    assert json.loads((tmp_path / "x" / "config.json").read_text())["fit_mean_tokens"] == pytest.approx(mean_tokens)
    logged = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/token_skip_rate" in r for r in logged)
    # the selection rule's rate is the live model's skipped share of the selection inputs' token-layers
    sel = tokenize(load_split("rte", "select", str(tiny_glue)), model.tokenizer, 128)
    tokens = np.array([len(x) for x in sel["input_ids"]], dtype=float)
    b = collator(model.tokenizer)([sel[k] for k in range(len(sel))])
    with torch.no_grad():
        k = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="hard").actions.sum(1)
    chosen = json.loads((model_dir / "selection.json").read_text())["select"]
    assert chosen["token_skip_rate"] == pytest.approx(1 - executed_fraction(k, model.num_layers, tokens), abs=1e-6)
    assert chosen["token_skip_rate"] != pytest.approx(chosen["skip_rate"])  # the weighting is seen
    # in training, each input pays the price times its tokens over the fit mean
    w_fit = np.array([len(x) for x in fit["input_ids"]]) / mean_tokens
    assert prices and all(c.dim() == 1 for c in prices)
    assert len(weighted) >= len(prices) and all(weighted)  # each step's dual update counts token-layers
    monkeypatch.setattr(exact, "executed_fraction", real_fraction)
    for c in prices:  # one price p per step (the dual's), times each row's factor: c / p is a row of w_fit
        c = c.double().numpy()
        assert any(np.isclose(c / p, w_fit[:, None]).any(0).all() for p in c[0] / w_fit)
    # an input's price is its tokens over the fit mean: the greedy return pays price * (T / T_fit) * layers
    tree = PathTree.load(next(p for p in (tmp_path / "c").iterdir() if "_select_" in p.name))
    w = tokens / mean_tokens
    plain = evaluate_tree(model.planners, tree, get_task("rte"), cfg, 0.7)
    weighted = evaluate_tree(model.planners, tree, get_task("rte"), cfg, 0.7, weights=w)
    assert weighted["greedy_return"] - plain["greedy_return"] == pytest.approx(
        -0.7 * float(np.mean((w - 1) * k.numpy())), abs=1e-5)


def test_exact_config_errors_are_clear(tiny_model_dir, tiny_glue, tmp_path):
    from dpbert_rl.training import PipelineConfig

    with pytest.raises(ValueError, match="cost_unit must be one of"):
        ExactConfig(cost_unit="flops").validate()
    with pytest.raises(ValueError, match="paid per layer"):
        ExactConfig(cost_unit="tokens", budget_range=(0.0, 1.0)).validate()
    with pytest.raises(ValueError, match="is for stage 3 'exact'"):
        PipelineConfig(task="rte", cost_unit="tokens", stage3="sampled").validate()
    with pytest.raises(ValueError, match="needs a target_rate"):
        ExactConfig(target_rate=None).validate()
    with pytest.raises(ValueError, match="unknown reward"):
        ExactConfig(reward="accuracy").validate()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_exact(str(tmp_path / "nothing"), ExactConfig(output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="not a dpbert_rl checkpoint"):
        pathtree.checkpoint_fingerprint(str(tmp_path))


# ---------------------------------------------------------------------------------------- the tree env
OBS_ATOL = 1e-3
RAW_RTOL = 1e-6
"""Observations agree to float32 rounding, not bit for bit: the live env computes its feature statistics
on padded batches (and the vector env its states too), so raw features and their means differ in their
last bits (relative ~1e-7); the standardisation divides by the std, which is tiny where a feature
hardly varies ([CLS] of MiniLM is the same for nearly every input), and that magnifies them: one
float32 step of a mean of 8 with a std of 4e-4 is 1.2e-3 in the observation. So a feature may differ
by OBS_ATOL + RAW_RTOL * |mean| / std (its largest over the layers), the layer part by OBS_ATOL."""


def obs_tolerance(env) -> np.ndarray:
    """Per-feature tolerance ``(F,)`` from the env's standardisation statistics (see RAW_RTOL)."""
    p = env.core.planners
    return OBS_ATOL + RAW_RTOL * (p.feature_mean.abs() / p.feature_std).amax(0).double().numpy()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache directory for the env tests: each (checkpoint, split, features) tree is built once."""
    return str(tmp_path_factory.mktemp("pathtree_cache"))


@pytest.fixture(scope="module")
def stats_model_dir(tiny_model_dir, tiny_glue, tmp_path_factory):
    """A checkpoint whose planners read 'mean' features and carry statistics (as after stage 2)."""
    model, _ = _trained_like(tiny_model_dir, tiny_glue, "mean")
    return str(model.save(tmp_path_factory.mktemp("tiny_stats")))


@pytest.fixture(scope="module")
def tiny_regression_dir(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_reg_bert"), num_labels=1)
    torch.manual_seed(0)
    return str(DPBert.from_backbone(str(ckpt), num_labels=1).save(tmp_path_factory.mktemp("tiny_reg")))


def assert_same_obs(a, b, feature_tol=None):
    """``feature_tol`` (F,): per-feature tolerance (:func:`obs_tolerance`); default OBS_ATOL everywhere."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_obs(a[k], b[k], feature_tol if k == "features" else None)
        return
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    tol = np.full(a.shape[-1], OBS_ATOL)
    if feature_tol is not None:  # a box observation is the features, then the layer part
        tol[: len(feature_tol)] = feature_tol
    excess = np.abs(a.astype(np.float64) - b) - tol
    where = np.unravel_index(excess.argmax(), a.shape)
    assert (excess <= 0).all(), f"difference beyond the tolerance by {excess.max():.3g} at {where}"


def assert_same_info(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is type(b[k]), (k, type(a[k]), type(b[k]))
        if k == "path":
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
        elif isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
        else:
            assert a[k] == b[k], k


def play_both(live, tree, episodes=12, seed=0):
    """Drive both envs with the same seeds, reset options and actions; every transition must agree."""
    rng = np.random.default_rng(seed)
    n = len(live.core.data)
    assert tree.core.N == n
    tol = obs_tolerance(tree)
    for ep in range(episodes):
        kw = {"options": {"index": int(rng.integers(n))}} if ep % 3 == 2 else {"seed": int(rng.integers(1000))}
        if ep % 3 == 1:
            kw = {}  # no seed: the env's own generator goes on
        (lo, li), (to, ti) = live.reset(**kw), tree.reset(**kw)
        assert li == ti
        assert_same_obs(lo, to, tol)
        for _ in range(live.num_layers):
            a = int(rng.integers(2))
            lo, lr, lterm, ltrunc, linfo = live.step(a)
            to, tr, tterm, ttrunc, tinfo = tree.step(a)
            assert_same_obs(lo, to, tol)
            assert type(lr) is type(tr) is float and lr == pytest.approx(tr, abs=1e-5)
            assert (lterm, ltrunc) == (tterm, ttrunc)
            assert_same_info(linfo, tinfo)
        assert tterm and not ttrunc and tinfo["layers_executed"] == int(tinfo["path"].sum())


CASES = [  # (observation, features, reward and its options)
    ("box", "cls", {"reward": "loss"}),
    ("box", "mean", {"reward": "correct", "c": 0.3, "lambda_": 2.0}),
    ("box", "cls+mean", {"reward": "loss", "target_rate": 0.5, "rate_coef": 2.0}),
    ("dict", "cls", {"reward": "correct", "target_rate": 0.25, "rate_coef": 1.0}),
    ("dict", "mean", {"reward": "loss", "c": 0.5, "lambda_": 3.0}),
    ("dict", "cls+mean", {"reward": "correct"}),
]


@pytest.mark.parametrize("observation,features,options", CASES)
def test_tree_env_equals_the_live_frozen_env(tiny_model_dir, tiny_glue, cache_dir, observation, features, options):
    kw = dict(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, observation=observation,
              features=features, **options)
    live, tree = LayerSkipEnv(**kw), LayerSkipTreeEnv(**kw, cache_dir=cache_dir, progress=False)
    assert live.observation_space == tree.observation_space and live.action_space == tree.action_space
    assert torch.allclose(live.observer.feature_std, tree.observer.feature_std, rtol=1e-3)  # stats from the cache
    play_both(live, tree)


def test_tree_env_equals_the_live_env_with_the_models_own_statistics(stats_model_dir, tiny_glue, cache_dir):
    kw = dict(task="rte", data_dir=str(tiny_glue), model=stats_model_dir, split="dev", reward="correct")
    live, tree = LayerSkipEnv(**kw), LayerSkipTreeEnv(**kw, cache_dir=cache_dir, progress=False)
    assert tree.observer.features == "mean"
    assert torch.equal(tree.observer.feature_mean, DPBert.load(stats_model_dir).planners.feature_mean)
    play_both(live, tree, episodes=6)


@pytest.mark.parametrize("reward", ["loss", "correct"])
def test_tree_env_equals_the_live_env_on_regression(tiny_regression_dir, tiny_glue, cache_dir, reward):
    kw = dict(task="stsb", data_dir=str(tiny_glue), model=tiny_regression_dir, features="mean", reward=reward)
    live, tree = LayerSkipEnv(**kw), LayerSkipTreeEnv(**kw, cache_dir=cache_dir, progress=False)
    assert tree.core.regression
    play_both(live, tree, episodes=6)
    rng, tol = np.random.default_rng(0), obs_tolerance(tree)
    for k in range(len(live.core.data)):  # every input once, for the outcome terms of many labels
        (lo, _), (to, _) = live.reset(options={"index": k}), tree.reset(options={"index": k})
        for a in rng.integers(0, 2, size=live.num_layers):
            lo, lr, _, _, linfo = live.step(int(a))
            to, tr, _, _, tinfo = tree.step(int(a))
            assert lr == pytest.approx(tr, abs=1e-5)
        assert_same_obs(lo, to, tol)
        assert_same_info(linfo, tinfo)
    assert 0 < np.mean(tree.tree.correct) < 1  # both kinds of outcome occur


def test_vector_tree_env_yields_the_transitions_of_n_single_tree_envs(tiny_model_dir, tiny_glue, cache_dir):
    import gymnasium as gym

    import envs

    n = 5
    kw = dict(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, features="cls+mean", reward="correct",
              target_rate=0.5, rate_coef=1.0, cache_dir=cache_dir, progress=False)
    vec = gym.make_vec(envs.TREE_ENV_ID, num_envs=n, **kw)
    assert isinstance(vec.unwrapped, BatchedLayerSkipTreeEnv)
    singles = [LayerSkipTreeEnv(**kw) for _ in range(n)]
    live = BatchedLayerSkipEnv(num_envs=n, **{k: v for k, v in kw.items() if k not in ("cache_dir", "progress")})
    rng = np.random.default_rng(1)
    vobs, _ = vec.reset(seed=3)
    for rollout in range(3):  # the third starts from the same-step autoreset of the second
        indices = rng.integers(48, size=n)
        vobs, vinfo = vec.reset(options={"indices": indices})
        assert np.array_equal(vinfo["indices"], indices)
        sobs = [s.reset(options={"index": int(k)})[0] for s, k in zip(singles, indices)]
        lobs, _ = live.reset(options={"indices": indices})
        assert np.allclose(vobs, np.stack(sobs))
        assert_same_obs(vobs, lobs, obs_tolerance(singles[0]))
        actions = rng.integers(0, 2, size=(vec.unwrapped.num_layers, n))
        for step in range(vec.unwrapped.num_layers):
            vobs, vrew, vterm, vtrunc, vinfo = vec.step(actions[step])
            _, lrew, lterm, ltrunc, linfo = live.step(actions[step])
            assert vrew.dtype == lrew.dtype == np.float64 and np.allclose(vrew, lrew, atol=1e-5)
            assert np.array_equal(vterm, lterm) and np.array_equal(vtrunc, ltrunc)
            for j, s in enumerate(singles):
                o, r, term, trunc, info = s.step(int(actions[step, j]))
                assert r == vrew[j] and term == vterm[j] and trunc == vtrunc[j]
                if not term:
                    assert np.array_equal(vobs[j], o)
                    continue
                assert np.array_equal(vinfo["final_obs"][j], o)
                final = {k: v[j] for k, v in vinfo["final_info"].items() if not k.startswith("_")}
                assert_same_info({k: (v if k == "path" else v.item()) for k, v in final.items()}, info)
        # same-step autoreset: fresh episodes at layer 0, ready to step; the infos have the live vector env's layout
        L = vec.unwrapped.num_layers
        assert np.array_equal(vobs[:, -L:], np.eye(L, dtype=np.float32)[np.zeros(n, dtype=int)])
        assert vec.unwrapped.core.i == 0
        assert vinfo.keys() == linfo.keys() and vinfo["final_info"].keys() == linfo["final_info"].keys()
        for k, v in linfo["final_info"].items():
            assert vinfo["final_info"][k].dtype == v.dtype and vinfo["final_info"][k].shape == v.shape, k


def test_tree_env_passes_the_checkers_and_trains_under_sb3(tiny_model_dir, tiny_glue, cache_dir):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env as sb3_check
    from stable_baselines3.common.vec_env import VecMonitor

    import envs
    from envs.sb3 import SB3VecEnv
    from tests.test_envs import assert_checker_is_quiet

    kw = dict(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, cache_dir=cache_dir, progress=False)
    for obs in ("box", "dict"):
        assert_checker_is_quiet(gym_check, LayerSkipTreeEnv(**kw, observation=obs), skip_render_check=True)
    assert_checker_is_quiet(sb3_check, LayerSkipTreeEnv(**kw), warn=True)
    env = gym.make(envs.TREE_ENV_ID, **kw)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    venv = SB3VecEnv(BatchedLayerSkipTreeEnv(num_envs=4, **kw))
    venv.seed(0)
    assert venv.reset().shape == (4, venv.observation_space.shape[0])
    for _ in range(venv.venv.num_layers):
        obs, rew, dones, infos = venv.step(np.ones(4, dtype=int))
    assert dones.all() and all("terminal_observation" in i and i["TimeLimit.truncated"] is False for i in infos)
    monitored = VecMonitor(venv)
    model = PPO("MlpPolicy", monitored, n_steps=8, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=64)
    assert model.num_timesteps >= 64 and monitored.episode_count >= 64 // venv.venv.num_layers


def test_tree_env_errors_are_clear(tiny_model_dir, tiny_glue, cache_dir):
    kw = dict(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, cache_dir=cache_dir, progress=False)
    with pytest.raises(ValueError, match="LayerSkip-v0 for joint mode"):
        LayerSkipTreeEnv(**kw, backbone_mode="joint")
    with pytest.raises(ValueError, match="observation must be"):
        LayerSkipTreeEnv(**kw, observation="image")
    with pytest.raises(ValueError, match="reward must be"):
        LayerSkipTreeEnv(**kw, reward="accuracy")
    env = LayerSkipTreeEnv(**kw)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"0 \(skip\) or 1 \(execute\)"):
        env.step(2)
    with pytest.raises(ValueError, match="expected one action"):
        env.step([1, 0])
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"idx": 1})
    with pytest.raises(ValueError, match="outside"):
        env.reset(options={"index": 10_000})
    env.reset(seed=0)
    for _ in range(env.num_layers):
        env.step(np.int64(1))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(1)
    vec = BatchedLayerSkipTreeEnv(num_envs=4, **kw)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected 4 actions"):
        vec.step(np.ones(3, dtype=int))
    with pytest.raises(TypeError, match="unknown arguments"):
        BatchedLayerSkipTreeEnv(num_envs=2, **kw, colour="red")


# ---------------------------------------------------------------------------------------- agents on the tree
@pytest.mark.parametrize("name", ["reinforce", "ppo", "a2c", "dqn", "recurrent-ppo", "random"])
def test_agents_learn_on_the_tree_env(name, tiny_model_dir, tiny_glue, cache_dir):
    from agents.base import make_agent
    from tests.test_agents import AGENTS

    env = BatchedLayerSkipTreeEnv(num_envs=4, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir,
                                  cache_dir=cache_dir, progress=False)
    agent = make_agent(name, **AGENTS[name])
    seen = []
    agent.learn(env, total_steps=64, callback=seen.append)
    obs, _ = env.reset(seed=1)
    assert set(agent.act(obs).tolist()) <= {0, 1}
    if name != "random":
        assert seen and seen[-1]["steps"] >= 64


@pytest.mark.parametrize("name", ["reinforce", "ppo", "dqn"])
def test_an_agents_greedy_run_on_the_tree_equals_driving_the_model_live(name, tiny_model_dir, tiny_glue, cache_dir):
    from agents.base import make_agent
    from agents.evaluate import agent_forward, tree_run
    from dpbert_rl.data import get_task
    from dpbert_rl.evaluation.evaluate import run_dataset
    from tests.test_agents import AGENTS

    kw = dict(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, cache_dir=cache_dir, progress=False)
    train = BatchedLayerSkipTreeEnv(num_envs=4, **kw)
    agent = make_agent(name, **AGENTS[name])
    agent.learn(train, total_steps=64)
    dev_env = BatchedLayerSkipTreeEnv(num_envs=1, split="dev", **kw)
    run = tree_run(agent, dev_env)
    model = DPBert.load(tiny_model_dir)
    dev = tokenize(load_split(get_task("rte"), "dev", str(tiny_glue)), model.tokenizer, 128)

    def forward(b):
        return agent_forward(model, agent, b["input_ids"], b["attention_mask"], b.get("token_type_ids"),
                             dev_env.observer, with_probs=True)

    live = run_dataset(model, dev, collator(model.tokenizer), 8, forward=forward)
    assert np.array_equal(run["actions"], live["actions"]) and np.array_equal(run["predictions"], live["predictions"])
    assert np.array_equal(run["labels"], live["labels"])
    if name == "dqn":
        assert "probs" not in run and "probs" not in live  # no gate probabilities: the diagnostic is left blank
    else:
        p = run["probs"]
        assert p.shape == run["actions"].shape and np.array_equal(p >= 0.5, run["actions"] == 1)
        np.testing.assert_allclose(live["probs"], p, atol=1e-4)  # the live run records the same gates


def test_reinforce_loo_normalised_entropy_gradient_equals_the_objective(tiny_model_dir, tiny_glue, cache_dir):
    """K episodes per input from the tree env, grouped by input: the agent's planner gradient with the loo
    baseline, normalised advantages and an entropy bonus is that of dpbert_objective on the same paths."""
    from agents.reinforce import ReinforceAgent, _group
    from dpbert_rl.model.objectives import dpbert_objective

    n, K, c, lam, coef = 3, 2, 0.5, 4.0, 0.1
    env = BatchedLayerSkipTreeEnv(num_envs=n, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, c=c,
                                  lambda_=lam, cache_dir=cache_dir, progress=False)
    agent = ReinforceAgent(baseline="loo", samples=K, normalise_advantages=True, entropy_coef=coef)
    agent._build(env.num_layers, env.feature_dim)
    with torch.no_grad():
        agent.planners.weight.normal_(0, 0.5)
    indices = np.array([4, 9, 30])
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(K):  # the same inputs, replayed
        obs, _ = env.reset(options={"indices": indices})
        observations, actions, rewards = [], rng.integers(0, 2, size=(n, env.num_layers)), []
        for i in range(env.num_layers):
            observations.append(obs)
            obs, r, *_ = env.step(actions[:, i])
            rewards.append(r)
        runs.append((observations, actions, np.stack(rewards, 1)))
    observations = [_group([r[0][i] for r in runs]) for i in range(env.num_layers)]
    actions, rewards = _group([r[1] for r in runs]), _group([r[2] for r in runs])
    agent.loss(observations, actions, rewards)["loss"].backward()
    # the trainer's objective on the same inputs (repeat_interleave(K)) and paths
    model = DPBert.load(tiny_model_dir).eval()
    model.planners.load_state_dict(agent.planners.state_dict())
    model.planners.features = env.observer.features  # what the env shows: same features, same statistics
    model.planners.set_feature_stats(env.observer.feature_mean, env.observer.feature_std)
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), model.tokenizer, 128)
    b = collator(model.tokenizer)([ds[int(k)] for k in np.repeat(indices, K)])
    out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], labels=b["labels"], mode="path",
                actions=torch.as_tensor(actions))
    J = dpbert_objective(out.loss, out.log_probs, out.probs, out.actions, out.per_example_loss, c, lam,
                         baseline="loo", samples=K, normalise=True, entropy=out.entropy, entropy_coef=coef)["loss"]
    J.backward()
    assert torch.allclose(agent.planners.weight.grad, model.planners.weight.grad, atol=1e-4)
    assert torch.allclose(agent.planners.bias.grad, model.planners.bias.grad, atol=1e-5)


def test_reinforce_loo_replays_each_batch_of_inputs(tiny_model_dir, tiny_glue, cache_dir):
    from agents.reinforce import ReinforceAgent

    env = BatchedLayerSkipTreeEnv(num_envs=4, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir,
                                  cache_dir=cache_dir, progress=False)
    starts = []
    original = env.core.start

    def spy(indices):
        starts.append(np.array(indices))
        return original(indices)

    env.core.start = spy
    agent = ReinforceAgent(baseline="loo", samples=3, seed=0)
    agent.learn(env, total_steps=2 * 3 * 4 * env.num_layers)  # two updates of 3 x 4 episodes
    # each update: the drawn inputs, then the same inputs twice more (each episode's end also autoresets)
    assert all(np.array_equal(starts[0], starts[k]) for k in (2, 4)) and not np.array_equal(starts[0], starts[5])
    assert all(np.array_equal(starts[5], starts[k]) for k in (7, 9))
    with pytest.raises(ValueError, match="samples must be"):
        ReinforceAgent(baseline="loo", samples=1)


def test_agents_compare_cli_on_the_tree_env(tiny_model_dir, tiny_glue, tmp_path, capsys):
    from dpbert_rl.cli import main

    out = tmp_path / "cmp"
    base = ["--model", tiny_model_dir, "--task", "rte", "--data-dir", str(tiny_glue), "--total-steps", "48",
            "--num-envs", "4", "--latency-samples", "3", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(out)]
    assert main(["agents", "compare", "--agents", "reinforce,always", "--env", "tree", "--features", "mean",
                 "--reward", "correct", *base]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["agent"], r["env"], r["features"], r["reward"]) for r in rows] == [
        ("reinforce", "tree", "mean", "correct"), ("always", "tree", "mean", "correct")]
    assert rows[1]["layers_executed_mean"] == 4.0
    assert [p.name.split("_")[:3] for p in (tmp_path / "cache").iterdir()] == [["rte", "fit", "mean"]]
    capsys.readouterr()
    assert main(["agents", "train", "--agent", "always", "--env", "tree", "--backbone-mode", "joint", *base]) == 2
    assert "--env live" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- on MiniLM
@pytest.mark.integration
def test_tree_env_equals_the_live_env_on_minilm(glue_dir, tmp_path):
    """The packaged MiniLM-L6 (64 paths) on four real RTE inputs: the replay equals the live env."""
    torch.manual_seed(0)
    model = DPBert.from_backbone("minilm", num_labels=2)
    common = dict(task="rte", data_dir=str(glue_dir), split="dev", max_samples=4)
    tree = tree_cache(model, **common, features="cls+mean", cache_dir=tmp_path, progress=False)  # serves both
    assert tree.features.shape == (4, 64, 768)
    for observation, features, reward in (("box", "mean", "loss"), ("dict", "cls", "correct")):
        kw = dict(common, model=model, observation=observation, features=features, reward=reward)
        play_both(LayerSkipEnv(**kw), LayerSkipTreeEnv(**kw, cache_dir=str(tmp_path), progress=False), episodes=6)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_probe_read_from_the_trees_equals_the_live_probe(k, tiny_model_dir, tiny_glue, tmp_path):
    from dpbert_rl.data import get_task
    from dpbert_rl.evaluation.diagnostics import linear_probe, tree_probe

    model, _ = _trained_like(tiny_model_dir, tiny_glue)
    task = get_task("rte")
    fit = tokenize(load_split(task, "fit", str(tiny_glue), 24), model.tokenizer, 128)
    dev = tokenize(load_split(task, "dev", str(tiny_glue)), model.tokenizer, 128)
    trees = {s: tree_cache(model, "rte", s, str(tiny_glue), n, 128, "mean", tmp_path, progress=False)
             for s, n in (("fit", 24), ("dev", None))}
    live = linear_probe(model, task, fit, dev, collator(model.tokenizer), k)
    assert tree_probe(model, task, trees["fit"], trees["dev"], k, max_fit=24) == pytest.approx(live, abs=1e-6)


def test_the_exact_stage_records_the_layer_price_of_the_step_it_chose(tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    """``select_price`` (where a second fit of these planners starts) is the price the chosen evaluation ran at,
    not the final one."""
    from dpbert_rl.training import exact

    seen, real = {}, exact.select_step

    def spy(planners, select, task, cfg, price, index, step, best, weights=None):
        seen[step] = float(price)
        return real(planners, select, task, cfg, price, index, step, best, weights)

    real_eval = exact.evaluate_tree
    monkeypatch.setattr(exact, "select_step", spy)
    monkeypatch.setattr(exact, "evaluate_tree", lambda *a, **kw: {  # the first evaluation scores best
        **real_eval(*a, **kw), "score": 100.0 - len(seen), "skip_rate": 1.0})

    cfg = ExactConfig(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / "x"),
                      cache_dir=str(tmp_path / "c"), max_steps=6, batch_size=8, eval_steps=2, lr=0.01,
                      target_rate=0.3, dual_lr=0.5, score_dev=False, progress=False, fresh_planners=True,
                      planner_init_bias=0.0)
    sel = json.loads((train_exact(tiny_model_dir, cfg) / "selection.json").read_text())
    assert sel["step"] == 2 and sorted(seen) == [2, 4, 6]
    assert sel["select_price"] == pytest.approx(seen[2]) and seen[2] != pytest.approx(sel["price"])
