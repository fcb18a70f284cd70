"""Gymnasium environments over a ``dpbert_rl`` model: layer skipping as sequential decisions.

Importing this package registers the environments with string entry points and loads no model::

    import gymnasium as gym
    import envs  # noqa: F401  (registers dpbert_rl/LayerSkip-v0 and dpbert_rl/LayerSkipTree-v0)
    env = gym.make("dpbert_rl/LayerSkip-v0", task="sst2", data_dir="../shared/data/glue", model="runs/x/model")
    vec = gym.make_vec("dpbert_rl/LayerSkip-v0", num_envs=64, task="sst2", ...)  # BatchedLayerSkipEnv
    # the frozen game replayed from the path-tree cache (built on first use): same arguments, array lookups
    tree = gym.make_vec("dpbert_rl/LayerSkipTree-v0", num_envs=1024, task="sst2", ...)  # BatchedLayerSkipTreeEnv
"""

import gymnasium as gym

ENV_ID = "dpbert_rl/LayerSkip-v0"
TREE_ENV_ID = "dpbert_rl/LayerSkipTree-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="envs.layer_skip:LayerSkipEnv",
        vector_entry_point="envs.layer_skip:BatchedLayerSkipEnv",
    )

if TREE_ENV_ID not in gym.registry:
    gym.register(
        id=TREE_ENV_ID,
        entry_point="envs.layer_skip_tree:LayerSkipTreeEnv",
        vector_entry_point="envs.layer_skip_tree:BatchedLayerSkipTreeEnv",
    )

__all__ = ["ENV_ID", "TREE_ENV_ID"]
