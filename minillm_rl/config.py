"""One typed, validated run configuration: a YAML recipe plus ``key.sub=value`` overrides.

Defaults are the reference values of algorithm.md (OPT-13B -> 1.3B scripts): a recipe only
states what differs. Loading is generic: every section is a dataclass, and :func:`_convert`
walks its fields and type hints, so adding a field means adding one line here. Ranges are
declared next to the field (``field(metadata=...)`` through :func:`_bounded`); checks that
involve several fields live in :func:`_check_consistency`.

Every problem becomes one :class:`ConfigError` line naming where it came from (``file:line`` or
the override text), the dotted field, and what was expected, e.g.
``recipe.yaml:7: sampling.alpha: must be in [0, 1], got 1.5``.

Longer than ~400 lines because it is the one config: every section's fields with their ranges
and docs, and the cross-field checks, read together (splitting it would scatter the contract).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Phase = Literal["sft", "kd", "seqkd", "minillm"]
PHASES: tuple[str, ...] = typing.get_args(Phase)
PHASES_USING_TEACHER = ("kd", "seqkd", "minillm")


class ConfigError(ValueError):
    """An invalid recipe, override or value; the message is one line meant for the user."""


def _bounded(default: Any, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field whose value must lie in ``[low, high]`` (``(`` / ``)`` when open)."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open)})


def _list_field(*items: Any) -> Any:
    return field(default_factory=lambda: list(items))


@dataclass
class ModelConfig:
    """Which models to load. ``teacher``/``student``: a local HF directory, a hub name already in
    the local cache, or a directory holding ``*_gguf_file`` (dequantised at load)."""

    teacher: str = ""
    student: str = ""
    teacher_gguf_file: str | None = None
    student_gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = True


@dataclass
class DataConfig:
    """Instruction data (algorithm.md §7). ``train``: a ``.jsonl``/``.json`` file, a saved or hub
    ``datasets`` name, or ``"sharegpt"``; the format is recognised from that form.
    ``pretrain_corpus``: plain-text files (or directories of ``*.txt``) for the minillm phase's
    PT term (algorithm.md §4.4), one document per file, cut into blocks of ``max_length`` tokens
    as the reference; empty = no PT term, unless ``train`` is a prepared dataset with PT blocks."""

    train: str = ""
    split: str = "train"
    num_validation: int = _bounded(1000, low=1)
    template: Literal["minillm", "chat"] = "minillm"
    max_prompt_tokens: int = _bounded(256, low=1)
    max_length: int = _bounded(512, low=2)
    skip_bad_records: bool = False
    pretrain_corpus: list[str] = _list_field()
    split_seed: int = 0
    # Read at most this many records of data.train (0 = all), e.g. to keep the rest of a corpus
    # for something that must not overlap it.
    max_examples: int = _bounded(0, low=0)


@dataclass
class SamplingConfig:
    """Teacher-mixed sampling (algorithm.md §3.2) and the teacher signal shipped for the
    single-step term, the PT term's soft CE and the KD baseline: ``exact`` = the full-vocabulary
    log-probs ``[B, T, V]``; ``hidden`` = the teacher's final hidden states ``[B, T, d]``, from
    which the learners recompute the same distribution with the frozen LM head (exact, ``V / d``
    times fewer bytes, one ``V x d`` fp32 head per learner); ``auto`` (default) = ``hidden`` unless
    the teacher's config declares logits transformed after its head (soft-capping, scaling), then
    ``exact``; ``topk`` = ``teacher_topk`` largest + tail (approximate). ``teacher_dist_dtype``:
    the shipped log-probs' or hidden states' dtype."""

    alpha: float = _bounded(0.2, low=0.0, high=1.0)
    temperature: float = _bounded(1.0, low=0.0, low_open=True)
    top_k: int = _bounded(0, low=0)
    top_p: float = _bounded(1.0, low=0.0, high=1.0, low_open=True)
    max_new_tokens: int = _bounded(256, low=1)
    teacher_dist: Literal["auto", "hidden", "exact", "topk", "none"] = "auto"
    teacher_topk: int = _bounded(64, low=1)
    teacher_dist_dtype: Literal["float32", "bfloat16"] = "float32"
    # false: responses always run to max_new_tokens (benchmarks against fixed-length systems).
    stop_at_eos: bool = True


@dataclass
class AdvantageConfig:
    """Reward and advantage (algorithm.md §3.5-§3.6); same fields as
    ``minillm_rl.algorithm.advantages.AdvantageConfig`` so ``AdvantageConfig(**asdict(section))`` works."""

    gamma: float = _bounded(0.95, low=0.0, high=1.0)
    length_normalize: bool = True
    include_current_reward: bool = True
    baseline: Literal["whiten", "constant", "none"] = "whiten"
    constant_baseline: float = -1.0
    reward_scaling: float = _bounded(0.5, low=0.0, low_open=True)
    reward_clip: float = _bounded(100.0, low=0.0, low_open=True)


@dataclass
class LossConfig:
    """The micro-batch loss (algorithm.md §4). ``single_step_weighted``: the paper's variant
    (weight the single-step term by ``w_t``); the reference does not."""

    clip_eps: float = _bounded(0.2, low=0.0, low_open=True)
    single_step: bool = True
    single_step_weighted: bool = False
    lm_coef: float = _bounded(1.0, low=0.0)
    kd_ratio: float = _bounded(0.5, low=0.0, high=1.0)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule. Defaults: the MiniLLM phase (algorithm.md §4.5)."""

    lr: float = _bounded(5e-6, low=0.0, low_open=True)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = _bounded(1e-8, low=0.0, low_open=True)
    weight_decay: float = _bounded(1e-6, low=0.0)
    warmup_steps: int = _bounded(100, low=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = _bounded(1.0, low=0.0)


def _sft_optim() -> OptimConfig:
    return OptimConfig(lr=5e-5, warmup_steps=0, lr_schedule="cosine")


@dataclass
class SFTConfig:
    """Supervised phases: ``sft``, and the ``kd``/``seqkd`` baselines (algorithm.md §2, §5)."""

    num_epochs: int = _bounded(10, low=1)
    batch_size: int = _bounded(32, low=1)
    micro_batch_size: int = _bounded(8, low=1)
    optim: OptimConfig = field(default_factory=_sft_optim)
    # Validate (and checkpoint) every this many steps of a supervised phase; 0 = train.eval_interval.
    # Supervised phases often take many more, cheaper steps than MiniLLM rounds.
    eval_interval: int = _bounded(0, low=0)


@dataclass
class TrainConfig:
    """Which phases run and how long the MiniLLM phase is (algorithm.md §3.1, §3.7, §4.5, §6).
    ``num_rollouts`` and ``micro_batch_size`` count over all learner ranks together."""

    phases: list[Phase] = _list_field("sft", "minillm")
    num_rollouts: int = _bounded(256, low=1)
    ppo_epochs: int = _bounded(4, low=1)
    micro_batch_size: int = _bounded(16, low=1)
    total_steps: int = _bounded(5000, low=1)
    max_prompt_epochs: int = _bounded(10, low=1)
    eval_interval: int = _bounded(100, low=1)
    seed: int = 42
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class EvalConfig:
    """Test-time protocol (algorithm.md §6) and the run's own test stage.

    ``validation``: how validation texts are sampled for checkpoint selection: ``sampling`` = the
    training sampling settings, one seed (the reference's); ``test`` = this section's test protocol
    (``no_repeat_ngram_size``), one seed, so selection scores what the test measures.

    The test stage (rank 0, after the last phase) runs when ``num_test > 0`` or ``test_data`` is
    set: ``best/``, and the models in ``compare`` (``teacher``; ``sft`` = the lowest-validation-loss
    SFT weights that MiniLLM started from), are evaluated on the test prompts under the test
    protocol (``test_seeds`` seeds), with the distillation metrics against the teacher; results,
    ``side_by_side`` answers next to each other, a report and curves go to the run directory.
    Test prompts: ``test_data`` (a source, ``test_split``), or ``num_test`` prompts held out of
    ``data.train`` (seeded hash split, before the validation split; never trained or validated on).
    """

    test_seeds: int = _bounded(5, low=1)
    no_repeat_ngram_size: int = _bounded(6, low=0)
    max_new_tokens: int = _bounded(256, low=1)
    validation: Literal["sampling", "test"] = "sampling"
    num_test: int = _bounded(0, low=0)
    test_data: str = ""
    test_split: str = "test"
    compare: list[Literal["teacher", "sft"]] = _list_field("teacher", "sft")
    side_by_side: int = _bounded(5, low=0)


@dataclass
class RuntimeConfig:
    """Processes, replay bounds and time limits. ``ray_address``: ``local`` starts a Ray instance
    in this process, ``auto`` joins the running cluster, anything else is a ``host:port`` or
    ``ray://`` address. ``max_staleness`` 0 = strictly on-policy."""

    num_rollout_workers: int = _bounded(1, low=1)
    max_staleness: int = _bounded(0, low=0)
    ray_address: str = "local"
    deepspeed_config: str | None = None
    replay_max_samples: int = _bounded(1024, low=1)
    replay_max_bytes: int = _bounded(16 * 2**30, low=1)
    worker_threads: int = _bounded(2, low=1)
    # GPUs each rollout worker actor asks Ray for (teacher + student copy on them); 0 = CPU actors.
    # A fraction (0 < x < 1) lets Ray pack several actors on one GPU (e.g. 0.5: two workers, or a
    # worker beside a learner rank on a single-GPU machine); above 1 only whole GPUs, as Ray places.
    worker_gpus: float = _bounded(0.0, low=0.0)
    # Validation generation on the rollout workers (split over them) when the run has workers
    # (phases kd, seqkd, minillm); false, or an SFT-only run: split over the learner ranks.
    eval_on_workers: bool = True
    rpc_timeout_s: float = _bounded(600.0, low=0.0, low_open=True)
    collective_timeout_s: float = _bounded(1800.0, low=0.0, low_open=True)
    weight_sync_timeout_s: float = _bounded(600.0, low=0.0, low_open=True)
    # Learner processes `minillm-rl train` starts itself (under `deepspeed --num_gpus N`) when no
    # launcher started it; under a launcher the launcher's world size applies.
    num_learners: int = _bounded(1, low=1)
    # Simulate preemption: checkpoint and exit with code 3 once this many optimizer steps (all
    # phases together) are done, at the first step (SFT) or round (MiniLLM) boundary. 0 = off.
    stop_after_steps: int = _bounded(0, low=0)
    # Optimizer steps with a non-finite loss or gradient are skipped (weights, optimizer state and
    # LR schedule untouched); this many in a row stop the run (exit 1) with the last checkpoint kept.
    max_nonfinite_streak: int = _bounded(5, low=1)


@dataclass
class OutputConfig:
    """Where the run writes. ``resume``: ``none``, ``auto`` (latest good checkpoint in ``dir``), or
    a checkpoint path."""

    dir: str = "runs/minillm"
    resume: str = "none"
    keep_checkpoints: int = _bounded(2, low=1)
    # Where metrics go besides metrics.jsonl: TensorBoard (tensorboard/ in the run directory) and/or
    # Weights & Biases (its own settings: WANDB_PROJECT, WANDB_MODE=offline without a network, ...).
    report_to: list[Literal["tensorboard", "wandb"]] = _list_field("tensorboard")
    # Seconds between progress lines of a phase (whole lines, readable in log files).
    progress_interval_s: float = _bounded(30.0, low=0.0)


@dataclass
class RunConfig:
    """The whole run. Build with :func:`load_config`; ``RunConfig()`` gives the defaults unvalidated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists (tuples become lists), as written to the run's config.yaml."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
        """Convert and validate a nested dict (e.g. a parsed config.yaml)."""
        return _build(raw, _Where(source))

    def check_world_size(self, world_size: int) -> None:
        """Refuse a learner count the round cannot be split over evenly."""
        per_round = world_size * self.train.micro_batch_size
        if world_size < 1 or self.train.num_rollouts % per_round:
            raise ConfigError(
                f"train.num_rollouts={self.train.num_rollouts} must be a multiple of world_size ({world_size}) "
                f"x train.micro_batch_size ({self.train.micro_batch_size}) = {per_round}"
            )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class _Where:
    """Names the origin of a dotted key in error messages: an override, ``file:line``, or the file."""

    def __init__(self, source: str, key_lines: dict[str, int] | None = None,
                 overrides: dict[str, str] | None = None):
        self.source = source
        self.key_lines = key_lines or {}
        self.overrides = overrides or {}

    def __call__(self, dotted: str) -> str:
        prefix = re.sub(r"\[\d+\]", "", dotted)
        for key, text in self.overrides.items():
            if key == prefix or key.startswith(prefix + ".") or prefix.startswith(key + "."):
                return f"override {text!r}"
        while prefix:
            if prefix in self.key_lines:
                return f"{self.source}:{self.key_lines[prefix]}"
            prefix = prefix.rpartition(".")[0]
        return self.source

    def error(self, dotted: str, message: str) -> ConfigError:
        return ConfigError(f"{self(dotted)}: {dotted}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, dotted: str, where: _Where) -> Any:
    """``value`` (parsed YAML) as an instance of the annotation ``tp``, or a ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, dotted, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        non_none = [option for option in options if option is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, dotted, where)
        raise TypeError(f"config field {dotted}: unions of several types are not supported")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            suffix = f"; did you mean {hint[0]!r}?" if hint else ""
            raise where.error(dotted, f"expected one of {', '.join(map(repr, allowed))}, got {value!r}{suffix}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise where.error(dotted, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is list:
            return [_convert(args[0], item, f"{dotted}[{i}]", where) for i, item in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, f"{dotted}[{i}]", where) for i, item in enumerate(value))
        if len(value) != len(args):
            raise where.error(dotted, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(arg, item, f"{dotted}[{i}]", where) for i, (arg, item) in enumerate(zip(args, value)))
    return _convert_scalar(tp, value, dotted, where)


def _convert_scalar(tp: Any, value: Any, dotted: str, where: _Where) -> Any:
    # bool is an int subclass in Python: `true` must not pass as 1, nor 1 as `true`.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        # YAML 1.1 reads `5e-6` (no dot) as a string; accept any text float() understands.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise where.error(dotted, f"expected a finite number, got {value!r}")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {dotted}: unsupported annotation {tp!r}")
    if not ok:
        raise where.error(dotted, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _convert_dataclass(cls: type, value: Any, dotted: str, where: _Where, base: Any = None) -> Any:
    """Fields given in ``value`` replace those of ``base`` (default: ``cls()``), so a nested section
    keeps its parent's defaults for it (``sft.optim`` differs from a plain ``OptimConfig()``)."""
    base = cls() if base is None else base
    if value is None:
        value = {}
    if not isinstance(value, dict):
        label = dotted or "top level"
        raise ConfigError(f"{where(dotted)}: {label}: expected a mapping of fields, got {value!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in known:
            full = f"{dotted}.{key}" if dotted else str(key)
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            prefix = f"{dotted}." if dotted else ""
            suffix = f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{where(full)}: unknown key '{full}'{suffix}")
    kwargs = {}
    for name, spec in known.items():
        if name not in value:
            continue
        full = f"{dotted}.{name}" if dotted else name
        if dataclasses.is_dataclass(hints[name]):
            converted = _convert_dataclass(hints[name], value[name], full, where, getattr(base, name))
        else:
            converted = _convert(hints[name], value[name], full, where)
        if "range" in spec.metadata and converted is not None:
            _check_range(converted, spec.metadata["range"], full, where)
        kwargs[name] = converted
    return dataclasses.replace(base, **kwargs)


def _check_range(value: float, bounds: tuple, dotted: str, where: _Where) -> None:
    low, high, low_open, high_open = bounds
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if high is None:
        expected = f"must be {'>' if low_open else '>='} {low}"
    elif low is None:
        expected = f"must be {'<' if high_open else '<='} {high}"
    else:
        expected = f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise where.error(dotted, f"{expected}, got {value!r}")


def _check_consistency(config: RunConfig, where: _Where) -> None:
    """Rules that involve several fields or the file system."""
    def fail(dotted: str, message: str) -> typing.NoReturn:
        raise where.error(dotted, message)

    train, sampling, data, runtime = config.train, config.sampling, config.data, config.runtime
    if not train.phases:
        fail("train.phases", f"must name at least one phase of {', '.join(PHASES)}")
    if len(set(train.phases)) != len(train.phases):
        fail("train.phases", f"each phase may appear once, got {train.phases}")
    if not config.model.student:
        fail("model.student", "required: a model directory or hub name for the student")
    if not config.model.teacher and any(phase in PHASES_USING_TEACHER for phase in train.phases):
        used = [phase for phase in train.phases if phase in PHASES_USING_TEACHER]
        fail("model.teacher", f"required by phase(s) {', '.join(used)}")
    if not data.train:
        fail("data.train", "required: a .jsonl/.json file, a datasets name, or 'sharegpt'")
    if data.max_prompt_tokens >= data.max_length:
        fail("data.max_prompt_tokens", f"must be < data.max_length ({data.max_length}), got {data.max_prompt_tokens}")
    budget = data.max_length - data.max_prompt_tokens
    if sampling.max_new_tokens > budget:
        fail("sampling.max_new_tokens", f"must be <= data.max_length - data.max_prompt_tokens ({budget}), "
                                        f"got {sampling.max_new_tokens}")
    if not config.advantage.include_current_reward and not config.loss.single_step:
        fail("advantage.include_current_reward", "is false and loss.single_step is false: the current token's "
                                                 "reward r_t is then in neither term and the gradient is biased "
                                                 "(algorithm.md §4.3); turn one of them on")
    if config.loss.single_step and sampling.teacher_dist == "none":
        fail("sampling.teacher_dist", "is 'none' but loss.single_step is on: use 'auto', 'hidden', 'exact' or 'topk'")
    if config.eval.num_test and config.eval.test_data:
        fail("eval.num_test", "holds prompts out of data.train, but eval.test_data names the test prompts; set one")
    if data.pretrain_corpus:
        if "minillm" not in train.phases:
            fail("data.pretrain_corpus", "feeds the minillm phase's PT term only; leave it empty for phases "
                                         f"{train.phases}")
        if config.loss.lm_coef == 0:
            fail("data.pretrain_corpus", "is set but loss.lm_coef is 0 (no PT term): set one or leave the other")
        if config.loss.kd_ratio > 0 and sampling.teacher_dist == "none":
            fail("sampling.teacher_dist", "is 'none' but the PT term mixes in the teacher (loss.kd_ratio > 0): "
                                          "use 'auto', 'hidden', 'exact' or 'topk', or loss.kd_ratio=0")
    if train.num_rollouts % train.micro_batch_size:
        fail("train.micro_batch_size", f"must divide train.num_rollouts ({train.num_rollouts}), "
                                       f"got {train.micro_batch_size}")
    if config.sft.batch_size % config.sft.micro_batch_size:
        fail("sft.micro_batch_size", f"must divide sft.batch_size ({config.sft.batch_size}), "
                                     f"got {config.sft.micro_batch_size}")
    if runtime.replay_max_samples < train.num_rollouts:
        fail("runtime.replay_max_samples", f"must be >= train.num_rollouts ({train.num_rollouts}) or a round "
                                           f"never fits, got {runtime.replay_max_samples}")
    if runtime.worker_gpus > 1 and not runtime.worker_gpus.is_integer():
        fail("runtime.worker_gpus", f"must be a fraction of one GPU (0 < x < 1) or a whole number of GPUs, "
                                    f"got {runtime.worker_gpus:g}")
    address = runtime.ray_address
    if address not in ("local", "auto") and ":" not in address:
        fail("runtime.ray_address", f"expected 'local', 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    if config.output.resume not in ("none", "auto") and not Path(config.output.resume).exists():
        fail("output.resume", f"expected 'none', 'auto' or an existing checkpoint path, got {config.output.resume!r}")
    if runtime.deepspeed_config is not None:
        _check_deepspeed_file(config, fail)


def _check_deepspeed_file(config: RunConfig, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """The DeepSpeed JSON must exist, parse, and not contradict the recipe on values both set."""
    path = Path(config.runtime.deepspeed_config)
    if not path.is_file():
        fail("runtime.deepspeed_config", f"file not found: {path}")
    try:
        ds_config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        fail("runtime.deepspeed_config", f"{path} is not valid JSON: {err}")
    if not isinstance(ds_config, dict):
        fail("runtime.deepspeed_config", f"{path} must hold a JSON object")
    # "auto" (or absent) means the learner fills the value from the recipe.
    shared = {"gradient_clipping": ("train.optim.grad_clip", config.train.optim.grad_clip)}
    for ds_key, (dotted, recipe_value) in shared.items():
        ds_value = ds_config.get(ds_key, "auto")
        if ds_value != "auto" and ds_value != recipe_value:
            fail(dotted, f"is {recipe_value!r} but {path} sets {ds_key}={ds_value!r}; make them agree or set it "
                         f"to \"auto\" in the DeepSpeed file")
    _check_deepspeed_batches(config, path, ds_config, fail)


def _check_deepspeed_batches(config: RunConfig, path: Path, ds_config: dict,
                             fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """The batch keys of the DeepSpeed file against every phase's global batch (rows per optimizer
    step: ``sft.batch_size`` for supervised phases, ``train.micro_batch_size`` for MiniLLM), as far
    as they can be checked before the world size is known; the learner checks the rest
    (:func:`minillm_rl.runtime.learner.resolve_ds_config`). One file serves every phase of the run."""
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            fail("runtime.deepspeed_config", f"{path} has an '{section}' section; remove it: the recipe's optim "
                                             f"settings define it")
    accumulation = ds_config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        fail("runtime.deepspeed_config", f"{path} sets gradient_accumulation_steps={accumulation!r}; expected 1 or "
                                         f"\"auto\" (one optimizer step per global batch)")
    batches = {("train.micro_batch_size" if phase == "minillm" else "sft.batch_size"):
               (config.train.micro_batch_size if phase == "minillm" else config.sft.batch_size)
               for phase in config.train.phases}
    global_batch = ds_config.get("train_batch_size", "auto")
    per_rank = ds_config.get("train_micro_batch_size_per_gpu", "auto")
    for dotted, batch in batches.items():
        if global_batch != "auto" and global_batch != batch:
            fail(dotted, f"is {batch} but {path} sets train_batch_size={global_batch!r}; make them agree or set it "
                         f"to \"auto\" in the DeepSpeed file")
        if per_rank != "auto" and (not isinstance(per_rank, int) or per_rank < 1 or batch % per_rank):
            fail(dotted, f"is {batch} but {path} sets train_micro_batch_size_per_gpu={per_rank!r}, which does not "
                         f"divide it; set it to \"auto\" in the DeepSpeed file")
    if per_rank != "auto" and len({batch // per_rank for batch in batches.values()}) > 1:
        implied = ", ".join(f"{dotted}={batch} -> {batch // per_rank} ranks" for dotted, batch in batches.items())
        fail("runtime.deepspeed_config", f"{path} sets train_micro_batch_size_per_gpu={per_rank}, which needs a "
                                         f"different world size per phase ({implied}); set it to \"auto\"")


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of every dotted mapping key in a YAML document (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return lines


def _read_recipe(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    recipe = Path(path)
    if not recipe.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        text = recipe.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
        key_lines = _key_lines(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        location = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{location}: invalid YAML: {problem}") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw, key_lines


def apply_override(raw: dict[str, Any], override: str) -> str:
    """Set ``key.sub=value`` in the nested dict ``raw`` (value parsed as YAML); returns the key."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r}: expected key.sub=value, e.g. sampling.alpha=0.3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r}: the value is not valid YAML") from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The validated config of a recipe (``None`` = defaults only) with CLI overrides applied.

    Raises:
        ConfigError: one line naming the file (and line) or override, the dotted field, and
            what was expected.
    """
    raw, key_lines = _read_recipe(path) if path is not None else ({}, {})
    override_keys = {apply_override(raw, override): override for override in overrides}
    return _build(raw, _Where(path or "<defaults>", key_lines, override_keys))


def _build(raw: dict[str, Any], where: _Where) -> RunConfig:
    config = _convert(RunConfig, raw, "", where)
    _check_consistency(config, where)
    return config
