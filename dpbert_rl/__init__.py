"""dpbert-rl: Dynamic Planning in BERT -- learn, per input, which transformer layers to run.

The package, in the direction its imports run (each uses only those above it)::

    checks, data     plumbing: argument and file checks, the GLUE tasks and their loading
    model/           the method: backbone, planners, DPBert (the single layer loop), the equations
    pathtree/        every path of a frozen model: enumeration and the path-tree cache
    evaluation/      metrics, scoring, batch-1 latency, diagnostics
    training/        the stages, the exact stage 3, the pipeline, checkpoint writing
    baselines/       early exits, BERT-kL and LayerDrop on the same backbone
    cli              the ``dpbert-rl`` command
"""

from .model import DEFAULT_BACKBONE, Backbone, DPBert, DPBertOutput, Planners

__version__ = "0.1.0"
__all__ = ["Backbone", "DPBert", "DPBertOutput", "Planners", "DEFAULT_BACKBONE", "__version__"]
