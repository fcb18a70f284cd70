"""dpbert-rl: Dynamic Planning in BERT -- learn, per input, which transformer layers to run."""

from .backbone import DEFAULT_BACKBONE, Backbone
from .model import DPBert, DPBertOutput
from .planner import Planners

__version__ = "0.1.0"
__all__ = ["Backbone", "DPBert", "DPBertOutput", "Planners", "DEFAULT_BACKBONE", "__version__"]
