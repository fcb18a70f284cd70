"""What every benchmark writes beside its figures: the command, the commit and the machine."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"


_STARTED_AT = None


def commit() -> str:
    """The commit the benchmark started on (with ``+dirty`` when the tree had changes then).

    Read once, when first asked (scripts ask at start), so later commits made while a long run goes
    on do not relabel its results."""
    global _STARTED_AT
    if _STARTED_AT is None:
        _STARTED_AT = _read_commit()
    return _STARTED_AT


def _read_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# What is not code: a commit that changes only these does not change what a benchmark computes, so
# results written before and after it belong to one run (an interrupted run resumes across it).
NOT_CODE = ("benchmarks/results", "README.md", "benchmarks/README.md", "docs")


class MixedRunError(RuntimeError):
    """Results of different code commits, or of a dirty tree, would be merged into one results file."""


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def code_commit(root: Optional[Path] = None, not_code: tuple = NOT_CODE) -> str:
    """The last commit that changed code (``git log -1 --format=%H -- <code paths>``, every path but
    ``not_code``), with ``+dirty`` when code has uncommitted changes; ``unknown`` outside git.

    Commits that only add results, README text or docs do not move it: a run interrupted, its partial
    results committed, and resumed, is still one run of one code commit."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    spec = [".", *(f":(exclude){p}" for p in not_code)]
    try:
        sha = _git(root, "log", "-1", "--format=%H", "--", *spec)
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *spec)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("+dirty" if dirty else "")


_CODE_AT_START = None


def pinned_code_commit() -> str:
    """:func:`code_commit` read once, at the first call (scripts call it at start)."""
    global _CODE_AT_START
    if _CODE_AT_START is None:
        _CODE_AT_START = code_commit()
    return _CODE_AT_START


def check_one_commit(commits, current: str, allow_mixed: bool = False, what: str = "results") -> list:
    """Refuse (:class:`MixedRunError`) to put ``what`` of other code commits than ``current``, or of a
    dirty tree or an unknown commit, into one results file, unless ``allow_mixed``. Returns the
    distinct commits, ``current`` first."""
    seen = [current] + sorted({c for c in commits if c and c != current})
    bad = [c for c in seen if c.endswith("+dirty") or c == "unknown"]
    if (len(seen) > 1 or bad) and not allow_mixed:
        why = []
        if len(seen) > 1:
            why.append(f"other code commits ({', '.join(c[:12] for c in seen[1:])}) than this one ({current[:12]})")
        if bad:
            why.append(f"a dirty tree or an unknown commit ({', '.join(bad)})")
        raise MixedRunError(f"{what} would mix {' and '.join(why)}: commit the code and rerun from a clean tree, "
                            "start a new results file or output directory (tradeoff.py: --fresh, --output-dir), "
                            "or pass --allow-mixed to merge them anyway (they are then marked as mixed)")
    return seen


def csv_list(text: str, kind=str, allowed=None, what: str = "values", ap=None) -> list:
    """A comma-separated argument as a list of ``kind`` (blanks dropped); with ``allowed``, unknown items are
    an error (``ap.error`` when a parser is given, else ValueError) naming them and what is allowed."""
    items = [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    unknown = sorted(set(items) - set(allowed)) if allowed is not None else []
    if unknown:
        msg = f"unknown {what} {unknown}; expected some of {', '.join(map(str, allowed))}"
        if ap is not None:
            ap.error(msg)
        raise ValueError(msg)
    return items


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def markdown_table(rows: list, columns: list) -> str:
    """``columns``: (header, key, format) triples."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def layer_heatmap(labels: list, freq, path: Path, title: str) -> None:
    """How often each layer ran (rows: ``labels``; ``freq`` ``(rows, L)`` in [0, 1]): the paper's Fig. 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    freq = np.asarray(freq)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * freq.shape[1], 0.9 + 0.55 * len(labels)))
    im = ax.imshow(freq, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(freq.shape[1]), [str(i + 1) for i in range(freq.shape[1])])
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(freq):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
