"""The training run every learner rank executes: the recipe's phases in order, from a resume point.

``run_training`` is started once per learner rank (by the ``deepspeed`` launcher, ``torchrun``,
``srun``, or as a single process). All ranks build the same data, the same engines and take the
same decisions from the same config; what only rank 0 (the *coordinator*) knows is shipped with
``torch.distributed.broadcast_object_list``. Only rank 0 talks to Ray (rollout workers and the
replay store), writes files and logs metrics.

Design choices worth knowing:

- Data order is a pure function of ``(train.seed, stream, epoch)``: SFT batch ``s`` and MiniLLM
  round ``r`` are recomputed from the step counter, so the "data position" in a checkpoint is the
  step itself and every rank agrees without talking (:mod:`~minillm_rl.runtime.rounds`).
- Rollout shards come back from the workers in arrival order, which is not deterministic; they
  are put in a canonical order (by content) before a round is assembled, so the round, and
  therefore training, is reproducible.
- ``max_staleness >= 1`` launches round ``r + 1``'s generation (with the weights of version
  ``r``) before learning on round ``r``. A resumed run regenerates the in-flight round with the
  restored weights, so only ``max_staleness = 0`` runs resume bit-for-bit.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from minillm_rl.config import RunConfig
from minillm_rl.errors import EXIT_PREEMPTED
from minillm_rl.runtime.checkpointing import parse_checkpoint_tag
from minillm_rl.runtime.inputs import RunInputs
from minillm_rl.runtime.learner import init_distributed
from minillm_rl.runtime.phases.minillm import run_minillm
from minillm_rl.runtime.phases.supervised import run_supervised
from minillm_rl.runtime.preemption import PreemptionSignals, children_ignore_sigusr1
from minillm_rl.runtime.resume import Preempted, restore, resume_point
from minillm_rl.runtime.run import TrainingRun
from minillm_rl.runtime.selection import write_best_json
from minillm_rl.runtime.test_stage import TEST_RESULTS_FILE, run_test_stage
from minillm_rl.tracking import atomic_write_json, log_line


def run_phases(run: TrainingRun) -> int:
    """All phases from the resume point; returns the exit code (0, or 3 when preempted)."""
    cfg = run.cfg
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    start = resume_point(run)
    first_phase = 0
    if start is not None:
        first_phase, phase, _ = parse_checkpoint_tag(start[1])
        if first_phase >= len(cfg.train.phases) or cfg.train.phases[first_phase] != phase:
            raise ValueError(f"checkpoint {start[0] / start[1]} is from phase {first_phase} ({phase}), but "
                             f"train.phases is {cfg.train.phases}; resume with the same recipe")
    engine = None
    for index in range(first_phase, len(cfg.train.phases)):
        engine = None  # free the previous phase's engine before building the next
        if run.world_size > 1:
            dist.barrier()  # rank 0 has finished writing sft_best_loss/, which the next engine loads
        engine = run.build_phase_engine(index)
        run.exported_version = None  # eval_model holds the previous phase's weights
        if start is not None and index == first_phase:
            restore(run, engine, start)
        else:
            run.progress.phase_index, run.progress.phase_step = index, 0
        try:
            (run_minillm if run.phase_name(index) == "minillm" else run_supervised)(run, engine)
        except Preempted as stop:
            if run.is_coordinator:
                log_line(f"{stop}; resume with --resume auto")
            return EXIT_PREEMPTED
    finish(run, engine)
    return 0


def finish(run: TrainingRun, engine) -> None:
    """The final weights as ``final/``, best.json and a run summary (replay accounting)."""
    progress = run.progress
    if run.exported_version != progress.policy_version or run.cfg.train.phases[-1] != "minillm":
        run.export(engine)
    if not run.is_coordinator:
        return
    run.save_model("final")
    write_best_json(run)
    atomic_write_json(run.out / "run_summary.json", {
        "total_steps": progress.total_steps, "policy_version": progress.policy_version,
        "best_validation_loss": progress.best_validation_loss, "best_rouge": progress.best_rouge,
        "replay": run.fleet.replay_stats() if run.fleet is not None else None, "world_size": run.world_size,
        "nonfinite_skipped": progress.nonfinite_skipped,
    })


def run_training(cfg: RunConfig, resume: str | None = None, inputs: RunInputs | None = None,
                 overwrite: bool = False) -> int:
    """Train ``cfg`` on this learner rank; every rank of the job calls it.

    Args:
        resume: ``"none"``, ``"auto"`` (latest checkpoint under ``output.dir`` if any) or a
            checkpoint path; ``None`` uses ``output.resume``.
        inputs: the run's inputs when this process already loaded them (a world of one).
        overwrite: start over in an ``output.dir`` that holds a previous run, deleting its files
            (otherwise such a directory is refused unless resumed).

    Returns:
        The process exit code: 0 when done, :data:`EXIT_PREEMPTED` after a preemption signal
        (SIGTERM / SIGUSR1, see :mod:`minillm_rl.runtime.preemption`) or ``runtime.stop_after_steps``.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
    if cfg.runtime.learner_threads:
        torch.set_num_threads(cfg.runtime.learner_threads)
    rank, world_size = init_distributed(cfg.runtime.collective_timeout_s)
    # Handlers go in before start-up, so a signal during it is acted on at the first step boundary.
    with PreemptionSignals(announce=rank == 0, world_size=world_size,
                           timeout_s=cfg.runtime.collective_timeout_s) as preemption:
        with children_ignore_sigusr1():  # rank 0 starts Ray's processes here
            run = TrainingRun(cfg, rank, world_size, resume if resume is not None else cfg.output.resume,
                              inputs if world_size == 1 else None, overwrite)
        preemption.install()  # ray.init (rank 0) replaced the SIGTERM handler with one that aborts
        run.preemption = preemption
        try:
            code = run_phases(run)
        finally:
            run.close()
    if world_size > 1:
        dist.barrier()  # no rank tears the group down while another still saves
    if code == 0 and rank == 0 and run.inputs.test_examples:
        if run.resumed_at_step == run.progress.total_steps and (run.out / TEST_RESULTS_FILE).is_file():
            # A finished run resumed: nothing was trained, so its test results still hold.
            log_line(f"test stage: skipped: resumed from a finished run ({run.last_checkpoint}), no step trained, "
                     f"and {run.out / TEST_RESULTS_FILE} holds its test; delete it to test again")
            return code
        # After the barrier: the other ranks are done, so a long test stage cannot time out a collective.
        results = run_test_stage(cfg, run.inputs)
        log_line(f"results: {results} (answers side by side), report: {results.parent / 'report.md'}, "
                 f"curves: {results.parent / 'curves.png'}, best checkpoint: {results.parent / 'best'}")
    return code
