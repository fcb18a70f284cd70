"""GLUE tasks: the task table, loading from a local GLUE directory or the hub, tokenisation.

A local GLUE directory has the standard layout written by GLUE's ``download_glue_data.py``::

    <data_dir>/RTE/train.tsv, <data_dir>/RTE/dev.tsv, <data_dir>/MNLI/dev_matched.tsv, ...

Files are read as TSV with quoting switched off (RTE has fields that begin with a stray ``"``,
which the default CSV quoting merges into the next rows), with an optional UTF-8 BOM (MRPC),
and CoLA without a header. The directory comes from ``--data-dir`` or ``$GLUE_DIR``; without
either, the data is loaded from the Hugging Face hub (``nyu-mll/glue``).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from datasets import Dataset

GLUE_DIR_ENV = "GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"

# The selection split: a seeded held-out part of each task's training file. Every choice (checkpoint,
# threshold, target rate, hyperparameter) is made on it; dev is scored once and reported. The seed is
# fixed (not the run's seed) so that every stage, method and run of a task holds out the same examples.
SELECTION_SEED = 20261128
SELECTION_FRACTION = 0.1
SELECTION_MAX = 2000
SELECTION_MIN = 50  # below this many examples, load_split warns that choices made on the selection split are noise
DERIVED_SPLITS = {"fit": "train", "select": "train"}  # derived split -> the file it is carved from


def selection_size(n_train: int) -> int:
    """How many of ``n_train`` training examples the selection split holds: 10%, at most 2,000, at least 1."""
    return max(1, min(SELECTION_MAX, int(round(SELECTION_FRACTION * n_train))))


def carve_selection(n_train: int) -> tuple:
    """``(fit_indices, select_indices)`` of a training file of ``n_train`` rows (seeded, disjoint, sorted)."""
    import numpy as np

    if n_train < 2:
        raise DataError(f"a training file of {n_train} rows cannot be split into fit and selection parts")
    order = np.random.RandomState(SELECTION_SEED).permutation(n_train)
    k = selection_size(n_train)
    return np.sort(order[k:]).tolist(), np.sort(order[:k]).tolist()

Column = Union[str, int]  # a header name, or a 0-based position for header-less files


class DataError(ValueError):
    """Bad or missing input data; the message names the file, the line and what was expected."""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its columns are, its labels and its metric.

    :param label_names: label strings in id order as the GLUE TSVs write them (the hub's order
        too); None for regression.
    :param splits: split name -> TSV file name in the task's folder.
    :param hub_splits: split name -> the hub dataset's split name.
    :param hub_columns: (text_a, text_b) column names in the hub dataset.
    """

    name: str
    dir_name: str
    text_a: Column
    text_b: Optional[Column]
    label: Column
    label_names: Optional[tuple]
    metric: str
    hub_columns: tuple
    splits: tuple = (("train", "train.tsv"), ("dev", "dev.tsv"))
    hub_splits: tuple = (("train", "train"), ("dev", "validation"))
    has_header: bool = True
    num_fields: Optional[int] = None  # for header-less files
    label_range: Optional[tuple] = None  # (low, high) for regression
    names: Optional[tuple] = None  # what the labels mean, where the TSV writes ids ('0', '1'): for id2label

    @property
    def display_names(self) -> Optional[list]:
        """The label names a checkpoint answers with (``id2label``): the GLUE datasets' own names, e.g.
        ``negative``/``positive`` for SST-2, where the TSV writes 0/1; None for regression."""
        names = self.names or self.label_names
        return list(names) if names else None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def split_names(self) -> list:
        return [s for s, _ in self.splits]


_BIN = ("0", "1")
_ENT = ("entailment", "not_entailment")
TASKS = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", 3, None, 1, _BIN, "matthews", ("sentence", None), has_header=False, num_fields=4,
                 names=("unacceptable", "acceptable")),
        GlueTask("sst2", "SST-2", "sentence", None, "label", _BIN, "accuracy", ("sentence", None),
                 names=("negative", "positive")),
        GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", _BIN, "acc_and_f1", ("sentence1", "sentence2"),
                 names=("not_equivalent", "equivalent")),
        GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", _BIN, "acc_and_f1", ("question1", "question2"),
                 names=("not_duplicate", "duplicate")),
        GlueTask(
            "stsb", "STS-B", "sentence1", "sentence2", "score", None, "pearson_spearman",
            ("sentence1", "sentence2"), label_range=(0.0, 5.0),
        ),
        GlueTask(
            "mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
            "accuracy", ("premise", "hypothesis"),
            splits=(("train", "train.tsv"), ("dev", "dev_matched.tsv"), ("dev_mismatched", "dev_mismatched.tsv")),
            hub_splits=(("train", "train"), ("dev", "validation_matched"), ("dev_mismatched", "validation_mismatched")),
        ),
        GlueTask("qnli", "QNLI", "question", "sentence", "label", _ENT, "accuracy", ("question", "sentence")),
        GlueTask("rte", "RTE", "sentence1", "sentence2", "label", _ENT, "accuracy", ("sentence1", "sentence2")),
    ]
}


def get_task(name: str) -> GlueTask:
    """Look a task up by name, case- and dash-insensitively (``SST-2``, ``sst2``, ``STS-B``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in ("mnlim", "mnlimm"):
        key = "mnli"
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; expected one of {', '.join(TASKS)} (WNLI is excluded)")
    return TASKS[key]


def resolve_data_dir(data_dir: Optional[str] = None) -> Optional[Path]:
    """``data_dir``, else ``$GLUE_DIR``, else None (the hub)."""
    chosen = data_dir or os.environ.get(GLUE_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        source = "--data-dir" if data_dir else f"${GLUE_DIR_ENV}"
        raise DataError(f"GLUE directory {str(path)!r} (from {source}) does not exist")
    return path


# ---------------------------------------------------------------------- local TSV files
def read_glue_tsv(path: Union[str, Path], task: GlueTask, bad_rows: str = "error",
                  skipped: Optional[list] = None, labels: bool = True) -> dict:
    """Read one GLUE TSV into ``{"text_a": [...], "text_b": [...], "label": [...]}``.

    :param labels: False reads the inputs only: the label column is never parsed, and there is no
        ``label`` key (a compute budget set on dev's inputs must not see dev's labels).

    :param bad_rows: ``"error"`` stops at the first malformed row (wrong field count, bad label, empty
        text, bytes that are not UTF-8) with its file and line; ``"skip"`` drops such rows and lists
        their line numbers on stderr.
    :param skipped: when given, every dropped row is appended to it as ``{"line": n, "error": message}``
        (the caller records them, e.g. in a run's ``config.json``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} not found: expected the GLUE layout <data_dir>/{task.dir_name}/<split>.tsv"
        )
    out = {"text_a": [], "text_b": [], "label": []}
    dropped: list = []
    # undecodable bytes are kept as surrogates and refused row by row, so that the error has a line
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = _rows(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), path)
        if task.has_header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty; expected a header line")
            check_utf8(header, f"{path}:{reader.line_num}")
            cols = {}
            for key in ("text_a", "text_b", "label") if labels else ("text_a", "text_b"):
                name = getattr(task, key)
                if name is None:
                    continue
                if name not in header:
                    raise DataError(f"{path}:1: header has no column {name!r}; found {header}")
                cols[key] = header.index(name)
            n_fields = len(header)
            what = "header " + "\\t".join(header)
        else:
            cols = {k: getattr(task, k) for k in ("text_a", "text_b", "label") if getattr(task, k) is not None}
            n_fields = task.num_fields
            what = f"the {task.dir_name} layout"
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            try:
                check_utf8(row, f"{path}:{line}")
                if len(row) != n_fields:
                    raise DataError(
                        f"{path}:{line}: expected {n_fields} tab-separated fields ({what}), found {len(row)}"
                    )
                label = parse_label(task, row[cols["label"]], where=f"{path}:{line}") if labels else None
                text_a = row[cols["text_a"]].strip()
                text_b = row[cols["text_b"]].strip() if "text_b" in cols else None
                for key, text in (("text_a", text_a), ("text_b", text_b)):
                    if text is not None and not text:
                        col = getattr(task, key)
                        raise DataError(f"{path}:{line}: empty text in column {col!r}; expected a sentence")
            except DataError as err:
                if bad_rows == "skip":
                    dropped.append({"line": line, "error": str(err)})
                    continue
                raise
            out["text_a"].append(text_a)
            out["text_b"].append(text_b)
            out["label"].append(label)
    if not labels:
        del out["label"]
    if dropped:
        lines = [r["line"] for r in dropped]
        shown = ", ".join(map(str, lines[:SHOW_SKIPPED])) + (f", ... ({len(lines) - SHOW_SKIPPED} more)"
                                                             if len(lines) > SHOW_SKIPPED else "")
        print(f"warning: skipped {len(lines)} malformed rows of {path} (--bad-rows skip), lines {shown}; "
              f"the first: {dropped[0]['error']}", file=sys.stderr)
        if skipped is not None:
            skipped.extend(dropped)
    if not out["text_a"]:
        raise DataError(f"{path}: no data rows")
    return out


def load_inputs(task: Union[str, GlueTask], source: Union[str, Path], data_dir: Optional[str] = None,
                max_samples: Optional[int] = None) -> dict:
    """The inputs alone, ``{"text_a": [...], "text_b": [...]}``, labels never read: for setting a compute
    budget on the inputs that will be served.

    :param source: a file of your own (one input per line; for sentence-pair tasks the two sentences
        separated by a tab; a ``.tsv`` with the task's GLUE header is read by its columns), or a GLUE split
        name (``dev``, ``train``, ``fit``, ``select``, ...) read from ``data_dir`` without its label column.
    :param max_samples: the first N inputs.
    """
    task = get_task(task) if isinstance(task, str) else task
    path = Path(source)
    if path.is_file():
        out = _read_input_file(path, task)
    else:
        files = dict(task.splits)
        split = str(source)
        base = DERIVED_SPLITS.get(split, split)
        if base not in files:
            raise DataError(f"--inputs {source}: neither a file nor a split of {task.name} (expected a file, or one "
                            f"of {task.split_names + list(DERIVED_SPLITS)})")
        root = resolve_data_dir(data_dir)
        if root is None:
            ds = _load_from_hub(task, base).remove_columns(["label"])
            out = {"text_a": list(ds["text_a"]), "text_b": list(ds["text_b"])}
        else:
            out = read_glue_tsv(root / task.dir_name / files[base], task, labels=False)
        if split in DERIVED_SPLITS:
            keep = carve_selection(len(out["text_a"]))[0 if split == "fit" else 1]
            out = {k: [v[i] for i in keep] for k, v in out.items()}
    if max_samples is not None:
        out = {k: v[:max_samples] for k, v in out.items()}
    return out


def _read_input_file(path: Path, task: GlueTask) -> dict:
    """Inputs from a file of one's own: a GLUE-style TSV with the task's header, or one input per line (a
    tab between the two sentences of a pair task)."""
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: no inputs (expected one per line)")
    header = lines[0].split("\t")
    if task.has_header and task.text_a in header and (task.text_b is None or task.text_b in header):
        return read_glue_tsv(path, task, labels=False)
    out = {"text_a": [], "text_b": []}
    pair = task.text_b is not None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        check_utf8([line], f"{path}:{n}")
        fields = [f.strip() for f in line.split("\t")]
        if pair and (len(fields) != 2 or not all(fields)):
            raise DataError(f"{path}:{n}: expected two tab-separated sentences for {task.name}; found {len(fields)} "
                            "field(s)")
        if not pair and len(fields) != 1:
            raise DataError(f"{path}:{n}: expected one sentence per line for {task.name}; found {len(fields)} "
                            "tab-separated fields")
        out["text_a"].append(fields[0])
        out["text_b"].append(fields[1] if pair else None)
    return out


SHOW_SKIPPED = 20  # line numbers of skipped rows printed on stderr (the caller may record them all)


class _rows:
    """A ``csv.reader`` whose errors are :class:`DataError` naming the file and line. A field beyond the csv
    module's size limit (131,072 characters; a GLUE text is a sentence or a paragraph) means a damaged file or
    one that is not a GLUE TSV, and is an error even with ``bad_rows="skip"``."""

    def __init__(self, reader, path: Path):
        self._reader, self._path = reader, path

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self):
        return self

    def __next__(self) -> list:
        try:
            return next(self._reader)
        except csv.Error as err:
            if "field larger than field limit" in str(err):
                raise DataError(f"{self._path}:{self.line_num}: a field longer than {csv.field_size_limit()} "
                                "characters (the csv module's field size limit); a GLUE field is a sentence, so the "
                                "file is damaged or not a GLUE TSV (a missing line break?)") from None
            raise DataError(f"{self._path}:{self.line_num}: not a readable TSV line ({err})") from None


def check_utf8(fields: Sequence[str], where: str) -> None:
    """Refuse a row read with ``errors="surrogateescape"`` that holds bytes which are not UTF-8, naming
    the byte and the column (GLUE files are UTF-8; a file saved as Latin-1 or cp1252 has such bytes)."""
    try:
        "".join(fields).encode("utf-8")
    except UnicodeEncodeError:
        for col, text in enumerate(fields, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                byte = ord(text[err.start]) - 0xDC00
                raise DataError(f"{where}: byte 0x{byte:02x} in field {col} is not valid UTF-8; expected a "
                                "UTF-8 file (convert it, e.g. iconv -f cp1252 -t utf-8)") from None


def parse_label(task: GlueTask, raw: str, where: str = "") -> Union[int, float]:
    """A label string to its id (classification) or float (regression), or a clear error."""
    raw = raw.strip()
    prefix = f"{where}: " if where else ""
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{prefix}label {raw!r} is not a number; {task.name} is a regression task") from None
        lo, hi = task.label_range or (-math.inf, math.inf)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise DataError(f"{prefix}label {value} is outside [{lo}, {hi}]")
        return value
    if raw not in task.label_names:
        raise DataError(f"{prefix}label {raw!r} is not one of {list(task.label_names)}")
    return task.label_names.index(raw)


# ---------------------------------------------------------------------- one entry point
def load_split(
    task: Union[str, GlueTask],
    split: str = "train",
    data_dir: Optional[str] = None,
    max_samples: Optional[int] = None,
    shuffle_seed: Optional[int] = None,
    bad_rows: str = "error",
    skipped: Optional[list] = None,
) -> Dataset:
    """Load one split as a ``datasets.Dataset`` with columns ``text_a``, ``text_b``, ``label``.

    :param split: ``train``, ``dev`` (MNLI: matched) or ``dev_mismatched`` (MNLI only), or one of the
        two parts of the training file: ``fit`` (what is trained on) and ``select`` (the held-out
        selection split, :func:`carve_selection`).
    :param data_dir: a local GLUE directory; falls back to ``$GLUE_DIR``, then to the hub.
    :param max_samples: keep this many examples (a seeded random subset when ``shuffle_seed``
        is given, else the first ones).
    :param bad_rows: ``"error"`` or ``"skip"`` (:func:`read_glue_tsv`); ``"skip"`` is refused for a dev
        split, which is scored in full. ``skipped`` collects the dropped rows.
    """
    task = get_task(task) if isinstance(task, str) else task
    files = dict(task.splits)
    source = DERIVED_SPLITS.get(split, split)
    if source not in files:
        raise DataError(f"task {task.name} has no split {split!r}; expected one of "
                        f"{task.split_names + list(DERIVED_SPLITS)}")
    check_bad_rows(bad_rows, split)
    if max_samples is not None and max_samples <= 0:
        raise DataError(f"max_samples must be positive; got {max_samples}")
    root = resolve_data_dir(data_dir)
    if root is not None:
        ds = Dataset.from_dict(read_glue_tsv(root / task.dir_name / files[source], task, bad_rows, skipped))
    else:
        ds = _load_from_hub(task, source)
    if split in DERIVED_SPLITS:
        n_train = len(ds)
        fit, select = carve_selection(n_train)
        ds = ds.select(fit if split == "fit" else select)
    if max_samples is not None and max_samples < len(ds):
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed)
        ds = ds.select(range(max_samples))
    if split == "select" and len(ds) < SELECTION_MIN:
        capped = f", capped at max_samples {max_samples}" if len(ds) < len(select) else ""
        warnings.warn(f"{task.name}: the selection split holds {len(ds)} example{'s' if len(ds) != 1 else ''} "
                      f"(of {n_train} training rows: fit {len(fit)}, selection {len(select)}{capped}), fewer than "
                      f"{SELECTION_MIN}: a checkpoint, threshold or setting chosen on it is chosen by chance; use a "
                      "larger training file", UserWarning, stacklevel=2)
    return ds


def check_bad_rows(bad_rows: str, split: str) -> None:
    """``bad_rows`` is ``"error"`` or ``"skip"``, and ``"skip"`` only outside the dev splits: a score on a
    dev set with rows silently left out is not comparable to anyone else's."""
    if bad_rows not in ("error", "skip"):
        raise DataError(f"bad_rows must be 'error' or 'skip'; got {bad_rows!r}")
    if bad_rows == "skip" and split.startswith("dev"):
        raise DataError(f"bad_rows='skip' is refused for the {split!r} split: dev rows are never skipped, so "
                        "that the score covers the whole set (--bad-rows skip applies to training rows only)")


def _load_from_hub(task: GlueTask, split: str) -> Dataset:
    from datasets import load_dataset

    hub_split = dict(task.hub_splits)[split]
    try:
        raw = load_dataset(HUB_DATASET, task.name, split=hub_split)
    except Exception as err:  # ConnectionError, OfflineModeIsEnabled, ...
        raise DataError(
            f"could not load {HUB_DATASET}/{task.name} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Offline, point --data-dir or ${GLUE_DIR_ENV} at a local GLUE directory "
            f"(<dir>/{task.dir_name}/{dict(task.splits)[split]})."
        ) from err
    a, b = task.hub_columns
    return Dataset.from_dict(
        {"text_a": raw[a], "text_b": raw[b] if b else [None] * len(raw), "label": raw["label"]}
    )


# ---------------------------------------------------------------------- tokenisation
def encode(tokenizer, text_a: Sequence[str], text_b: Optional[Sequence[Optional[str]]], max_seq_length: int) -> dict:
    """Tokenise texts (pairs when ``text_b`` has strings), truncated to ``max_seq_length``."""
    pairs = text_b is not None and any(t is not None for t in text_b)
    return tokenizer(list(text_a), list(text_b) if pairs else None, truncation=True, max_length=max_seq_length)


def tokenize(ds: Dataset, tokenizer, max_seq_length: int = 128) -> Dataset:
    """Add ``input_ids``/``attention_mask``/(``token_type_ids``) and ``labels``; no padding
    (batches are padded dynamically by :func:`collator`)."""
    if max_seq_length < 8:
        raise DataError(f"max_seq_length must be at least 8; got {max_seq_length}")

    def fn(batch):
        enc = encode(tokenizer, batch["text_a"], batch["text_b"], max_seq_length)
        enc["labels"] = batch["label"]
        return enc

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenising")


def collator(tokenizer):
    """Dynamic padding to the longest example of each batch."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def encode_one(tokenizer, text_a: str, text_b: Optional[str] = None, max_seq_length: int = 128) -> dict:
    """One raw input (``predict``), as a batch of 1; empty texts are refused."""
    for name, text in (("text", text_a), ("second text", text_b)):
        if text is not None and not text.strip():
            raise DataError(f"the {name} is empty; expected a sentence")
    return tokenizer(text_a, text_b, truncation=True, max_length=max_seq_length, return_tensors="pt")
