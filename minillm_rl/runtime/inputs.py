"""A run's inputs, loaded and checked before anything is written or any rank is started.

``minillm-rl train`` calls :func:`check_run_inputs` in the CLI process, before it re-launches
itself under ``deepspeed`` and before the output directory exists, so bad input (a missing model,
mismatched tokenizers, malformed data, a validation or test split that lost more than
``data.max_dropped_share`` to the prompt budget, an unwritable output directory or one that holds
a previous run, a resume target that is not a checkpoint) is one line and exit code 2 with nothing
created. Every learner rank then
loads the same inputs again with :func:`load_run_inputs` (data order is a pure function of the
config, so ranks agree without talking).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm_rl.config import RunConfig
from minillm_rl.config.checks import relative_to_cwd
from minillm_rl.data import (
    InstructionExample,
    TokenizedExample,
    load_instructions,
    split_validation,
    tokenize_examples,
)
from minillm_rl.data.prepare import PreparationCounts
from minillm_rl.data.prepared import (
    format_counts,
    is_prepared_dir,
    load_prepared,
    load_prepared_pretrain,
    read_manifest,
)
from minillm_rl.data.pretraining import pack_into_blocks, read_text_documents
from minillm_rl.models import (
    check_model_files,
    check_tokenizers_compatible,
    declared_logit_transform,
    load_model_config,
    load_tokenizer,
    resolve_teacher_dist,
)
from minillm_rl.runtime.checkpointing import resume_source


CHECKPOINTS_SUBDIR = "checkpoints"
# The file a run writes first into output.dir: a directory holding it holds a previous run.
RUN_CONFIG_FILE = "config.yaml"


@dataclass
class SplitCounts:
    """What happened to one split's examples on the way to the prompt and length budgets."""

    name: str
    examples: int
    kept: int
    dropped_prompt_too_long: int
    dropped_empty: int
    truncated_response: int

    @classmethod
    def of(cls, name: str, counts: PreparationCounts) -> SplitCounts:
        examples = counts.kept + counts.dropped_prompt_too_long + counts.dropped_empty
        return cls(name, examples, counts.kept, counts.dropped_prompt_too_long, counts.dropped_empty,
                   counts.truncated_response)

    @property
    def dropped(self) -> int:
        return self.dropped_prompt_too_long + self.dropped_empty

    def line(self, max_prompt_tokens: int) -> str:
        return (f"{self.name}: {self.kept} kept of {self.examples} ({self.dropped_prompt_too_long} prompts over "
                f"{max_prompt_tokens} tokens dropped, {self.dropped_empty} empty dropped, {self.truncated_response} "
                f"responses truncated)")


@dataclass
class DataReport:
    """What the run's data loading did: lines for the log (records loaded and skipped, then one
    per split) and the counts of each split by name (``train``, ``validation``, ``test``)."""

    lines: list[str] = field(default_factory=list)
    splits: dict[str, SplitCounts] = field(default_factory=dict)

    def add(self, split: SplitCounts, max_prompt_tokens: int) -> None:
        self.splits[split.name] = split
        self.lines.append(split.line(max_prompt_tokens))


def check_dropped_shares(cfg: RunConfig, report: DataReport) -> None:
    """Refuse a validation or test split that lost more than ``data.max_dropped_share`` of its
    examples: checkpoint selection or the test would silently score a different, smaller set."""
    limit = cfg.data.max_dropped_share
    for name in ("validation", "test"):
        split = report.splits.get(name)
        if split is None or not split.examples or split.dropped / split.examples <= limit:
            continue
        raise ValueError(f"data.max_dropped_share={limit:g}: the {name} split lost {split.dropped} of its "
                         f"{split.examples} examples ({split.dropped_prompt_too_long} prompts over "
                         f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} tokens, {split.dropped_empty} empty); "
                         f"raise data.max_prompt_tokens, or set data.max_dropped_share="
                         f"{split.dropped / split.examples:.2f} to accept it")


@dataclass
class RunInputs:
    """What every phase reads: the shared tokenizer, the split and tokenised instruction data,
    the validation references (decoded responses), the PT corpus blocks (``[num_blocks,
    block_size]``, or ``None`` without a PT term), and the test stage's examples and references
    (empty without one)."""

    tokenizer: object
    pad_token_id: int
    train_examples: list[TokenizedExample]
    valid_examples: list[TokenizedExample]
    references: list[list[str]]
    pretrain_blocks: torch.Tensor | None
    test_examples: list[TokenizedExample]
    test_references: list[list[str]]
    data_report: DataReport = field(default_factory=DataReport)


def field_error(dotted: str, path: str, err: Exception) -> ValueError:
    """``err`` about the recipe's ``dotted`` path, as one line naming the field; for a relative path
    that does not exist, also what it was resolved against."""
    missing = "" if Path(path).exists() else relative_to_cwd(path)
    return ValueError(f"{dotted}: {err}{missing}")


def check_world_size(cfg: RunConfig, world_size: int) -> None:
    """Batches count rows over all learner ranks, so each must split evenly over them."""
    for dotted, batch in (("train.micro_batch_size", cfg.train.micro_batch_size),
                          ("sft.batch_size", cfg.sft.batch_size)):
        if batch % world_size:
            raise ValueError(f"{dotted}={batch} must be a multiple of the number of learner ranks "
                             f"({world_size}); it counts rows over all ranks")


def load_tokenizers(cfg: RunConfig):
    """The student's tokenizer, after checking that the teacher (when the recipe has one) has
    weights and the same tokenizer."""
    model = cfg.model
    try:
        student = load_tokenizer(model.student, gguf_file=model.student_gguf_file)
    except ValueError as err:
        raise field_error("model.student", model.student, err) from None
    if model.teacher:
        try:
            check_model_files(model.teacher, model.teacher_gguf_file)  # the workers load it, later
        except ValueError as err:
            raise field_error("model.teacher", model.teacher, err) from None
        teacher = load_tokenizer(model.teacher, gguf_file=model.teacher_gguf_file)
        try:
            check_tokenizers_compatible(teacher, student)
        except ValueError as err:
            raise ValueError(f"model.teacher / model.student: {err}; MiniLLM needs one shared tokenizer") from None
    return student


def teacher_signal_mode(cfg: RunConfig) -> str:
    """``sampling.teacher_dist`` resolved against the teacher's config (``auto`` -> ``hidden`` or
    ``exact``, see :func:`~minillm_rl.models.resolve_teacher_dist`); ``ValueError`` for ``hidden``
    with a teacher whose config declares logits transformed after its LM head. Without a teacher
    nothing is shipped: ``exact`` stands for ``auto``."""
    requested, model = cfg.sampling.teacher_dist, cfg.model
    if requested not in ("auto", "hidden") or not model.teacher:
        return "exact" if requested == "auto" else requested
    try:
        config = load_model_config(model.teacher, model.teacher_gguf_file)
        return resolve_teacher_dist(requested, declared_logit_transform(config))
    except ValueError as err:
        raise ValueError(f"{err} (model.teacher={model.teacher})") from None


def load_instruction_splits(cfg: RunConfig, tokenizer, report: DataReport | None = None
                            ) -> tuple[list[TokenizedExample], list[TokenizedExample], list[InstructionExample]]:
    """``(train, validation, test)``: tokenised training and validation examples, from a prepared
    dataset or the raw source, and the raw examples held out for the test stage
    (``eval.num_test`` of ``data.train``, split off first; see :func:`load_test_examples`).
    ``report``, when given, receives what was loaded, skipped and dropped per split."""
    data = cfg.data
    report = report if report is not None else DataReport()
    if is_prepared_dir(data.train):  # `minillm-rl prepare-data` output: already split and tokenised
        for dotted, value in (("eval.num_test", cfg.eval.num_test), ("data.max_examples", data.max_examples)):
            if value:
                raise ValueError(f"{dotted}={value}: data.train ({data.train}) is a prepared dataset, already "
                                 f"split; prepare it with the records you want (or give eval.test_data)")
        manifest = read_manifest(data.train)
        report.lines += format_counts(manifest).splitlines()
        for name in ("train", "validation"):
            counts = manifest["counts"][name]
            report.splits[name] = SplitCounts(name, counts["examples"], counts["kept"],
                                              counts["dropped_prompt_too_long"], counts["dropped_empty"],
                                              counts["truncated_response"])
        return (*load_prepared(data.train, tokenizer, data), [])
    try:
        loaded = load_instructions(data.train, split=data.split, skip_bad=data.skip_bad_records,
                                   max_examples=data.max_examples or None)
    except ValueError as err:
        raise field_error("data.train", data.train, err) from None
    skipped = ", ".join(f"{reason}={count}" for reason, count in sorted(loaded.skipped.items())) or "none"
    report.lines.append(f"loaded {len(loaded.examples)} examples from {data.train} (bad records skipped: {skipped}"
                        + (f"; file truncated after {loaded.truncated_after} records" if loaded.truncated_after
                           is not None else "") + f"; {cfg.eval.num_test} held out for the test stage)")
    held_out = cfg.eval.num_test
    if len(loaded.examples) <= data.num_validation + held_out:
        raise ValueError(f"data.num_validation={data.num_validation} and eval.num_test={held_out} leave no "
                         f"training examples ({data.train} has {len(loaded.examples)})")
    rest, test = split_validation(loaded.examples, held_out, data.split_seed)
    train, valid = split_validation(rest, data.num_validation, data.split_seed)
    budgets = (data.max_prompt_tokens, data.max_length - data.max_prompt_tokens)
    train, train_counts = tokenize_examples(train, tokenizer, *budgets, template=data.template)
    valid, valid_counts = tokenize_examples(valid, tokenizer, *budgets, template=data.template)
    report.add(SplitCounts.of("train", train_counts), data.max_prompt_tokens)
    report.add(SplitCounts.of("validation", valid_counts), data.max_prompt_tokens)
    if not train or not valid:
        raise ValueError(f"data.train: {data.train} has no example whose prompt fits data.max_prompt_tokens="
                         f"{data.max_prompt_tokens} in the {'training' if not train else 'validation'} split")
    return train, valid, test


def load_test_examples(cfg: RunConfig, tokenizer, held_out: list[InstructionExample],
                       report: DataReport | None = None) -> tuple[list[TokenizedExample], list[list[str]]]:
    """The test stage's prompts, tokenised like the training data, and their references (the
    whole responses, untruncated, as ``minillm-rl eval`` scores them): ``eval.test_data`` or the
    examples held out of ``data.train``; empty when the run has no test stage."""
    data, eval_cfg = cfg.data, cfg.eval
    if eval_cfg.test_data:
        try:
            held_out = load_instructions(eval_cfg.test_data, split=eval_cfg.test_split, skip_bad=data.skip_bad_records,
                                         max_examples=eval_cfg.num_test or None).examples
        except ValueError as err:
            raise field_error("eval.test_data", eval_cfg.test_data, err) from None
    if not held_out:
        return [], []
    examples, counts = tokenize_examples(held_out, tokenizer, data.max_prompt_tokens, eval_cfg.max_new_tokens,
                                         template=data.template)
    if report is not None:
        report.add(SplitCounts.of("test", counts), data.max_prompt_tokens)
    if not examples:
        where = eval_cfg.test_data or "the examples held out of data.train (eval.num_test)"
        raise ValueError(f"eval: {where} has no example whose prompt fits data.max_prompt_tokens="
                         f"{data.max_prompt_tokens}")
    by_source = {example.source: example.response for example in held_out}
    return examples, [[by_source[example.source]] for example in examples]


def load_pretrain_blocks(cfg: RunConfig, tokenizer) -> torch.Tensor | None:
    """The PT term's corpus blocks ``[num_blocks, block_size]`` (minillm phase with
    ``loss.lm_coef > 0``; from the prepared dataset or ``data.pretrain_corpus``), or None."""
    data = cfg.data
    prepared = load_prepared_pretrain(data.train) if is_prepared_dir(data.train) else None
    if prepared is not None and data.pretrain_corpus:
        raise ValueError(f"data.pretrain_corpus: data.train ({data.train}) already has PT blocks; give the "
                         "corpus in one place")
    if "minillm" not in cfg.train.phases or cfg.loss.lm_coef == 0 or not (prepared is not None or
                                                                           data.pretrain_corpus):
        return None
    if prepared is not None:
        return prepared
    try:
        return pack_into_blocks(read_text_documents(data.pretrain_corpus), tokenizer, data.max_length)
    except ValueError as err:
        raise ValueError(f"data.pretrain_corpus: {err}") from None


def check_precision_supported(cfg: RunConfig) -> None:
    """The DeepSpeed file's 16-bit mode (``fp16`` / ``bf16``, parsed by DeepSpeed's own config
    readers) must be one that DeepSpeed's accelerator here supports. DeepSpeed checks the same in
    ``deepspeed.initialize`` (e.g. fp16 on a CPU without AVX-512 FP16: "Type fp16 is not supported
    on your device."), but only on the ranks, after they started and the output directory exists;
    here it is one line before anything is written. The accelerator is the one the ranks will get
    (``DS_ACCELERATOR``, else DeepSpeed's detection); the ranks inherit this environment."""
    if cfg.runtime.deepspeed_config is None:  # the built-in default is fp32
        return
    path = cfg.runtime.deepspeed_config
    ds_config = json.loads(Path(path).read_text(encoding="utf-8"))  # config.py checked it parses
    if not any(key in ds_config for key in ("fp16", "bf16", "bfloat16")):
        return
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config

    accelerator = get_accelerator()
    modes = {"fp16": (get_float16_config(ds_config).enabled, accelerator.is_fp16_supported()),
             "bf16": (get_bfloat16_config(ds_config).enabled, accelerator.is_bf16_supported())}
    for mode, (enabled, supported) in modes.items():
        if enabled and not supported:
            usable = " or ".join([other for other, (_, ok) in modes.items() if ok] + ["fp32"])
            raise ValueError(f"runtime.deepspeed_config: {path} enables {mode}, which DeepSpeed's "
                             f"{accelerator.device_name()} accelerator does not support here; use a {usable} "
                             f"config (ds_configs/ has each)")


def load_run_inputs(cfg: RunConfig, world_size: int, log: Callable[[str], None] | None = None) -> RunInputs:
    """Everything a rank reads before training; ``ValueError`` (one line) on bad input. ``log``
    (rank 0's) gets what was loaded, skipped and dropped per split, before the share check."""
    check_world_size(cfg, world_size)
    check_precision_supported(cfg)
    tokenizer = load_tokenizers(cfg)
    teacher_signal_mode(cfg)  # refuses a 'hidden' teacher signal the teacher's config rules out
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report = DataReport()
    train, valid, held_out = load_instruction_splits(cfg, tokenizer, report)
    references = [[tokenizer.decode(e.response_ids, skip_special_tokens=True).strip()] for e in valid]
    test, test_references = load_test_examples(cfg, tokenizer, held_out, report)
    if log is not None:
        for line in report.lines:
            log(f"data: {line}")
    check_dropped_shares(cfg, report)
    return RunInputs(tokenizer, pad_token_id, train, valid, references, load_pretrain_blocks(cfg, tokenizer),
                     test, test_references, report)


def check_output_dir(directory: str | os.PathLike, resume: str = "none", overwrite: bool = False) -> None:
    """``output.dir`` must be a directory or creatable as one, and must not hold a previous run
    unless that run is resumed (``resume`` other than ``none``) or ``overwrite`` is given: a fresh
    run would silently rewrite its metrics, checkpoints, ``best/`` and ``eval/``. Creation is tried
    in the nearest existing ancestor with a temporary directory that is removed at once, so the
    output directory itself is not created here (bad input must leave nothing behind)."""
    path = Path(directory).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"output.dir: {directory} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"output.dir: {directory} is not writable")
        if resume != "none" and overwrite:
            raise ValueError(f"--overwrite starts {directory} over, --resume {resume} continues it; give one")
        if (path / RUN_CONFIG_FILE).is_file() and resume == "none" and not overwrite:
            raise ValueError(f"output.dir: {directory} holds a previous run ({RUN_CONFIG_FILE}); continue it with "
                             f"--resume auto, start it over with --overwrite (deletes its files), or choose another "
                             f"output.dir")
        return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(f"{ancestor} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".minillm-rl-write-check-", dir=ancestor))
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"output.dir: cannot create {directory} ({reason} in {ancestor}"
                         f"{relative_to_cwd(directory)})") from None


def clear_previous_run(directory: str | os.PathLike) -> bool:
    """``--overwrite``: delete everything in ``directory`` when it holds a previous run, so nothing
    of it (checkpoints a later ``--resume auto`` would pick, an ``eval/`` the report would read as
    this run's test) outlives it. Returns whether there was one."""
    path = Path(directory)
    if not (path / RUN_CONFIG_FILE).is_file():
        return False
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return True


def check_resume_target(resume: str, checkpoint_dir: Path) -> None:
    """``--resume`` must name something to resume from (see
    :func:`~minillm_rl.runtime.checkpointing.resume_source`; its warnings are rank 0's to print)."""
    resume_source(resume, checkpoint_dir, warn=lambda line: None)


def check_optional_packages(cfg: RunConfig) -> None:
    """A package the run would import late (after training) that is not a core requirement and is
    not installed: refused now, in one line, rather than after hours of training."""
    if "wandb" in cfg.output.report_to and importlib.util.find_spec("wandb") is None:
        raise ValueError("output.report_to: 'wandb' needs the wandb package, which is not installed; "
                         "`pip install wandb`, or remove it from output.report_to")


def check_run_inputs(cfg: RunConfig, resume: str, world_size: int, overwrite: bool = False,
                     log: Callable[[str], None] | None = None) -> RunInputs:
    """Every check the CLI process can make before any rank starts (see the module docstring);
    returns the loaded inputs (a run in this process reuses them). ``log``: see :func:`load_run_inputs`."""
    check_output_dir(cfg.output.dir, resume, overwrite)
    check_resume_target(resume, Path(cfg.output.dir) / CHECKPOINTS_SUBDIR)
    check_optional_packages(cfg)
    try:
        check_model_files(cfg.model.student, cfg.model.student_gguf_file)
    except ValueError as err:
        raise field_error("model.student", cfg.model.student, err) from None
    return load_run_inputs(cfg, world_size, log)
