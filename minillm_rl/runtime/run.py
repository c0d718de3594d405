"""The state one training run shares across its phases, on one learner rank.

Every rank builds the same :class:`TrainingRun` from the same config; what only rank 0 (the
*coordinator*) has is the rollout fleet (Ray workers + replay store), the metrics files and
``eval_model``, a plain copy of the student loaded from
:func:`~minillm_rl.runtime.learner.export_student_state`. That copy feeds the weight sync to the
workers and the ``best/`` directory, so ZeRO-2 and ZeRO-3 share one path.

The responsibilities around it live beside it: inputs (:mod:`~minillm_rl.runtime.inputs`),
validation and checkpoint selection (:mod:`~minillm_rl.runtime.selection`), checkpoints, resume
and preemption (:mod:`~minillm_rl.runtime.resume`), the phase loops
(:mod:`~minillm_rl.runtime.phases`) and their order (:mod:`~minillm_rl.runtime.coordinator`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minillm_rl.config import PHASES_USING_TEACHER, RunConfig
from minillm_rl.errors import RunFailed
from minillm_rl.algorithm.teacher_head import TeacherHead
from minillm_rl.data.prompt_record import write_prompt_record
from minillm_rl.models import load_causal_lm, load_lm_head, save_model_dir
from minillm_rl.runtime.inputs import (
    CHECKPOINTS_SUBDIR,
    RUN_CONFIG_FILE,
    RunInputs,
    check_output_dir,
    clear_previous_run,
    load_run_inputs,
    teacher_signal_mode,
)
from minillm_rl.runtime.learner import (
    DEFAULT_DS_CONFIG,
    build_engine,
    export_student_state,
    resolve_ds_config,
    zero3_construction,
)
from minillm_rl.runtime.weights import state_dict_payload
from minillm_rl.tracking import MetricsLogger, ProgressLine, log_line


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint. ``phase_step`` counts the optimizer steps of
    the current phase, ``total_steps`` those of all phases (``stop_after_steps`` counts these)."""

    phase_index: int = 0
    phase_step: int = 0
    total_steps: int = 0
    policy_version: int = 0
    nonfinite_skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient, all phases
    nonfinite_streak: int = 0  # of them, how many in a row up to the last step
    best_validation_loss: float = math.inf
    best_validation_loss_step: int = -1
    best_rouge: dict[str, dict[str, float]] = field(default_factory=dict)


def advance_progress(progress: Progress, applied: list[bool], phase: str, max_streak: int,
                     last_checkpoint: Path | None) -> None:
    """Count optimizer steps whose update was (``True``) or was not (non-finite loss or gradient)
    applied; a skipped step still consumes its data. ``RunFailed`` after ``max_streak`` skipped in
    a row, raised before any checkpoint of that state; every rank sees the same flags."""
    for step_applied in applied:
        progress.phase_step += 1
        progress.total_steps += 1
        progress.nonfinite_skipped += not step_applied
        progress.nonfinite_streak = 0 if step_applied else progress.nonfinite_streak + 1
        if progress.nonfinite_streak >= max_streak:
            raise RunFailed(f"{progress.nonfinite_streak} non-finite steps in a row at {phase} step "
                            f"{progress.phase_step} (runtime.max_nonfinite_streak={max_streak}); last good "
                            f"checkpoint: {last_checkpoint or 'none (no checkpoint was written yet)'}")


def broadcast_from_coordinator(obj: Any, rank: int, world_size: int) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TrainingRun:
    """State shared by the phases of one run on one rank (see the module docstring)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, resume: str, inputs: RunInputs | None = None,
                 overwrite: bool = False):
        self.cfg, self.rank, self.world_size, self.resume = cfg, rank, world_size, resume
        self.is_coordinator = rank == 0
        self.out = Path(cfg.output.dir)
        self.checkpoint_dir = self.out / CHECKPOINTS_SUBDIR
        self.progress = Progress()
        refusal = None
        if self.is_coordinator:
            try:
                check_output_dir(cfg.output.dir, resume, overwrite)
            except ValueError as err:
                refusal = str(err)
        # Every rank refuses with rank 0 (e.g. an output.dir holding a previous run under a launcher),
        # instead of waiting for it in the next collective until the timeout.
        refusal = broadcast_from_coordinator(refusal, rank, world_size)
        if refusal is not None:
            raise ValueError(refusal)
        self.inputs = inputs if inputs is not None else load_run_inputs(
            cfg, world_size, log_line if self.is_coordinator else None)
        self.resumed_at_step: int | None = None  # total optimizer steps of the checkpoint resumed from
        # The same on every rank (a function of the config and the teacher's config).
        self.teacher_dist = teacher_signal_mode(cfg)
        self._teacher_head: TeacherHead | None = None
        self.exported_version: int | None = None
        self.last_checkpoint_total_step = -1
        self.last_checkpoint: Path | None = None  # the newest verified checkpoint written or resumed from
        self.preemption = None  # a PreemptionSignals, set by run_training
        self.metrics = self.eval_model = self.fleet = None
        self.progress_line: ProgressLine | None = None  # the current phase's (phases/)
        if self.is_coordinator:
            # Loaded before the first write: a student path without weights is bad input too.
            self.eval_model = load_causal_lm(cfg.model.student, dtype=getattr(torch, cfg.model.dtype),
                                             gguf_file=cfg.model.student_gguf_file)
            if overwrite and clear_previous_run(self.out):
                log_line(f"--overwrite: deleted the previous run in {self.out}")
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / RUN_CONFIG_FILE)
            self.metrics = MetricsLogger(self.out, cfg.output.report_to, run_name=self.out.name,
                                         config=cfg.to_dict())
            if any(phase in PHASES_USING_TEACHER for phase in cfg.train.phases):
                from minillm_rl.runtime.rollout.fleet import RolloutFleet

                self.fleet = RolloutFleet(cfg)

    @property
    def workers(self) -> list:
        """Rank 0's rollout worker actors (none on other ranks or without a teacher phase)."""
        return [] if self.fleet is None else self.fleet.workers

    def teacher_head(self, device: torch.device | str) -> TeacherHead | None:
        """The frozen teacher LM head on ``device`` (fp32, read from the teacher's checkpoint once per
        rank) when the teacher signal is ``hidden``, else None."""
        if self.teacher_dist != "hidden":
            return None
        if self._teacher_head is None:
            self._teacher_head = load_lm_head(self.cfg.model.teacher, self.cfg.model.teacher_gguf_file)
        self._teacher_head = self._teacher_head.to(device)
        return self._teacher_head

    @property
    def tokenizer(self):
        return self.inputs.tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.inputs.pad_token_id

    def close(self) -> None:
        """Close the metrics files and the rollout side, also after a failure."""
        if self.progress_line is not None:
            self.progress_line.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.fleet is not None:
            self.fleet.close()
            self.fleet = None

    def phase_name(self, index: int | None = None) -> str:
        return self.cfg.train.phases[self.progress.phase_index if index is None else index]

    def sft_total_steps(self) -> int:
        steps_per_epoch = len(self.inputs.train_examples) // self.cfg.sft.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"sft.batch_size={self.cfg.sft.batch_size} exceeds the "
                             f"{len(self.inputs.train_examples)} training examples")
        return self.cfg.sft.num_epochs * steps_per_epoch

    def build_phase_engine(self, phase_index: int):
        """A fresh DeepSpeed engine for phase ``phase_index``: SFT starts from ``model.student``,
        MiniLLM from the lowest-validation-loss SFT weights when SFT ran before it."""
        cfg = self.cfg
        phase = cfg.train.phases[phase_index]
        init = cfg.model.student
        gguf = cfg.model.student_gguf_file
        if phase == "minillm" and "sft" in cfg.train.phases[:phase_index]:
            init, gguf = self.out / "sft_best_loss", None
        if phase != "minillm":
            optim, micro, total = cfg.sft.optim, cfg.sft.batch_size // self.world_size, self.sft_total_steps()
        else:
            optim, micro, total = cfg.train.optim, cfg.train.micro_batch_size // self.world_size, cfg.train.total_steps
        ds_config = resolve_ds_config(cfg.runtime.deepspeed_config or DEFAULT_DS_CONFIG, optim, micro, self.world_size)
        # A GGUF student is dequantised into a fresh model, which cannot happen inside zero.Init.
        with zero3_construction(ds_config) if gguf is None else contextlib.nullcontext():
            model = load_causal_lm(init, dtype=torch.float32, gguf_file=gguf)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine = build_engine(model, ds_config, optim, micro, total_steps=total)
        if self.is_coordinator:
            print(f"minillm-rl: {phase}: DeepSpeed engine over {self.world_size} learner rank(s), ZeRO stage "
                  f"{engine.zero_optimization_stage()}, {sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()) / 1e6:.1f}M "
                  f"parameters from {init}", flush=True)
        return engine

    def save_model(self, name: str) -> Path:
        """Rank 0: ``eval_model`` (the last export) as the HF directory ``output.dir/name``, with the
        prompt format it was trained with (:mod:`~minillm_rl.data.prompt_record`)."""
        model_dir = save_model_dir(self.eval_model, self.tokenizer, self.out / name)
        write_prompt_record(model_dir, self.cfg.data.template, self.cfg.data.max_prompt_tokens)
        return model_dir

    def export(self, engine) -> None:
        """Gather the student (collective) into rank 0's ``eval_model`` at the current version."""
        state = export_student_state(engine)
        if self.is_coordinator:
            tied = set(state_dict_payload(self.eval_model).aliases)
            result = self.eval_model.load_state_dict(state, strict=False)
            if result.unexpected_keys or set(result.missing_keys) - tied:
                raise ValueError(f"exported student does not fit the evaluation copy: missing "
                                 f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
        self.exported_version = self.progress.policy_version

    def after_steps(self, applied: list[bool]) -> None:
        advance_progress(self.progress, applied, self.phase_name(), self.cfg.runtime.max_nonfinite_streak,
                         self.last_checkpoint)
