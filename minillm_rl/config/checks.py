"""Checks of a whole :class:`~minillm_rl.config.schema.RunConfig` that involve several fields or the
file system (a single field's range is declared beside it, in the schema).

Relative paths in a recipe (models, data, DeepSpeed file, output directory) resolve against the
current directory of the `minillm-rl` process, not the recipe's directory: recipes are shared
between checkouts and run from the repository root, as ``launch/`` does. Every "not found" line
for a relative path says so (:func:`relative_to_cwd`).
"""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Any

from minillm_rl.config.schema import PHASES, PHASES_USING_TEACHER, RunConfig


def relative_to_cwd(path: str | os.PathLike) -> str:
    """The suffix a "not found" message gets for a relative ``path``: what it was resolved against."""
    if Path(path).expanduser().is_absolute():
        return ""
    return f" (relative paths resolve against the current directory, {os.getcwd()})"


def check_consistency(config: RunConfig, where: Any) -> None:
    """Rules that involve several fields or the file system; ``where(dotted)`` names a field's
    origin and ``where.error(dotted, message)`` builds the :class:`ConfigError`."""
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
        fail("output.resume", f"expected 'none', 'auto' or an existing checkpoint path, got {config.output.resume!r}"
                              f"{relative_to_cwd(config.output.resume)}")
    if runtime.deepspeed_config is not None:
        _check_deepspeed_file(config, fail)


def _check_deepspeed_file(config: RunConfig, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """The DeepSpeed JSON must exist, parse, and not contradict the recipe on values both set."""
    path = Path(config.runtime.deepspeed_config)
    if not path.is_file():
        fail("runtime.deepspeed_config", f"file not found: {path}{relative_to_cwd(path)}")
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
