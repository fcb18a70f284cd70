"""benchmarks/budget.py end to end on the tiny model and GLUE files: the rows issue 24 asks for, both models,
both calibrations, the report and the figure."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

REQUIRED = {"task", "model", "calibration", "requested_layers", "layers_executed_mean", "score", "speedup_ideal",
            "speedup_measured", "commit", "command", "machine"}


def test_budget_benchmark_writes_both_curves(tiny_ckpt, tiny_glue, tmp_path):
    import budget

    results = tmp_path / "budget.json"
    budget.main(["--data-dir", str(tiny_glue), "--tasks", "rte", "--speedups", "1.5,2", "--backbone", str(tiny_ckpt),
                 "--output-dir", str(tmp_path / "runs"), "--max-train-samples", "40", "--max-eval-samples", "20",
                 "--stage1-epochs", "0.4", "--stage2-epochs", "0.4", "--exact-epochs", "2", "--latency-samples", "3",
                 "--repeats", "1", "--threads", "1", "--results", str(results)])
    rows = json.loads(results.read_text())
    measured = [r for r in rows if r["model"] != "backbone"]
    assert all(REQUIRED <= set(r) for r in rows)
    assert {(r["model"], r["calibration"], r["requested_speedup"]) for r in measured} == {
        (m, c, s) for m in ("one-model", "fixed-rate") for c in ("selection", "unlabeled-dev") for s in (1.5, 2.0)}
    assert all(r["requested_layers"] == 4 / r["requested_speedup"] for r in measured)
    assert all(0 <= r["layers_executed_mean"] <= 4 and r["speedup_measured"] > 0 for r in measured)
    text = results.with_suffix(".md").read_text()
    assert "## Targets" in text and "rte" in text
    assert results.with_suffix(".png").stat().st_size > 1000
    # --report-only redraws from the file alone
    results.with_suffix(".md").unlink()
    budget.main(["--report-only", "--results", str(results)])
    assert results.with_suffix(".md").read_text() == text


def test_pipeline_speed_benchmark_compares_pipeline_with_evaluate(tiny_model_dir, tiny_glue, tmp_path):
    import shutil

    import pipeline_speed

    from dpbert_rl.training.calibrate import calibrate_budget

    ckpt = tmp_path / "m"
    shutil.copytree(tiny_model_dir, ckpt)
    import json as _json

    meta = _json.loads((ckpt / "dpbert.json").read_text())
    meta["task_info"]["task"] = "rte"
    (ckpt / "dpbert.json").write_text(_json.dumps(meta))
    calibrate_budget(str(ckpt), "select", 2.0, data_dir=str(tiny_glue))
    results = tmp_path / "ps.json"
    pipeline_speed.main([str(ckpt), "--budget", "0.5", "--data-dir", str(tiny_glue), "--samples", "4",
                         "--repeats", "1", "--threads", "1", "--results", str(results)])
    (row,) = json.loads(results.read_text())
    assert row["task"] == "rte" and row["samples"] == 4 and row["kept"] > 0
    assert row["kept"] == pytest.approx(row["pipeline_speedup"] / row["evaluate_speedup"])  # what it keeps of evaluate's
    assert {"commit", "command", "machine"} <= set(row)
    assert "kept" in results.with_suffix(".md").read_text()
