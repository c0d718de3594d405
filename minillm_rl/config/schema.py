"""The recipe's schema: one dataclass per section, every field with its default, range and doc line.

Defaults are the reference values of algorithm.md (OPT-13B -> 1.3B scripts): a recipe only states
what differs. Each field is declared with :func:`option`, which keeps its one-line meaning
(``metadata["doc"]``) and, for numbers, its allowed range (``metadata["range"]``) beside it; the
loader (:mod:`minillm_rl.config.loading`) checks the ranges and :mod:`minillm_rl.config.reference`
renders every field into ``docs/config-reference.md``. A section's docstring is its introduction
there. Adding a field means adding one line here (with its doc, or the reference test fails).

Longer than ~400 lines because it is the whole recipe: about a hundred fields, each with its doc.
"""

from __future__ import annotations

import dataclasses
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


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None,
           low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field with its one-line ``doc`` and, when ``low``/``high`` are given, the range
    ``[low, high]`` its value must lie in (``(`` / ``)`` when open). ``factory``: for list defaults."""
    metadata: dict[str, Any] = {"doc": doc}
    if low is not None or high is not None:
        metadata["range"] = (low, high, low_open, high_open)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str, factory: Any = None) -> Any:
    """A nested section field (``factory`` when its defaults differ from ``cls()``)."""
    return field(default_factory=factory or cls, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """Which models to load. A model is a local Hugging Face directory, a hub name already in the
    local cache, or a directory holding a GGUF file (dequantised when loaded)."""

    teacher: str = option("", "the teacher (required by the kd, seqkd and minillm phases)")
    student: str = option("", "the student to train (required), e.g. the output of `minillm-rl init-student`")
    teacher_gguf_file: str | None = option(None, "GGUF file name inside model.teacher, when it is a GGUF directory")
    student_gguf_file: str | None = option(None, "GGUF file name inside model.student, when it is a GGUF directory")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "dtype the models are loaded in (learners, rollout workers, test stage)")
    gradient_checkpointing: bool = option(True, "recompute the student's activations in the backward pass "
                                                "(less memory, more compute)")


@dataclass
class DataConfig:
    """Instruction data (algorithm.md §7). The record format of a jsonl file is in
    [Your data and templates](data.md)."""

    train: str = option("", "the instruction data (required): a .jsonl/.json file, a saved or hub `datasets` "
                            "name, 'sharegpt', or a `minillm-rl prepare-data` directory")
    split: str = option("train", "split to read when data.train is a `datasets` source")
    num_validation: int = option(1000, "examples held out of data.train for validation (checkpoint selection)",
                                 low=1)
    template: Literal["minillm", "chat"] = option(
        "minillm", "prompt template: the MiniLLM paper's instruction format, or the tokenizer's chat template; "
                   "recorded with the trained model, which `minillm-rl eval` then uses")
    max_prompt_tokens: int = option(256, "prompts longer than this many tokens are dropped (counted in the log)",
                                    low=1)
    max_length: int = option(512, "prompt + response token budget; responses are truncated to fit", low=2)
    skip_bad_records: bool = option(False, "count and skip malformed records instead of refusing the file")
    pretrain_corpus: list[str] = option(
        doc="plain-text files or directories of *.txt for the minillm phase's PT term (algorithm.md §4.4), one "
            "document per file, cut into blocks of data.max_length tokens; empty = no PT term, unless data.train "
            "is a prepared dataset with PT blocks", factory=list)
    split_seed: int = option(0, "seed of the hash split into test, validation and training examples")
    max_examples: int = option(0, "read at most this many records of data.train (0 = all), e.g. to keep the "
                                  "rest of a corpus for something that must not overlap it", low=0)
    max_dropped_share: float = option(
        0.25, "refuse the run when the validation or test split loses more than this share of its examples "
              "(prompts over data.max_prompt_tokens, empty records); 1 = never refuse", low=0.0, high=1.0)


@dataclass
class SamplingConfig:
    """Teacher-mixed sampling of the rollouts (algorithm.md §3.2) and the teacher signal shipped to
    the learners for the single-step term, the PT term's soft CE and the KD baseline."""

    alpha: float = option(0.2, "share of the teacher in the mixed sampling distribution "
                               "alpha * p + (1 - alpha) * q_theta", low=0.0, high=1.0)
    temperature: float = option(1.0, "sampling temperature", low=0.0, low_open=True)
    top_k: int = option(0, "sample from the k most likely tokens only (0 = no limit)", low=0)
    top_p: float = option(1.0, "nucleus sampling: the smallest token set with this probability (1 = off)",
                          low=0.0, high=1.0, low_open=True)
    max_new_tokens: int = option(256, "longest response generated in a rollout", low=1)
    teacher_dist: Literal["auto", "hidden", "exact", "topk", "none"] = option(
        "auto", "teacher signal: 'exact' = full-vocabulary log-probs [B, T, V]; 'hidden' = the teacher's final "
                "hidden states [B, T, d], the learners recompute the same distribution with the frozen LM head "
                "(exact, V/d times fewer bytes); 'auto' = 'hidden' unless the teacher's config declares logits "
                "transformed after its head, then 'exact'; 'topk' = the teacher_topk largest + tail "
                "(approximate); 'none' = no teacher signal")
    teacher_topk: int = option(64, "log-probs kept per token with teacher_dist 'topk'", low=1)
    teacher_dist_dtype: Literal["float32", "bfloat16"] = option(
        "float32", "dtype of the shipped log-probs or hidden states")
    stop_at_eos: bool = option(True, "end a response at EOS; false: responses always run to max_new_tokens "
                                     "(benchmarks against fixed-length systems)")
    mixing: Literal["lazy", "every_step"] = option(
        "lazy", "how the mixture is drawn: 'lazy' = a shared Bernoulli(alpha) coin per step picks the model the "
                "token is drawn from and only that model runs (the other scores the skipped positions in one "
                "forward later; ~alpha T + 1 teacher forwards per response); 'every_step' = both models at every "
                "step. Same distribution and records")


@dataclass
class AdvantageConfig:
    """Reward and advantage (algorithm.md §3.5-§3.6); the same fields as
    ``minillm_rl.algorithm.advantages.AdvantageConfig``."""

    gamma: float = option(0.95, "discount of the reward-to-go", low=0.0, high=1.0)
    length_normalize: bool = option(True, "divide the reward-to-go by the number of tokens it sums")
    include_current_reward: bool = option(True, "the reward-to-go includes the current token's reward r_t "
                                                "(the reference code); false: the paper's variant")
    baseline: Literal["whiten", "constant", "none"] = option(
        "whiten", "advantage baseline: whiten over the batch, subtract advantage.constant_baseline, or none")
    constant_baseline: float = option(-1.0, "the constant b subtracted with baseline 'constant'")
    reward_scaling: float = option(0.5, "rewards log p - log q are divided by this", low=0.0, low_open=True)
    reward_clip: float = option(100.0, "rewards are clipped to [-reward_clip, reward_clip]", low=0.0, low_open=True)


@dataclass
class LossConfig:
    """The micro-batch loss of the minillm phase (algorithm.md §4)."""

    clip_eps: float = option(0.2, "PPO clipping of the importance ratio", low=0.0, low_open=True)
    single_step: bool = option(True, "add the single-step term (the exact expected reward of the next token "
                                     "under the teacher signal)")
    single_step_weighted: bool = option(False, "weight the single-step term by w_t (the paper's variant; the "
                                               "reference code does not)")
    lm_coef: float = option(1.0, "weight of the PT term on data.pretrain_corpus (0 = no PT term)", low=0.0)
    kd_ratio: float = option(0.5, "share of the teacher's soft CE in the PT term and the kd phase; the rest "
                                  "is next-token CE", low=0.0, high=1.0)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule. ``train.optim`` defaults to the MiniLLM phase's
    (algorithm.md §4.5), ``sft.optim`` to the supervised phases' (lr 5e-5, cosine, no warm-up)."""

    lr: float = option(5e-6, "peak learning rate", low=0.0, low_open=True)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon", low=0.0, low_open=True)
    weight_decay: float = option(1e-6, "AdamW weight decay", low=0.0)
    warmup_steps: int = option(100, "optimizer steps of linear warm-up", low=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = option("constant", "learning rate after the warm-up")
    grad_clip: float = option(1.0, "gradient norm clipping (0 = off)", low=0.0)


def _sft_optim() -> OptimConfig:
    return OptimConfig(lr=5e-5, warmup_steps=0, lr_schedule="cosine")


@dataclass
class SFTConfig:
    """The supervised phases: ``sft``, and the ``kd``/``seqkd`` baselines (algorithm.md §2, §5).
    Their length is ``sft.num_epochs`` over the training split."""

    num_epochs: int = option(10, "passes over the training split", low=1)
    batch_size: int = option(32, "examples per optimizer step, over all learner ranks together", low=1)
    micro_batch_size: int = option(8, "examples per forward/backward pass (gradient accumulation up to "
                                      "sft.batch_size)", low=1)
    optim: OptimConfig = section(OptimConfig, "optimizer of the supervised phases", factory=_sft_optim)
    eval_interval: int = option(0, "validate (and checkpoint) every this many optimizer steps; 0 = "
                                   "train.eval_interval", low=0)


@dataclass
class TrainConfig:
    """Which phases run, and the minillm phase's rounds (algorithm.md §3.1, §3.7, §4.5, §6). A round
    samples ``num_rollouts`` responses, then makes ``ppo_epochs x num_rollouts / micro_batch_size``
    optimizer steps on them; the phase ends after ``total_steps`` optimizer steps (whole rounds, so
    the last round may pass it) or ``max_prompt_epochs`` passes over the prompts, whichever is first."""

    phases: list[Phase] = option(doc="phases run in this order; a minillm phase after sft starts from the "
                                     "lowest-validation-loss SFT weights (sft_best_loss/), every other phase "
                                     "from model.student",
                                 factory=lambda: ["sft", "minillm"])
    num_rollouts: int = option(256, "responses sampled per round, over all learner ranks together", low=1)
    ppo_epochs: int = option(4, "passes over a round's responses", low=1)
    micro_batch_size: int = option(16, "responses per optimizer step, over all learner ranks together", low=1)
    total_steps: int = option(5000, "optimizer steps of the minillm phase (not of the supervised phases: "
                                    "sft.num_epochs sets those)", low=1)
    max_prompt_epochs: int = option(10, "the minillm phase stops after this many passes over the training "
                                        "prompts", low=1)
    eval_interval: int = option(100, "validate (and checkpoint) every this many optimizer steps", low=1)
    seed: int = option(42, "seed of the data order, sampling and initialisation")
    optim: OptimConfig = section(OptimConfig, "optimizer of the minillm phase")


@dataclass
class EvalConfig:
    """Validation, and the run's own test stage (algorithm.md §6).

    The test stage (after the last phase) runs when ``num_test > 0`` or ``test_data`` is set:
    ``best/`` and the models in ``compare`` are evaluated on the test prompts under the test protocol
    (temperature 1, ``no_repeat_ngram_size``, ``test_seeds`` seeds) with the distillation metrics
    against the teacher; see [Evaluation and metrics](evaluation.md)."""

    test_seeds: int = option(5, "sampling seeds of the test stage (10, 20, ...)", low=1)
    no_repeat_ngram_size: int = option(6, "test protocol: no n-gram of this size repeats in an answer (0 = off)",
                                       low=0)
    max_new_tokens: int = option(256, "longest answer of the test stage", low=1)
    validation: Literal["sampling", "test"] = option(
        "sampling", "how validation answers are sampled for checkpoint selection: 'sampling' = the training "
                    "sampling settings, one seed (the reference's); 'test' = the test protocol, one seed")
    num_test: int = option(0, "test prompts held out of data.train (split off first, never trained or "
                              "validated on); with eval.test_data: read at most this many", low=0)
    test_data: str = option("", "test prompts from another source (same forms as data.train); empty = none")
    test_split: str = option("test", "split of eval.test_data when it is a `datasets` source")
    compare: list[Literal["teacher", "sft"]] = option(
        doc="models evaluated beside best/ in the test stage: the teacher; 'sft' = the lowest-validation-loss "
            "SFT weights (sft_best_loss/), what a minillm phase after sft starts from",
        factory=lambda: ["teacher", "sft"])
    side_by_side: int = option(5, "test prompts shown with every model's answer in results.md", low=0)
    select_initial: bool = option(
        False, "the MiniLLM phase's starting weights (its SFT init) compete for best/ too, so a run that never "
               "beats them on validation ends with them; false = the paper's choice among the phase's own "
               "checkpoints (the starting weights' validation is still run and logged at step 0)")


@dataclass
class RuntimeConfig:
    """Processes, replay bounds and time limits; see [The distributed runtime](runtime.md)."""

    num_rollout_workers: int = option(1, "Ray rollout worker actors (teacher + student copy each)", low=1)
    max_staleness: int = option(0, "rounds the rollouts may lag the learner's weights (0 = strictly "
                                   "on-policy; 1 overlaps generation with learning)", low=0)
    ray_address: str = option("local", "'local' starts Ray in this process, 'auto' joins the running cluster, "
                                       "or a 'host:port' / 'ray://host:port' address")
    deepspeed_config: str | None = option(None, "a DeepSpeed JSON (ds_configs/ has ZeRO-2/3, bf16/fp16); "
                                                "null = the built-in one (fp32, ZeRO-2)")
    replay_max_samples: int = option(1024, "rollouts the replay store holds at most", low=1)
    replay_max_bytes: int = option(16 * 2**30, "bytes the replay store holds at most", low=1)
    worker_threads: int = option(2, "CPU threads (and Ray CPUs) per rollout worker", low=1)
    learner_threads: int = option(
        0, "CPU threads (torch.set_num_threads) of each learner rank; 0 = torch's default (every core it sees). "
           "With max_staleness >= 1 on one CPU machine the learners compute while the workers generate: give "
           "the two roles disjoint shares of the cores (2 cores: worker_threads 1, learner_threads 1)", low=0)
    worker_gpus: float = option(0.0, "GPUs each rollout worker asks Ray for (0 = CPU actors); a fraction "
                                     "0 < x < 1 packs several actors on one GPU, above 1 whole GPUs only",
                                low=0.0)
    eval_on_workers: bool = option(True, "generate validation answers on the rollout workers when the run has "
                                         "them; false (or an SFT-only run): on the learner ranks")
    rpc_timeout_s: float = option(600.0, "seconds a rollout shard or a replay store call may take before it "
                                         "counts as failed",
                                  low=0.0, low_open=True)
    actor_start_timeout_s: float = option(1800.0, "seconds the rollout workers (loading the teacher and a student "
                                                  "copy) and the replay store may take to start; not part of "
                                                  "rpc_timeout_s", low=0.0, low_open=True)
    collective_timeout_s: float = option(1800.0, "seconds a torch.distributed collective may wait",
                                         low=0.0, low_open=True)
    weight_sync_timeout_s: float = option(600.0, "seconds a weight broadcast to the rollout workers may take",
                                          low=0.0, low_open=True)
    num_learners: int = option(1, "learner processes `minillm-rl train` starts itself (under `deepspeed "
                                  "--num_gpus N`) when no launcher started it; under a launcher its world "
                                  "size applies", low=1)
    stop_after_steps: int = option(0, "simulate preemption: checkpoint and exit with code 3 once this many "
                                      "optimizer steps (all phases together) are done; 0 = off", low=0)
    max_nonfinite_streak: int = option(5, "optimizer steps with a non-finite loss or gradient are skipped; this "
                                          "many in a row stop the run (exit 1), the last checkpoint kept", low=1)


@dataclass
class OutputConfig:
    """Where the run writes; see [Getting started](getting-started.md) for the files."""

    dir: str = option("runs/minillm", "the run directory; one that holds a previous run is refused unless "
                                      "resumed (--resume) or overwritten (--overwrite)")
    resume: str = option("none", "'none' (start fresh), 'auto' (the newest verified checkpoint in output.dir), "
                                 "or a checkpoint path; --resume overrides it")
    keep_checkpoints: int = option(2, "verified checkpoints kept (plus the best one of the last phase)", low=1)
    report_to: list[Literal["tensorboard", "wandb"]] = option(
        doc="where metrics go besides metrics.jsonl: TensorBoard (tensorboard/ in the run directory) and/or "
            "Weights & Biases (its own settings: WANDB_PROJECT, WANDB_MODE=offline, ...)",
        factory=lambda: ["tensorboard"])
    progress_interval_s: float = option(30.0, "seconds between progress lines of a phase", low=0.0)


@dataclass
class RunConfig:
    """The whole run. Build with :func:`~minillm_rl.config.load_config`; ``RunConfig()`` gives the
    defaults unvalidated. Serialisation and checks live in :mod:`minillm_rl.config.loading`."""

    model: ModelConfig = section(ModelConfig, "which models to load")
    data: DataConfig = section(DataConfig, "instruction data")
    sampling: SamplingConfig = section(SamplingConfig, "rollout sampling and the teacher signal")
    advantage: AdvantageConfig = section(AdvantageConfig, "reward and advantage")
    loss: LossConfig = section(LossConfig, "the minillm phase's loss")
    sft: SFTConfig = section(SFTConfig, "the supervised phases")
    train: TrainConfig = section(TrainConfig, "phases and the minillm phase's rounds")
    eval: EvalConfig = section(EvalConfig, "validation and the test stage")
    runtime: RuntimeConfig = section(RuntimeConfig, "processes, replay, time limits")
    output: OutputConfig = section(OutputConfig, "the run directory")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists (tuples become lists), as written to the run's config.yaml."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

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
