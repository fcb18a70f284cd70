"""The real backbone (packaged all-MiniLM-L6-v2) on slices of the real GLUE files."""

import json

import pytest
import torch

from dpbert_rl.data import collator, load_split, tokenize
from dpbert_rl.model import DPBert
from dpbert_rl.training import PipelineConfig, run_pipeline
from tests.test_model import split_planners

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return DPBert.from_backbone("minilm", num_labels=2).eval()


def real_batch(model, glue_dir, task, n):
    ds = tokenize(load_split(task, "dev", str(glue_dir), max_samples=n), model.tokenizer, 128)
    return collator(model.tokenizer)([ds[i] for i in range(n)])


def test_minilm_is_the_real_six_layer_model(minilm):
    assert minilm.num_layers == 6 and minilm.backbone.hidden_size == 384
    assert sum(p.numel() for p in minilm.backbone.parameters()) > 22_000_000


def test_per_layer_calls_reproduce_the_hf_forward_on_rte(minilm, glue_dir):
    b = real_batch(minilm, glue_dir, "rte", 8)
    with torch.no_grad():
        ref = minilm.backbone.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    token_type_ids=b["token_type_ids"]).logits
        out = minilm(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="full")
    assert torch.allclose(ref, out.logits, atol=1e-5)


def test_batched_paths_equal_batch_of_one_on_sst2(minilm, glue_dir):
    b = real_batch(minilm, glue_dir, "sst2", 16)
    with torch.no_grad():
        minilm.planners.weight.normal_(0, 1.0)
    split_planners(minilm, b)
    with torch.no_grad():
        out = minilm(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="hard")
        assert len({tuple(r) for r in out.actions.tolist()}) > 1
        for j in range(16):
            n = int(b["attention_mask"][j].sum())
            one = minilm(b["input_ids"][j:j + 1, :n], b["attention_mask"][j:j + 1, :n],
                         b["token_type_ids"][j:j + 1, :n], mode="hard")
            assert torch.equal(one.actions[0], out.actions[j])
            assert torch.allclose(one.logits[0], out.logits[j], atol=1e-4)


def test_short_pipeline_on_real_rte(glue_dir, tmp_path):
    cfg = PipelineConfig(task="rte", data_dir=str(glue_dir), output_dir=str(tmp_path / "rte"), max_train_samples=32,
                         max_eval_samples=24, batch_size=16, max_steps=2, progress=False, latency_samples=8,
                         latency_repeats=1, calibration_samples=32)
    report = run_pipeline(cfg)
    assert report["num_layers"] == 6 and report["num_examples"] == 24
    assert 0 <= report["dpbert_score"] <= 100 and report["speedup_measured"] > 0
    saved = json.loads((tmp_path / "rte" / "report.json").read_text())
    assert saved["layers_executed_mean"] == pytest.approx(report["layers_executed_mean"])


def test_readme_python_api_example_runs_as_written(glue_dir, monkeypatch):
    from tests.conftest import run_readme_example

    scope = run_readme_example("drive the layers yourself", glue_dir, monkeypatch)
    assert scope["logits"].shape == (2, 2) and scope["out"].actions.shape == (2, 6)


def test_readme_early_exit_example_runs_as_written(glue_dir, monkeypatch):
    from dpbert_rl.baselines import EarlyExitBert
    from tests.conftest import run_readme_example

    scope = run_readme_example("EarlyExitBert(DPBert", glue_dir, monkeypatch)
    model, batch = scope["model"], scope["batch"]
    assert scope["out"].exit_layer.shape == (2,) and 1 <= int(scope["out"].exit_layer.min()) <= 6
    back = EarlyExitBert.load("runs/ee-example").eval()
    for rule in (dict(rule="entropy", threshold=0.3), dict(rule="patience", patience=2)):
        a, b = model.eval()(**batch, **rule), back(**batch, **rule)
        assert torch.equal(a.exit_layer, b.exit_layer)


def test_early_exit_batch_equals_batch_of_one_on_minilm(glue_dir):
    """Real backbone, real sentences of different lengths: per-example exits in a padded batch give
    the predictions of batch size 1."""
    from dpbert_rl.data import load_split
    from dpbert_rl.baselines import EarlyExitBert
    from dpbert_rl.model import DPBert

    torch.manual_seed(0)
    model = EarlyExitBert(DPBert.from_backbone("minilm", num_labels=2)).eval()
    texts = list(load_split("sst2", "dev", str(glue_dir), max_samples=16)["text_a"])
    b = model.tokenizer(texts, padding=True, return_tensors="pt")
    for rule in (dict(rule="patience", patience=1), dict(rule="fixed", exit_layer=3)):
        out = model(**b, **rule)
        single = [model(**model.tokenizer([t], return_tensors="pt"), **rule) for t in texts]
        assert out.exit_layer.tolist() == [int(s.exit_layer) for s in single]
        torch.testing.assert_close(out.logits, torch.cat([s.logits for s in single]), atol=1e-4, rtol=1e-4)
