"""Training stages on a tiny model: resumption, NaN handling, determinism, two processes, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

import dpbert_rl.training.stages as train_mod
from dpbert_rl.cli import main
from dpbert_rl.model import DPBert
from dpbert_rl.training import TrainConfig, TrainingError, train_stage
from tests.conftest import nan_loss_at


def cfg(tiny_ckpt, tiny_glue, out, **kw):
    base = dict(task="rte", backbone=str(tiny_ckpt), data_dir=str(tiny_glue), output_dir=str(out), batch_size=8,
                eval_batch_size=16, progress=False, logging_steps=1, save_steps=2, eval_steps=1000, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return DPBert.load(path).state_dict()


def assert_same_weights(a, b):
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_finetune_writes_config_metrics_tensorboard_and_model(tiny_ckpt, tiny_glue, tmp_path):
    out = train_stage("finetune", cfg(tiny_ckpt, tiny_glue, tmp_path / "ft", epochs=1))
    assert (out / "DONE").is_file() and (out / "model.safetensors").is_file()
    conf = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert conf["stage"] == "finetune" and conf["steps_per_epoch"] == 6
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/select_score" in r for r in rows) and any("losses/task_loss" in r for r in rows)
    assert not any("eval/dev_score" in r for r in rows)  # dev chooses nothing, so it is not watched either
    done = json.loads((out / "DONE").read_text())
    assert done["dev"]["num_examples"] == 24 and conf["select_examples"] == 5 and conf["train_examples"] == 43
    chosen = json.loads((out / "selection.json").read_text())  # what the choice was made on, named as such
    assert chosen["select"]["num_examples"] == 5 and "dev" not in chosen
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "ft" / "tb").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert "losses/task_loss" in acc.Tags()["scalars"] and "eval/select_score" in acc.Tags()["scalars"]
    # a finished stage is not run again; settings it does not read may change
    assert train_stage("finetune", cfg(tiny_ckpt, tiny_glue, tmp_path / "ft", epochs=1, lam=50.0)) == out
    # but one started with other settings is neither reused nor resumed
    with pytest.raises(TrainingError, match=r"other settings \(lr: 0.001 -> 0.002\)"):
        train_stage("finetune", cfg(tiny_ckpt, tiny_glue, tmp_path / "ft", epochs=1, lr=2e-3))


def test_crash_keeps_last_good_checkpoint_and_rerun_resumes_to_the_same_result(tiny_ckpt, tiny_glue, tmp_path,
                                                                               monkeypatch):
    kw = dict(max_steps=6, target_rate=None, baseline="batch-mean")
    ref = train_stage("rl", cfg(tiny_ckpt, tiny_glue, tmp_path / "ref", **kw))
    again = train_stage("rl", cfg(tiny_ckpt, tiny_glue, tmp_path / "again", **kw))
    assert_same_weights(weights(ref), weights(again))  # same seed, same numbers

    real = train_mod._stage_loss
    monkeypatch.setattr(train_mod, "_stage_loss", nan_loss_at(real, 5))
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*checkpoint"):
        train_stage("rl", cfg(tiny_ckpt, tiny_glue, tmp_path / "crash", **kw))
    state = json.loads((tmp_path / "crash" / "checkpoint" / "state.json").read_text())
    assert state["global_step"] == 4
    monkeypatch.setattr(train_mod, "_stage_loss", real)
    resumed = train_stage("rl", cfg(tiny_ckpt, tiny_glue, tmp_path / "crash", **kw))
    assert_same_weights(weights(ref), weights(resumed))
    assert not (tmp_path / "crash" / "checkpoint").exists()


@pytest.mark.parametrize("stage", ["planner_init", "soft"])
def test_planner_stages_move_the_planners_and_respect_freezing(tiny_ckpt, tiny_glue, tmp_path, stage):
    start = DPBert.from_backbone(str(tiny_ckpt))
    start.save(tmp_path / "start")
    out = train_stage(stage, cfg(tiny_ckpt, tiny_glue, tmp_path / stage, max_steps=4, target_rate=0.5, beta=5.0),
                      init=str(tmp_path / "start"))
    before, after = weights(tmp_path / "start"), weights(out)
    assert not torch.equal(before["planners.weight"], after["planners.weight"])
    layer_key = next(k for k in before if "encoder.layer.0" in k and k.endswith("weight"))
    frozen = torch.equal(before[layer_key], after[layer_key])
    assert frozen == (stage == "planner_init")


def test_two_processes_with_accelerate_launch(tiny_ckpt, tiny_glue, tmp_path):
    out = tmp_path / "ddp"
    # torchrun starts the two CPU processes; Accelerate picks the gloo backend from their environment
    # (`accelerate launch --multi_gpu` does the same on GPUs).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "dpbert_rl.cli", "rl", "--cpu",
           "--task", "rte", "--backbone", str(tiny_ckpt), "--data-dir", str(tiny_glue), "--output-dir", str(out),
           "--max-steps", "3", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "DONE").is_file()
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2


def test_pipeline_evaluate_and_predict_from_the_cli(tiny_ckpt, tiny_glue, tmp_path, capsys):
    out = tmp_path / "pipe"
    args = ["pipeline", "--task", "rte", "--backbone", str(tiny_ckpt), "--data-dir", str(tiny_glue),
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8", "--no-progress",
            "--latency-samples", "4", "--latency-repeats", "1"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("backbone_score", "dpbert_score", "layers_executed_mean", "num_layers", "speedup_measured",
                "speedup_ideal", "layer_frequency", "throughput_speedup", "train_examples", "seconds", "seed"):
        assert key in report, key
    assert len(report["layer_frequency"]) == 4 and report["num_examples"] == 24
    assert "speed-up measured" in capsys.readouterr().out
    model_dir = out / "stage3_exact" / "model"  # the default stage 3: exact expectation, then adapt, exact again
    assert not (out / "stage3_rl").exists()
    # the final model is the alternation's, or the first fit's where that scored higher on the selection split
    assert report["checkpoint"] == report["alternation"]["chosen"] in (str(model_dir),
                                                                       str(out / "stage3_exact_frozen" / "model"))
    stage2 = DPBert.load(out / "stage2_planner_init" / "model")
    frozen = DPBert.load(out / "stage3_exact_frozen" / "model")
    adapted = DPBert.load(out / "stage3_adapt" / "model")
    stage3 = DPBert.load(model_dir)
    for name, t in stage2.backbone.state_dict().items():  # the exact stage: only the planners change
        assert torch.equal(t, frozen.backbone.state_dict()[name]), name
        assert torch.equal(adapted.backbone.state_dict()[name], stage3.backbone.state_dict()[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(stage2.planners.parameters(), frozen.planners.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(frozen.backbone.parameters(), adapted.backbone.parameters()))
    assert torch.equal(frozen.planners.weight, adapted.planners.weight)  # adapt: the planners stay as they were
    assert main(["evaluate", str(model_dir), "--data-dir", str(tiny_glue), "--repeats", "1",
                 "--latency-samples", "3", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["task"] == "rte"
    capsys.readouterr()
    assert main(["predict", str(model_dir), "the man plays", "a dog sleeps", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["label"] in ("entailment", "not_entailment") and len(pred["probs"]) == 4
    assert all(1 <= i <= 4 for i in pred["layers_executed"])
    assert main(["calibrate", str(model_dir), "--target-rate", "0.5", "--data-dir", str(tiny_glue),
                 "--samples", "16"]) == 0
    calibrated = json.loads((model_dir / "calibration.json").read_text())
    assert DPBert.load(model_dir).threshold == pytest.approx(calibrated["threshold"])
    assert main(["calibrate", str(model_dir), "--target-rate", "2", "--data-dir", str(tiny_glue)]) == 2


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--task", "wnli"], "unknown task 'wnli'"),
    (["rl", "--target-rate", "1.5"], r"target skip rate must lie in \[0, 1\]"),
    (["rl", "--baseline", "avg"], "unknown baseline"),
    (["evaluate", "/nonexistent/ckpt"], "no checkpoint at"),
    (["rl", "--init", "/nonexistent/ckpt"], "no checkpoint at"),
])
def test_cli_errors_are_clear(argv, message, capsys, tmp_path, tiny_glue):
    argv = argv + (["--output-dir", str(tmp_path / "x"), "--data-dir", str(tiny_glue)] if argv[0] != "evaluate" else [])
    assert main(argv) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_predict_refuses_empty_text(tiny_ckpt, tmp_path, capsys):
    DPBert.from_backbone(str(tiny_ckpt)).save(tmp_path / "m")
    assert main(["predict", str(tmp_path / "m"), "  "]) == 2
    assert "empty" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    text = capsys.readouterr().out
    assert "--target-rate" in text and "r of eq. (11)" in text and "--stage3-epochs" in text


def test_threshold_calibration_reaches_the_target_rate(tiny_ckpt, tiny_glue):
    """Planners with zero weights give every input the same p_i = sigmoid(b_i), so the greedy skip rate
    at threshold t is, by hand, the fraction of layers with p_i < t: a staircase the bisection must hit."""
    from dpbert_rl.data import collator, load_split, tokenize
    from dpbert_rl.training import calibrate_threshold

    model = DPBert.from_backbone(str(tiny_ckpt)).eval()
    with torch.no_grad():
        model.planners.weight.zero_()
        model.planners.bias.copy_(torch.logit(torch.tensor([0.2, 0.4, 0.6, 0.8])))
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), model.tokenizer, 128)
    collate = collator(model.tokenizer)
    # target -> (the reachable rate nearest to it, the interval of thresholds that gives it)
    for target, rate, (lo, hi) in ((0.5, 0.5, (0.4, 0.6)), (0.3, 0.25, (0.2, 0.4)), (0.7, 0.75, (0.6, 0.8)),
                                   (1.0, 1.0, (0.8, 1.0))):
        threshold, reached = calibrate_threshold(model, ds, collate, target)
        assert reached == pytest.approx(rate) and lo < threshold <= hi, (target, threshold, reached)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibrate_threshold(model, ds, collate, 1.2)


def test_auto_calibration_moves_the_knob_only_when_the_rate_is_missed(tiny_ckpt, tiny_glue, tmp_path, monkeypatch):
    """The pipeline's 'auto' calibration (the 12-layer runs missed the asked rate by 2 layers either way): the
    staircase planners of the test above skip half the layers at threshold 0.5. Asked 0.45 (within the 0.05
    tolerance) the threshold stays; asked 0.25 it moves to the stair that skips a quarter, is saved, and a
    re-run reads the record instead of passing over the inputs again."""
    import dpbert_rl.model.budget as budget
    from dpbert_rl.training import calibrate_checkpoint

    model = DPBert.from_backbone(str(tiny_ckpt)).eval()
    with torch.no_grad():
        model.planners.weight.zero_()
        model.planners.bias.copy_(torch.logit(torch.tensor([0.2, 0.4, 0.6, 0.8])))
    cfg = lambda rate: TrainConfig(task="rte", data_dir=str(tiny_glue), target_rate=rate)  # noqa: E731
    for rate in (0.45, 0.25):
        model.save(tmp_path / "m")
        info = calibrate_checkpoint(tmp_path / "m", cfg(rate), samples=16, only_if_missed=True)
        assert info["before"] == pytest.approx(0.5) and info["calibrated"] == (rate == 0.25)
        saved = DPBert.load(tmp_path / "m").threshold
        if rate == 0.45:
            assert saved == pytest.approx(0.5) and info["train_skip_rate"] == pytest.approx(0.5)
        else:
            assert info["train_skip_rate"] == pytest.approx(0.25) and 0.2 < saved <= 0.4
            assert saved == pytest.approx(info["threshold"])
    # a knob already found for this target (the pipeline's alternation choice) is saved without a bisection
    model.save(tmp_path / "s")
    with monkeypatch.context() as m:
        m.setattr(budget, "solve_knob", lambda *a, **k: pytest.fail("searched again"))
        given = calibrate_checkpoint(tmp_path / "s", cfg(0.25), samples=16, solved=(0.3, 3.0))
    assert given["value"] == 0.3 and given["train_skip_rate"] == pytest.approx(0.25)
    assert DPBert.load(tmp_path / "s").threshold == pytest.approx(0.3)
    monkeypatch.setattr(budget, "mean_layers", lambda *a, **k: pytest.fail("the record was not reused"))
    assert calibrate_checkpoint(tmp_path / "m", cfg(0.25), samples=16, only_if_missed=True) == info
    with pytest.raises(pytest.fail.Exception):  # another target is calibrated afresh
        calibrate_checkpoint(tmp_path / "m", cfg(0.5), samples=16, only_if_missed=True)


@pytest.mark.parametrize("value, expected", [(True, "always"), (False, "never"), ("auto", "auto")])
def test_calibrate_threshold_reads_its_earlier_boolean_form(value, expected):
    from dpbert_rl.training import PipelineConfig

    cfg = PipelineConfig(calibrate_threshold=value)
    cfg.validate()
    assert cfg.calibrate_threshold == expected
    assert PipelineConfig().calibrate_threshold == "auto"


def test_selection_at_rate_scores_a_checkpoint_at_the_asked_rate_and_saves_nothing(tiny_ckpt, tiny_glue, tmp_path):
    from dpbert_rl.data import collator, get_task
    from dpbert_rl.evaluation.evaluate import evaluate_model
    from dpbert_rl.training.calibrate import selection_at_rate
    from dpbert_rl.training.stages import load_data

    model = DPBert.from_backbone(str(tiny_ckpt)).eval()
    with torch.no_grad():
        model.planners.weight.zero_()
        model.planners.bias.copy_(torch.logit(torch.tensor([0.2, 0.4, 0.6, 0.8])))
    model.save(tmp_path / "m")
    cfg = TrainConfig(task="rte", data_dir=str(tiny_glue), target_rate=0.25, output_dir=str(tmp_path / "x"))
    res = selection_at_rate(tmp_path / "m", cfg, samples=16)
    assert res["skip_rate"] == pytest.approx(0.25) and 0.2 < res["value"] <= 0.4
    assert DPBert.load(tmp_path / "m").threshold == pytest.approx(0.5)  # nothing saved
    model.threshold = res["value"]
    select = load_data(cfg, model.tokenizer, splits=("select",))["select"]
    assert res["score"] == pytest.approx(evaluate_model(model, get_task("rte"), select, collator(model.tokenizer),
                                                        64, "hard")["score"])


@pytest.mark.parametrize("scores, kept", [((50.0, 60.0), True), ((60.0, 50.0), False)])
def test_the_alternation_is_kept_only_when_it_beats_the_first_fit_on_the_selection_split(tmp_path, monkeypatch,
                                                                                          scores, kept):
    import dpbert_rl.training.calibrate as cal
    from dpbert_rl.training import PipelineConfig
    from dpbert_rl.training.pipeline import keep_alternation

    first, final = tmp_path / "stage3_sampled_frozen" / "model", tmp_path / "stage3_sampled" / "model"
    for m in (first, final):
        m.mkdir(parents=True)
        (m / "DONE").write_text(json.dumps({"best_select": 1.0}))
    given = dict(zip((str(first), str(final)), scores))
    monkeypatch.setattr(cal, "selection_at_rate", lambda d, cfg, n: {"score": given[str(d)], "knob": "threshold",
                                                                     "value": 0.5, "skip_rate": 0.35, "examples": 9})
    cfg = PipelineConfig(target_rate=0.35)
    chosen, outcome = keep_alternation(first, final, cfg, tmp_path)
    assert chosen == (final if kept else first) and outcome["kept"] is kept
    assert (outcome["first"]["score"], outcome["final"]["score"]) == scores
    monkeypatch.setattr(cal, "selection_at_rate", lambda *a: pytest.fail("scored again"))
    assert keep_alternation(first, final, cfg, tmp_path) == (chosen, outcome)  # a re-run reads the record
    with pytest.raises(pytest.fail.Exception):  # another target is compared afresh
        keep_alternation(first, final, PipelineConfig(target_rate=0.5), tmp_path)
    (final / "DONE").write_text(json.dumps({"best_select": 2.0}))  # that stage trained again: compared afresh
    with pytest.raises(pytest.fail.Exception):
        keep_alternation(first, final, cfg, tmp_path)


def test_pipeline_stage3_rl_is_the_papers_joint_stage(tiny_ckpt, tiny_glue, tmp_path):
    from dpbert_rl.training import PipelineConfig, run_pipeline

    out = tmp_path / "rl"
    cfg = PipelineConfig(task="rte", backbone=str(tiny_ckpt), data_dir=str(tiny_glue), output_dir=str(out),
                         stage3="rl", max_steps=2, batch_size=8, progress=False, latency_samples=4,
                         latency_repeats=1)
    report = run_pipeline(cfg)
    assert report["checkpoint"] == str(out / "stage3_rl" / "model") and not (out / "stage3_exact").exists()
    stage2 = DPBert.load(out / "stage2_planner_init" / "model")
    stage3 = DPBert.load(out / "stage3_rl" / "model")
    assert any(not torch.equal(t, stage3.backbone.state_dict()[n]) for n, t in stage2.backbone.state_dict().items())


def test_the_pipeline_passes_its_cost_unit_to_every_exact_stage(tiny_ckpt, tiny_glue, tmp_path):
    from dpbert_rl.training import PipelineConfig, run_pipeline

    out = tmp_path / "tok"
    cfg = PipelineConfig(task="rte", backbone=str(tiny_ckpt), data_dir=str(tiny_glue), output_dir=str(out),
                         stage3="exact", cost_unit="tokens", max_steps=2, batch_size=8, progress=False,
                         latency_samples=4, latency_repeats=1, skip_aware_epochs=0.1)
    report = run_pipeline(cfg)
    # the rate counts token-layers: the layer-count calibration and the alternation's comparison are not made
    assert report["calibration"] is None and report["alternation"] is None
    assert not (out / "alternation.json").exists() and report["checkpoint"] == str(out / "stage3_exact" / "model")
    for stage in ("stage3_exact_frozen", "stage3_exact"):  # both fits of the skip-aware alternation
        saved = json.loads((out / stage / "config.json").read_text())
        assert saved["cost_unit"] == "tokens" and saved["fit_mean_tokens"] > 0, stage


@pytest.mark.parametrize("kw, message", [({"stage3": "joint"}, "unknown stage3"),
                                         ({"rate_control": "penalty", "stage3": "exact"}, "not 'penalty'"),
                                         ({"exact_epochs": 0}, "exact_epochs"),
                                         ({"cost_unit": "flops"}, "cost_unit must be"),
                                         ({"cost_unit": "tokens", "stage3": "rl"}, "is for stage 3 'exact'"),
                                         ({"calibrate_threshold": "sometimes"}, "must be one of")])
def test_pipeline_config_refuses_bad_stage3_settings(kw, message):
    from dpbert_rl.training import PipelineConfig

    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kw).validate()


def test_group_by_length_pads_less_and_still_sees_every_input(tiny_ckpt, tiny_glue, tmp_path, monkeypatch):
    real = train_mod.collator
    lengths = []

    def spy(tokenizer):
        collate = real(tokenizer)

        def wrapped(rows):
            lengths.append([len(r["input_ids"]) for r in rows])
            return collate(rows)
        return wrapped

    monkeypatch.setattr(train_mod, "collator", spy)
    padded = {}
    for grouped in (False, True):
        cfg = TrainConfig(task="rte", backbone=str(tiny_ckpt), data_dir=str(tiny_glue),
                          output_dir=str(tmp_path / f"g{grouped}"), batch_size=4, epochs=1, progress=False,
                          group_by_length=grouped)
        run = train_mod.StageRun("finetune", cfg, None)
        run.step = 0  # the first epoch
        lengths.clear()
        for _ in run._epoch_loader():
            pass
        assert sorted(x for b in lengths for x in b) == sorted(len(x) for x in run.data["train"]["input_ids"])
        padded[grouped] = sum(max(b) * len(b) for b in lengths)
    assert padded[True] < padded[False]


@pytest.mark.parametrize("stage", ["planner_init", "sampled"])
def test_a_frozen_backbone_stays_in_eval_mode_after_each_evaluation(stage, tiny_model_dir, tiny_glue, tmp_path,
                                                                    monkeypatch):
    """Stages 2 and 'sampled' freeze the backbone without dropout; an evaluation in the middle of an epoch must
    not turn its dropout back on (it did: evaluate put back model.train(True) for the whole model)."""
    seen = []
    real = DPBert.forward

    def spy(self, *a, **kw):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            seen.append(self.backbone.training)
        return real(self, *a, **kw)

    monkeypatch.setattr(DPBert, "forward", spy)
    cfg = TrainConfig(task="rte", backbone=tiny_model_dir, data_dir=str(tiny_glue), output_dir=str(tmp_path / stage),
                      batch_size=4, eval_batch_size=16, progress=False, max_steps=4, eval_steps=1, save_steps=100,
                      target_rate=0.3)
    train_stage(stage, cfg, init=tiny_model_dir)
    assert len(seen) >= 4 and not any(seen)
