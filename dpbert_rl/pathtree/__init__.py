"""Every path of a frozen model: the brute-force enumeration (``oracle``) and the path-tree cache that
computes an input's whole skipping game once (``cache``). The exact stage, the oracle, the fixed-path
frontier and the replay environment all read it."""

from .cache import (ARRAYS, DEFAULT_CACHE_DIR, CacheError, PathTree, build_tree, checkpoint_fingerprint, expected_return,
                    greedy_paths, path_log_probs, path_rewards, planner_info, tree_cache, tree_index)

__all__ = ["ARRAYS", "DEFAULT_CACHE_DIR", "CacheError", "PathTree", "build_tree", "checkpoint_fingerprint", "expected_return",
           "greedy_paths", "path_log_probs", "path_rewards", "planner_info", "tree_cache", "tree_index"]
