"""Writing a stage's results so that a crash loses nothing: the chosen model swapped in atomically, the
resumable ``checkpoint/`` (model, optimizer, scheduler, RNG; loaded without unpickling), ``DONE``, and the
metrics log cut back to the step resumed from. Every stage (the training loop and the exact stage) writes
through this module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..checks import CheckpointError, nonfinite, read_json
from ..model.dpbert import DPBert
from .config import TrainingError

DONE_FILE = "DONE"


def is_checkpoint(path) -> bool:
    return (Path(path) / "config.json").is_file()


def stage_done(output_dir) -> bool:
    return (Path(output_dir) / "model" / DONE_FILE).is_file()


def save_atomic(model: DPBert, path: Path, extra: Optional[dict] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if extra:
        (tmp / "selection.json").write_text(json.dumps(extra, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def save_checkpoint(path: Path, model: DPBert, optimizer, scheduler, state: dict) -> None:
    """Write the resumable state; the old one is replaced only once the new one is complete, and never
    by one whose parameters hold a NaN or an infinity."""
    bad = nonfinite(model.named_parameters())
    if bad:
        raise TrainingError(f"not saving a checkpoint at step {state.get('global_step')}: non-finite parameters "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). {recovery(path)}")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(path: Path, model: DPBert, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``path``; the learning rates configured now
    replace the saved ones (a resume may lower them). A damaged file is one error naming it."""
    configured = [g["initial_lr"] for g in optimizer.param_groups]
    try:
        state = read_json(path / "state.json")
        saved = DPBert.load(path)
        model.load_state_dict(saved.state_dict())
        blob = load_trainer_state(path / "trainer.pt")
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TrainingError(f"cannot resume from {path}: {err}. Delete {path} to run this stage again from its "
                            "start (its model/ and the other stages are not touched)") from None
    set_learning_rates(optimizer, scheduler, configured)
    return state


def load_trainer_state(path: Path) -> dict:
    """The optimizer, scheduler and RNG state of a checkpoint, loaded without unpickling code
    (``weights_only=True``: tensors and plain containers only, so a crafted file cannot run anything)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the checkpoint was not written completely")
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # UnpicklingError (refused or damaged), EOFError, RuntimeError (truncated zip)
        text = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{path}: not a trainer state that loads safely ({type(err).__name__}: {text})") from None
    missing = {"optimizer", "scheduler", "torch_rng"} - set(blob if isinstance(blob, dict) else ())
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(sorted(missing))} in it; expected a trainer state")
    return blob


def set_learning_rates(optimizer, scheduler, base_lrs: list) -> None:
    """Give a resumed optimizer the configured base learning rates, at the restored schedule position."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate wraps the LambdaLR
    old = list(inner.base_lrs)
    if old == list(base_lrs):
        return
    inner.base_lrs = list(base_lrs)
    for group, base, fn in zip(optimizer.param_groups, base_lrs, inner.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(inner.last_epoch)
    inner._last_lr = [g["lr"] for g in optimizer.param_groups]
    print(f"resuming with base learning rates {sorted(set(base_lrs))} (were {sorted(set(old))})")


def check_finite_parameters(stage: str, model: DPBert, step: int, ckpt_dir: Path) -> None:
    """Stop right after an optimizer step that left a NaN or an infinity in a trained parameter, before
    anything is saved: the last checkpoint is then truly the last good one."""
    bad = nonfinite((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if bad:
        raise TrainingError(f"[{stage}] the update of step {step} made {len(bad)} parameters non-finite "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); stopped. {recovery(ckpt_dir)}")


def recovery(ckpt_dir: Path) -> str:
    """What to do after a numerical blow-up, for the error message."""
    if not ckpt_dir.exists():
        return "No checkpoint was written yet: re-run with a lower --lr / --planner-lr, or check the data."
    return (f"The last good checkpoint is {ckpt_dir}: re-run the same command with a lower --lr / --planner-lr "
            "to resume from it at that rate, or check the data.")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of ``metrics.jsonl`` logged at or before ``step`` (the checkpoint being resumed;
    0 for a fresh start), so that a resumed run does not log its steps twice. A row cut off by a kill
    is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))
