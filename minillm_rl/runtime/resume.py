"""Checkpoints of a run, resuming from one, and stopping for preemption.

A checkpoint is DeepSpeed's (module, optimizer, scheduler, ZeRO partitions) plus the run's
client state: :class:`~minillm_rl.runtime.run.Progress`, the RNG states and the replay store's
counters. The data position is the step counter itself (data order is a pure function of the
config and the step), so ``--resume auto`` continues exactly where a run stopped. The files are
trusted through the manifests of :mod:`~minillm_rl.runtime.checkpointing`.

Functions here take the :class:`~minillm_rl.runtime.run.TrainingRun` as ``run``.
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minillm_rl.runtime.checkpointing import (
    best_rouge_tag,
    checkpoint_tag,
    discard_manifest,
    parse_checkpoint_tag,
    resume_source,
    rotate_checkpoints,
    write_manifest,
)
from minillm_rl.runtime.learner import load_checkpoint, save_checkpoint
from minillm_rl.runtime.run import Progress, broadcast_from_coordinator
from minillm_rl.tracking import log_line


class Preempted(Exception):
    """A preemption signal or ``runtime.stop_after_steps``: a checkpoint was written, the run stops."""


def checkpoint(run, engine) -> None:
    """DeepSpeed checkpoint + client state (collective), then rank 0 writes the manifest that
    makes it trusted and rotates to ``output.keep_checkpoints``. Once per optimizer step."""
    progress = run.progress
    if run.last_checkpoint_total_step == progress.total_steps:
        return
    client_state = {
        "progress": asdict(progress),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "replay": run.fleet.replay_counters() if run.fleet is not None else None,
    }
    tag = checkpoint_tag(progress.phase_index, run.phase_name(), progress.phase_step)
    if run.is_coordinator:
        discard_manifest(run.checkpoint_dir / tag)  # a stale manifest must not vouch for a rewrite
    if run.world_size > 1:
        dist.barrier()  # no rank writes into the tag while its old manifest may still be there
    save_checkpoint(engine, run.checkpoint_dir, tag, client_state)
    if run.world_size > 1:
        dist.barrier()  # every rank's files are complete before they are hashed
    run.last_checkpoint_total_step = progress.total_steps
    run.last_checkpoint = run.checkpoint_dir / tag
    if run.is_coordinator:
        write_manifest(run.checkpoint_dir / tag, {"progress": asdict(progress), "world_size": run.world_size})
        rotate_checkpoints(run.checkpoint_dir, tag, run.cfg.output.keep_checkpoints,
                           best_rouge_tag(run.cfg.train.phases, progress.phase_index, progress.best_rouge))


def resume_point(run) -> tuple[Path, str] | None:
    """``(checkpoint_dir, tag)`` to resume from (verified, see
    :func:`~minillm_rl.runtime.checkpointing.resume_source`), or ``None`` for a fresh start.
    Rank 0 checks the files; every rank gets its answer or error."""
    answer = None
    if run.is_coordinator:
        try:
            answer = ("ok", resume_source(run.resume, run.checkpoint_dir, lambda line: print(
                f"minillm-rl: warning: {line}", file=sys.stderr, flush=True)))
        except ValueError as err:
            answer = ("error", str(err))
    kind, value = broadcast_from_coordinator(answer, run.rank, run.world_size)
    if kind == "error":
        raise ValueError(value)
    if run.is_coordinator and run.resume != "none":
        if value is None:
            searched = run.checkpoint_dir if run.resume == "auto" else run.resume
            log_line(f"--resume {run.resume}: no checkpoint in {searched}; starting from the beginning")
        else:
            index, phase, step = parse_checkpoint_tag(value[1])
            log_line(f"--resume {run.resume}: resuming from {value[0] / value[1]} (phase {index}, {phase}, "
                     f"step {step})")
    return value


def restore(run, engine, start: tuple[Path, str]) -> None:
    """Load checkpoint ``start`` into the fresh ``engine`` and the run's progress, RNGs and replay
    counters."""
    client_state = load_checkpoint(engine, *start)
    run.progress = Progress(**client_state["progress"])
    rng = client_state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if run.fleet is not None and client_state["replay"] is not None:
        run.fleet.restore_replay_counters(client_state["replay"])
    run.last_checkpoint_total_step = run.resumed_at_step = run.progress.total_steps
    run.last_checkpoint = start[0] / start[1]


def maybe_preempt(run, engine, steps_before: int) -> None:
    """At a step (SFT) or round (MiniLLM) boundary: checkpoint and stop when this step crossed
    ``runtime.stop_after_steps`` or any rank received a preemption signal (collective: every
    rank calls it at every boundary)."""
    stop = run.cfg.runtime.stop_after_steps
    if stop and steps_before < stop <= run.progress.total_steps:
        reason = "runtime.stop_after_steps"
    else:
        reason = run.preemption.requested() if run.preemption is not None else None
    if reason is not None:
        checkpoint(run, engine)
        raise Preempted(f"stopped after {run.progress.total_steps} optimizer steps ({reason}); "
                        f"checkpoint {run.last_checkpoint}")
