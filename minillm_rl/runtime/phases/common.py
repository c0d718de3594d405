"""What the phase loops share: their progress line, the sampling settings, teacher calls."""

from __future__ import annotations

from dataclasses import asdict

import torch

from minillm_rl.algorithm.sampler import SamplingConfig
from minillm_rl.runtime.run import TrainingRun
from minillm_rl.tracking import ProgressLine


def phase_progress(run: TrainingRun, total: int, phase: str, unit: str) -> ProgressLine:
    """The phase's progress line (printed by rank 0 only); kept on ``run`` so that ``run.close``
    ends it before an error is printed."""
    run.progress_line = ProgressLine(phase, total, unit, start=min(run.progress.phase_step, total),
                                     interval_s=run.cfg.output.progress_interval_s, enabled=run.is_coordinator)
    return run.progress_line


def sampling_config(run: TrainingRun) -> SamplingConfig:
    """The recipe's sampling section, with ``teacher_dist`` resolved (``auto``) for this teacher."""
    section = asdict(run.cfg.sampling)
    return SamplingConfig(**{**section, "teacher_dist": run.teacher_dist,
                             "teacher_dist_dtype": getattr(torch, section["teacher_dist_dtype"])})


def worker_calls(run: TrainingRun, method: str, argument_lists: list[tuple], what: str):
    """``method`` on the workers round-robin, one call per argument tuple, re-made on a restarted
    worker (rank 0; :class:`~minillm_rl.runtime.rollout.client.WorkerCalls`)."""
    from minillm_rl.runtime.rollout.client import WorkerCalls

    return WorkerCalls(run.workers, method, argument_lists, run.cfg.runtime.rpc_timeout_s, what)
