"""GLUE loading: the local layout, the quirks of the real files, and clear errors."""

import pytest

from dpbert_rl import data as data_mod
from dpbert_rl.data import DataError, encode_one, get_task, load_split, read_glue_tsv
from dpbert_rl.evaluation.metrics import compute_metrics


@pytest.mark.parametrize("task,n_labels", [("rte", 2), ("SST-2", 2), ("sts-b", 1), ("MRPC", 2), ("cola", 2)])
def test_tiny_glue_layout_loads(tiny_glue, task, n_labels):
    ds = load_split(task, "train", str(tiny_glue))
    assert len(ds) == 48 and set(ds.column_names) == {"text_a", "text_b", "label"}
    assert get_task(task).num_labels == n_labels
    assert all(t for t in ds["text_a"])


def test_mrpc_bom_is_stripped_and_pairs_are_kept(tiny_glue):
    ds = load_split("mrpc", "dev", str(tiny_glue))
    assert ds[0]["text_b"] and set(ds["label"]) <= {0, 1}


def test_glue_dir_from_environment(tiny_glue, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tiny_glue))
    assert len(load_split("rte", "dev")) == 24


def test_max_samples_is_a_seeded_subset(tiny_glue):
    a = load_split("rte", "train", str(tiny_glue), max_samples=10, shuffle_seed=1)
    b = load_split("rte", "train", str(tiny_glue), max_samples=10, shuffle_seed=1)
    assert len(a) == 10 and a["text_a"] == b["text_a"]
    assert load_split("rte", "dev", str(tiny_glue), max_samples=5)["text_a"] == \
        load_split("rte", "dev", str(tiny_glue))["text_a"][:5]


def _write(tmp_path, task_dir, text, name="train.tsv"):
    d = tmp_path / task_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)
    return tmp_path


def test_malformed_row_names_file_line_and_expectation(tmp_path):
    root = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta b\tc d\tentailment\n1\tonly two\n")
    with pytest.raises(DataError, match=r"RTE/train.tsv:3: expected 4 tab-separated fields .* found 2"):
        load_split("rte", "train", str(root))
    ds = load_split("rte", "train", str(root), bad_rows="skip")
    assert len(ds) == 1


def test_label_outside_the_label_set(tmp_path):
    root = _write(tmp_path, "SST-2", "sentence\tlabel\ngood film \t1\nbad film \t2\n")
    with pytest.raises(DataError, match=r"train.tsv:3: label '2' is not one of \['0', '1'\]"):
        load_split("sst2", "train", str(root))


def test_regression_label_must_be_a_number_in_range(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    root = _write(tmp_path, "STS-B", head + "0\tg\tf\ty\t0\ts\ts\ta b\tc d\t7.5\n")
    with pytest.raises(DataError, match=r":2: label 7.5 is outside \[0.0, 5.0\]"):
        load_split("stsb", "train", str(root))


def test_empty_text(tmp_path):
    root = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\t \tc d\tentailment\n")
    with pytest.raises(DataError, match=r":2: empty text in column 'sentence1'"):
        load_split("rte", "train", str(root))
    with pytest.raises(DataError, match="empty"):
        encode_one(None, "   ")


def test_stray_quote_does_not_merge_rows(tmp_path):
    # RTE has fields starting with '"'; default CSV quoting would swallow the following rows.
    text = 'index\tsentence1\tsentence2\tlabel\n0\t"Quoted start\tb\tentailment\n1\tc\td\tnot_entailment\n'
    root = _write(tmp_path, "RTE", text)
    ds = load_split("rte", "train", str(root))
    assert len(ds) == 2 and ds[0]["text_a"] == '"Quoted start'


def test_missing_file_unknown_task_split_and_dir(tmp_path, tiny_glue):
    with pytest.raises(DataError, match=r"QNLI/train.tsv not found: expected the GLUE layout"):
        load_split("qnli", "train", str(tiny_glue))
    with pytest.raises(DataError, match="unknown task 'wnli'"):
        get_task("wnli")
    with pytest.raises(DataError, match="no split 'test'"):
        load_split("rte", "test", str(tiny_glue))
    with pytest.raises(DataError, match="does not exist"):
        load_split("rte", "train", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="header has no column 'label'"):
        read_glue_tsv(_write(tmp_path, "RTE", "index\tsentence1\tsentence2\tgold\n") / "RTE" / "train.tsv",
                      get_task("rte"))


def test_hub_failure_says_how_to_go_offline(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)

    def offline(*a, **k):
        raise ConnectionError("OfflineModeIsEnabled")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"--data-dir or \$GLUE_DIR"):
        data_mod.load_split("rte", "dev")


@pytest.mark.integration
def test_real_glue_files_load_completely(glue_dir):
    counts = {"rte": (2490, 277), "mrpc": (3668, 408), "stsb": (5749, 1500), "sst2": (67349, 872)}
    for task, (n_train, n_dev) in counts.items():
        assert len(load_split(task, "dev", str(glue_dir))) == n_dev
        if task != "sst2":
            assert len(load_split(task, "train", str(glue_dir))) == n_train
    rte = load_split("rte", "dev", str(glue_dir))
    assert sorted(set(rte["label"])) == [0, 1] and sum(rte["label"]) == 131  # 146 entailment / 131 not


def test_metrics_by_hand():
    assert compute_metrics("accuracy", [1, 0, 1, 1], [1, 0, 0, 1])["score"] == pytest.approx(75.0)
    m = compute_metrics("acc_and_f1", [1, 0, 1, 1], [1, 0, 0, 1])
    assert m["f1"] == pytest.approx(80.0) and m["score"] == pytest.approx((75 + 80) / 2)
    assert compute_metrics("matthews", [1, 0, 1, 0], [1, 0, 1, 0])["score"] == pytest.approx(100.0)
    s = compute_metrics("pearson_spearman", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0])
    assert s["spearman"] == pytest.approx(100.0) and 95 < s["pearson"] < 100
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics("bleu", [1], [1])
