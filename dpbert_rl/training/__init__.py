"""The three stages and the DPBERT-soft ablation (``stages``), the exact stage 3 on the path tree
(``exact``), the whole pipeline, threshold calibration, and the checkpoint writing they all share."""

from .calibrate import calibrate_checkpoint, calibrate_threshold
from .checkpoint import DONE_FILE, is_checkpoint, stage_done
from .config import STAGES, PipelineConfig, TrainConfig, TrainingError
from .exact import ExactConfig, train_exact
from .pipeline import (exact_stage, exact_stage_backbone, planner_stage, planner_stage3, resolve_stage3, run_pipeline,
                       stage3_for)
from .stages import build_model, load_data, train_stage

__all__ = ["calibrate_checkpoint", "calibrate_threshold", "DONE_FILE", "is_checkpoint", "stage_done", "STAGES",
           "PipelineConfig", "TrainConfig", "TrainingError", "ExactConfig", "train_exact", "exact_stage", "planner_stage",
           "planner_stage3", "exact_stage_backbone", "resolve_stage3", "stage3_for", "run_pipeline", "build_model",
           "load_data", "train_stage"]
