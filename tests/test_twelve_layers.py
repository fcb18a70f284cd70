"""The 12-layer regime on a tiny 12-layer model (issue 22): the exact path tree refuses with a message that
says what scales, before any work; sampled stage 3 ('rl') and the live environment run at L = 12."""

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_checkpoint
from dpbert_rl.model import DPBert
from dpbert_rl.training import PipelineConfig, TrainConfig, run_pipeline, train_stage
from dpbert_rl.training.exact import ExactConfig, train_exact


@pytest.fixture(scope="module")
def tiny12(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny12_hf"), layers=12)
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny12")
    DPBert.from_backbone(str(ckpt), planner_init_bias=0.0).save(model_dir)
    return ckpt, model_dir


def test_the_exact_tree_is_refused_at_twelve_layers_before_any_cache(tiny12, tiny_glue, tmp_path):
    _, model_dir = tiny12
    cfg = ExactConfig(task="rte", data_dir=str(tiny_glue), output_dir=str(tmp_path / "x"),
                      cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(ValueError, match=r"12 layers: its path tree takes 4,095 layer calls.*--stage3 rl"):
        train_exact(str(model_dir), cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x" / "model").exists()


def test_the_pipeline_refuses_exact_stage3_at_twelve_layers_before_stage_1(tiny12, tiny_glue, tmp_path):
    ckpt, _ = tiny12
    cfg = PipelineConfig(task="rte", backbone=str(ckpt), data_dir=str(tiny_glue), output_dir=str(tmp_path / "p"),
                         progress=False, max_steps=1)
    with pytest.raises(ValueError, match="4,095"):
        run_pipeline(cfg)
    assert not (tmp_path / "p" / "stage1_finetune").exists()


def test_sampled_stage3_trains_and_skips_at_twelve_layers(tiny12, tiny_glue, tmp_path):
    _, model_dir = tiny12
    cfg = TrainConfig(task="rte", backbone=str(model_dir), data_dir=str(tiny_glue), output_dir=str(tmp_path / "rl"),
                      batch_size=8, eval_batch_size=16, progress=False, max_steps=3, eval_steps=3, save_steps=100,
                      logging_steps=1, lr=1e-4, target_rate=0.3)
    out = train_stage("rl", cfg, init=str(model_dir))
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["charts/layers_executed"] for r in rows if "charts/layers_executed" in r]
    assert sampled and all(0 < x < 12 for x in sampled)  # planners at p = 0.5: about half the layers
    assert DPBert.load(out).num_layers == 12


def test_the_live_env_plays_twelve_steps_and_skips_rows(tiny12, tiny_glue):
    from envs.layer_skip import BatchedLayerSkipEnv

    _, model_dir = tiny12
    env = BatchedLayerSkipEnv(num_envs=4, task="rte", data_dir=str(tiny_glue), split="fit", model=str(model_dir),
                              check_reward=False)
    calls = []
    real = env.model.execute

    def spy(i, hidden, mask, execute=None, **kw):
        calls.append(int(hidden.shape[0] if execute is None else execute.sum()))
        return real(i, hidden, mask, execute, **kw)

    env.model.execute = spy
    obs, _ = env.reset(seed=0)
    actions = np.array([1, 0, 1, 0])
    done = np.zeros(4, bool)
    steps = 0
    while not done.all():
        obs, reward, terminated, truncated, info = env.step(actions)
        done |= terminated | truncated
        steps += 1
    assert steps == 12
    assert sum(calls) == 2 * 12  # only the two executing rows are computed, at every layer
