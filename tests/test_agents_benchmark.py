"""benchmarks/agents.py --tune: the rule that chooses an agent's setting on the selection split."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/agents.py, loaded under another name (it shares its name with the ``agents`` package)."""
    spec = importlib.util.spec_from_file_location("bench_agents", BENCH / "agents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trial(score, skip, change=None):
    return {"change": change or {}, "select_score": score, "select_skip_rate": skip, "select_layers": 6 * (1 - skip)}


def test_the_best_selection_score_among_settings_that_skip_enough_is_chosen(bench):
    trials = [trial(80.0, 0.35), trial(90.0, 0.10), trial(82.0, 0.31), trial(81.0, 0.50)]
    # 90.0 skips too little (0.10 < 0.35 - 0.05); 82.0 at 0.31 is within the tolerance
    assert bench.choose_setting(trials, target_rate=0.35) == 2
    assert bench.choose_setting(trials, target_rate=0.45) == 3
    # exactly target_rate - tolerance is enough
    assert bench.choose_setting([trial(70.0, 0.40), trial(75.0, 0.30)], target_rate=0.35) == 1
    # none skips enough: the one that skips most
    assert bench.choose_setting([trial(70.0, 0.1), trial(60.0, 0.2)], target_rate=0.5) == 1


def test_a_tuned_change_overrides_the_fixed_settings_and_the_dual_step(bench):
    kwargs, dual_lr = bench.agent_settings("dqn", {"dual_lr": 5e-4, "learning_rate": 1e-3}, 0.002)
    assert dual_lr == 5e-4 and kwargs["learning_rate"] == 1e-3 and "dual_lr" not in kwargs
    assert kwargs["buffer_size"] == bench.AGENT_SETTINGS["dqn"]["buffer_size"]
    assert bench.agent_settings("ppo", {}, 0.002) == (bench.AGENT_SETTINGS["ppo"], 0.002)
    for agent, grid in bench.TUNING_GRID.items():  # every change names a setting the agent has (or the dual step)
        for change in grid:
            assert set(change) <= set(bench.AGENT_SETTINGS[agent]) | {"dual_lr"}, (agent, change)


def test_tuned_settings_are_read_back_and_stale_or_missing_choices_refused(bench, tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(target_rate=0.35, reward="correct", lam=1.0, dual_lr=0.002, num_envs=64,
                           pipeline_dir="runs/p")
    rows = [{"task": "rte", "agent": "ppo", "chosen": 1, "trials": [trial(1, 0.3), trial(2, 0.3, {"ent_coef": 0.03})],
             "env_steps": 10, "tuned_under": {k: getattr(args, k) for k in bench.TUNED_UNDER}, "commit": "abc",
             "command": "python benchmarks/agents.py --tune"}]
    (tmp_path / "agents_tuning.json").write_text(json.dumps(rows))
    assert bench.tuned_settings(tmp_path, args, [("rte", "ppo")]) == {("rte", "ppo"): {"ent_coef": 0.03}}
    assert bench.tuned_settings(tmp_path / "nothing") == {}
    with pytest.raises(SystemExit, match="no choice for rte/a2c"):
        bench.tuned_settings(tmp_path, args, [("rte", "ppo"), ("rte", "a2c")])
    args.target_rate = 0.5
    with pytest.raises(SystemExit, match="tuned under other arguments.*target_rate"):
        bench.tuned_settings(tmp_path, args, [("rte", "ppo")])
    bench.write_tuning(rows, tmp_path / "agents_tuning.md")
    assert "| rte | ppo | {\"ent_coef\": 0.03} | 2.00 | 4.20 | yes |" in (tmp_path / "agents_tuning.md").read_text()


def test_the_curves_figure_reads_the_runs_of_the_settings_it_is_drawn_for(bench, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(bench, "plot_curves", lambda tb, agents, path, title: drawn.append((tb, title)))
    for d in ("mrpc-frozen", "mrpc-frozen-tuned"):
        (tmp_path / d / "tb").mkdir(parents=True)
    for settings in ("fixed", "tuned"):
        args = type("A", (), dict(curves_task="mrpc", settings=settings, output_dir=str(tmp_path), agents="ppo,a2c"))
        bench.draw_curves(args, tmp_path)
    assert [tb for tb, _ in drawn] == [tmp_path / "mrpc-frozen" / "tb", tmp_path / "mrpc-frozen-tuned" / "tb"]
    assert "tuned settings" in drawn[1][1] and "fixed settings" in drawn[0][1]
    args = type("A", (), dict(curves_task="rte", settings="tuned", output_dir=str(tmp_path), agents="ppo"))
    with pytest.raises(SystemExit, match="no TensorBoard logs at .*rte-frozen-tuned"):
        bench.draw_curves(args, tmp_path)


def test_agents_start_from_the_backbone_the_exact_stage_walked(bench, tmp_path):
    """Under --skip-aware adapt the final exact stage ran on the adapted backbone: the agents' env replays its
    paths, so it must start there, not from stage 2."""
    from types import SimpleNamespace

    run = tmp_path / "rte"
    for stage in ("stage2_planner_init", "stage3_adapt", "stage3_exact"):
        (run / stage / "model").mkdir(parents=True)
        (run / stage / "model" / "DONE").write_text("{}")
    (run / "stage3_exact" / "model" / "selection.json").write_text(json.dumps({"price": 0.02}))
    (run / "stage3_exact" / "config.json").write_text(json.dumps({"init": "runs/p/rte/stage3_adapt/model"}))
    setup = bench.task_setup("rte", SimpleNamespace(pipeline_dir=str(tmp_path)))
    assert setup["model_dir"] == run / "stage3_adapt" / "model" and setup["price0"] == 0.02
    (run / "stage3_exact" / "config.json").write_text(json.dumps({"init": "runs/p/rte/stage2_planner_init/model"}))
    assert bench.task_setup("rte", SimpleNamespace(pipeline_dir=str(tmp_path)))["model_dir"] == \
        run / "stage2_planner_init" / "model"
    (run / "stage3_exact" / "config.json").write_text(json.dumps({"init": "runs/p/rte/stage3_gone/model"}))
    with pytest.raises(SystemExit, match=r"config.json: its init 'runs/p/rte/stage3_gone/model' is not a finished"):
        bench.task_setup("rte", SimpleNamespace(pipeline_dir=str(tmp_path)))  # one line, not a traceback
