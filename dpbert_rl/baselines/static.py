"""The static baselines: LayerDrop's fixed subset at inference, and BERT-kL's first ``k`` layers as a real
``k``-layer checkpoint."""

from __future__ import annotations

import copy
import math

import torch

from ..model.backbone import Backbone
from ..model.dpbert import DPBert
from ..model.planner import Planners


# ---------------------------------------------------------------------- LayerDrop, BERT-kL
def layerdrop_subset(num_layers: int, keep: int) -> list:
    """LayerDrop's fixed subset at inference: ``keep`` layers spread evenly, the last one always
    kept (the head was trained on it), e.g. 6 layers, keep 3 -> layers 2, 4, 6 ("every other").
    Returns a 0/1 action list of length ``num_layers``."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be in 1..{num_layers}; got {keep}")
    kept = {num_layers - 1 - math.floor(j * num_layers / keep) for j in range(keep)}
    return [1 if i in kept else 0 for i in range(num_layers)]


def truncate(model: DPBert, k: int) -> DPBert:
    """BERT-kL: a real ``k``-layer model made of the first ``k`` layers (and the head) of
    ``model``. Its checkpoint is a plain ``k``-layer HF checkpoint."""
    if not 1 <= k <= model.num_layers:
        raise ValueError(f"k must be in 1..{model.num_layers}; got {k}")
    hf = copy.deepcopy(model.backbone.model)
    base = getattr(hf, hf.base_model_prefix)
    del base.encoder.layer[k:]
    hf.config.num_hidden_layers = k
    planners = Planners(k, model.backbone.hidden_size)
    with torch.no_grad():
        planners.weight.copy_(model.planners.weight[:k])
        planners.bias.copy_(model.planners.bias[:k])
    return DPBert(Backbone(hf), planners, threshold=model.threshold, tokenizer=model.tokenizer,
                  task_info=model.task_info)
