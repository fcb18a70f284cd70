"""Writing a stage's results so that a crash loses nothing and nothing of the user's is touched.

* **Ownership.** A stage writes only into an output folder that carries this project's marker file
  (:data:`MARKER`), written when the folder is new or empty. A folder that holds anything else is refused:
  ``--output-dir .`` in a project root never has its ``model/`` or ``checkpoint/`` removed.
* **One run per folder.** :func:`claim_output_dir` takes an exclusive lock (``flock``) on the folder's lock
  file for the run's lifetime; a second run into it is refused, naming the first one's pid. The lock goes
  with the process, so a killed run leaves no stale lock.
* **Swaps that a kill cannot lose.** The chosen model and the resumable ``checkpoint/`` are written to
  ``<name>.tmp``, renamed to ``<name>.new`` once complete, and then swapped in (``<name>`` -> ``<name>.old``,
  ``<name>.new`` -> ``<name>``, ``<name>.old`` removed). :func:`recover_swap`, run at every start, finishes
  a swap that a kill interrupted, or rolls it back: a complete model is never lost.
* The resumable ``checkpoint/`` (model, optimizer, scheduler, RNG) is loaded without unpickling, ``DONE``
  is written last, and the metrics log is cut back to the step resumed from.

Every stage (the training loop and the exact stage) writes through this module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..checks import CheckpointError, nonfinite, read_json
from ..model.dpbert import DPBert
from .config import TrainingError

DONE_FILE = "DONE"
#: The marker file of an output folder this project owns.
MARKER = ".dpbert-rl"
#: The lock file held while a run writes into its output folder.
LOCK_FILE = ".dpbert-rl.lock"
_LOCKS: dict = {}  # output folder -> open lock file, held until the process ends or release_output_dir


# ---------------------------------------------------------------------- the output folder
#: the launchers' rank variables (torchrun and accelerate launch set RANK; MPI launchers their own)
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def is_main_process() -> bool:
    """Whether this is the main process of a (possibly multi-process) run, from the launcher's rank variable:
    the stage's Accelerator does not exist yet when its folder is claimed (and creating Accelerate's state
    here, before the Accelerator with its settings, would fix those settings too early)."""
    for var in _RANK_VARS:
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var]) == 0
    return True


def wait_for_recovery(out_dir: Path, timeout: float = 120.0) -> None:
    """The other processes' side of :func:`stage_dir`: wait until the main process has finished or rolled back
    any interrupted swap in ``out_dir`` (no ``.new`` / ``.old`` left), so that all see the same folder."""
    import time

    pending = [p for name in ("model", "checkpoint") for p in _swap_names(Path(out_dir) / name)[1:]]
    deadline = time.time() + timeout
    while any(p.exists() for p in pending) and time.time() < deadline:
        time.sleep(0.2)


def claim_output_dir(out_dir: Path, stage: str) -> None:
    """Make ``out_dir`` this run's: create it (with the marker) when new, adopt it when empty or written by
    an earlier version of this project (:func:`_written_by_us`), refuse it when it holds anything else, then
    lock it against a second run (only the main process of a multi-process run locks).

    :raises TrainingError: a regular file, a folder that cannot be written, one this project did not write,
        or one another run is writing to.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"--output-dir {out_dir} is a file, not a folder: give a folder (new or empty)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"--output-dir {out_dir}: cannot create it ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise TrainingError(f"--output-dir {out_dir} is not writable: give a folder this user can write to")
    if not (out_dir / MARKER).is_file():
        entries = sorted(p.name for p in out_dir.iterdir() if p.name not in (MARKER, LOCK_FILE))
        if entries and not (out_dir / MARKER).is_file() and not _written_by_us(out_dir):
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise TrainingError(
                f"--output-dir {out_dir} holds files this project did not write ({shown}): a stage removes and "
                f"replaces model/ and checkpoint/ in its folder, so it writes only into a new or empty folder, or one "
                f"of its own (marked by {MARKER}); give another --output-dir")
        if is_main_process():
            (out_dir / MARKER).write_text(json.dumps({"written_by": "dpbert-rl", "stage": stage}) + "\n")
    if is_main_process():
        lock_output_dir(out_dir)


def owned(path: Path) -> bool:
    """Whether ``path`` is a folder this project owns (it carries the marker)."""
    return (Path(path) / MARKER).is_file()


def _written_by_us(out_dir: Path) -> bool:
    """A folder of this project from before the marker: its ``config.json`` is a stage's (a stage name, the
    task and the seed), or it holds nothing but path-tree caches (an exact stage killed while building them)."""
    try:
        saved = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict):
        from .config import STAGES

        return saved.get("stage") in (*STAGES, "exact") and "task" in saved and "seed" in saved
    entries = list(out_dir.iterdir())
    return bool(entries) and all(p.name == "pathtree" and p.is_dir() and
                                 all((c / "meta.json").is_file() or c.name.endswith(".tmp") for c in p.iterdir())
                                 for p in entries)


def lock_output_dir(out_dir: Path) -> None:
    """Hold an exclusive lock on ``out_dir`` until :func:`release_output_dir` has been called as often as this
    (re-entrant within a process), or the process ends."""
    key = str(Path(out_dir).resolve())
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return
    try:
        import fcntl
    except ImportError:  # no flock on this platform: a second run is not detected
        _LOCKS[key] = [None, 1]
        return
    f = open(Path(out_dir) / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise TrainingError(f"--output-dir {out_dir} is in use by another run (pid {holder}); wait for it to "
                                "end, or give another --output-dir") from None
        raise TrainingError(f"--output-dir {out_dir}: cannot lock it ({err.strerror}); this file system may not "
                            "support locks (flock): use a local folder") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _LOCKS[key] = [f, 1]


def release_output_dir(out_dir: Path) -> None:
    """Undo one :func:`lock_output_dir`; the lock goes with the last."""
    key = str(Path(out_dir).resolve())
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _LOCKS[key]
        if entry[0] is not None:
            entry[0].close()


@contextlib.contextmanager
def stage_dir(out_dir: Path, stage: str, init=None):
    """The output folder of a stage for the time it runs: claimed and locked (:func:`claim_output_dir`), its
    interrupted swaps finished or rolled back (:func:`recover_swap`, on the main process, the others waiting),
    and so is the starting checkpoint ``init`` where it lies in a folder of this project that no run is
    writing to; the lock released at the end."""
    out_dir = Path(out_dir)
    claim_output_dir(out_dir, stage)
    try:
        if is_main_process():
            for name in ("model", "checkpoint"):
                recover_swap(out_dir / name)
            if init is not None:
                recover_init(Path(init))
        else:
            wait_for_recovery(out_dir)
        yield out_dir
    finally:
        if is_main_process():
            release_output_dir(out_dir)


def recover_init(init: Path) -> None:
    """Finish a swap of the previous stage's model that a kill interrupted, only in a folder this project
    owns, and only while no run holds it (refused, naming the pid, while one does)."""
    parent = init.parent
    if init.is_dir() and not any(p.exists() for p in _swap_names(init)):
        return
    if not owned(parent) or Path(parent).resolve() == Path(init).resolve():
        return
    lock_output_dir(parent)
    try:
        recover_swap(init)
    finally:
        release_output_dir(parent)


# ---------------------------------------------------------------------- swaps a kill cannot lose
def _swap_names(path: Path) -> tuple:
    return tuple(path.with_name(path.name + ext) for ext in (".tmp", ".new", ".old"))


def recover_swap(path: Path) -> None:
    """Finish or roll back a swap of ``path`` that a kill interrupted (see the module docstring): a partial
    ``.tmp`` is removed; a complete ``.new`` is swapped in; a lone ``.old`` (the kill fell between the two
    renames and ``.new`` is gone) is put back."""
    path = Path(path)
    tmp, new, old = _swap_names(path)
    shutil.rmtree(tmp, ignore_errors=True)
    for leftover in (tmp, new, old):
        shutil.rmtree(leftover.with_name(leftover.name + ".discard"), ignore_errors=True)
    if new.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        new.rename(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(path)


def _discard(path: Path) -> None:
    """Remove ``path`` so that a kill while removing it leaves nothing that looks complete: renamed aside
    first (``.discard``, which recovery removes), then deleted."""
    if path.exists():
        aside = path.with_name(path.name + ".discard")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


def swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete folder ``tmp`` (``<path>.tmp``) so that a kill at any point leaves a
    complete one for :func:`recover_swap`."""
    _, new, old = _swap_names(path)
    _discard(new)  # a stale one (never complete: recover_swap would have swapped it in at the start)
    tmp.rename(new)  # from here on, new is complete
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def is_checkpoint(path) -> bool:
    return (Path(path) / "config.json").is_file()


def stage_done(output_dir) -> bool:
    return (Path(output_dir) / "model" / DONE_FILE).is_file()


def save_atomic(model: DPBert, path: Path, extra: Optional[dict] = None) -> None:
    """Save ``model`` (and ``extra`` as ``selection.json``) as ``path``, swapped in only once complete."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if extra:
        (tmp / "selection.json").write_text(json.dumps(extra, indent=2))
    swap_in(tmp, path)


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
    swap_in(tmp, path)


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
