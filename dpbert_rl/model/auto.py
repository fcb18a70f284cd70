"""DPBERT behind Hugging Face's Auto classes and ``transformers.pipeline``, with its planners skipping layers.

A saved checkpoint (:meth:`DPBert.save`) stays a plain checkpoint of its backbone: loaded without
``trust_remote_code`` it is the backbone's own ``*ForSequenceClassification``, every layer run. It also
carries a two-line ``modeling_dpbert.py`` and an ``auto_map`` entry in ``config.json``, so that::

    from transformers import pipeline
    clf = pipeline("text-classification", model="runs/sst2/stage3_exact/model", trust_remote_code=True,
                   model_kwargs={"budget": 0.6})      # or {"speedup": 1.5}; default: the calibrated setting
    clf("a gripping, beautifully made film")          # [{'label': 'positive', 'score': ...}]

loads :class:`DPBertForSequenceClassification`: the planners decide, per input, which layers run, and
skipped layers are not computed. ``trust_remote_code=True`` runs that file, which only imports this module
from the installed ``dpbert-rl``; nothing is downloaded. Registering the class for every BERT checkpoint
(so that ``import dpbert_rl`` alone would do) would also hijack plain BERT checkpoints, so it is not done.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

@dataclass
class DPBertClassifierOutput(SequenceClassifierOutput):
    """:class:`~transformers.modeling_outputs.SequenceClassifierOutput` plus the path each input took.

    :param actions: ``(batch, L)``, 1 = layer executed.
    :param layers_executed: ``(batch,)``.
    """

    actions: Optional[torch.Tensor] = None
    layers_executed: Optional[torch.Tensor] = None


class DPBertForSequenceClassification(PreTrainedModel):
    """A DPBERT checkpoint as a ``transformers`` sequence classifier (see the module docstring).

    :param config: the backbone's config (labels from ``id2label``).
    :param dpbert: the :class:`~dpbert_rl.model.DPBert` that runs.
    :param budget: fraction of the layers to run on average, in (0, 1]; 1 runs the plain model (every layer,
        planners not read); None keeps the knob the checkpoint was calibrated to (``dpbert-rl calibrate``).
    """

    config_class = PretrainedConfig
    base_model_prefix = "dpbert"
    main_input_name = "input_ids"
    # the wrapped backbone runs its own attention, as its family implements it
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: PretrainedConfig, dpbert=None, budget: Optional[float] = None):
        super().__init__(config)
        self.dpbert = dpbert
        self.budget: Optional[float] = None
        if dpbert is not None:
            self.set_budget(budget)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, budget: Optional[float] = None,
                        speedup: Optional[float] = None, **kwargs) -> "DPBertForSequenceClassification":
        """Load a DPBERT checkpoint directory; ``budget`` (or ``speedup``, meaning ``budget = 1 / speedup``)
        sets its speed, read off the budget curve measured on the inputs it was calibrated on. Other keyword
        arguments of ``PreTrainedModel.from_pretrained`` (``config``, ``dtype``, ...) are accepted and
        ignored: the checkpoint's own are used."""
        from .dpbert import DPBert

        if speedup is not None:
            if budget is not None:
                raise ValueError("give budget or speedup, not both")
            if not (isinstance(speedup, (int, float)) and speedup >= 1):
                raise ValueError(f"speedup must be a number >= 1; got {speedup!r}")
            budget = 1.0 / speedup
        model = DPBert.load(pretrained_model_name_or_path, require_planners=True)
        wrapper = cls(copy.deepcopy(model.backbone.config), model, budget)  # a copy: init edits the config
        wrapper.eval()
        return wrapper

    def set_budget(self, budget: Optional[float]) -> None:
        """Run at ``budget`` from now on (see the class docstring)."""
        from .budget import check_budget, knob_for_budget, set_knob

        if budget is not None:
            budget = check_budget(budget)
            if budget < 1.0:
                set_knob(self.dpbert, knob_for_budget(self.dpbert, budget))
        self.budget = budget

    def forward(self, input_ids: torch.Tensor = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **kwargs) -> DPBertClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mode = "full" if self.budget == 1.0 else "hard"
        out = self.dpbert(input_ids, attention_mask, token_type_ids, labels=labels, mode=mode)
        return DPBertClassifierOutput(loss=out.loss, logits=out.logits, actions=out.actions,
                                      layers_executed=out.layers_executed)
