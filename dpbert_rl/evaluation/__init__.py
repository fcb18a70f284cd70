"""What measures a model: the GLUE metrics, scoring a model on a split, batch-1 latency and speed-up
side by side, and diagnostics of what the planners can see."""

from .evaluate import evaluate_model, run_dataset, score_run, speedup_ideal, speedup_ideal_fields
from .latency import evaluate_checkpoint, format_report, machine_info
from .metrics import compute_metrics

__all__ = ["evaluate_model", "run_dataset", "score_run", "speedup_ideal", "speedup_ideal_fields",
           "evaluate_checkpoint", "format_report", "machine_info", "compute_metrics"]
