"""Hardening, second round, in training/ (issue 21): output folders this project did not write are refused and
left untouched, one run per folder, swaps that a kill cannot lose, no wrong model returned as "already
complete", the exact stage's checks, its logs after a restart, and its length checked up front."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpbert_rl.cli import main
from dpbert_rl.training import TrainConfig, TrainingError, train_stage
from dpbert_rl.training import checkpoint as ckpt_mod
from dpbert_rl.training.exact import ExactConfig, train_exact


def cfg(tiny_ckpt, tiny_glue, out, **kw):
    base = dict(task="rte", backbone=str(tiny_ckpt), data_dir=str(tiny_glue), output_dir=str(out), batch_size=8,
                eval_batch_size=16, progress=False, logging_steps=1, save_steps=2, eval_steps=2, lr=1e-3, max_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def exact_cfg(tiny_glue, tmp_path, out, **kw):
    base = dict(task="rte", data_dir=str(tiny_glue), output_dir=str(out), cache_dir=str(tmp_path / "cache"),
                max_steps=20, batch_size=16, eval_steps=10, score_dev=False, progress=False)
    base.update(kw)
    return ExactConfig(**base)


# ------------------------------------------------------------------ 2. a user's folders are never deleted
def test_an_output_dir_this_project_did_not_write_is_refused_and_left_untouched(tiny_ckpt, tiny_glue, tmp_path):
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "model" / "weights.bin").write_text("the user's own model")
    (project / "checkpoint").mkdir()
    (project / "checkpoint" / "notes.txt").write_text("the user's notes")
    (project / "setup.py").write_text("")
    with pytest.raises(TrainingError, match="did not write"):
        train_stage("finetune", cfg(tiny_ckpt, tiny_glue, project))
    assert (project / "model" / "weights.bin").read_text() == "the user's own model"
    assert (project / "checkpoint" / "notes.txt").read_text() == "the user's notes"
    assert not (project / ckpt_mod.MARKER).exists()


def test_the_cli_refuses_a_foreign_output_dir_in_one_line(tiny_ckpt, tiny_glue, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("x")
    code = main(["finetune", "--task", "rte", "--backbone", str(tiny_ckpt), "--data-dir", str(tiny_glue),
                 "--output-dir", str(tmp_path), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dpbert-rl: error:") and str(tmp_path) in err[0]
    assert (tmp_path / "model" / "keep.txt").is_file()


def test_a_new_or_empty_folder_and_one_of_an_earlier_version_are_taken(tiny_ckpt, tiny_glue, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (train_stage("finetune", cfg(tiny_ckpt, tiny_glue, empty)) / "DONE").is_file()
    assert (empty / ckpt_mod.MARKER).is_file()
    (empty / ckpt_mod.MARKER).unlink()  # as a run of an earlier version left it: config.json names its stage
    assert train_stage("finetune", cfg(tiny_ckpt, tiny_glue, empty)) == empty / "model"
    with pytest.raises(TrainingError, match="is a file"):
        ckpt_mod.claim_output_dir(empty / "config.json", "finetune")


# ------------------------------------------------------------------ 4. one run per folder
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first_ones_pid(tiny_ckpt, tiny_glue, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ckpt_mod.MARKER).write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write(str(os.getpid())); f.flush(); "
         "print('locked', flush=True); time.sleep(60)", str(out / ckpt_mod.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"in use by another run \(pid {holder.pid}\)"):
            train_stage("finetune", cfg(tiny_ckpt, tiny_glue, out))
        assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock went with the process: the folder is free again
    assert (train_stage("finetune", cfg(tiny_ckpt, tiny_glue, out)) / "DONE").is_file()


# ------------------------------------------------------------------ 3. a kill inside the swap
@pytest.mark.parametrize("kill_at", range(7))
def test_a_swap_killed_at_any_point_leaves_a_complete_model(tmp_path, monkeypatch, kill_at):
    """Kill swap_in at each of its file operations: recover_swap then leaves the old or the new folder whole."""
    path, tmp = tmp_path / "model", tmp_path / "model.tmp"
    path.mkdir()
    (path / "w").write_text("old")
    tmp.mkdir()
    (tmp / "w").write_text("new")
    calls = {"n": 0}
    real_rename, real_rmtree = Path.rename, ckpt_mod.shutil.rmtree

    def counted(fn):
        def wrapper(*a, **k):
            if calls["n"] == kill_at:
                raise KeyboardInterrupt("killed")
            calls["n"] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(Path, "rename", counted(real_rename))
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", counted(real_rmtree))
    try:
        ckpt_mod.swap_in(tmp, path)
        finished = True
    except KeyboardInterrupt:
        finished = False
    monkeypatch.undo()
    ckpt_mod.recover_swap(path)
    assert (path / "w").read_text() in ("old", "new")
    assert finished == (kill_at >= calls_total(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no leftovers


def calls_total(_tmp_path) -> int:
    """File operations swap_in makes when nothing stale is lying around: tmp -> new, path -> old, new -> path,
    rmtree(old); the stale-new discard and the first rmtree(old) find nothing (rename-aside skipped)."""
    return 5


def test_the_next_stage_finds_a_model_whose_swap_a_kill_interrupted(tiny_ckpt, tiny_glue, tmp_path):
    """Stage 1 killed between its two renames (model -> model.old, model.new -> model): the next stage starts
    from it all the same, and nothing is retrained or lost."""
    s1 = train_stage("finetune", cfg(tiny_ckpt, tiny_glue, tmp_path / "s1"))
    s1.rename(s1.with_name("model.new"))
    s2 = train_stage("planner_init", cfg(tiny_ckpt, tiny_glue, tmp_path / "s2"), init=str(s1))
    assert (s1 / "DONE").is_file() and (s2 / "DONE").is_file()
    assert not s1.with_name("model.new").exists()


def test_swap_recovery_never_touches_a_folder_this_project_does_not_own(tiny_ckpt, tiny_glue, tmp_path):
    """The user's `bert/` beside their own `bert.new/` and `bert.old/`, given as --init: all kept as they are."""
    users = tmp_path / "users"
    users.mkdir()
    import shutil

    shutil.copytree(tiny_ckpt, users / "bert")
    for name in ("bert.new", "bert.old", "bert.tmp"):
        (users / name).mkdir()
        (users / name / "mine.txt").write_text(name)
    train_stage("finetune", cfg(tiny_ckpt, tiny_glue, tmp_path / "ft"), init=str(users / "bert"))
    for name in ("bert.new", "bert.old", "bert.tmp"):
        assert (users / name / "mine.txt").read_text() == name
    assert (users / "bert" / "config.json").is_file()


def test_a_finished_read_only_stage_is_reused_without_a_lock(tiny_ckpt, tiny_glue, tmp_path, monkeypatch):
    out = tmp_path / "done"
    train_stage("finetune", cfg(tiny_ckpt, tiny_glue, out))
    monkeypatch.setattr(ckpt_mod, "claim_output_dir", lambda *a, **k: pytest.fail("a finished stage was claimed"))
    assert train_stage("finetune", cfg(tiny_ckpt, tiny_glue, out)) == out / "model"


# ------------------------------------------------------------------ 5. no wrong model returned as done
def test_another_stage_into_a_finished_folder_is_refused(tiny_ckpt, tiny_glue, tiny_model_dir, tmp_path):
    train_stage("soft", cfg(tiny_ckpt, tiny_glue, tmp_path / "soft"), init=tiny_model_dir)
    with pytest.raises(TrainingError, match="holds a 'soft' run, not 'rl'"):
        train_stage("rl", cfg(tiny_ckpt, tiny_glue, tmp_path / "soft"), init=tiny_model_dir)
    train_stage("finetune", cfg(tiny_ckpt, tiny_glue, tmp_path / "ft"))
    with pytest.raises(TrainingError, match="holds a 'finetune' run, not 'exact'"):
        train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, tmp_path / "ft"))


def test_exact_into_its_finished_folder_with_other_settings_is_refused(tiny_model_dir, tiny_glue, tmp_path):
    out = tmp_path / "exact"
    train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, out))
    assert train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, out, progress=True)) == out / "model"
    for change, name in ((dict(lam=1.0), "lam"), (dict(target_rate=0.5), "target_rate"), (dict(task="mrpc"), "task")):
        with pytest.raises(TrainingError, match=rf"other settings \({name}:"):
            train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, out, **change))


# ------------------------------------------------------------------ 6. the exact stage's checks
@pytest.mark.parametrize("bad, flag", [(dict(max_steps=-1), "max_steps"), (dict(cost=-1.0, rate_control="none"), "cost"),
                                       (dict(lam=-1.0), "lam"), (dict(planner_init_bias=float("nan")),
                                                                 "planner_init_bias"),
                                       (dict(max_seq_length=4), "max_seq_length")])
def test_exact_refuses_what_the_other_stages_refuse(tiny_glue, tmp_path, bad, flag):
    with pytest.raises(ValueError, match=flag):
        exact_cfg(tiny_glue, tmp_path, tmp_path / "x", **bad).validate()


def test_non_finite_cache_features_stop_exact_before_anything_is_written(tiny_model_dir, tiny_glue, tmp_path,
                                                                        monkeypatch):
    from dpbert_rl.pathtree import PathTree

    real = PathTree.raw
    monkeypatch.setattr(PathTree, "raw", lambda self, f: real(self, f) * float("nan"))
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="non-finite"):
        train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, out, fresh_planners=True))
    assert not (out / "model").exists()


# ------------------------------------------------------------------ 9. the exact stage after a kill
def test_exact_restarted_after_a_kill_logs_every_step_once(tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    from dpbert_rl.training import exact as exact_mod

    out = tmp_path / "exact"
    real = exact_mod.select_step

    def killed_at_20(*args, **kwargs):
        if args[6] == 20:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(exact_mod, "select_step", killed_at_20)
    with pytest.raises(KeyboardInterrupt):
        train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, out))
    monkeypatch.setattr(exact_mod, "select_step", real)
    train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, out))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys)), "a step logged twice"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload().Scalars("charts/expected_return")
    assert sorted(e.step for e in events) == [10, 20]


# ------------------------------------------------------------------ 13. a length the model cannot take
def test_exact_refuses_a_length_beyond_the_positions_before_training(tiny_model_dir, tiny_glue, tmp_path):
    out = tmp_path / "long"
    t0 = time.time()
    with pytest.raises(ValueError, match="100000"):
        train_exact(tiny_model_dir, exact_cfg(tiny_glue, tmp_path, out, max_seq_length=100000))
    assert not (out / "model").exists() and not (tmp_path / "cache").exists()
    assert time.time() - t0 < 60


# ------------------------------------------------------------------ 10. settings that would be ignored
def test_pipeline_with_exact_stage3_warns_about_rl_only_flags():
    from dpbert_rl.training import PipelineConfig

    with pytest.warns(UserWarning, match=r"does not read --stage3-lr, --baseline"):
        PipelineConfig(stage3="exact", stage3_lr=1e-5, baseline="none").validate()
    with warnings_as_errors():
        PipelineConfig(stage3="rl", stage3_lr=1e-5, baseline="none").validate()
        PipelineConfig(stage3="exact").validate()


def warnings_as_errors():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ctx.__exit__(*exc)
            return False

    return _Ctx()


def test_lock_is_per_process_reentrant_and_released(tmp_path):
    out = tmp_path / "r"
    ckpt_mod.claim_output_dir(out, "finetune")
    ckpt_mod.claim_output_dir(out, "finetune")  # the same process: no refusal
    assert (out / ckpt_mod.LOCK_FILE).read_text() == str(os.getpid())
    ckpt_mod.release_output_dir(out)  # the inner claim's release leaves the outer one's lock held
    held = subprocess.run([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                           "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / ckpt_mod.LOCK_FILE)],
                          capture_output=True, text=True)
    assert held.returncode != 0 and "BlockingIOError" in held.stderr
    ckpt_mod.release_output_dir(out)
    probe = subprocess.run([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')",
                            str(out / ckpt_mod.LOCK_FILE)], capture_output=True, text=True)
    assert probe.stdout.strip() == "free"
    assert torch.__version__  # torch imported: the tests above ran on the real stack


def test_every_subcommand_does_something_layerdrop_included(tiny_ckpt, tiny_glue, tmp_path):
    """`dpbert-rl layerdrop` had a parser but no branch in the dispatcher: it trained nothing and exited 0."""
    out = tmp_path / "ld"
    code = main(["layerdrop", "--task", "rte", "--backbone", str(tiny_ckpt), "--data-dir", str(tiny_glue),
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "8", "--no-progress"])
    assert code == 0 and (out / "model" / "DONE").is_file()
    assert json.loads((out / "config.json").read_text())["stage"] == "layerdrop"


def test_a_negative_cost_is_a_starting_dual_price_and_refused_as_a_fixed_price(tiny_glue, tmp_path):
    """With the dual price (it has no sign) c is where it starts: the adapt alternation's second fit starts at the
    first's price, below 0 included. As a fixed price, or without a target rate, a negative c is refused."""
    from dpbert_rl.training import TrainConfig

    base = dict(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / "x"), cost=-0.3)
    TrainConfig(**base, rate_control="dual", target_rate=0.3).validate()
    for other in (dict(rate_control="dual", target_rate=None), dict(rate_control="penalty", target_rate=0.3)):
        with pytest.raises(ValueError, match=r"cost \(--cost\) must be a finite number >= 0"):
            TrainConfig(**base, **other).validate()
    with pytest.raises(ValueError, match=r"cost \(--cost\) must be a finite number; got nan"):
        TrainConfig(**{**base, "cost": float("nan")}, rate_control="dual", target_rate=0.3).validate()
