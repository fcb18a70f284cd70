"""The path executor: equations (4)-(7), real skipping, batch == batch-1, checkpoints."""

import math

import pytest
import torch

from dpbert_rl.model.backbone import Backbone
from dpbert_rl.model import DPBert
from tests.conftest import make_tiny_checkpoint

SENTENCES = ["the man plays in the park", "a dog", "the very good movie is not terrible and the music is loud",
             "cat sleeps", "a woman eats food in the house", "the film was great"]


def load(path, seed=0, planner_std=1.0):
    torch.manual_seed(seed)
    backbone, tok = Backbone.from_pretrained(str(path), num_labels=2)
    model = DPBert(backbone, tokenizer=tok).eval()
    with torch.no_grad():  # planners that disagree between examples, so paths differ
        model.planners.weight.normal_(0, planner_std)
        model.planners.bias.zero_()
    return model


def split_planners(m, b):
    """Set each planner's bias so that its decision splits the batch (layer 1's input, the [CLS]
    embedding, is the same for every example, so planner 1 opens the gate for all)."""
    with torch.no_grad():
        m.planners.bias[0] = 5.0
        for i in range(1, m.num_layers):
            out = m(b["input_ids"], b["attention_mask"], mode="hard")
            logit = torch.logit(out.probs[:, i].double()).float()
            m.planners.bias[i] -= logit.median() + 1e-3


def batch(tok, texts):
    return tok(texts, padding=True, return_tensors="pt")


@torch.no_grad()
def hand_path(m, text, actions=None, threshold=0.5):
    """Eq. (4)-(6) by hand for one input, without DPBert's loop: p_i = sigmoid(w_i . h_cls + b_i) from the
    planner weights, layer i run (on the HF layer) iff p_i >= threshold, or as ``actions`` says.
    Returns (probs (L,), actions (L,), logits)."""
    enc = m.tokenizer([text], return_tensors="pt")
    emb = m.backbone.embed(enc["input_ids"], enc["attention_mask"])
    h, probs, taken = emb.hidden, [], []
    for i in range(m.num_layers):
        p = torch.sigmoid(h[0, 0] @ m.planners.weight[i] + m.planners.bias[i])
        a = bool(p >= threshold) if actions is None else bool(actions[i])
        if a:
            h = m.backbone.layer(i, h, emb.mask)
        probs.append(float(p))
        taken.append(float(a))
    return torch.tensor(probs), torch.tensor(taken), m.backbone.head(h)[0]


class LayerSpy:
    """Counts calls and rows that reach each transformer layer."""

    def __init__(self, model):
        self.rows = {i: [] for i in range(model.num_layers)}
        self.handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(model.backbone._layers)]

    def _hook(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.rows[i].append(h.shape[0])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_full_mode_equals_the_hf_forward(tiny_ckpt):
    m = load(tiny_ckpt)
    b = batch(m.tokenizer, SENTENCES)
    with torch.no_grad():
        ref = m.backbone.model(**b).logits
        out = m(b["input_ids"], b["attention_mask"], b["token_type_ids"], mode="full")
    assert torch.allclose(ref, out.logits, atol=1e-5)
    assert out.layers_executed.tolist() == [m.num_layers] * len(SENTENCES)


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_other_families_sit_behind_the_same_calls(tmp_path, family):
    path = make_tiny_checkpoint(tmp_path / family, family=family)
    m = load(path)
    b = batch(m.tokenizer, SENTENCES[:3])
    b.pop("token_type_ids", None)
    with torch.no_grad():
        ref = m.backbone.model(**b).logits
        out = m(b["input_ids"], b["attention_mask"], mode="full")
    assert torch.allclose(ref, out.logits, atol=1e-5)


def test_a_skipped_layer_is_never_computed_and_gets_only_executing_rows(tiny_ckpt):
    m = load(tiny_ckpt)
    b = batch(m.tokenizer, SENTENCES[:4])
    actions = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    spy = LayerSpy(m)
    try:
        with torch.no_grad():
            out = m(b["input_ids"], b["attention_mask"], mode="path", actions=actions)
    finally:
        spy.remove()
    # layer 0: 3 rows, layer 1: never called, layer 2: 3 rows, layer 3: 1 row
    assert spy.rows == {0: [3], 1: [], 2: [3], 3: [1]}
    assert out.actions.tolist() == actions.float().tolist()
    assert out.layers_executed.tolist() == [2, 1, 2, 2]


def test_a_fixed_path_can_run_without_its_planners(tiny_ckpt, monkeypatch):
    """planners=False (what the benchmarks time for fixed paths): the same prediction and layers, and
    the planners are never called; their outputs are NaN rather than made up."""
    m = load(tiny_ckpt)
    b = batch(m.tokenizer, SENTENCES[:4])
    actions = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        ref = m(b["input_ids"], b["attention_mask"], mode="path", actions=actions)
        calls = []
        plan = m.plan
        monkeypatch.setattr(m, "plan", lambda *a, **k: calls.append(1) or plan(*a, **k))
        out = m(b["input_ids"], b["attention_mask"], mode="path", actions=actions, planners=False)
    assert calls == []
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert out.actions.tolist() == ref.actions.tolist() and out.layers_executed.tolist() == [2, 1, 2, 4]
    assert torch.isnan(out.probs).all() and torch.isnan(out.log_probs).all()
    with pytest.raises(ValueError, match="mode='path' only"):
        m(b["input_ids"], b["attention_mask"], mode="hard", planners=False)


def test_skipping_every_layer_leaves_the_embedding(tiny_ckpt):
    m = load(tiny_ckpt)
    b = batch(m.tokenizer, SENTENCES[:2])
    with torch.no_grad():
        out = m(b["input_ids"], b["attention_mask"], mode="path", actions=torch.zeros(m.num_layers))
        h0 = m.embed(b["input_ids"], b["attention_mask"]).hidden
    assert torch.allclose(out.logits, m.classify(h0))


def test_hard_mode_is_eq5_and_batched_equals_batch_of_one(tiny_ckpt):
    m = load(tiny_ckpt, planner_std=2.0)
    b = batch(m.tokenizer, SENTENCES)
    split_planners(m, b)
    with torch.no_grad():
        out = m(b["input_ids"], b["attention_mask"], mode="hard")
        paths = {tuple(r) for r in out.actions.tolist()}
        assert len(paths) > 1, "the test needs examples on different paths"
        for j, text in enumerate(SENTENCES):
            probs, actions, logits = hand_path(m, text)
            assert torch.equal(out.actions[j], actions), j  # eq. (5), decided along the input's own path
            assert torch.allclose(out.probs[j], probs, atol=1e-5) and torch.allclose(out.logits[j], logits, atol=1e-5)
            one = batch(m.tokenizer, [text])
            single = m(one["input_ids"], one["attention_mask"], mode="hard")
            assert torch.allclose(single.logits[0], out.logits[j], atol=1e-5)
            assert torch.equal(single.actions[0], out.actions[j])


def test_hard_mode_executes_at_exactly_the_threshold(tiny_ckpt):
    """Eq. (5) is p >= threshold: a planner at p = 0.5 executes at threshold 0.5 and not above it."""
    m = load(tiny_ckpt, planner_std=0.0)  # zero weights, zero biases: p = 0.5 for every input and layer
    b = batch(m.tokenizer, SENTENCES[:2])
    with torch.no_grad():
        assert m(b["input_ids"], b["attention_mask"], threshold=0.5).actions.tolist() == [[1.0] * 4] * 2
        assert m(b["input_ids"], b["attention_mask"], threshold=0.5001).actions.tolist() == [[0.0] * 4] * 2


def test_threshold_trades_layers_for_speed(tiny_ckpt):
    m = load(tiny_ckpt, planner_std=2.0)
    b = batch(m.tokenizer, SENTENCES)
    with torch.no_grad():
        counts = [m(b["input_ids"], b["attention_mask"], threshold=t).layers_executed.sum().item()
                  for t in (0.0, 0.3, 0.5, 0.7, 1.0)]
    assert counts[0] == m.num_layers * len(SENTENCES) and counts[-1] == 0
    assert counts == sorted(counts, reverse=True)


def test_probs_and_log_probs_follow_eq4_and_eq7(tiny_ckpt):
    m = load(tiny_ckpt)
    b = batch(m.tokenizer, SENTENCES[:3])
    path = [1, 0, 1, 1]
    with torch.no_grad():
        out = m(b["input_ids"], b["attention_mask"], mode="path", actions=torch.tensor([path] * 3))
    for j, text in enumerate(SENTENCES[:3]):
        probs, _, _ = hand_path(m, text, actions=path)  # p_i of eq. (4) along the given path, by hand
        assert torch.allclose(out.probs[j], probs, atol=1e-5)
        expected = torch.tensor([math.log(p) if a else math.log(1 - p) for p, a in zip(probs.tolist(), path)])
        assert torch.allclose(out.log_probs[j], expected, atol=1e-5)  # eq. (7): log p^a (1 - p)^(1 - a)


def test_sample_mode_draws_from_the_planners(tiny_ckpt):
    m = load(tiny_ckpt, planner_std=0.0)
    with torch.no_grad():
        m.planners.bias.copy_(torch.tensor([10.0, -10.0, 0.0, 0.0]))
    b = batch(m.tokenizer, SENTENCES * 20)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = m(b["input_ids"], b["attention_mask"], mode="sample", generator=g)
    rate = out.actions.mean(0)
    assert rate[0] == 1.0 and rate[1] == 0.0 and 0.35 < rate[2] < 0.65


def test_soft_gate_with_open_gates_is_the_full_model_and_gradients_reach_planners(tiny_ckpt):
    m = load(tiny_ckpt, planner_std=0.0)
    b = batch(m.tokenizer, SENTENCES[:3])
    with torch.no_grad():
        m.planners.bias.fill_(50.0)
        full = m(b["input_ids"], b["attention_mask"], mode="full").logits
        soft = m(b["input_ids"], b["attention_mask"], mode="soft").logits
    assert torch.allclose(full, soft, atol=1e-5)
    with torch.no_grad():
        m.planners.bias.fill_(0.0)
    out = m(b["input_ids"], b["attention_mask"], labels=torch.tensor([0, 1, 0]), mode="soft")
    out.loss.backward()
    assert m.planners.weight.grad.abs().sum() > 0


def test_gradients_flow_through_gathered_rows(tiny_ckpt):
    m = load(tiny_ckpt)
    m.train()
    b = batch(m.tokenizer, SENTENCES[:4])
    out = m(b["input_ids"], b["attention_mask"], labels=torch.tensor([0, 1, 1, 0]), mode="path",
            actions=torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]))
    out.loss.backward()
    for i in range(m.num_layers):
        grads = [p.grad for p in m.backbone._layers[i].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"layer {i} got no gradient"


def test_regression_uses_mse(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "reg", num_labels=1)
    backbone, tok = Backbone.from_pretrained(str(path), num_labels=1)
    m = DPBert(backbone, tokenizer=tok).eval()
    b = batch(tok, SENTENCES[:2])
    y = torch.tensor([1.5, 4.0])
    out = m(b["input_ids"], b["attention_mask"], labels=y, mode="full")
    assert out.logits.shape == (2, 1)
    assert torch.allclose(out.per_example_loss, (out.logits.squeeze(-1) - y) ** 2)


def test_bad_mode_and_bad_path_shape_are_refused(tiny_ckpt):
    m = load(tiny_ckpt)
    b = batch(m.tokenizer, SENTENCES[:2])
    with pytest.raises(ValueError, match="unknown mode"):
        m(b["input_ids"], b["attention_mask"], mode="greedy-ish")
    with pytest.raises(ValueError, match="shape"):
        m(b["input_ids"], b["attention_mask"], mode="path", actions=torch.ones(3, 4))
    with pytest.raises(ValueError, match="needs `actions`"):
        m(b["input_ids"], b["attention_mask"], mode="path")


def test_checkpoint_round_trip(tiny_ckpt, tmp_path):
    m = load(tiny_ckpt, planner_std=2.0)
    split_planners(m, batch(m.tokenizer, SENTENCES))
    m.threshold = 0.6
    m.save(tmp_path / "ck")
    back = DPBert.load(tmp_path / "ck", require_planners=True).eval()
    assert back.threshold == 0.6
    for (k, v), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    b = batch(m.tokenizer, SENTENCES)
    with torch.no_grad():
        a = m(b["input_ids"], b["attention_mask"])
        c = back(b["input_ids"], b["attention_mask"])
    assert torch.equal(a.actions, c.actions) and torch.allclose(a.logits, c.logits)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        DPBert.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a trained DPBERT"):
        make_tiny_checkpoint(tmp_path / "plain")
        DPBert.load(tmp_path / "plain", require_planners=True)


@pytest.mark.parametrize("features", ["cls", "mean", "cls+mean"])
@pytest.mark.parametrize("budget", [None, (-0.1, 0.1)])
def test_the_lean_inference_path_decides_as_the_planners_do(tiny_ckpt, features, budget, monkeypatch):
    """Under no_grad, hard mode reads the planners through Planners.decider, and at batch size 1 decides with
    Python bools and calls only the executed layers: the same paths, logits and planner outputs as the
    reference loop (with gradients on), and no layer computed for a skipped one."""
    from dpbert_rl.model.backbone import Backbone
    from dpbert_rl.model.planner import Planners

    torch.manual_seed(1)
    model = DPBert.from_backbone(str(tiny_ckpt)).eval()
    p = Planners(model.num_layers, model.backbone.hidden_size, 0.0, features=features, budget=budget)
    torch.nn.init.normal_(p.weight, std=2.0)
    if budget:
        torch.nn.init.normal_(p.budget_weight, std=1.0)
        p.set_price(0.05)
    p.set_feature_stats(torch.randn_like(p.feature_mean) * 0.1, torch.rand_like(p.feature_std) + 0.5)
    model.planners = p
    texts = ["the film was a good one", "bad", "a b c d e f g h i", "not at all what i wanted", "fine"]
    rows = []
    real = Backbone.layer

    def spy(self, i, hidden, *args, **kw):
        rows.append(hidden.shape[0])
        return real(self, i, hidden, *args, **kw)

    monkeypatch.setattr(Backbone, "layer", spy)
    seen = []
    for thr in (0.5, 0.3, 0.9):
        enc = model.tokenizer(texts, padding=True, return_tensors="pt")
        ref = model(**enc, mode="hard", threshold=thr)  # gradients on: the reference loop
        with torch.no_grad():
            lean = model(**enc, mode="hard", threshold=thr)
            model.lean_inference = False
            assert torch.equal(model(**enc, mode="hard", threshold=thr).actions, ref.actions)  # switched off
            model.lean_inference = True
        assert torch.equal(lean.actions, ref.actions)
        seen += ref.actions.flatten().tolist()
        assert torch.allclose(lean.logits, ref.logits, atol=1e-5) and torch.allclose(lean.probs, ref.probs, atol=1e-5)
        for k, t in enumerate(texts):
            one = model.tokenizer([t], return_tensors="pt")
            single_ref = model(**one, mode="hard", threshold=thr)
            rows.clear()
            with torch.no_grad():
                single = model(**one, mode="hard", threshold=thr)
            assert torch.equal(single.actions, single_ref.actions)
            assert len(rows) == int(single.actions.sum())  # a skipped layer is not computed
            assert torch.allclose(single.logits, single_ref.logits, atol=1e-5)
            assert torch.allclose(single.log_probs, single_ref.log_probs, atol=1e-5)
            path = model(**one, mode="path", actions=single.actions[0], planners=False)
            assert torch.allclose(path.logits, single.logits, atol=1e-5)
    assert 0 < sum(seen) < len(seen)  # both decisions occur
