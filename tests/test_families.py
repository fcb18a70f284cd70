"""Every family the backbone accepts runs right: DPBERT's per-layer loop equals the family's own forward
(MPNet's relative-position bias included), per-row skipping equals each row alone, a loop that does not
match is refused at load, and the packaged MPNet-base is unpacked once and verified."""

from __future__ import annotations

import copy
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from dpbert_rl.model.backbone import Backbone, BackboneError
from dpbert_rl.model import DPBert
from tests.conftest import WORDS

FAMILIES = ["bert", "roberta", "electra", "mpnet"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
LENGTHS = (7, 4, 6, 3)  # a padded batch: every row but the first ends in padding


def tiny_model(family: str, layers: int = 2, num_labels: int = 2, seed: int = 0) -> nn.Module:
    """A random ``*ForSequenceClassification`` of ``family`` (the sizes of conftest's tiny checkpoint, 2 heads),
    in eval mode. MPNet's relative-attention bias is drawn with std 1 (not the 0.02 of its init), so that a
    loop without it differs clearly at this size, as it does on the pretrained model."""
    from transformers import (BertConfig, BertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification,
                              MPNetConfig, MPNetForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    common = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0)
    torch.manual_seed(seed)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**common))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**common, type_vocab_size=1))
    elif family == "electra":
        model = ElectraForSequenceClassification(ElectraConfig(**common, embedding_size=16))
    elif family == "mpnet":
        model = MPNetForSequenceClassification(MPNetConfig(**common))
        with torch.no_grad():
            model.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
    else:
        raise ValueError(family)
    if num_labels == 1:
        model.config.problem_type = "regression"
    return model.eval()


def padded_batch(lengths=LENGTHS):
    """Deterministic ids ``(rows, max(lengths))``: [CLS], words, [SEP], then [PAD] (id 0)."""
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        words = [5 + (7 * r + 3 * k) % len(WORDS) for k in range(n - 2)]
        ids[r, :n] = torch.tensor([2, *words, 3])
        mask[r, :n] = 1
    return ids, mask


def with_layers(model: nn.Module, keep) -> nn.Module:
    """A copy of ``model`` with only the layers where ``keep`` is 1: the family's own forward of a path."""
    sub = copy.deepcopy(model)
    base = getattr(sub, sub.base_model_prefix)
    base.encoder.layer = nn.ModuleList([layer for layer, a in zip(base.encoder.layer, keep) if a])
    sub.config.num_hidden_layers = len(base.encoder.layer)
    return sub


def save_tiny(model: nn.Module, path: Path) -> Path:
    """``model`` with conftest's WordPiece tokenizer, as an HF checkpoint directory."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast.from_pretrained(str(path), do_lower_case=True).save_pretrained(path)
    model.save_pretrained(path)
    return path


def layer_without_bias(self, i, hidden, mask, *args, **kwargs):
    """``Backbone.layer`` as it was before MPNet: the HF layer on the state and the mask alone."""
    out = self._layers[i](hidden, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------- A. correct for every family
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_full_mode_equals_the_family_forward_on_a_padded_batch(family):
    hf = tiny_model(family)
    m = DPBert(Backbone(hf)).eval()
    ids, mask = padded_batch()
    ours = m(ids, mask, mode="full").logits
    theirs = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_per_row_skipping_equals_each_row_alone(family):
    """Rows on different paths in one batch (so every layer runs on a gathered subset of rows, with its mask
    and, for MPNet, its bias) give what each row gives alone, unpadded: through DPBERT, and through the
    family's own forward of a model holding only the row's executed layers."""
    hf = tiny_model(family)
    m = DPBert(Backbone(hf)).eval()
    ids, mask = padded_batch()
    paths = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0]])
    batched = m(ids, mask, mode="path", actions=paths, planners=False).logits
    for r, n in enumerate(LENGTHS):
        alone = m(ids[r:r + 1, :n], mask[r:r + 1, :n], mode="path", actions=paths[r], planners=False).logits
        theirs = with_layers(hf, paths[r].tolist())(input_ids=ids[r:r + 1, :n], attention_mask=mask[r:r + 1, :n]).logits
        torch.testing.assert_close(batched[r:r + 1], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[r:r + 1], theirs, atol=1e-5, rtol=0)


def test_a_loop_without_the_position_bias_is_refused_at_load(monkeypatch):
    monkeypatch.setattr(Backbone, "layer", layer_without_bias)
    with pytest.raises(BackboneError, match=r"mpnet.*differ.*tolerance"):
        Backbone(tiny_model("mpnet"))


def test_a_perturbed_layer_is_refused_at_load():
    class Perturbed(Backbone):
        def layer(self, i, hidden, mask, *args, **kwargs):
            out = super().layer(i, hidden, mask, *args, **kwargs)
            return out + 1e-2 if i == 1 else out

    with pytest.raises(BackboneError, match=r"bert.*differ.*tolerance"):
        Perturbed(tiny_model("bert"))


def test_a_checkpoint_whose_own_forward_is_not_finite_is_refused(tmp_path):
    """NaN weights make HF's forward NaN too: nothing to compare against, and nothing to trust, so it is refused."""
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(BackboneError, match="NaN or inf"):
        Backbone(model)
    path = save_tiny(model, tmp_path / "broken")
    with pytest.raises(BackboneError, match="NaN or inf"):
        DPBert.from_backbone(str(path))


def test_the_check_runs_when_a_checkpoint_is_loaded(tmp_path, monkeypatch):
    """DPBert.from_backbone and DPBert.load pass through it: a good MPNet directory loads and runs as its
    family's forward; the same directory with the bias dropped from the loop is refused."""
    path = save_tiny(tiny_model("mpnet"), tmp_path / "mpnet")
    m = DPBert.from_backbone(str(path)).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask, mode="full").logits,
                                   m.backbone.model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    monkeypatch.setattr(Backbone, "layer", layer_without_bias)
    with pytest.raises(BackboneError, match="mpnet"):
        DPBert.from_backbone(str(path))
    with pytest.raises(BackboneError, match="mpnet"):
        DPBert.load(path)


def test_the_check_runs_once_and_leaves_rng_modes_and_grad_as_it_found_them():
    model = tiny_model("mpnet").train()
    model.classifier.eval()  # a submodule in another mode than its parent keeps it
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    modes = {name: mod.training for name, mod in model.named_modules()}
    Backbone(model)
    assert calls == [1], "the load-time check runs the family's own forward once"
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: mod.training for name, mod in model.named_modules()} == modes
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- B. the packaged MPNet-base
def fake_pieces(tmp_path: Path, n: int = 3):
    """A small zip in the layout of the real one (``all-mpnet-base-v2/`` with config, weights, tokenizer),
    split into ``n`` pieces. Returns ``(pieces, sha256 of the weights, the weights' bytes)``."""
    weights = bytes(range(256)) * 40
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", weights)
        zf.writestr("all-mpnet-base-v2/tokenizer.json", "{}")
    data = archive.read_bytes()
    archive.unlink()
    cut = [len(data) * k // n for k in range(n + 1)]
    pieces = []
    for k in range(n):
        piece = tmp_path / "pieces" / f"all-mpnet-base-v2.zip.{k + 1:03d}"
        piece.parent.mkdir(exist_ok=True)
        piece.write_bytes(data[cut[k]:cut[k + 1]])
        pieces.append(piece)
    return pieces, hashlib.sha256(weights).hexdigest(), weights


def test_the_pieces_are_joined_verified_unpacked_once_and_reused(tmp_path):
    from dpbert_rl.model.backbone import mpnet_checkpoint

    pieces, sha, weights = fake_pieces(tmp_path)
    dest = tmp_path / "cache" / "mpnet-base"
    path = mpnet_checkpoint(cache_dir=dest, locate=lambda: pieces, expected_sha256=sha)
    assert path == dest and (dest / "model.safetensors").read_bytes() == weights
    assert (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mpnet-base"], "no temporary directory is left"

    def not_again():
        raise AssertionError("the pieces are read again")

    assert mpnet_checkpoint(cache_dir=dest, locate=not_again, expected_sha256=sha) == dest


def test_pieces_whose_weights_do_not_match_the_hash_are_refused(tmp_path):
    from dpbert_rl.model.backbone import mpnet_checkpoint

    pieces, sha, _ = fake_pieces(tmp_path)
    dest = tmp_path / "cache" / "mpnet-base"
    with pytest.raises(BackboneError, match=f"sha256.*expected {'0' * 64}"):
        mpnet_checkpoint(cache_dir=dest, locate=lambda: pieces, expected_sha256="0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == [], "nothing unverified is left in the cache"
    with pytest.raises(BackboneError, match="zip"):  # pieces out of order do not form the archive
        mpnet_checkpoint(cache_dir=dest, locate=lambda: pieces[::-1], expected_sha256=sha)
    assert list(dest.parent.iterdir()) == []
    # a cache directory verified against another hash is unpacked again, not trusted
    mpnet_checkpoint(cache_dir=dest, locate=lambda: pieces, expected_sha256=sha)
    (dest / "model.safetensors").write_bytes(b"damaged")
    (dest / ".sha256").write_text("1" * 64 + "\n")
    assert (mpnet_checkpoint(cache_dir=dest, locate=lambda: pieces, expected_sha256=sha) / "model.safetensors").stat().st_size > 7


def test_the_cache_directory_follows_dpbert_rl_cache(tmp_path, monkeypatch):
    from dpbert_rl.model.backbone import mpnet_checkpoint

    pieces, sha, _ = fake_pieces(tmp_path)
    monkeypatch.setenv("DPBERT_RL_CACHE", str(tmp_path / "elsewhere"))
    assert mpnet_checkpoint(locate=lambda: pieces, expected_sha256=sha) == tmp_path / "elsewhere" / "mpnet-base"


def test_a_backbone_has_one_spelling(tmp_path, monkeypatch):
    """Aliases and the directories they resolve to, relative and absolute paths, and a trailing slash all name one
    backbone; a hub name stays as it is. Nothing is unpacked on the way."""
    from dpbert_rl.model.backbone import canonical_backbone, resolve_backbone_path

    monkeypatch.setenv("DPBERT_RL_CACHE", str(tmp_path / "cache"))
    assert canonical_backbone("minilm") == "minilm" == canonical_backbone(resolve_backbone_path("minilm"))
    assert canonical_backbone("mpnet-base") == "mpnet-base" and not (tmp_path / "cache").exists()
    (tmp_path / "cache" / "mpnet-base").mkdir(parents=True)
    assert canonical_backbone(str(tmp_path / "cache" / "mpnet-base")) == "mpnet-base"
    (tmp_path / "runs" / "bb").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spellings = {canonical_backbone(x) for x in ("runs/bb", "runs/bb/", "./runs/bb", str(tmp_path / "runs" / "bb"))}
    assert spellings == {str((tmp_path / "runs" / "bb").resolve())}
    assert canonical_backbone("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_without_the_pieces_the_alias_says_how_to_get_them(tmp_path, monkeypatch):
    from dpbert_rl.model import backbone

    monkeypatch.setenv("DPBERT_RL_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(backbone, "MPNET_PIECES", (("no-such-dist-h2-xyz", "no_such_dir_h2/piece.001"),))
    with pytest.raises(BackboneError) as err:
        backbone.resolve_backbone_path("mpnet-base")
    text = str(err.value)
    assert "\n" not in text and 'pip install "dpbert-rl[mpnet]"' in text and "make mpnet" in text


@pytest.mark.mpnet
def test_mpnet_base_passes_the_check_and_runs_as_its_forward():
    """The real 12-layer all-mpnet-base-v2 (``make mpnet``); runs only with DPBERT_RL_TEST_MPNET=1, where the
    pieces must be there (unpacked once into the cache)."""
    if not os.environ.get("DPBERT_RL_TEST_MPNET"):
        pytest.skip("the 12-layer MPNet-base check runs with DPBERT_RL_TEST_MPNET=1 (after `make mpnet`)")
    torch.manual_seed(0)
    m = DPBert.from_backbone("mpnet-base").eval()  # the load-time check passes
    assert m.num_layers == 12 and m.backbone.config.model_type == "mpnet"
    texts = ["A man is playing a guitar in the park.", "The movie was terrible.", "It rains."]
    b = m.tokenizer(texts, padding=True, return_tensors="pt")
    paths = torch.tensor([[1] * 12, [1, 0] * 6, [0, 1, 1] * 4])
    with torch.no_grad():
        ours = m(b["input_ids"], b["attention_mask"], mode="full").logits
        theirs = m.backbone.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        batched = m(b["input_ids"], b["attention_mask"], mode="path", actions=paths, planners=False).logits
        for r, text in enumerate(texts):
            one = m.tokenizer([text], return_tensors="pt")
            alone = m(one["input_ids"], one["attention_mask"], mode="path", actions=paths[r], planners=False).logits
            torch.testing.assert_close(batched[r:r + 1], alone, atol=1e-5, rtol=0)
