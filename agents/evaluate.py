"""A trained agent's greedy policy driving the model on a dev set, with real skipping.

The agent acts between layers exactly as in the environment (the observation comes from
:func:`envs.layer_skip.observe`), and layer ``i`` runs only for the rows whose action is 1. Batch-1
latency uses the same interleaved measurement as the model (:mod:`dpbert_rl.evaluation.latency`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from dpbert_rl.evaluation.evaluate import run_dataset, score_run, speedup_ideal_fields
from dpbert_rl.evaluation.latency import encode_examples, interleaved_latency
from dpbert_rl.model import DPBert
from envs.layer_skip import observe

from .base import Agent


@torch.inference_mode()
def agent_forward(model: DPBert, agent: Agent, input_ids, attention_mask, token_type_ids=None, observer=None,
                  with_probs: bool = False):
    """Logits ``(N, C)`` and actions ``(N, L)`` of the path the agent (greedy) chooses per input; with
    ``with_probs`` also its execute probabilities ``(N, L)`` at the states it met (None for an agent that
    has none, e.g. DQN), for the hesitant-gate diagnostic.

    :param observer: the :class:`~dpbert_rl.model.planner.Planners` whose features and statistics the agent was
        trained on (the training env's ``observer``); default the model's own planners."""
    state = model.embed(input_ids, attention_mask, token_type_ids)
    h, L = state.hidden, model.num_layers
    observer = observer if observer is not None else model.planners
    actions, probs = [], []
    for i in range(L):
        obs = observe(observer, h, state.mask, i)
        if with_probs:
            probs.append(agent.execute_probability(obs))
        a = np.asarray(agent.act(obs, deterministic=True)).reshape(-1)
        actions.append(a)
        h = model.execute(i, h, state.mask, torch.from_numpy(a.astype(bool)))
    if not with_probs:
        return model.classify(h), np.stack(actions, 1)
    p = np.stack(probs, 1) if all(q is not None for q in probs) else None
    return model.classify(h), np.stack(actions, 1), p


def score_agent(agent: Agent, model: DPBert, task, dataset, collate_fn, batch_size: int = 64, observer=None) -> dict:
    """Dev score and layer statistics of the paths ``agent`` chooses (no timing)."""
    def forward(b):
        return agent_forward(model, agent, b["input_ids"], b["attention_mask"], b.get("token_type_ids"), observer)

    return score_run(task, run_dataset(model, dataset, collate_fn, batch_size, forward=forward))


def evaluate_agent(agent: Agent, model: DPBert, task, dataset, collate_fn, batch_size: int = 64,
                   latency_samples: Optional[int] = 200, repeats: int = 3, threads: Optional[int] = None,
                   observer=None) -> dict:
    """Dev score, layers executed, and measured batch-1 speed-up of ``agent`` driving ``model``."""
    result = score_agent(agent, model, task, dataset, collate_fn, batch_size, observer)
    examples = encode_examples(dataset, latency_samples)

    def full(ex):
        return model(ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), mode="full")

    def driven(ex):
        return agent_forward(model, agent, ex["input_ids"], ex["attention_mask"], ex.get("token_type_ids"), observer)

    lat = interleaved_latency({"full": full, "agent": driven}, examples, repeats, threads=threads)
    result.update({
        "speedup_measured": lat["agent"]["speedup"],
        **speedup_ideal_fields(result["layers_executed_mean"], model.num_layers),
        "latency_ms_full": lat["full"]["latency_ms"],
        "latency_ms_agent": lat["agent"]["latency_ms"],
    })
    return result


def tree_run(agent: Agent, env) -> dict:
    """The agent's greedy paths over every input of a tree env's split, replayed from its cache (no model
    call; equal to driving the frozen model live): ``predictions``, ``labels``, ``actions`` ``(N, L)`` and,
    where the agent has them, ``probs`` ``(N, L)``, as :func:`dpbert_rl.evaluation.evaluate.run_dataset` returns them.

    :param env: a :class:`~envs.layer_skip_tree.LayerSkipTreeEnv` or its vector form, on the split to score.
    """
    core = env.core
    obs = core.start(np.arange(core.N))
    actions, probs = [], []
    for _ in range(core.L):
        probs.append(agent.execute_probability(obs))
        actions.append(np.asarray(agent.act(obs, deterministic=True)).reshape(-1))
        obs, _, _, final = core.step(actions[-1])
    run = {"predictions": np.asarray(final["prediction"]), "labels": np.asarray(final["label"]),
           "actions": np.stack(actions, 1)}
    if all(p is not None for p in probs):
        run["probs"] = np.stack(probs, 1)
    return run
