"""One model, any speed (issue 24): price-conditioned planners trained over a range of layer prices on the
exact path tree, the budget set on unlabeled inputs (no dev label read), its round-trip through the
checkpoint, and DPBERT behind transformers' pipeline() with skipping and the GLUE label names."""

import json

import numpy as np
import pytest
import torch

from dpbert_rl import data as data_mod
from dpbert_rl.cli import main
from dpbert_rl.model import DPBert
from dpbert_rl.model.budget import budget_curve, encode_inputs, knob_for_budget, mean_layers
from dpbert_rl.model.planner import Planners
from dpbert_rl.training.calibrate import calibrate_budget
from dpbert_rl.training.exact import ExactConfig, train_exact

BUDGET_RANGE = (0.01, 2.0)


@pytest.fixture(scope="module")
def one_model(tiny_model_dir, tiny_glue, tmp_path_factory):
    """Price-conditioned planners on the tiny model, trained by the exact stage over a range of prices."""
    root = tmp_path_factory.mktemp("one_model")
    cfg = ExactConfig(task="sst2", data_dir=str(tiny_glue), output_dir=str(root / "x"), cache_dir=str(root / "c"),
                      max_steps=60, batch_size=16, lr=0.05, reward="loss", budget_range=BUDGET_RANGE,
                      score_dev=False, progress=False, eval_steps=30)
    return str(train_exact(tiny_model_dir, cfg))


def test_conditioned_planners_start_as_the_fixed_ones_and_read_the_price():
    torch.manual_seed(0)
    fixed = Planners(3, 8, features="mean")
    cond = Planners(3, 8, features="mean", budget=BUDGET_RANGE)
    cond.load_state_dict(fixed.state_dict(), strict=False)
    z = torch.randn(5, 8)
    assert torch.allclose(cond(1, z), fixed(1, z))  # V = u = 0 at the start
    with torch.no_grad():
        cond.budget_bias.fill_(-1.0)
    assert (cond(1, z, price=1.0) < cond(1, z, price=0.05)).all()  # u < 0: a higher price, a lower logit
    per_row = cond(1, z, price=torch.tensor([0.05, 1.0, 0.05, 1.0, 0.05]))
    assert torch.allclose(per_row[1], cond(1, z, price=1.0)[1])
    with pytest.raises(ValueError, match="read no budget"):
        fixed.set_price(0.1)
    with pytest.raises(ValueError, match="c_min < c_max"):
        Planners(3, 8, budget=(1.0, 0.1))
    Planners(3, 8, budget=(-0.1, 0.1))  # a negative price pays for a layer: allowed


def test_one_model_runs_fewer_layers_as_the_price_rises_and_round_trips(one_model, tiny_glue):
    model = DPBert.load(one_model).eval()
    assert model.planners.conditioned and model.planners.budget == BUDGET_RANGE
    meta = json.loads((__import__("pathlib").Path(one_model) / "dpbert.json").read_text())
    assert meta["budget_range"] == list(BUDGET_RANGE)
    inputs = data_mod.load_inputs("sst2", "select", str(tiny_glue))
    batches = encode_inputs(model, inputs, 128)
    layers = [mean_layers(model, batches, c) for c in np.linspace(-2.0, 4.0, 9)]
    assert all(b <= a + 1e-9 for a, b in zip(layers, layers[1:])), layers  # monotone in the price
    assert layers[0] > layers[-1]  # and the budget does move the compute


def test_unlabeled_calibration_reads_no_dev_label_and_hits_the_target(one_model, tiny_glue, tmp_path, monkeypatch):
    import shutil

    ckpt = tmp_path / "m"
    shutil.copytree(one_model, ckpt)
    seen = []
    real_parse, real_load = data_mod.parse_label, data_mod.load_split
    monkeypatch.setattr(data_mod, "parse_label", lambda *a, **k: seen.append(("label", a[2] if len(a) > 2 else k))
                        or real_parse(*a, **k))
    monkeypatch.setattr(data_mod, "load_split", lambda *a, **k: seen.append(("load_split", a, k)) or real_load(*a, **k))
    model = DPBert.load(ckpt)
    full = mean_layers(model, encode_inputs(model, data_mod.load_inputs("sst2", "dev", str(tiny_glue)), 128), 1e-4)
    seen.clear()
    target = 0.5 * model.num_layers
    info = calibrate_budget(str(ckpt), "dev", target, data_dir=str(tiny_glue))
    assert seen == [], seen  # no label parsed, no labelled split loaded
    assert info["inputs"] == "dev" and info["num_inputs"] == 24
    assert abs(info["layers_executed_mean"] - target) <= 0.1 or full < target
    again = DPBert.load(ckpt)  # the knob and the curve are in the checkpoint
    assert abs(float(again.planners.price) - info["value"]) < 1e-6 * info["value"]
    assert again.budget_table["num_inputs"] == 24 and len(again.budget_table["points"]) >= 10
    assert knob_for_budget(again, 0.5) > knob_for_budget(again, 0.9)  # less budget, higher price


def test_budget_curve_is_non_increasing_for_the_threshold_knob_too(tiny_model_dir, tiny_glue):
    model = DPBert.load(tiny_model_dir).eval()
    batches = encode_inputs(model, data_mod.load_inputs("rte", "select", str(tiny_glue)), 128)
    curve = budget_curve(model, batches, n=9)
    assert [p[0] for p in curve] == sorted((p[0] for p in curve), reverse=True)
    with pytest.raises(ValueError, match="no budget curve"):
        knob_for_budget(model, 0.5)


def test_the_cli_calibrates_on_a_file_of_ones_own(one_model, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "m"
    shutil.copytree(one_model, ckpt)
    inputs = tmp_path / "traffic.txt"
    inputs.write_text("\n".join(["a very good film", "the dog sleeps in the park", "not good", "loud and bad"] * 5))
    assert main(["calibrate", str(ckpt), "--speedup", "2", "--inputs", str(inputs)]) == 0
    out = capsys.readouterr().out
    assert "on 20 inputs of" in out and "ideal speed-up" in out
    bad = tmp_path / "pairs.txt"
    bad.write_text("one\ttwo\tthree\n")
    assert main(["calibrate", str(ckpt), "--speedup", "2", "--inputs", str(bad)]) == 2
    assert "pairs.txt:1: expected one sentence per line" in capsys.readouterr().err


# ------------------------------------------------------------------ transformers.pipeline
@pytest.fixture(scope="module")
def calibrated(one_model, tiny_glue, tmp_path_factory):
    import shutil

    ckpt = tmp_path_factory.mktemp("calibrated") / "m"
    shutil.copytree(one_model, ckpt)
    calibrate_budget(str(ckpt), "select", 2.0, data_dir=str(tiny_glue))
    return ckpt


def test_pipeline_runs_the_planners_and_skips_layers(calibrated, tiny_glue, monkeypatch):
    from transformers import pipeline

    from dpbert_rl.model.backbone import Backbone

    calls = {"rows": 0, "inputs": 0}
    real = Backbone.layer

    def spy(self, i, hidden, *args, **kw):  # the rows every layer really computes
        calls["rows"] += int(hidden.shape[0])
        return real(self, i, hidden, *args, **kw)

    monkeypatch.setattr(Backbone, "layer", spy)
    clf = pipeline("text-classification", model=str(calibrated), trust_remote_code=True,
                   model_kwargs={"budget": 0.5})
    assert type(clf.model).__name__ == "DPBertForSequenceClassification"
    calls["rows"] = 0  # not the load-time probe's layers (its check against the library's forward)
    texts = data_mod.load_inputs("sst2", "select", str(tiny_glue))["text_a"]  # the inputs it was calibrated on
    answers = [clf(t)[0] for t in texts]
    L = clf.model.dpbert.num_layers
    assert calls["rows"] < L * len(texts)  # fewer than L layers per input on average
    assert abs(calls["rows"] / len(texts) - 0.5 * L) <= 0.5  # about the budget: half the layers
    assert {a["label"] for a in answers} <= {"negative", "positive"}  # SST-2's own label names


def test_pipeline_at_full_budget_equals_the_plain_model(calibrated):
    from transformers import AutoModelForSequenceClassification, pipeline

    plain = AutoModelForSequenceClassification.from_pretrained(str(calibrated)).eval()
    assert type(plain).__name__ == "BertForSequenceClassification"  # without trust_remote_code: the backbone
    clf = pipeline("text-classification", model=str(calibrated), trust_remote_code=True,
                   model_kwargs={"budget": 1.0})
    enc = clf.tokenizer(["a very good film", "not good at all"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = clf.model(**enc).logits
        b = plain(**enc).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert int(clf.model(**enc).layers_executed.min()) == clf.model.dpbert.num_layers


def test_label_names_are_the_glue_datasets_own():
    from dpbert_rl.data import get_task

    assert get_task("sst2").display_names == ["negative", "positive"]
    assert get_task("cola").display_names == ["unacceptable", "acceptable"]
    assert get_task("mrpc").display_names == ["not_equivalent", "equivalent"]
    assert get_task("rte").display_names == ["entailment", "not_entailment"]
    assert get_task("stsb").display_names is None


def test_evaluate_holds_the_rate_on_the_scored_inputs_without_their_labels(tiny_model_dir, tiny_glue, tmp_path,
                                                                            monkeypatch):
    """``rate_on_inputs`` (the pipeline's --rate-on-eval-inputs): the knob is solved in memory on the evaluated
    split's own inputs, with no label in the batches it reads, the score is taken at that knob, and the
    checkpoint on disk keeps its own."""
    from conftest import gated_sst2_model
    from dpbert_rl.evaluation import latency
    from dpbert_rl.evaluation.latency import evaluate_checkpoint

    # gates p = 0.95, 0.73, 0.27, 0.05 on every input: 1 layer at threshold 0.9, 2 at 0.5
    ckpt = gated_sst2_model(tiny_model_dir).save(tmp_path / "m")
    seen = []
    real = latency.solve_knob
    monkeypatch.setattr(latency, "solve_knob", lambda m, batches, *a, **k: seen.extend(batches) or
                        real(m, batches, *a, **k))
    kw = dict(data_dir=str(tiny_glue), repeats=1, latency_samples=2, progress=False)
    as_saved = evaluate_checkpoint(str(ckpt), **kw)
    assert as_saved["layers_executed_mean"] == 1.0 and as_saved["rate_on_inputs"] is None and not seen
    report = evaluate_checkpoint(str(ckpt), rate_on_inputs=0.5, **kw)
    assert seen and all("labels" not in b for b in seen)  # the knob read the inputs alone
    assert sum(len(b["input_ids"]) for b in seen) % 24 == 0  # all 24 dev inputs, and only those
    on = report["rate_on_inputs"]
    assert on["split"] == "dev" and on["num_inputs"] == 24 and on["value_before"] == 0.9
    assert 0.27 < on["value"] < 0.73 and on["skip_rate"] == 0.5
    assert report["layers_executed_mean"] == 2.0 and report["threshold"] == on["value"]  # scored at that knob
    assert DPBert.load(ckpt).threshold == 0.9  # the checkpoint on disk is not changed
    with pytest.raises(ValueError, match="give one of them"):
        evaluate_checkpoint(str(ckpt), threshold=0.5, rate_on_inputs=0.5, **kw)


def test_pipeline_rate_on_eval_inputs_needs_a_rate_in_layers():
    from dpbert_rl.training import PipelineConfig

    PipelineConfig(task="sst2", target_rate=0.3, rate_on_eval_inputs=True).validate()
    with pytest.raises(ValueError, match="--rate-on-eval-inputs"):
        PipelineConfig(task="sst2", target_rate=None, rate_on_eval_inputs=True).validate()
    with pytest.raises(ValueError, match="--rate-on-eval-inputs"):
        PipelineConfig(task="sst2", target_rate=0.3, stage3="exact", cost_unit="tokens",
                       rate_on_eval_inputs=True).validate()


def test_the_knob_search_stops_at_its_resolution_where_the_layers_jump(tiny_model_dir):
    """Nearly deterministic planners jump from one layer count to another: no knob is within tol, and the search
    stops once its bracket is narrower than its resolution (14 passes, not 24) on the side nearest the target; a
    search for the closest knob (tol 0) runs every iteration it asks for."""
    from dpbert_rl.model.budget import solve_knob

    model = DPBert.load(tiny_model_dir)
    calls = []

    def layers_at(knob):  # 4 layers up to threshold 0.7, then 1
        calls.append(knob)
        return 4.0 if knob < 0.7 else 1.0

    knob, layers = solve_knob(model, None, target_layers=3.2, tol=0.01, layers_at=layers_at)
    assert len(calls) == 14 and layers == 4.0 and knob < 0.7
    assert max(k for k in calls if k < 0.7) == pytest.approx(0.7, abs=2e-3)  # it closed in on the jump
    calls.clear()
    solve_knob(model, None, target_layers=3.2, tol=0.01, layers_at=layers_at, resolution=0.0)
    assert len(calls) == 24  # without the stop, every iteration
    calls.clear()
    solve_knob(model, None, target_layers=3.2, layers_at=layers_at, iterations=30)
    assert len(calls) == 30  # asked for the closest knob (tol 0): no stop by default
    with pytest.raises(ValueError, match="resolution"):
        solve_knob(model, None, target_layers=3.2, layers_at=layers_at, resolution=1.5)

