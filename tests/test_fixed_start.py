"""Stage 3 started on the best fixed path (``--planner-start fixed-path``): planners that take one path on every
input, the path found by backward elimination on the selection split, and the pipeline's sampled stage 3
starting from them."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import load_benchmark, make_tiny_checkpoint
from dpbert_rl.data import collator, get_task
from dpbert_rl.evaluation.diagnostics import greedy_fixed_paths
from dpbert_rl.model import DPBert
from dpbert_rl.training import PipelineConfig, run_pipeline
from dpbert_rl.training import fixed_start
from dpbert_rl.model.planner import Planners
from dpbert_rl.training.calibrate import selection_inputs
from dpbert_rl.training.config import TrainingError
from dpbert_rl.training.fixed_start import fixed_path_start, path_layers


def _batch(model, n=6):
    texts = [f"sentence number {i} " + "word " * (i % 4) for i in range(n)]
    return model.tokenizer(texts, padding=True, return_tensors="pt")


def test_fixed_path_planners_take_the_path_on_every_input_and_sample_around_it(tiny_model_dir):
    model = DPBert.load(tiny_model_dir).eval()
    with torch.no_grad():
        model.planners.weight.normal_(0, 1.0)  # planners that read the state, before
    path = [1, 0, 1, 0]
    model.planners.set_fixed_path(path, margin=2.0)
    b = _batch(model)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], mode="hard", threshold=0.5)
        assert out.actions.tolist() == [path] * 6
        assert torch.allclose(out.probs, torch.sigmoid(torch.tensor([2.0, -2.0, 2.0, -2.0])).expand(6, 4))
        g = torch.Generator().manual_seed(0)
        drawn = torch.cat([model(b["input_ids"], b["attention_mask"], mode="sample", generator=g).actions
                           for _ in range(60)])
    follows = (drawn == torch.tensor(path, dtype=drawn.dtype)).float().mean().item()
    assert abs(follows - torch.sigmoid(torch.tensor(2.0)).item()) < 0.05  # 360 draws of 4 gates
    assert model.planners.weight.abs().max().item() == 0.0  # nothing of the state read yet


def test_the_knob_of_fixed_path_planners_is_solved_on_one_input_to_the_same_knob(tiny_model_dir):
    """A fixed path runs the same path on every input, so the rate search reads one input per step (at 12 layers a
    pass over the selection split costs minutes, and a fixed path's rate is a step no step reaches within tol)."""
    from dpbert_rl.model import budget

    model = DPBert.load(tiny_model_dir).eval()
    assert not model.planners.input_independent  # trained planners read their input
    model.planners.set_fixed_path([1, 0, 1, 1], margin=2.0)
    assert model.planners.input_independent
    b = _batch(model, n=6)
    batches = [dict(b), dict(_batch(model, n=5))]
    rows = []
    real = model.forward
    model.forward = lambda input_ids, *a, **k: rows.append(input_ids.shape[0]) or real(input_ids, *a, **k)
    got = budget.solve_knob(model, batches, target_layers=2.5, tol=0.0)
    assert rows and set(rows) == {1}  # one input per step
    rows.clear()
    curve = budget.budget_curve(model, batches, n=5)  # a budget table's curve alike
    assert len(rows) == 5 and set(rows) == {1} and curve[2][0] == pytest.approx(3.0)
    model.forward = real
    every = budget.solve_knob(model, batches, target_layers=2.5, tol=0.0,
                              layers_at=lambda k: budget.mean_layers(model, batches, k))
    assert got == pytest.approx(every) and got[1] == pytest.approx(3.0)  # 3 layers: the path, on every input


def test_planners_that_read_the_price_but_no_input_are_input_independent():
    planners = Planners(4, 8, features="mean", budget=(-0.1, 0.1))
    planners.set_fixed_path([1, 0, 1, 1])
    assert planners.input_independent
    with torch.no_grad():
        planners.budget_bias.fill_(0.5)  # the price moves every input's gates alike
    assert planners.input_independent
    with torch.no_grad():
        planners.budget_weight[2, 0] = 0.1  # the price's effect now depends on the input
    assert not planners.input_independent


@pytest.mark.parametrize("path, margin", [([1, 0, 1], 2.0), ([1, 0, 2, 1], 2.0), ([1, 0, 1, 0], 0.0),
                                          ([1, 0, 1, 0], float("nan"))])
def test_a_bad_fixed_path_or_margin_is_refused(tiny_model_dir, path, margin):
    model = DPBert.load(tiny_model_dir)
    before = model.planners.bias.clone()
    with pytest.raises(ValueError, match="fixed path is 4 decisions|margin must be a positive number"):
        model.planners.set_fixed_path(path, margin)
    assert torch.equal(model.planners.bias, before)


def test_the_path_length_follows_the_target_rate():
    assert path_layers(12, 0.3) == 8 and path_layers(12, 0.35) == 8 and path_layers(6, 0.35) == 4
    assert path_layers(6, 0.99) == 1
    with pytest.raises(ValueError):
        path_layers(12, 1.5)


@pytest.fixture(scope="module")
def tiny12_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny12_fixed"), layers=12)


def _cfg(ckpt, glue, out, **kw):
    kw = {"target_rate": 0.3, "skip_aware": "none", "stage3": "sampled", "planner_start": "fixed-path", **kw}
    return PipelineConfig(task="rte", backbone=str(ckpt), data_dir=str(glue), output_dir=str(out), progress=False,
                          max_steps=2, batch_size=8, eval_batch_size=16, latency_samples=4, latency_repeats=1,
                          logging_steps=1, **kw)


def test_the_pipeline_starts_sampled_stage3_on_the_best_fixed_path_and_reuses_it(tiny12_ckpt, tiny_glue, tmp_path,
                                                                                 monkeypatch):
    cfg = _cfg(tiny12_ckpt, tiny_glue, tmp_path / "p")
    report = run_pipeline(cfg)
    start = tmp_path / "p" / "stage2_fixed_path" / "model"
    record = json.loads((start / "selection.json").read_text())
    assert record["layers"] == 8 and sum(record["path"]) == 8 and len(record["path"]) == 12
    # the report (and so the benchmark's row) carries the start: its path and both selection scores
    assert report["fixed_path_start"] == {k: record[k] for k in ("path", "layers", "select_score",
                                                                 "full_select_score", "examples")}
    # the path is the backward elimination's on the selection split, with stage 2's backbone
    s2 = DPBert.load(tmp_path / "p" / "stage2_planner_init" / "model").eval()
    ds = selection_inputs(s2, cfg, cfg.calibration_samples)
    found = greedy_fixed_paths(s2, get_task("rte"), ds, collator(s2.tokenizer), 16, min_layers=8)
    assert record["path"] == found[8][0] and record["select_score"] == pytest.approx(found[8][1])
    # stage 2's feature statistics kept, the decisions those of the path on every input
    model = DPBert.load(start).eval()
    assert torch.equal(model.planners.feature_mean, s2.planners.feature_mean)
    b = _batch(model)
    with torch.no_grad():
        assert model(b["input_ids"], b["attention_mask"], mode="hard").actions.tolist() == [record["path"]] * 6
    # stage 3 started there and kept those planners: two Adam steps at lr 1e-3 leave every bias's sign
    s3 = json.loads((tmp_path / "p" / "stage3_sampled" / "config.json").read_text())
    assert s3["init"].endswith("stage2_fixed_path/model")
    trained = DPBert.load(tmp_path / "p" / "stage3_sampled" / "model").planners
    assert ((trained.bias > 0).long().tolist() == record["path"]) and trained.bias.abs().min().item() > 1.9
    assert torch.equal(trained.feature_mean, s2.planners.feature_mean)
    assert s3["eval_at_start"] is True  # the start itself is one of stage 3's candidates (step 0)
    evals = [json.loads(x) for x in (tmp_path / "p" / "stage3_sampled" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in evals if "eval/select_score" in r)
    assert first["step"] == 0 and first["eval/layers_executed"] == pytest.approx(8.0)
    assert (start / "DONE").is_file() and (tmp_path / "p" / "stage2_fixed_path" / "fixed_paths.npz").is_file()
    # a re-run reuses the finished start: no elimination again
    monkeypatch.setattr(fixed_start, "greedy_fixed_paths", lambda *a, **k: pytest.fail("searched again"))
    run_pipeline(cfg)
    assert json.loads((start / "selection.json").read_text()) == record


def test_a_fixed_path_start_without_feature_statistics_is_refused(tiny12_ckpt, tiny_glue, tmp_path):
    raw = tmp_path / "raw"
    DPBert.from_backbone(str(tiny12_ckpt)).save(raw)  # planners never fitted
    cfg = _cfg(tiny12_ckpt, tiny_glue, tmp_path / "p")
    with pytest.raises(ValueError, match="no feature statistics; start from a stage-2 model"):
        fixed_path_start(cfg, raw, tmp_path / "start")
    assert not (tmp_path / "start" / "model").exists()


@pytest.mark.parametrize("kw, match", [({"target_rate": None}, "target_rate None"),
                                       ({"stage3": "rl"}, "stage3 'rl'"),
                                       ({"planner_start": "best"}, "must be one of")])
def test_a_fixed_path_start_without_a_rate_or_for_another_stage3_is_refused(tiny12_ckpt, tiny_glue, tmp_path, kw,
                                                                             match):
    cfg = _cfg(tiny12_ckpt, tiny_glue, tmp_path / "p", **kw)
    with pytest.raises(ValueError, match=match):
        run_pipeline(cfg)
    assert not (tmp_path / "p" / "stage1_finetune").exists()


def test_with_adapt_the_first_fit_starts_on_the_path_and_the_second_continues_it(tiny12_ckpt, tiny_glue, tmp_path):
    run_pipeline(_cfg(tiny12_ckpt, tiny_glue, tmp_path / "p", skip_aware="adapt"))
    first = json.loads((tmp_path / "p" / "stage3_sampled_frozen" / "config.json").read_text())
    second = json.loads((tmp_path / "p" / "stage3_sampled" / "config.json").read_text())
    assert first["init"].endswith("stage2_fixed_path/model") and second["init"].endswith("stage3_adapt/model")


def _stage2_like(ckpt, cfg, path):
    """A tiny 12-layer DPBERT whose planners have feature statistics (as stage 2 leaves them), saved at ``path``."""
    model = DPBert.from_backbone(str(ckpt))
    model.fit_feature_stats(selection_inputs(model, cfg, 8), collator(model.tokenizer), 16)
    model.save(path)
    return path


def test_a_finished_start_made_with_other_settings_is_refused_not_reused(tiny12_ckpt, tiny_glue, tmp_path):
    cfg = _cfg(tiny12_ckpt, tiny_glue, tmp_path / "p")
    s2 = _stage2_like(tiny12_ckpt, cfg, tmp_path / "s2")
    out = fixed_path_start(cfg, s2, tmp_path / "start", samples=8)
    assert json.loads((out / "DONE").read_text())["requested_examples"] == 8
    assert fixed_path_start(cfg, s2, tmp_path / "start", samples=8) == out  # the same settings: reused
    with pytest.raises(TrainingError, match=r"other settings \(requested_examples: 8 -> 4\)"):
        fixed_path_start(cfg, s2, tmp_path / "start", samples=4)


def test_a_six_layer_auto_run_or_a_bias_of_zero_is_refused_before_stage_1(tiny_glue, tmp_path):
    six = make_tiny_checkpoint(tmp_path / "six", layers=6)
    with pytest.raises(ValueError, match="stage3 'exact'"):  # auto resolves to exact up to 8 layers
        run_pipeline(_cfg(six, tiny_glue, tmp_path / "p", stage3="auto"))
    with pytest.raises(ValueError, match="planner-init-bias.*above 0"):
        run_pipeline(_cfg(six, tiny_glue, tmp_path / "p", planner_init_bias=0.0))
    assert not (tmp_path / "p" / "stage1_finetune").exists()


def test_the_benchmark_plans_the_elimination_only_where_it_runs(tiny12_ckpt, tiny_glue, tmp_path, capsys):
    pipeline = load_benchmark("pipeline")

    def plan(*extra):
        pipeline.main(["--data-dir", str(tiny_glue), "--tasks", "rte", "--plan", "--max-train-samples", "20",
                       "--results", str(tmp_path / "pipeline.json"), *extra])
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        return dict(zip(*[[c.strip() for c in line.split("|")[1:-1]] for line in lines[:2]]))

    fixed = plan("--backbone", str(tiny12_ckpt), "--planner-start", "fixed-path")
    assert "fixed_path_start" in fixed and float(fixed["total"]) >= float(fixed["fixed_path_start"])
    assert "fixed_path_start" not in plan("--backbone", str(tiny12_ckpt))
    six = make_tiny_checkpoint(tmp_path / "six", layers=6)  # stage 3 exact: no start to plan
    assert "fixed_path_start" not in plan("--backbone", str(six), "--planner-start", "fixed-path")


def test_a_stage_that_only_drifts_off_its_start_keeps_the_start(tiny12_ckpt, tiny_glue, tmp_path, monkeypatch):
    """With eval_at_start, step 0 is a candidate: a sampled stage whose every later evaluation scores lower chooses
    the starting planners (without it, a later step)."""
    from dpbert_rl.training import TrainConfig, train_stage
    from dpbert_rl.training import stages

    s2 = tmp_path / "s2"
    model = DPBert.from_backbone(str(tiny12_ckpt))
    cfg = TrainConfig(task="rte", backbone=str(tiny12_ckpt), data_dir=str(tiny_glue), progress=False, max_steps=2,
                      batch_size=8, eval_batch_size=16, eval_steps=1, logging_steps=1, target_rate=0.3,
                      planner_features="cls")
    ds = selection_inputs(model, cfg, 8)
    model.fit_feature_stats(ds, collator(model.tokenizer), 16)
    model.planners.set_fixed_path([1] * 8 + [0] * 4)
    model.save(s2)
    real = stages.evaluate_model
    scores = iter([90.0, 80.0, 70.0, 60.0, 50.0, 40.0])  # the start, then steps 1 and 2: each worse

    def falling(*a, **k):
        return {**real(*a, **k), "score": next(scores)}

    monkeypatch.setattr(stages, "evaluate_model", falling)
    kept = train_stage("sampled", replace(cfg, output_dir=str(tmp_path / "on"), eval_at_start=True), init=str(s2))
    assert json.loads((kept / "DONE").read_text())["best_step"] == 0
    assert (DPBert.load(kept).planners.bias > 0).long().tolist() == [1] * 8 + [0] * 4
    scores = iter([80.0, 70.0, 60.0])
    later = train_stage("sampled", replace(cfg, output_dir=str(tmp_path / "off")), init=str(s2))
    assert json.loads((later / "DONE").read_text())["best_step"] == 1


def test_a_stopped_start_resumes_from_its_cache_to_the_same_path(tiny12_ckpt, tiny_glue, tmp_path, monkeypatch):
    """The elimination's scored paths are kept as it goes: started again (the model not yet written), it scores no
    path afresh and finds the same path with the same selection score."""
    import shutil

    from dpbert_rl.evaluation import evaluate

    cfg = _cfg(tiny12_ckpt, tiny_glue, tmp_path / "p")
    s2 = _stage2_like(tiny12_ckpt, cfg, tmp_path / "s2")
    first = json.loads((fixed_path_start(cfg, s2, tmp_path / "start", samples=8) / "DONE").read_text())
    shutil.rmtree(tmp_path / "start" / "model")  # stopped after the search, before the model was written
    monkeypatch.setattr(evaluate, "run_dataset", lambda *a, **k: pytest.fail("a path scored again"))
    again = json.loads((fixed_path_start(cfg, s2, tmp_path / "start", samples=8) / "DONE").read_text())
    assert again["path"] == first["path"] and again["select_score"] == first["select_score"]
    assert again["elimination"] == first["elimination"]
