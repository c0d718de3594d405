"""A run's inputs, loaded and checked before anything is written or any rank is started.

``minillm-rl train`` calls :func:`check_run_inputs` in the CLI process, before it re-launches
itself under ``deepspeed`` and before the output directory exists, so bad input (a missing model,
mismatched tokenizers, malformed data, an unwritable output directory, a resume target that is
not a checkpoint) is one line and exit code 2 with nothing created. Every learner rank then
loads the same inputs again with :func:`load_run_inputs` (data order is a pure function of the
config, so ranks agree without talking).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm_rl.config import RunConfig
from minillm_rl.data import (
    InstructionExample,
    TokenizedExample,
    load_instructions,
    split_validation,
    tokenize_examples,
)
from minillm_rl.data.prepared import is_prepared_dir, load_prepared, load_prepared_pretrain
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
    student = load_tokenizer(model.student, gguf_file=model.student_gguf_file)
    if model.teacher:
        try:
            check_model_files(model.teacher, model.teacher_gguf_file)  # the workers load it, later
        except ValueError as err:
            raise ValueError(f"model.teacher: {err}") from None
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


def load_instruction_splits(cfg: RunConfig, tokenizer) -> tuple[list[TokenizedExample], list[TokenizedExample],
                                                                  list[InstructionExample]]:
    """``(train, validation, test)``: tokenised training and validation examples, from a prepared
    dataset or the raw source, and the raw examples held out for the test stage
    (``eval.num_test`` of ``data.train``, split off first; see :func:`load_test_examples`)."""
    data = cfg.data
    if is_prepared_dir(data.train):  # `minillm-rl prepare-data` output: already split and tokenised
        for dotted, value in (("eval.num_test", cfg.eval.num_test), ("data.max_examples", data.max_examples)):
            if value:
                raise ValueError(f"{dotted}={value}: data.train ({data.train}) is a prepared dataset, already "
                                 f"split; prepare it with the records you want (or give eval.test_data)")
        return (*load_prepared(data.train, tokenizer, data), [])
    loaded = load_instructions(data.train, split=data.split, skip_bad=data.skip_bad_records,
                               max_examples=data.max_examples or None)
    held_out = cfg.eval.num_test
    if len(loaded.examples) <= data.num_validation + held_out:
        raise ValueError(f"data.num_validation={data.num_validation} and eval.num_test={held_out} leave no "
                         f"training examples ({data.train} has {len(loaded.examples)})")
    rest, test = split_validation(loaded.examples, held_out, data.split_seed)
    train, valid = split_validation(rest, data.num_validation, data.split_seed)
    budgets = (data.max_prompt_tokens, data.max_length - data.max_prompt_tokens)
    train, _ = tokenize_examples(train, tokenizer, *budgets, template=data.template)
    valid, _ = tokenize_examples(valid, tokenizer, *budgets, template=data.template)
    if not train or not valid:
        raise ValueError(f"data.train: {data.train} has no example whose prompt fits data.max_prompt_tokens="
                         f"{data.max_prompt_tokens} in the {'training' if not train else 'validation'} split")
    return train, valid, test


def load_test_examples(cfg: RunConfig, tokenizer, held_out: list[InstructionExample]
                       ) -> tuple[list[TokenizedExample], list[list[str]]]:
    """The test stage's prompts, tokenised like the training data, and their references (the
    whole responses, untruncated, as ``minillm-rl eval`` scores them): ``eval.test_data`` or the
    examples held out of ``data.train``; empty when the run has no test stage."""
    data, eval_cfg = cfg.data, cfg.eval
    if eval_cfg.test_data:
        held_out = load_instructions(eval_cfg.test_data, split=eval_cfg.test_split, skip_bad=data.skip_bad_records,
                                     max_examples=eval_cfg.num_test or None).examples
    if not held_out:
        return [], []
    examples, _ = tokenize_examples(held_out, tokenizer, data.max_prompt_tokens, eval_cfg.max_new_tokens,
                                    template=data.template)
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


def load_run_inputs(cfg: RunConfig, world_size: int) -> RunInputs:
    """Everything a rank reads before training; ``ValueError`` (one line) on bad input."""
    check_world_size(cfg, world_size)
    check_precision_supported(cfg)
    tokenizer = load_tokenizers(cfg)
    teacher_signal_mode(cfg)  # refuses a 'hidden' teacher signal the teacher's config rules out
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, valid, held_out = load_instruction_splits(cfg, tokenizer)
    references = [[tokenizer.decode(e.response_ids, skip_special_tokens=True).strip()] for e in valid]
    test, test_references = load_test_examples(cfg, tokenizer, held_out)
    return RunInputs(tokenizer, pad_token_id, train, valid, references, load_pretrain_blocks(cfg, tokenizer),
                     test, test_references)


def check_output_dir(directory: str | os.PathLike) -> None:
    """``output.dir`` must be a directory or creatable as one. Creation is tried in the nearest
    existing ancestor with a temporary directory that is removed at once, so the output directory
    itself is not created here (bad input must leave nothing behind)."""
    path = Path(directory).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"output.dir: {directory} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"output.dir: {directory} is not writable")
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
        raise ValueError(f"output.dir: cannot create {directory} ({reason} in {ancestor})") from None


def check_resume_target(resume: str, checkpoint_dir: Path) -> None:
    """``--resume`` must name something to resume from (see
    :func:`~minillm_rl.runtime.checkpointing.resume_source`; its warnings are rank 0's to print)."""
    resume_source(resume, checkpoint_dir, warn=lambda line: None)


def check_run_inputs(cfg: RunConfig, resume: str, world_size: int) -> RunInputs:
    """Every check the CLI process can make before any rank starts (see the module docstring);
    returns the loaded inputs (a run in this process reuses them)."""
    check_output_dir(cfg.output.dir)
    check_resume_target(resume, Path(cfg.output.dir) / CHECKPOINTS_SUBDIR)
    try:
        check_model_files(cfg.model.student, cfg.model.student_gguf_file)
    except ValueError as err:
        raise ValueError(f"model.student: {err}") from None
    return load_run_inputs(cfg, world_size)
