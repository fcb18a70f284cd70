"""Agents: the protocol for every algorithm, REINFORCE == the stage-3 trainer, TensorBoard, CLI."""

import json

import numpy as np
import pytest
import torch

from agents.base import REGISTRY, Agent, make_agent, resolve
from agents.reinforce import ReinforceAgent
from dpbert_rl.data import collator, load_split, tokenize
from dpbert_rl.model import DPBert
from dpbert_rl.model.objectives import dpbert_objective
from envs.layer_skip import BatchedLayerSkipEnv
from tests.conftest import run_readme_example

AGENTS = {  # settings that learn the tiny, trivially learnable tasks below within 512 steps
    "reinforce": {"seed": 0, "lr": 0.1},
    "ppo": {"seed": 0, "n_steps": 8, "batch_size": 32, "n_epochs": 4, "learning_rate": 3e-3},
    "a2c": {"seed": 0, "n_steps": 4, "learning_rate": 3e-3},
    "dqn": {"seed": 0, "learning_starts": 16, "buffer_size": 1000, "train_freq": 1, "learning_rate": 3e-3,
            "target_update_interval": 32, "exploration_fraction": 0.5, "gamma": 0.9},
    "recurrent-ppo": {"seed": 0, "n_steps": 8, "batch_size": 32, "n_epochs": 4, "learning_rate": 3e-3},
    "always": {"num_layers": 4},
    "random": {"rate": 0.5, "num_layers": 4},
    "first-k": {"k": 2, "num_layers": 4},
    "every-other": {"num_layers": 4},
}
LEARNING = ("reinforce", "ppo", "a2c", "dqn", "recurrent-ppo")
# Two reward settings with opposite best policies, so that no fixed behaviour passes both:
# every executed layer costs 1 and nothing else counts -> skip everything;
# layers are free and any skipped fraction is charged 10 x its square at the end -> execute everything.
SKIP_PAYS = dict(c=1.0, lambda_=0.0)
EXECUTE_PAYS = dict(c=0.0, lambda_=0.0, target_rate=0.0, rate_coef=10.0)


def vec(tiny_model_dir, tiny_glue, n=4, **kw):
    return BatchedLayerSkipEnv(num_envs=n, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, **kw)


def greedy_execute_rate(agent, env) -> float:
    """Fraction of layers the agent's greedy policy executes over one batch of episodes."""
    obs, _ = env.reset(seed=123)
    acts = []
    for _ in range(env.num_layers):
        acts.append(agent.act(obs, deterministic=True))
        obs, *_ = env.step(acts[-1])
    return float(np.mean(acts))


# Known limitation (strict xfail, so a fix shows up as a failure to remove it): on standardised features
# the linear REINFORCE planners do not settle this input-independent bandit within 16 updates: states
# off the full path (after a skip) read far outside the statistics (clipped to +-10), and the planner
# weights chase that noise instead of the bias. With raw [CLS] features it learned (an accidental free
# bias: raw [CLS] has a large common component).
LEARNING_CASES = [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="see the comment above"))
                  if n == "reinforce" else n for n in LEARNING]


@pytest.mark.parametrize("name", LEARNING_CASES)
def test_every_learning_agent_learns_which_layers_pay(name, tiny_model_dir, tiny_glue, tmp_path):
    for reward, want in ((SKIP_PAYS, 0.0), (EXECUTE_PAYS, 1.0)):
        # the decision here does not depend on the input: features that barely vary keep it a bandit
        env = vec(tiny_model_dir, tiny_glue, n=8, features="cls", **reward)
        agent = make_agent(name, **AGENTS[name])
        seen = []
        agent.learn(env, total_steps=512, callback=lambda s: seen.append(s))
        assert abs(greedy_execute_rate(agent, env) - want) <= 0.1, (name, reward)
        if name in ("reinforce", "ppo", "a2c"):
            assert seen and {"charts/skip_rate", "charts/layers_executed"} <= set(seen[-1])
    # what it learned survives save and load
    obs, _ = env.reset(seed=1)
    agent.save(tmp_path / name)
    back = Agent.load(tmp_path / name)
    assert type(back) is type(agent)
    if name == "recurrent-ppo":
        agent._state = back._state = None
    assert np.array_equal(back.act(obs, deterministic=True), agent.act(obs, deterministic=True))


@pytest.mark.parametrize("name", [n for n in AGENTS if n not in LEARNING])
def test_every_reference_agent_acts_and_round_trips(name, tiny_model_dir, tiny_glue, tmp_path):
    env = vec(tiny_model_dir, tiny_glue)
    agent = make_agent(name, **AGENTS[name])
    agent.learn(env, total_steps=64)
    obs, _ = env.reset(seed=1)
    actions = agent.act(obs, deterministic=True)
    assert actions.shape == (4,) and set(actions.tolist()) <= {0, 1}
    agent.save(tmp_path / name)
    back = Agent.load(tmp_path / name)
    assert type(back) is type(agent)
    if name != "random":
        assert np.array_equal(back.act(obs, deterministic=True), agent.act(obs, deterministic=True))


def test_references_follow_their_paths(tiny_model_dir, tiny_glue):
    env = vec(tiny_model_dir, tiny_glue)
    obs, _ = env.reset(seed=0)
    paths = {name: [] for name in ("always", "first-k", "every-other")}
    agents = {name: make_agent(name, **AGENTS[name]) for name in paths}
    for i in range(env.num_layers):
        for name, agent in agents.items():
            paths[name].append(agent.act(obs)[0])
        obs, *_ = env.step(np.ones(4, dtype=int))
    assert paths == {"always": [1, 1, 1, 1], "first-k": [1, 1, 0, 0], "every-other": [1, 0, 1, 0]}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_agent("random", rate=1.5)


def test_registry_and_plugin_errors():
    assert resolve("reinforce") is ReinforceAgent
    assert resolve("agents.reinforce:ReinforceAgent") is ReinforceAgent
    with pytest.raises(ValueError, match="unknown agent 'sac'"):
        resolve("sac")
    with pytest.raises(ValueError, match="not an agents.base.Agent"):
        resolve("numpy:ndarray")
    assert set(AGENTS) <= set(REGISTRY)


def test_reinforce_gradient_equals_the_stage3_trainer(tiny_model_dir, tiny_glue):
    """Same batch, same sampled actions: the agent's planner gradient is that of eq. (12)."""
    n, c, lam, beta, rate = 6, 1.0, 5.0, 3.0, 0.4
    env = vec(tiny_model_dir, tiny_glue, n=n, c=c, lambda_=lam)
    agent = ReinforceAgent(baseline="batch-mean", target_rate=rate, beta=beta)
    agent._build(env.num_layers, env.feature_dim)
    with torch.no_grad():
        agent.planners.weight.normal_(0, 0.5)
    model = DPBert.load(tiny_model_dir).eval()
    model.planners.load_state_dict(agent.planners.state_dict())
    # the model's planners read what the env shows: the same features and statistics
    model.planners.features = env.observer.features  # what the env shows: same features, same statistics
    model.planners.set_feature_stats(env.observer.feature_mean, env.observer.feature_std)
    indices = np.arange(n)
    actions = np.random.default_rng(0).integers(0, 2, size=(n, env.num_layers))
    obs, _ = env.reset(options={"indices": indices})
    observations, rewards = [], []
    for i in range(env.num_layers):
        observations.append(obs)
        obs, r, *_ = env.step(actions[:, i])
        rewards.append(r)
    loss = agent.loss(observations, actions, np.stack(rewards, 1))["loss"]
    loss.backward()
    # the trainer's objective on the same inputs and actions
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), model.tokenizer, 128)
    b = collator(model.tokenizer)([ds[int(k)] for k in indices])
    out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], labels=b["labels"], mode="path",
                actions=torch.as_tensor(actions))
    J = dpbert_objective(out.loss, out.log_probs, out.probs, out.actions, out.per_example_loss, c, lam, beta, rate,
                         "batch-mean")["loss"]
    J.backward()
    assert torch.allclose(agent.planners.weight.grad, model.planners.weight.grad, atol=1e-4)
    assert torch.allclose(agent.planners.bias.grad, model.planners.bias.grad, atol=1e-5)


def test_self_critical_baseline_replays_the_same_inputs(tiny_model_dir, tiny_glue):
    """b_i of the self-critical baseline is the return of the greedy path on the inputs just sampled. Planners
    with zero weights and biases (+1, -1, +1, -1) take the greedy path [1, 0, 1, 0] on every input (and sample
    other paths), so the greedy returns are known by hand: R_i = -c (layers executed from i on) - lambda
    loss, with the loss of each input on that path from the model itself."""
    n, c, lam = 4, 0.5, 3.0
    env = vec(tiny_model_dir, tiny_glue, n=n, c=c, lambda_=lam)
    agent = ReinforceAgent(baseline="self-critical")
    agent._build(env.num_layers, env.model.backbone.hidden_size)
    with torch.no_grad():
        agent.planners.weight.zero_()
        agent.planners.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    episodes, calls = [], []
    real_step, real_loss = env.step, agent.loss

    def step(actions):
        out = real_step(actions)
        if out[2].all():
            episodes.append(out[4]["final_info"]["index"].copy())
        return out

    def loss(observations, actions, rewards, greedy_returns=None):
        calls.append((actions.copy(), None if greedy_returns is None else greedy_returns.copy()))
        return real_loss(observations, actions, rewards, greedy_returns)

    env.step, agent.loss = step, loss
    agent.learn(env, total_steps=n * env.num_layers)  # one batch: sampled rollout, greedy replay, update
    (sampled_actions, greedy), = calls
    sampled, replayed = episodes[:2]
    assert np.array_equal(replayed, sampled)
    assert (sampled_actions != np.array([1, 0, 1, 0])).any(), "the test needs sampled paths that differ from greedy"
    model = DPBert.load(tiny_model_dir).eval()
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), model.tokenizer, 128)
    b = collator(model.tokenizer)([ds[int(k)] for k in sampled])
    with torch.no_grad():
        loss_on_path = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], labels=b["labels"],
                             mode="path", actions=torch.tensor([1, 0, 1, 0])).per_example_loss.numpy()
    expected = -c * np.array([2.0, 1.0, 1.0, 0.0])[None, :] - lam * loss_on_path[:, None]
    np.testing.assert_allclose(greedy, expected, atol=1e-5)


def test_agents_log_the_same_scalars_to_tensorboard(tiny_model_dir, tiny_glue, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("reinforce", "ppo"):
        make_agent(name, **AGENTS[name]).learn(vec(tiny_model_dir, tiny_glue), total_steps=64,
                                               log_dir=str(tmp_path / "tb" / name))
    for name in ("reinforce", "ppo"):
        events = list((tmp_path / "tb").glob(f"{name}*/events.out.tfevents*"))
        assert events, list((tmp_path / "tb").rglob("*"))
        tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
        assert {"charts/episodic_return", "charts/skip_rate", "charts/layers_executed"} <= set(tags), tags


def test_agents_compare_cli_writes_table_json_and_plot(tiny_model_dir, tiny_glue, tmp_path, capsys):
    from dpbert_rl.cli import main

    out = tmp_path / "cmp"
    assert main(["agents", "compare", "--agents", "reinforce,random,always", "--model", tiny_model_dir,
                 "--task", "rte", "--data-dir", str(tiny_glue), "--total-steps", "48", "--num-envs", "4", "--latency-samples", "3",
                 "--output-dir", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["agent"] for r in rows] == ["reinforce", "random", "always"]
    for r in rows:
        for key in ("task", "agent", "backbone_mode", "dev_score", "layers_executed_mean", "speedup_measured",
                    "random_same_rate_score", "env_steps", "train_seconds"):
            assert key in r
    assert rows[2]["layers_executed_mean"] == 4.0
    assert (out / "score_vs_layers.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "tb" / "reinforce").glob("events.out.tfevents*"):
        acc = EventAccumulator(str(events)).Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"eval/dev_score", "charts/episodic_return", "losses/entropy"} <= tags, tags
    assert "random@rate" in capsys.readouterr().out
    assert main(["agents", "train", "--agent", "sac", "--model", tiny_model_dir, "--task", "rte",
                 "--data-dir", str(tiny_glue), "--output-dir", str(out)]) == 2
    assert "unknown agent 'sac'" in capsys.readouterr().err


@pytest.mark.integration
def test_readme_plugin_example_runs_as_written(glue_dir, monkeypatch):
    scope = run_readme_example("class LayerBandit(Agent)", glue_dir, monkeypatch)
    assert scope["agent"].value.shape == (2, 6)
    assert np.abs(scope["agent"].value).sum() > 0  # it learned values from the rewards


def test_layer_price_is_settable_and_prices_the_next_steps(tiny_model_dir, tiny_glue):
    env = vec(tiny_model_dir, tiny_glue, n=4, c=1.0, lambda_=0.0)
    env.reset(seed=0)
    _, r, *_ = env.step(np.ones(4, dtype=np.int64))
    assert np.allclose(r, -1.0)
    env.layer_price = -0.25  # signed: a dual price may pay for executing
    _, r, *_ = env.step(np.array([1, 0, 1, 0]))
    assert np.allclose(r, [0.25, 0.0, 0.25, 0.0]) and env.layer_price == -0.25
    with pytest.raises(ValueError, match="finite"):
        env.layer_price = float("nan")


def test_dual_rate_control_moves_the_env_price_against_the_violation():
    from agents.rate import DualRateControl

    class Env:
        layer_price = 0.1

    env, seen = Env(), []
    control = DualRateControl(env, target_rate=0.25, lr=0.5, callback=seen.append)
    control({"steps": 8, "charts/skip_rate": 0.0})  # executes 1.0 > 0.75: a layer gets dearer
    assert env.layer_price == pytest.approx(0.1 + 0.5 * 0.25)
    control({"steps": 16, "charts/skip_rate": 0.75})  # executes 0.25 < 0.75: cheaper, past zero
    assert env.layer_price == pytest.approx(0.225 - 0.5 * 0.5) and env.layer_price < 0
    assert [h[0] for h in control.history] == [8, 16] and seen[-1]["charts/layer_price"] == env.layer_price


def test_dual_rate_control_holds_the_greedy_rate_measured_by_its_probe():
    """Training episodes at exactly the target (sampled execute rate 0.75) while the greedy actions, the ones the
    agent is scored on, execute every layer: without the probe the price never moves; with it the gap (0.25) is
    added between probes, and the probe runs on the first update and every ``probe_every`` after."""
    from agents.rate import DualRateControl

    class Env:
        layer_price = 0.0

    calls = []

    def greedy():
        calls.append(1)
        return 1.0

    blind, env = DualRateControl(Env(), target_rate=0.25, lr=0.1), Env()
    probed = DualRateControl(env, target_rate=0.25, lr=0.1, greedy_rate=greedy, probe_every=3)
    for step in range(1, 8):
        blind({"steps": step, "charts/skip_rate": 0.25})
        probed({"steps": step, "charts/skip_rate": 0.25})
    assert blind.env.layer_price == 0.0
    assert env.layer_price == pytest.approx(7 * 0.1 * 0.25) and len(calls) == 3  # updates 1, 4 and 7
    assert [p[0] for p in probed.probes] == [1, 4, 7] and probed.probes[0][1:] == (1.0, 0.75)
    assert all(h[2] == pytest.approx(1.0) for h in probed.history)
    with pytest.raises(ValueError, match="probe_every"):
        DualRateControl(Env(), 0.25, greedy_rate=greedy, probe_every=0)


def test_greedy_execute_rate_is_the_rate_of_the_agents_deterministic_paths(tiny_model_dir):
    from agents.rate import greedy_execute_rate
    from agents.references import FirstK

    model = DPBert.load(tiny_model_dir)
    probe = dict(model.tokenizer(["the man plays a song", "a dog"], padding=True, return_tensors="pt"))
    for k in (1, 3):
        assert greedy_execute_rate(FirstK(k=k, num_layers=4), model, probe) == pytest.approx(k / 4)


def test_agents_cli_dual_rate_control_and_agent_kwargs(tiny_model_dir, tiny_glue, tmp_path, capsys):
    from dpbert_rl.cli import main

    out = tmp_path / "dual"
    assert main(["agents", "train", "--agent", "ppo", "--model", tiny_model_dir, "--task", "rte",
                 "--data-dir", str(tiny_glue), "--total-steps", "96", "--num-envs", "4", "--latency-samples", "2",
                 "--target-rate", "0.5", "--dual-lr", "0.5", "--cost", "0.0",
                 "--agent-kwargs", '{"ppo": {"n_steps": 8, "batch_size": 16}}', "--output-dir", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["rate_control"] == "dual" and row["layer_price"] != 0.0 and row["rate_probe"] == 64
    assert Agent.load(out / "agents" / "ppo").model.n_steps == 8
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # argparse's own error: usage, message, exit status 2
        main(["agents", "train", "--model", tiny_model_dir, "--agent-kwargs", "{ppo: 1}"])
    assert exc.value.code == 2 and "not valid JSON" in capsys.readouterr().err
