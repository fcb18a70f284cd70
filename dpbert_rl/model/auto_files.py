"""The two files that let transformers' Auto classes load a saved DPBERT checkpoint with its planners
(:mod:`dpbert_rl.model.auto`); written by :meth:`DPBert.save`, apart from the class so that saving does not
import it."""

from __future__ import annotations

import json
from pathlib import Path

MODULE_FILE = "modeling_dpbert.py"
AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_dpbert.DPBertForSequenceClassification"}
_MODULE_TEXT = '''# Written by dpbert-rl. With trust_remote_code=True, transformers' Auto classes and pipeline() load this
# checkpoint as DPBERT (planners deciding which layers run) from the installed dpbert-rl package.
from dpbert_rl.model.auto import DPBertForSequenceClassification  # noqa: F401
'''


def write_auto_files(path: Path) -> None:
    """Add ``modeling_dpbert.py`` and ``config.json``'s ``auto_map`` to a saved checkpoint directory."""
    path = Path(path)
    (path / MODULE_FILE).write_text(_MODULE_TEXT)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = dict(AUTO_MAP)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
