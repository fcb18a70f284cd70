"""Shared fixtures: a tiny random BERT checkpoint, a tiny GLUE directory, the shared GLUE data."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# 2 threads on the reference machine's 2 cores; OMP_NUM_THREADS=1 when the cores are shared (two threads
# contending with other processes make the many tiny ops of these tests 10-30x slower)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))

WORDS = ("the a man woman dog cat is was plays runs sleeps eats good bad happy sad movie film great "
         "terrible not very and or in on park house food music loud quiet").split()
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` loaded as a fresh module ``bench_<name>`` (a name of its own: ``agents.py`` shares
    its name with the ``agents`` package), so that a test can monkeypatch it and call its ``main``."""
    # the package first: a script run below puts benchmarks/ first on the path, where `import agents` (by it or by
    # a module it imports) would otherwise find benchmarks/agents.py, and a later test would see no package
    if not hasattr(sys.modules.get("agents"), "__path__"):  # not yet the package: import it past benchmarks/
        saved = list(sys.path)
        sys.modules.pop("agents", None)
        sys.path[:] = [p for p in saved if Path(p or ".").resolve() != BENCHMARKS]
        try:
            importlib.import_module("agents")
        finally:
            sys.path[:] = saved
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:  # a script puts benchmarks/ first on the path, where its agents.py would hide the agents package:
        sys.path[:] = path + [str(BENCHMARKS)] * (str(BENCHMARKS) not in path)  # last, for its later imports
    return module


def nan_loss_at(real, call: int):
    """A stand-in for a stage's ``_stage_loss`` that returns ``real``'s, made NaN at the ``call``-th call: a
    training run that crashes there, after the checkpoints before it."""
    calls = {"n": 0}

    def loss_fn(*args, **kwargs):
        loss, out, logs = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == call else loss), out, logs

    return loss_fn


def shared_glue_dir() -> Path:
    return Path(os.environ.get("GLUE_DIR", SHARED_GLUE))


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


def make_tiny_checkpoint(path: Path, num_labels: int = 2, family: str = "bert", layers: int = 4) -> Path:
    """A randomly initialised small encoder with a real WordPiece tokenizer, saved as an HF dir."""
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, ElectraConfig,
                              ElectraForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained reads vocab.txt on transformers 4.x and 5.x alike; on 5.x the constructor's
    # `vocab_file=` is ignored and gives a 5-token vocabulary in which every word is [UNK]
    tok = BertTokenizerFast.from_pretrained(str(path), do_lower_case=True)
    assert len(tok) == len(vocab), f"tiny tokenizer has {len(tok)} tokens, expected {len(vocab)}"
    common = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=128, num_labels=num_labels,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)
    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**common))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**common, type_vocab_size=1))
    elif family == "electra":
        model = ElectraForSequenceClassification(ElectraConfig(**common, embedding_size=16))
    else:
        raise ValueError(family)
    if num_labels == 1:
        model.config.problem_type = "regression"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_glue(root: Path, n_train: int = 48, n_dev: int = 24) -> Path:
    """RTE, SST-2, STS-B, MRPC (with BOM) and CoLA (no header) files in the GLUE layout."""
    rng = random.Random(0)
    for task in ("RTE", "SST-2", "STS-B", "MRPC", "CoLA"):
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("dev", n_dev)):
            lines = []
            for i in range(n):
                a, b = _sentence(rng), _sentence(rng)
                if task == "RTE":
                    lines.append(f"{i}\t{a}\t{b}\t{rng.choice(['entailment', 'not_entailment'])}")
                elif task == "SST-2":
                    lines.append(f"{a} \t{rng.randint(0, 1)}")
                elif task == "STS-B":
                    lines.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{rng.uniform(0, 5):.3f}")
                elif task == "MRPC":
                    lines.append(f"{rng.randint(0, 1)}\t{i}\t{i + 1000}\t{a}\t{b}")
                else:
                    lines.append(f"gj04\t{rng.randint(0, 1)}\t\t{a}")
            header = {
                "RTE": "index\tsentence1\tsentence2\tlabel",
                "SST-2": "sentence\tlabel",
                "STS-B": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                "MRPC": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                "CoLA": None,
            }[task]
            text = "\n".join(([header] if header else []) + lines) + "\n"
            (root / task / f"{split}.tsv").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_ckpt, tmp_path_factory) -> str:
    """A dpbert_rl checkpoint (planners included) of the tiny random BERT."""
    from dpbert_rl.model import DPBert

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_dpbert")
    DPBert.from_backbone(str(tiny_ckpt)).save(path)
    return str(path)


def gated_sst2_model(model_dir):
    """The tiny DPBERT of ``model_dir`` as an SST-2 model whose planners ignore the input: gates p = 0.95, 0.73,
    0.27, 0.05 on every input, so 1 layer runs at its threshold 0.9 and 2 at 0.5."""
    from dpbert_rl.model import DPBert
    from dpbert_rl.model.dpbert import TaskInfo

    model = DPBert.load(model_dir).eval()
    with torch.no_grad():
        model.planners.weight.zero_()
        model.planners.bias.copy_(torch.tensor([3.0, 1.0, -1.0, -3.0]))
    model.threshold = 0.9
    model.task_info = TaskInfo("sst2", ["negative", "positive"], 128)
    return model


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory) -> Path:
    return make_tiny_glue(tmp_path_factory.mktemp("glue"))


def require_glue_dir() -> Path:
    """The real GLUE files. Where ``$GLUE_DIR`` is set (``make test`` and CI set it) but the files are absent,
    the integration test fails: a CI run must not pass with every integration test skipped. Without
    ``$GLUE_DIR`` and without the shared copy it skips, with the reason (``pytest -rs`` lists it)."""
    d = shared_glue_dir()
    if not (d / "RTE" / "dev.tsv").is_file():
        if os.environ.get("GLUE_DIR"):
            pytest.fail(f"GLUE_DIR is set to {d}, but {d / 'RTE' / 'dev.tsv'} does not exist: the integration tests "
                        "need the GLUE files there (unset GLUE_DIR to skip them)", pytrace=False)
        pytest.skip(f"shared GLUE data not found at {d} (set GLUE_DIR)")
    return d


@pytest.fixture()
def glue_dir() -> Path:
    return require_glue_dir()


def run_readme_example(marker: str, glue_dir: Path, monkeypatch) -> dict:
    """Execute, verbatim, the README's python block that contains ``marker``, from the repository root;
    returns its namespace. Only the GLUE path is swapped when the data lie elsewhere."""
    import re

    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    example = next(b for b in blocks if marker in b)
    if Path(glue_dir).resolve() != (root / "../shared/data/glue").resolve():
        example = example.replace("../shared/data/glue", str(glue_dir))
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    return scope
