"""The Gymnasium environments: checkers, eq. (9), determinism, vector == N singles, joint mode, errors."""

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from dpbert_rl.data import collator, load_split, tokenize
from dpbert_rl.model import DPBert
from envs.layer_skip import BatchedLayerSkipEnv, LayerSkipEnv
from envs.sb3 import SB3VecEnv
from tests.conftest import run_readme_example


def make(tiny_model_dir, tiny_glue, **kw):
    return LayerSkipEnv(task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, **kw)


def make_vec(tiny_model_dir, tiny_glue, n=4, **kw):
    return BatchedLayerSkipEnv(num_envs=n, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir, **kw)


def assert_checker_is_quiet(check, env, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(env, **kw)
    noisy = [str(w.message) for w in caught if "dtype" in str(w.message) or "space" in str(w.message)
             or "bound" in str(w.message) or "infinity" in str(w.message)]
    assert not noisy, noisy


def test_gymnasium_checker_passes_without_warnings(tiny_model_dir, tiny_glue):
    from gymnasium.utils.env_checker import check_env

    for obs in ("box", "dict"):
        assert_checker_is_quiet(check_env, make(tiny_model_dir, tiny_glue, observation=obs), skip_render_check=True)


def test_sb3_checker_passes_without_warnings(tiny_model_dir, tiny_glue):
    from stable_baselines3.common.env_checker import check_env

    assert_checker_is_quiet(check_env, make(tiny_model_dir, tiny_glue), warn=True)


def test_return_to_go_equals_eq9_from_the_model(tiny_model_dir, tiny_glue):
    env = make(tiny_model_dir, tiny_glue, c=0.7, lambda_=3.0)
    path = [1, 0, 1, 1]
    obs, info = env.reset(options={"index": 5})
    rewards = []
    for a in path:
        obs, r, terminated, truncated, info = env.step(a)
        rewards.append(r)
    assert terminated and not truncated and info["layers_executed"] == 3 and list(info["path"]) == path
    rtg = np.cumsum(rewards[::-1])[::-1]
    # independently: the model's own path execution and eq. (9)
    model = DPBert.load(tiny_model_dir).eval()
    ds = tokenize(load_split("rte", "train", str(tiny_glue)), model.tokenizer, 128)
    b = collator(model.tokenizer)([ds[5]])
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], labels=b["labels"], mode="path",
                    actions=torch.tensor(path))
    # eq. (9) by hand: path [1, 0, 1, 1] executes 3, 2, 2, 1 layers from step i on
    expected = -0.7 * np.array([3.0, 2.0, 2.0, 1.0]) - 3.0 * out.per_example_loss.item()
    assert np.allclose(rtg, expected, atol=1e-5)
    assert info["loss"] == pytest.approx(out.per_example_loss.item(), abs=1e-5)


def test_same_seed_same_episodes(tiny_model_dir, tiny_glue):
    a, b = make(tiny_model_dir, tiny_glue), make(tiny_model_dir, tiny_glue)
    for env_seed in (3, 11):
        oa, ia = a.reset(seed=env_seed)
        ob, ib = b.reset(seed=env_seed)
        assert ia == ib and np.array_equal(oa, ob)
        for act in (1, 0, 1, 1):
            ra, rb = a.step(act), b.step(act)
            assert np.array_equal(ra[0], rb[0]) and ra[1] == rb[1]


@pytest.mark.parametrize("features", ["cls", "mean", "cls+mean"])
def test_skip_leaves_the_observed_state_unchanged(tiny_model_dir, tiny_glue, features):
    from dpbert_rl.model.planner import raw_features

    env = make(tiny_model_dir, tiny_glue, features=features)
    obs, _ = env.reset(seed=0)
    d = env.feature_dim
    assert d == (64 if features == "cls+mean" else 32) and env.observation_space.shape == (d + env.num_layers,)
    p, core = env.observer, env.core

    def expected(i):  # the state's raw features, standardised by hand with layer i's statistics
        x = raw_features(core.h, core.mask, features)[0].numpy()
        return np.clip((x - p.feature_mean[i].numpy()) / p.feature_std[i].numpy(), -10, 10)

    h0 = core.h.clone()
    assert np.allclose(obs[:d], expected(0), atol=1e-4)
    nxt, *_ = env.step(0)
    assert torch.equal(core.h, h0) and np.allclose(nxt[:d], expected(1), atol=1e-4)
    assert obs[d:].argmax() == 0 and nxt[d:].argmax() == 1
    env.step(1)
    assert not torch.allclose(core.h, h0)


def test_observations_are_standardised_on_the_env_inputs(tiny_model_dir, tiny_glue):
    """Per layer, the feature part has mean ~0 and std ~1 over the inputs whose statistics it uses."""
    env = make_vec(tiny_model_dir, tiny_glue, n=48, features="mean")
    obs, _ = env.reset(options={"indices": np.arange(48)})
    z = obs[:, :env.feature_dim]
    assert np.abs(z.mean(0)).max() < 1e-3 and np.allclose(z.std(0, ddof=1), 1.0, atol=1e-2)


def test_vector_env_yields_the_transitions_of_n_single_envs(tiny_model_dir, tiny_glue):
    n = 4
    vec = make_vec(tiny_model_dir, tiny_glue, n=n)
    singles = [make(tiny_model_dir, tiny_glue) for _ in range(n)]
    indices = np.array([0, 7, 13, 21])
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(vec.num_layers, n))
    vobs, _ = vec.reset(seed=0, options={"indices": indices})
    sobs = [s.reset(options={"index": int(k)})[0] for s, k in zip(singles, indices)]
    for j in range(n):
        assert np.allclose(vobs[j], sobs[j], atol=1e-5)
    for step in range(vec.num_layers):
        vobs, vrew, vterm, vtrunc, vinfo = vec.step(actions[step])
        for j, s in enumerate(singles):
            o, r, term, trunc, info = s.step(int(actions[step, j]))
            assert r == pytest.approx(vrew[j], abs=1e-5) and term == vterm[j] and trunc == vtrunc[j]
            if term:
                assert np.allclose(vinfo["final_obs"][j], o, atol=1e-5)
                assert vinfo["final_info"]["loss"][j] == pytest.approx(info["loss"], abs=1e-5)
                assert list(vinfo["final_info"]["path"][j]) == list(info["path"])
            else:
                assert np.allclose(vobs[j], o, atol=1e-5)
    # same-step autoreset: the observation returned at the end starts new episodes at layer 0
    d = vec.feature_dim
    assert (vobs[:, d:].argmax(1) == 0).all()


def test_joint_mode_trains_the_backbone_and_frozen_does_not(tiny_model_dir, tiny_glue):
    def run(mode):
        vec = make_vec(tiny_model_dir, tiny_glue, n=4, backbone_mode=mode, joint_update_every=4, joint_lr=1e-2)
        before = {k: v.clone() for k, v in vec.model.backbone.state_dict().items()}
        vec.reset(seed=0)
        for _ in range(vec.num_layers * 2):
            vec.step(np.ones(4, dtype=int))
        after = vec.model.backbone.state_dict()
        return any(not torch.equal(before[k], after[k]) for k in before)

    assert run("joint") and not run("frozen")


def test_errors_are_clear(tiny_model_dir, tiny_glue):
    env = make(tiny_model_dir, tiny_glue)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"0 \(skip\) or 1 \(execute\)"):
        env.step(2)
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"idx": 1})
    with pytest.raises(ValueError, match="outside"):
        env.reset(options={"index": 10_000})
    env.reset(seed=0)
    for _ in range(env.num_layers):
        env.step(1)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(1)
    vec = make_vec(tiny_model_dir, tiny_glue, n=4)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected 4 actions"):
        vec.step(np.ones(3, dtype=int))
    with pytest.raises(ValueError, match="observation must be"):
        make(tiny_model_dir, tiny_glue, observation="image")
    with pytest.raises(ValueError, match="backbone_mode"):
        make(tiny_model_dir, tiny_glue, backbone_mode="thawed")


def test_registered_ids_make_and_make_vec(tiny_model_dir, tiny_glue):
    env = gym.make(envs.ENV_ID, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    vec = gym.make_vec(envs.ENV_ID, num_envs=3, task="rte", data_dir=str(tiny_glue), model=tiny_model_dir)
    assert isinstance(vec.unwrapped, BatchedLayerSkipEnv) and vec.num_envs == 3
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (3, env.observation_space.shape[0])


def test_importing_envs_loads_no_model():
    code = "import sys, envs; print('dpbert_rl.model' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_sb3_adapter_protocol_and_ppo_under_vecmonitor(tiny_model_dir, tiny_glue):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    venv = SB3VecEnv(make_vec(tiny_model_dir, tiny_glue, n=4))
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (4, venv.observation_space.shape[0])
    for step in range(venv.venv.num_layers):
        obs, rew, dones, infos = venv.step(np.ones(4, dtype=int))
    assert dones.all() and all("terminal_observation" in i and i["TimeLimit.truncated"] is False for i in infos)
    monitored = VecMonitor(venv)
    model = PPO("MlpPolicy", monitored, n_steps=8, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=64)
    assert model.num_timesteps >= 64
    assert monitored.episode_count >= 64 // venv.venv.num_layers  # every episode ended and was counted


@pytest.mark.integration
def test_readme_environment_example_runs_as_written(glue_dir, monkeypatch):
    """The README's gymnasium + PPO example, verbatim, from the repository root."""
    scope = run_readme_example("PPO(", glue_dir, monkeypatch)
    assert scope["model"].num_timesteps >= 1024
