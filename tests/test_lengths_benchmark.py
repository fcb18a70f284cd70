"""benchmarks/lengths.py: the words per input of each split, recomputed by hand on GLUE files written here, and
the split carving it reads (the selection split is the training file's held-out part, not dev)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _write_sst2(root: Path, train: list, dev: list) -> Path:
    (root / "SST-2").mkdir(parents=True)
    for name, rows in (("train", train), ("dev", dev)):
        (root / "SST-2" / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(rows)))
    return root


def test_lengths_per_split_match_a_count_by_hand(tmp_path):
    import lengths
    from dpbert_rl.data import carve_selection

    # training phrases of 1..60 words, dev sentences of 20 words: the selection split is carved from train
    train = [" ".join(["w"] * (1 + i % 60)) for i in range(600)]
    dev = [" ".join(["d"] * 20)] * 30
    glue = _write_sst2(tmp_path / "glue", train, dev)
    out = tmp_path / "lengths.json"
    lengths.main(["--tasks", "sst2", "--data-dir", str(glue), "--short", "5", "--results", str(out)])
    res = json.loads(out.read_text())
    assert res["commit"] and res["command"].startswith("python ") and res["machine"] and res["short"] == 5
    rows = {r["split"]: r for r in res["rows"]}
    assert list(rows) == ["fit", "select", "dev"]
    fit_idx, sel_idx = carve_selection(len(train))
    for split, idx in (("fit", fit_idx), ("select", sel_idx)):
        n = [1 + i % 60 for i in idx]
        assert rows[split]["inputs"] == len(idx)
        assert rows[split]["words_mean"] == pytest.approx(sum(n) / len(n))
        assert rows[split]["short_share"] == pytest.approx(sum(k <= 5 for k in n) / len(n))
    assert rows["dev"] == {"task": "sst2", "split": "dev", "inputs": 30, "words_mean": 20.0, "words_median": 20,
                           "short_share": 0.0}
    md = out.with_suffix(".md").read_text()
    assert "do not edit by hand" in md and "| sst2 | dev | 30 | 20.0 | 20.0 | 0.0% |" in md


def test_pairs_count_both_sentences(tiny_glue, tmp_path):
    import lengths
    from dpbert_rl.data import load_split

    rows = lengths.main(["--tasks", "rte", "--data-dir", str(tiny_glue), "--results", str(tmp_path / "l.json")])
    dev = load_split("rte", "dev", str(tiny_glue))
    both = [len(a.split()) + len(b.split()) for a, b in zip(dev["text_a"], dev["text_b"])]
    (row,) = [r for r in rows if r["split"] == "dev"]
    assert row["words_mean"] == pytest.approx(sum(both) / len(both))
    assert row["words_mean"] > sum(len(a.split()) for a in dev["text_a"]) / len(both)


def test_bad_arguments_are_refused(capsys):
    import lengths

    with pytest.raises(SystemExit):
        lengths.main(["--tasks", "nope"])
    assert "unknown tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lengths.main(["--short", "0"])
    assert "--short must be at least 1" in capsys.readouterr().err
