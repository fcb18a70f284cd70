"""What every benchmark writes beside its figures: the command, the commit and the machine."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

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
