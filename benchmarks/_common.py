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
