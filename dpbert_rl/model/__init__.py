"""The method: the backbone behind three calls, the per-layer planners, ``DPBert`` (the single loop over
layers) and the equations as pure functions. Imports nothing from training, evaluation or the baselines."""

from .backbone import DEFAULT_BACKBONE, Backbone, BackboneError, Embedded
from .dpbert import META_FILE, MODES, DPBert, DPBertOutput, TaskInfo, feature_stats
from .planner import FEATURES, Planners

__all__ = ["DEFAULT_BACKBONE", "Backbone", "BackboneError", "Embedded", "META_FILE", "MODES", "DPBert", "DPBertOutput",
           "TaskInfo", "feature_stats", "FEATURES", "Planners"]
