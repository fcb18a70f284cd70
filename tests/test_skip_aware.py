"""A backbone that expects to be skipped (issue 23): the per-path regression recalibration, the ``adapt``
stage (backbone on the planners' paths) and ``layerdrop`` before stage 2, and the pipeline's alternation."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpbert_rl.checks import CheckpointError
from dpbert_rl.model import DPBert
from dpbert_rl.model.objectives import apply_path_calibration, final_reward, fit_path_calibration
from dpbert_rl.pathtree.cache import checkpoint_fingerprint
from dpbert_rl.training import PipelineConfig, TrainConfig, exact_stage_backbone, run_pipeline, train_stage
from dpbert_rl.training.exact import ExactConfig, train_exact
from tests.conftest import load_benchmark, make_tiny_checkpoint, nan_loss_at


@pytest.fixture(scope="module")
def tiny_reg_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("reg_bert"), num_labels=1)


@pytest.fixture(scope="module")
def tiny_reg_dir(tiny_reg_ckpt, tmp_path_factory) -> str:
    torch.manual_seed(0)
    return str(DPBert.from_backbone(str(tiny_reg_ckpt), num_labels=1).save(tmp_path_factory.mktemp("reg_dpbert")))


def pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def test_recalibrated_reward_ranks_the_better_correlated_path_higher():
    """Path A ranks the inputs perfectly but off the label's scale; path B is on scale with noise. STS-B's
    metric prefers A; the raw bounded reward prefers B, the recalibrated one A."""
    y = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 4.5])
    a = 0.4 * y + 2.5                                                   # correlation 1, errors up to 2.5
    b = y + torch.tensor([0.6, -0.6, 0.6, -0.6, 0.6, -0.6, -0.6, 0.6])  # errors 0.6
    assert pearson(a, y) > pearson(b, y)
    preds = torch.stack([a, b], 1)  # (N, 2 paths)
    raw = final_reward("correct", None, preds, y[:, None].expand_as(preds), regression=True).mean(0)
    assert raw[1] > raw[0]  # the per-input error penalises A's scale
    cal = fit_path_calibration(preds, y)
    fixed = apply_path_calibration(preds, torch.arange(2).expand_as(preds), cal)
    rewarded = final_reward("correct", None, fixed, y[:, None].expand_as(preds), regression=True).mean(0)
    assert rewarded[0] > rewarded[1]
    assert torch.allclose(fixed[:, 0], y, atol=1e-5)  # A recalibrated is exact
    assert pearson(fixed[:, 1], y) == pytest.approx(pearson(b, y), abs=1e-6)  # an affine map keeps correlation


def test_fit_path_calibration_is_least_squares_and_handles_a_constant_path():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    x[:, 2] = 1.7  # a path that predicts one value
    y = 2.0 * x[:, 0] - 1.0 + rng.normal(scale=0.1, size=50)
    cal = fit_path_calibration(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    slope, intercept = np.polyfit(x[:, 0], y, 1)
    assert cal[0] == pytest.approx([slope, intercept], rel=1e-5)
    assert cal[2] == pytest.approx([0.0, y.mean()], rel=1e-5)


def test_the_model_applies_each_rows_path_calibration_and_saves_it(tiny_reg_dir, tmp_path):
    model = DPBert.load(tiny_reg_dir).eval()
    L = model.num_layers
    P = 2 ** L
    enc = model.tokenizer(["a b c d", "e f g", "h i"], padding=True, return_tensors="pt")
    acts = torch.tensor([[1] * L, [0] * L, [1, 0] * (L // 2)], dtype=torch.float32)
    with torch.no_grad():
        raw = model(**enc, mode="path", actions=acts).logits.squeeze(-1)
        cal = torch.stack([torch.arange(P, dtype=torch.float32) + 1, torch.arange(P, dtype=torch.float32)], 1)
        model.set_path_calibration(cal)
        got = model(**enc, mode="path", actions=acts).logits.squeeze(-1)
        full = model(**enc, mode="full").logits.squeeze(-1)
    ids = [P - 1, 0, int("10" * (L // 2), 2)]  # layer 1 the most significant bit
    assert torch.allclose(got, torch.tensor([(i + 1) * r + i for i, r in zip(ids, raw.tolist())]), atol=1e-5)
    assert full[0].item() == pytest.approx(P * raw[0].item() + (P - 1), abs=1e-4)  # full mode: the all-ones path
    model.save(tmp_path / "m")
    back = DPBert.load(tmp_path / "m")
    assert torch.equal(back.path_calibration, cal)
    with torch.no_grad():
        assert torch.allclose(back(**enc, mode="path", actions=acts).logits.squeeze(-1), got, atol=1e-5)


@pytest.mark.parametrize("bad, expected", [
    ({"scale": [1.0, 2.0], "shift": [0.0, 0.0]}, "expected (2^"),
    ({"scale": "x"}, "path_calibration"),
    ("nan", "path_calibration"),
])
def test_a_damaged_path_calibration_is_refused_naming_the_file(tiny_reg_dir, tmp_path, bad, expected):
    model = DPBert.load(tiny_reg_dir)
    model.save(tmp_path / "m")
    meta_file = tmp_path / "m" / "dpbert.json"
    meta = json.loads(meta_file.read_text())
    meta["path_calibration"] = bad
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="dpbert.json") as err:
        DPBert.load(tmp_path / "m")
    assert expected in str(err.value)


def test_a_calibration_is_for_regression_heads_only(tiny_model_dir):
    model = DPBert.load(tiny_model_dir)
    with pytest.raises(ValueError, match="regression"):
        model.set_path_calibration(torch.zeros(2 ** model.num_layers, 2))


def test_exact_on_regression_saves_the_calibration_its_reward_used(tiny_reg_dir, tiny_glue, tmp_path):
    kw = dict(task="stsb", data_dir=str(tiny_glue), max_steps=3, progress=False, score_dev=False,
              cache_dir=str(tmp_path / "cache"), target_rate=0.3)
    on = DPBert.load(train_exact(tiny_reg_dir, ExactConfig(output_dir=str(tmp_path / "on"), **kw)))
    off = DPBert.load(train_exact(tiny_reg_dir, ExactConfig(output_dir=str(tmp_path / "off"), path_calibration=False,
                                                            **kw)))
    assert on.path_calibration is not None and on.path_calibration.shape == (2 ** on.num_layers, 2)
    assert off.path_calibration is None
    # fitted on the fit tree: the full path's map is the least-squares line of its outputs on the labels
    from dpbert_rl.pathtree.cache import tree_cache

    fit = tree_cache(off, "stsb", "fit", str(tiny_glue), features="mean", cache_dir=str(tmp_path / "cache"),
                     progress=False)
    full = np.asarray(fit.predictions)[:, -1]
    slope, intercept = np.polyfit(full, np.asarray(fit.labels), 1)
    assert on.path_calibration[-1].tolist() == pytest.approx([slope, intercept], rel=1e-3, abs=1e-4)


class LayerRows:
    """Counts the rows every layer call of a backbone computes."""

    def __init__(self, model, monkeypatch):
        self.rows = 0
        original = model.backbone.layer

        def counted(i, hidden, *args, **kwargs):
            self.rows += hidden.shape[0]
            return original(i, hidden, *args, **kwargs)

        monkeypatch.setattr(model.backbone, "layer", counted)


def _skipping_stage(stage, init, tiny_glue, tmp_path, monkeypatch, **extra):
    """Run ``stage`` for 4 training steps, counting the layer rows of the training forward passes only."""
    import dpbert_rl.training.stages as stages

    counts = {"rows": 0, "executed": 0, "possible": 0}
    original = stages._stage_loss

    def counting(stage_, cfg, model, raw_model, batch, *a, **kw):
        counter = LayerRows(raw_model, monkeypatch)
        loss, out, logs = original(stage_, cfg, model, raw_model, batch, *a, **kw)
        monkeypatch.undo()  # the counter only
        monkeypatch.setattr(stages, "_stage_loss", counting)
        counts["rows"] += counter.rows
        counts["executed"] += int(out.actions.sum())
        counts["possible"] += out.actions.numel()
        return loss, out, logs

    monkeypatch.setattr(stages, "_stage_loss", counting)
    cfg = TrainConfig(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / stage), max_steps=4,
                      batch_size=8, progress=False, max_seq_length=32, **extra)
    out = train_stage(stage, cfg, init=init)
    monkeypatch.undo()
    return out, counts


def test_layerdrop_training_skips_the_dropped_layers(tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    _, c = _skipping_stage("layerdrop", tiny_model_dir, tiny_glue, tmp_path, monkeypatch, layerdrop=0.5)
    assert c["rows"] == c["executed"] < c["possible"]


def test_adapt_trains_the_backbone_on_the_planners_paths_and_skips(tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    model = DPBert.load(tiny_model_dir)
    with torch.no_grad():  # planners that execute about half the layers
        model.planners.bias.fill_(0.0)
        model.planners.weight.zero_()
    model.planners.set_feature_stats(torch.zeros_like(model.planners.feature_mean),
                                     torch.ones_like(model.planners.feature_std))
    init = model.save(tmp_path / "planned")
    out, c = _skipping_stage("adapt", str(init), tiny_glue, tmp_path, monkeypatch, lr=1e-3)
    assert c["rows"] == c["executed"] < c["possible"] and c["executed"] > 0
    adapted = DPBert.load(out)
    before = DPBert.load(init)
    assert torch.equal(adapted.planners.weight, before.planners.weight)  # frozen
    moved = [n for (n, p), q in zip(adapted.backbone.named_parameters(), before.backbone.parameters())
             if not torch.equal(p, q)]
    assert moved  # the backbone learnt
    # the alternation's next exact stage reads a new path tree: the key follows the weights
    assert checkpoint_fingerprint(adapted) != checkpoint_fingerprint(before)
    assert checkpoint_fingerprint(str(out)) != checkpoint_fingerprint(str(init))


def _eager_planners(init_dir, out: Path, bias: float = 3.0) -> str:
    """``init_dir`` with planners whose execute probability varies with the input around sigmoid(bias) (about
    0.95 at 3): their own paths run nearly every layer."""
    model = DPBert.load(init_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        model.planners.weight.normal_(0.0, 0.05)
        model.planners.bias.fill_(bias)
    model.planners.set_feature_stats(torch.zeros_like(model.planners.feature_mean),
                                     torch.ones_like(model.planners.feature_std))
    return str(model.save(out))


def test_sample_at_threshold_draws_around_the_hard_path_at_that_threshold(tiny_model_dir):
    model = DPBert.load(tiny_model_dir).eval()
    with torch.no_grad():  # every planner: p = sigmoid(2) = 0.88
        model.planners.weight.zero_()
        model.planners.bias.fill_(2.0)
    model.planners.set_feature_stats(torch.zeros_like(model.planners.feature_mean),
                                     torch.ones_like(model.planners.feature_std))
    ids = torch.randint(5, 20, (400, 8))
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(0)
    own = model(ids, mask, mode="sample", generator=g).actions.mean().item()
    model.threshold = 1.0 / (1.0 + math.exp(-2.0))  # logit(t) = 2: centred on p = 0.5
    centred = model(ids, mask, mode="sample", generator=g, sample_at_threshold=True).actions.mean().item()
    model.threshold = 1.0 / (1.0 + math.exp(-4.0))  # logit(t) = 4: sigmoid(-2) = 0.12
    shy = model(ids, mask, mode="sample", generator=g, sample_at_threshold=True).actions.mean().item()
    assert abs(own - 0.88) < 0.03 and abs(centred - 0.5) < 0.03 and abs(shy - 0.12) < 0.03
    assert model(ids, mask, mode="sample", generator=g).actions.mean().item() > 0.85  # off: the threshold is not read


@pytest.mark.parametrize("at_rate", [True, False])
def test_adapt_draws_its_paths_at_the_target_rate(at_rate, tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    """Planners that run about 95% of the layers; asked for a skip rate of 0.5, stage adapt draws paths that skip
    about half of them (its own rate without ``adapt_at_rate``), records the knob, and saves the model with the knob
    it came with."""
    init = _eager_planners(tiny_model_dir, tmp_path / "eager")
    out, c = _skipping_stage("adapt", init, tiny_glue, tmp_path, monkeypatch, lr=1e-3, target_rate=0.5,
                             adapt_at_rate=at_rate)
    executed = c["executed"] / c["possible"]
    selection = json.loads((out / "selection.json").read_text())
    assert DPBert.load(out).threshold == DPBert.load(init).threshold == 0.5
    if at_rate:
        knob = selection["adapt_knob"]
        assert knob["before"] == 0.5 and knob["value"] > 0.9  # skipping half needs p >= 0.9 and more
        assert abs(knob["layers"] - 0.5 * DPBert.load(out).num_layers) <= 0.5 and abs(executed - 0.5) < 0.2
        assert abs(selection["select"]["skip_rate"] - 0.5) < 0.25  # scored at that knob
    else:
        assert "adapt_knob" not in selection and executed > 0.8


def test_adapt_resumes_with_the_knob_it_solved(tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    """The knob is solved once: a resumed adapt stage reads it from the checkpoint's state, not from a new
    bisection on its moved backbone."""
    import dpbert_rl.training.stages as stages
    from dpbert_rl.model import budget
    from dpbert_rl.training.config import TrainingError

    init = _eager_planners(tiny_model_dir, tmp_path / "eager")
    cfg = TrainConfig(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / "adapt"), max_steps=4,
                      batch_size=8, progress=False, max_seq_length=32, lr=1e-3, target_rate=0.5, save_steps=2,
                      eval_steps=100)
    real_solve, found = budget.solve_knob, []
    monkeypatch.setattr(budget, "solve_knob", lambda *a, **k: found.append(real_solve(*a, **k)) or found[-1])
    monkeypatch.setattr(stages, "_stage_loss", nan_loss_at(stages._stage_loss, 3))  # crashes after step 2's save
    with pytest.raises(TrainingError):
        train_stage("adapt", cfg, init=init)
    solved = {"before": 0.5, "value": found[0][0], "layers": found[0][1]}
    assert len(found) == 1
    assert json.loads((tmp_path / "adapt" / "checkpoint" / "state.json").read_text())["adapt_knob"] == solved

    def no_search(*a, **k):
        raise AssertionError("the knob was searched for again")

    monkeypatch.setattr(budget, "solve_knob", no_search)
    resumed = stages.StageRun("adapt", cfg, init)
    assert resumed.state["global_step"] == 2 and resumed.raw.threshold == solved["value"]


def test_adapt_needs_trained_planners(tiny_ckpt, tiny_glue, tmp_path):
    from dpbert_rl.training.config import TrainingError

    cfg = TrainConfig(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / "a"), max_steps=1,
                      progress=False, max_seq_length=32)
    with pytest.raises(TrainingError, match="no trained planners"):
        train_stage("adapt", cfg, init=str(tiny_ckpt))


def test_pipeline_alternation_refits_the_planners_on_a_new_tree(tiny_ckpt, tiny_glue, tmp_path, monkeypatch):
    out = tmp_path / "p"
    cfg = PipelineConfig(task="rte", data_dir=str(tiny_glue), backbone=str(tiny_ckpt), output_dir=str(out),
                         max_steps=2, batch_size=8, max_seq_length=32, progress=False, skip_aware="adapt",
                         latency_samples=4, latency_repeats=1)
    report = run_pipeline(cfg)
    first = json.loads((out / "stage3_exact_frozen" / "config.json").read_text())["caches"]["fit"]
    second = json.loads((out / "stage3_exact" / "config.json").read_text())["caches"]["fit"]
    assert first != second
    assert Path(report["checkpoint"]).parent.name == "stage3_exact"  # the final planners, where they always are
    assert json.loads((out / "stage3_adapt" / "config.json").read_text())["init"].endswith("stage3_exact_frozen/model")
    assert json.loads((out / "stage3_exact" / "config.json").read_text())["init"].endswith("stage3_adapt/model")
    assert exact_stage_backbone(out) == out / "stage3_adapt" / "model"  # what replays the final stage's paths

    # the routing benchmark's fixed-path frontier and probe replay the final stage's path trees: they must be the
    # adapted backbone's, not stage 2's (stage 2's backbone was never the one the final planners ran on)
    import sys

    routing = load_benchmark("routing")
    replayed = []

    class Stop(Exception):
        pass

    def fake_tree_cache(model, *args, **kwargs):
        replayed.append(Path(model))
        raise Stop

    monkeypatch.setattr(routing, "tree_cache", fake_tree_cache)
    monkeypatch.setattr(sys, "argv", ["routing.py", "--data-dir", str(tiny_glue), "--tasks", "rte", "--runs",
                                      str(tmp_path), "--results", str(tmp_path / "routing.json")])
    # the run directory is <runs>/<task>: this one is tmp_path/p, so point --runs at a folder holding it as 'rte'
    (tmp_path / "rte").symlink_to(out, target_is_directory=True)
    with pytest.raises(Stop):
        routing.main()
    assert replayed == [tmp_path / "rte" / "stage3_adapt" / "model"]


def test_the_exact_stage_backbone_is_the_init_its_config_records(tmp_path):
    run = tmp_path / "run"
    (run / "stage3_exact").mkdir(parents=True)
    (run / "stage2_planner_init" / "model").mkdir(parents=True)
    (run / "stage2_planner_init" / "model" / "DONE").write_text("{}")
    cfg = run / "stage3_exact" / "config.json"
    # recorded relative to wherever the pipeline ran, or absolute elsewhere: read inside this run all the same
    cfg.write_text(json.dumps({"init": "/somewhere/else/run/stage2_planner_init/model"}))
    assert exact_stage_backbone(run) == run / "stage2_planner_init" / "model"
    cfg.write_text(json.dumps({"init": "runs/x/stage3_adapt/model"}))
    with pytest.raises(FileNotFoundError, match=r"stage3_adapt/model.*is not a finished model"):
        exact_stage_backbone(run)  # an unfinished (or missing) adapted backbone is an error, not stage 2's
    cfg.write_text(json.dumps({"lr": 0.01}))
    with pytest.raises(ValueError, match=r"config.json: records no 'init'"):
        exact_stage_backbone(run)
    with pytest.raises(FileNotFoundError, match="no exact stage 3"):
        exact_stage_backbone(tmp_path / "nothing")


def test_pipeline_refuses_an_unknown_skip_aware_choice():
    with pytest.raises(ValueError, match="skip_aware"):
        PipelineConfig(task="rte", skip_aware="dropout").validate()
    PipelineConfig(task="rte", skip_aware="adapt", stage3="rl").validate()  # 'rl' trains the backbone itself


def test_skip_aware_benchmark_runs_every_candidate_and_names_a_default(tiny_reg_ckpt, tiny_glue, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import skip_aware

    out = tmp_path / "results"
    skip_aware.main(["--data-dir", str(tiny_glue), "--tasks", "stsb", "--backbone", str(tiny_reg_ckpt),
                     "--output-dir", str(tmp_path / "runs"), "--stage1-from", str(tmp_path / "none"),
                     "--results-dir", str(out), "--match-layers", "2,3", "--allow-mixed",
                     # the trade-off benchmark's budget flags, tiny
                     "--stage1-epochs", "0.4", "--extra-epochs", "0.4", "--batch-size", "16", "--evals-per-epoch", "1",
                     "--target-rates", "0.5", "--exact-epochs", "1", "--threads", "1"])
    res = json.loads((out / "skip_aware.json").read_text())
    cands = res["tasks"]["stsb"]["candidates"]
    assert set(cands) == {"none", "layerdrop", "adapt", "none_raw"}  # regression: the reward change alone too
    assert all(c["rates"]["0.5"]["path_calibration"] for n, c in cands.items() if n != "none_raw")
    assert not cands["none_raw"]["rates"]["0.5"]["path_calibration"]
    assert cands["adapt"]["rates"]["0.5"]["model"].endswith("adapt_exact_r0.5/model")
    best, means = skip_aware.choose_default(res)
    assert best in ("none", "layerdrop", "adapt") and set(means) == {"none", "layerdrop", "adapt"}
    text = (out / "skip_aware.md").read_text()
    assert f"Best: **{best}**" in text and "## At the same compute" in text
    # every final model set to the matched compute on the selection split's tree, and scored there
    for c in cands.values():
        m = c["rates"]["0.5"]["matched"]
        assert set(m) == {"2", "3"} and all(0 <= v["layers"] <= 4 and 0 < v["threshold"] < 1 for v in m.values())
    live = DPBert.load(cands["adapt"]["rates"]["0.5"]["model"])
    from dpbert_rl.data import collator, load_split, tokenize
    from dpbert_rl.evaluation.evaluate import evaluate_model
    from dpbert_rl.data import get_task

    m = cands["adapt"]["rates"]["0.5"]["matched"]["3"]
    sel = tokenize(load_split("stsb", "select", str(tiny_glue)), live.tokenizer, 128)
    got = evaluate_model(live, get_task("stsb"), sel, collator(live.tokenizer), mode="hard", threshold=m["threshold"])
    assert got["layers_executed_mean"] == pytest.approx(m["layers"], abs=1e-4)  # the replay is the live model
    assert got["score"] == pytest.approx(m["select_score"], abs=1e-3)


def test_planner_cost_benchmark_times_both_hard_mode_paths(tiny_model_dir, tiny_glue, tmp_path):
    import sys

    from dpbert_rl.model.dpbert import TaskInfo

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import planner_cost

    model = DPBert.load(tiny_model_dir)
    model.task_info = TaskInfo("rte", ["entailment", "not_entailment"], 32)
    with torch.no_grad():  # planners that skip some layers: the ideal speed-up is above 1
        torch.manual_seed(0)
        model.planners.bias.fill_(0.0)
        model.planners.weight.normal_(0.0, 0.05)
    model.planners.set_feature_stats(torch.zeros_like(model.planners.feature_mean),
                                     torch.ones_like(model.planners.feature_std))
    ckpt = model.save(tmp_path / "m")
    out = tmp_path / "planner_cost.json"
    planner_cost.main([str(ckpt), "--data-dir", str(tiny_glue), "--samples", "6", "--repeats", "1", "--threads", "1",
                       "--results", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["task"] == "rte" and row["inputs"] == 6
    assert 0 < row["layers_executed_mean"] < row["num_layers"]
    assert row["speedup_ideal"] == pytest.approx(row["num_layers"] / row["layers_executed_mean"])
    assert all(row[k] > 0 for k in ("full_ms", "reference_ms", "lean_ms"))
    assert "measured/ideal" in out.with_suffix(".md").read_text()
    assert row["threshold"] == model.threshold and 0 < row["speedup_ideal_length_weighted"]
    assert row["lean_ratio_length_weighted"] == pytest.approx(row["lean_speedup"] / row["speedup_ideal_length_weighted"])

    # PATH@THRESHOLD runs the checkpoint at that threshold: at 0 every layer runs
    planner_cost.main([f"{ckpt}@0", "--data-dir", str(tiny_glue), "--samples", "6", "--repeats", "1", "--threads", "1",
                       "--results", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["threshold"] == 0.0 and row["layers_executed_mean"] == row["num_layers"]
    assert row["speedup_ideal"] == row["speedup_ideal_length_weighted"] == 1.0


def test_the_length_weighted_ideal_counts_a_long_input_s_layers_as_more_work():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from planner_cost import split_checkpoint

    from dpbert_rl.evaluation.evaluate import speedup_ideal_length_weighted as length_weighted_ideal

    # two inputs of 10 and 30 tokens, 6 layers: skipping 3 on the short one saves 30 of 240 token-layers
    assert length_weighted_ideal([10, 30], [3, 6], 6) == pytest.approx(240 / 210)
    assert length_weighted_ideal([10, 30], [6, 3], 6) == pytest.approx(240 / 150)  # the long one: more saved
    assert length_weighted_ideal([20, 20], [3, 6], 6) == pytest.approx(6 / 4.5)  # equal lengths: L / mean layers
    assert length_weighted_ideal([20, 20], [0, 0], 6) == math.inf
    assert split_checkpoint("runs/x/model") == ("runs/x/model", None)
    assert split_checkpoint("runs/x@y/model@0.25") == ("runs/x@y/model", 0.25)
    for bad in ("m@high", "m@1.5"):
        with pytest.raises(SystemExit, match="threshold"):
            split_checkpoint(bad)


def test_a_stage_that_trains_the_backbone_drops_an_old_calibration(tiny_reg_dir, tiny_glue, tmp_path):
    kw = dict(task="stsb", data_dir=str(tiny_glue), max_steps=2, progress=False, score_dev=False,
              cache_dir=str(tmp_path / "cache"), target_rate=0.3)
    exact = train_exact(tiny_reg_dir, ExactConfig(output_dir=str(tmp_path / "x"), **kw))
    assert DPBert.load(exact).path_calibration is not None
    cfg = dict(task="stsb", data_dir=str(tiny_glue), max_steps=1, progress=False, max_seq_length=32)
    tuned = train_stage("finetune", TrainConfig(output_dir=str(tmp_path / "f"), **cfg), init=str(exact))
    assert DPBert.load(tuned).path_calibration is None  # the map belonged to the old backbone's paths
    init = train_stage("planner_init", TrainConfig(output_dir=str(tmp_path / "p"), **cfg), init=str(exact))
    assert DPBert.load(init).path_calibration is not None  # the backbone did not move


def test_a_finished_regression_run_from_before_the_calibration_is_not_reused_as_calibrated(tiny_reg_dir, tiny_glue,
                                                                                          tmp_path):
    from dpbert_rl.training.config import TrainingError

    kw = dict(task="stsb", data_dir=str(tiny_glue), max_steps=2, progress=False, score_dev=False,
              cache_dir=str(tmp_path / "cache"), target_rate=0.3, output_dir=str(tmp_path / "x"))
    train_exact(tiny_reg_dir, ExactConfig(path_calibration=False, **kw))
    config = tmp_path / "x" / "config.json"
    saved = json.loads(config.read_text())
    del saved["path_calibration"]  # as an older version wrote it
    config.write_text(json.dumps(saved))
    with pytest.raises(TrainingError, match="without the per-path recalibration"):
        train_exact(tiny_reg_dir, ExactConfig(**kw))
    train_exact(tiny_reg_dir, ExactConfig(path_calibration=False, **kw))  # reused as what it is


def test_the_exact_second_fit_starts_at_the_first_fits_price_and_a_rerun_keeps_the_recorded_one(
        tiny_ckpt, tiny_glue, tmp_path):
    out = tmp_path / "p"
    cfg = PipelineConfig(task="rte", data_dir=str(tiny_glue), backbone=str(tiny_ckpt), output_dir=str(out),
                         max_steps=2, batch_size=8, max_seq_length=32, progress=False, skip_aware="adapt",
                         latency_samples=4, latency_repeats=1)
    run_pipeline(cfg)
    carried = json.loads((out / "stage3_exact_frozen" / "model" / "selection.json").read_text())["select_price"]
    final_cfg = out / "stage3_exact" / "config.json"
    recorded = json.loads(final_cfg.read_text())
    assert recorded["cost"] == carried != cfg.cost
    # a second fit made before the carry (it started at --cost) is reused by a re-run, not refused
    final_cfg.write_text(json.dumps({**recorded, "cost": cfg.cost}))
    done = (out / "stage3_exact" / "model" / "DONE").read_text()
    run_pipeline(cfg)
    assert (out / "stage3_exact" / "model" / "DONE").read_text() == done
