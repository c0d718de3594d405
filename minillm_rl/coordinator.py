"""The training run every learner rank executes: phases, checkpoints, resume, selection.

``run_training`` is started once per learner rank (by the ``deepspeed`` launcher, ``torchrun``,
``srun``, or as a single process). All ranks build the same data, the same engines and take the
same decisions from the same config; what only rank 0 (the *coordinator*) knows is shipped with
``torch.distributed.broadcast_object_list``. Only rank 0 talks to Ray (rollout workers and the
replay store), writes files and logs metrics.

Design choices worth knowing:

- Data order is a pure function of ``(train.seed, stream, epoch)``: SFT batch ``s`` and MiniLLM
  round ``r`` are recomputed from the step counter, so the "data position" in a checkpoint is the
  step itself and every rank agrees without talking.
- Rank 0 keeps a plain copy of the student (``eval_model``) loaded from
  :func:`~minillm_rl.learner.export_student_state`; it feeds the weight sync to the workers, the
  ``best/`` directory, so ZeRO-2 and ZeRO-3 share one path. Validation generation (Rouge-L) is
  split over the rollout workers when the run has them (they get that copy's weights), else over
  the learner ranks, each with its engine's module on its own device (collective under ZeRO-3);
  the draws depend on the seed and on the number of workers or ranks.
- Rollout shards come back from the workers in arrival order, which is not deterministic; they
  are put in a canonical order (by content) before a round is assembled, so the round, and
  therefore training, is reproducible.
- ``max_staleness >= 1`` launches round ``r + 1``'s generation (with the weights of version
  ``r``) before learning on round ``r``. A resumed run regenerates the in-flight round with the
  restored weights, so only ``max_staleness = 0`` runs resume bit-for-bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from minillm_rl.checkpointing import (
    best_rouge_tag,
    checkpoint_tag,
    discard_manifest,
    parse_checkpoint_tag,
    resume_source,
    rotate_checkpoints,
    write_manifest,
)
from minillm_rl.config import PHASES_USING_TEACHER, RunConfig
from minillm_rl.data import load_instructions, split_validation, tokenize_examples
from minillm_rl.data.prepared import is_prepared_dir, load_prepared, load_prepared_pretrain
from minillm_rl.data.pretraining import pack_into_blocks, read_text_documents
from minillm_rl.errors import EXIT_PREEMPTED, RunFailed
from minillm_rl.evaluation import EvalConfig, evaluate, generate_responses
from minillm_rl.learner import (
    build_engine,
    export_student_state,
    init_distributed,
    load_checkpoint,
    resolve_ds_config,
    save_checkpoint,
    zero3_construction,
)
from minillm_rl.models import (
    check_model_files,
    check_tokenizers_compatible,
    load_causal_lm,
    load_tokenizer,
    save_model_dir,
)
from minillm_rl.preemption import PreemptionSignals, children_ignore_sigusr1
from minillm_rl.rounds import derived_seed, split_evenly
from minillm_rl.tracking import MetricsLogger, atomic_write_json
from minillm_rl.weights import state_dict_payload

# Used when runtime.deepspeed_config is not set: ZeRO-2 in fp32, which runs on CPU and GPU.
DEFAULT_DS_CONFIG = {"gradient_accumulation_steps": 1, "steps_per_print": 10**9, "wall_clock_breakdown": False,
                     "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}}
# Worker version tags of weights pushed for validation in supervised phases: above any MiniLLM
# policy version (one per round), so they never pass for one.
SUPERVISED_EVAL_VERSION_BASE = 2**40


class Preempted(Exception):
    """A preemption signal or ``runtime.stop_after_steps``: a checkpoint was written, the run stops."""


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


# --------------------------------------------------------------------------------------------
# Pure helpers (data order and round assembly: minillm_rl.rounds)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

class TrainingRun:
    """State shared by the phases of one run on one rank (see the module docstring)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, resume: str):
        self.cfg, self.rank, self.world_size, self.resume = cfg, rank, world_size, resume
        self.is_coordinator = rank == 0
        self.out = Path(cfg.output.dir)
        self.checkpoint_dir = self.out / "checkpoints"
        self.progress = Progress()
        self._check_supported()
        self.tokenizer = self._load_tokenizers()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.train_examples, self.valid_examples = self._load_data()
        self.pretrain_blocks = self._load_pretrain_blocks()
        self.references = [[self.tokenizer.decode(e.response_ids, skip_special_tokens=True).strip()]
                           for e in self.valid_examples]
        self.exported_version: int | None = None
        self._last_checkpoint_total_step = -1
        self.last_checkpoint: Path | None = None  # the newest verified checkpoint written or resumed from
        self.preemption = None  # a PreemptionSignals, set by run_training
        self.metrics = self.eval_model = self.replay = None
        self.workers: list = []
        self.progress_bar = None  # the current phase's tqdm bar (phases.py)
        self._ray_started = False
        if self.is_coordinator:
            # Loaded before the first write: a student path without weights is bad input too.
            self.eval_model = load_causal_lm(cfg.model.student, dtype=getattr(torch, cfg.model.dtype),
                                             gguf_file=cfg.model.student_gguf_file)
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            self.metrics = MetricsLogger(self.out)
            if any(phase in PHASES_USING_TEACHER for phase in cfg.train.phases):
                self._start_rollout_side()

    # ---- start-up ---------------------------------------------------------------------------

    def _check_supported(self) -> None:
        cfg = self.cfg
        for dotted, batch in (("train.micro_batch_size", cfg.train.micro_batch_size),
                              ("sft.batch_size", cfg.sft.batch_size)):
            if batch % self.world_size:
                raise ValueError(f"{dotted}={batch} must be a multiple of the number of learner ranks "
                                 f"({self.world_size}); it counts rows over all ranks")

    def _load_tokenizers(self):
        model = self.cfg.model
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

    def _load_data(self):
        data = self.cfg.data
        if is_prepared_dir(data.train):  # `minillm-rl prepare-data` output: already split and tokenised
            return load_prepared(data.train, self.tokenizer, data)
        loaded = load_instructions(data.train, split=data.split, skip_bad=data.skip_bad_records)
        if len(loaded.examples) <= data.num_validation:
            raise ValueError(f"data.num_validation={data.num_validation} leaves no training examples "
                             f"({data.train} has {len(loaded.examples)})")
        train, valid = split_validation(loaded.examples, data.num_validation, data.split_seed)
        budgets = (data.max_prompt_tokens, data.max_length - data.max_prompt_tokens)
        train, _ = tokenize_examples(train, self.tokenizer, *budgets, template=data.template)
        valid, _ = tokenize_examples(valid, self.tokenizer, *budgets, template=data.template)
        if not train or not valid:
            raise ValueError(f"data.train: {data.train} has no example whose prompt fits data.max_prompt_tokens="
                             f"{data.max_prompt_tokens} in the {'training' if not train else 'validation'} split")
        return train, valid

    def _load_pretrain_blocks(self) -> torch.Tensor | None:
        """The PT term's corpus blocks ``[num_blocks, block_size]`` (minillm phase with
        ``loss.lm_coef > 0``; from the prepared dataset or ``data.pretrain_corpus``), or None."""
        cfg, data = self.cfg, self.cfg.data
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
            return pack_into_blocks(read_text_documents(data.pretrain_corpus), self.tokenizer, data.max_length)
        except ValueError as err:
            raise ValueError(f"data.pretrain_corpus: {err}") from None

    def _start_rollout_side(self) -> None:
        """Ray, the rollout workers and the replay store (rank 0 only)."""
        import ray

        from minillm_rl.replay import make_replay_store_actor
        from minillm_rl.rollout.worker import make_rollout_worker

        runtime, model = self.cfg.runtime, self.cfg.model
        if runtime.ray_address == "local":
            ray.init(num_cpus=runtime.num_rollout_workers * runtime.worker_threads, include_dashboard=False,
                     log_to_driver=False)
            self._ray_started = True
        elif not ray.is_initialized():
            ray.init(address=runtime.ray_address, log_to_driver=False)
        dtype = getattr(torch, model.dtype)
        teacher = functools.partial(load_causal_lm, model.teacher, dtype, model.teacher_gguf_file)
        student = functools.partial(load_causal_lm, model.student, dtype, model.student_gguf_file)
        tokenizer = functools.partial(load_tokenizer, model.student, model.student_gguf_file)
        self.workers = [make_rollout_worker(teacher, student, tokenizer, threads=runtime.worker_threads,
                                            seed=self.cfg.train.seed, name=f"rollout-worker-{i}",
                                            num_gpus=runtime.worker_gpus,
                                            device="cuda" if runtime.worker_gpus else "cpu")
                        for i in range(runtime.num_rollout_workers)]
        self.replay = make_replay_store_actor(runtime.replay_max_samples, runtime.replay_max_bytes)

    def close(self) -> None:
        """Close the metrics file and end the rollout side, also after a failure: the actors are
        killed without restart (a stuck worker stops generating; on a shared cluster they would
        outlive this process otherwise), and a Ray instance this run started is shut down."""
        if self.progress_bar is not None:
            self.progress_bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.workers or self.replay is not None:
            import ray

            for actor in [*self.workers, *([self.replay] if self.replay is not None else [])]:
                ray.kill(actor, no_restart=True)
            self.workers, self.replay = [], None
        if self._ray_started:
            import ray

            ray.shutdown()

    # ---- engines, export, evaluation ----------------------------------------------------------

    def phase_name(self, index: int | None = None) -> str:
        return self.cfg.train.phases[self.progress.phase_index if index is None else index]

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
        return build_engine(model, ds_config, optim, micro, total_steps=total)

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

    def _eval_on_workers(self) -> bool:
        """The same answer on every rank (only rank 0 holds the worker handles)."""
        phases = self.cfg.train.phases
        return self.cfg.runtime.eval_on_workers and any(phase in PHASES_USING_TEACHER for phase in phases)

    def validation_protocol(self) -> str:
        s = self.cfg.sampling
        where = f"split over {self.cfg.runtime.num_rollout_workers} rollout workers" if self._eval_on_workers() \
            else f"split over {self.world_size} learner ranks"
        return (f"validation: {len(self.valid_examples)} held-out prompts, one sample each at temperature "
                f"{s.temperature}, top_k {s.top_k}, top_p {s.top_p}, max_new_tokens {s.max_new_tokens}, "
                f"seed {self.cfg.train.seed}, {where}")

    def _generate_on_workers(self, eval_cfg: EvalConfig, prompt_id_lists: list[list[int]], seed: int) -> list[str]:
        """Validation texts from the rollout workers, which get ``eval_model``'s weights first. The
        version tag: the MiniLLM policy version (the next round's sync then has nothing to send);
        in supervised phases one no policy version can equal, so MiniLLM's first sync replaces it."""
        from minillm_rl.rollout.client import generate_texts_on_workers

        progress, runtime = self.progress, self.cfg.runtime
        version = progress.policy_version if self.phase_name() == "minillm" \
            else SUPERVISED_EVAL_VERSION_BASE + progress.total_steps
        shards = split_evenly(prompt_id_lists, len(self.workers))
        seeds = [derived_seed(seed, "validation", i) for i in range(len(shards))]
        texts = generate_texts_on_workers(self.workers, shards, seeds, eval_cfg, self.eval_model, version,
                                          runtime.rpc_timeout_s, runtime.weight_sync_timeout_s)
        return [text for shard in texts for text in shard]

    def _generate_on_learners(self, engine, eval_cfg: EvalConfig, prompt_id_lists: list[list[int]],
                              seed: int) -> list[str]:
        """Validation texts generated data-parallel by the learner ranks with the engine's own
        module, on their devices: rank ``r`` takes prompts ``r, r + W, ...`` (padded with copies of
        the first prompt to equal counts: under ZeRO-3 every forward is collective, so every rank
        runs as many batches, with ``synced_gpus``); the texts are gathered on every rank."""
        world = self.world_size
        mine = prompt_id_lists[self.rank :: world]
        per_rank = -(-len(prompt_id_lists) // world)
        module = engine.module
        was_training = module.training
        module.eval()
        try:
            texts = generate_responses(module, self.tokenizer, mine + [prompt_id_lists[0]] * (per_rank - len(mine)),
                                       eval_cfg, derived_seed(seed, "validation", self.rank),
                                       synced_gpus=world > 1 and engine.zero_optimization_stage() == 3)[: len(mine)]
        finally:
            module.train(was_training)
        gathered = [texts]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, texts)
        ordered = [""] * len(prompt_id_lists)
        for rank, rank_texts in enumerate(gathered):
            ordered[rank::world] = rank_texts
        return ordered

    def validation_rouge(self, engine) -> float | None:
        """Rouge-L of the current weights on the validation set: generated by the rollout workers
        (rank 0 asks them; the other ranks return None), or data-parallel by the learner ranks
        (every rank calls this and gets the score)."""
        s = self.cfg.sampling
        eval_cfg = EvalConfig.validation(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                         max_new_tokens=s.max_new_tokens, seed=self.cfg.train.seed)
        if self._eval_on_workers():
            if not self.is_coordinator:
                return None
            generate = functools.partial(self._generate_on_workers, eval_cfg)
        else:
            generate = functools.partial(self._generate_on_learners, engine, eval_cfg)
        return evaluate(None, self.tokenizer, self.valid_examples, self.references, eval_cfg,
                        generate=generate).rouge_l

    def select(self, engine, validation_loss: float | None = None) -> dict[str, float]:
        """Validation of the current weights: Rouge-L (rank 0) and, for SFT, the given loss; keeps
        ``sft_best_loss/`` (lowest loss), ``best/`` + ``best.json`` (best Rouge-L of the last phase)."""
        started = time.perf_counter()
        if self.phase_name() != "minillm" or self.exported_version != self.progress.policy_version:
            self.export(engine)  # supervised steps do not bump the policy version
        phase, step, progress = self.phase_name(), self.progress.phase_step, self.progress
        record: dict[str, float] = {}
        if validation_loss is not None:
            record["validation_loss"] = validation_loss
            if phase == "sft" and validation_loss < progress.best_validation_loss:
                progress.best_validation_loss, progress.best_validation_loss_step = validation_loss, step
                if self.is_coordinator:
                    save_model_dir(self.eval_model, self.tokenizer, self.out / "sft_best_loss")
        score = self.validation_rouge(engine)
        if self.is_coordinator:
            record["validation_rouge_l"] = score
            best = progress.best_rouge.get(phase)
            if best is None or score > best["validation_rouge_l"]:
                progress.best_rouge[phase] = {"step": step, "validation_rouge_l": score}
                if progress.phase_index == len(self.cfg.train.phases) - 1:
                    save_model_dir(self.eval_model, self.tokenizer, self.out / "best")
                    self.write_best_json()
            record["time/eval"] = time.perf_counter() - started
            self.metrics.log(phase, step, record)
        return record

    def write_best_json(self) -> None:
        final_phase = self.cfg.train.phases[-1]
        best = self.progress.best_rouge.get(final_phase)
        if best is None:
            return
        atomic_write_json(self.out / "best.json", {
            "phase": final_phase, "step": best["step"], "validation_rouge_l": best["validation_rouge_l"],
            "protocol": self.validation_protocol(), "best_by_phase": self.progress.best_rouge,
        })

    # ---- checkpoints ----------------------------------------------------------------------------

    def replay_counters(self) -> dict[str, int] | None:
        if self.replay is None:
            return None
        from minillm_rl.rollout.worker import call_with_timeout

        return call_with_timeout(self.replay.state_dict.remote(), self.cfg.runtime.rpc_timeout_s, "replay.state_dict")

    def checkpoint(self, engine) -> None:
        """DeepSpeed checkpoint + client state (collective), then rank 0 writes the manifest that
        makes it trusted and rotates to ``output.keep_checkpoints`` (see :mod:`minillm_rl.checkpointing`)."""
        if self._last_checkpoint_total_step == self.progress.total_steps:
            return
        client_state = {
            "progress": asdict(self.progress),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "replay": self.replay_counters() if self.is_coordinator else None,
        }
        tag = checkpoint_tag(self.progress.phase_index, self.phase_name(), self.progress.phase_step)
        if self.is_coordinator:
            discard_manifest(self.checkpoint_dir / tag)  # a stale manifest must not vouch for a rewrite
        if self.world_size > 1:
            dist.barrier()  # no rank writes into the tag while its old manifest may still be there
        save_checkpoint(engine, self.checkpoint_dir, tag, client_state)
        if self.world_size > 1:
            dist.barrier()  # every rank's files are complete before they are hashed
        self._last_checkpoint_total_step = self.progress.total_steps
        self.last_checkpoint = self.checkpoint_dir / tag
        if self.is_coordinator:
            write_manifest(self.checkpoint_dir / tag, {"progress": asdict(self.progress), "world_size": self.world_size})
            rotate_checkpoints(self.checkpoint_dir, tag, self.cfg.output.keep_checkpoints,
                               best_rouge_tag(self.cfg.train.phases, self.progress.phase_index, self.progress.best_rouge))

    def resume_point(self) -> tuple[Path, str] | None:
        """``(checkpoint_dir, tag)`` to resume from (verified, see :func:`resume_source`), or
        ``None`` for a fresh start. Rank 0 checks the files; every rank gets its answer or error."""
        answer = None
        if self.is_coordinator:
            try:
                answer = ("ok", resume_source(self.resume, self.checkpoint_dir, lambda line: print(
                    f"minillm-rl: warning: {line}", file=sys.stderr, flush=True)))
            except ValueError as err:
                answer = ("error", str(err))
        kind, value = broadcast_from_coordinator(answer, self.rank, self.world_size)
        if kind == "error":
            raise ValueError(value)
        return value

    def restore(self, client_state: dict) -> None:
        self.progress = Progress(**client_state["progress"])
        rng = client_state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if self.is_coordinator and self.replay is not None and client_state["replay"] is not None:
            from minillm_rl.rollout.worker import call_with_timeout

            call_with_timeout(self.replay.load_state_dict.remote(client_state["replay"]),
                              self.cfg.runtime.rpc_timeout_s, "replay.load_state_dict")
        self._last_checkpoint_total_step = self.progress.total_steps

    def after_steps(self, applied: list[bool]) -> None:
        advance_progress(self.progress, applied, self.phase_name(), self.cfg.runtime.max_nonfinite_streak,
                         self.last_checkpoint)

    def maybe_preempt(self, engine, steps_before: int) -> None:
        """At a step (SFT) or round (MiniLLM) boundary: checkpoint and stop when this step crossed
        ``runtime.stop_after_steps`` or any rank received a preemption signal (collective: every
        rank calls it at every boundary)."""
        stop = self.cfg.runtime.stop_after_steps
        if stop and steps_before < stop <= self.progress.total_steps:
            reason = "runtime.stop_after_steps"
        else:
            reason = self.preemption.requested() if self.preemption is not None else None
        if reason is not None:
            self.checkpoint(engine)
            raise Preempted(f"stopped after {self.progress.total_steps} optimizer steps ({reason}); "
                            f"checkpoint {self.last_checkpoint}")

    def sft_total_steps(self) -> int:
        steps_per_epoch = len(self.train_examples) // self.cfg.sft.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"sft.batch_size={self.cfg.sft.batch_size} exceeds the {len(self.train_examples)} "
                             f"training examples")
        return self.cfg.sft.num_epochs * steps_per_epoch

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        """All phases from the resume point; returns the exit code (0, or 3 when preempted)."""
        from minillm_rl.phases import (  # phases imports this module
            run_minillm,
            run_supervised,
        )

        torch.manual_seed(self.cfg.train.seed)
        random.seed(self.cfg.train.seed)
        np.random.seed(self.cfg.train.seed % 2**32)
        start = self.resume_point()
        first_phase = 0
        if start is not None:
            first_phase, phase, _ = parse_checkpoint_tag(start[1])
            if first_phase >= len(self.cfg.train.phases) or self.cfg.train.phases[first_phase] != phase:
                raise ValueError(f"checkpoint {start[0] / start[1]} is from phase {first_phase} ({phase}), but "
                                 f"train.phases is {self.cfg.train.phases}; resume with the same recipe")
        engine = None
        for index in range(first_phase, len(self.cfg.train.phases)):
            engine = None  # free the previous phase's engine before building the next
            if self.world_size > 1:
                dist.barrier()  # rank 0 has finished writing sft_best_loss/, which the next engine loads
            engine = self.build_phase_engine(index)
            self.exported_version = None  # eval_model holds the previous phase's weights
            if start is not None and index == first_phase:
                self.restore(load_checkpoint(engine, *start))
                self.last_checkpoint = start[0] / start[1]
            else:
                self.progress.phase_index, self.progress.phase_step = index, 0
            try:
                (run_minillm if self.phase_name(index) == "minillm" else run_supervised)(self, engine)
            except Preempted as stop:
                if self.is_coordinator:
                    print(f"minillm-rl: {stop}; resume with --resume auto", flush=True)
                return EXIT_PREEMPTED
        self.finish(engine)
        return 0

    def finish(self, engine) -> None:
        """The final weights as ``final/``, best.json and a run summary (replay accounting)."""
        if self.exported_version != self.progress.policy_version or self.cfg.train.phases[-1] != "minillm":
            self.export(engine)
        if not self.is_coordinator:
            return
        save_model_dir(self.eval_model, self.tokenizer, self.out / "final")
        self.write_best_json()
        replay = None
        if self.replay is not None:
            from minillm_rl.rollout.worker import call_with_timeout

            replay = call_with_timeout(self.replay.stats.remote(), self.cfg.runtime.rpc_timeout_s, "replay.stats")
        atomic_write_json(self.out / "run_summary.json", {
            "total_steps": self.progress.total_steps, "policy_version": self.progress.policy_version,
            "best_validation_loss": self.progress.best_validation_loss, "best_rouge": self.progress.best_rouge,
            "replay": replay, "world_size": self.world_size, "nonfinite_skipped": self.progress.nonfinite_skipped,
        })


def run_training(cfg: RunConfig, resume: str | None = None) -> int:
    """Train ``cfg`` on this learner rank; every rank of the job calls it.

    Args:
        resume: ``"none"``, ``"auto"`` (latest checkpoint under ``output.dir`` if any) or a
            checkpoint path; ``None`` uses ``output.resume``.

    Returns:
        The process exit code: 0 when done, :data:`EXIT_PREEMPTED` after a preemption signal
        (SIGTERM / SIGUSR1, see :mod:`minillm_rl.preemption`) or ``runtime.stop_after_steps``.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
    rank, world_size = init_distributed(cfg.runtime.collective_timeout_s)
    # Handlers go in before start-up, so a signal during it is acted on at the first step boundary.
    with PreemptionSignals(announce=rank == 0, world_size=world_size,
                           timeout_s=cfg.runtime.collective_timeout_s) as preemption:
        with children_ignore_sigusr1():  # rank 0 starts Ray's processes here
            run = TrainingRun(cfg, rank, world_size, resume if resume is not None else cfg.output.resume)
        preemption.install()  # ray.init (rank 0) replaced the SIGTERM handler with one that aborts
        run.preemption = preemption
        try:
            code = run.run()
        finally:
            run.close()
    if world_size > 1:
        dist.barrier()  # no rank tears the group down while another still saves
    return code
