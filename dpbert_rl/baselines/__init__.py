"""The baselines of the paper's Table 1 on the same backbone and per-layer calls as DPBERT: early exits
(DeeBERT, PABEE, BERxiT: the model in ``early_exit``, its training in ``exit_training``, its rules replayed on
held-out statistics in ``exit_rules``) and the static ones (BERT-kL, LayerDrop: ``static``)."""

from .early_exit import EXIT_META_FILE, RAMPS_FILE, RULES, EarlyExitBert, ExitOutput, ExitTrace, OffRamp
from .exit_rules import (bisect_threshold, calibrate_exit, exit_statistics, exits_from_statistics, layer_features,
                         per_exit_scores, selection_scorer, statistics_from_features, statistics_run)
from .exit_training import (berxit_loss, exit_targets, train_berxit, train_exits_joint, train_offramps_frozen,
                            weighted_exit_loss)
from .static import layerdrop_subset, truncate

__all__ = ["EarlyExitBert", "ExitOutput", "ExitTrace", "OffRamp", "RULES", "RAMPS_FILE", "EXIT_META_FILE",
           "layer_features", "train_offramps_frozen", "train_exits_joint", "train_berxit", "berxit_loss",
           "weighted_exit_loss", "exit_targets", "exit_statistics", "statistics_from_features",
           "exits_from_statistics", "statistics_run", "per_exit_scores", "calibrate_exit", "bisect_threshold",
           "selection_scorer", "layerdrop_subset", "truncate"]
