"""No behaviour change across refactors: fixed predictions, path choices and a tiny training run's metrics
on the tiny random BERT, compared with values that an earlier commit wrote (``regression_golden.json``,
which names that commit).

Every stage runs through the CLI (the public surface that a layout change must keep), so the test does not
depend on where a function lives. To rewrite the golden file after an intended change of behaviour:
``DPBERT_WRITE_GOLDEN=1 pytest tests/test_regression.py`` and say so in the commit.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dpbert_rl import DPBert
from dpbert_rl.cli import main

GOLDEN = Path(__file__).with_name("regression_golden.json")
TEXTS = [("the man plays music", "a dog is happy"), ("not very good", "the film was great and loud"),
         ("a cat sleeps in the park", "the woman eats food")]
# metrics read from each stage's metrics.jsonl (last row that has them) and DONE
METRICS = ("losses/task_loss", "losses/policy_loss", "charts/skip_rate", "eval/select_score", "charts/expected_return")


def _predictions(model_dir: str) -> dict:
    model = DPBert.load(model_dir).eval()
    tok = model.tokenizer
    enc = tok([a for a, _ in TEXTS], [b for _, b in TEXTS], padding=True, return_tensors="pt")
    out = {}
    with torch.no_grad():
        for mode in ("full", "hard"):
            o = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), mode=mode)
            out[mode] = {"logits": o.logits.tolist(), "actions": o.actions.tolist(), "probs": o.probs.tolist()}
        # a threshold near the planners' probabilities, so that the inputs take different paths
        thr = float(o.probs.median())
        o = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), mode="hard", threshold=thr)
        out["hard_median"] = {"threshold": thr, "logits": o.logits.tolist(), "actions": o.actions.tolist()}
        o = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), mode="sample",
                  generator=torch.Generator().manual_seed(3))
        out["sample"] = {"logits": o.logits.tolist(), "actions": o.actions.tolist()}
    return out


def _stage_metrics(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = {}
    for r in rows:
        for k in METRICS:
            if k in r:
                last[k] = r[k]
    done = json.loads((run_dir / "model" / "DONE").read_text())
    dev = done.get("dev", {})
    last["dev"] = {k: v for k, v in dev.items() if isinstance(v, (int, float))}
    return last


def _run(argv):
    assert main(argv) in (0, None)


def _collect(tiny_ckpt, tiny_glue, tmp_path) -> dict:
    common = ["--task", "rte", "--data-dir", str(tiny_glue), "--no-progress"]
    train = ["--batch-size", "8", "--eval-batch-size", "16", "--logging-steps", "1", "--eval-steps", "3",
             "--save-steps", "100", "--seed", "7"]
    s1, s2, s3, s3rl = (tmp_path / n for n in ("s1", "s2", "s3x", "s3rl"))
    _run(["finetune", *common, *train, "--backbone", str(tiny_ckpt), "--output-dir", str(s1), "--max-steps", "4",
          "--lr", "1e-3"])
    _run(["init-planners", *common, *train, "--init", str(s1 / "model"), "--output-dir", str(s2),
          "--max-steps", "4", "--lr", "1e-3"])
    _run(["exact", str(s2 / "model"), *common, "--output-dir", str(s3), "--cache-dir", str(tmp_path / "cache"),
          "--max-steps", "6", "--eval-steps", "3", "--seed", "7", "--target-rate", "0.5"])
    _run(["rl", *common, *train, "--init", str(s2 / "model"), "--output-dir", str(s3rl), "--max-steps", "4",
          "--lr", "1e-4", "--target-rate", "0.3"])
    return {
        "untrained": _predictions(_fresh(tiny_ckpt, tmp_path)),
        "stages": {n: _stage_metrics(d) for n, d in (("finetune", s1), ("init", s2), ("exact", s3), ("rl", s3rl))},
        "models": {n: _predictions(str(d / "model")) for n, d in (("init", s2), ("exact", s3), ("rl", s3rl))},
    }


def _fresh(tiny_ckpt, tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "fresh"
    DPBert.from_backbone(str(tiny_ckpt)).save(path)
    return str(path)


def _compare(got, want, where=""):
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _compare(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list) or isinstance(want, float):
        np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-4,
                                   atol=1e-5, err_msg=where)
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_predictions_paths_and_a_tiny_training_run_are_unchanged(tiny_ckpt, tiny_glue, tmp_path):
    torch.set_num_threads(1)  # thread count changes float reduction order
    try:
        got = json.loads(json.dumps(_collect(tiny_ckpt, tiny_glue, tmp_path)))
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
    if os.environ.get("DPBERT_WRITE_GOLDEN"):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        GOLDEN.write_text(json.dumps({"commit": commit, "values": got}, indent=1) + "\n")
        pytest.skip(f"golden values written to {GOLDEN} at {commit}")
    want = json.loads(GOLDEN.read_text())
    _compare(got, want["values"], f"(golden from {want['commit']})")
