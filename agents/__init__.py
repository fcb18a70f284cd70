"""Policy-learning algorithms that act in the ``envs`` environments (REINFORCE, SB3 adapters)."""
