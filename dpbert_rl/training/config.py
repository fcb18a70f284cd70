"""What a training stage is told: its configuration, the stages' names, and whether a directory holds the
same run (a stage that was started or finished with other settings is refused, never silently reused)."""

from __future__ import annotations

import json
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from ..checks import check_config_numbers, check_number, read_json
from ..data import get_task
from ..model.backbone import DEFAULT_BACKBONE
from ..model.objectives import BASELINES, RATE_CONTROLS, REWARDS, check_rate
from ..model.planner import FEATURES

STAGES = ("finetune", "planner_init", "rl", "sampled", "soft", "layerdrop", "adapt")
#: the pipeline's stage 3: 'auto' is 'exact' up to MAX_TREE_LAYERS layers and 'sampled' above
STAGE3 = ("auto", "exact", "sampled", "rl")
SKIP_AWARE = ("none", "layerdrop", "adapt")
CALIBRATE = ("auto", "always", "never")  # when the pipeline calibrates the threshold (PipelineConfig)
COST_UNITS = ("layers", "tokens")  # what stage 3 'exact' pays the layer price per (ExactConfig.cost_unit)
PLANNER_START = ("stage2", "fixed-path")  # where the pipeline's stage-3 planners start (PipelineConfig)
MIXED_PRECISION = ("no", "bf16", "fp16")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a mismatched checkpoint)."""


@dataclass
class TrainConfig:
    """Everything one training stage needs. Defaults follow the paper unless marked [choice]."""

    task: str = "rte"
    """GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli or rte."""
    backbone: str = DEFAULT_BACKBONE
    """Starting point: 'minilm' (packaged all-MiniLM-L6-v2), a hub name, an HF checkpoint directory,
    or the model/ directory of an earlier stage."""
    data_dir: Optional[str] = None
    """Local GLUE directory (<dir>/RTE/train.tsv ...); default $GLUE_DIR, else the HF hub."""
    output_dir: str = "runs/dpbert"
    """Where config, metrics, TensorBoard events and checkpoints go."""
    max_seq_length: int = 128
    """Inputs are truncated to this many tokens; batches are padded only to their longest input."""
    max_train_samples: Optional[int] = None
    """Train on a seeded random subset of this size (quick runs, SST-2 on a CPU)."""
    max_eval_samples: Optional[int] = None
    """Score only the first N examples of the selection split and of dev."""
    batch_size: int = 32
    """Per-process training batch size (paper grid: 8, 16, 32)."""
    group_by_length: bool = False
    """[choice] Training batches of inputs of similar length (the HF Trainer's ``group_by_length``: each epoch's
    seeded shuffle cut into mega-batches of 50 batches, each sorted by length), so a batch is padded less. Off
    by default: the MiniLM results were trained without it."""
    eval_batch_size: int = 64
    epochs: float = 5.0
    """Passes over the training data (the paper: 5 per stage)."""
    lr: float = 2e-5
    """AdamW learning rate of backbone and head (paper: 2e-5)."""
    planner_lr: float = 1e-3
    """[choice] AdamW learning rate of the planners. The paper uses one rate of 2e-5; linear planners
    trained from scratch need far more steps at that rate than a CPU budget allows."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps, then linear decay."""
    max_grad_norm: float = 1.0
    seed: int = 42
    cost: float = 1.0
    """c of eq. (9): the reward is -c for every executed layer. With rate_control 'dual' it is only the
    starting price of a layer, which dual ascent then moves."""
    lam: float = 5.0
    """lambda of eq. (9): weight of the outcome term in the reward (paper grid: 5, 20, 35, 50)."""
    reward: str = "correct"
    """[choice] The reward's outcome term: 'loss' (eq. 9, -lambda * task loss) or 'correct' (bounded:
    lambda * 1[correct]; lambda * (1 - tanh|error|) for regression). Under 'loss' the spread of the
    loss between inputs dwarfs the layer costs, and on a fine-tuned backbone skipping everything can
    win (benchmarks/README.md)."""
    rate_control: str = "dual"
    """[choice] How the skip rate is held at target_rate: 'dual' (a price per executed layer set by dual
    ascent, so that the greedy policy at threshold 0.5 hits the rate), 'penalty' (beta (S - r)^2 of
    eq. 11, the paper's) or 'none'."""
    dual_lr: float = 0.05
    """Step size of the dual ascent on the layer price (rate_control 'dual')."""
    planner_features: str = "mean"
    """[choice] What the planners read: 'cls' (the paper's [CLS] row), 'mean' (masked mean of the token
    states) or 'cls+mean'; standardised per layer with statistics of training inputs (benchmarks/README.md)."""
    feature_stats_samples: int = 1000
    """Training inputs used for the features' standardisation statistics (stage 2, or the first planner
    stage)."""
    samples: int = 4
    """[choice] Paths drawn per input in stage 3 (the 'loo' baseline's K); batch_size counts inputs."""
    normalise_advantages: bool = True
    """[choice] Scale stage 3's advantages to zero mean and unit variance per batch."""
    entropy_coef: float = 0.01
    """[choice] Weight of an entropy bonus on the planners in stage 3, decayed linearly to 0."""
    detach_planner_input: bool = True
    """[choice] In stage 3, keep the policy gradient out of the backbone: the planners read the states
    without passing gradients into them (the backbone still trains on the task loss)."""
    online_path_calibration: bool = True
    """[choice] Stage 'sampled' on a regression task: the reward reads each drawn path's output through a
    (scale, shift) fitted by least squares on every output the stage has drawn on that path so far (a pooled pair
    until a path has 20), as the exact stage's reward reads its tree's recalibrated outputs; the selection
    scores and the saved model use the same map (:class:`~dpbert_rl.model.objectives.RunningPathCalibration`).
    Off: the head's raw outputs, on which a path that ranks the inputs well but off the label's scale loses."""
    adapt_at_rate: bool = True
    """[choice] Stage 'adapt' with a target_rate: the paths it trains the backbone on are drawn around the
    planners' greedy path at the knob (threshold, or price) that makes their skip rate on the selection split's
    inputs target_rate (solved once at the start, labels never read; the model is saved with its knob as it came),
    not at their own rate: MPNet's first sampled fit on STS-B skipped 0.61 at threshold 0.5 when 0.35 was
    asked, and a regression head trained on such short paths predicted near the mean (selection 2-4). Off: drawn
    from the planners as they are."""
    beta: float = 200.0
    """[choice] beta of eq. (12): weight of the skip-rate penalty. The paper's grid is 0.1-1.5, but
    with S of eq. (10) a mean over layers and examples, P is tiny (0.2^2 = 0.04): at 0.5 the planners
    stayed open, at 20 the REINFORCE term still pulled S away from r; 200 holds S at r (benchmarks/README.md)."""
    target_rate: Optional[float] = 0.3
    """r of eq. (11): target fraction of layers skipped, in [0, 1]; None drops the penalty."""
    baseline: str = "loo"
    """[choice] REINFORCE baseline b_i of eq. (12): none, batch-mean, self-critical, or loo (leave-one-out
    over the `samples` paths of the same input)."""
    init_penalty: bool = True
    """[choice] Add beta*P to the task loss in stage 2 as well, so that the planners start stage 3
    near the target rate. The paper's stage 2 uses the task loss alone (set False)."""
    planner_init_bias: float = 2.0
    """[choice] Initial planner bias (p = 0.88): gates start nearly open."""
    layerdrop: float = 0.3
    """Stage ``layerdrop`` only: probability that a layer is dropped for a training batch (the same
    layers for the whole batch: structured dropout, Fan et al. 2020)."""
    select_tolerance: float = 0.05
    """Stages with planners keep the best selection-split score among evaluations whose skip rate is at
    least target_rate - select_tolerance (else the last one)."""
    eval_steps: Optional[int] = None
    """Evaluate every N optimizer steps (default: evals_per_epoch times per epoch)."""
    evals_per_epoch: int = 1
    """Selection-split evaluations per epoch when eval_steps is not given."""
    eval_at_start: bool = False
    """Score the starting model on the selection split before the first step, as one of the stage's candidates (step
    0): a stage that only moves away from a good start can then keep it. The pipeline sets it for a stage 3 started
    on the best fixed path (``planner_start`` 'fixed-path'; on MPNet SST-2 the sampled stage's first evaluation
    read 88.25 where its start had read 90.20)."""
    save_steps: int = 50
    """Write the resumable checkpoint every N steps (and at every evaluation)."""
    logging_steps: int = 10
    max_steps: Optional[int] = None
    """Stop after this many steps in all (overrides epochs; for tests and smoke runs)."""
    bad_rows: str = "error"
    """What a malformed data row does: 'error' (stop, naming file and line) or 'skip' (training rows only:
    their line numbers go to stderr and config.json; a bad dev row is always an error)."""
    cpu: bool = False
    """Force the CPU even where a GPU is present."""
    mixed_precision: str = "no"
    """Autocast of training (Accelerate's ``mixed_precision``): 'no', 'bf16' (CPUs with bfloat16 units, GPUs) or
    'fp16' (GPUs). The stage's selection-split evaluations run under it too (the saved weights stay fp32; dev is
    scored on the reloaded model, in fp32). With 'fp16' the gradient scaler is not in the resumable checkpoint:
    a resumed run restarts it. One process keeps one setting (Accelerate's state). Measure before using it on a
    CPU: without AVX-512 BF16 / AMX it is slower (benchmarks/train_step.py)."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> None:
        get_task(self.task)
        check_config_numbers(self)  # learning rates > 0; lambda, c, beta >= 0; step counts whole and >= 1; ...
        if self.target_rate is not None:
            check_rate(self.target_rate)
        if not 0.0 <= self.layerdrop < 1.0:
            raise ValueError(f"layerdrop must be in [0, 1); got {self.layerdrop}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; expected one of {MIXED_PRECISION}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; expected one of {BASELINES}")
        for name, allowed in (("reward", REWARDS), ("rate_control", RATE_CONTROLS), ("planner_features", FEATURES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")
        if self.baseline == "loo" and self.samples < 2:
            raise ValueError(f"baseline 'loo' needs samples >= 2; got {self.samples}")
        if self.samples < 1 or self.feature_stats_samples < 2:
            raise ValueError("samples must be >= 1 and feature_stats_samples >= 2")
        if self.entropy_coef < 0 or self.dual_lr <= 0:
            raise ValueError(f"entropy_coef must be >= 0 and dual_lr > 0; got {self.entropy_coef}, {self.dual_lr}")
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be 'error' or 'skip'; got {self.bad_rows!r}")
        for name in ("batch_size", "eval_batch_size", "save_steps", "logging_steps", "max_seq_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError(f"epochs must be positive; got {self.epochs}")


# ---------------------------------------------------------------------- the pipeline
@dataclass
class PipelineConfig(TrainConfig):
    """Stages 1-3 and the evaluation; ``epochs``/``lr`` are replaced by per-stage values."""

    stage1_epochs: float = 5.0
    """Stage 1, backbone fine-tuning (paper: 5)."""
    stage2_epochs: float = 5.0
    """Stage 2, planner initialisation with soft gates (paper: 5)."""
    stage3: str = "auto"
    """[choice] Stage 3: 'exact' trains the planners on the exact expected reward over all 2^L paths of the
    frozen stage-2 backbone (``dpbert-rl exact``: the same reward, dual price and entropy bonus as 'rl',
    its gradient without sampling noise); 'sampled' trains them on paths drawn from them on the frozen
    backbone (``dpbert-rl sampled``: REINFORCE with leave-one-out baselines and the dual price, an input's
    samples sharing their common prefixes), which scales to 12 layers; 'rl' is the paper's joint REINFORCE
    of backbone, head and planners (eq. 12); 'auto' is 'exact' up to 8 layers (255 layer calls per input)
    and 'sampled' above. On the RTE selection split 'exact' held the target rate (3.9 of 6 layers at
    r = 0.35) while 'rl' ended at 5.3 layers with a lower score (benchmarks/README.md, "How it works, and the choices we made")."""
    stage3_epochs: float = 5.0
    """Stage 3 with 'rl' or 'sampled': REINFORCE epochs (paper: not given; 5)."""
    planner_start: str = "stage2"
    """[choice] Where stage 3 'sampled' starts its planners (with skip_aware 'adapt', those of its first fit, on the
    frozen backbone; the second fit continues the first's): 'stage2', stage 2's (the paper); 'fixed-path', planners
    that take one fixed path on every input (weights 0, biases +-planner_init_bias), the best at the target rate's
    number of layers by backward elimination on ``calibration_samples`` selection inputs, stage 2's backbone frozen
    (``stage2_fixed_path/``). On MPNet-base a fixed path of the adapted backbone scored above the planners trained
    from stage 2 on SST-2 and MRPC dev. Needs --target-rate and stage 3 'sampled'."""
    exact_epochs: float = 20.0
    """Stage 3 with 'exact': passes over the fit split's path tree (a step is array lookups)."""
    exact_lr: float = 1e-2
    """Stage 3 with 'exact': Adam learning rate of the planners."""
    stage3_lr: Optional[float] = None
    """Backbone learning rate in stage 3 (default: lr)."""
    stage3_batch_size: Optional[int] = None
    """Inputs per batch in stage 3 (default: batch_size); each is drawn `samples` times."""
    skip_aware: str = "adapt"
    """[choice] Skip-aware backbone training, ``skip_aware_epochs`` of it: 'adapt', after stage 3 the backbone
    is fine-tuned on the paths its planners draw (``dpbert-rl adapt``) and stage 3 runs again on the new
    backbone (exact: on its new path tree; one alternation; with stage3 'rl', which trains the backbone on the planners' paths
    itself, nothing more is done); 'layerdrop', stage 1 is followed by fine-tuning on random layer
    subsets (``layerdrop`` rate) before stage 2; 'none', the backbone never sees a skip. Chosen on the
    selection split at the same compute (benchmarks/results/skip_aware.md: STS-B and SST-2 at 4 and 3 of 6
    layers, mean selection score adapt 82.83, none 74.81, layerdrop 69.89)."""
    skip_aware_epochs: float = 0.5
    """Epochs of the skip-aware backbone training (``skip_aware``; as measured: benchmarks/results/skip_aware.md)."""
    skip_aware_lr: float = 5e-5
    """Learning rate of the skip-aware backbone training (as measured)."""
    path_calibration: bool = True
    """Stage 3 on a regression task: the per-path recalibration of the head's output. 'exact' fits every path
    on the fit split's tree (``dpbert-rl exact --path-calibration``); 'sampled' walks no tree and fits the paths
    its trained planners take on the fit split (a pair per path taken by at least 20 inputs, one pooled pair for
    the rest), kept only when it raises the selection-split score
    (:func:`~dpbert_rl.training.recalibrate.recalibrate_stage`)."""
    cost_unit: str = "layers"
    """Stage 3 'exact' (and 'auto' where it is exact): what the layer price is paid per. 'layers' (the paper);
    'tokens', a layer executed on an input costs in proportion to its tokens, and the target rate counts
    token-layers, so skipping goes where it saves time (``dpbert-rl exact --cost-unit``)."""
    calibrate_threshold: str = "auto"
    """After stage 3, set the planners' knob (the execute threshold of eq. (5), 0.5 in the paper; the price of
    price-conditioned planners) so that the greedy skip rate on the selection split's inputs (labels never
    read) is target_rate. 'auto': only when the chosen model misses target_rate there by more than
    select_tolerance, either way (the dual price holds the rate at 6 layers; at 12 the planners swing faster
    than it follows, and MPNet-base ran 5.8 or 11.2 layers when 7.8 were asked); 'always' (needed with
    rate_control 'penalty', whose gates stay near p = 1 - r); 'never'. True/False read as 'always'/'never'. A run
    whose rate counts token-layers (cost_unit 'tokens') is not calibrated: the bisection counts layers. With
    skip_aware 'adapt', the alternation is kept only when it beats the first fit on the selection split at the
    asked rate (``alternation.json``)."""
    calibration_samples: int = 1000
    """Selection-split inputs used to calibrate the threshold."""
    rate_on_eval_inputs: bool = False
    """Score dev with the knob set, in memory, so that the model skips target_rate of the layers on dev's own
    inputs, read without their labels (a budget set on the inputs that are served, as ``dpbert-rl calibrate
    --inputs`` does; the report's ``rate_on_inputs``). The saved model keeps the knob set on the selection split,
    and every choice (checkpoints, the alternation) is still made there. Off: the rate is held on the selection
    split's inputs and dev's may run another (SST-2 on MPNet-base: 7.8 layers asked, 8.38 run on dev)."""
    latency_repeats: int = 3
    """Batch-1 latency: passes over the dev set, full and DPBERT interleaved; the median is kept."""
    latency_samples: Optional[int] = None
    """Time only the first N dev examples (default: all)."""
    threads: Optional[int] = None
    """torch threads for the latency measurement (default: as set)."""

    def validate(self) -> None:
        super().validate()
        if self.stage3 not in STAGE3:
            raise ValueError(f"unknown stage3 {self.stage3!r}; expected one of {STAGE3}")
        if self.skip_aware not in SKIP_AWARE:
            raise ValueError(f"unknown skip_aware {self.skip_aware!r}; expected one of {SKIP_AWARE}")
        check_number(self.skip_aware_epochs, "skip_aware_epochs (--skip-aware-epochs)", low=0.0, low_open=True)
        check_number(self.skip_aware_lr, "skip_aware_lr (--skip-aware-lr)", low=0.0, low_open=True)
        if self.planner_start not in PLANNER_START:
            raise ValueError(f"planner_start (--planner-start) must be one of {PLANNER_START}; got {self.planner_start!r}")
        if self.planner_start == "fixed-path" and (self.target_rate is None or self.stage3 not in ("sampled", "auto")):
            raise ValueError("planner_start 'fixed-path' (--planner-start) starts stage 3 'sampled' on the best fixed "
                             f"path at --target-rate: it needs both (got stage3 {self.stage3!r}, target_rate "
                             f"{self.target_rate!r})")
        if self.planner_start == "fixed-path" and not self.planner_init_bias > 0:
            raise ValueError("planner_start 'fixed-path' sets the planners' biases to +-planner_init_bias "
                             f"(--planner-init-bias): it must be above 0; got {self.planner_init_bias!r}")
        if self.cost_unit not in COST_UNITS:
            raise ValueError(f"cost_unit must be one of {COST_UNITS}; got {self.cost_unit!r}")
        if isinstance(self.calibrate_threshold, bool):  # the flag's earlier form
            self.calibrate_threshold = "always" if self.calibrate_threshold else "never"
        if self.calibrate_threshold not in CALIBRATE:
            raise ValueError(f"calibrate_threshold (--calibrate-threshold) must be one of {CALIBRATE}; got "
                             f"{self.calibrate_threshold!r}")
        if self.rate_on_eval_inputs and (self.target_rate is None or self.cost_unit != "layers"):
            raise ValueError("rate_on_eval_inputs (--rate-on-eval-inputs) holds target_rate in layers on dev's "
                             "inputs: it needs --target-rate and --cost-unit layers")
        if self.cost_unit != "layers" and self.stage3 not in ("exact", "auto"):
            raise ValueError(f"cost_unit {self.cost_unit!r} is for stage 3 'exact' (--stage3 {self.stage3} pays per "
                             "layer)")
        if self.stage3 == "exact" and self.rate_control == "penalty":
            raise ValueError("stage3 'exact' holds the rate with rate_control 'dual' (or 'none'), not 'penalty'")
        check_number(self.exact_epochs, "exact_epochs (--exact-epochs)", low=0.0, low_open=True)
        check_number(self.exact_lr, "exact_lr (--exact-lr)", low=0.0, low_open=True)
        if self.stage3 in _IGNORED_BY_STAGE3:
            unread, what = _IGNORED_BY_STAGE3[self.stage3]
            ignored = [f"--{k.replace('_', '-')}" for k in unread if getattr(self, k) != _DEFAULTS[k]]
            if ignored:
                warnings.warn(f"--stage3 {self.stage3} does not read {', '.join(ignored)} ({what}); they are "
                              "ignored", stacklevel=2)


# fields that do not change what a stage computes (bookkeeping), and those a stage does not read
_BOOKKEEPING = {"output_dir", "progress", "eval_steps", "evals_per_epoch", "save_steps", "logging_steps", "cpu",
                "eval_batch_size", "select_tolerance"}


_RL_ONLY = {"cost", "lam", "baseline", "reward", "rate_control", "dual_lr", "samples", "normalise_advantages",
            "entropy_coef", "detach_planner_input"}
_NO_PLANNERS = _RL_ONLY | {"beta", "target_rate", "init_penalty", "planner_lr", "planner_init_bias", "planner_features",
                           "feature_stats_samples"}
_UNUSED = {"finetune": _NO_PLANNERS | {"layerdrop", "online_path_calibration", "adapt_at_rate"},
           "layerdrop": _NO_PLANNERS | {"online_path_calibration", "adapt_at_rate"},
           # adapt reads target_rate for its paths' rate (adapt_at_rate)
           "adapt": (_NO_PLANNERS - {"target_rate"}) | {"layerdrop", "online_path_calibration"},
           "planner_init": _RL_ONLY | {"lr", "layerdrop", "weight_decay", "online_path_calibration", "adapt_at_rate"},
           "soft": (_RL_ONLY - {"detach_planner_input"}) | {"init_penalty", "layerdrop", "online_path_calibration",
                                                           "adapt_at_rate"},
           "rl": {"init_penalty", "layerdrop", "online_path_calibration", "adapt_at_rate"},
           "sampled": {"init_penalty", "layerdrop", "lr", "detach_planner_input", "weight_decay", "adapt_at_rate"}}


# settings added later whose absence from a saved config.json is not their default, judged by the stage: an exact
# run from before the per-path recalibration did not recalibrate, which matters on regression tasks only
# (dpbert_rl.training.exact._check_calibration_setting)
ABSENT_JUDGED_BY_STAGE = {"path_calibration"}
# settings added later whose absence means they were off: a sampled stage from before the online per-path map, an
# adapt stage from before its paths were drawn at the asked rate
ABSENT_MEANS = {"online_path_calibration": False, "adapt_at_rate": False, "eval_at_start": False}

# settings that change nothing on a classification task
REGRESSION_ONLY = {"online_path_calibration"}


def _is_regression(task: str) -> bool:
    from ..data import get_task

    try:
        return get_task(task).is_regression
    except ValueError:  # DataError is one; an unknown task is refused where it is read
        return False


# settings a resumed (unfinished) stage may change: after a NaN stop, re-run with a lower learning rate
RESUME_MAY_CHANGE = {"lr", "planner_lr"}


def check_same_run(stage: str, cfg, init: Optional[str], out_dir: Path, resuming: bool = False,
                   ignore: Optional[set] = None, resolved: frozenset = frozenset()) -> None:
    """Refuse to resume or reuse a stage that was started or finished as another stage or with different
    settings (a resumed one may change its learning rates, :data:`RESUME_MAY_CHANGE`).

    :param cfg: the stage's configuration (a dataclass): :class:`TrainConfig`, or the exact stage's.
    :param ignore: settings that do not change what the stage computes (default: those of
        :class:`TrainConfig` that ``stage`` does not read, and bookkeeping).
    :param resolved: settings whose None means "resolved at run time" (the exact stage's task and length: the
        checkpoint's); left at None they match whatever the saved run resolved.
    """
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = read_json(saved_path)
    if saved.get("stage", stage) != stage:
        raise TrainingError(f"[{stage}] {out_dir} holds a {saved.get('stage')!r} run, not {stage!r}; use another "
                            "--output-dir")
    if ignore is None:
        ignore = _BOOKKEEPING | _UNUSED.get(stage, set())
    ignore = ignore | (RESUME_MAY_CHANGE if resuming else set())
    if getattr(cfg, "task", None) and not _is_regression(cfg.task):
        ignore = ignore | REGRESSION_ONLY
    current = json.loads(json.dumps({"init": init, **asdict(cfg)}))  # as saved: tuples read back as lists
    # a setting added after the run was saved: that run had its default (but those the stage judges itself)
    defaults = json.loads(json.dumps({f.name: ABSENT_MEANS.get(f.name, f.default) for f in fields(cfg)
                                      if f.default is not MISSING and f.name not in ABSENT_JUDGED_BY_STAGE}))
    diff = {k: (saved.get(k, defaults.get(k)), v) for k, v in current.items()
            if k not in ignore and (k in saved or k in defaults) and saved.get(k, defaults.get(k)) != v
            and not (v is None and k in resolved)}
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise TrainingError(f"[{stage}] {out_dir} holds a run with other settings ({detail}); "
                            "use another --output-dir, or delete that directory to start over")


# the pipeline's settings that only the 'rl' stage 3 reads (the exact stage reads reward, cost, lam, dual_lr,
# entropy_coef and target_rate too), and their defaults
_RL_ONLY_PIPELINE = ("stage3_lr", "stage3_batch_size", "stage3_epochs", "baseline", "samples", "normalise_advantages",
                     "detach_planner_input")
_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig)}
# what each stage 3 of the pipeline does not read: (settings, what they are for)
_IGNORED_BY_STAGE3 = {
    "exact": (_RL_ONLY_PIPELINE, "joint REINFORCE settings, for --stage3 rl"),
    "sampled": (("stage3_lr", "detach_planner_input", "exact_epochs", "exact_lr"),
                "the backbone stays frozen and no path tree is walked"),
}


def unread_by_stage3(stage3: str) -> tuple:
    """The :class:`PipelineConfig` settings that stage 3 ``stage3`` (resolved: 'exact', 'sampled' or 'rl') does not
    read; setting one away from its default warns. A caller that fills every setting (a benchmark) leaves these
    out."""
    return tuple(_IGNORED_BY_STAGE3.get(stage3, ((), ""))[0])
