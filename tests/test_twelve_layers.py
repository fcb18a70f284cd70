"""The 12-layer regime on a tiny 12-layer model (issue 22): the exact path tree refuses with a message that
says what scales, before any work; stage 3 'sampled' (planners only, an input's paths sharing their common
prefixes), the joint 'rl', the pipeline's 'auto' and the live environment run at L = 12."""

import json

import numpy as np
import pytest
import torch

from conftest import load_benchmark, make_tiny_checkpoint, nan_loss_at
from dpbert_rl.model import DPBert
from dpbert_rl.training import PipelineConfig, TrainConfig, resolve_stage3, run_pipeline, train_stage
from dpbert_rl.training.config import TrainingError
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
    with pytest.raises(ValueError, match=r"12 layers: its path tree takes 4,095 layer calls.*--stage3 sampled"):
        train_exact(str(model_dir), cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x" / "model").exists()


def test_the_pipeline_refuses_exact_stage3_at_twelve_layers_before_stage_1(tiny12, tiny_glue, tmp_path):
    ckpt, _ = tiny12
    cfg = PipelineConfig(task="rte", backbone=str(ckpt), data_dir=str(tiny_glue), output_dir=str(tmp_path / "p"),
                         progress=False, max_steps=1, stage3="exact")
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


def _repeated_batch(K=4):
    torch.manual_seed(1)
    ids = torch.randint(5, 30, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0), torch.arange(3).repeat_interleave(K)


def _count_layer_rows(model):
    rows, real = [], model.backbone.layer

    def spy(i, h, mask, bias=None):
        rows.append(h.shape[0])
        return real(i, h, mask, bias)

    model.backbone.layer = spy
    return rows


@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_shared_prefixes_give_the_same_paths_and_outputs_with_fewer_layer_calls(tiny12, bias):
    _, model_dir = tiny12
    model = DPBert.load(model_dir).eval()
    with torch.no_grad():
        model.planners.bias.fill_(bias)  # p = 0.5: paths part early; p = 0.95: long common prefixes
    ids, mask, shared = _repeated_batch()
    rows = _count_layer_rows(model)
    plain = model(ids, mask, mode="sample", generator=torch.Generator().manual_seed(3))
    n_plain = sum(rows)
    rows.clear()
    out = model(ids, mask, mode="sample", generator=torch.Generator().manual_seed(3), shared=shared)
    assert torch.equal(out.actions, plain.actions)
    assert torch.allclose(out.logits, plain.logits, atol=1e-6) and torch.allclose(out.probs, plain.probs, atol=1e-6)
    assert n_plain == int(plain.actions.sum())  # without sharing: one row per executed action
    # with sharing: one row per distinct executed prefix of each input
    prefixes = {(int(g), tuple(a[: i + 1].tolist())) for g, a in zip(shared, out.actions.long())
                for i in range(12) if a[i]}
    assert sum(rows) == len(prefixes) < n_plain


def test_shared_prefixes_backpropagate_like_separate_rows(tiny12):
    _, model_dir = tiny12
    grads = []
    for share in (False, True):
        model = DPBert.load(model_dir)
        model.train()
        model.backbone.eval()  # no dropout: an input's rows are equal
        ids, mask, shared = _repeated_batch()
        out = model(ids, mask, labels=torch.ones(len(ids), dtype=torch.long), mode="path",
                    actions=torch.tensor([[1, 1, 0] * 4] * 6 + [[1, 0, 1] * 4] * 6).float(),
                    shared=shared if share else None)
        (out.loss + out.log_probs.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_shared_prefixes_are_refused_with_dropout_on(tiny12):
    _, model_dir = tiny12
    model = DPBert.load(model_dir).train()
    ids, mask, shared = _repeated_batch()
    with pytest.raises(ValueError, match="backbone.eval"):
        model(ids, mask, mode="sample", shared=shared)
    with pytest.raises(ValueError, match="shape"):
        model.eval()(ids, mask, mode="sample", shared=shared[:-1])


def test_sampled_stage3_trains_the_planners_only_and_shares_prefixes(tiny12, tiny_glue, tmp_path, monkeypatch):
    _, model_dir = tiny12
    before = DPBert.load(model_dir)
    calls = []
    real = DPBert.execute_shared

    def spy(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(DPBert, "execute_shared", spy)
    cfg = TrainConfig(task="rte", backbone=str(model_dir), data_dir=str(tiny_glue), output_dir=str(tmp_path / "s"),
                      batch_size=4, eval_batch_size=16, progress=False, max_steps=3, eval_steps=3, save_steps=100,
                      logging_steps=1, target_rate=0.3, samples=4)
    after = DPBert.load(train_stage("sampled", cfg, init=str(model_dir)))
    assert calls  # the K paths of an input went through the shared-prefix call
    b0, b1 = before.backbone.state_dict(), after.backbone.state_dict()
    assert all(torch.equal(b0[k], b1[k]) for k in b0)  # backbone and head frozen
    assert any(not torch.equal(a, b) for a, b in zip(before.planners.parameters(), after.planners.parameters()))
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["charts/layers_executed"] for r in rows if "charts/layers_executed" in r]
    assert sampled and all(0 < x < 12 for x in sampled)
    assert any("charts/layer_price" in r for r in rows)  # the dual price holds the rate


def test_auto_stage3_is_exact_up_to_eight_layers_and_sampled_above(tiny12, tmp_path):
    ckpt, _ = tiny12
    assert resolve_stage3("auto", str(ckpt)) == "sampled"
    assert resolve_stage3("auto", str(make_tiny_checkpoint(tmp_path / "six", layers=6))) == "exact"
    assert resolve_stage3("rl", str(ckpt)) == "rl"


def test_the_default_pipeline_runs_at_twelve_layers_with_sampled_stage3_and_adapt(tiny12, tiny_glue, tmp_path):
    ckpt, _ = tiny12
    cfg = PipelineConfig(task="rte", backbone=str(ckpt), data_dir=str(tiny_glue), output_dir=str(tmp_path / "p"),
                         progress=False, max_steps=2, batch_size=8, eval_batch_size=16, target_rate=0.3,
                         latency_samples=4, latency_repeats=1, logging_steps=1)
    report = run_pipeline(cfg)
    for sub in ("stage3_sampled_frozen", "stage3_adapt", "stage3_sampled"):
        assert (tmp_path / "p" / sub / "model" / "DONE").is_file(), sub
    final = json.loads((tmp_path / "p" / "stage3_sampled" / "config.json").read_text())
    assert final["stage"] == "sampled"
    assert report["num_layers"] == 12 and report["checkpoint"].endswith("stage3_sampled/model")
    # the second fit starts at the layer price the first recorded with its chosen planners, not at --cost again
    carried = json.loads((tmp_path / "p" / "stage3_sampled_frozen" / "model" / "selection.json").read_text())[
        "select_price"]
    assert carried != cfg.cost and final["cost"] == carried
    rows = [json.loads(x) for x in (tmp_path / "p" / "stage3_sampled" / "metrics.jsonl").read_text().splitlines()]
    assert [r["charts/layer_price"] for r in rows if "charts/layer_price" in r][0] == pytest.approx(carried)


def test_auto_stage3_is_checked_as_exact_on_a_six_layer_backbone_before_stage_1(tiny_glue, tmp_path):
    six = make_tiny_checkpoint(tmp_path / "six", layers=6)
    cfg = PipelineConfig(task="rte", backbone=str(six), data_dir=str(tiny_glue), output_dir=str(tmp_path / "p"),
                         progress=False, max_steps=1, rate_control="penalty")
    with pytest.raises(ValueError, match="stage3 'exact' holds the rate"):
        run_pipeline(cfg)
    assert not (tmp_path / "p" / "stage1_finetune").exists()


def test_the_pipeline_benchmark_plans_a_twelve_layer_run(tiny12, tiny_glue, tmp_path, capsys):
    pipeline = load_benchmark("pipeline")

    ckpt, _ = tiny12
    pipeline.main(["--data-dir", str(tiny_glue), "--tasks", "rte", "--backbone", str(ckpt), "--plan",
                   "--max-train-samples", "20", "--results", str(tmp_path / "pipeline.json")])
    out = capsys.readouterr().out
    assert "12 layers, stage 3 sampled" in out and "estimated total" in out
    row = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    assert dict(zip(row[0], row[1]))["fit"] == "20"  # the subset, stated up front
    assert not (tmp_path / "pipeline.json").exists()  # a plan runs nothing


def test_the_pipeline_benchmark_passes_only_what_its_stage3_reads(tiny12, tiny_glue, tmp_path, monkeypatch):
    import warnings

    pipeline = load_benchmark("pipeline")

    seen = {}

    class Stop(Exception):
        pass

    def fake_run(cfg):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cfg.validate()  # the benchmark's own defaults must not warn about settings its stage 3 ignores
        seen[cfg.stage3] = cfg
        raise Stop

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    monkeypatch.setattr(pipeline, "commit", lambda: "0" * 40)
    base = ["--data-dir", str(tiny_glue), "--tasks", "rte", "--results", str(tmp_path / "p.json"),
            "--output-dir", str(tmp_path / "runs")]
    for stage3 in ("exact", "rl"):
        with pytest.raises(Stop):
            pipeline.main(base + ["--stage3", stage3, "--stage3-lr", "3e-5"])
    assert seen["exact"].stage3_lr is None and seen["exact"].stage3_batch_size is None  # left at the defaults
    assert seen["rl"].stage3_lr == 3e-5 and seen["rl"].stage3_batch_size == 8  # rl reads them: passed on


def test_sampled_stage3_says_which_pipeline_flags_it_ignores():
    with pytest.warns(UserWarning, match=r"--stage3 sampled does not read --stage3-lr, --exact-epochs"):
        PipelineConfig(stage3="sampled", stage3_lr=1e-3, exact_epochs=3).validate()


def test_a_run_saved_before_a_setting_existed_is_compared_with_its_default(tiny12, tiny_glue, tmp_path):
    from dpbert_rl.training import TrainingError
    from dpbert_rl.training.config import check_same_run

    _, model_dir = tiny12
    cfg = TrainConfig(task="rte", backbone=str(model_dir), data_dir=str(tiny_glue), output_dir=str(tmp_path))
    saved = json.loads(json.dumps({"stage": "finetune", "init": None, **cfg.__dict__}))
    del saved["group_by_length"]  # written by an older version
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_same_run("finetune", cfg, None, tmp_path)  # the default: the same run
    from dataclasses import replace
    with pytest.raises(TrainingError, match="group_by_length: False -> True"):
        check_same_run("finetune", replace(cfg, group_by_length=True), None, tmp_path)


def test_an_sb3_agent_learns_on_the_live_env_at_twelve_layers(tiny12, tiny_glue, tmp_path):
    """PPO on the live 12-layer env learns both of two rewards with opposite best policies (every layer
    costs 1: skip all; layers free and skipping charged at the end: execute all), so it sees all 12
    decisions and their consequences; what it learned survives save and load."""
    from agents.base import Agent, make_agent
    from envs.layer_skip import BatchedLayerSkipEnv

    _, model_dir = tiny12
    for reward, want in ((dict(c=1.0, lambda_=0.0), 0.0),
                         (dict(c=0.0, lambda_=0.0, target_rate=0.0, rate_coef=10.0), 1.0)):
        env = BatchedLayerSkipEnv(num_envs=8, task="rte", data_dir=str(tiny_glue), split="fit", model=str(model_dir),
                                  features="cls", check_reward=False, **reward)
        agent = make_agent("ppo", seed=0, n_steps=12, batch_size=48, n_epochs=4, learning_rate=3e-3)
        agent.learn(env, total_steps=768)
        obs, _ = env.reset(seed=123)
        acts = []
        for _ in range(env.num_layers):
            acts.append(agent.act(obs, deterministic=True))
            obs, *_ = env.step(acts[-1])
        assert env.num_layers == 12 and abs(float(np.mean(acts)) - want) <= 0.1, reward
    agent.save(tmp_path / "ppo")
    obs, _ = env.reset(seed=1)
    assert np.array_equal(Agent.load(tmp_path / "ppo").act(obs, deterministic=True), agent.act(obs, deterministic=True))


def test_a_sampled_stage3_stopped_midway_resumes_to_the_same_planners(tiny12, tiny_glue, tmp_path, monkeypatch):
    """The 12-layer stage 3 stops and resumes anywhere: a crash at step 5 keeps the checkpoint of step 4
    (planners, optimiser, dual price, data order, RNG), and the rerun ends where an uninterrupted run ends."""
    import dpbert_rl.training.stages as stages
    from dpbert_rl.training import TrainingError

    _, model_dir = tiny12

    def run(out):
        cfg = TrainConfig(task="rte", backbone=str(model_dir), data_dir=str(tiny_glue), output_dir=str(out),
                          batch_size=4, eval_batch_size=16, progress=False, max_steps=6, eval_steps=100,
                          save_steps=2, logging_steps=1, target_rate=0.3, samples=2)
        return DPBert.load(train_stage("sampled", cfg, init=str(model_dir))).planners.state_dict()

    ref = run(tmp_path / "ref")
    real = stages._stage_loss
    monkeypatch.setattr(stages, "_stage_loss", nan_loss_at(real, 5))
    with pytest.raises(TrainingError, match="step 5"):
        run(tmp_path / "crash")
    assert json.loads((tmp_path / "crash" / "checkpoint" / "state.json").read_text())["global_step"] == 4
    monkeypatch.setattr(stages, "_stage_loss", real)
    resumed = run(tmp_path / "crash")
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_the_pipeline_report_names_its_backbone_and_draws_its_own_figure(tmp_path):
    """A 12-layer results file (`--results pipeline_mpnet.json`) gets a title that names MPNet and its own
    layer figure; the 6-layer figure beside it is left as it was."""
    pipeline = load_benchmark("pipeline")

    row = {"task": "sst2", "backbone": "mpnet-base", "metric": "accuracy", "backbone_score": 89.0, "dpbert_score": 88.3,
           "score_retained": 0.992, "layers_executed_mean": 8.5, "num_layers": 12, "speedup_measured": 1.37,
           "speedup_ideal": 1.41, "train_examples": 1000, "seconds": 2904.0, "commit": "0" * 40,
           "command": "python benchmarks/pipeline.py --backbone mpnet-base", "layer_frequency": [0.7] * 12,
           "machine": {"processor": "x86_64", "threads": 2, "torch": "2.13.0+cpu"}}
    results = tmp_path / "pipeline_mpnet.json"
    results.write_text(json.dumps([row, {**row, "task": "rte", "score_retained_ci95": [0.951, 1.032]}]))
    minilm_figure = tmp_path / "pipeline_layers.png"
    minilm_figure.write_bytes(b"the 6-layer figure")
    pipeline.main(["--report-only", "--results", str(results)])
    md = (tmp_path / "pipeline_mpnet.md").read_text()
    assert md.startswith("# DPBERT pipeline on mpnet-base (") and "| retained, 95% CI |" in md
    assert "| 0.992 | - |" in md and "| 0.992 | [0.951, 1.032] |" in md  # a row without an interval, one with
    assert (tmp_path / "pipeline_mpnet_layers.png").read_bytes()[:4] == b"\x89PNG"
    assert minilm_figure.read_bytes() == b"the 6-layer figure"


def test_the_pipeline_benchmark_keeps_one_backbone_per_results_file(tmp_path, monkeypatch):
    """Rows are replaced by task, so a 12-layer run into the 6-layer file would overwrite its row of that task:
    refused before any training, with the file to use instead; the file is left as it was."""
    pipeline = load_benchmark("pipeline")

    monkeypatch.setattr(pipeline, "commit", lambda: "0" * 40)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg: pytest.fail("trained before refusing"))
    results = tmp_path / "pipeline.json"
    results.write_text(json.dumps([{"task": "sst2", "backbone": "minilm"}]))
    before = results.read_text()
    with pytest.raises(SystemExit, match=r"holds rows of backbone minilm.*--results \S*pipeline_mpnet-base\.json"):
        pipeline.main(["--tasks", "sst2", "--backbone", "mpnet-base", "--results", str(results)])
    assert results.read_text() == before


def _greedy_by_hand(model, task, ds, collate):
    """Backward elimination written out: the score of every candidate at every step, from run_dataset."""
    from dpbert_rl.evaluation.diagnostics import task_score
    from dpbert_rl.evaluation.evaluate import run_dataset

    def score(p):
        run = run_dataset(model, ds, collate, 64, "path", actions=torch.tensor(p, dtype=torch.float32))
        return task_score(task, run["predictions"], run["labels"])

    path, out = [1] * 12, {}
    while sum(path) > 1:
        cands = [path[:i] + [0] + path[i + 1:] for i in range(12) if path[i]]
        scores = [score(c) for c in cands]
        path = cands[int(np.argmax(scores))]  # argmax takes the first best: the earlier layer on a tie
        out[sum(path)] = (path, max(scores))
    return out


@pytest.fixture(scope="module")
def reg12(tmp_path_factory):
    """A 12-layer regressor (STS-B): every path scores differently, so no choice among paths is decided by a tie."""
    torch.manual_seed(0)
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("reg12"), num_labels=1, layers=12)
    return DPBert.from_backbone(str(ckpt), num_labels=1).eval()


def test_fixed_paths_at_twelve_layers_are_found_by_backward_elimination(reg12, tiny_glue):
    from dpbert_rl.data import collator, get_task, load_split, tokenize
    from dpbert_rl.evaluation.diagnostics import greedy_fixed_paths

    model = reg12
    task, collate = get_task("stsb"), collator(model.tokenizer)
    ds = tokenize(load_split(task, "fit", str(tiny_glue)), model.tokenizer, 64)
    got = greedy_fixed_paths(model, task, ds, collate, min_layers=1)
    assert sorted(got) == list(range(1, 13)) and got[12][0] == [1] * 12
    for k in range(1, 12):  # nested: each path is the one above it with one layer dropped
        assert sum(got[k][0]) == k and sum(a - b for a, b in zip(got[k + 1][0], got[k][0])) == 1
    want = _greedy_by_hand(model, task, ds, collate)
    assert {k: got[k][0] for k in want} == {k: p for k, (p, _) in want.items()}
    assert [got[k][1] for k in want] == pytest.approx([s for _, s in want.values()])
    assert len({s for _, s in want.values()}) > 6  # the scores do differ: the choices were not ties
    with pytest.raises(ValueError, match=r"min_layers must be in \[1, 12\]; got 0"):
        greedy_fixed_paths(model, task, ds, collate, min_layers=0)


def test_a_stopped_backward_elimination_resumes_from_its_cache(reg12, tiny_glue, tmp_path, monkeypatch):
    """Each scored path's predictions go to the cache file as they come; a search stopped midway and started again
    scores only the paths it had not, and finds the same paths. A cache of another model or other inputs, or a file
    that is not one, is refused and left as it was."""
    import dpbert_rl.evaluation.evaluate as evaluate
    from dpbert_rl.data import collator, get_task, load_split, tokenize
    from dpbert_rl.evaluation.diagnostics import FixedPathCache, fixed_path_key, greedy_fixed_paths

    model = reg12
    task, collate = get_task("stsb"), collator(model.tokenizer)
    ds = tokenize(load_split(task, "fit", str(tiny_glue)), model.tokenizer, 64)
    want = greedy_fixed_paths(model, task, ds, collate, min_layers=1)
    real, calls, stop_at = evaluate.run_dataset, [], [30]

    class Stopped(Exception):
        pass

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise Stopped  # stopped midway, after 29 paths were scored and kept
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "run_dataset", counted)
    file = tmp_path / "frontier.npz"
    with pytest.raises(Stopped):
        greedy_fixed_paths(model, task, ds, collate, min_layers=1, cache=FixedPathCache(file, "reg12", ds["labels"]))
    assert len(FixedPathCache(file, "reg12", ds["labels"]).preds) == 29
    calls.clear()
    stop_at[0] = None
    got = greedy_fixed_paths(model, task, ds, collate, min_layers=1, cache=FixedPathCache(file, "reg12", ds["labels"]))
    assert len(calls) == 78 - 29  # 1 + 12 + 11 + ... + 2 passes in all; the 29 scored before are read back
    assert {k: got[k][0] for k in want} == {k: want[k][0] for k in want}
    assert [got[k][1] for k in sorted(want)] == pytest.approx([want[k][1] for k in sorted(want)])
    calls.clear()
    greedy_fixed_paths(model, task, ds, collate, min_layers=1, cache=FixedPathCache(file, "reg12", ds["labels"]))
    assert not calls  # everything read back
    before = file.read_bytes()
    with pytest.raises(ValueError, match="a fixed-path cache of 'reg12'.*move it away"):
        FixedPathCache(file, "another model", ds["labels"])
    with pytest.raises(ValueError, match="move it away"):
        FixedPathCache(file, "reg12", ds["labels"][:5])
    assert file.read_bytes() == before
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a fixed-path cache"):
        FixedPathCache(tmp_path / "junk.npz", "reg12", ds["labels"])
    # the key follows what a fixed path's predictions read: the backbone's tensors and the per-path output map,
    # not the planners
    key = fixed_path_key(model)
    with torch.no_grad():
        model.planners.bias.add_(1.0)
        assert fixed_path_key(model) == key
        model.set_path_calibration(torch.tensor([[1.0, 0.5]] * 2 ** 12))
        assert fixed_path_key(model) != key
        model.set_path_calibration(None)
        assert fixed_path_key(model) == key
        p = next(model.backbone.parameters())
        p.add_(1e-3)
        assert fixed_path_key(model) != key
        p.sub_(1e-3)
        model.planners.bias.sub_(1.0)
    np.savez(tmp_path / "pickled.npz", key=np.array("reg12"), labels=np.zeros(2), paths=np.array([object()]),
             predictions=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="pickled.npz: not a fixed-path cache"):  # an object array is not unpickled
        FixedPathCache(tmp_path / "pickled.npz", "reg12", np.zeros(2))


def test_routing_at_twelve_layers_scores_against_the_greedy_paths_without_the_tree(reg12, tiny_glue, monkeypatch):
    """4,096 paths per input are never walked: the frontier is the backward-elimination paths, its hull names
    them by path id (layer 1 the top bit, as the tree's), and the margin is the learner's dev score minus theirs."""
    import dpbert_rl.pathtree.oracle as oracle
    from dpbert_rl.data import collator, get_task, load_split, tokenize
    from dpbert_rl.evaluation.diagnostics import routing_report, task_score
    from dpbert_rl.evaluation.evaluate import run_dataset

    monkeypatch.setattr(oracle, "enumerate_paths", lambda *a, **k: pytest.fail("walked every path at 12 layers"))
    model = reg12
    task, collate = get_task("stsb"), collator(model.tokenizer)
    sets = {s: tokenize(load_split(task, s, str(tiny_glue)), model.tokenizer, 64) for s in ("select", "dev", "fit")}
    learner = run_dataset(model, sets["dev"], collate, 64, "hard")
    rep = routing_report(model, task, learner, sets["select"], sets["dev"], sets["fit"], collate, n_boot=50,
                         frontier_samples=None)
    assert rep["frontier"] == f"backward elimination on {len(sets['select'])} selection inputs"

    def bits(pid):
        return [(pid >> (11 - i)) & 1 for i in range(12)]

    def dev_score(pid):
        run = run_dataset(model, sets["dev"], collate, 64, "path", actions=torch.tensor(bits(pid), dtype=torch.float32))
        return task_score(task, run["predictions"], run["labels"])

    for k, pid, s in rep["frontier_hull"]:  # each hull point is its path's selection score
        assert sum(bits(pid)) == k
        run = run_dataset(model, sets["select"], collate, 64, "path",
                          actions=torch.tensor(bits(pid), dtype=torch.float32))
        assert s == pytest.approx(task_score(task, run["predictions"], run["labels"]))
    frontier = sum(w * dev_score(pid) for pid, w in rep["frontier_paths"])
    assert rep["fixed_frontier_score"] == pytest.approx(frontier)
    assert rep["margin"] == pytest.approx(task_score(task, learner["predictions"], learner["labels"]) - frontier)


def test_the_routing_benchmark_reads_a_twelve_layer_pipeline_run_and_keeps_backbones_apart(tiny12, tiny_glue,
                                                                                           tmp_path, monkeypatch,
                                                                                           capsys):
    """The pipeline's 12-layer stage 3 is `sampled`: routing.py finds it, names the row's backbone from the stage's
    config and writes it beside a MiniLM row of the same task and learner (rows written before rows named their
    backbone are MiniLM's), and refuses a --backbone that the checkpoint's config contradicts."""
    import shutil

    routing = load_benchmark("routing")
    monkeypatch.setattr(routing, "commit", lambda: "0" * 40)
    _, model_dir = tiny12
    stage = tmp_path / "runs" / "rte" / "stage3_sampled"
    shutil.copytree(model_dir, stage / "model")
    (stage / "model" / "DONE").write_text("{}")
    (stage / "config.json").write_text(json.dumps({"backbone": "/somewhere/mpnet-base", "stage": "sampled"}))
    results = tmp_path / "routing.json"
    features = DPBert.load(model_dir).planner_features  # the same key as the new row's, but for the backbone
    legacy = {"task": "rte", "learner": "dpbert", "backbone_mode": "frozen", "features": features, "score": 50.0,
              "margin": 1.0, "margin_ci95": [0.0, 2.0], "command": "python benchmarks/routing.py"}
    results.write_text(json.dumps([legacy]))
    args = ["--data-dir", str(tiny_glue), "--tasks", "rte", "--runs", str(tmp_path / "runs"), "--results",
            str(results), "--bootstrap", "20", "--probe-train", "16", "--threads", "1"]
    routing.main(args)
    rows = json.loads(results.read_text())
    assert [r.get("backbone") for r in rows] == [None, "mpnet-base"] and rows[0] == legacy
    new = rows[1]
    assert (new["task"], new["learner"], new["backbone_mode"]) == ("rte", "dpbert", "frozen")
    assert new["frontier"].startswith("backward elimination on ")
    table = (tmp_path / "routing.md").read_text()
    assert "| minilm | rte | dpbert | frozen | all |" in table and "| mpnet-base | rte | dpbert | frozen | greedy |" in table
    cache = stage / "routing_frontier.npz"  # the elimination's passes, kept beside the model as they came
    from dpbert_rl.evaluation.diagnostics import fixed_path_key

    assert cache.is_file() and fixed_path_key(DPBert.load(stage / "model")) in str(np.load(cache)["key"])
    routing.main(args)  # the same backbone again replaces its own row only
    assert [r.get("backbone") for r in json.loads(results.read_text())] == [None, "mpnet-base"]
    before = results.read_text()
    with pytest.raises(SystemExit):
        routing.main(args + ["--backbone", "minilm"])
    assert results.read_text() == before
    (stage / "config.json").write_text("{not json")  # a damaged stage config: an error naming it, not a guess
    with pytest.raises(SystemExit):
        routing.main(args)
    assert str(stage / "config.json") in capsys.readouterr().err and results.read_text() == before


@pytest.mark.parametrize("stage", ["sampled", "rl"])
def test_the_dual_price_follows_the_rate_of_the_greedy_path(tiny12, tiny_glue, tmp_path, monkeypatch, stage):
    """The rate the price holds is the fraction of layers the greedy path executes, walked from its own states,
    as the model will run: every dual step reads the mean of a hard forward's actions on that step's inputs (it
    read `p >= 0.5` along the sampled paths, which at 12 layers sat 0.15-0.25 below the greedy path's rate)."""
    from dpbert_rl.model.objectives import DualPrice

    from dpbert_rl.data import collator, load_split, tokenize
    from dpbert_rl.model.planner import Planners

    model = DPBert.load(tiny12[1])
    model.planners = Planners(12, model.backbone.hidden_size, 0.0, features=TrainConfig.planner_features)
    model.fit_feature_stats(tokenize(load_split("rte", "fit", str(tiny_glue)), model.tokenizer, 64),
                            collator(model.tokenizer))
    torch.manual_seed(1)
    with torch.no_grad():  # planners that read the state: the greedy path's rate is not that of p >= 0.5 elsewhere
        model.planners.weight.normal_(0, 0.05)
    model_dir = tmp_path / "init"
    model.save(model_dir)
    events = []
    forward, update = DPBert.forward, DualPrice.update

    def spy_forward(self, *args, mode="hard", **kwargs):
        out = forward(self, *args, mode=mode, **kwargs)
        if mode == "hard":
            events.append(("hard", out.actions.float().mean().item(), args[0].shape[0] if args else
                           kwargs["input_ids"].shape[0]))
        return out

    def spy_update(self, rate):
        events.append(("dual", float(rate), None))
        return update(self, rate)

    monkeypatch.setattr(DPBert, "forward", spy_forward)
    monkeypatch.setattr(DualPrice, "update", spy_update)
    cfg = TrainConfig(task="rte", backbone=str(model_dir), data_dir=str(tiny_glue), output_dir=str(tmp_path / stage),
                      batch_size=4, eval_batch_size=16, progress=False, max_steps=3, eval_steps=100, save_steps=100,
                      logging_steps=1, lr=1e-4, target_rate=0.3, samples=2)
    train_stage(stage, cfg, init=str(model_dir))
    duals = [i for i, e in enumerate(events) if e[0] == "dual"]
    assert len(duals) == 3
    for i in duals:
        kind, rate, rows = events[i - 1]
        assert kind == "hard" and rows == 4 and events[i][1] == pytest.approx(rate)  # one row per input, not K


def test_visited_paths_are_recalibrated_by_least_squares_with_one_pooled_pair_for_the_rest(reg12, tiny_glue):
    """Above 8 layers no tree is walked: each path the greedy planners take on the fit split gets the
    least-squares line of its own inputs (here every path taken by 2 or more), every other path, unseen ones
    included, the line of the remaining inputs."""
    from dpbert_rl.data import collator, get_task, load_split, tokenize
    from dpbert_rl.evaluation.evaluate import run_dataset
    from dpbert_rl.model.objectives import path_ids
    from dpbert_rl.training.recalibrate import fit_visited_paths

    import copy

    model = copy.deepcopy(reg12)  # the fixture is shared
    ds = tokenize(load_split(get_task("stsb"), "fit", str(tiny_glue)), model.tokenizer, 64)
    collate = collator(model.tokenizer)
    model.fit_feature_stats(ds, collate, 64)  # standardised features, and random planners: several paths
    torch.manual_seed(0)
    with torch.no_grad():
        model.planners.weight.normal_(0, 1.0)
        model.planners.bias.fill_(1.0)
    earlier = torch.tensor([[2.0, 1.0]]).expand(4096, 2)  # an inherited map is set aside: the raw outputs are fitted
    model.set_path_calibration(earlier)
    table, info = fit_visited_paths(model, ds, collate, min_inputs=2)
    assert torch.equal(model.path_calibration, earlier)  # and restored
    model.set_path_calibration(None)
    run = run_dataset(model, ds, collate, 64, "hard")
    ids = path_ids(torch.as_tensor(run["actions"])).numpy()
    x, y = np.asarray(run["predictions"], float), np.asarray(run["labels"], float)
    paths, counts = np.unique(ids, return_counts=True)
    own = paths[counts >= 2]
    assert info["paths_fitted"] == len(own) >= 2 and info["paths_visited"] == len(paths) > len(own)
    for p in own:
        slope, intercept = np.polyfit(x[ids == p], y[ids == p], 1)
        assert table[p].tolist() == pytest.approx([slope, intercept], rel=1e-3, abs=1e-3)
    rest = ~np.isin(ids, own)
    want = np.polyfit(x[rest], y[rest], 1) if rest.sum() >= 2 else np.polyfit(x, y, 1)
    unseen = next(p for p in range(4096) if p not in set(paths.tolist()))
    assert table[unseen].tolist() == pytest.approx(list(want), rel=1e-3, abs=1e-3)
    # a raw run mapped by the table predicts what the model with that map predicts, path by path
    from dpbert_rl.training.recalibrate import recalibrated

    model.set_path_calibration(table)
    live = run_dataset(model, ds, collate, 64, "hard")
    assert np.allclose(recalibrated(run, table)["predictions"], live["predictions"], atol=1e-5)
    assert not np.allclose(live["predictions"], run["predictions"], atol=1e-3)  # the map does move them
    model.set_path_calibration(None)
    with pytest.raises(ValueError, match="min_inputs must be at least 2"):
        fit_visited_paths(model, ds, collate, min_inputs=1)


@pytest.mark.parametrize("gain", [True, False])
def test_a_sampled_regression_stage_keeps_its_recalibration_only_when_the_selection_split_gains(
        reg12, tiny_glue, tmp_path, monkeypatch, gain):
    from dpbert_rl.training import recalibrate as rc
    from dpbert_rl.training.pipeline import planner_stage

    init = tmp_path / "init"
    reg12.save(init)
    scores = iter([10.0, 20.0] if gain else [20.0, 10.0])  # the selection score before, then after
    real_score = rc.score_run
    monkeypatch.setattr(rc, "score_run", lambda *a, **kw: {**real_score(*a, **kw), "score": next(scores)})
    cfg = TrainConfig(task="stsb", data_dir=str(tiny_glue), output_dir=str(tmp_path / "unused"), batch_size=4,
                      eval_batch_size=16, progress=False, max_steps=2, eval_steps=2, save_steps=100,
                      target_rate=0.3, samples=4, online_path_calibration=False)  # raw outputs: no map before
    out = planner_stage("sampled", cfg, init, tmp_path / "s")
    done = json.loads((out / "DONE").read_text())
    outcome = done["path_calibration"]
    assert outcome["kept"] is gain and (outcome["select_before"], outcome["select_after"]) == \
        ((10.0, 20.0) if gain else (20.0, 10.0))
    assert (DPBert.load(out).path_calibration is not None) is gain
    assert ("dev_before_recalibration" in done) is gain  # dev scored once more, on the model kept
    assert done["best_select"] != 20.0 if not gain else (done["best_select"] == 20.0 and
                                                          done["best_select_before_recalibration"] != 20.0)
    assert json.loads((out / "selection.json").read_text())["select_price"] is not None  # kept beside the model
    # a re-run reuses the outcome: nothing is fitted or scored again
    monkeypatch.setattr(rc, "fit_visited_paths", lambda *a, **kw: pytest.fail("fitted again"))
    assert rc.recalibrate_stage(out, cfg) == outcome
    # a classifier is left as it is
    assert rc.recalibrate_stage(out, TrainConfig(task="rte", data_dir=str(tiny_glue), output_dir="x")) == {}


def test_the_pipeline_recalibrates_a_twelve_layer_regressor_once_and_only_its_final_fit(tiny_glue, tmp_path, caplog):
    from dpbert_rl.training import recalibrate as rc

    ckpt = make_tiny_checkpoint(tmp_path / "reg12", num_labels=1, layers=12)
    out = tmp_path / "p"
    cfg = PipelineConfig(task="stsb", backbone=str(ckpt), data_dir=str(tiny_glue), output_dir=str(out),
                         progress=False, max_steps=2, batch_size=8, eval_batch_size=16, target_rate=0.3,
                         latency_samples=4, latency_repeats=1, calibrate_threshold="never")  # the stage's own paths
    run_pipeline(cfg)
    first = json.loads((out / "stage3_sampled_frozen" / "model" / "DONE").read_text())
    final_dir = out / "stage3_sampled" / "model"
    final = json.loads((final_dir / "DONE").read_text())
    assert "path_calibration" not in first  # adapt moves the head: a map there would be thrown away
    outcome = final["path_calibration"]
    assert outcome["inputs"] > 0 and outcome["kept"] is (outcome["select_after"] > outcome["select_before"])
    assert DPBert.load(final_dir).path_calibration is not None  # the one refitted, or the stage's own (online)
    # the score after, read off the pass before with each path's pair applied, is the saved model's own
    from dpbert_rl.data import collator, get_task
    from dpbert_rl.evaluation.evaluate import evaluate_model
    from dpbert_rl.training.stages import load_data

    saved = DPBert.load(final_dir)
    select = load_data(TrainConfig(task="stsb", data_dir=str(tiny_glue), output_dir=str(out), max_train_samples=1),
                       saved.tokenizer, splits=("select",))["select"]
    live = evaluate_model(saved, get_task("stsb"), select, collator(saved.tokenizer), 16, "hard")["score"]
    assert live == pytest.approx(outcome["select_after"] if outcome["kept"] else outcome["select_before"], abs=1e-4)
    run_pipeline(cfg)  # a re-run reuses every stage and the outcome
    assert json.loads((final_dir / "DONE").read_text()) == final
    # a stage finished by a version without the recalibration is reused as it is, not rewritten
    old = {k: v for k, v in final.items() if k != "path_calibration"}
    (final_dir / "DONE").write_text(json.dumps(old))
    sel = json.loads((final_dir / "selection.json").read_text())
    (final_dir / "selection.json").write_text(json.dumps({k: v for k, v in sel.items() if k != "select_price"}))
    before = sorted(p.name for p in final_dir.iterdir())
    with caplog.at_level("WARNING"):
        rc.recalibrate_sampled(final_dir, TrainConfig(task="stsb", data_dir=str(tiny_glue), output_dir=str(out)),
                               True, earlier=True)
    assert json.loads((final_dir / "DONE").read_text()) == old and sorted(p.name for p in final_dir.iterdir()) == before
    assert "without the per-path recalibration" in caplog.text
    # a recalibrated model reused without the recalibration is refused
    (final_dir / "DONE").write_text(json.dumps({**old, "path_calibration": {**outcome, "kept": True}}))
    with pytest.raises(TrainingError, match="another --output-dir"):
        rc.recalibrate_sampled(final_dir, TrainConfig(task="stsb", data_dir=str(tiny_glue), output_dir=str(out)),
                               False, earlier=True)


def test_the_running_path_calibration_is_the_least_squares_fit_of_each_paths_draws():
    """Fed in batches, the online map equals :func:`fit_path_calibration` on each path's draws where a path has
    at least ``min_inputs`` of them, the fit on all draws elsewhere, the identity before any; its state round-trips."""
    from dpbert_rl.model.objectives import RunningPathCalibration, fit_path_calibration

    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.zeros(30, dtype=torch.long), torch.full((25,), 5), torch.tensor([1, 1, 7])])
    x = torch.randn(len(ids), generator=gen)
    y = 0.5 + 2.0 * x + torch.randn(len(ids), generator=gen) * (1 + ids.float())  # each path its own line
    cal = RunningPathCalibration(3, min_inputs=20)
    assert torch.equal(cal.table(), torch.tensor([[1.0, 0.0]] * 8))
    perm = torch.randperm(len(ids), generator=gen)
    for part in perm.split(16):
        cal.update(ids[part], x[part], y[part])
    table = cal.table()
    for p in (0, 5):
        assert torch.allclose(table[p], fit_path_calibration(x[ids == p, None], y[ids == p])[0], atol=1e-5), p
    pooled = fit_path_calibration(x[:, None], y)[0]
    for p in (1, 2, 3, 4, 6, 7):
        assert torch.allclose(table[p], pooled, atol=1e-5), p
    back = RunningPathCalibration(3)
    back.load_state_dict(json.loads(json.dumps(cal.state_dict())))
    assert torch.equal(back.table(), table) and back.min_inputs == 20
    with pytest.raises(ValueError, match="cannot be read into"):
        RunningPathCalibration(4).load_state_dict(cal.state_dict())
    with pytest.raises(ValueError, match="at least 2"):
        RunningPathCalibration(3, min_inputs=1)


@pytest.mark.parametrize("online", [True, False])
def test_the_sampled_stage_rewards_a_regressor_on_its_paths_mapped_outputs(reg12, tiny_glue, tmp_path, monkeypatch,
                                                                           online):
    """STS-B at 12 layers: the reward reads each drawn path's output through the map fitted on the draws so far
    (as the exact stage reads its tree's recalibrated outputs), and the model is scored on the selection split and
    saved with that map; off, the reward reads the raw outputs and the model has none."""
    import dpbert_rl.training.stages as stages

    init = tmp_path / "init"
    reg12.save(init)
    mapped, raw, rewarded = [], [], []
    real_apply, real_reward = stages.apply_path_calibration, stages.final_reward

    def spy_apply(pred, ids, table):
        raw.append(pred.detach().clone())
        mapped.append(real_apply(pred, ids, table))
        return mapped[-1]

    def spy_reward(kind, losses, prediction, labels, regression):
        rewarded.append(prediction.detach().clone())
        return real_reward(kind, losses, prediction, labels, regression)

    monkeypatch.setattr(stages, "apply_path_calibration", spy_apply)
    monkeypatch.setattr(stages, "final_reward", spy_reward)
    cfg = TrainConfig(task="stsb", data_dir=str(tiny_glue), output_dir=str(tmp_path / "s"), batch_size=4,
                      eval_batch_size=16, progress=False, max_steps=2, eval_steps=1, save_steps=100, target_rate=0.0,
                      samples=4, online_path_calibration=online)
    out = train_stage("sampled", cfg, init=str(init))
    assert len(rewarded) == 2
    if online:
        assert len(mapped) == 2 and all(torch.equal(m, r) for m, r in zip(mapped, rewarded))
        # a batch's rewards read the map of the earlier draws: the first batch's, the identity
        assert torch.equal(mapped[0], raw[0]) and not torch.equal(mapped[1], raw[1])
    else:
        assert not mapped
    saved = DPBert.load(out)
    assert (saved.path_calibration is not None) is online
    from dpbert_rl.data import collator, get_task
    from dpbert_rl.evaluation.evaluate import evaluate_model
    from dpbert_rl.training.stages import load_data

    select = load_data(cfg, saved.tokenizer, splits=("select",))["select"]
    live = evaluate_model(saved, get_task("stsb"), select, collator(saved.tokenizer), 16, "hard")["score"]
    assert live == pytest.approx(json.loads((out / "DONE").read_text())["best_select"], abs=1e-4)


def test_a_sampled_regression_stage_stopped_midway_resumes_its_path_map(reg12, tiny_glue, tmp_path, monkeypatch):
    """The online map's sums are in the resumable state: a crash at step 5 and a rerun end with the planners and
    the map of an uninterrupted run."""
    import dpbert_rl.training.stages as stages

    init = tmp_path / "init"
    reg12.save(init)

    def run(out):
        cfg = TrainConfig(task="stsb", data_dir=str(tiny_glue), output_dir=str(out), batch_size=4, eval_batch_size=16,
                          progress=False, max_steps=6, eval_steps=100, save_steps=2, target_rate=0.0, samples=2)
        return DPBert.load(train_stage("sampled", cfg, init=str(init)))

    ref = run(tmp_path / "ref")
    real = stages._stage_loss
    monkeypatch.setattr(stages, "_stage_loss", nan_loss_at(real, 5))
    with pytest.raises(TrainingError, match="step 5"):
        run(tmp_path / "crash")
    monkeypatch.setattr(stages, "_stage_loss", real)
    resumed = run(tmp_path / "crash")
    assert torch.allclose(ref.path_calibration, resumed.path_calibration)
    assert all(torch.equal(a, b) for a, b in zip(ref.planners.parameters(), resumed.planners.parameters()))


@pytest.mark.parametrize("task, refused", [("stsb", True), ("mrpc", False)])
def test_a_sampled_stage_from_before_the_online_map_is_another_run_only_for_a_regressor(tmp_path, task, refused):
    """A sampled stage saved before ``online_path_calibration`` existed ran without it: reusing it as a run with the
    map is refused on a regression task, where it changes the reward, and allowed on a classifier, where it
    changes nothing."""
    from dataclasses import asdict

    from dpbert_rl.training.config import check_same_run

    cfg = TrainConfig(task=task, output_dir=str(tmp_path))
    saved = {k: v for k, v in asdict(cfg).items() if k != "online_path_calibration"}
    (tmp_path / "config.json").write_text(json.dumps({"stage": "sampled", "init": None, **saved}))
    if refused:
        with pytest.raises(TrainingError, match="online_path_calibration: False -> True"):
            check_same_run("sampled", cfg, None, tmp_path)
    else:
        check_same_run("sampled", cfg, None, tmp_path)
    check_same_run("sampled", TrainConfig(task=task, output_dir=str(tmp_path), online_path_calibration=False),
                   None, tmp_path)


def test_routing_reads_the_model_the_pipeline_chose(tmp_path):
    """Where the pipeline kept the first fit over the skip-aware alternation, routing scores that model (inside the
    run folder, wherever it was moved); a damaged record is an error naming it."""
    routing = load_benchmark("routing")

    run = tmp_path / "moved" / "stsb"
    run.mkdir(parents=True)
    assert routing.pipeline_choice(run) is None
    (run / "alternation.json").write_text(json.dumps({"chosen": "/elsewhere/stsb/stage3_sampled_frozen/model"}))
    assert routing.pipeline_choice(run) == run / "stage3_sampled_frozen" / "model"
    (run / "alternation.json").write_text("{not json")
    with pytest.raises(ValueError, match="alternation.json"):
        routing.pipeline_choice(run)


def test_the_pipeline_benchmark_passes_on_the_rate_on_dev_inputs(tmp_path, monkeypatch):
    """`--rate-on-eval-inputs` reaches the pipeline's configuration (and is off without the flag)."""
    pipeline = load_benchmark("pipeline")

    class Stop(Exception):
        pass

    seen = []
    monkeypatch.setattr(pipeline, "commit", lambda: "0" * 40)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg: seen.append(cfg) or (_ for _ in ()).throw(Stop()))
    for flags in ([], ["--rate-on-eval-inputs"]):
        with pytest.raises(Stop):
            pipeline.main(["--tasks", "sst2", "--results", str(tmp_path / "p.json"), *flags])
    assert [c.rate_on_eval_inputs for c in seen] == [False, True]


def test_the_pipeline_benchmark_row_keeps_the_scores_interval(tmp_path, monkeypatch):
    """The interval of DPBERT against the backbone (evaluate_checkpoint's paired bootstrap) reaches the row and
    the table, and so do the length-weighted ideal speed-up, the fixed-path start's record and each metric of both models."""
    pipeline = load_benchmark("pipeline")
    report = {"task": "rte", "backbone_score": 60.0, "dpbert_score": 58.0, "metric": "accuracy",
              "layers_executed_mean": 4.0, "num_layers": 6, "speedup_measured": 1.4, "speedup_ideal": 1.5,
              "speedup_ideal_length_weighted": 1.45, "train_examples": 100, "seconds": 1.0, "score_retained": 58 / 60, "score_retained_ci95": [0.9, 1.01],
              "score_diff_ci95": [-6.0, 0.5], "layer_frequency": [0.5] * 6, "latency_ms_full": 10.0,
              "latency_ms_dpbert": 7.0, "throughput_speedup": 1.3, "num_examples": 277, "checkpoint": "x",
              "fixed_path_start": {"path": [1, 0, 1, 1, 0, 1], "layers": 4, "select_score": 57.0,
                                   "full_select_score": 59.0, "examples": 249},
              "dpbert_metrics": {"accuracy": 58.0, "score": 58.0}, "backbone_metrics": {"accuracy": 60.0, "score": 60.0}}
    monkeypatch.setattr(pipeline, "commit", lambda: "0" * 40)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg: dict(report))
    pipeline.main(["--tasks", "rte", "--results", str(tmp_path / "p.json")])
    row = json.loads((tmp_path / "p.json").read_text())[0]
    assert row["score_retained_ci95"] == [0.9, 1.01] and row["score_diff_ci95"] == [-6.0, 0.5]
    assert row["speedup_ideal_length_weighted"] == 1.45
    assert row["fixed_path_start"] == report["fixed_path_start"]  # the start's path and scores, where one ran
    assert row["dpbert_metrics"] == report["dpbert_metrics"] and row["backbone_metrics"] == report["backbone_metrics"]
    assert "| 0.967 | [0.900, 1.010] |" in (tmp_path / "p.md").read_text()
