"""Issue 21, "Hardening, second round" (agents, envs, benchmarks): each case reproduced, and the clear error,
refusal or right result it now gets. Every test names its item of the issue (1, 10, 11, 13).

The SB3 agents here are built on a stand-in environment with the layer-skip env's spaces (no BERT needed);
crafted files are written in tmp_path.
"""

import base64
import io
import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest

from agents.base import Agent
from agents.cli import main as agents_main
from agents.sb3 import A2CAgent, DQNAgent, PPOAgent, RecurrentPPOAgent
from envs.layer_skip import BatchedLayerSkipEnv, LayerSkipEnv, observation_space
from envs.layer_skip_tree import BatchedLayerSkipTreeEnv, LayerSkipTreeEnv

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
F, L = 4, 3  # the stand-in env's feature width and layer count


class Payload:
    """Pickles to a call that writes ``marker``: what a crafted file would run on unpickling."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class StandIn(gym.Env):
    """The layer-skip env's spaces (Box(F + L), Discrete(2)), constant observations, one-step episodes."""

    def __init__(self):
        self.observation_space = observation_space(F, L)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        obs = np.zeros(F + L, np.float32)
        obs[F] = 1.0
        return obs, {}

    def step(self, action):
        return self.reset()[0], float(action), True, False, {}


SB3 = {  # agent class, policy, constructor settings small enough for a few steps
    "ppo": (PPOAgent, "MlpPolicy", {"n_steps": 8, "batch_size": 8}),
    "a2c": (A2CAgent, "MlpPolicy", {"n_steps": 4}),
    "dqn": (DQNAgent, "MlpPolicy", {"buffer_size": 64, "learning_starts": 4}),
    "recurrent-ppo": (RecurrentPPOAgent, "MlpLstmPolicy", {"n_steps": 8, "batch_size": 8}),
}


def saved_sb3_agent(name: str, path: Path) -> tuple:
    """An SB3 agent trained a few steps on the stand-in env and saved to ``path``; returns it and an observation."""
    klass, policy, kwargs = SB3[name]
    agent = klass(policy, num_layers=L)
    agent.model = klass._algo()(policy, StandIn(), device="cpu", seed=0, **kwargs)
    agent.model.learn(16)
    agent.save(path)
    obs = np.random.default_rng(0).uniform(-1, 1, (5, F + L)).astype(np.float32)
    obs[:, F:] = np.eye(L, dtype=np.float32)[[0, 1, 2, 0, 1]]
    return agent, obs


def rewrite_zip(path: Path, change) -> None:
    """Rewrite the zip at ``path`` with ``change(name, bytes) -> bytes`` applied to every member."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, change(n, b))


def serialized(obj) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


# ---------------------------------------------------------------------- 1. loading an agent runs no code
@pytest.mark.parametrize("name", list(SB3))
def test_1_sb3_agent_loads_without_unpickling_its_serialized_entries(name, tmp_path):
    """Every ``:serialized:`` entry of model.zip's data carries a payload: the agent still loads, acts as saved,
    and nothing ran (SB3 alone would cloudpickle.loads each entry)."""
    agent, obs = saved_sb3_agent(name, tmp_path / name)
    before = agent.act(obs)
    marker = tmp_path / "ran"

    def poison(member, raw):
        if member != "data":
            return raw
        data = json.loads(raw)
        for value in data.values():
            if isinstance(value, dict) and ":serialized:" in value:
                value[":serialized:"] = serialized(Payload(marker))
        return json.dumps(data).encode()

    rewrite_zip(tmp_path / name / "model.zip", poison)
    if name == "recurrent-ppo":
        agent._state = None
    back = Agent.load(tmp_path / name)
    assert not marker.exists(), "loading the agent ran the crafted payload"
    assert type(back) is type(agent) and np.array_equal(back.act(obs), before)


def test_1_unknown_serialized_entry_is_refused_and_never_unpickled(tmp_path):
    saved_sb3_agent("ppo", tmp_path / "ppo")
    marker = tmp_path / "ran"

    def add(member, raw):
        if member != "data":
            return raw
        data = json.loads(raw)
        data["gadget"] = {":type:": "<class 'object'>", ":serialized:": serialized(Payload(marker))}
        return json.dumps(data).encode()

    rewrite_zip(tmp_path / "ppo" / "model.zip", add)
    with pytest.raises(ValueError, match=r"model\.zip.*'gadget'"):
        Agent.load(tmp_path / "ppo")
    assert not marker.exists()


def test_1_policy_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    import torch

    saved_sb3_agent("ppo", tmp_path / "ppo")
    marker = tmp_path / "ran"

    def crafted_weights(member, raw):
        if member != "policy.pth":
            return raw
        buf = io.BytesIO()
        torch.save({"mlp_extractor.gadget": Payload(marker)}, buf)
        return buf.getvalue()

    rewrite_zip(tmp_path / "ppo" / "model.zip", crafted_weights)
    with pytest.raises(ValueError, match=r"model\.zip.*policy\.pth.*tensors"):
        Agent.load(tmp_path / "ppo")
    assert not marker.exists()


def test_1_a_damaged_model_zip_is_one_error_naming_it(tmp_path):
    saved_sb3_agent("ppo", tmp_path / "ppo")
    (tmp_path / "ppo" / "model.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"model\.zip"):
        Agent.load(tmp_path / "ppo")


@pytest.mark.parametrize("target", ["planted_module:Anything", "os:system", "agents_planted:Thing"])
def test_1_agent_json_class_outside_the_registry_and_agents_is_refused_before_import(target, tmp_path,
                                                                                   monkeypatch):
    plant = tmp_path / "plant"
    plant.mkdir()
    marker = tmp_path / "imported"
    for module in ("planted_module", "agents_planted"):
        (plant / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(plant))
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "agent.json").write_text(json.dumps({"class": target, "state": {}}))
    module = target.split(":")[0]
    with pytest.raises(ValueError, match=rf"agent\.json.*{module}.*agents\.references:AlwaysExecute"):
        Agent.load(tmp_path / "agent")
    assert not marker.exists(), "the module named in agent.json was imported"
    for module in ("planted_module", "agents_planted"):
        sys.modules.pop(module, None)


def test_1_registered_and_agents_package_classes_still_load(tmp_path):
    from agents.references import FirstK

    FirstK(k=2, num_layers=4).save(tmp_path / "first-k")
    assert isinstance(Agent.load(tmp_path / "first-k"), FirstK)
    # a class of a module under agents/ that is not in the registry (e.g. FixedPath) is accepted too
    (tmp_path / "fixed").mkdir()
    (tmp_path / "fixed" / "agent.json").write_text(json.dumps({"class": "agents.references:FixedPath",
                                                               "state": {"path": [1, 0]}}))
    assert Agent.load(tmp_path / "fixed").path.tolist() == [1, 0]


def test_1_retime_refuses_a_crafted_agent_with_one_line(tmp_path, monkeypatch, capsys):
    """benchmarks/agents.py --retime follows ``agent_dir`` from agents.json: a crafted agent there is refused
    (before any model is loaded), naming the row's agent directory, and nothing runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_agents_h21", BENCH / "agents.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    saved_sb3_agent("ppo", tmp_path / "ppo")
    marker = tmp_path / "ran"

    def poison(member, raw):
        if member != "data":
            return raw
        data = json.loads(raw)
        data["gadget"] = {":type:": "<class 'object'>", ":serialized:": serialized(Payload(marker))}
        return json.dumps(data).encode()

    rewrite_zip(tmp_path / "ppo" / "model.zip", poison)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the agent was checked")

    monkeypatch.setattr(bench.DPBert, "load", no_model)
    rows = [{"task": "rte", "agent": "ppo", "backbone_mode": "frozen", "speedup_measured": None, "model": "m",
             "dev_score": 50.0, "agent_dir": str(tmp_path / "ppo")}]
    args = SimpleNamespace(data_dir=None, output_dir=str(tmp_path), latency_samples=1)
    with pytest.raises(SystemExit) as stop:
        bench.retime(rows, args, tmp_path)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("agents.py: error: rte/ppo: ") and err.count("\n") == 1
    assert "'gadget'" in err and str(tmp_path / "ppo") in err and not marker.exists()


# ---------------------------------------------------------------------- 10. silently accepted
def cli(tiny_model_dir, tiny_glue, out, *extra):
    return ["train", "--model", tiny_model_dir, "--task", "rte", "--data-dir", str(tiny_glue), "--total-steps", "8",
            "--num-envs", "4", "--latency-samples", "1", "--output-dir", str(out), *extra]


def test_10_sb3_agents_get_the_penalty_rate_control_in_the_env_reward(tiny_model_dir, tiny_glue, tmp_path):
    """--rate-control penalty for PPO was recorded as 'penalty' and applied nowhere; now the env pays
    ``-beta (S - r)^2`` per episode (eq. 11), and the row says which."""
    from agents.cli import train_agent

    ns = SimpleNamespace(model=tiny_model_dir, task="rte", data_dir=str(tiny_glue), backbone_mode="frozen",
                         env="live", features="auto", reward="loss", cache_dir=str(tmp_path / "cache"),
                         total_steps=8, num_envs=4, max_train_samples=None, max_eval_samples=None, lam=0.0, cost=1.0,
                         target_rate=0.5, rate_control="penalty", dual_lr=0.002,
                         agent_kwargs={"ppo": {"n_steps": 2, "batch_size": 8}}, latency_samples=0, seed=0,
                         output_dir=str(tmp_path / "out"))
    trained = train_agent("ppo", ns)
    env = trained["env"]
    assert env.core.target_rate == 0.5 and env.core.rate_coef > 0
    env.reset(seed=0)
    for _ in range(env.num_layers - 1):
        env.step(np.zeros(4, dtype=np.int64))
    _, r, *_ = env.step(np.zeros(4, dtype=np.int64))  # everything skipped: S = 1, lambda 0
    assert np.allclose(r, -env.core.rate_coef * 0.25)
    # REINFORCE keeps its own (batch) penalty and the env stays unshaped: not charged twice
    trained = train_agent("reinforce", SimpleNamespace(**{**vars(ns), "agent_kwargs": {}}))
    assert trained["env"].core.target_rate is None and trained["agent"].config.target_rate == 0.5


def test_10_agent_kwargs_for_an_agent_not_run_are_refused(tiny_model_dir, tiny_glue, tmp_path, capsys):
    code = agents_main(cli(tiny_model_dir, tiny_glue, tmp_path / "o", "--agent", "random",
                           "--agent-kwargs", '{"reinforce": {"lr": 0.1}}'))
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "o" / "results.json").exists()
    assert "--agent-kwargs" in err and "'reinforce'" in err and "random" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("agent, bad, accepted", [("ppo", "bogus", "n_steps"), ("reinforce", "n_steps", "baseline"),
                                                  ("first-k", "rate", "k")])
def test_10_unknown_agent_keywords_are_one_error_naming_agent_keyword_and_accepted(agent, bad, accepted,
                                                                                   tiny_model_dir, tiny_glue,
                                                                                   tmp_path, capsys):
    code = agents_main(cli(tiny_model_dir, tiny_glue, tmp_path / "o", "--agent", agent,
                           "--agent-kwargs", json.dumps({agent: {bad: 1}})))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dpbert-rl agents: error: ") and err.count("\n") == 1
    assert f"'{agent}'" in err and f"'{bad}'" in err and accepted in err


def test_10_reference_agent_kwargs_are_used_not_dropped(tiny_model_dir, tiny_glue, tmp_path):
    assert agents_main(cli(tiny_model_dir, tiny_glue, tmp_path / "o", "--agent", "first-k",
                           "--agent-kwargs", '{"first-k": {"k": 1}}')) == 0
    assert Agent.load(tmp_path / "o" / "agents" / "first-k").k == 1


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_10_compare_with_no_agents_is_refused(value, tiny_model_dir, tiny_glue, tmp_path, capsys):
    args = cli(tiny_model_dir, tiny_glue, tmp_path / "o", "--agents", value)
    args[0] = "compare"
    assert agents_main(args) == 2
    err = capsys.readouterr().err
    assert "--agents" in err and "no agent" in err and not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------- 11. env arguments, one check for both envs
BAD_ENV_ARGS = [
    (dict(c=-1.0), r"c must be a finite number >= 0; got -1.0"),
    (dict(lambda_=float("nan")), r"lambda_ must be a finite number >= 0; got nan"),
    (dict(rate_coef=-1.0), r"rate_coef must be a finite number >= 0"),
    (dict(max_samples=0), r"max_samples must be a whole number >= 1"),
    (dict(stats_samples=0.5), r"stats_samples must be a whole number >= 2"),
    (dict(target_rate=1.5), r"target_rate must be a finite number in \[0, 1\] \(or none\); got 1.5"),
    (dict(observation="image"), r"observation must be one of"),
    (dict(reward="accuracy"), r"reward must be one of"),
    (dict(features="pooled"), r"features must be 'auto' or one of"),
]


@pytest.mark.parametrize("env_class", [LayerSkipEnv, LayerSkipTreeEnv])
@pytest.mark.parametrize("kw, message", BAD_ENV_ARGS)
def test_11_both_envs_refuse_the_same_arguments_with_the_same_error(env_class, kw, message, tiny_model_dir,
                                                                    tiny_glue, tmp_path):
    extra = {"cache_dir": str(tmp_path / "cache"), "progress": False} if env_class is LayerSkipTreeEnv else {}
    with pytest.raises(ValueError, match=message):
        env_class(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, max_seq_length=32, **extra, **kw)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "a cache was built first"


def test_11_one_shared_check():
    import inspect

    import envs.layer_skip as live
    import envs.layer_skip_tree as tree

    assert "check_env_args(" in inspect.getsource(live._Episodes.__init__)
    assert "check_env_args(" in inspect.getsource(tree._TreeEpisodes.__init__)
    assert tree.check_env_args is live.check_env_args


@pytest.mark.parametrize("env_class", [BatchedLayerSkipEnv, BatchedLayerSkipTreeEnv])
@pytest.mark.parametrize("num_envs", [2.5, 0, "4", True])
def test_11_num_envs_must_be_a_whole_number(env_class, num_envs, tiny_model_dir, tiny_glue, tmp_path):
    with pytest.raises(ValueError, match=r"num_envs must be a whole number >= 1; got "):
        env_class(num_envs=num_envs, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir,
                  **({"cache_dir": str(tmp_path)} if env_class is BatchedLayerSkipTreeEnv else {}))


# ---------------------------------------------------------------------- 13. one line instead of a traceback
def run_routing_report_only(results: Path, monkeypatch, capsys) -> tuple:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_routing_h21", BENCH / "routing.py")
    routing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(routing)
    monkeypatch.setattr(sys, "argv", ["routing.py", "--report-only", "--results", str(results)])
    with pytest.raises(SystemExit) as stop:
        routing.main()
    return stop.value.code, capsys.readouterr().err


GOOD_ROW = {"task": "rte", "learner": "dpbert", "backbone_mode": "frozen", "features": "mean", "score": 60.0,
            "layers_executed_mean": 4.0, "fixed_frontier_score": 58.0, "margin": 2.0, "margin_ci95": [-1.0, 5.0],
            "distinct_paths": 3, "mid_gate_fraction": 0.1, "probe_score": 55.0, "commit": "abc", "command": "x"}


@pytest.mark.parametrize("text, expected", [
    (json.dumps([GOOD_ROW])[:40], r"not valid JSON"),
    (json.dumps({"rows": [GOOD_ROW]}), r"expected a JSON list of rows"),
    (json.dumps([GOOD_ROW, {k: v for k, v in GOOD_ROW.items() if k != "margin_ci95"}]),
     r"row 2.*'margin_ci95'"),
    (json.dumps([{**GOOD_ROW, "score": "60.0"}]), r"row 1.*'score'.*a number"),
    (json.dumps([{**GOOD_ROW, "margin_ci95": [1.0]}]), r"row 1.*'margin_ci95'.*two numbers"),
    (json.dumps([GOOD_ROW, 3]), r"row 2.*an object"),
])
def test_13_routing_report_only_on_a_damaged_results_file(text, expected, tmp_path, monkeypatch, capsys):
    results = tmp_path / "routing.json"
    results.write_text(text)
    code, err = run_routing_report_only(results, monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("routing.py: error: ") and str(results) in err
    import re

    assert re.search(expected, err), err


def test_13_routing_report_only_still_writes_a_good_file(tmp_path, monkeypatch, capsys):
    results = tmp_path / "routing.json"
    results.write_text(json.dumps([GOOD_ROW, {**GOOD_ROW, "learner": "ppo", "probe_score": None}]))
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_routing_h21", BENCH / "routing.py")
    routing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(routing)
    monkeypatch.setattr(sys, "argv", ["routing.py", "--report-only", "--results", str(results)])
    routing.main()
    assert "| rte | ppo |" in results.with_suffix(".md").read_text()


def test_13_tree_env_refuses_a_sequence_length_beyond_the_positions(tiny_model_dir, tiny_glue, tmp_path):
    """A text longer than the backbone's 128 positions, tokenised to 256, crashed inside the embeddings while
    the cache was built; now the tree env refuses the length up front, naming the limit, as the live env does."""
    glue = shutil.copytree(tiny_glue, tmp_path / "glue")
    with open(glue / "RTE" / "train.tsv", "a") as f:
        f.write("48\t" + " ".join(["the dog"] * 100) + "\tthe cat\tentailment\n")
    for env_class in (LayerSkipTreeEnv, LayerSkipEnv):
        extra = {"cache_dir": str(tmp_path / "cache"), "progress": False} if env_class is LayerSkipTreeEnv else {}
        with pytest.raises(ValueError, match=r"max_seq_length.* 256 exceeds the 128 positions"):
            env_class(task="rte", data_dir=str(glue), model=tiny_model_dir, max_seq_length=256, **extra)
