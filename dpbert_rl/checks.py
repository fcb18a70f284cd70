"""Guards against silent wrong results: numbers, tasks, sequence lengths and checkpoint files.

Every check raises early with one line that names what was wrong, where (the file, the flag or the
argument) and what was expected, so that a bad setting or a damaged file stops a command before it
trains, predicts or reports anything. The command line prints that line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message names the file."""


class NonFiniteError(FloatingPointError):
    """A value that must be finite (a planner logit, a parameter) is NaN or infinite."""


# ---------------------------------------------------------------------- numbers
def check_number(value: Any, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, integer: bool = False, optional: bool = False) -> Any:
    """Return ``value`` if it is a finite number (a whole one with ``integer``) in the given range.

    :param name: how the user wrote it, e.g. ``"lr (--lr)"``; it starts the error message.
    :param low: the smallest allowed value (excluded with ``low_open``); ``high``: the largest.
    :param optional: None is allowed (and returned).
    """
    if value is None and optional:
        return None
    rule = _rule(low, high, low_open, integer, optional)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            (integer and not isinstance(value, numbers.Integral)):
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and value > high):
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    return value


def _rule(low, high, low_open, integer, optional) -> str:
    kind = "a whole number" if integer else "a finite number"
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bounds = f" <= {high:g}"
    else:
        bounds = ""
    return kind + bounds + (" (or none)" if optional else "")


def check_threshold(value: Any, name: str = "threshold") -> float:
    """An execute threshold of eq. (5): a finite number in [0, 1]. NaN would skip every layer."""
    return float(check_number(value, name, low=0.0, high=1.0))


def arg_type(kind: type, low: Optional[float] = None, high: Optional[float] = None,
             low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses ``kind`` and applies :func:`check_number`'s range, so that a bad
    flag is refused by the parser with the rule (``argument --lam: must be a finite number >= 0``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_rule(low, high, low_open, kind is int, False)}; "
                                             f"got {text!r}") from None
        try:
            return check_number(value, "value", low=low, high=high, low_open=low_open, integer=kind is int)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("value ")) from None

    parse.__name__ = kind.__name__
    return parse


# Training settings: field -> (low, high, low_open, integer, optional). Fields a config lacks are skipped.
_POSITIVE_INT = (1, None, False, True, False)
_OPTIONAL_POSITIVE_INT = (1, None, False, True, True)
_POSITIVE = (0.0, None, True, False, False)
_NON_NEGATIVE = (0.0, None, False, False, False)
CONFIG_RULES = {
    "max_seq_length": (8, None, False, True, False),
    "max_train_samples": _OPTIONAL_POSITIVE_INT,
    "max_eval_samples": _OPTIONAL_POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "eval_batch_size": _POSITIVE_INT,
    "lr": _POSITIVE,
    "planner_lr": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "warmup_ratio": (0.0, 1.0, False, False, False),
    "max_grad_norm": _NON_NEGATIVE,
    "seed": (0, 2 ** 32 - 1, False, True, False),
    "cost": _NON_NEGATIVE,
    "lam": _NON_NEGATIVE,
    "beta": _NON_NEGATIVE,
    "planner_init_bias": (None, None, False, False, False),
    "select_tolerance": _NON_NEGATIVE,
    "eval_steps": _OPTIONAL_POSITIVE_INT,
    "evals_per_epoch": _POSITIVE_INT,
    "save_steps": _POSITIVE_INT,
    "logging_steps": _POSITIVE_INT,
    "max_steps": _OPTIONAL_POSITIVE_INT,
    "stage3_lr": (0.0, None, True, False, True),
    "calibration_samples": _POSITIVE_INT,
    "latency_repeats": _POSITIVE_INT,
    "latency_samples": _OPTIONAL_POSITIVE_INT,
    "threads": _OPTIONAL_POSITIVE_INT,
}
_EPOCHS = ("epochs", "stage1_epochs", "stage2_epochs", "stage3_epochs")


def check_config_numbers(cfg: Any) -> None:
    """Check every numeric setting of a training configuration against :data:`CONFIG_RULES` (a learning
    rate must be > 0, lambda, c and beta >= 0, step counts whole and >= 1, ...). Epoch counts must be
    finite and > 0 unless ``max_steps`` is given."""
    # with the dual price (rate_control 'dual' and a target rate), c is only where the price starts, and the price
    # has no sign (DualPrice): a second fit of the adapt alternation starts where the first's was, below 0 included
    dual = getattr(cfg, "rate_control", None) == "dual" and getattr(cfg, "target_rate", None) is not None
    for field, (low, high, low_open, integer, optional) in CONFIG_RULES.items():
        if hasattr(cfg, field):
            if field == "cost" and dual:
                low = None
            check_number(getattr(cfg, field), _flag(field), low=low, high=high, low_open=low_open,
                         integer=integer, optional=optional)
    for field in _EPOCHS:
        if hasattr(cfg, field):
            value = getattr(cfg, field)
            check_number(value, _flag(field))
            if value <= 0 and not getattr(cfg, "max_steps", None):
                raise ValueError(f"{_flag(field)} must be > 0 (or give --max-steps); got {value!r}")


def _flag(field: str) -> str:
    return f"{field} (--{field.replace('_', '-')})"


# ---------------------------------------------------------------------- a model and its task
def check_task_compatible(model, task, source: Any) -> None:
    """Refuse to run ``model`` (a :class:`~dpbert_rl.model.DPBert`) on ``task`` (a
    :class:`~dpbert_rl.data.GlueTask`) when its head has another number or type of labels: a
    2-class head scored on STS-B would report a correlation of class ids."""
    got = int(model.backbone.num_labels)
    if got == task.num_labels:
        return
    trained = getattr(getattr(model, "task_info", None), "task", None)
    kind = "regression, 1 output" if got == 1 else f"classification, {got} labels"
    need = "regression, 1 output" if task.is_regression else f"classification, {task.num_labels} labels"
    raise ValueError(f"{source} has a head for {trained or 'another task'} ({kind}); task {task.name} needs "
                     f"{need}: pass the task the checkpoint was trained on, or a checkpoint of {task.name}")


def max_positions(model) -> Optional[int]:
    """How many tokens the backbone's position embeddings can take (RoBERTa-style embeddings start
    their positions after the padding index); None when the config does not say."""
    config = model.backbone.config
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    embeddings = getattr(model.backbone, "_base", None)
    padding_idx = getattr(getattr(embeddings, "embeddings", None), "padding_idx", None)
    return int(n) - (int(padding_idx) + 1 if padding_idx is not None else 0)


def check_max_seq_length(model, max_seq_length: int, source: Any) -> None:
    """Refuse a truncation length beyond the model's position embeddings (which would crash inside
    the embeddings on the first long input, possibly hours into a run)."""
    limit = max_positions(model)
    if limit is not None and max_seq_length > limit:
        raise ValueError(f"max_seq_length (--max-seq-length) {max_seq_length} exceeds the {limit} positions of "
                         f"{source}; use --max-seq-length {limit} or less")


# ---------------------------------------------------------------------- checkpoint files
def read_json(path: Path) -> Any:
    """Parse a JSON file, or raise :class:`CheckpointError` naming the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON (byte {err.start} is not UTF-8)") from None


def check_safetensors(path: Path) -> None:
    """Open a ``.safetensors`` file and read every tensor, or raise :class:`CheckpointError` naming it
    (a zero-byte or truncated file, or one that is not safetensors at all)."""
    from safetensors import safe_open

    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the checkpoint was not written completely")
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    except Exception as err:  # SafetensorError and friends: the file is damaged whatever the exact cause
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(err)}); "
                              "the file is truncated or damaged") from None


def read_safetensors(path: Path) -> dict:
    """The tensors of a ``.safetensors`` file; :class:`CheckpointError` naming it when it is damaged."""
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(err)})") from None


def check_state_shapes(expected: dict, found: dict, path: Path) -> None:
    """Compare the tensor shapes of a state dict read from ``path`` with the model's (keys in both)."""
    wrong = [f"{k}: {tuple(found[k].shape)} where {tuple(v.shape)} is expected"
             for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensors of the wrong shape for this backbone ({'; '.join(wrong)})")


def check_checkpoint_files(path: Path) -> None:
    """Every JSON and safetensors file of a checkpoint directory reads, or one line names the bad one."""
    path = Path(path)
    for name in ("config.json", "dpbert.json"):
        if (path / name).is_file():
            read_json(path / name)
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors(file)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def weight_names(path: Path) -> Optional[tuple]:
    """``(file, names)``: the first weight file of a checkpoint directory (:data:`WEIGHT_FILES`) and the names of
    the tensors it holds, read from its header or index (no tensor is loaded); None when there is none."""
    from safetensors import safe_open

    path = Path(path)
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_json(file)
            return file, set(index.get("weight_map", {})) if isinstance(index, dict) else set()
        if name.endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as f:
                return file, set(f.keys())
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise CheckpointError(f"{file}: not a readable weights file ({_one_line(err)})") from None
        return file, set(state) if isinstance(state, dict) else set()
    return None


def check_layer_weights(model, layers, path: Path) -> None:
    """Refuse a checkpoint directory whose weight file lacks tensors of encoder layers the model has, which
    Hugging Face initialises at random (only a warning): ``num_hidden_layers`` raised in ``config.json``.

    :param model: the Hugging Face model loaded from ``path``; :param layers: its ``ModuleList`` of encoder
        layers. A fresh classification head is normal (a plain backbone has none) and is not checked."""
    path = Path(path)
    found = weight_names(path)
    layers_name = next((n for n, m in model.named_modules() if m is layers), None)
    if found is None or not layers_name:
        return
    file, names = found
    # legacy LayerNorm names, and base-model checkpoints that store names without the model's prefix
    names = {n.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
             for n in names}
    prefix = getattr(model, "base_model_prefix", "")
    names |= {f"{prefix}.{n}" for n in names} if prefix else set()
    head = layers_name + "."
    layer_of = lambda key: int(key[len(head):].split(".", 1)[0])  # noqa: E731
    missing = [k for k in model.state_dict() if k.startswith(head) and k not in names]
    if not missing:
        return
    gaps = sorted({layer_of(k) for k in missing})
    stored = len({layer_of(k) for k in names if k.startswith(head) and k[len(head):].split(".", 1)[0].isdigit()})
    total = len(layers)
    where = _ranges([i + 1 for i in gaps])
    raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers is {total}, but {file} holds weights for "
                          f"{stored} encoder layers; layers {where} ({len(missing)} tensors) would run with random "
                          f"weights. Restore num_hidden_layers in config.json, or use the checkpoint it belongs to")


def _ranges(numbers: list) -> str:
    """``[5, 6, 8]`` -> ``"5-6, 8"``."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


# ---------------------------------------------------------------------- directories to write to
def check_output_dir(path, name: str = "output_dir (--output-dir)") -> Path:
    """Return ``path`` when a command can write there: an existing, writable directory, or a new one whose
    nearest existing parent is a writable directory. Otherwise raise :class:`ValueError` naming ``name`` and the
    path (a regular file, or a read-only folder), before anything is trained or built. Creates nothing.

    Writability is tested by creating and removing a temporary file (so that root, ACLs and read-only
    mounts are judged as the write itself would be)."""
    path = Path(path)
    target = path
    while not target.exists():  # the nearest existing ancestor is where the first directory will be made
        if target.parent == target:
            break
        target = target.parent
    if target.exists() and not target.is_dir():
        where = "" if target == path else f" (its parent {target} is a file)"
        raise ValueError(f"{name} {path} is not a directory{where}; expected a directory to write to: remove the "
                         f"file or choose another {name.split('(')[-1].rstrip(')') or 'directory'}")
    try:
        _probe_write(target)
    except OSError as err:
        what = "" if target == path else f" (it would be made in {target}, which is not writable)"
        raise ValueError(f"{name} {path} is not writable{what}: {err.strerror or _one_line(err)}; choose another "
                         f"{name.split('(')[-1].rstrip(')') or 'directory'} or fix its permissions") from None
    return path


def _probe_write(directory: Path) -> None:
    """Create and remove a temporary file in ``directory``; an :class:`OSError` when that is refused."""
    fd, probe = tempfile.mkstemp(prefix=".dpbert_rl_write_test.", dir=str(directory))
    os.close(fd)
    os.unlink(probe)


# ---------------------------------------------------------------------- the tokenizer
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
#: A model may pad its embedding matrix beyond its tokenizer to a round size (a multiple of 8, by fewer
#: than this many rows); any other difference means the tokenizer belongs to another model.
VOCAB_PADDING = 128


def check_tokenizer(tokenizer, config, source: Any, local_dir: Optional[Path] = None) -> None:
    """Refuse a tokenizer that does not belong to the model: a local checkpoint without tokenizer files
    (Hugging Face then builds one of 5 special tokens, so every word becomes [UNK] and the model still
    predicts), or one whose size differs from the embedding matrix's (beyond padding to a multiple of 8)."""
    if local_dir is not None and not any((Path(local_dir) / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{local_dir} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                              "copy them from the checkpoint the model was trained from")
    size, vocab = len(tokenizer), getattr(config, "vocab_size", None)
    if vocab is None:
        return
    padded = size < vocab < size + VOCAB_PADDING and vocab % 8 == 0
    if size != vocab and not padded:
        raise CheckpointError(f"{source}: the tokenizer has {size} tokens but the model's vocabulary has {vocab}; "
                              "the tokenizer files do not belong to this model")


# ---------------------------------------------------------------------- finiteness
def nonfinite(named: Iterable[tuple]) -> list:
    """Names of the tensors in ``named`` (``(name, tensor)`` pairs) that hold a NaN or an infinity."""
    return [name for name, t in named if t is not None and not bool(torch.isfinite(t).all())]


def check_finite_logits(logit: torch.Tensor, layer: int) -> None:
    """Raise :class:`NonFiniteError` when a planner's logits are not finite (``layer`` is 0-based)."""
    if not bool(torch.isfinite(logit).all()):
        raise NonFiniteError(f"planner {layer + 1} produced non-finite logits "
                             f"({int((~torch.isfinite(logit)).sum())} of {logit.numel()})")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


__all__ = ["CheckpointError", "NonFiniteError", "check_number", "check_threshold", "arg_type", "check_config_numbers",
           "check_task_compatible", "check_max_seq_length", "max_positions", "read_json", "check_safetensors",
           "read_safetensors", "check_state_shapes", "check_checkpoint_files", "check_tokenizer", "nonfinite",
           "check_finite_logits", "check_output_dir", "weight_names", "check_layer_weights"]
