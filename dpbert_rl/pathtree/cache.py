"""The path-tree cache: with a frozen backbone, an input's whole skipping game, computed once.

A path's state after layer ``i`` depends only on its first ``i`` decisions, so the ``2^L`` paths of an
input form a binary tree, walked once by :func:`dpbert_rl.pathtree.oracle.path_states` (``2^L - 1`` layer calls
per input: 63 for a 6-layer model, for all 64 paths). A skipped layer leaves the state unchanged, so
the tree holds only ``2^L`` distinct states, one per path: the state at decision node (layer ``i``,
prefix ``s``) is the state of path ``s << (L - i)`` (the prefix, then skips only). The cache stores, per
input of a split:

==============  ==============  =========================================================================
array           shape           what
==============  ==============  =========================================================================
``features``    ``(N, 2^L, F)``  raw (unstandardised) planner features of state ``p``: ``[CLS]``, the
                                masked token mean, or both (``cls`` then ``mean``), as stored
``losses``      ``(N, 2^L)``    task loss of path ``p`` (cross-entropy; squared error for regression)
``predictions`` ``(N, 2^L)``    class id (as a float) or regression value of path ``p``
``correct``     ``(N, 2^L)``    ``prediction == label`` (regression: ``|prediction - label| < 0.5``)
``labels``      ``(N,)``        the label
``indices``     ``(N,)``        the input's index in the split
==============  ==============  =========================================================================

Path ``p``'s decisions are the bits of ``p``, layer 1 the most significant (:func:`dpbert_rl.pathtree.oracle.paths`).
Keeping the 2^L states rather than the 2^(L+1) - 1 nodes (decision nodes and leaves) halves the size
and still serves every observation the live environment makes, the final one included.

Raw features are stored, not standardised ones, so one cache serves any planner statistics, and a
``cls+mean`` cache serves all three feature choices (:meth:`PathTree.raw`).

Size per 1,000 inputs (all-MiniLM-L6-v2: ``L = 6``, ``d = 384``; 64 states per input): ``cls`` or ``mean``
alone 98.3 MB in float32 (64 x 384 x 4 B = 98,304 B per input), ``cls+mean`` 196.6 MB; the per-path
outcomes add 0.6 MB (64 x 9 B per input). Measured on RTE with MiniLM: 197.4 MB per 1,000 inputs for
``cls+mean`` (files included). So RTE's 2,490 training inputs take 0.5 GB, SST-2's 67k take 13 GB
(memory-mapped; ``max_samples`` caps a split).

Features are stored in **float32**. float16 would halve the size, but observations are standardised,
``(x - mean) / std``, which magnifies float16's relative error of 5e-4 where a feature barely varies
across inputs. Measured on MiniLM/RTE: with ``mean`` features the observations move by up to 5e-3
(against 5e-6 in float32), and with ``cls`` (whose spread across inputs is 1e-5 of its size, and zero
at the embedding output) by the whole clip range. ``dtype="float16"`` exists for ``mean`` features
where that error is acceptable; the default keeps the replay equal to the live environment.

Files live in ``runs/pathtree/<task>_<split>_<features>_<key>/`` (``.npy``, no pickle, memory-mapped on
load; ``meta.json``), keyed by the checkpoint (weights file path, mtime and size; or a hash of the
weights of an in-memory model), the task, split, the data file's content (SHA-256), ``max_samples``,
``max_seq_length``, features and dtype. :func:`tree_cache` reuses a cache when present and builds it otherwise.
``meta.json`` records the SHA-256 of every ``.npy`` file and of itself; :meth:`PathTree.load` verifies them
(and the shapes) and refuses a changed, truncated or unhashed cache with :class:`CacheError`, naming the file:
delete the cache directory and it is built again.

On top of the cache: :func:`dpbert_rl.training.exact.train_exact`, planner training by the exact expected reward over all
paths (no sampling, so a gradient without variance; ``dpbert-rl exact``), and the replay environment
``dpbert_rl/LayerSkipTree-v0`` (:mod:`envs.layer_skip_tree`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..checks import check_output_dir
from ..model.backbone import eval_mode
from ..model.planner import Planners, bernoulli_log_prob, check_features

FORMAT_VERSION = 2  # 2: meta.json holds the SHA-256 of every array file and of itself
DEFAULT_CACHE_DIR = "runs/pathtree"
META = "meta.json"
ARRAYS = ("features", "losses", "predictions", "correct", "labels", "indices")


class CacheError(ValueError):
    """A path-tree cache file is missing, damaged, changed or of an older format; the message names the file
    and says to delete the cache directory (which :func:`tree_cache` then rebuilds)."""


def _damaged(directory: Path, file: Path, problem: str) -> str:
    return (f"{file}: {problem}; the path-tree cache cannot be trusted: delete the directory {directory} to "
            "rebuild it (tree_cache and `dpbert-rl exact` build a missing cache again)")


def _stream_sha256(file: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks; memoised per (path, mtime, size) for this process."""
    st = Path(file).stat()
    return _file_sha256(str(Path(file).resolve()), st.st_mtime_ns, st.st_size)


def _meta_digest(meta: dict) -> str:
    """SHA-256 of ``meta.json``'s content without its own ``meta_sha256`` (canonical JSON: sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_meta(directory: Path) -> dict:
    """``meta.json`` of a cache, parsed and checked against its own hash (:class:`CacheError` otherwise)."""
    file = directory / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CacheError(_damaged(directory, file, f"not valid JSON ({err.msg} at line {err.lineno}, column "
                                                   f"{err.colno})")) from None
    except UnicodeDecodeError as err:
        raise CacheError(_damaged(directory, file, f"not valid JSON (byte {err.start} is not UTF-8)")) from None
    if not isinstance(meta, dict):
        raise CacheError(_damaged(directory, file, f"expected a JSON object, found {type(meta).__name__}"))
    if meta.get("format") != FORMAT_VERSION:
        older = " (written by an older dpbert_rl, without content hashes)" if meta.get("format") == 1 else ""
        raise CacheError(_damaged(directory, file, f"path-tree cache format {meta.get('format')!r}{older}; this "
                                                   f"code reads format {FORMAT_VERSION}"))
    if not isinstance(meta.get("sha256"), dict) or not isinstance(meta.get("meta_sha256"), str):
        raise CacheError(_damaged(directory, file, "no content hashes (sha256, meta_sha256), so the arrays "
                                                   "cannot be verified"))
    if meta["meta_sha256"] != _meta_digest(meta):
        raise CacheError(_damaged(directory, file, "its content does not match its meta_sha256: the file was "
                                                   "edited after the cache was written"))
    return meta


def _expected_arrays(directory: Path, meta: dict) -> dict:
    """``name -> (shape, dtype)`` of every array, from ``meta.json``."""
    try:
        N, L, d = int(meta["num_inputs"]), int(meta["num_layers"]), int(meta["hidden_size"])
        F_ = (2 if check_features(meta["features"]) == "cls+mean" else 1) * d
        feature_dtype = np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError) as err:
        raise CacheError(_damaged(directory, directory / META, f"cannot tell the arrays' shapes "
                                                               f"({type(err).__name__}: {err})")) from None
    P = 2 ** L
    f32 = np.dtype(np.float32)
    return {"features": ((N, P, F_), feature_dtype), "losses": ((N, P), f32), "predictions": ((N, P), f32),
            "correct": ((N, P), np.dtype(bool)), "labels": ((N,), f32), "indices": ((N,), np.dtype(np.int64))}


def _verify_array(directory: Path, file: Path, shape: tuple, dtype: np.dtype, sha256: Optional[str]) -> None:
    """The ``.npy`` header says ``shape`` and ``dtype``, the file holds all of the data and nothing more, and
    its bytes have ``sha256``; else :class:`CacheError` naming the file. Reads the header, then the file in blocks."""
    from numpy.lib import format as npy

    if not file.is_file():
        raise CacheError(_damaged(directory, file, "missing"))
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            version = npy.read_magic(fh)
            if version == (1, 0):
                got_shape, fortran, got_dtype = npy.read_array_header_1_0(fh)
            else:
                got_shape, fortran, got_dtype = npy.read_array_header_2_0(fh)
            offset = fh.tell()
    except (OSError, ValueError, EOFError) as err:
        raise CacheError(_damaged(directory, file, f"truncated or not a .npy file (its header does not read: "
                                                   f"{' '.join(str(err).split())})")) from None
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != dtype or fortran:
        raise CacheError(_damaged(directory, file, f"an array of shape {tuple(got_shape)} {np.dtype(got_dtype)}"
                                                   f"{' (Fortran order)' if fortran else ''} where {tuple(shape)} "
                                                   f"{dtype} is expected (from {META})"))
    needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < needed:
        raise CacheError(_damaged(directory, file, f"truncated ({size} bytes where {needed} are expected)"))
    if size > needed:
        raise CacheError(_damaged(directory, file, f"{size - needed} bytes beyond the array's end"))
    if not sha256:
        raise CacheError(_damaged(directory, file, f"no sha256 recorded in {META}, so it cannot be verified"))
    if _stream_sha256(file) != sha256:
        raise CacheError(_damaged(directory, file, f"its content does not match the sha256 recorded in {META} "
                                                   "when the cache was written (a file of another split or "
                                                   "cache, edited or damaged)"))


# ---------------------------------------------------------------------------------------- the tree
def tree_index(num_layers: int) -> dict:
    """Index arrays that turn the tree's shape into lookups (``P = 2^L``):

    * ``node_state[i]`` ``(2^i,)``: the state of node (layer ``i``, prefix ``s``), ``s << (L - i)``;
    * ``path_node[i]`` ``(P,)``: the prefix (node at layer ``i``) of every path, ``p >> (L - i)``;
    * ``path_bit[i]`` ``(P,)``: every path's decision at layer ``i``;
    * ``path_layers`` ``(P,)``: layers every path executes.
    """
    L = num_layers
    p = np.arange(2 ** L)
    return {
        "node_state": [np.arange(2 ** i) << (L - i) for i in range(L)],
        "path_node": [p >> (L - i) for i in range(L)],
        "path_bit": [(p >> (L - 1 - i)) & 1 for i in range(L)],
        "path_layers": np.array([bin(int(x)).count("1") for x in p]),
    }


@dataclass
class PathTree:
    """One split's path-tree cache (see the module docstring for the arrays and their shapes).

    :param meta: ``num_layers``, ``hidden_size``, ``features`` (stored), ``regression``, ``task``,
        ``split``, ``dtype``, ``key`` and what the key was made of.
    """

    features: np.ndarray
    losses: np.ndarray
    predictions: np.ndarray
    correct: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    meta: dict

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_inputs(self) -> int:
        return int(self.losses.shape[0])

    @property
    def num_paths(self) -> int:
        return 2 ** self.num_layers

    @property
    def regression(self) -> bool:
        return bool(self.meta["regression"])

    def __len__(self) -> int:
        return self.num_inputs

    def raw(self, features: str) -> np.ndarray:
        """The raw features ``(N, 2^L, F)`` of one choice (a view when the stored choice holds it)."""
        check_features(features)
        stored, d = self.meta["features"], int(self.meta["hidden_size"])
        if features == stored:
            return self.features
        if stored == "cls+mean":
            return self.features[:, :, :d] if features == "cls" else self.features[:, :, d:]
        raise ValueError(f"this path-tree cache holds {stored!r} features; {features!r} needs a "
                         f"{features!r} or 'cls+mean' cache")

    def oracle_run(self) -> dict:
        """The cache in the form :func:`dpbert_rl.pathtree.oracle.enumerate_paths` returns, for
        :func:`~dpbert_rl.pathtree.oracle.oracle_choices` and :func:`~dpbert_rl.pathtree.oracle.best_static_paths`."""
        from .oracle import paths

        return {"predictions": np.asarray(self.predictions), "losses": np.asarray(self.losses),
                "labels": np.asarray(self.labels), "paths": paths(self.num_layers).numpy()}

    def full_path_states(self) -> np.ndarray:
        """``(L,)``: the state before each layer along the path that executes every layer."""
        L = self.num_layers
        return np.array([(2 ** i - 1) << (L - i) for i in range(L)])

    def feature_stats(self, features: str, samples: Optional[int] = None) -> dict:
        """What :func:`dpbert_rl.model.feature_stats` computes on the first ``samples`` inputs, read from
        the cache: mean and std ``(L, F)`` of the raw features before every layer along the full path
        (float64 sums, unbiased variance) and each layer's ``spread``."""
        n = self.num_inputs if samples is None else min(int(samples), self.num_inputs)
        if n < 2:
            raise ValueError("feature statistics need at least 2 inputs")
        x = torch.from_numpy(np.array(self.raw(features)[:n][:, self.full_path_states()], dtype=np.float32))
        x = x.double()  # (n, L, F)
        mean = x.sum(0) / n
        var = ((x * x).sum(0) / n - mean ** 2).clamp_min(0.0) * n / (n - 1)
        spread = (var.sum(1) / (mean ** 2).sum(1).clamp_min(1e-30)).tolist()
        return {"mean": mean.float(), "std": var.sqrt().float(), "examples": n, "features": features,
                "spread": spread}

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, Path]) -> Path:
        """Write the arrays as ``.npy`` (no pickle) and ``meta.json``; atomically (a temporary directory
        is renamed), so that an interrupted build leaves no half cache. ``meta.json`` records the SHA-256
        of every ``.npy`` file (``sha256``) and of its own content (``meta_sha256``); :meth:`load` checks them."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
        meta = {k: v for k, v in self.meta.items() if k not in ("sha256", "meta_sha256")}
        meta["format"] = FORMAT_VERSION
        meta["sha256"] = {name: _stream_sha256(tmp / f"{name}.npy") for name in ARRAYS}
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], mmap: bool = True) -> "PathTree":
        """Read a cache written by :meth:`save`; the features are memory-mapped unless ``mmap=False``.

        Every file is verified first: ``meta.json`` must parse and match its own hash, and every array must
        have the shape and dtype ``meta.json`` implies, its full length, and the SHA-256 recorded when it was
        written (read once, in blocks; memory-mapped features are not copied). Any mismatch (a file of another
        split, an edited or truncated one, a cache without hashes) raises :class:`CacheError` naming the file
        and saying to delete the cache directory, which :func:`tree_cache` then rebuilds."""
        path = Path(path)
        if not (path / META).is_file():
            raise FileNotFoundError(f"no path-tree cache at {str(path)!r} (expected {META} and .npy files)")
        meta = _read_meta(path)
        expected = _expected_arrays(path, meta)
        arrays = {}
        for name in ARRAYS:
            f = path / f"{name}.npy"
            _verify_array(path, f, *expected[name], meta["sha256"].get(name))
            try:
                arrays[name] = np.load(f, mmap_mode="r" if (mmap and name == "features") else None,
                                       allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise CacheError(_damaged(path, f, f"not readable ({type(err).__name__}: {err})")) from None
        return cls(meta=meta, **arrays)

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, name).nbytes for name in ARRAYS))


def parts(features: str) -> tuple:
    """The raw parts a feature choice is made of, in storage order."""
    return {"cls": ("cls",), "mean": ("mean",), "cls+mean": ("cls", "mean")}[check_features(features)]


@torch.no_grad()
def build_tree(model, dataset, collate_fn, features: str = "cls+mean", batch_size: int = 1,
               dtype: str = "float32", progress: bool = True, meta: Optional[dict] = None) -> PathTree:
    """Walk the path tree of every input of a tokenised ``dataset`` (:func:`dpbert_rl.pathtree.oracle.path_states`)
    and collect the cache's arrays.

    :param model: a :class:`~dpbert_rl.model.DPBert` (run in eval mode: no dropout).
    :param features: what to store: ``cls``, ``mean`` or ``cls+mean`` (serves all three).
    :param batch_size: inputs per walk. The default 1 pads nothing: an input's tree is already a batch
        (``2^i`` rows at layer ``i``), and unpadded states are closest to the live single env's (padding
        changes a state's last bits, which the standardisation of a near-constant feature magnifies).
    :param dtype: ``float32`` (default; see the module docstring) or ``float16`` for the features.
    """
    from torch.utils.data import DataLoader

    from .oracle import path_states
    from ..model.planner import raw_features

    check_features(features)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16'; got {dtype!r}")
    with eval_mode(model):
        L, d = model.num_layers, model.backbone.hidden_size
        P, F_ = 2 ** L, (2 if features == "cls+mean" else 1) * d
        N = len(dataset)
        feats = np.empty((N, P, F_), dtype=dtype)
        losses = np.empty((N, P), np.float32)
        preds = np.empty((N, P), np.float32)
        correct = np.empty((N, P), bool)
        labels = np.empty((N,), np.float32)
        device = next(model.parameters()).device
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"path tree ({P} paths, {P - 1} layer calls per input)", unit="batch")
        row = 0
        for b in loader:
            b = {k: v.to(device) for k, v in b.items()}
            h, mask = path_states(model, b)  # (B, P, T, d)
            B, _, T, _ = h.shape
            flat, m = h.reshape(B * P, T, d), mask.repeat_interleave(P, 0)
            x = raw_features(flat, m, features).reshape(B, P, F_)
            logits = model.classify(flat)
            y = b["labels"].repeat_interleave(P, 0)
            pred = model.predict(logits).float()
            yf = y.float()
            ok = outcome_correct(pred, yf, model.is_regression)
            sl = slice(row, row + B)
            feats[sl] = x.float().cpu().numpy().astype(dtype)
            losses[sl] = model.task_loss(logits, y).float().reshape(B, P).cpu().numpy()
            preds[sl] = pred.reshape(B, P).cpu().numpy()
            correct[sl] = ok.reshape(B, P).cpu().numpy()
            labels[sl] = b["labels"].float().cpu().numpy()
            row += B
    info = {"format": FORMAT_VERSION, "num_layers": L, "hidden_size": d, "features": features,
            "regression": bool(model.is_regression), "num_labels": int(model.backbone.num_labels),
            "dtype": dtype, "num_inputs": N, **(meta or {})}
    return PathTree(features=feats, losses=losses, predictions=preds, correct=correct, labels=labels,
                    indices=np.arange(N, dtype=np.int64), meta=info)


# ---------------------------------------------------------------------------------------- the key
def outcome_correct(predictions, labels, regression: bool):
    """The cache's ``correct``: ``prediction == label``, or for regression ``|prediction - label| < 0.5``
    (tensors or arrays alike)."""
    return abs(predictions - labels) < 0.5 if regression else predictions == labels


def checkpoint_fingerprint(model) -> str:
    """What identifies the backbone's weights: for a dpbert_rl checkpoint directory, its weight files'
    paths, modification times and sizes (cheap: nothing is read); for a :class:`~dpbert_rl.model.DPBert`
    in memory, a hash of the backbone's tensors (head included). Planners are not part of it: the
    cache holds raw features, which do not depend on them."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not (path / "dpbert.json").is_file():
            raise ValueError(f"{str(model)!r} is not a dpbert_rl checkpoint (no dpbert.json): its head would be "
                             "initialised afresh on every load; pass the loaded DPBert instead")
        files = sorted(f for f in path.iterdir() if f.name == "config.json" or (
            f.suffix in (".safetensors", ".bin") and f.name != "planners.safetensors"))
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_mtime_ns}:{st.st_size};".encode())
        return "file:" + h.hexdigest()
    h = hashlib.blake2b(digest_size=32)
    for name, t in sorted(model.backbone.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "weights:" + h.hexdigest()


def data_fingerprint(task, split: str, data_dir: Optional[str]) -> str:
    """The data file a split is read from: its name, size and the SHA-256 of its content, or ``hub``.

    Content, not path or modification time: a GLUE directory that is copied or restored again (same
    files, new times) keeps its caches, and a file edited in place does not."""
    from ..data import DERIVED_SPLITS, resolve_data_dir

    root = resolve_data_dir(data_dir)
    if root is None:
        return "hub"
    f = (root / task.dir_name / dict(task.splits)[DERIVED_SPLITS.get(split, split)]).resolve()
    st = f.stat()
    return f"{f.name}:{st.st_size}:sha256:{_file_sha256(str(f), st.st_mtime_ns, st.st_size)}"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file's bytes, memoised per (path, mtime, size): a GLUE file is hashed once per process."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(fingerprint: str, task: str, split: str, data: str, max_samples: Optional[int],
              max_seq_length: int, features: str, dtype: str) -> tuple:
    """``(directory name, key dict)`` of one cache."""
    key = {"format": FORMAT_VERSION, "checkpoint": fingerprint, "task": task, "split": split, "data": data,
           "max_samples": max_samples, "max_seq_length": int(max_seq_length), "features": features, "dtype": dtype}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{task}_{split}_{features.replace('+', '-')}_{dtype}_{digest}", key


def tree_cache(model, task: str, split: str = "train", data_dir: Optional[str] = None,
               max_samples: Optional[int] = None, max_seq_length: int = 128, features: str = "cls+mean",
               cache_dir: Union[str, Path] = DEFAULT_CACHE_DIR, dtype: str = "float32", batch_size: int = 1,
               device: str = "cpu", progress: bool = True, fingerprint: Optional[str] = None,
               mmap: bool = True) -> PathTree:
    """The path-tree cache of ``split``: loaded when present, else built (with a progress bar) and saved.

    A ``cls+mean`` cache of the same inputs also serves ``cls`` and ``mean``, and is used when present.
    The split is read as the live environment reads it: ``load_split(task, split, data_dir, max_samples)``
    (the first ``max_samples`` inputs), tokenised to ``max_seq_length``.

    :param model: a dpbert_rl checkpoint directory (loaded only when a cache must be built) or a
        :class:`~dpbert_rl.model.DPBert`.
    :param fingerprint: overrides :func:`checkpoint_fingerprint` (e.g. a checkpoint's, for its loaded model).
    """
    from ..data import get_task

    check_features(features)
    t = get_task(task)
    fp = fingerprint or checkpoint_fingerprint(model)
    data = data_fingerprint(t, split, data_dir)
    root = Path(cache_dir)
    for choice in dict.fromkeys((features, "cls+mean")):
        name, _ = cache_key(fp, t.name, split, data, max_samples, max_seq_length, choice, dtype)
        if (root / name / META).is_file():
            return PathTree.load(root / name, mmap=mmap)
    name, key = cache_key(fp, t.name, split, data, max_samples, max_seq_length, features, dtype)
    check_output_dir(root, "cache_dir (--cache-dir)")  # before the build, not after it
    dpbert = _as_model(model, t)
    from ..data import collator, load_split, tokenize

    ds = tokenize(load_split(t, split, data_dir, max_samples), dpbert.tokenizer, max_seq_length)
    dpbert.to(torch.device(device))
    tree = build_tree(dpbert, ds, collator(dpbert.tokenizer), features, batch_size, dtype, progress,
                      meta={"task": t.name, "split": split, "key": name, "key_parts": key})
    tree.save(root / name)
    return PathTree.load(root / name, mmap=mmap)


def _as_model(model, task):
    from ..model.dpbert import DPBert

    if isinstance(model, DPBert):
        return model
    return DPBert.from_source(str(model), task.num_labels)


def planner_info(model) -> dict:
    """The planners a model (checkpoint directory or DPBert) carries, without loading the backbone:
    ``features``, ``num_layers`` (None when unknown), and ``mean``/``std`` ``(L, F)`` numpy when their
    standardisation statistics are set (else None)."""
    if not isinstance(model, (str, Path)):
        p = model.planners
        stats = bool(p.stats_set)
        return {"features": p.features, "num_layers": p.num_layers,
                "mean": p.feature_mean.detach().cpu().numpy().copy() if stats else None,
                "std": p.feature_std.detach().cpu().numpy().copy() if stats else None}
    path = Path(model)
    meta = json.loads((path / "dpbert.json").read_text()) if (path / "dpbert.json").is_file() else {}
    out = {"features": meta.get("planner_features", "cls"), "num_layers": meta.get("num_layers"),
           "mean": None, "std": None}
    if (path / "planners.safetensors").is_file():
        from safetensors.numpy import load_file

        state = load_file(str(path / "planners.safetensors"))
        if "stats_set" in state and bool(state["stats_set"]):
            out["mean"], out["std"] = state["feature_mean"], state["feature_std"]
    return out


# ---------------------------------------------------------------------------------------- exact expectation
def path_log_probs(planners: Planners, raw: torch.Tensor, index: Optional[dict] = None, price=None) -> dict:
    """The planners' policy over all paths of a batch, from the tree's raw features.

    :param raw: ``(B, 2^L, F)`` raw features of every state (:meth:`PathTree.raw`).
    :param price: the layer price that price-conditioned planners read (a number or ``(B,)``).
    :return: ``log_probs`` ``(B, 2^L)``: ``log prod_i pi(a_i | node_i(p))`` of every path ``p``, and
        ``node_logits``: per layer ``i``, the planner logits ``(B, 2^i)`` at its nodes.
    """
    L = planners.num_layers
    index = index or tree_index(L)
    B, P, _ = raw.shape
    log_probs = raw.new_zeros(B, P)
    node_logits = []
    for i in range(L):
        z = planners.standardise(i, raw[:, torch.as_tensor(index["node_state"][i])])  # (B, 2^i, F)
        logit = planners(i, z, price)  # (B, 2^i)
        node_logits.append(logit)
        per_path = logit[:, torch.as_tensor(index["path_node"][i])]  # (B, P)
        log_probs = log_probs + bernoulli_log_prob(per_path, torch.as_tensor(index["path_bit"][i]))
    return {"log_probs": log_probs, "node_logits": node_logits}


def path_rewards(outcome: torch.Tensor, cost, lam: float, path_layers) -> torch.Tensor:
    """``lambda * q(p) - c * |p|`` for every path ``(B, 2^L)``: the episode return of eq. (9); ``cost`` a
    number or one price per input ``(B,)``."""
    cost = torch.as_tensor(cost, dtype=outcome.dtype)
    cost = cost[:, None] if cost.dim() == 1 else cost
    return lam * outcome - cost * torch.as_tensor(path_layers, dtype=outcome.dtype)[None, :]


def expected_return(planners: Planners, raw: torch.Tensor, outcome: torch.Tensor, cost, lam: float,
                    index: Optional[dict] = None) -> dict:
    """``E[R] = sum_p prod_i pi(a_i | node) (lambda q(p) - c |p|)`` per input: an exact sum over all
    ``2^L`` paths, differentiable in the planners, whose gradient has no sampling variance.

    :param raw: ``(B, 2^L, F)`` raw features; :param outcome: ``(B, 2^L)`` each path's ``q``
        (:func:`dpbert_rl.model.objectives.final_reward`); :param cost: the layer price, a number or one per input
        ``(B,)``; price-conditioned planners read it too.
    :return: ``expected_return`` ``(B,)``, ``entropy`` ``(B,)`` (of the path distribution, in nats),
        ``expected_layers`` ``(B,)``, ``probs`` ``(B, 2^L)`` and ``node_logits``.
    """
    index = index or tree_index(planners.num_layers)
    pol = path_log_probs(planners, raw, index, cost if planners.conditioned else None)
    lp = pol["log_probs"]
    probs = lp.exp()
    rewards = path_rewards(outcome, cost, lam, index["path_layers"])
    layers = torch.as_tensor(index["path_layers"], dtype=probs.dtype)
    return {"expected_return": (probs * rewards).sum(1), "entropy": -(probs * lp).sum(1),
            "expected_layers": (probs * layers[None, :]).sum(1), "probs": probs,
            "node_logits": pol["node_logits"]}


@torch.no_grad()
def greedy_paths(planners: Planners, raw: torch.Tensor, threshold: float = 0.5, price=None) -> torch.Tensor:
    """The path index ``(B,)`` that hard mode (eq. 5: execute when ``p_i >= threshold``) takes; ``price``: the
    layer price price-conditioned planners read (default: their stored one)."""
    L = planners.num_layers
    B = raw.shape[0]
    thr = math.log(threshold / (1.0 - threshold)) if 0.0 < threshold < 1.0 else (
        -math.inf if threshold <= 0 else math.inf)
    rows, s = torch.arange(B), torch.zeros(B, dtype=torch.long)
    for i in range(L):
        z = planners.standardise(i, raw[rows, s << (L - i)])  # (B, F)
        s = 2 * s + (planners(i, z, price) >= thr).long()
    return s


__all__ = ["CacheError", "PathTree", "build_tree", "tree_cache", "tree_index", "checkpoint_fingerprint", "planner_info",
           "path_log_probs", "path_rewards", "expected_return", "greedy_paths", "ARRAYS", "DEFAULT_CACHE_DIR"]
