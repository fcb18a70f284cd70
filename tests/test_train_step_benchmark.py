"""benchmarks/train_step.py on the tiny model and GLUE files: every variant timed (bf16 after fp32 in one
process), the epoch estimate from padded tokens, the profile table, and the file --plan reads."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_train_step_benchmark_times_every_variant(tiny_ckpt, tiny_glue, tmp_path):
    import train_step

    out = tmp_path / "train_step_tiny.json"
    train_step.main(["--backbone", str(tiny_ckpt), "--tasks", "rte", "--data-dir", str(tiny_glue), "--steps", "2",
                     "--batch-size", "4", "--latency-inputs", "3", "--threads", "1", "--results", str(out)])
    res = json.loads(out.read_text())
    assert res["commit"] and res["command"] and res["machine"]
    (row,) = res["rows"]
    v = row["variants"]
    assert set(v) == {"plain", "grouped", "bf16"} and row["num_layers"] == 4
    for got in v.values():
        assert got["timed_steps"] == 2 and got["step_seconds"] > 0
        # the epoch: the timed steps' seconds per padded token, times the epoch's padded tokens
        per_token = got["step_seconds"] / got["tokens_per_step"]
        assert got["epoch_seconds"] == pytest.approx(per_token * got["epoch_padded_tokens"], rel=1e-9)
        assert got["epoch_padded_tokens"] > got["steps_per_epoch"] * got["tokens_per_step"] / 10
    assert v["grouped"]["epoch_padded_tokens"] < v["plain"]["epoch_padded_tokens"]  # less padding
    assert v["bf16"]["epoch_padded_tokens"] == v["plain"]["epoch_padded_tokens"]  # the same order
    assert row["sampled"]["step_seconds"] > 0 and row["batch1_ms_full"] > 0
    assert row["profile_plain_step"] and {"op", "self_cpu_ms", "calls"} <= set(row["profile_plain_step"][0])
    report = out.with_suffix(".md").read_text()
    assert "grouped / plain" in report and "top operators" in report
    assert train_step.results_path(str(tiny_ckpt), tmp_path) == tmp_path / f"train_step_{tiny_ckpt.name}.json"
